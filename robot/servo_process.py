"""The servo loop (robot.servo) in its own spawned process, with the shared block the network side writes.

Spawned, not forked: the parent has ZeroMQ threads. The process optionally runs at SCHED_FIFO priority
(`rt_priority`; checked before spawning, and refused with a clear error where the system does not allow
it, rather than silently running at normal priority), builds its backend and runs `ServoLoop` until
SHUTDOWN.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time

from robot.backends.base import make_backend
from robot.config import RobotConfig
from robot.servo import ServoLoop
from robot.shared import Cmd, Mode, Shared

log = logging.getLogger(__name__)


def _servo_main(
    kind: str, config: dict, host: str | None, shared: Shared, options: dict, loop_options: dict, rt: int
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s servo: %(message)s")
    if rt > 0:  # checked by the parent (check_rt_priority); a refusal here ends the process
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(rt))
    cfg = RobotConfig.model_validate(config)
    backend = make_backend(kind, cfg, host, **options)
    ServoLoop(backend, shared, cfg, **loop_options).run()


def check_rt_priority(priority: int) -> None:
    """Raise a RuntimeError that says how to fix it unless a thread here may run at SCHED_FIFO `priority`
    (tried in a throwaway thread: on Linux the policy is per thread, so nothing else changes)."""
    if priority <= 0:
        return
    if not hasattr(os, "sched_setscheduler"):
        raise RuntimeError("--rt-priority needs Linux's SCHED_FIFO; run without it")
    top = os.sched_get_priority_max(os.SCHED_FIFO)
    if priority > top:
        raise RuntimeError(f"--rt-priority {priority}: SCHED_FIFO priorities are 1..{top}")
    refused: list[OSError] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except OSError as e:
            refused.append(e)

    t = threading.Thread(target=probe, name="rt-probe")
    t.start()
    t.join()
    if refused:
        raise RuntimeError(
            f"the system refuses real-time priority {priority} ({refused[0].strerror}): allow it for this user "
            f"(an '@group - rtprio {priority}' line in /etc/security/limits.conf, or CAP_SYS_NICE; in a "
            "container: --cap-add SYS_NICE), or run without --rt-priority"
        )


class ServoProcess:
    """The servo loop in a spawned process, with the shared block the network side writes into."""

    def __init__(
        self,
        kind: str,
        config: RobotConfig,
        host: str | None = None,
        *,
        backend_options: dict | None = None,
        autostart: bool = True,
        rt_priority: int = 0,
        trace_path: str | os.PathLike | None = None,
        trace_ticks: int = 0,
    ):
        check_rt_priority(rt_priority)  # before anything starts
        ctx = mp.get_context("spawn")  # no fork: the parent has ZeroMQ threads
        self.config = config
        self.shared = Shared(ctx)
        loop_options = {"autostart": autostart, "trace_path": trace_path, "trace_ticks": trace_ticks}
        self.process = ctx.Process(
            target=_servo_main,
            args=(
                kind,
                config.model_dump(),
                host,
                self.shared,
                backend_options or {},
                loop_options,
                rt_priority,
            ),
            name="vla-steer-servo",
            daemon=True,
        )

    def start(self, timeout: float = 30.0) -> ServoProcess:
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.shared.status()
            if st.started or st.exited or st.mode == Mode.FAULT:
                return self
            if not self.process.is_alive():
                raise RuntimeError(f"the servo process exited at start (exit code {self.process.exitcode})")
            time.sleep(0.01)
        raise TimeoutError(f"the servo process did not start within {timeout} s")

    def stop(self) -> None:
        self.shared.command(Cmd.STOP)

    def resume(self) -> None:
        self.shared.command(Cmd.RESUME)

    def hold(self) -> None:
        self.shared.command(Cmd.HOLD)

    def close(self, timeout: float = 5.0) -> None:
        if self.process.pid is None:
            return
        self.shared.command(Cmd.SHUTDOWN)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
