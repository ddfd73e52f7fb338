"""Damaged episode logs (issue #14): the reader resynchronises after a corrupt record and keeps every intact
one, power-loss tails (every truncation of the last records, zero-filled blocks) keep exactly the intact
prefix, the listing reads the log instead of trusting the summary, and `repair` rewrites what it can."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from rollout_steps import assert_steps_equal, make_step, record

from vla_steer.core.rollouts import Recorder, open_store, repair_episode, repair_store
from vla_steer.core.rollouts.format import LOG, MARKER, SUMMARY, decode_record, encode_record

DATA = Path(__file__).parents[1] / "data"


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str
    step: int | None


def spans(data: bytes) -> list[Span]:
    """Where each record of an intact log lies."""
    out, pos = [], 0
    while pos < len(data):
        header, _, end = decode_record(memoryview(data), pos)
        out.append(Span(pos, end, header["k"], header.get("i")))
        pos = end
    return out


def log_of(root: Path, episode_id: str) -> Path:
    return root / "episodes" / episode_id / LOG


def test_a_flipped_byte_costs_only_the_record_that_holds_it(tmp_path):
    """Today's main stops at the flip and loses everything after it (94 of 200 steps on average)."""
    n = 30
    ep_id, steps = record(tmp_path, n, seed=5)
    log = log_of(tmp_path, ep_id)
    original = log.read_bytes()
    layout = spans(original)
    store = open_store(tmp_path)
    rng = np.random.default_rng(14)
    kinds = set()
    for offset in rng.integers(0, len(original), 40):
        flipped = bytearray(original)
        flipped[offset] ^= int(rng.integers(1, 256))
        log.write_bytes(bytes(flipped))
        hit = next(s for s in layout if s.start <= offset < s.end)
        kinds.add(hit.kind)
        kept = [i for i in range(n) if i != hit.step]

        ep = store.load(ep_id)  # never raises
        assert (ep.n_steps, ep.complete) == (len(kept), hit.kind != "end"), (offset, hit)
        assert ep.step_index.tolist() == kept
        assert_steps_equal(ep, [steps[i] for i in kept])
        assert [(d.start, d.end) for d in ep.damage] == [(hit.start, hit.end)]
        assert ep.lost_steps == ([(hit.step, hit.step)] if hit.kind == "step" else [])
        assert ep.complete == (hit.kind != "end")
        assert ("task" in ep.meta) == (hit.kind != "meta")

        info = store.info(ep_id)  # the listing says so too, whatever the summary claims
        assert info.n_steps == len(kept)
        assert info.status == "damaged" and info.damaged
        assert (info.n_steps, info.steps_lost) == (len(kept), n - len(kept))
        assert f"bytes {hit.start}-{hit.end}" in info.describe()
    assert {"step", "meta"} <= kinds  # the flips hit both kinds of record that matter


def test_every_truncation_of_the_last_records_keeps_exactly_the_intact_prefix(tmp_path):
    """Power loss: the log ends anywhere in its last records. With the summary (the episode had been
    closed) the listing knows how much is missing; without it (closed never) a torn record is still seen."""
    n = 8
    ep_id, steps = record(tmp_path, n, seed=3, cams=())  # no images: short records, fewer cuts to try
    log = log_of(tmp_path, ep_id)
    summary = log.with_name(SUMMARY)
    original, summary_text = log.read_bytes(), summary.read_text()
    layout = spans(original)
    assert [s.kind for s in layout[-3:]] == ["step", "step", "end"]
    store = open_store(tmp_path)
    for cut in range(layout[-3].start, len(original)):  # every byte boundary of the last three records
        log.write_bytes(original[:cut])
        whole = [s for s in layout if s.end <= cut]
        kept = [s.step for s in whole if s.kind == "step"]
        torn = cut > whole[-1].end

        summary.write_text(summary_text)
        ep = store.load(ep_id)
        assert ep.step_index.tolist() == kept
        assert_steps_equal(ep, steps[: len(kept)])
        assert not ep.complete
        assert ep.lost_steps == ([(len(kept), n - 1)] if len(kept) < n else [])
        assert [(d.start, d.end) for d in ep.damage] == [(whole[-1].end, len(original))]
        assert store.info(ep_id).status == "damaged"

        summary.unlink()  # the writer never closed it: only a torn record shows
        info = store.info(ep_id)
        assert info.n_steps == len(kept) and info.lost_steps == ()
        assert [(d.start, d.end) for d in info.damage] == ([(whole[-1].end, cut)] if torn else [])
        assert info.status == ("damaged" if torn else "incomplete")


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "never-closed"])
def test_power_loss_tails_are_reported_and_repaired(tmp_path, closed):
    """A power cut can leave the last blocks allocated but never written (zeros), after a whole record or in
    the middle of one, or cut the file short; repair keeps exactly the intact prefix and a backup."""
    ep_id, steps = record(tmp_path / "orig", 8, seed=3)
    src = tmp_path / "orig" / "episodes" / ep_id
    original = (src / LOG).read_bytes()
    layout = spans(original)
    boundary = layout[-3].end  # just after step 6's record
    middle = layout[-2].start + 100  # inside step 7's record
    cases = {
        "zeros after a whole record": (original[:boundary] + bytes(4096), boundary, True),
        "zeros inside a record": (original[:middle] + bytes(len(original) - middle), layout[-2].start, False),
        "cut inside a record": (original[:middle], layout[-2].start, False),
    }
    for k, (data, intact, all_zero) in enumerate(cases.values()):
        root = tmp_path / f"case{k}"
        dst = root / "episodes" / ep_id
        dst.mkdir(parents=True)
        shutil.copy(tmp_path / "orig" / MARKER, root / MARKER)
        (dst / LOG).write_bytes(data)
        if closed:
            shutil.copy(src / SUMMARY, dst / SUMMARY)
        store = open_store(root)
        info = store.info(ep_id)
        kept = [s.step for s in layout if s.kind == "step" and s.end <= intact]
        assert info.status == "damaged" and info.n_steps == len(kept)
        assert info.damage[0].start == intact
        assert ("zero-filled" in info.damage[0].reason) == all_zero
        assert info.lost_steps == (((len(kept), 7),) if closed else ())

        r = repair_episode(store, ep_id)
        assert r is not None and r.kept_steps == len(kept) and r.backup.read_bytes() == data
        assert (dst / LOG).read_bytes() == original[:intact]
        after = store.info(ep_id)
        assert after.damage == () and after.n_steps == len(kept)
        assert after.status == ("steps lost" if closed else "incomplete")
        assert after.lost_steps == info.lost_steps  # lost stays lost, and still says where
        assert after.repaired["backup"] == r.backup.name
        assert_steps_equal(store.load(ep_id), steps[: len(kept)])
        assert repair_episode(store, ep_id) is None  # nothing left to repair


def test_repair_keeps_every_intact_record_and_the_original(tmp_path):
    id_ok, _ = record(tmp_path, 5, seed=0)
    id_bad, steps = record(tmp_path, 12, seed=1)
    log = log_of(tmp_path, id_bad)
    original = log.read_bytes()
    layout = spans(original)
    hits = [s for s in layout if s.kind == "step" and s.step in (3, 9)]
    damaged = bytearray(original)
    for s in hits:
        damaged[s.start + 30] ^= 0x5A
    log.write_bytes(bytes(damaged))
    store = open_store(tmp_path)

    repairs = repair_store(store)
    assert [r.id for r in repairs] == [id_bad]  # the intact episode is left alone
    r = repairs[0]
    assert r.lost_steps == ((3, 3), (9, 9)) and r.kept_steps == 10
    assert [(d.start, d.end) for d in r.dropped] == [(s.start, s.end) for s in hits]
    assert r.backup.read_bytes() == bytes(damaged)
    assert log.read_bytes() == b"".join(original[s.start : s.end] for s in layout if s not in hits)

    info = store.info(id_bad)
    assert info.status == "steps lost" and info.complete and info.steps_lost == 2
    assert "2 steps lost (3, 9)" in info.describe()
    ep = store.load(id_bad)
    kept = [i for i in range(12) if i not in (3, 9)]
    assert ep.step_index.tolist() == kept
    assert_steps_equal(ep, [steps[i] for i in kept])
    assert store.info(id_ok).status == "ok"
    assert repair_store(store) == []


def test_an_intact_record_the_reader_cannot_use_is_reported_and_repaired_away(tmp_path):
    """A record with a good crc but contents no writer makes (a step index going back) is damage too: the
    reader skips it, and repair drops it once (it does not find it again and again)."""
    ep_id, steps = record(tmp_path, 3, seed=0)
    log = log_of(tmp_path, ep_id)
    original = log.read_bytes()
    odd = encode_record({"k": "step", "i": 1, "scalars": {}, "steering": None}, {})
    log.write_bytes(original + odd)
    store = open_store(tmp_path)
    info = store.info(ep_id)
    assert info.n_steps == 3 and info.status == "damaged"
    assert info.damage[0].start == len(original) and "out of order" in info.damage[0].reason
    assert repair_episode(store, ep_id).kept_bytes == len(original)
    assert log.read_bytes() == original and store.info(ep_id).status == "ok"
    assert repair_episode(store, ep_id) is None


def test_repair_refuses_an_episode_being_recorded(tmp_path):
    rng = np.random.default_rng(0)
    ep = Recorder(tmp_path).start_episode({"task": "live"})
    ep.step(**make_step(0, rng))
    with open(log_of(tmp_path, ep.id), "r+b") as f:
        f.seek(-10, 2)
        byte = f.read(1)[0]
        f.seek(-10, 2)
        f.write(bytes([byte ^ 0xFF]))  # damage the live log behind the writer's back
    store = open_store(tmp_path)
    assert store.info(ep.id).status == "damaged"
    with pytest.raises(RuntimeError, match=f"{ep.id} is being recorded"):
        repair_episode(store, ep.id)
    ep.step(**make_step(1, rng))  # the writer goes on; the reader resynchronises past the damage
    ep.end(success=True)
    assert store.load(ep.id).step_index.tolist() == [1]
    assert repair_episode(store, ep.id) is not None  # once the writer is done
    assert store.info(ep.id).status == "steps lost"


def test_the_listing_reads_the_log_not_the_summary(tmp_path):
    """Today's main lists a cut-short or corrupted closed episode with its summary's 200 steps, complete."""
    pd = pytest.importorskip("pandas")
    ep_id, _ = record(tmp_path, 10, seed=2)
    log = log_of(tmp_path, ep_id)
    original = log.read_bytes()
    layout = spans(original)
    step4 = next(s for s in layout if s.step == 4)
    data = bytearray(original)
    data[step4.start + 40] ^= 0xFF  # same size: the summary's byte count still matches
    log.write_bytes(bytes(data))
    (info,) = open_store(tmp_path).episodes()
    assert info.n_steps == 9
    assert (info.steps_lost, info.lost_steps, info.complete) == (1, ((4, 4),), True)
    df = open_store(tmp_path).to_pandas()
    assert df["step"].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # each row keeps its recorded step index
    assert isinstance(df, pd.DataFrame)

    log.write_bytes(original[: layout[5].start])  # cut at a record boundary: nothing torn, yet short
    (info,) = open_store(tmp_path).episodes()
    assert info.n_steps < 10 and not info.complete
    assert info.status == "damaged" and not info.complete and info.n_steps == layout[5].step
    assert info.lost_steps == ((layout[5].step, 9),)
    assert f"{len(original) - layout[5].start} B before its summary says" in info.damage[0].reason


def test_logs_written_before_resync_still_read(tmp_path):
    """`tests/data/rollout_log_v1.bin` was written by the store before this change (`record(root, 4, seed=7)` of
    tests/core/rollout_steps.py at commit 442d290): the framing is unchanged, and old logs resynchronise too."""
    old = (DATA / "rollout_log_v1.bin").read_bytes()
    rng = np.random.default_rng(7)  # the same steps, drawn as record() drew them then (6-d ee_vel)
    steps = [make_step(i, rng, ee_vel_dim=6) for i in range(4)]
    for s in steps:  # (what the policy said was not recorded then: those steps read back None)
        del s["policy_info"]
    root = tmp_path / "store"
    Recorder(root)
    ep_dir = root / "episodes" / "000000-00000000"
    ep_dir.mkdir()
    (ep_dir / LOG).write_bytes(old)
    store = open_store(root)
    ep = store.load("000000-00000000")
    assert ep.complete and ep.damage == [] and ep.meta["instruction"] == "put the bowl away"
    assert_steps_equal(ep, steps)

    layout = spans(old)
    step1 = next(s for s in layout if s.step == 1)
    damaged = bytearray(old)
    damaged[step1.start + 50] ^= 0x10
    (ep_dir / LOG).write_bytes(bytes(damaged))
    ep = store.load("000000-00000000")
    assert ep.step_index.tolist() == [0, 2, 3] and ep.lost_steps == [(1, 1)] and ep.complete
