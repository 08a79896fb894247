"""What the KVM VM's owner spent on vCPUs, per side and for a whole migration.

A side's workers each say what their VM's vCPUs cost (:class:`VcpuCost`: which engine,
how many threads, thread time in the state's ioctls and in the readback check); the side
adds them up, the destination sends its sum in its REPORT, and the source's report shows
both as :class:`KvmReport`, the ``"kvm"`` block of ``devstate migrate --json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from devstate.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class VcpuCost:
    """One side's vCPU work: ``vms`` KVM VMs (1 for a real guest), ``threads`` per VM,
    and thread time summed over them (ns)."""

    engine: str
    threads: int
    vms: int
    state_ns: int
    verify_ns: int

    @classmethod
    def total(cls, costs: Iterable[VcpuCost | None]) -> VcpuCost | None:
        """The side's cost from its workers' (None: no worker has a VM)."""
        found = [c for c in costs if c is not None]
        if not found:
            return None
        engines = sorted({c.engine for c in found})
        return cls("+".join(engines), max(c.threads for c in found),
                   sum(c.vms for c in found), sum(c.state_ns for c in found),
                   sum(c.verify_ns for c in found))

    def to_json(self) -> dict[str, Any]:
        """Plain data, read back equal by :meth:`from_json`."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> VcpuCost | None:
        """A cost from :meth:`to_json`'s form ({} or None: none); ProtocolError if not one."""
        if not data:
            return None
        wanted = {f.name: (str if f.name == "engine" else int) for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != set(wanted) or not all(
                isinstance(data[k], t) and not isinstance(data[k], bool)
                for k, t in wanted.items()):
            raise ProtocolError("report.kvm", f"not a vCPU cost: {data!r:.200}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class KvmReport:
    """Both sides' vCPU work in one migration (the ``kvm`` block of a report)."""

    vms_per_side: int
    threads: int
    engine: str
    get_ms: float       # source: thread time in the get ioctls
    put_ms: float       # destination: thread time in the set ioctls
    readback_ms: float  # destination: thread time reading each vCPU back and comparing

    @classmethod
    def of(cls, source: VcpuCost | None, destination: VcpuCost | None) -> KvmReport | None:
        """The block for a migration whose sides spent this (None: no kvm vCPUs)."""
        if source is None and destination is None:
            return None
        src = source or destination
        dst = destination or source
        assert src is not None and dst is not None
        engine = src.engine if src.engine == dst.engine else f"{src.engine}->{dst.engine}"
        return cls(max(src.vms, dst.vms), max(src.threads, dst.threads), engine,
                   (source.state_ns if source else 0) / 1e6,
                   (destination.state_ns if destination else 0) / 1e6,
                   (destination.verify_ns if destination else 0) / 1e6)

    def to_json(self) -> dict[str, Any]:
        """Plain data, times rounded to µs."""
        return {k: round(v, 3) if isinstance(v, float) else v
                for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for a table or a figure's header."""
        return (f"kvm: {self.vms_per_side} VM per side, {self.engine} engine, "
                f"{self.threads} thread(s); thread time get {self.get_ms:.1f} ms, "
                f"put {self.put_ms:.1f} ms + readback {self.readback_ms:.1f} ms")
