"""devstate: save and load a VM's device state concurrently during live migration.

Data flow (one migration, both sides on uvloop; see ARCHITECTURE.md)::

    source process                                   destination process
    --------------                                   -------------------
    SourceVM (coordinator)  ====== main channel ====== IncomingVM (coordinator)
      WorkerPool                                        WorkerPool
        worker i: owns devices, arena partition i        worker i: owns devices
          get -> arena slot -> data channel i  ------->    recv_into arena slot -> put
        vfio-sim model processes (one per device)         vfio-sim model processes

Public API: specs (:mod:`devstate.spec`), the two sides (:class:`SourceVM`,
:class:`IncomingVM`), a one-host migration (:func:`migrate_locally`), and the errors.
"""

from devstate.errors import (
    ArenaError,
    ChannelError,
    DeviceError,
    DevstateError,
    IntegrityError,
    MigrationFailed,
    ProtocolError,
    SpecError,
    WorkerFailed,
    WorkerLost,
)
from devstate.settings import Settings
from devstate.spec import MachineSpec, load_spec, parse_spec

__all__ = [
    "ArenaError", "ChannelError", "DeviceError", "DevstateError", "IntegrityError",
    "MachineSpec", "MigrationFailed", "ProtocolError", "Settings", "SpecError",
    "WorkerFailed", "WorkerLost", "load_spec", "parse_spec",
]
