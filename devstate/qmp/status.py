"""What QMP's queries show: the VM's run state and one migration as ``query-migrate`` sees it.

Runs in: the ``devstate vm --qmp`` process.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

from devstate.net.transport import Address
from devstate.phase import Phase
from devstate.report.migration import MigrationReport
from devstate.report.ram import RamReport


class RunState(enum.StrEnum):
    """``query-status``'s status: QEMU's RunState names that apply here."""

    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"


@dataclasses.dataclass(slots=True)
class Migration:
    """One migration as ``query-migrate`` shows it (times from ``time.monotonic``)."""

    status: Phase = Phase.NONE
    started: float = dataclasses.field(default_factory=time.monotonic)
    setup_done: float | None = None
    ended: float | None = None
    expected_ms: float | None = None
    critical_path: str = ""
    report: MigrationReport | None = None
    error: str = ""
    listening: Address | None = None  # an incoming migration's address (port 0 resolved)
    ram: RamReport | None = None  # a live guest's RAM precopy so far (the report's, after)

    def info(self) -> dict[str, Any]:
        """QEMU's MigrationInfo fields that apply, and devstate's own under ``devstate``."""
        now = self.ended if self.ended is not None else time.monotonic()
        info: dict[str, Any] = {"status": str(self.status),
                                "total-time": round((now - self.started) * 1e3)}
        if self.setup_done is not None:
            info["setup-time"] = round((self.setup_done - self.started) * 1e3)
        if not self.status.ended and self.expected_ms is not None:
            info["expected-downtime"] = round(self.expected_ms)
        if self.error:
            info["error-desc"] = self.error
        ours: dict[str, Any] = {"critical-path": self.critical_path}
        if self.listening is not None:
            info["socket-address"] = [socket_address(self.listening)]
            ours["incoming"] = str(self.listening)
        ram = self.report.ram if self.report is not None and self.report.ram else self.ram
        if ram is not None:
            info["ram"] = ram.to_qmp()
            if ram.throttle_pct:
                info["cpu-throttle-percentage"] = ram.throttle_pct
        if self.report is not None:
            if self.status is Phase.COMPLETED:
                info["downtime"] = round(self.report.downtime_ms)
            info["vfio"] = {"transferred": sum(d.bytes for d in self.report.devices
                                               if d.id.startswith("vfio/"))}
            ours.update(self.report.to_json())
        info["devstate"] = ours
        return info


def socket_address(address: Address) -> dict[str, str]:
    """QAPI's SocketAddress of a channel address (``query-migrate``'s ``socket-address``)."""
    if address.transport == "unix":
        return {"type": "unix", "path": address.path}
    return {"type": "inet", "host": address.host, "port": str(address.port)}
