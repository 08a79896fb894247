"""The timeline of a finished migration, drawn as a PNG, SVG or PDF (the file's suffix).

Input is the plain JSON of a report (``MigrationReport.to_json()``, ``devstate migrate
--json``) or of a demo (``devstate demo --json``: one report per mode). Each report becomes
a panel with a row per source worker (get), per destination worker (transfer+put, then
complete) and per data channel (what rode it), all on one time axis in ms from the
source's stop, with the resume, the estimate and the downtime limit as vertical lines. A
live guest's RAM precopy adds a row on top: its rounds, before the stop.

It runs anywhere, headless: matplotlib's Agg canvas is used directly (never pyplot, so no
display and no global figure state), and matplotlib is imported only when drawing so that
importing devstate stays fast.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devstate.errors import DevstateError
from devstate.report.migration import SHARDED_MODE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

GET, TRANSFER, COMPLETE, ROUND = "get", "transfer+put", "complete", "RAM precopy round"
_COLORS = {GET: "#4c72b0", TRANSFER: "#dd8452", COMPLETE: "#55a868", ROUND: "#8172b3"}
_SPREAD = -1  # a stream's channel when its packets went over all channels

_DEVICE_NUMBERS = ("save_start_ms", "save_end_ms", "load_start_ms", "load_end_ms",
                   "load_done_ms")
_DEVICE_INTS = ("source_worker", "dest_worker", "channel")

_DPI = 110
_WIDTH_IN = 12.0
_ROW_IN = 0.45    # height of one row
_PANEL_IN = 0.9   # a panel's title and axis labels
_FIGURE_IN = 0.8  # the legend below, the title on top
_BAND = 0.8       # the share of a row's height its bars fill; the rest separates rows
_LABEL_PT = 7
# The formats a picture may be written in, by the suffix of its file name (matplotlib's
# Agg canvas renders PNG; SVG and PDF have backends of their own that need no display).
FORMATS = ("png", "svg", "pdf")


def load_reports(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the reports in a JSON file: one report, or a demo's (one per mode, in order).

    Raises :class:`DevstateError` naming the file when it cannot be read, is not JSON, or
    holds no report or a report without the fields a timeline needs.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DevstateError(f"timeline: cannot read {os.fspath(path)}: "
                            f"{e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DevstateError(f"timeline: {os.fspath(path)} is not JSON: {e}") from e
    if isinstance(data, dict) and "devices" in data:
        reports = [data]
    elif isinstance(data, dict):
        # A demo: reports keyed by mode beside scalars such as "speedup".
        reports = [v for v in data.values() if isinstance(v, dict) and "devices" in v]
    else:
        reports = []
    if not reports:
        raise DevstateError(f"timeline: {os.fspath(path)} holds no migration report (the "
                            f"JSON of 'devstate migrate --json' or 'devstate demo --json')")
    for report in reports:
        _check(report, os.fspath(path))
    return reports


def draw_timeline(reports: list[dict[str, Any]], out: str | os.PathLike[str], *,
                  title: str | None = None) -> None:
    """Draw the reports (as :func:`load_reports` returns them) one panel each, stacked on
    a shared time axis, and write the picture to ``out`` in the format its suffix names
    (:data:`FORMATS`); ``title`` goes on top.

    Raises :class:`DevstateError` when a report lacks a field, ``out`` has another suffix,
    or it cannot be written.
    """
    kind = picture_format(out)
    if not reports:
        raise DevstateError("timeline: no report to draw")
    for i, report in enumerate(reports):
        _check(report, f"reports[{i}]")
    figure = _figure(reports, title)
    try:
        figure.savefig(out, format=kind, dpi=_DPI)
    except OSError as e:
        raise DevstateError(f"timeline: cannot write {os.fspath(out)}: "
                            f"{e.strerror or e}") from e


def picture_format(out: str | os.PathLike[str]) -> str:
    """The format ``out``'s suffix names; a :class:`DevstateError` for any other suffix,
    rather than bytes of one format under another's name."""
    kind = os.path.splitext(os.fspath(out))[1].lstrip(".").lower()
    if kind not in FORMATS:
        raise DevstateError(f"timeline: cannot write {os.fspath(out)}: the name must end in "
                            f"{', '.join('.' + f for f in FORMATS)}")
    return kind


def _check(report: Any, where: str) -> None:
    """Raise DevstateError unless ``report`` has every field the drawing reads."""
    def fail(field: str, reason: str) -> None:
        raise DevstateError(f"timeline: {where}: {field}: {reason}")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    if not isinstance(report, dict):
        fail("report", "not a JSON object")
    if not isinstance(report.get("mode"), str):
        fail("mode", "missing or not a string")
    for field in ("downtime_ms", "expected_ms"):
        if not number(report.get(field)):
            fail(field, "missing or not a number")
    if not (report.get("downtime_limit_ms") is None or number(report["downtime_limit_ms"])):
        fail("downtime_limit_ms", "not a number")
    if not isinstance(report.get("workers"), int):
        fail("workers", "missing or not an integer")
    if not isinstance(report.get("devices"), list):
        fail("devices", "missing or not a list")
    ram = report.get("ram")
    if ram is not None and not (isinstance(ram, dict) and isinstance(
            ram.get("rounds_ms", []), list) and all(number(t) and t <= 0
                                                   for t in ram.get("rounds_ms", []))):
        fail("ram.rounds_ms", "not a list of times before the stop")
    for i, device in enumerate(report["devices"]):
        if not isinstance(device, dict) or not isinstance(device.get("id"), str):
            fail(f"devices[{i}]", "not an object with an 'id'")
        for field in _DEVICE_NUMBERS:
            if not number(device.get(field)):
                fail(f"devices[{i}].{field}", "missing or not a number")
        for field in _DEVICE_INTS:
            if not isinstance(device.get(field), int):
                fail(f"devices[{i}].{field}", "missing or not an integer")


@dataclass(frozen=True, slots=True)
class _Item:
    """Bars that share a lane of a row: one device's steps, or a merged group of vCPUs'."""

    segments: tuple[tuple[str, float, float], ...]  # (step, start, end), in time order
    label: str

    @property
    def start(self) -> float:
        return self.segments[0][1]

    @property
    def end(self) -> float:
        return self.segments[-1][2]


def _is_vcpu(device: dict[str, Any]) -> bool:
    return str(device["id"]).startswith("cpu/")


def _vcpu_items(vcpus: list[dict[str, Any]], steps: tuple[tuple[str, str, str], ...]
                ) -> list[_Item]:
    """One item per step for a group of vCPUs: from the earliest start to the latest end.

    Hundreds of bars a fraction of a pixel wide say nothing; the group's extent does. The
    steps overlap across vCPUs (one completes while the next is put), so each is an item
    of its own and may take a lane of its own.
    """
    if not vcpus:
        return []
    label = f"cpu \u00d7{len(vcpus)}"
    return [_Item(((step, min(d[begin] for d in vcpus), max(d[end] for d in vcpus)),), label)
            for step, begin, end in steps]


@dataclass(frozen=True, slots=True)
class _Row:
    """One row of a panel: its group (source, dest, channel), its name and its bars."""

    group: str
    name: str
    items: list[_Item]


def _rows(report: dict[str, Any]) -> list[_Row]:
    """The panel's rows, top to bottom: source workers, destination workers, channels."""
    devices = report["devices"]
    streams = [d for d in devices if not _is_vcpu(d)]
    vcpus = [d for d in devices if _is_vcpu(d)]
    rows: list[_Row] = []
    starts = list((report.get("ram") or {}).get("rounds_ms", ()))
    if starts:  # each round until the next began; the last until the stop
        rows.append(_Row("source", "RAM rounds", [
            _Item(((ROUND, start, end),), f"round {k + 1}")
            for k, (start, end) in enumerate(zip(starts, [*starts[1:], 0.0], strict=True))]))

    sources = sorted(set(range(report["workers"])) | {d["source_worker"] for d in devices})
    for w in sources:
        items = [_Item(((GET, d["save_start_ms"], d["save_end_ms"]),), d["id"])
                 for d in streams if d["source_worker"] == w]
        items += _vcpu_items([d for d in vcpus if d["source_worker"] == w],
                             ((GET, "save_start_ms", "save_end_ms"),))
        rows.append(_Row("source", f"source w{w}", items))

    dests = sorted(set(range(report["workers"])) | {d["dest_worker"] for d in devices})
    for w in dests:
        items = [_Item(((TRANSFER, d["load_start_ms"], d["load_end_ms"]),
                        (COMPLETE, d["load_end_ms"], d["load_done_ms"])), d["id"])
                 for d in streams if d["dest_worker"] == w]
        items += _vcpu_items([d for d in vcpus if d["dest_worker"] == w],
                             ((TRANSFER, "load_start_ms", "load_end_ms"),
                              (COMPLETE, "load_end_ms", "load_done_ms")))
        rows.append(_Row("dest", f"dest w{w}", items))

    # Channels last, spread after the numbered ones: what each data channel carried.
    for channel in sorted({d["channel"] for d in devices}, key=lambda c: (c == _SPREAD, c)):
        items = [_Item(((TRANSFER, d["load_start_ms"], d["load_end_ms"]),), d["id"])
                 for d in streams if d["channel"] == channel]
        items += _vcpu_items([d for d in vcpus if d["channel"] == channel],
                             ((TRANSFER, "load_start_ms", "load_end_ms"),))
        rows.append(_Row("channel", "spread" if channel == _SPREAD else f"channel {channel}",
                         items))
    return rows


def _lanes(items: list[_Item]) -> list[list[_Item]]:
    """Items packed into as few lanes as keep them from overlapping (first fit by start)."""
    lanes: list[list[_Item]] = []
    for item in sorted(items, key=lambda i: (i.start, i.end, i.label)):
        for lane in lanes:
            if lane[-1].end <= item.start:
                lane.append(item)
                break
        else:
            lanes.append([item])
    return lanes


def _panel_title(report: dict[str, Any]) -> str:
    shape = " (not a real guest shape)" if report["mode"] == SHARDED_MODE else ""
    text = (f"{report['mode']}{shape}, {report['workers']} worker(s): downtime "
            f"{report['downtime_ms']:.1f} ms (expected {report['expected_ms']:.1f} ms")
    limit = report.get("downtime_limit_ms")
    if limit is not None:
        overrun = report["downtime_ms"] - limit
        text += f", limit {limit:g} ms" + (f", overrun {overrun:.1f} ms" if overrun > 0
                                           else ", met")
    kvm = report.get("kvm")
    if kvm:
        text += (f"; kvm: {kvm['vms_per_side']} VM/side, {kvm['engine']} x"
                 f"{kvm['threads']} thread(s)")
    return text + ")"


def _time_range(reports: list[dict[str, Any]]) -> tuple[float, float]:
    """The shared x range: the stop, every device's span and every marker, padded."""
    lo, hi = 0.0, 0.0
    for report in reports:
        for d in report["devices"]:
            lo = min(lo, d["save_start_ms"], d["load_start_ms"])
            hi = max(hi, d["save_end_ms"], d["load_done_ms"], d["load_end_ms"])
        lo = min(lo, *(report.get("ram") or {}).get("rounds_ms", [0.0]))
        hi = max(hi, report["downtime_ms"], report["expected_ms"],
                 report.get("downtime_limit_ms") or 0.0)
    pad = (hi - lo) * 0.02 or 1.0
    return lo - pad, hi + pad


def _figure(reports: list[dict[str, Any]], title: str | None) -> Figure:
    """The whole picture, laid out and with only the bar labels that fit their bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [_rows(report) for report in reports]
    height = _FIGURE_IN + sum(_PANEL_IN + _ROW_IN * len(rows) for rows in panels)
    figure = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False,
                           height_ratios=[max(1, len(rows)) for rows in panels])[:, 0]
    lo, hi = _time_range(reports)
    labels: list[_Label] = []
    for ax, report, rows in zip(axes, reports, panels, strict=True):
        ax.set_title(_panel_title(report), loc="left", fontsize=9)
        _draw_rows(ax, rows, labels)
        _draw_markers(ax, report, (lo + hi) / 2)
    axes[-1].set_xlim(lo, hi)
    axes[-1].set_xlabel("ms from stop")
    _draw_legend(figure, reports)
    if title:
        figure.suptitle(title)
    _keep_labels_that_fit(figure, labels)
    return figure


# A bar's label, with the bar's start, end and height in rows: kept only if it fits.
_Label = tuple["Text", float, float, float]


def _draw_rows(ax: Axes, rows: list[_Row], labels: list[_Label]) -> None:
    """One row per worker or channel: its bars in lanes, labelled, groups ruled apart."""
    for y, row in enumerate(rows):
        lanes = _lanes(row.items)
        for k, lane in enumerate(lanes):
            bar = _BAND / len(lanes)
            center = y - _BAND / 2 + bar * (k + 0.5)
            for item in lane:
                for step, start, end in item.segments:
                    # An edge in the bar's own color keeps a zero-length step visible.
                    ax.barh(center, end - start, left=start, height=bar * 0.9,
                            color=_COLORS[step], edgecolor=_COLORS[step], linewidth=0.6)
                _, start, end = item.segments[0]
                text = ax.text((start + end) / 2, center, item.label, ha="center",
                               va="center", fontsize=_LABEL_PT, clip_on=True)
                text.set_in_layout(False)
                labels.append((text, start, end, bar * 0.9))
    ax.set_yticks(range(len(rows)), [row.name for row in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top
    for y in range(1, len(rows)):
        if rows[y].group != rows[y - 1].group:
            ax.axhline(y - 0.5, color="0.6", linewidth=0.8)
    ax.grid(axis="x", color="0.85", linewidth=0.6)
    ax.set_axisbelow(True)


def _draw_markers(ax: Axes, report: dict[str, Any], middle: float) -> None:
    """Stop, resume, estimate and limit as vertical lines, labelled at the top of the
    panel, one height each so that they never cover each other when they fall close
    together, and on the side with more room (``middle`` is the time axis' middle)."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    markers: list[tuple[float, str, dict[str, Any]]] = [
               (0.0, "stop", dict(color="0.4", linewidth=0.8)),
               (report["downtime_ms"], "resume", dict(color="black", linewidth=1.2)),
               (report["expected_ms"], "expected",
                dict(color="0.3", linewidth=1.2, linestyle=":"))]
    if (limit := report.get("downtime_limit_ms")) is not None:
        markers.append((limit, f"limit {limit:g} ms",
                        dict(color="red", linewidth=1.2, linestyle="--")))
    for n, (x, name, style) in enumerate(markers):
        ax.axvline(x, **style)
        left = x > middle
        ax.text(x, 0.98 - 0.1 * n, f"{name} " if left else f" {name}", transform=top,
                ha="right" if left else "left", va="top",
                fontsize=_LABEL_PT, color=style["color"],
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=0.5))


def _draw_legend(figure: Figure, reports: list[dict[str, Any]]) -> None:
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    steps = [GET, TRANSFER, COMPLETE]
    if any((report.get("ram") or {}).get("rounds_ms") for report in reports):
        steps.append(ROUND)
    handles: list[Artist] = [Patch(color=_COLORS[step], label=step) for step in steps]
    handles += [Line2D([], [], color="black", linewidth=1.2, label="resume (downtime)"),
                Line2D([], [], color="0.3", linewidth=1.2, linestyle=":", label="expected")]
    if any(report.get("downtime_limit_ms") is not None for report in reports):
        handles.append(Line2D([], [], color="red", linewidth=1.2, linestyle="--",
                              label="downtime limit"))
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles),
                  fontsize=8, frameon=False)


def _keep_labels_that_fit(figure: Figure, labels: list[_Label]) -> None:
    """A label stays only where it fits inside its bar; that is known once laid out."""
    figure.canvas.draw()  # lays the figure out; extents then come from its renderer
    for text, start, end, rows_high in labels:
        ax = text.axes
        assert ax is not None  # every label was drawn on a panel
        (x0, y0), (x1, y1) = ax.transData.transform([(start, 0.0), (end, rows_high)])
        box = text.get_window_extent()
        if box.width + 4 > abs(x1 - x0) or box.height > abs(y1 - y0):
            text.remove()
