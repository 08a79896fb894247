"""devstate: save and load a VM's device state concurrently during live migration.

Data flow (one migration, both sides on uvloop; see ARCHITECTURE.md)::

    source process                                   destination process
    --------------                                   -------------------
    SourceVM (coordinator)  ====== main channel ====== IncomingVM (coordinator)
      WorkerPool                                        WorkerPool
        worker i: owns devices, arena partition i        worker i: owns devices
          get -> arena slot -> data channel i  ------->    recv_into arena slot -> put
        vfio-sim model processes (one per device)         vfio-sim model processes

Public API: specs (:mod:`devstate.config.spec`), the two sides (:class:`SourceVM`,
:class:`IncomingVM`), a one-host migration (:func:`migrate_locally`), and the errors.
"""

import importlib
from typing import Any

# Exports are loaded on first use: device-model processes import devstate.devices.* and
# must not pay for the runtime's imports at start-up.
_EXPORTS = {
    "ArenaError": "devstate.errors", "ChannelError": "devstate.errors",
    "DeviceError": "devstate.errors", "DevstateError": "devstate.errors",
    "IntegrityError": "devstate.errors", "MigrationFailed": "devstate.errors",
    "ProtocolError": "devstate.errors", "SpecError": "devstate.errors",
    "WorkerFailed": "devstate.errors", "WorkerLost": "devstate.errors",
    "MigrationParams": "devstate.config.params", "MachineConfig": "devstate.config.spec",
    "load_spec": "devstate.config.spec", "parse_spec": "devstate.config.spec",
    "SourceVM": "devstate.migration.source", "IncomingVM": "devstate.migration.destination",
    "migrate_locally": "devstate.migration.local",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'devstate' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
