"""Machine specs: parsing, units, and validation errors that name the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devstate.config.fields import parse_quantity
from devstate.config.spec import Backend, Shape, load_spec, parse_spec
from devstate.devices import device_table
from devstate.errors import SpecError


def _machine(**devices: object) -> dict[str, object]:
    return {"vcpus": {"count": 2}, "devices": [
        {"name": "nic0", "size": "32MiB"}, {"name": "nic1", "size": 1024},
        {"name": "gpu0", **devices}]}


def test_default_machine_is_a_live_guest_of_512_vcpus_and_four_devices() -> None:
    from devstate.cli import load_default_machine

    spec = load_default_machine()
    table = device_table(spec)
    assert spec.vcpus.count == 512 and spec.vcpus.backend is Backend.KVM and spec.live
    assert spec.ram is not None and spec.ram.size == 256 << 20
    ids = [d.id for d in table]
    assert ids[:3] == ["vm/pit", "vm/clock", "vm/irqchip"]
    assert ids[3:515] == [f"cpu/{i}" for i in range(512)]
    assert ids[515:523] == [f"ram/{i}" for i in range(8)]
    assert ids[523:] == ["vfio/nic0", "vfio/nic1", "vfio/accel0", "vfio/vgpu0"]
    sizes = [d.size for d in table[523:]]
    assert min(sizes) == 32 << 20 and max(sizes) == 512 << 20
    latencies = [d.vfio.firmware_latency_ms for d in table[523:] if d.vfio]
    assert min(latencies) == 50 and max(latencies) == 250


def test_device_table_is_canonical() -> None:
    spec = parse_spec(_machine(size="1GiB", read_bandwidth="3GiB/s"))
    table = device_table(spec)
    assert [d.id for d in table] == ["cpu/0", "cpu/1", "vfio/nic0", "vfio/nic1", "vfio/gpu0"]
    assert [d.index for d in table] == list(range(5))
    assert table[0].shape is Shape.RECORD and table[0].backend is Backend.SIM_VCPU
    assert table[4].shape is Shape.STREAM and table[4].size == 1 << 30
    assert table[4].vfio is not None and table[4].vfio.read_bandwidth == 3 << 30


@pytest.mark.parametrize(("text", "value"), [
    ("64MiB", 64 << 20), ("1.5GB", 1_500_000_000), ("4096", 4096), (4096, 4096),
    ("2 KiB", 2048), ("1g", 1_000_000_000)])
def test_quantities(text: object, value: int) -> None:
    assert parse_quantity(text, "x") == value


@pytest.mark.parametrize(("patch", "path", "reason"), [
    ({"size": 0}, "devices[2].size", "must be > 0"),
    ({"size": "-3MiB"}, "devices[2].size", "is not a quantity"),
    ({"size": "12 parsecs"}, "devices[2].size", "is not a quantity"),
    ({"size": True}, "devices[2].size", "must be a number"),
    ({"size": "1MiB", "read_bandwidth": "2GiB"}, "devices[2].read_bandwidth", "is not a rate"),
    ({"size": "1MiB", "firmware_latency_ms": -1}, "devices[2].firmware_latency_ms",
     "must be between"),
    ({"size": "1MiB", "precopy": "yes"}, "devices[2].precopy", "must be true or false"),
    ({"size": "1MiB", "backend": "qemu"}, "devices[2].backend", "unknown backend"),
    ({"size": "1MiB", "backend": "kvm"}, "devices[2].backend", "cannot be used here"),
    ({"size": "1MiB", "colour": "red"}, "devices[2].colour", "unknown field"),
    ({"size": "1MiB", "name": "nic0"}, "devices[2].name", "already the name of devices[0]"),
    ({"size": "1MiB", "name": "Bad Name"}, "devices[2].name", "must be 1-48"),
    ({}, "devices[2].size", "is required"),
])
def test_validation_errors_name_the_field(patch: dict[str, object], path: str,
                                          reason: str) -> None:
    data = _machine(**patch)
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.path == path
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("data", "path"), [
    ({"vcpus": {"count": 2000}}, "vcpus.count"),
    ({"vcpus": {"count": "many"}}, "vcpus.count"),
    ({"vcpus": {"count": 1, "backend": "vfio-sim"}}, "vcpus.backend"),
    ({"vcpus": {"count": 0}}, ""),
    ({"devices": {"name": "x"}}, "devices"),
    ({"devices": ["x"]}, "devices[0]"),
    ([], ""),
])
def test_structural_errors(data: object, path: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.path == path


def test_toml_and_json_files_round_trip(tmp_path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text('name = "m"\nseed = 3\n[vcpus]\ncount = 4\n'
                    '[[devices]]\nname = "d"\nsize = "8MiB"\nprecopy = true\n')
    spec = load_spec(toml)
    js = tmp_path / "m.json"
    js.write_text(json.dumps(spec.to_dict()))
    assert load_spec(js) == spec


def test_unreadable_or_malformed_files(tmp_path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[vcpus\ncount = 1")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)


SPEC_KEYS = ["name", "seed", "vcpus", "devices", "count", "backend", "size",
             "read_bandwidth", "write_bandwidth", "firmware_latency_ms", "precopy",
             "dirty_rate", "priority", "after", "get_us", "put_us"]
SPEC_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["32MiB", "1GiB/s", "-1", "1e30", "vfio-sim", "kvm", "sim-vcpu",
                       "vfio/d0", "cpu/0", "0B"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(SPEC_KEYS) | st.text(max_size=5), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(data=SPEC_VALUES)
# Issue 18's hostile specs as data (tests/test_hostile_specs.py has them as files).
@example({"devices": [{"name": "a", "size": 1, "read_bandwidth": 0.5}]})
@example({"devices": [{"name": "a", "size": float("inf")}]})
@example({"devices": [{"name": "a", "size": 10**400}]})
@example({"vcpus": {"count": 2, "after": ["vfio/a"]},
          "devices": [{"name": "a", "size": 1, "after": ["cpu/0"]}]})
@example({"devices": [{"name": f"d{i}", "size": 1} for i in range(2000)]})
@example({"devices": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]})
def test_any_spec_data_gives_a_machine_or_a_spec_error(data: object) -> None:
    """A spec is parsed from untrusted files and handshakes: anything either parses into
    a machine within bounds or raises SpecError naming a field, never anything else."""
    try:
        spec = parse_spec(data)  # type: ignore[arg-type]
    except SpecError as exc:
        assert exc.path is not None
        return
    assert spec.vcpus.count <= 1024 and all(v.size <= 64 << 30 for v in spec.vfio)


def test_an_after_by_bare_name_hints_the_device_id() -> None:
    machine = {"devices": [{"name": "nic0", "size": "1MiB"},
                           {"name": "nic1", "size": "1MiB", "after": ["nic0"]}]}
    with pytest.raises(SpecError, match=r"'nic0' is not a device of this machine "
                                        r"\(did you mean 'vfio/nic0'\?\)"):
        parse_spec(machine)
    machine["devices"][1]["after"] = ["vfio/nci0"]  # a typo: the closest id
    with pytest.raises(SpecError, match=r"did you mean 'vfio/nic0'"):
        parse_spec(machine)


def test_decimal_and_binary_units_mean_what_they_say() -> None:
    """One convention (docs: spec.py, README): MB is 10^6 bytes, MiB 2^20, as written."""
    assert parse_quantity("32 MB", "x") == 32_000_000
    assert parse_quantity("32MiB", "x") == 32 << 20
    assert parse_quantity("1.5GB", "x") == 1_500_000_000
    assert parse_quantity("2GiB/s", "x", per_second=True) == 2 << 30
    assert parse_quantity("4 kib", "x") == 4096 and parse_quantity("4KB", "x") == 4000


def test_guest_ram_is_ranges_of_32_mib_and_needs_kvm_vcpus() -> None:
    spec = parse_spec({"vcpus": {"count": 2, "backend": "kvm"}, "ram": {"size": "100MiB"}})
    assert spec.live and spec.ram is not None
    ranges = [d for d in spec.table(lambda *_: 0) if d.backend is Backend.GUEST_RAM]
    assert [d.id for d in ranges] == ["ram/0", "ram/1", "ram/2", "ram/3"]
    assert [d.ram for d in ranges] == [(0, 32 << 20), (32 << 20, 32 << 20), (64 << 20, 32 << 20),
                                       (96 << 20, 4 << 20)]
    assert all(d.shape is Shape.STREAM and d.stream is not None for d in ranges)
    assert parse_spec(spec.to_dict()) == spec


@pytest.mark.parametrize(("ram", "vcpus", "message"), [
    ({"size": "1MiB", "huge": 1}, {"count": 1, "backend": "kvm"}, "ram.huge: unknown field"),
    ({}, {"count": 1, "backend": "kvm"}, "ram.size: is required"),
    ({"size": 4097 * 256}, {"count": 1, "backend": "kvm"}, "not a multiple of the 4096 B page"),
    ({"size": "512KiB"}, {"count": 1, "backend": "kvm"}, "must be from 1 MiB to 64 GiB"),
    ({"size": "65GiB"}, {"count": 1, "backend": "kvm"}, "must be from 1 MiB to 64 GiB"),
    ({"size": "64MiB"}, {"count": 4}, "runs a guest on kvm vCPUs"),
    ({"size": "64MiB"}, {"count": 0, "backend": "kvm"}, "runs a guest on kvm vCPUs"),
])
def test_bad_guest_ram_is_refused_naming_the_field(ram: dict, vcpus: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({"vcpus": vcpus, "ram": ram, "devices": [{"name": "n", "size": 1}]})
