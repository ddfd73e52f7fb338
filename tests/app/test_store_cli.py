"""`vla-steer store check|repair`, run as a user runs it: the installed command, in a subprocess."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
from support import VLA_STEER

from vla_steer.core.rollouts import Recorder, open_store
from vla_steer.core.rollouts.format import LOG, decode_record


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLA_STEER, *args], capture_output=True, text=True, timeout=120)


def record(root: Path, n: int, *, end: bool = True) -> str:
    rng = np.random.default_rng(n)
    ep = Recorder(root).start_episode({"task": "cli"})
    for _ in range(n):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        ep.step(images={"cam": img}, state=rng.standard_normal(4), action=rng.standard_normal(3), reward=0.0)
    if end:
        ep.end(success=True)
    else:
        ep.abort("stopped")
    return ep.id


def step_span(log: Path, i: int) -> tuple[int, int]:
    """Where step `i`'s record lies in an intact log."""
    data, pos = log.read_bytes(), 0
    while True:
        header, _, end = decode_record(memoryview(data), pos)
        if header["k"] == "step" and header["i"] == i:
            return pos, end
        pos = end


def test_check_and_repair_through_the_command(tmp_path):
    run = tmp_path / "run"
    root = run / "rollouts"  # a run directory holding its store, as `vla-steer sim` writes it
    ok = record(root, 5)
    incomplete = record(root, 3, end=False)
    flipped = record(root, 10)
    cut = record(root, 6)
    zeros = record(root, 2, end=False)

    flipped_log = root / "episodes" / flipped / LOG
    start, end = step_span(flipped_log, 4)
    data = bytearray(flipped_log.read_bytes())
    data[start + 25] ^= 0xFF
    flipped_log.write_bytes(bytes(data))
    damaged_flipped = bytes(data)
    cut_log = root / "episodes" / cut / LOG
    cut_start, _ = step_span(cut_log, 4)
    original_cut = cut_log.read_bytes()
    cut_log.write_bytes(original_cut[: cut_start + 7])  # a power cut inside step 4's record
    zeros_log = root / "episodes" / zeros / LOG
    original_zeros = zeros_log.read_bytes()
    zeros_log.write_bytes(original_zeros + bytes(4096))  # a block allocated, never written

    r = run_cli("store", "check", str(run))
    assert r.returncode == 1, r.stderr
    lines = dict(line.split("  ", 1) for line in r.stdout.splitlines() if "  " in line)
    assert lines[ok] == "ok: 5 steps"
    assert lines[incomplete] == "incomplete: 3 steps, no end record"
    assert lines[flipped].startswith("damaged: 9 steps; 1 step lost (4); ")
    assert f"bytes {start}-{end} ({end - start} B): crc mismatch" in lines[flipped]
    assert lines[cut].startswith("damaged: 4 steps, no end record; 2 steps lost (4-5); ")
    assert f"bytes {cut_start}-{len(original_cut)}" in lines[cut]
    zero_range = f"bytes {len(original_zeros)}-{len(original_zeros) + 4096} (4096 B): zero-filled"
    assert (
        lines[zeros]
        == f"damaged: 2 steps, no end record; {zero_range} (blocks never written, as a power cut leaves them)"
    )
    assert "5 episodes, 3 damaged, 1 incomplete, 1 ok" in r.stdout
    assert f"vla-steer store repair {run}" in r.stdout

    r = run_cli("store", "repair", str(run))
    assert r.returncode == 0, r.stderr
    assert "5 episodes checked, 3 repaired" in r.stdout
    out = dict(line.split("  ", 1) for line in r.stdout.splitlines() if "  " in line)
    assert set(out) == {flipped, cut, zeros}
    assert out[flipped].startswith("kept 9 steps (") and f"dropped bytes {start}-{end}" in out[flipped]
    assert "1 step lost (4)" in out[flipped]
    backup = re.search(r"original kept as (\S+)$", out[flipped]).group(1)
    assert (flipped_log.parent / backup).read_bytes() == damaged_flipped
    assert flipped_log.read_bytes() == damaged_flipped[:start] + damaged_flipped[end:]
    assert cut_log.read_bytes() == original_cut[:cut_start]
    assert "kept 4 steps" in out[cut] and "2 steps lost (4-5)" in out[cut]
    assert zeros_log.read_bytes() == original_zeros and f"dropped {zero_range}" in out[zeros]

    r = run_cli("store", "check", str(run))  # the logs are clean; the lost steps are still reported
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split("  ", 1) for line in r.stdout.splitlines() if "  " in line)
    assert lines[flipped].startswith(
        "steps lost: 9 steps; 1 step lost (4); repaired (original kept as log.bin."
    )
    assert "5 episodes, 2 incomplete, 1 ok, 2 with steps lost" in r.stdout
    ep = open_store(root).load(flipped)
    assert ep.step_index.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9] and ep.complete

    r = run_cli("store", "repair", str(root))  # the store itself works too; nothing left to do
    assert r.returncode == 0 and "5 episodes checked, 0 repaired" in r.stdout


def test_bad_run_dir_is_named(tmp_path):
    r = run_cli("store", "check", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "nowhere" in r.stderr and "does not exist" in r.stderr
    r = run_cli("store", "repair", str(tmp_path))
    assert r.returncode == 2 and "not a rollout store" in r.stderr


def test_export_lerobot_refuses_a_damaged_episode_unless_told_to_skip_it(tmp_path):
    root = tmp_path / "store"
    record(root, 4)
    damaged = record(root, 6)
    log = root / "episodes" / damaged / LOG
    start, _ = step_span(log, 2)
    data = bytearray(log.read_bytes())
    data[start + 25] ^= 0xFF
    log.write_bytes(bytes(data))

    refused = run_cli("export-lerobot", str(root), str(tmp_path / "out"), "--fps", "10")
    assert refused.returncode != 0 and damaged in refused.stderr, refused.stderr
    skipped = run_cli("export-lerobot", str(root), str(tmp_path / "out2"), "--fps", "10", "--skip-damaged")
    assert skipped.returncode == 0, skipped.stderr
    assert "exported 1 episodes, 4 frames" in skipped.stdout
