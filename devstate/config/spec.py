"""Machine specs: which devices a machine has, parsed from TOML or JSON and validated.

A spec names the vCPUs (count and backend), the guest's RAM (kvm vCPUs only: with it the
vCPUs run a guest program, see :mod:`devstate.devices.kvm.guest`) and the VFIO-style
devices (name, state size, bandwidths, firmware load latency, precopy support). Every
validation error is a :class:`~devstate.errors.SpecError` whose message names the field
and the reason, e.g.
``devices[2].size: must be > 0``.

Example (TOML)::

    name = "example"
    seed = 7
    [vcpus]
    count = 512
    backend = "sim-vcpu"
    [ram]
    size = "256MiB"
    [[devices]]
    name = "nic0"
    backend = "vfio-sim"
    size = "64MiB"
    read_bandwidth = "2GiB/s"
    write_bandwidth = "1GiB/s"
    firmware_latency_ms = 120
    precopy = true

Sizes and rates (:func:`devstate.config.fields.parse_quantity`) are a number of bytes
(bytes/s), or a string with a unit: KB, MB, GB are decimal (10^3, 10^6, 10^9: ``"32MB"``
is 32,000,000 bytes, which reports show as 30.5 MiB), KiB, MiB, GiB binary (2^10, 2^20,
2^30: ``"32MiB"`` is 33,554,432 bytes), as the IEC and SI prefixes mean them; case and a
space before the unit do not matter. A rate ends in ``/s``.
"""

from __future__ import annotations

import difflib
import enum
import json
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstate.config import fields
from devstate.errors import SpecError

# The largest machine KVM here accepts (KVM_CAP_MAX_VCPUS); a spec beyond it is a typo.
MAX_VCPUS = 1024
# VFIO devices per machine: a PCI bus's worth. Each is a device-model process while the
# machine runs (~30 MiB RSS each), so thousands would exhaust a host's memory and process
# limits before the migration could start; a spec beyond this is refused at once.
MAX_VFIO_DEVICES = 256
# Guest RAM: at least what the guest program needs for a few vCPUs, at most what this host
# class can back (the memfd is pre-faulted on both sides of a local migration).
MIN_RAM_BYTES = 1 << 20
MAX_RAM_BYTES = 64 << 30
# Guest RAM moves as ranges of this size, each a stream of its own: the units of work the
# plan spreads over workers and channels (1 GiB is 32 of them).
RAM_RANGE_BYTES = 32 << 20
PAGE_BYTES = 4096
# A RAM range moves at memory-copy speed: read from the guest's memfd into a packet,
# written from a packet into the destination's. A host's measured copy rate bounds it too.
RAM_COPY_RATE = 4 << 30
# The guest's dirty rate (pages/s per vCPU) at most: a page per 10 us, far past any link;
# and the working set a dirtying guest gets when the spec names none.
MAX_DIRTY_RATE = 100_000
DEFAULT_WORKING_SET = 1 << 20
# The guest's tick (its periodic LAPIC timer: each vCPU works, dirties its pages and halts
# once a tick): KVM raises a shorter period to its min_timer_period_us (200 by default),
# and the timer's initial count is a u32 of ns. Every tick is a timer interrupt on the
# host, also while the vCPUs are stopped and while they wait to resume: 288 vCPUs at the
# default fire ~11.5k a second over both sides of a local migration.
DEFAULT_TICK_MS = 50.0
MIN_TICK_MS = 0.2
MAX_TICK_MS = 4294.0
# Device ids are at most "vfio/" and a 48-character name.
MAX_ID_CHARS = 64
# Device state sizes are u64 on the VFIO uAPI; 64 GiB bounds what a test machine can stream.
MAX_DEVICE_BYTES = 64 << 30
# Default device state rates. The only published per-device figures (QEMU's multifd
# device-state series: 4 ConnectX-7 VFs, ~100 MiB of state each, ~475 ms per VF when
# loaded one after another, of which ~8 ms is the 100 GbE transfer) put a VF's state read
# plus load at a few hundred MB/s each way: 1 GiB/s out and 512 MiB/s in is generous.
DEFAULT_READ_BANDWIDTH = 1 << 30
DEFAULT_WRITE_BANDWIDTH = 512 << 20

# The VM-level devices that come with kvm vCPUs (PIT, kvmclock, PICs and IOAPIC), in the
# order they are restored, all before any vCPU (:mod:`devstate.devices.kvm.device`).
KVM_VM_DEVICES = ("vm/pit", "vm/clock", "vm/irqchip")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")


class Backend(enum.StrEnum):
    """Where a device's state really lives."""

    SIM_VCPU = "sim-vcpu"
    KVM = "kvm"
    KVM_VM = "kvm-vm"  # the VM-level state that comes with kvm vCPUs (not for spec files)
    GUEST_RAM = "guest-ram"  # a range of the guest's RAM (from [ram], not a device entry)
    VFIO_SIM = "vfio-sim"


# What a live guest holds as it runs: its vCPUs' and VM-level state change with every
# instruction after the resume, so continuity, not a digest taken then, proves they moved.
RUNNING_BACKENDS = frozenset({Backend.KVM, Backend.KVM_VM})


class Shape(enum.StrEnum):
    """Record devices are produced and consumed whole; streams are opaque and ordered."""

    RECORD = "record"
    STREAM = "stream"


# A record device's size in bytes, from its backend and id (see MachineConfig.table).
RecordSize = Callable[[Backend, str], int]


@dataclass(frozen=True, slots=True)
class VcpuSpec:
    """The machine's vCPUs: how many, which backend, and the per-vCPU costs of ``sim-vcpu``."""

    count: int
    backend: Backend = Backend.SIM_VCPU
    get_us: float = 45.0
    put_us: float = 45.0
    priority: int = 1  # load class: lower classes are saved and loaded first
    after: tuple[str, ...] = ()  # device ids every vCPU must load after


@dataclass(frozen=True, slots=True)
class VfioSpec:
    """One VFIO-style device: its opaque state size, bandwidths and firmware load latency."""

    name: str
    size: int
    backend: Backend = Backend.VFIO_SIM
    read_bandwidth: int = DEFAULT_READ_BANDWIDTH
    write_bandwidth: int = DEFAULT_WRITE_BANDWIDTH
    firmware_latency_ms: float = 0.0
    precopy: bool = False
    dirty_rate: int = 0  # bytes/s of state the running device rewrites (precopy re-sends)
    priority: int = 1  # load class: lower classes are saved and loaded first
    after: tuple[str, ...] = ()  # device ids this one completes its load after

    @property
    def rate(self) -> int:
        """Bytes/s its state moves at: the slower of reading it out and writing it in."""
        return min(self.read_bandwidth, self.write_bandwidth)


@dataclass(frozen=True, slots=True)
class StreamCost:
    """What the plan and the estimate know of a stream: its bytes, the rate it moves at
    (the slower of reading it out and writing it in), the firmware work after its last
    byte, and whether it streams while the VM runs."""

    size: int
    rate: float
    firmware_latency_ms: float = 0.0
    precopy: bool = False


@dataclass(frozen=True, slots=True)
class RamSpec:
    """The guest's RAM: its size (a page multiple) and the ranges it moves as; how fast
    the guest dirties it: ``dirty_rate`` pages per second per vCPU, written in turn over a
    working set of ``working_set`` bytes per vCPU (so a round finds at most that many
    dirty per vCPU), a tick's worth at each tick of ``tick_ms``."""

    size: int
    dirty_rate: int = 0
    working_set: int = 0
    tick_ms: float = DEFAULT_TICK_MS

    def ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of each range, in address order; the last may be shorter."""
        return [(start, min(RAM_RANGE_BYTES, self.size - start))
                for start in range(0, self.size, RAM_RANGE_BYTES)]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device of the machine as the runtime sees it: a stable id, index and shape.

    ``index`` is the device's position in the machine's device table; packets name devices
    by it, and the handshake checks both sides hold the same table.
    """

    index: int
    id: str
    backend: Backend
    shape: Shape
    version: int
    size: int  # bytes of state for a stream; the record size bound for a record
    vcpu: VcpuSpec | None = None
    vfio: VfioSpec | None = None
    ram: tuple[int, int] | None = None  # a guest RAM range: (offset, length) in guest RAM
    stream: StreamCost | None = None  # a stream's (VFIO device or RAM range) cost terms
    priority: int = 1  # load class (VM-level state 0): lower first
    after: tuple[str, ...] = ()  # ids of the devices whose loads complete before this one's


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """A whole machine: vCPUs, guest RAM (a running guest) and VFIO devices, and a seed
    that makes its state distinct."""

    name: str
    seed: int
    vcpus: VcpuSpec
    vfio: tuple[VfioSpec, ...]
    ram: RamSpec | None = None

    @property
    def live(self) -> bool:
        """Whether the machine runs a guest: kvm vCPUs executing a program in guest RAM."""
        return self.ram is not None

    def table(self, record_size: RecordSize) -> DeviceTable:
        """The device table in canonical order: VM-level devices (with kvm vCPUs), then
        ``cpu/0..n-1``, then guest RAM ranges ``ram/0..k-1``, then VFIO devices in spec
        order.

        ``record_size`` gives a record device's size from its backend and id: only the
        device backends know it (a kvm vCPU's depends on the host), so a migration builds
        its table once, through :func:`devstate.devices.device_table`.
        """
        table: list[DeviceSpec] = []
        if self.vcpus.backend is Backend.KVM and self.vcpus.count:
            for name in KVM_VM_DEVICES:
                table.append(DeviceSpec(len(table), name, Backend.KVM_VM, Shape.RECORD, 1,
                                        record_size(Backend.KVM_VM, name), priority=0))
        vcpu_bytes = record_size(self.vcpus.backend, "cpu/0") if self.vcpus.count else 0
        for i in range(self.vcpus.count):
            table.append(DeviceSpec(len(table), f"cpu/{i}", self.vcpus.backend, Shape.RECORD, 1,
                                    vcpu_bytes, vcpu=self.vcpus,
                                    priority=self.vcpus.priority, after=self.vcpus.after))
        for i, (start, length) in enumerate(self.ram.ranges() if self.ram else ()):
            table.append(DeviceSpec(len(table), f"ram/{i}", Backend.GUEST_RAM, Shape.STREAM,
                                    1, length, ram=(start, length),
                                    stream=StreamCost(length, RAM_COPY_RATE, precopy=True)))
        for dev in self.vfio:
            table.append(DeviceSpec(len(table), f"vfio/{dev.name}", dev.backend, Shape.STREAM,
                                    1, dev.size, vfio=dev, priority=dev.priority,
                                    stream=StreamCost(dev.size, dev.rate,
                                                      dev.firmware_latency_ms, dev.precopy),
                                    after=dev.after))
        return DeviceTable(self, tuple(table))

    def to_dict(self) -> dict[str, Any]:
        """A plain-data form that :func:`parse_spec` reads back to an equal spec."""
        ram: dict[str, Any] = {}
        if self.ram is not None:
            working_set = {"working_set": self.ram.working_set} if self.ram.working_set else {}
            tick = {"tick_ms": self.ram.tick_ms} if self.ram.tick_ms != DEFAULT_TICK_MS \
                else {}
            ram = {"ram": {"size": self.ram.size, "dirty_rate": self.ram.dirty_rate,
                           **working_set, **tick}}
        return {
            "name": self.name,
            "seed": self.seed,
            **ram,
            "vcpus": {"count": self.vcpus.count, "backend": str(self.vcpus.backend),
                      "get_us": self.vcpus.get_us, "put_us": self.vcpus.put_us,
                      "priority": self.vcpus.priority, "after": list(self.vcpus.after)},
            "devices": [
                {"name": d.name, "backend": str(d.backend), "size": d.size,
                 "read_bandwidth": d.read_bandwidth, "write_bandwidth": d.write_bandwidth,
                 "firmware_latency_ms": d.firmware_latency_ms, "precopy": d.precopy,
                 "dirty_rate": d.dirty_rate, "priority": d.priority, "after": list(d.after)}
                for d in self.vfio
            ],
        }


@dataclass(frozen=True, slots=True)
class DeviceTable:
    """A machine's devices as a migration moves them, in table order (``devices[i].index``
    is ``i``), with the machine they came from. Built once per machine and side."""

    machine: MachineConfig
    devices: tuple[DeviceSpec, ...]

    def __iter__(self) -> Iterator[DeviceSpec]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, index: int) -> DeviceSpec:
        return self.devices[index]

    def dependencies(self) -> tuple[tuple[int, ...], ...]:
        """For each device, the indices of the devices it loads after."""
        index = {d.id: d.index for d in self.devices}
        return tuple(tuple(index[a] for a in d.after) for d in self.devices)

    def handshake(self) -> list[list[str | int]]:
        """The table as the handshake carries it: id, shape, backend, version, size.

        Two sides can migrate between each other exactly when their tables are equal.
        """
        return [[d.id, str(d.shape), str(d.backend), d.version, d.size] for d in self.devices]


def load_spec(path: str | Path) -> MachineConfig:
    """Read and validate a machine spec from a ``.toml`` or ``.json`` file; every failure is
    a one-line :class:`SpecError` naming the file, the field and the reason."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError("", f"cannot read spec: {exc.strerror}", file=str(p)) from exc
    try:
        return decode_spec(raw, json_format=p.suffix.lower() == ".json")
    except SpecError as exc:
        raise SpecError(exc.path, exc.reason, file=str(p)) from exc


def decode_spec(raw: bytes, *, json_format: bool) -> MachineConfig:
    """Parse and validate a spec's bytes, JSON or TOML."""
    kind = "JSON" if json_format else "TOML"
    try:
        data = json.loads(raw) if json_format else tomllib.loads(raw.decode("utf-8"))
    except RecursionError:  # both parsers recurse on nesting: refused, as check_depth would
        raise SpecError("", f"not valid {kind}: nested too deeply to parse") from None
    except ValueError as exc:  # syntax, encoding, and ints past Python's 4300 digits
        raise SpecError("", f"not valid {kind}: {exc}") from exc
    return parse_spec(data)


def parse_spec(data: Any) -> MachineConfig:
    """Validate plain data (from TOML or JSON) into a :class:`MachineConfig`."""
    fields.check_depth(data)
    top = fields.mapping(data, "", {"name", "seed", "vcpus", "ram", "devices"})
    name = fields.string(top.get("name", "machine"), "name")
    seed = fields.integer(top.get("seed", 1), "seed", low=0, high=2**63 - 1)
    vcpus = _vcpus(top.get("vcpus", {"count": 0}))
    ram = _ram(top["ram"], vcpus) if "ram" in top else None
    raw_devices = top.get("devices", [])
    if not isinstance(raw_devices, list):
        raise SpecError("devices", "must be a list of tables")
    if len(raw_devices) > MAX_VFIO_DEVICES:
        raise SpecError("devices", f"{len(raw_devices)} devices: at most {MAX_VFIO_DEVICES} "
                                   "(each runs a device-model process)")
    vfio = tuple(_vfio(d, f"devices[{i}]") for i, d in enumerate(raw_devices))
    seen: dict[str, int] = {}
    for i, dev in enumerate(vfio):
        if dev.name in seen:
            raise SpecError(f"devices[{i}].name",
                            f"{dev.name!r} is already the name of devices[{seen[dev.name]}]")
        seen[dev.name] = i
    if vcpus.count == 0 and not vfio:
        raise SpecError("", "the machine has no devices: give vcpus.count > 0 or a device")
    spec = MachineConfig(name=name, seed=seed, vcpus=vcpus, vfio=vfio, ram=ram)
    _check_dependencies(spec)
    return spec


def _check_dependencies(spec: MachineConfig) -> None:
    """Every ``after`` names a device of the machine, and no device waits on itself."""
    table = spec.table(lambda *_: 0)  # sizes do not matter to the order of loads
    ids = {d.id for d in table}
    where = {f"vfio/{d.name}": f"devices[{i}].after" for i, d in enumerate(spec.vfio)}
    for d in table:
        path = where.get(d.id, "vcpus.after")
        for other in d.after:
            if other not in ids:
                raise SpecError(path, f"{fields.shown(other)} is not a device of this machine"
                                      f"{_did_you_mean(other, ids)}")
            if other == d.id or (d.vcpu is not None and other.startswith("cpu/")):
                raise SpecError(path, f"{d.id} cannot load after {other}: itself or a vCPU")
    loop = _cycle({d.id: d.after for d in table})
    if loop:
        raise SpecError(where.get(loop[0], "vcpus.after"),
                        f"dependency cycle: {' -> '.join(loop)}")


def _cycle(edges: Mapping[str, tuple[str, ...]]) -> list[str]:
    """A dependency cycle among ``edges`` (first node repeated last), or [] if none.

    A depth-first walk with its own stack: a chain of a thousand devices must not meet
    Python's recursion limit. vCPUs are nodes like any device, so that a cycle through
    them (a device after ``cpu/0``, the vCPUs after that device) is found too.
    """
    done: set[str] = set()
    for root in edges:
        if root in done:
            continue
        trail = [root]  # the path walked, for the message
        stack = [iter(edges[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                done.add(trail.pop())
                stack.pop()
            elif nxt in trail:
                return trail[trail.index(nxt):] + [nxt]
            elif nxt not in done:
                trail.append(nxt)
                stack.append(iter(edges.get(nxt, ())))
    return []


def _did_you_mean(name: str, ids: set[str]) -> str:
    """A hint for an ``after`` entry that is no device id: ids are prefixed by kind
    (``vfio/nic1``), which a spec's ``name = "nic1"`` does not show."""
    if f"vfio/{name}" in ids:
        return f" (did you mean 'vfio/{name}'?)"
    close = difflib.get_close_matches(name, sorted(ids), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return " (ids look like 'vfio/NAME')"


def _vcpus(data: Any) -> VcpuSpec:
    table = fields.mapping(data, "vcpus", {"count", "backend", "get_us", "put_us", "priority",
                                     "after"})
    count = fields.integer(table.get("count", 0), "vcpus.count", low=0, high=MAX_VCPUS)
    backend = _backend(table.get("backend", Backend.SIM_VCPU), "vcpus.backend",
                       {Backend.SIM_VCPU, Backend.KVM})
    get_us = fields.number(table.get("get_us", 45.0), "vcpus.get_us", low=0.0, high=100_000.0)
    put_us = fields.number(table.get("put_us", 45.0), "vcpus.put_us", low=0.0, high=100_000.0)
    priority = fields.integer(table.get("priority", 1), "vcpus.priority", low=0, high=9)
    after = _ids(table.get("after", []), "vcpus.after")
    return VcpuSpec(count=count, backend=backend, get_us=get_us, put_us=put_us,
                    priority=priority, after=after)


def _ram(data: Any, vcpus: VcpuSpec) -> RamSpec:
    table = fields.mapping(data, "ram", {"size", "dirty_rate", "working_set", "tick_ms"})
    if "size" not in table:
        raise SpecError("ram.size", "is required")
    size = fields.parse_quantity(table["size"], "ram.size")
    if size % PAGE_BYTES:
        raise SpecError("ram.size", f"{size} B is not a multiple of the {PAGE_BYTES} B page")
    if not MIN_RAM_BYTES <= size <= MAX_RAM_BYTES:
        raise SpecError("ram.size", f"must be from {MIN_RAM_BYTES >> 20} MiB to "
                                    f"{MAX_RAM_BYTES >> 30} GiB")
    if vcpus.backend is not Backend.KVM or vcpus.count == 0:
        raise SpecError("ram", "guest RAM runs a guest on kvm vCPUs: give vcpus.backend = "
                               "\"kvm\" and vcpus.count > 0")
    rate = fields.integer(table.get("dirty_rate", 0), "ram.dirty_rate", low=0,
                          high=MAX_DIRTY_RATE)
    working_set = fields.parse_quantity(table["working_set"], "ram.working_set") \
        if "working_set" in table else DEFAULT_WORKING_SET if rate else 0
    if working_set % PAGE_BYTES or working_set > size // vcpus.count:
        raise SpecError("ram.working_set", f"{working_set} B per vCPU: give whole pages, at "
                                           f"most the RAM's share per vCPU "
                                           f"({size // vcpus.count} B)")
    if rate and not working_set:
        raise SpecError("ram.working_set", "a guest that dirties pages needs a working set")
    tick = fields.number(table.get("tick_ms", DEFAULT_TICK_MS), "ram.tick_ms",
                         low=MIN_TICK_MS, high=MAX_TICK_MS)
    return RamSpec(size, rate, working_set, tick)


def _ids(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= MAX_ID_CHARS
                                              for v in value):
        raise SpecError(path, "must be a list of device ids such as 'vfio/nic0'")
    return tuple(value)


def _vfio(data: Any, path: str) -> VfioSpec:
    table = fields.mapping(data, path, {"name", "backend", "size", "read_bandwidth",
                                  "write_bandwidth", "firmware_latency_ms", "precopy",
                                  "dirty_rate", "priority", "after"})
    if "name" not in table:
        raise SpecError(f"{path}.name", "is required")
    name = fields.string(table["name"], f"{path}.name")
    if not _NAME.match(name):
        raise SpecError(f"{path}.name", f"{fields.shown(name)} must be 1-48 of a-z 0-9 _ . - "
                                        "starting with a letter or digit")
    backend = _backend(table.get("backend", Backend.VFIO_SIM), f"{path}.backend",
                       {Backend.VFIO_SIM})
    if "size" not in table:
        raise SpecError(f"{path}.size", "is required")
    size = fields.parse_quantity(table["size"], f"{path}.size")
    if size > MAX_DEVICE_BYTES:
        raise SpecError(f"{path}.size", f"must be <= {MAX_DEVICE_BYTES >> 30} GiB")
    rbw = _rate(table, "read_bandwidth", path, DEFAULT_READ_BANDWIDTH)
    wbw = _rate(table, "write_bandwidth", path, DEFAULT_WRITE_BANDWIDTH)
    latency = fields.number(table.get("firmware_latency_ms", 0.0), f"{path}.firmware_latency_ms",
                      low=0.0, high=600_000.0)
    precopy = table.get("precopy", False)
    if not isinstance(precopy, bool):
        raise SpecError(f"{path}.precopy", "must be true or false")
    dirty = _rate(table, "dirty_rate", path, 0) if table.get("dirty_rate", 0) != 0 else 0
    if dirty and not precopy:
        raise SpecError(f"{path}.dirty_rate", "only a device with precopy = true dirties "
                                              "state that migration must re-send")
    return VfioSpec(name=name, size=size, backend=backend, read_bandwidth=rbw,
                    write_bandwidth=wbw, firmware_latency_ms=latency, precopy=precopy,
                    dirty_rate=dirty,
                    priority=fields.integer(table.get("priority", 1), f"{path}.priority", low=0,
                                      high=9),
                    after=_ids(table.get("after", []), f"{path}.after"))


def _rate(table: Mapping[str, Any], key: str, path: str, default: int) -> int:
    value = table.get(key, default)
    return fields.parse_quantity(value, f"{path}.{key}", per_second=isinstance(value, str))


def _backend(value: Any, path: str, allowed: set[Backend]) -> Backend:
    try:
        backend = Backend(value)
    except ValueError:
        raise SpecError(path, f"unknown backend {fields.shown(value)} (expected one of "
                              f"{', '.join(sorted(map(str, allowed)))})") from None
    if backend not in allowed:
        raise SpecError(path, f"backend {backend} cannot be used here (expected one of "
                              f"{', '.join(sorted(map(str, allowed)))})")
    return backend
