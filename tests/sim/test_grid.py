"""`vla-steer eval` as a grid: whole LIBERO suites beside robosuite tasks, worker processes sharing one policy
node (per-request steering), shards, resume, several stores analysed as one, and Ray.

The grid's definition and the store bookkeeping are tested here without a simulator; the runs go through the
installed `vla-steer` command against `vla-steer serve` (a TinyVLA), LIBERO workers in the LIBERO venv
($VLA_STEER_LIBERO_PYTHON, else .venv-libero; those tests skip without it, as tests/sim/test_libero_env.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sim.grid import Grid, parse_env, parse_shard, remaining, results
from sim.grid import done_episodes as done_in
from tests.support import VLA_STEER, free_address, serve_process, wait_for
from vla_steer.core.analysis.stores import Stores
from vla_steer.core.config import shipped
from vla_steer.core.rollouts import EpisodeRecorder, Recorder, open_store
from vla_steer.wire import Observation
from vla_steer.wire.messages import Step

ROOT = Path(__file__).resolve().parents[2]
LIBERO_PYTHON = Path(os.environ.get("VLA_STEER_LIBERO_PYTHON", ROOT / ".venv-libero" / "bin" / "python"))
needs_libero = pytest.mark.skipif(
    not LIBERO_PYTHON.exists(),
    reason=f"no LIBERO venv at {LIBERO_PYTHON}: `make libero`, or point $VLA_STEER_LIBERO_PYTHON at its python",
)
ENV = {**os.environ, "MUJOCO_GL": "egl", "HF_HUB_OFFLINE": "1", "VLA_STEER_LIBERO_PYTHON": str(LIBERO_PYTHON)}


# -- the grid, without a simulator ---------------------------------------------------------------------


def test_a_libero_suite_is_its_tasks_and_a_subset_is_those():
    spatial = parse_env("libero_spatial")
    assert [t.label for t in spatial] == [f"libero_spatial:{i}" for i in range(10)]
    assert all(t.kind == "libero" and t.config.endswith("libero_spatial.yaml") for t in spatial)
    assert [t.task_id for t in parse_env("libero_90:0,3,10-12")] == [0, 3, 10, 11, 12]
    (lift,) = parse_env("robosuite_lift")
    assert (lift.label, lift.kind, lift.task_id) == ("robosuite_lift", "robosuite", None)
    for spec, why in [("libero_goal:10", "tasks [10] out of range (0..9)"), ("libero_goal:1,1", "listed twice"),
                      ("robosuite_lift:0", "a task list (:0) is for LIBERO suites")]:  # fmt: skip
        with pytest.raises(ValueError) as e:
            parse_env(spec)
        assert str(e.value).startswith(f"--env {spec}: ") and why in str(e.value)


def test_cells_are_task_major_and_shards_partition_the_grid():
    grid = Grid.build(["robosuite_lift", "libero_goal:2,5"], [{}, {"fast": 4.0}, {"fast": 8.0}], 3, seed=10)
    cells = grid.cells()
    assert [(c.task.label, c.label) for c in cells[:4]] == [
        ("robosuite_lift", "off"), ("robosuite_lift", "fast=4"), ("robosuite_lift", "fast=8"),
        ("libero_goal:2", "off"),
    ]  # fmt: skip
    assert all(c.seeds == (10, 11, 12) for c in cells) and len(cells) == 9
    for n in range(1, 12):
        shards = [grid.shard(i, n) for i in range(1, n + 1)]
        assert [c for s in shards for c in s] == cells  # each cell once, in order
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert shards == [grid.shard(i, n) for i in range(1, n + 1)]  # deterministic
    assert parse_shard(" 2/4 ") == (2, 4)
    for bad in ("0/2", "3/2", "1/0", "1of2", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="given twice"):
        Grid.build(["robosuite_lift"], [{"fast": 4.0}, {"fast": 4}], 1)


def _record(store: Path, task: str, setting: dict, seed: int, *, complete: bool = True, speed: float = 0.1):
    """One episode as a worker records it (the runner's metadata and summary), 3 steps long."""
    label = ",".join(f"{k}={v:g}" for k, v in setting.items()) or "off"
    rec = EpisodeRecorder(Recorder(store), {"task_label": task, "setting": setting, "setting_label": label})
    for i in range(3):
        rec.step(Step(Observation("lift", {"agentview": np.zeros((4, 4, 3), np.uint8)}), np.zeros(7),
                      np.zeros((1, 7)), np.array([0.0, 0.0, 1.0 + 0.01 * i]), np.array([0, 0, 0, 1.0]),
                      np.array([speed, 0.0, 0.0]), 0.0, t_sim=0.05 * i, steering={}))  # fmt: skip
    if complete:
        rec.end(seed == 0, seed=seed, summary={"length": 3, "mean_ee_speed": speed, "mean_ee_height": 1.01})
    else:
        rec.abort("killed")
    return rec.episode_ids[0]


def test_the_store_says_what_is_done_and_results_come_from_it(tmp_path):
    grid = Grid.build(["robosuite_lift"], [{}, {"fast": 4.0}], 2)
    store = tmp_path / "store"
    assert done_in(store) == {} and remaining(grid.cells(), {}) == grid.cells()
    first = _record(store, "robosuite_lift", {}, 0, speed=0.1)
    _record(store, "robosuite_lift", {}, 0, speed=0.9)  # the same episode again: not counted twice
    _record(store, "robosuite_lift", {}, 1, complete=False)  # interrupted: to be redone
    _record(store, "robosuite_lift", {"fast": 4.0}, 1, speed=0.3)
    _record(store, "robosuite_stack", {}, 0)  # another grid's
    done = done_in(store)
    assert set(done) == {
        ("robosuite_lift", "off", 0),
        ("robosuite_lift", "fast=4", 1),
        ("robosuite_stack", "off", 0),
    }
    todo = remaining(grid.cells(), done)
    assert [(c.label, c.seeds) for c in todo] == [("off", (1,)), ("fast=4", (0,))]
    off, fast = results(grid.cells(), done)
    assert (off.episodes, off.episode_ids, off.success_rate, off.mean_ee_speed) == (1, [first], 1.0, 0.1)
    assert (fast.episodes, fast.mean_length, fast.mean_ee_speed, fast.mean_ee_height) == (1, 3.0, 0.3, 1.01)


def test_analyze_reads_several_stores_as_one_counting_each_episode_once(tmp_path):
    a, b = tmp_path / "shard1", tmp_path / "shard2"
    for seed in range(3):
        _record(a, "robosuite_lift", {}, seed, speed=0.1)
        _record(b, "robosuite_lift", {"fast": 4.0}, seed, speed=0.2)
    _record(b, "robosuite_lift", {}, 0, speed=5.0)  # shard 1's episode, run again into shard 2's store
    r = subprocess.run([VLA_STEER, "analyze", str(a), str(b), "--out", str(tmp_path / "report")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 episodes recorded twice" in r.stdout and "6 episodes in 2 settings" in r.stdout
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    base, fast = summary["settings"]
    assert (base["label"], base["episodes"], fast["label"], fast["episodes"]) == ("baseline", 3, "fast=4", 3)
    assert base["moving_speed"]["mean"] == pytest.approx(0.1)  # not pulled up by the duplicate's 5 m/s
    assert fast["change_vs_baseline"]["moving_speed"]["mean"] == pytest.approx(
        1.0
    )  # matched seeds across stores
    r = subprocess.run([VLA_STEER, "analyze", str(a), str(b)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --out" in r.stderr


def test_a_damaged_episode_is_redone_and_the_analysis_counts_the_redone_one(tmp_path):
    """eval.json and `vla-steer analyze` agree: the damaged record of an episode counts in neither, its rerun in both."""
    store = tmp_path / "store"
    damaged = _record(store, "robosuite_lift", {}, 0, speed=5.0)
    log = store / "episodes" / damaged / "log.bin"
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a step record's byte: the episode keeps its metadata and "end"
    log.write_bytes(bytes(data))
    (info,) = open_store(store).episodes()
    assert info.complete and info.damaged and info.grid_key == ("robosuite_lift", "off", 0)
    grid = Grid.build(["robosuite_lift"], [{}], 1)
    assert remaining(grid.cells(), done_in(store)) == grid.cells()  # to be run again
    redone = _record(store, "robosuite_lift", {}, 0, speed=0.1)
    assert [i.id for i in done_in(store).values()] == [redone]
    assert [i.id for i in Stores([open_store(store)]).episodes()] == [redone]
    r = subprocess.run([VLA_STEER, "analyze", str(store), "--out", str(tmp_path / "report")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 damaged episodes of a grid are left out" in r.stdout + r.stderr
    (base,) = json.loads((tmp_path / "report" / "summary.json").read_text())["settings"]
    assert base["episodes"] == 1 and base["moving_speed"]["mean"] == pytest.approx(0.1)


# -- runs through `vla-steer eval` ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(checkpoint):
    address = free_address()
    proc = serve_process(checkpoint, address)
    yield address
    proc.terminate()
    proc.wait(30)


def eval_cmd(node: str, out: Path, *args: str) -> list[str]:
    return [VLA_STEER, "eval", "--server", node, "--out", str(out), "--max-steps", "3", *args]


def run(cmd: list[str], timeout: float = 540) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def check_store(out: Path, want: set[tuple[str, str, int]]) -> dict:
    """Each wanted episode complete exactly once, steered as its setting says; the infos by key."""
    store = open_store(out)
    complete = [i for i in store.episodes() if i.complete]
    keys = Counter((i.meta["task_label"], i.meta["setting_label"], i.meta["seed"]) for i in complete)
    assert set(keys) == want and all(n == 1 for n in keys.values()), keys
    for info in complete:
        ep = store.load(info.id, images=False)
        for step_steering in ep.steering:  # per-request steering: exactly this episode's setting, every step
            on = {k: v["strength"] for k, v in step_steering.items() if v["enabled"]}
            assert on == info.meta["setting"], (info.meta["setting_label"], step_steering)
    return {(i.meta["task_label"], i.meta["setting_label"], i.meta["seed"]): i for i in complete}


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_libero_suite_and_a_robosuite_task_in_one_grid_on_two_workers(node, tmp_path):
    """The acceptance grid: 2 LIBERO tasks x 2 settings x 2 seeds, plus robosuite Lift, from one command."""
    out = tmp_path / "grid"
    r = run(eval_cmd(node, out, "--env", "libero_spatial:0,1", "--env", "robosuite_lift", "--settings", "off",
                     "fast=4", "--episodes", "2", "--workers", "2"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "grid: 12/12 episodes (100%)" in r.stderr and "ETA" in r.stderr
    tasks = ["libero_spatial:0", "libero_spatial:1", "robosuite_lift"]
    got = check_store(out, {(t, s, seed) for t in tasks for s in ("off", "fast=4") for seed in (0, 1)})
    libero = got[("libero_spatial:1", "fast=4", 1)].meta
    assert libero["sim"] == "libero" and libero["task_id"] == 1 and libero["conventions"]["max_steps"] == 3
    assert (
        libero["versions"]["robosuite"] == "1.4.0"
        and got[("robosuite_lift", "off", 0)].meta["sim"] == "robosuite"
    )
    rows = json.loads((out / "eval.json").read_text())
    assert [(row["task"], row["setting"], row["episodes"]) for row in rows] == [
        (t, s, 2) for t in tasks for s in ("off", "fast=4")
    ]
    a = run([VLA_STEER, "analyze", str(out)])
    assert a.returncode == 0 and "12 episodes in 2 settings" in a.stdout, a.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_shards_make_the_grid_and_a_rerun_resumes_without_duplicates(node, tmp_path):
    grid = [
        "--env",
        "robosuite_lift",
        "--env",
        "robosuite_stack",
        "--settings",
        "off",
        "fast=4",
        "--episodes",
        "2",
    ]
    want = {
        (t, s, seed)
        for t in ("robosuite_lift", "robosuite_stack")
        for s in ("off", "fast=4")
        for seed in (0, 1)
    }
    one, two = tmp_path / "shard1", tmp_path / "shard2"
    for i, out in ((1, one), (2, two)):
        r = run(eval_cmd(node, out, *grid, "--shard", f"{i}/2"))
        assert r.returncode == 0, r.stderr[-4000:]
        assert "grid: 4/4 episodes" in r.stderr
    first, second = (
        check_store(one, {k for k in want if k[0] == "robosuite_lift"}),
        check_store(two, {k for k in want if k[0] == "robosuite_stack"}),
    )
    assert set(first) | set(second) == want
    a = run([VLA_STEER, "analyze", str(one), str(two), "--out", str(tmp_path / "report")])
    assert a.returncode == 0 and "8 episodes in 2 settings" in a.stdout, a.stderr
    # The whole grid into shard 1's store: only shard 2's cells run, on two workers sharing the node.
    r = run(eval_cmd(node, one, *grid, "--workers", "2"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming: 4 of 8 episodes are complete" in r.stderr and "grid: 8/8 episodes" in r.stderr
    check_store(one, want)
    assert [row["episodes"] for row in json.loads((one / "eval.json").read_text())] == [2, 2, 2, 2]
    r = run(eval_cmd(node, one, *grid))  # nothing left to do
    assert r.returncode == 0 and "resuming: 8 of 8" in r.stderr and "grid:" not in r.stderr
    check_store(one, want)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rerun_with_other_parameters_is_refused_naming_what_differs(node, checkpoint, tmp_path):
    """Resuming counts stored episodes as done: only if they ran as this run would run them."""
    out = tmp_path / "grid"
    lift = ["--env", "robosuite_lift", "--settings", "off", "fast=4"]
    r = run(eval_cmd(node, out, *lift))
    assert r.returncode == 0, r.stderr[-4000:]
    before = [i.id for i in open_store(out).episodes()]

    def refused(cmd: list[str], *why: str) -> None:
        r = run(cmd)
        assert r.returncode == 2 and "error: --out " in r.stderr, (r.returncode, r.stderr[-3000:])
        assert all(w in r.stderr for w in why), r.stderr
        assert [i.id for i in open_store(out).episodes()] == before  # nothing ran, nothing mixed in

    longer = eval_cmd(node, out, *lift, "--episodes", "2")
    longer[longer.index("--max-steps") + 1] = "4"
    refused(longer, "ran with max_steps 3, this run has 4 (--max-steps)")
    refused(
        eval_cmd(node, out, *lift, "--execute-steps", "1"),
        "execute_steps None, this run has 1 (--execute-steps)",
    )
    other = tmp_path / "other" / "robosuite_lift.yaml"  # the same name, another table
    other.parent.mkdir()
    other.write_text(
        (shipped("sims") / "robosuite_lift.yaml").read_text().replace("control_freq: 20", "control_freq: 10")
    )
    refused(eval_cmd(node, out, "--env", str(other), "--settings", "off"), "config_sha256", "--env config")
    bare = free_address()  # the same policy without the knobs: another node
    proc = serve_process(checkpoint, bare, directions=False)
    try:
        refused(eval_cmd(bare, out, "--env", "robosuite_lift", "--settings", "off"), "policy_fingerprint")
    finally:
        proc.terminate()
        proc.wait(30)
    sim_out = tmp_path / "sim"
    r = run(
        [
            VLA_STEER,
            "sim",
            "--server",
            node,
            "--env",
            "robosuite_lift",
            "--max-steps",
            "3",
            "--out",
            str(sim_out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(eval_cmd(node, sim_out, "--env", "robosuite_lift", "--settings", "off"))
    assert r.returncode == 2 and "was not recorded by `vla-steer eval`" in r.stderr, r.stderr[-3000:]
    r = run(eval_cmd(node, out, *lift, "--episodes", "2"))  # as before: resumes
    assert r.returncode == 0 and "resuming: 2 of 4 episodes" in r.stderr, r.stderr[-3000:]
    check_store(out, {("robosuite_lift", s, seed) for s in ("off", "fast=4") for seed in (0, 1)})


INTERRUPTED = """
import json, os, signal, sys, threading, time
from sim.grid import Grid
from sim.scheduler import Progress, local_slots, run_cells
from tests.sim.test_grid import _children

run = {"server": sys.argv[1], "out": sys.argv[2], "max_steps": 300, "execute_steps": None, "settle": 0,
       "activations": None, "request_timeout": 5.0, "connect_timeout": 10.0, "server_key": None, "keypair": None}


def interrupt():  # Ctrl-C as soon as the worker process exists: it is still importing its simulator
    while not _children(os.getpid()):
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=interrupt, daemon=True).start()
try:
    run_cells(Grid.build(["robosuite_lift"], [{}], 10).cells(), local_slots(1, run), Progress(10, 0))
except KeyboardInterrupt:
    pass
deadline = time.monotonic() + 5  # a slot thread that has ended its work may take a moment to be gone
while time.monotonic() < deadline and any(t.name.startswith("grid-slot") for t in threading.enumerate()):
    time.sleep(0.05)
slots = [t for t in threading.enumerate() if t.name.startswith("grid-slot")]
for t in slots:  # where a slot thread is stuck, for the failure message
    import traceback
    print(t.name, "".join(traceback.format_stack(sys._current_frames()[t.ident])), file=sys.stderr)
slots = [t.name for t in slots]
print(json.dumps({"slots": slots, "workers": _children(os.getpid())}), flush=True)
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_while_a_worker_starts_kills_it_and_ends_the_slots(node, tmp_path):
    """A caller that catches the KeyboardInterrupt (a notebook, a script) is left with no worker and no
    slot thread running on; the CLI exits anyway (and its workers with it)."""
    r = subprocess.run([sys.executable, "-c", INTERRUPTED, node, str(tmp_path / "grid")], capture_output=True,
                       text=True, timeout=240, env={**ENV, "PYTHONPATH": str(ROOT)}, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {"slots": [], "workers": []}, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failing_cell_stops_the_other_workers_at_their_next_episode(node, tmp_path):
    """Before: the other worker ran its whole cell (10 long episodes) before the grid stopped."""
    broken = tmp_path / "broken.yaml"  # a valid config robosuite cannot build: fails in its worker
    broken.write_text(
        (shipped("sims") / "robosuite_lift.yaml").read_text().replace("robot: Panda", "robot: Nobody")
    )
    out = tmp_path / "grid"
    cmd = eval_cmd(
        node, out, "--env", str(broken), "--env", "robosuite_lift", "--episodes", "10", "--workers", "2"
    )
    cmd[cmd.index("--max-steps") + 1] = "200"
    r = run(cmd)
    assert r.returncode in (2, 4) and "error: " in r.stderr, r.stderr[-3000:]
    lift = [i for i in open_store(out).episodes() if i.complete] if out.exists() else []
    assert len(lift) < 10, len(lift)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_grid_killed_mid_run_is_finished_by_a_rerun(node, tmp_path):
    out = tmp_path / "grid"
    cmd = eval_cmd(node, out, "--env", "robosuite_lift", "--settings", "off", "fast=4", "--episodes", "3")
    cmd[cmd.index("--max-steps") + 1] = "40"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: out.exists() and any(i.complete for i in open_store(out).episodes()), timeout=300,
                 interval=0.2, what="a first complete episode")  # fmt: skip
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)  # no clean-up: the worker must notice on its own
        proc.wait(30)
        wait_for(
            lambda: not any(Path(f"/proc/{w}").exists() for w in workers), timeout=30, what="workers to exit"
        )
    finally:
        proc.kill()
        proc.wait()
    before = open_store(out).episodes()
    assert 1 <= sum(i.complete for i in before) < 6
    r = run(eval_cmd(node, out, "--env", "robosuite_lift", "--settings", "off", "fast=4", "--episodes", "3",
                     "--max-steps", "40"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming:" in r.stderr and "grid: 6/6 episodes" in r.stderr
    check_store(out, {("robosuite_lift", s, seed) for s in ("off", "fast=4") for seed in range(3)})
    assert [row["episodes"] for row in json.loads((out / "eval.json").read_text())] == [3, 3]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _listening(pids: list[int]) -> set[str]:
    """The addresses these processes listen on (TCP), from /proc: ip:port as the kernel shows them (hex)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                out.add(f[1])
    return out


LOOPBACK = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")


@needs_libero
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_libero_grid_on_a_local_ray_cluster(checkpoint, tmp_path):
    """`--ray`: a local cluster on this 2-core machine; the policy node and two LIBERO workers are actors,
    everything Ray starts listens on loopback only, and the node's output goes to a log under --out."""
    pytest.importorskip("ray")
    out = tmp_path / "grid"
    cmd = [VLA_STEER, "eval", "--ray", "--policy", str(checkpoint / "policy.yaml"), "--directions",
           str(checkpoint / "directions"), "--env", "libero_spatial:0,1", "--settings", "off", "fast=4",
           "--episodes", "2", "--max-steps", "3", "--workers", "2", "--out", str(out)]  # fmt: skip
    log = out / "logs" / "policy-node-1.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for(lambda: log.exists() and "serving tiny-vla" in log.read_text(), timeout=600, interval=0.5,
                 what="the policy node to serve")  # fmt: skip
        listening = _listening([proc.pid, *_descendants(proc.pid)])
        assert listening and all(a.startswith(LOOPBACK) for a in listening), listening
        stdout, stderr = proc.communicate(timeout=780)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "grid: 8/8 episodes" in stderr
    got = check_store(
        out, {(f"libero_spatial:{t}", s, seed) for t in (0, 1) for s in ("off", "fast=4") for seed in (0, 1)}
    )
    assert all(i.meta["policy"] == "tiny-vla" for i in got.values())
    a = run([VLA_STEER, "analyze", str(out)])
    assert a.returncode == 0 and "8 episodes in 2 settings" in a.stdout, a.stderr
