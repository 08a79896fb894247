"""Migration reports: what each device cost, the downtime, as a table or as JSON."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from devstate.errors import ProtocolError
from devstate.report.guest import GuestReport
from devstate.report.ram import RamReport
from devstate.report.vcpus import KvmReport


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """What one side did with one device: bytes and timing (monotonic ns of that side).

    Workers measure them (the source's get, the destination's put), coordinators collect
    them after the resume, and the destination's travel to the source in its REPORT
    (:meth:`to_json`); :meth:`DeviceReport.join` puts the two sides of a device together.
    """

    index: int
    id: str
    bytes: int
    packets: int
    start_ns: int
    end_ns: int
    worker: int
    done_ns: int = 0  # destination: when the device finished loading (firmware included)
    channel: int = -1  # source: the data channel it rode (-1: spread over all of them)
    precopy_bytes: int = 0  # source: of ``bytes``, those sent before the stop

    def to_json(self) -> dict[str, int | str]:
        """Plain data, read back equal by :meth:`from_json`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: object) -> DeviceResult:
        """A result from :meth:`to_json`'s form; ProtocolError if it is not one."""
        wanted = {f.name: (str if f.name == "id" else int) for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != set(wanted):
            raise ProtocolError("report.devices", f"not a device result: {data!r:.200}")
        for name, kind in wanted.items():
            value = data[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProtocolError(f"report.devices.{name}", f"not {kind.__name__}: {value!r}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """One device of a finished migration: its timeline, the workers and the channel.

    Times are ms from the source's stop (t0; precopy loads start before it): get from
    ``save_start`` to ``save_end`` (the last byte read and sent); transfer and put from
    ``load_start`` (first packet accepted) to ``load_end`` (last byte written; a record's
    put); complete at ``load_done`` (firmware and dependencies included). ``channel`` is
    the data channel it rode, -1 when spread over all of them.
    """

    id: str
    bytes: int
    source_worker: int
    dest_worker: int
    save_start_ms: float
    save_end_ms: float
    load_start_ms: float
    load_done_ms: float
    verified: bool
    load_end_ms: float = 0.0
    channel: int = -1

    @classmethod
    def join(cls, saved: DeviceResult, loaded: DeviceResult, *, t0: int, shift: int,
             verified: bool) -> DeviceReport:
        """One device's report from the source's result and the destination's; ``t0`` is
        the source's stop and ``shift`` turns the destination's clock into the source's."""
        return cls(id=saved.id, bytes=saved.bytes, source_worker=saved.worker,
                   dest_worker=loaded.worker, save_start_ms=(saved.start_ns - t0) / 1e6,
                   save_end_ms=(saved.end_ns - t0) / 1e6,
                   load_start_ms=(loaded.start_ns + shift - t0) / 1e6,
                   load_end_ms=(loaded.end_ns + shift - t0) / 1e6,
                   load_done_ms=(loaded.done_ns + shift - t0) / 1e6,
                   verified=verified, channel=saved.channel)

    @property
    def save_ms(self) -> float:
        """Time from the device's first get to its last byte read."""
        return self.save_end_ms - self.save_start_ms

    @property
    def load_ms(self) -> float:
        """Time from the device's first put to loaded (firmware latency included)."""
        return self.load_done_ms - self.load_start_ms


# The mode of a migration whose kvm vCPUs were spread over a KVM VM per worker.
SHARDED_MODE = "sharded-vms"


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """A finished migration: mode, downtime (source stop to destination resume), devices."""

    mode: str
    workers: int
    downtime_ms: float
    devices: tuple[DeviceReport, ...]
    digests_compared: bool
    expected_ms: float = 0.0  # the cost model's estimate before the stop
    critical_path: str = ""   # what the estimate said sets the downtime
    downtime_limit_ms: float | None = None  # the downtime limit, if one was set
    # What the destination ran with (MigrationParams.to_json), as it said in its report.
    destination_params: dict[str, Any] = field(default_factory=dict)
    kvm: KvmReport | None = None  # the KVM vCPUs' engine, threads and cost, if any
    guest: GuestReport | None = None  # a live guest: did it continue on the destination
    # Stop to the source seeing RESUMED (downtime_ms ends when the destination's last
    # worker resumed, a live guest's last vCPU released, which RESUMED follows); None from
    # a destination that does not say when it resumed.
    resumed_seen_ms: float | None = None
    ram: RamReport | None = None  # a live guest's RAM precopy: rounds, bytes, rates

    @property
    def overrun_ms(self) -> float:
        """How far the downtime passed its limit (0 without a limit or within it)."""
        limit = self.downtime_limit_ms
        return max(0.0, self.downtime_ms - limit) if limit else 0.0

    @property
    def total_bytes(self) -> int:
        """State bytes moved, all devices."""
        return sum(d.bytes for d in self.devices)

    @property
    def verified(self) -> bool:
        """True when every device's state is byte-for-byte the same on both sides."""
        return self.digests_compared and all(d.verified for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        """The report as plain data: ``mode``, ``downtime_ms``, ``devices`` (id, bytes, ...)."""
        return {
            "mode": self.mode,
            "workers": self.workers,
            "downtime_ms": round(self.downtime_ms, 3),
            "expected_ms": round(self.expected_ms, 3),
            "critical_path": self.critical_path,
            "downtime_limit_ms": self.downtime_limit_ms,
            "overrun_ms": round(self.overrun_ms, 3),
            "total_bytes": self.total_bytes,
            "verified": self.verified,
            "kvm": self.kvm.to_json() if self.kvm else None,
            "guest": self.guest.to_json() if self.guest else None,
            "ram": self.ram.to_json() if self.ram else None,
            "resumed_seen_ms": None if self.resumed_seen_ms is None
            else round(self.resumed_seen_ms, 3),
            "devices": [
                {**asdict(d), "save_ms": round(d.save_ms, 3), "load_ms": round(d.load_ms, 3)}
                for d in self.devices
            ],
        }


def _group(devices: Iterable[DeviceReport]) -> list[tuple[str, list[DeviceReport]]]:
    """Rows of the table: all vCPUs as one row, all guest RAM ranges as one row, every
    other device on its own."""
    devices = list(devices)
    cpus = [d for d in devices if d.id.startswith("cpu/")]
    ram = [d for d in devices if d.id.startswith("ram/")]
    rows: list[tuple[str, list[DeviceReport]]] = []
    if cpus:
        rows.append((f"cpu/0..{len(cpus) - 1} ({len(cpus)} vCPUs)", cpus))
    rows.extend((d.id, [d]) for d in devices if d.id.startswith("vm/"))
    if ram:
        rows.append((f"ram/0..{len(ram) - 1} (guest RAM)", ram))
    rows.extend((d.id, [d]) for d in devices if d.id.startswith("vfio/"))
    return rows


def format_table(reports: Iterable[MigrationReport]) -> str:
    """A plain-text table: per device group its bytes and times, per mode the downtime."""
    lines = []
    reports = list(reports)
    for report in reports:
        shape = " (sharded VMs: an experiment, not a real guest shape)" \
            if report.mode == SHARDED_MODE else ""
        lines.append(f"{report.mode}{shape}: {report.workers} worker(s), downtime "
                     f"{report.downtime_ms:.1f} ms (expected {report.expected_ms:.0f}), "
                     f"{_mib(report.total_bytes)}, "
                     f"{'verified bit-exact' if report.verified else 'NOT verified'}")
        if report.kvm is not None:
            lines.append(f"  {report.kvm.describe()}")
        if report.guest is not None:
            seen = "" if report.resumed_seen_ms is None else \
                f"; downtime to the last vCPU's release, RESUMED seen at " \
                f"{report.resumed_seen_ms:.1f} ms"
            lines.append(f"  {report.guest.describe()}{seen}")
        if report.ram is not None:
            lines.append(f"  {report.ram.describe()}")
        if report.downtime_limit_ms is not None:
            lines.append(f"  limit {report.downtime_limit_ms:.0f} ms: " + (
                f"overrun by {report.overrun_ms:.1f} ms; critical path: "
                f"{report.critical_path}" if report.overrun_ms else "met"))
        lines.append(f"  {'device':<28} {'bytes':>12} {'saved at ms':>16} {'loaded at ms':>16}"
                     f" {'verified':>9}")
        for name, group in _group(report.devices):
            size = sum(d.bytes for d in group)
            save = f"{min(d.save_start_ms for d in group):.1f}-" \
                   f"{max(d.save_end_ms for d in group):.1f}"
            load = f"{min(d.load_start_ms for d in group):.1f}-" \
                   f"{max(d.load_done_ms for d in group):.1f}"
            ok = "yes" if all(d.verified for d in group) else "NO"
            lines.append(f"  {name:<28} {_mib(size):>12} {save:>16} {load:>16} {ok:>9}")
        lines.append("")
    by_mode = {r.mode: r for r in reports}
    if "sequential" in by_mode and "concurrent" in by_mode:
        seq, con = by_mode["sequential"], by_mode["concurrent"]
        lines.append(f"downtime: sequential {seq.downtime_ms:.1f} ms, concurrent "
                     f"{con.downtime_ms:.1f} ms: {seq.downtime_ms / con.downtime_ms:.2f}x shorter")
    return "\n".join(lines).rstrip() + "\n"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"
