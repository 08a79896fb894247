"""The ``kvm`` backend: real x86 vCPUs and VM-level state through ``/dev/kvm``.

:mod:`.uapi` is the ABI (ctypes structs, ioctl numbers, the one ioctl call), :mod:`.vm`
owns a KVM VM and what it learned about the host, :mod:`.vcpu` gets and puts one vCPU's
state as a record. A KVM VM may only be driven by the process that created it.
"""
