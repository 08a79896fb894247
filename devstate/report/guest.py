"""The ``guest`` block of a report: whether a live guest went on running after it moved.

The destination reads it from the guest's own RAM (:mod:`devstate.devices.kvm.guest`): the
per-vCPU counters at the stop, then again after the resumed guest ran for a while, the
failure codes the guest writes when one of its checks fails, and its RAM checksums.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from devstate.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class GuestReport:
    """A live guest after its migration: how many vCPUs went on counting, whether the
    guest continued (every vCPU advanced, no failure code, checksums hold, no vCPU exit
    the guest never makes), its RAM size, and what was wrong if it did not."""

    vcpus: int
    vcpus_running: int
    continued: bool
    ram_bytes: int
    ran_ms: float  # how long the destination let it run before looking
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain data, read back equal by :meth:`from_json`."""
        return {**asdict(self), "ran_ms": round(self.ran_ms, 3)}

    @classmethod
    def from_json(cls, data: object) -> GuestReport | None:
        """The block from :meth:`to_json`'s form ({} or None: no live guest)."""
        if not data:
            return None
        if not isinstance(data, dict):
            raise ProtocolError("report.guest", f"not a guest report: {data!r:.200}")
        try:
            return cls(int(data["vcpus"]), int(data["vcpus_running"]), bool(data["continued"]),
                       int(data["ram_bytes"]), float(data["ran_ms"]), str(data.get("why", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("report.guest", f"not a guest report: {data!r:.200}") from exc

    def describe(self) -> str:
        """One line for the table."""
        said = (f"guest: {self.vcpus_running}/{self.vcpus} vCPUs running, "
                f"{self.ram_bytes / 2**20:.0f} MiB RAM, ")
        if self.continued:
            return said + f"continued (looked after {self.ran_ms:.0f} ms)"
        return said + f"DID NOT continue: {self.why}"
