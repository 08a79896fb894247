"""devstate.devices.kvm.uapi against the kernel headers themselves, and against the reference table.

A small C program, generated from the Python definitions and compiled with gcc against
``<linux/kvm.h>``, prints what the C compiler says: every struct's size and top-level field
offsets, every ioctl number, every capability and constant. The Python values must match.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import pickle
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstate.devices.kvm import structs, uapi
from devstate.devices.kvm.uapi import Cap, Ioctl

HEADERS = (Path("/usr/include/linux/kvm.h"), Path("/usr/include/x86_64-linux-gnu/asm/kvm.h"))

STRUCTS: tuple[type[ctypes.Structure], ...] = (
    structs.kvm_regs, structs.kvm_segment, structs.kvm_dtable, structs.kvm_sregs,
    structs.kvm_sregs2,
    structs.kvm_msr_entry, structs.kvm_msrs, structs.kvm_msr_list, structs.kvm_lapic_state,
    structs.kvm_vcpu_events, structs.kvm_mp_state, structs.kvm_debugregs, structs.kvm_xsave,
    structs.kvm_xcr, structs.kvm_xcrs, structs.kvm_cpuid_entry2, structs.kvm_cpuid2,
    structs.kvm_pic_state, structs.kvm_ioapic_state, structs.kvm_irqchip, structs.kvm_pit_config,
    structs.kvm_pit_channel_state, structs.kvm_pit_state2, structs.kvm_clock_data,
)

# Enums whose members are header constants named PREFIX + member name.
CONSTANT_ENUMS: tuple[tuple[type[enum.IntEnum] | type[enum.IntFlag], str], ...] = (
    (Cap, "KVM_CAP_"), (structs.MpState, "KVM_MP_STATE_"), (structs.IrqchipId, "KVM_IRQCHIP_"),
    (structs.VcpuEventsValid, "KVM_VCPUEVENT_VALID_"), (structs.ClockFlags, "KVM_CLOCK_"),
)
CONSTANTS = ("KVM_API_VERSION", "KVMIO", "KVM_NR_INTERRUPTS", "KVM_APIC_REG_SIZE",
             "KVM_MAX_XCRS", "KVM_IOAPIC_NUM_PINS", "KVM_SREGS2_FLAGS_PDPTRS_VALID",
             "KVM_CPUID_FLAG_SIGNIFCANT_INDEX", "KVM_PIT_SPEAKER_DUMMY",
             "KVM_X86_SHADOW_INT_MOV_SS", "KVM_X86_SHADOW_INT_STI")

# shared/reference/kvm-vcpu-state.md, "Struct layouts" and "ioctl numbers", as printed there.
REFERENCE_SIZES = {
    "kvm_regs": 144, "kvm_segment": 24, "kvm_dtable": 16, "kvm_sregs": 312,
    "kvm_sregs2": 320, "kvm_msr_entry": 16, "kvm_msrs": 8, "kvm_msr_list": 4,
    "kvm_lapic_state": 1024, "kvm_vcpu_events": 64, "kvm_mp_state": 4, "kvm_debugregs": 128,
    "kvm_xsave": 4096, "kvm_xcr": 16, "kvm_xcrs": 392, "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8, "kvm_irqchip": 520, "kvm_pit_state2": 112, "kvm_clock_data": 48,
}
REFERENCE_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00, "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02, "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05, "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_TSS_ADDR": 0xAE47, "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_GET_IRQCHIP": 0xC208AE62, "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_CREATE_PIT2": 0x4040AE77, "KVM_GET_PIT2": 0x8070AE9F, "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_GET_CLOCK": 0x8030AE7C, "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_REGS": 0x8090AE81, "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83, "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88, "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_LAPIC": 0x8400AE8E, "KVM_SET_LAPIC": 0x4400AE8F, "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98, "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F, "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1, "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4, "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6, "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_SREGS2": 0x8140AECC, "KVM_SET_SREGS2": 0x4140AECD, "KVM_GET_XSAVE2": 0x9000AECF,
}
REFERENCE_CAPS = {
    "IRQCHIP": 0, "MP_STATE": 14, "ADJUST_CLOCK": 39, "VCPU_EVENTS": 41, "DEBUGREGS": 50,
    "XSAVE": 55, "XCRS": 56, "TSC_CONTROL": 60, "SPLIT_IRQCHIP": 121, "GET_MSR_FEATURES": 153,
    "NESTED_STATE": 157, "EXCEPTION_PAYLOAD": 164, "SREGS2": 200, "XSAVE2": 208,
}


def python_values() -> Iterator[tuple[str, str, int]]:
    """(key, C expression, value in Python) for everything the C program checks."""
    for struct in STRUCTS:
        name = struct.__name__
        yield f"sizeof {name}", f"sizeof(struct {name})", ctypes.sizeof(struct)
        for field, _ in struct._fields_:
            yield (f"offsetof {name}.{field}", f"offsetof(struct {name}, {field})",
                   getattr(struct, field).offset)
    for request in Ioctl:
        yield f"ioctl {request.name}", request.name, request.value
    for kind, prefix in CONSTANT_ENUMS:
        for member in kind:
            yield f"const {prefix}{member.name}", f"{prefix}{member.name}", member.value
    for name in CONSTANTS:
        yield f"const {name}", name, getattr(uapi if hasattr(uapi, name) else structs, name)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What gcc and the installed headers say, keyed like :func:`python_values`."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compile the header check")
    missing = [str(h) for h in HEADERS if not h.exists()]
    if missing:
        pytest.skip(f"kernel UAPI headers missing: {', '.join(missing)} (linux-libc-dev)")
    lines = [f'    printf("{key}=%llu\\n", (unsigned long long)({expr}));'
             for key, expr, _ in python_values()]
    source = "\n".join(["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
                        "int main(void) {", *lines, "    return 0;", "}", ""])
    work = tmp_path_factory.mktemp("kvm-headers")
    (work / "check.c").write_text(source)
    subprocess.run([gcc, "-o", str(work / "check"), str(work / "check.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(work / "check")], check=True, capture_output=True, text=True)
    return {key: int(value) for key, value in (line.split("=") for line in out.stdout.split("\n")
                                               if line)}


def test_every_size_offset_ioctl_and_constant_matches_the_headers(c_values: dict[str, int]
                                                                   ) -> None:
    mismatches = [f"{key}: python {value:#x}, C {c_values[key]:#x}"
                  for key, _, value in python_values() if c_values[key] != value]
    assert not mismatches
    assert len(c_values) == len(list(python_values()))


def test_sizes_ioctls_and_caps_match_the_reference_table() -> None:
    sizes = {s.__name__: ctypes.sizeof(s) for s in STRUCTS}
    assert {name: sizes[name] for name in REFERENCE_SIZES} == REFERENCE_SIZES
    assert {name: Ioctl[name].value for name in REFERENCE_IOCTLS} == REFERENCE_IOCTLS
    assert {name: Cap[name].value for name in REFERENCE_CAPS} == REFERENCE_CAPS


def test_ioctl_numbers_are_distinct() -> None:
    # An IntEnum silently makes a duplicate value an alias; every name must be its own number.
    assert len(Ioctl.__members__) == len(Ioctl)


def test_set_irqchip_keeps_its_historical_ior_direction() -> None:
    direction = Ioctl.KVM_SET_IRQCHIP >> 30
    assert direction == 2  # _IOC_READ, although userspace writes the struct


def test_variable_length_structs_grow_by_their_entries() -> None:
    assert ctypes.sizeof(structs.msrs_type(40)) == 8 + 16 * 40
    assert ctypes.sizeof(structs.msr_list_type(40)) == 4 + 4 * 40
    assert ctypes.sizeof(structs.cpuid2_type(75)) == 8 + 40 * 75
    assert ctypes.sizeof(structs.xsave_type(8192)) == 8192
    with pytest.raises(ValueError, match="XSAVE size"):
        structs.xsave_type(4000)


def test_ioc_refuses_a_size_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        uapi._IOC(uapi._IOC_READ, uapi.KVMIO, 0x01, 1 << 14)


def test_a_failed_ioctl_names_the_ioctl_and_carries_the_errno() -> None:
    with open("/dev/null", "rb") as null, pytest.raises(uapi.KvmError) as caught:
        uapi.ioctl(null.fileno(), Ioctl.KVM_GET_REGS, structs.kvm_regs(), device="cpu/3")
    assert caught.value.errno == errno.ENOTTY  # /dev/null has no ioctls
    assert isinstance(caught.value, OSError)
    assert str(caught.value).startswith("cpu/3: KVM_GET_REGS failed: ENOTTY")
    copy = pickle.loads(pickle.dumps(caught.value))  # as a worker would report it
    assert (str(copy), copy.errno, copy.op) == (str(caught.value), errno.ENOTTY, "KVM_GET_REGS")
