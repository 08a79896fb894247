"""Open files: make sure a machine's migration has the descriptors it needs, before anything
starts.

Runs in: the ``devstate`` command, before its pools start (their processes inherit the
limit). A process that runs out half-way fails inside a library (a pipe for a worker, a
socket for a channel) with a bare EMFILE, and may leave a started pool or a shared-memory
arena behind; checked first, the failure is one line naming ``ulimit -n``.
"""

from __future__ import annotations

import resource

from devstate.config.spec import Backend, MachineConfig
from devstate.errors import DevstateError

# What a side needs besides its devices: the interpreter and libraries, the arena, each
# worker's pipes, sentinels and links, the data and main channels, the QMP socket.
BASE_FILES = 128
PER_WORKER_FILES = 12
PER_VFIO_FILES = 6   # the model process's pipes, its data sessions, its sockets
OPEN_FILES = resource.RLIMIT_NOFILE


def files_needed(spec: MachineConfig, workers: int) -> int:
    """A generous bound on the descriptors one process of a side holds at once: the VM's
    owner holds one per KVM vCPU (the KVM VM and its vCPUs stay with one process)."""
    vcpus = spec.vcpus.count if spec.vcpus.backend is Backend.KVM else 0
    return BASE_FILES + PER_WORKER_FILES * workers + PER_VFIO_FILES * len(spec.vfio) + vcpus


def ensure_open_files(spec: MachineConfig, workers: int) -> None:
    """Raise this process's soft limit of open files to what ``spec`` needs, if the hard
    limit allows (as a shell's ``ulimit -n`` would); else :class:`DevstateError`."""
    needed = files_needed(spec, workers)
    soft, hard = resource.getrlimit(OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(OPEN_FILES, (needed, hard))
        return
    raise DevstateError(f"this machine needs about {needed} open files per process and "
                        f"the limit is {soft} (hard {hard}): raise it, e.g. `ulimit -n "
                        f"{needed}`")
