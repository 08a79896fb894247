"""Auto-converge on the VM's owner: a guest that dirties its RAM faster than precopy moves
it is slowed down by keeping its vCPUs out of ``KVM_RUN`` a share of the time.

Runs in: the VM's owner worker, on its loop (only it drives the vCPUs). QEMU's
cpu-throttle has each vCPU sleep a share of every 10 ms slice, on its own thread; here the
run engine stops and releases every vCPU at once, a share of every :data:`PERIOD_S` (a
stop and a release of 288 vCPUs cost ~4 ms of the owner's time, so a shorter period would
spend more on switching than the guest gets to run). The guest program does not know: it
simply gets fewer ticks, and dirties fewer pages.
"""

from __future__ import annotations

import asyncio
import contextlib

from devstate.devices.host import DeviceHost

PERIOD_S = 0.1
MAX_PERCENT = 99


class GuestThrottle:
    """Keeps the guest of ``host`` stopped ``percent`` % of the time (0: not at all)."""

    def __init__(self, host: DeviceHost) -> None:
        self._host = host
        self._task: asyncio.Task[None] | None = None
        self.percent = 0

    def set(self, percent: int) -> None:
        """Throttle by ``percent`` (at most :data:`MAX_PERCENT`) from the next period on."""
        self.percent = max(0, min(MAX_PERCENT, percent))
        if self.percent and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """No more throttling; the guest runs (if the throttle had it stopped, it is
        released first, so that whoever stops it next stops a running guest)."""
        task, self._task = self._task, None
        self.percent = 0
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            while self.percent:
                await asyncio.sleep(PERIOD_S * (100 - self.percent) / 100)
                self._host.pause_guest()
                try:
                    await asyncio.sleep(PERIOD_S * self.percent / 100)
                finally:
                    self._host.resume_guest()
        finally:
            if self._task is asyncio.current_task():
                self._task = None
