"""A ``vfio-sim`` device model's process, as its owner worker starts, watches and ends it.

Runs in: the worker that owns the device. The model is a child of that worker, started
with its configuration and its end of the control socket; its exit is seen through a
pidfd (no polling, no SIGCHLD handler in the worker); it is asked to QUIT and killed if it
does not, and always reaped, so no exit path leaves a model behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys

from devstate.devices.vfio.uapi import ModelConfig, Op, Request
from devstate.errors import DeviceError

# After QUIT a model exits at once, unless it is inside a firmware latency (up to minutes):
# it is then killed, as nothing it would still do is wanted.
QUIT_GRACE_S = 1.0
KILL_GRACE_S = 5.0


class ModelProcess:
    """One running device model of device ``device_id``."""

    def __init__(self, device_id: str, config: ModelConfig, control: socket.socket) -> None:
        """Start the model with ``control`` (its end of the control socket, closed here
        once the child has it)."""
        self.device_id = device_id
        self._pidfd = -1
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "devstate.devices.vfio.model",
                 "--control-fd", str(control.fileno()), "--config", config.to_json()],
                pass_fds=(control.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise DeviceError(device_id, f"open: cannot start the device model: {exc}",
                              exc.errno) from exc
        finally:
            control.close()
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except OSError:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        """The model's pid."""
        return self._proc.pid

    @property
    def exited(self) -> bool:
        """Whether the model has exited."""
        return self._proc.poll() is not None

    def fate(self) -> str:
        """What became of the model, for an error message."""
        code = self._proc.poll()
        pid = f" (pid {self._proc.pid})"
        if code is None:
            return f"closed its control socket{pid}"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}{pid}"
        return f"exited with code {code}{pid}"

    async def stop(self, control: socket.socket | None) -> None:
        """Ask the model to QUIT (on ``control``), kill it if it does not exit in time,
        reap it and close the pidfd. A cancelled stop still kills and reaps."""
        try:
            if control is not None:
                with contextlib.suppress(OSError):  # it may be gone already
                    control.send(Request(0, Op.QUIT).pack())
            if not await self._wait_exit(QUIT_GRACE_S):
                self._proc.kill()
                if not await self._wait_exit(KILL_GRACE_S):
                    raise DeviceError(self.device_id, f"close: the device model (pid "
                                      f"{self._proc.pid}) survived SIGKILL", errno.EBUSY)
            self._proc.wait()  # it has exited: this only reaps
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill the model if it still runs (a cancelled close must not leave one behind);
        close the pidfd. Idempotent."""
        if self._proc.poll() is None:
            self._proc.kill()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    async def _wait_exit(self, timeout_s: float) -> bool:
        """Wait until the model exits (its pidfd turns readable); False on timeout."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(self._pidfd, on_exit)
        try:
            async with asyncio.timeout(timeout_s):
                await exited
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._pidfd)
