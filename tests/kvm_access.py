"""Whether this machine's /dev/kvm can be used, for the tests that need a real KVM: one
place for the check and its skip reason."""

from __future__ import annotations

import os

import pytest


def _kvm_unavailable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist: no KVM on this machine"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return None


KVM_UNAVAILABLE = _kvm_unavailable()
needs_kvm = pytest.mark.skipif(KVM_UNAVAILABLE is not None, reason=str(KVM_UNAVAILABLE))
