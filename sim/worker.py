"""A grid worker: a process that runs cells (`sim.grid.Cell`) against a policy node, and its driver-side handle.

    python -m sim.worker      # stdin: one JSON line {"run": {...}}, then one {"cell": {...}} per cell

The worker runs in the interpreter its simulator needs (robosuite: the main venv; LIBERO: the LIBERO venv,
`$VLA_STEER_LIBERO_PYTHON`), so it imports only torch-free modules. It connects to the node once, keeps a
task's environment from one cell to the next, records every episode into the run's store (`sim.evaluate`,
one seed at a time) and reports on stdout, one line per event behind `PREFIX` (simulators print on stdout
too; those lines are not the protocol): {"event": "ready"}, {"event": "episode", ...} per episode,
{"event": "cell"} when a cell is done, {"event": "error", "code": 2|3|4, "message": ...} before it exits
with that code (2 a bad config, 3 no policy node, 4 an episode failed). `WorkerProcess` is the other end:
the local scheduler and the Ray actors (`sim.ray_grid`) drive workers through it alike.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PREFIX = "@vla-steer-worker "
ROOT = Path(__file__).resolve().parents[1]  # where the `sim` package lives: the workers import it from here


def libero_python() -> Path:
    """The LIBERO venv's interpreter: $VLA_STEER_LIBERO_PYTHON, else .venv-libero/ beside the code (`make libero`)."""
    return Path(os.environ.get("VLA_STEER_LIBERO_PYTHON") or ROOT / ".venv-libero" / "bin" / "python")


def interpreter(kind: str) -> str:
    if kind != "libero":
        return sys.executable
    python = libero_python()
    if not python.exists():
        raise FileNotFoundError(
            f"LIBERO tasks run in the LIBERO venv, and there is no interpreter at {python}: build it with "
            "`make libero`, or point $VLA_STEER_LIBERO_PYTHON at its python"
        )
    return str(python)


class WorkerFailed(RuntimeError):
    """A worker reported an error or died. `code`: 2 bad config, 3 no policy node, 4 an episode failed."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # crosses process boundaries (Ray) with its code
        return (WorkerFailed, (str(self), self.code))


class WorkerProcess:
    """One worker subprocess for one kind of simulator, fed cells one at a time."""

    def __init__(self, kind: str, run: Mapping[str, Any]):
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["PYTHONPATH"] = (
            str(ROOT)
            if kind == "libero"
            else os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        )  # the LIBERO venv takes nothing of the main venv's path, only this code
        env.setdefault("MUJOCO_GL", "egl")
        self.kind = kind
        self.noise: collections.deque[str] = collections.deque(maxlen=40)  # what it printed, for errors
        self.proc = subprocess.Popen(
            [interpreter(kind), "-u", "-m", "sim.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        self._send({"run": dict(run)})
        self.ready = (
            False  # waited for by the first `run`, so a starting worker can be closed (killed) at once
        )

    def run(self, cell: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Run one cell (`Cell.as_dict()`): its episode events as they happen; WorkerFailed on an error."""
        if not self.ready:
            yield from self._until("ready")
            self.ready = True
        self._send({"cell": dict(cell)})
        yield from self._until("cell")

    def close(self) -> None:
        """End the worker: at once (a kill loses at most the episode being written, which stays incomplete)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def _until(self, last: str) -> Iterator[dict[str, Any]]:
        for line in self.proc.stdout:
            at = line.find(PREFIX)  # not always at the start: a simulator may leave a line unfinished
            if at < 0:
                self.noise.append(line.rstrip())
                continue
            event = json.loads(line[at + len(PREFIX) :])
            if event["event"] == "error":
                self.close()
                raise WorkerFailed(event["message"], event["code"])
            if event["event"] == last:
                return
            yield event
        self._died()

    def _died(self):
        code = self.proc.wait()
        tail = "\n".join(self.noise)
        raise WorkerFailed(
            f"the {self.kind} worker exited ({code}) without saying why; it printed:\n{tail}", 4
        )

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the worker's side ------------------------------------------------------------------------------


def _emit(event: str, **data: Any) -> None:
    print(PREFIX + json.dumps({"event": event, **data}), flush=True)


def task_config(
    task: Mapping[str, Any], max_steps: int | None, execute_steps: int | None = None
) -> tuple[Any, int]:
    """The task's sim config (a LIBERO task's id, and the flags' step limit and actions per chunk, written
    into it, so it records what ran) and its step limit (given, else the task's default); the driver
    resolves it alike to check a resume."""
    if task["kind"] == "libero":
        from sim.libero_env import load_libero_config

        update: dict[str, Any] = {"task_id": task["task_id"]}
        for key, value in (("max_steps", max_steps), ("execute_steps", execute_steps)):
            if value is not None:
                update[key] = value
        cfg = load_libero_config(task["config"]).model_copy(update=update)
        return cfg, cfg.step_limit()
    from sim.grid import DEFAULT_MAX_STEPS
    from sim.robosuite_env import load_sim_config

    return load_sim_config(task["config"]), max_steps or DEFAULT_MAX_STEPS


def exit_with_parent() -> None:
    """Exit when the parent dies (killed, not closing us): no orphan goes on recording what a rerun redoes, or
    serving (a grid worker under its driver; `vla-steer serve` under its Ray actor, `sim.ray_grid`)."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)  # the open episode stays incomplete, as a kill would leave it

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(lines: Iterator[str]) -> int:
    """Run the cells read from `lines` (the protocol above); the exit code."""
    from sim import session
    from sim.evaluate import EvaluationError, evaluate
    from sim.grid import RUN_KEY, Cell, policy_fields, run_fields
    from vla_steer.core.rollouts import Recorder
    from vla_steer.wire import Client

    run = json.loads(next(lines))["run"]
    keys = {k: Path(run[k]) if run.get(k) else None for k in ("server_key", "keypair")}
    env_key, env = None, None
    try:
        with Client(run["server"], timeout=run["request_timeout"], **keys) as client:
            info = session.check_node(client, [], run["connect_timeout"])
            recorder = Recorder(Path(run["out"]))
            _emit("ready")
            for line in lines:
                cell = Cell.from_dict(json.loads(line)["cell"])
                task = cell.task
                cfg, max_steps = task_config(task.as_dict(), run.get("max_steps"), run.get("execute_steps"))
                # a LIBERO config's actions per chunk (its profile's, or the flag's); robosuite: the flag's
                execute_steps = getattr(cfg, "execute_steps", run.get("execute_steps"))
                if env_key != task:  # a new task: its environment replaces the last one
                    last, env = env, None
                    if last is not None:
                        last.close()
                    env, env_key = session.make_env(cfg, info), task
                ran = run_fields(task, max_steps, run.get("execute_steps"), run["settle"]) | policy_fields(
                    info
                )
                meta = session.run_meta(info, max_steps) | env.record_meta() | {RUN_KEY: ran}
                for seed in cell.seeds:
                    (result,) = evaluate(
                        client, env, [dict(cell.setting)], task=task.label, episodes=1, max_steps=max_steps,
                        recorder=recorder, meta=meta, seed=seed, execute_steps=execute_steps,
                        activations=run.get("activations"), settle=run["settle"], progress=lambda _: None,
                    )  # fmt: skip
                    _emit("episode", task=task.label, setting=cell.label, seed=seed, id=result.episode_ids[0],
                          success=result.success_rate == 1.0, steps=result.mean_length)  # fmt: skip
                _emit("cell")
    except session.NoPolicyNode as e:
        _emit("error", code=session.NO_POLICY_NODE, message=str(e))
        return session.NO_POLICY_NODE
    except EvaluationError as e:
        _emit("error", code=session.EPISODE_FAILED, message=str(e))
        return session.EPISODE_FAILED
    except (ValueError, FileNotFoundError) as e:
        _emit("error", code=2, message=str(e))
        return 2
    finally:
        if env is not None:
            env.close()
    return 0


if __name__ == "__main__":
    exit_with_parent()
    sys.exit(serve(iter(sys.stdin.readline, "")))
