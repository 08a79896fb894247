"""The one error hierarchy of devstate.

Every failure a caller can act on is a subclass of :class:`DevstateError`::

    DevstateError
     +-- SpecError            a machine spec is invalid (names the field and the reason)
     +-- ArenaError           the shared-memory arena cannot be created, sized or used
     +-- WorkerLost           a pool worker died (carries its index and exit code)
     +-- WorkerFailed         a worker raised while doing its work (carries the remote text)
     +-- DeviceError          a device refused an operation (VFIO errno, invalid record...)
     +-- ProtocolError        bytes from a channel are malformed (names the field)
     |    +-- IntegrityError  a checksum or a device digest does not match
     +-- ChannelError         a channel could not be opened or broke during a migration
     +-- MigrationFailed      the migration failed; the source resumed (carries the cause)

Messages name the failing operation first ("put cpu/3: ..."), like Firecracker's error
enums; the cause, where there is one, is chained with ``raise ... from``.
"""

from __future__ import annotations

from asyncio import CancelledError


class DevstateError(Exception):
    """Base class of every error devstate raises on purpose."""


class SpecError(DevstateError):
    """Raised when a machine spec is invalid; ``path`` is the field, e.g. ``devices[2].size``,
    and ``file`` the spec file when there is one: the message reads ``file: field: reason``."""

    def __init__(self, path: str, reason: str, *, file: str = "") -> None:
        where = ": ".join(part for part in (file, path) if part)
        super().__init__(f"{where}: {reason}" if where else reason)
        self.path = path
        self.reason = reason
        self.file = file


class ArenaError(DevstateError):
    """Raised when the shared-memory arena cannot be created, attached, sized or closed."""


class WorkerLost(DevstateError):
    """Raised when a pool worker process exits while the pool still needs it."""

    def __init__(self, worker: int, exitcode: int | None, doing: str = "") -> None:
        what = f" while {doing}" if doing else ""
        super().__init__(f"worker {worker} was lost{what} (exit code {exitcode})")
        self.worker = worker
        self.exitcode = exitcode


class WorkerFailed(DevstateError):
    """Raised when a worker reports an error from its own work; the remote text is kept."""

    def __init__(self, worker: int, message: str) -> None:
        super().__init__(f"worker {worker}: {message}")
        self.worker = worker
        self.message = message


class DeviceError(DevstateError):
    """Raised when a device refuses an operation (an invalid VFIO arc, a bad record...)."""

    def __init__(self, device: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device
        self.errno = errno


class ProtocolError(DevstateError):
    """Raised when bytes read from a channel are malformed; ``field`` names what was wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class IntegrityError(ProtocolError):
    """Raised when a packet checksum or a device's end-of-state digest does not match.

    A ProtocolError too (the bytes from the wire are bad), told apart so that a caller can
    count corruption separately from malformed input.
    """


class ChannelError(DevstateError):
    """Raised when a channel cannot be opened, or closes or breaks during a migration."""


class SourceAborted(ChannelError):
    """The source ended the migration (ABORT: it failed, or was cancelled or interrupted);
    the source says why to whoever started it."""


class PeerFailed(ChannelError):
    """The peer said the migration failed (a FAILED message); ``not_running`` when it also
    said it runs none of the VM's devices, so this side may resume them."""

    def __init__(self, reason: str, *, not_running: bool = False) -> None:
        super().__init__(f"peer failed: {reason}")
        self.not_running = not_running


class MigrationFailed(DevstateError):
    """Raised by the source when a migration failed and the VM resumed on the source."""


def describe(exc: BaseException) -> str:
    """An exception as one line for a person: its message, or its kind when it has none."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return describe(exc.exceptions[0])
    text = str(exc)
    if isinstance(exc, CancelledError):
        return "cancelled" + (f" ({text})" if text else "")
    return text or type(exc).__name__


class DowntimeLimitUnmet(MigrationFailed):
    """The expected downtime exceeds the limit: no switchover happened, the VM runs on.

    ``critical_path`` names what sets the downtime (the cost model's largest terms).
    """

    def __init__(self, downtime_limit_ms: float, expected_ms: float, critical_path: str) -> None:
        self.downtime_limit_ms = downtime_limit_ms
        self.expected_ms = expected_ms
        self.critical_path = critical_path
        super().__init__(f"expected downtime {expected_ms:.0f} ms exceeds the limit of "
                         f"{downtime_limit_ms:.0f} ms; no switchover, the VM keeps running. "
                         f"Critical path: {critical_path}")


class DowntimeOverrun(MigrationFailed):
    """Stop-and-copy passed the downtime limit and the policy was to abort: the destination
    discarded, the source resumed with its state unchanged."""

