"""The servo loop (robot.servo) in its own spawned process, with the shared block the network side writes.

Spawned, not forked: the parent has ZeroMQ threads. The process optionally runs at SCHED_FIFO priority
(where the OS allows it: a robot PC should), builds its backend and runs `ServoLoop` until SHUTDOWN.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
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
    if rt > 0:
        try:  # real-time scheduling where allowed (a robot PC should allow it)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(rt))
        except (OSError, AttributeError) as e:
            log.warning("no real-time priority (%s); running at normal priority", e)
    cfg = RobotConfig.model_validate(config)
    backend = make_backend(kind, cfg, host, **options)
    ServoLoop(backend, shared, cfg, **loop_options).run()


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
