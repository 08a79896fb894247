"""The machines ``devstate`` knows by itself: the built-in default, and whether KVM is usable."""

from __future__ import annotations

import argparse
import dataclasses
import os
from importlib import resources

from devstate.config.spec import Backend, MachineConfig, load_spec
from devstate.errors import DevstateError

DEFAULT_MACHINE = "default.toml"


def default_workers() -> int:
    """One worker per usable CPU (affinity-aware), at least one."""
    return max(1, len(os.sched_getaffinity(0)))


def load_default_machine() -> MachineConfig:
    """The built-in default machine of ``devstate demo``."""
    with resources.as_file(resources.files("devstate.config.machines") / DEFAULT_MACHINE) as path:
        return load_spec(path)


def kvm_usable() -> tuple[bool, str]:
    """Whether real KVM vCPUs can be used here, and why (for the demo's choice of backend)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    try:
        from devstate.devices.kvm.device import host_record_bytes

        host_record_bytes()  # creates and probes a VM: the whole path a worker takes
    except DevstateError as exc:
        return False, f"/dev/kvm opened, but a VM could not be set up: {exc}"
    return True, "/dev/kvm opened and a VM with an in-kernel irqchip was set up"


def demo_machine(args: argparse.Namespace) -> tuple[MachineConfig, str]:
    """The demo's machine: the default one, a live guest on real KVM vCPUs, when KVM works
    here; else its simulated vCPUs and devices without guest RAM, saying why."""
    if args.spec:
        spec = load_spec(args.spec)
        return spec, f"vCPU backend: {spec.vcpus.backend} (from {args.spec})"
    spec = load_default_machine()
    usable, why = kvm_usable()
    if not usable:
        spec = dataclasses.replace(spec, ram=None, vcpus=dataclasses.replace(
            spec.vcpus, backend=Backend.SIM_VCPU))
        why += "; no live guest: simulated vCPUs, no guest RAM"
    return spec, f"vCPU backend: {spec.vcpus.backend} ({why})"
