"""A live progress display of one migration, for a person at a terminal.

Runs in: the ``devstate migrate`` / ``demo`` process, on its loop, beside the migration.

One line, redrawn ten times a second on standard error (standard output keeps the report):
the migration's status in plain words (QEMU's status names, such as ``device`` for the
stop-and-copy, are for controllers: :data:`SAID`), devices saved and state read on the
source (the destination loads it behind), a live guest's RAM precopy round, and once the
VM has stopped the time since the stop against the downtime limit (or the estimate,
without a limit). The display is ``rich``'s: it knows terminal widths and cleans up after
itself; off a terminal, or with ``--json``, nothing is drawn at all (:func:`wanted`).
Drawing costs one small request per worker every ``REFRESH_S``, during the stop too: a
person watching accepts that; benchmarks and controllers (``--json``, no terminal) never pay it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console
from rich.live import Live
from rich.text import Text

from devstate.errors import DevstateError
from devstate.lifecycle import background
from devstate.phase import Phase
from devstate.report.ram import RamReport

REFRESH_S = 0.1

# Each phase as a person reads it (a phase not named here shows QEMU's name).
SAID = {
    Phase.NONE: "starting",
    Phase.SETUP: "setting up",
    Phase.ACTIVE: "VM running",
    Phase.DEVICE: "VM paused, copying",
    Phase.COMPLETED: "completed",
    Phase.FAILED: "failed",
    Phase.CANCELLING: "cancelling",
    Phase.CANCELLED: "cancelled",
}


@dataclass(frozen=True, slots=True)
class SaveProgress:
    """How far the save of a migration is: devices whose last byte was read, and state
    bytes read (records' and precopy's re-sent dirty bytes included, so it may pass
    ``stream_bytes``, the streams' state alone)."""

    devices_done: int
    devices: int
    bytes_read: int
    stream_bytes: int


class Migrating(Protocol):
    """What the line follows: a migration's source side."""

    @property
    def expected_ms(self) -> float | None:
        """The expected downtime, once estimated."""

    async def progress(self) -> SaveProgress:
        """The save so far."""

    def ram_progress(self) -> RamReport | None:
        """A live guest's RAM precopy so far (None: none under way)."""


def wanted(json_output: bool) -> bool:
    """Whether to draw: a person is watching standard error, and no machine reads stdout."""
    return not json_output and sys.stderr.isatty()


class MigrationProgress:
    """The state the line shows; :meth:`status` is a ``migrate(on_status=...)`` callback."""

    def __init__(self, downtime_limit_ms: float | None) -> None:
        self.downtime_limit_ms = downtime_limit_ms
        self.state = Phase.SETUP
        self.stopped_at: float | None = None
        self.saved: SaveProgress | None = None
        self.expected_ms: float | None = None
        self.ram: RamReport | None = None

    def status(self, state: Phase) -> None:
        """A change of the migration's phase."""
        self.state = state
        if state is Phase.DEVICE and self.stopped_at is None:
            self.stopped_at = time.monotonic()

    def line(self) -> Text:
        """The line as it stands now."""
        text = Text(f"{SAID.get(self.state, str(self.state)):<18}", style="bold")
        if self.saved is not None:
            s = self.saved
            # Bytes read are not a share of stream_bytes (records and re-sent dirty state
            # count too): the devices done are the fraction, the bytes a running count.
            text.append(f"  saved {s.devices_done} of {s.devices} devices, "
                        f"{s.bytes_read / 2**20:,.0f} MiB read")
        if self.ram is not None and self.stopped_at is None:
            r = self.ram
            text.append(f"  RAM round {r.rounds}, {r.remaining_bytes / 2**20:,.1f} MiB left, "
                        f"guest dirtying {r.dirty_rate:,.0f} pages/s")
        if self.stopped_at is not None:
            elapsed = (time.monotonic() - self.stopped_at) * 1e3
            deadline = self.downtime_limit_ms or self.expected_ms
            over = deadline is not None and elapsed > deadline
            said = f"  stopped {elapsed:,.0f} ms"
            if deadline is not None:
                kind = "limit" if self.downtime_limit_ms else "expected"
                said += f" of {deadline:,.0f} ms {kind}"
            text.append(said, style="red" if over else "green")
        return text


@contextlib.asynccontextmanager
async def following(source: Migrating, progress: MigrationProgress,
                    console: Console | None = None) -> AsyncIterator[None]:
    """Draw ``progress`` while the body runs, polling ``source`` for its save's progress."""
    console = console or Console(stderr=True)

    async def poll(live: Live) -> None:
        while True:
            if source.expected_ms is not None:
                progress.expected_ms = source.expected_ms
            with contextlib.suppress(DevstateError):  # a pool that is going away
                progress.saved = await source.progress()
            progress.ram = source.ram_progress()
            live.update(progress.line(), refresh=True)
            await asyncio.sleep(REFRESH_S)

    with Live(progress.line(), console=console, transient=True,
              auto_refresh=False) as live:
        async with background(poll(live)):
            yield
