"""The ``ram`` block of a report and of ``query-migrate``: a live guest's RAM precopy.

The source's coordinator counts it (:mod:`devstate.migration.dirty`): the rounds (the
first sends every page, each later one the pages the guest dirtied during the one before),
the dirty log's syncs, the bytes sent while the guest ran and at the stop, and the rates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from devstate.errors import ProtocolError

PAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class RamReport:
    """A live guest's RAM as it moved (or, during a migration, as it is moving).

    ``transferred_bytes`` counts the extents' bytes (pages and headers) of every round and
    of the stop-and-copy; ``stop_copy_bytes`` those sent with the guest stopped.
    ``dirty_rate`` is pages per second the guest dirtied over the last round,
    ``pages_per_second`` pages sent per second while it ran. ``rounds_ms``: when each
    round began, in ms from the stop (negative: before it). ``throttle_pct``: how much of
    the time auto-converge kept the guest stopped at the end (QEMU's
    ``cpu-throttle-percentage``).
    """

    total_bytes: int
    transferred_bytes: int
    remaining_bytes: int
    rounds: int
    dirty_sync_count: int
    dirty_rate: float
    pages_per_second: float
    precopy_ms: float
    stop_copy_bytes: int = 0
    rounds_ms: tuple[float, ...] = ()
    throttle_pct: int = 0  # auto-converge: the share of time the guest was kept stopped

    def to_json(self) -> dict[str, Any]:
        """Plain data, read back equal by :meth:`from_json`."""
        return {**asdict(self), "dirty_rate": round(self.dirty_rate, 1),
                "pages_per_second": round(self.pages_per_second, 1),
                "precopy_ms": round(self.precopy_ms, 3),
                "rounds_ms": [round(t, 3) for t in self.rounds_ms]}

    @classmethod
    def from_json(cls, data: object) -> RamReport | None:
        """The block from :meth:`to_json`'s form ({} or None: no RAM precopy)."""
        if not data:
            return None
        if not isinstance(data, dict):
            raise ProtocolError("report.ram", f"not a RAM report: {data!r:.200}")
        try:
            return cls(int(data["total_bytes"]), int(data["transferred_bytes"]),
                       int(data["remaining_bytes"]), int(data["rounds"]),
                       int(data["dirty_sync_count"]), float(data["dirty_rate"]),
                       float(data["pages_per_second"]), float(data["precopy_ms"]),
                       int(data.get("stop_copy_bytes", 0)),
                       tuple(float(t) for t in data.get("rounds_ms", ())),
                       int(data.get("throttle_pct", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("report.ram", f"not a RAM report: {data!r:.200}") from exc

    def to_qmp(self) -> dict[str, Any]:
        """QEMU's MigrationStats for RAM (``query-migrate``'s ``ram``), with the rounds
        under ``precopy-rounds`` (QEMU has no such field; its iterations are the syncs)."""
        seconds = self.precopy_ms / 1e3
        return {
            "transferred": self.transferred_bytes,
            "remaining": self.remaining_bytes,
            "total": self.total_bytes,
            "duplicate": 0,
            "normal": self.transferred_bytes // PAGE_BYTES,
            "normal-bytes": self.transferred_bytes,
            "page-size": PAGE_BYTES,
            "dirty-sync-count": self.dirty_sync_count,
            "dirty-pages-rate": round(self.dirty_rate),
            "pages-per-second": round(self.pages_per_second),
            "mbps": round(self.transferred_bytes * 8 / 1e6 / seconds, 3) if seconds else 0.0,
            "precopy-bytes": self.transferred_bytes - self.stop_copy_bytes,
            "downtime-bytes": self.stop_copy_bytes,
            "precopy-rounds": self.rounds,
        }

    def describe(self) -> str:
        """One line for the table."""
        return (f"ram: {self.total_bytes / 2**20:.0f} MiB in {self.rounds} rounds, "
                f"{self.transferred_bytes / 2**20:.1f} MiB sent "
                f"({self.stop_copy_bytes / 2**20:.2f} MiB stopped), guest dirtied "
                f"{self.dirty_rate:.0f} pages/s last round"
                + (f", throttled {self.throttle_pct} %" if self.throttle_pct else ""))
