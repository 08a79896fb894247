"""The migration timeline: reports read from JSON, drawn headless as PNG pictures."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devstate.errors import DevstateError
from devstate.report.timeline import _figure, draw_timeline, load_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def vcpu(n: int, workers: int) -> dict[str, Any]:
    """vCPU ``n``: about 0.1 ms per get and per put, its worker's vCPUs one after another."""
    w, k = n % workers, n // workers
    save = 0.5 + 0.1 * k
    load = 2.0 + 0.1 * k
    return {"id": f"cpu/{n}", "bytes": 6900, "source_worker": w, "dest_worker": w,
            "save_start_ms": save, "save_end_ms": save + 0.1, "load_start_ms": load,
            "load_end_ms": load + 0.08, "load_done_ms": load + 0.1, "verified": True,
            "channel": w, "save_ms": 0.1, "load_ms": 0.1}


def stream(name: str, worker: int, channel: int, save: tuple[float, float],
           load: tuple[float, float, float]) -> dict[str, Any]:
    return {"id": f"vfio/{name}", "bytes": 4 << 20, "source_worker": worker,
            "dest_worker": worker, "save_start_ms": save[0], "save_end_ms": save[1],
            "load_start_ms": load[0], "load_end_ms": load[1], "load_done_ms": load[2],
            "verified": True, "channel": channel, "save_ms": save[1] - save[0],
            "load_ms": load[2] - load[0]}


def report(mode: str = "concurrent", *, vcpus: int = 8, workers: int = 2,
           downtime_ms: float = 24.0, downtime_limit_ms: float | None = 20.0) -> dict[str, Any]:
    """A report shaped like ``MigrationReport.to_json()``: vCPUs spread over the workers,
    a precopied NIC (its load starts before the stop) on channel 0 and a GPU spread over
    all channels."""
    devices = [vcpu(n, workers) for n in range(vcpus)]
    devices.append(stream("nic", 0, 0, save=(-12.0, 9.0), load=(-11.5, 9.5, 10.0)))
    devices.append(stream("gpu", workers - 1, -1, save=(1.0, 18.0), load=(1.5, 18.5, 23.0)))
    return {"mode": mode, "workers": workers, "downtime_ms": downtime_ms, "expected_ms": 21.5,
            "critical_path": "vfio/gpu", "downtime_limit_ms": downtime_limit_ms,
            "overrun_ms": max(0.0, downtime_ms - downtime_limit_ms) if downtime_limit_ms else 0.0,
            "total_bytes": sum(d["bytes"] for d in devices), "verified": True,
            "devices": devices}


def demo() -> dict[str, Any]:
    """What ``devstate demo --json`` prints: a report per mode beside scalars."""
    return {"sequential": report("sequential", workers=1, downtime_ms=45.0, downtime_limit_ms=None),
            "concurrent": report(), "speedup": 1.875, "vcpu_backend": "sim",
            "vcpu_backend_reason": "no /dev/kvm"}


def png_size(path: Path) -> tuple[int, int]:
    """Check that ``path`` is a PNG of some substance; return its (width, height)."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000
    # The first chunk is IHDR: length, type, then width and height as big-endian u32.
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (height, width)
    return width, height


def texts(reports: list[dict[str, Any]]) -> list[str]:
    """Every text drawn in the panels (bar and marker labels) after unfitting ones went."""
    figure = _figure(reports, None)
    return [t.get_text().strip() for ax in figure.axes for t in ax.texts]


def test_draws_a_report(tmp_path: Path) -> None:
    out = tmp_path / "timeline.png"
    draw_timeline([report()], out, title="synthetic")
    width, height = png_size(out)
    assert width > height > 300


def test_draws_a_demo_one_panel_per_mode(tmp_path: Path) -> None:
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(demo()))
    reports = load_reports(path)
    assert [r["mode"] for r in reports] == ["sequential", "concurrent"]
    single, both = tmp_path / "single.png", tmp_path / "both.png"
    draw_timeline(reports[1:], single)
    draw_timeline(reports, both)
    assert png_size(both)[1] > png_size(single)[1]


def test_loads_a_single_report(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report()))
    assert load_reports(path) == [report()]


def test_labels_merged_vcpus_fitting_streams_and_markers() -> None:
    drawn = texts([report(vcpus=1024, workers=4)])
    assert not any(t.startswith("cpu/") for t in drawn)  # never one bar per vCPU
    assert "cpu \u00d7256" in drawn
    assert "vfio/gpu" in drawn and "vfio/nic" in drawn
    assert "limit 20 ms" in drawn and "resume" in drawn and "expected" in drawn
    assert not any("limit" in t for t in texts([report(downtime_limit_ms=None)]))


def test_a_live_guests_ram_rounds_get_a_row_before_the_stop() -> None:
    live = report()
    live["ram"] = {"rounds": 3, "rounds_ms": [-900.0, -120.0, -15.0]}
    figure = _figure([live], None)
    drawn = [t.get_text().strip() for ax in figure.axes for t in ax.texts]
    assert "round 1" in drawn and "round 2" in drawn  # round 3 is too short for its label
    assert figure.axes[0].get_xlim()[0] < -900  # the axis reaches back to round 1
    assert "RAM rounds" in [t.get_text() for t in figure.axes[0].get_yticklabels()]
    live["ram"]["rounds_ms"] = [-900.0, 40.0]
    with pytest.raises(DevstateError, match=r"ram\.rounds_ms: not a list of times before"):
        draw_timeline([live], "/nonexistent/never.png")


def test_drops_labels_wider_than_their_bars() -> None:
    tiny = report()
    tiny["devices"].append(stream("tiny-device-name", 0, 0, save=(5.0, 5.01),
                                  load=(5.02, 5.03, 5.04)))
    assert "vfio/tiny-device-name" not in texts([tiny])


def test_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "1.png", tmp_path / "2.png"
    draw_timeline([report()], first)
    draw_timeline([report()], second)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("content", [
    "not json at all",
    "[1, 2, 3]",
    json.dumps({"speedup": 2.0}),
    json.dumps({"mode": "concurrent", "devices": [{"id": "cpu/0"}]}),
    json.dumps({**report(), "devices": [{**vcpu(0, 1), "load_end_ms": "soon"}]}),
])
def test_wrong_json_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "wrong.json"
    path.write_text(content)
    with pytest.raises(DevstateError, match="wrong.json"):
        load_reports(path)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DevstateError, match="absent.json"):
        load_reports(tmp_path / "absent.json")


def test_unwritable_output_raises(tmp_path: Path) -> None:
    with pytest.raises(DevstateError, match="cannot write"):
        draw_timeline([report()], tmp_path / "no-such-dir" / "t.png")


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, devstate.report.timeline; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_draws_a_real_migration(tmp_path: Path, run: Any) -> None:
    from devstate.config.params import MigrationParams
    from devstate.config.spec import parse_spec
    from devstate.migration.local import destination
    from devstate.migration.source import SourceVM

    spec = parse_spec({"seed": 1, "vcpus": {"count": 16},
                       "devices": [{"name": "nic", "size": "4MiB"}]})

    async def go() -> Any:
        async with SourceVM(spec, MigrationParams()) as source, \
                destination(spec, MigrationParams()) as dest:
            return await source.migrate(dest.address, compare_digests=True)

    migration = run(go())
    path = tmp_path / "report.json"
    path.write_text(json.dumps(migration.to_json()))
    out = tmp_path / "real.png"
    draw_timeline(load_reports(path), out, title="16 vCPUs and a 4 MiB NIC")
    png_size(out)


def test_devstate_report_draws_a_demo_file_and_says_what_is_wrong(tmp_path: Path) -> None:
    """The command line: ``devstate report FILE.json --png OUT.png``."""
    import subprocess
    import sys

    source = tmp_path / "demo.json"
    source.write_text(json.dumps(demo()))
    out = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-m", "devstate", "report", str(source), "--png",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(PNG_MAGIC) and png_size(out)[1] > 400
    source.write_text("[1, 2]")
    done = subprocess.run([sys.executable, "-m", "devstate", "report", str(source), "--png",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and str(source) in done.stderr
