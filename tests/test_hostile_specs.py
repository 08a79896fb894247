"""Hostile machine specs (issue 18, items 4 and 5): every one is refused with one line
naming the file, the field and the reason, never a traceback, and a huge machine is
refused before anything starts. ``HOSTILE`` also seeds the spec fuzzers
(tests/test_fuzz_decoders.py and the hypothesis test below)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstate.cli.exits import Exit
from devstate.config.spec import MAX_VFIO_DEVICES, load_spec
from devstate.errors import SpecError
from tests.test_cli import devstate

_DEEP = 100_000  # far past the parsers' recursion limit
_NIC = '[[devices]]\nname = "a"\nsize = "1MiB"\n'

# file name -> (content, what the one line must say)
HOSTILE: dict[str, tuple[str, str]] = {
    "fractional-bandwidth.toml": (_NIC + "read_bandwidth = 0.5\n",
                                  "devices[0].read_bandwidth: must be at least 1"),
    "fractional-bandwidth.json": ('{"devices": [{"name": "a", "size": 4096, '
                                  '"write_bandwidth": 0.25}]}',
                                  "devices[0].write_bandwidth: must be at least 1"),
    "deep.json": ("[" * _DEEP + "]" * _DEEP, "nested too deeply"),
    "deep.toml": ("a = " + "[" * _DEEP + "]" * _DEEP, "nested too deeply"),
    "nested.json": ('{"devices": ' + "[" * 200 + "]" * 200 + "}", "nested deeper than"),
    "vcpu-cycle.toml": ('[vcpus]\ncount = 2\nafter = ["vfio/a"]\n' + _NIC + 'after = ["cpu/0"]\n',
                        "vcpus.after: dependency cycle: cpu/0 -> vfio/a -> cpu/0"),
    "infinite-size.json": ('{"devices": [{"name": "a", "size": Infinity}]}',
                           "devices[0].size: must be <="),
    "nan-size.json": ('{"devices": [{"name": "a", "size": NaN}]}', "devices[0].size: must be > 0"),
    "huge-size.json": ('{"devices": [{"name": "a", "size": 1' + "0" * 400 + "}]}",
                       "devices[0].size: must be <="),
    "huge-size-text.toml": (_NIC.replace('"1MiB"', '"1' + "0" * 400 + 'MiB"'),
                            "devices[0].size: must be <="),
    "huge-seed.json": ('{"seed": ' + "9" * 5000 + ', "vcpus": {"count": 1}}', "not valid JSON"),
    "huge-seed.toml": ("seed = " + "9" * 5000 + "\n[vcpus]\ncount = 1\n", "not valid TOML"),
    "deep-backend.json": ('{"vcpus": {"count": 1, "backend": ' + "[" * 12 + "]" * 12 + "}}",
                          "vcpus.backend: unknown backend"),
    "many-devices.toml": ("".join(f'[[devices]]\nname = "d{i}"\nsize = 4096\n'
                                  for i in range(2000)),
                          f"devices: 2000 devices: at most {MAX_VFIO_DEVICES}"),
}


def write(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(HOSTILE[name][0])
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_spec_is_one_spec_error_naming_file_and_field(
        tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert HOSTILE[name][1] in message


@pytest.mark.slow  # a process per spec, each importing the runtime
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_devstate_migrate_refuses_a_hostile_spec_in_one_line(tmp_path: Path, name: str) -> None:
    """Refused before any pool starts, so 2000 devices start no process at all."""
    path = write(tmp_path, name)
    done = devstate("migrate", "--spec", str(path), timeout=60)
    assert done.returncode == Exit.ERROR
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[:2000]
    assert str(path) in lines[0] and HOSTILE[name][1] in lines[0]


def test_the_refusal_is_also_valid_json_with_json(tmp_path: Path) -> None:
    done = devstate("migrate", "--spec", str(write(tmp_path, "vcpu-cycle.toml")), "--json")
    assert done.returncode == Exit.ERROR
    assert json.loads(done.stdout)["error"]["class"] == "SpecError"
