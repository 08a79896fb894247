"""The ``kvm`` backend: real x86 vCPUs and VM-level state through ``/dev/kvm``.

:mod:`.uapi` is the ABI (ctypes structs, ioctl numbers, the one ioctl call); :mod:`.record`
a vCPU record's sections, order and framing; :mod:`.vcpu` gets and puts one vCPU's state
as a record; :mod:`.seed` gives a vCPU distinct test state; :mod:`.verify` compares a
readback field by field; :mod:`.vm` owns a KVM VM and what it learned about the host;
:mod:`.device` is the backend the workers drive. Arrows point one way: uapi <- record <-
seed, verify <- vcpu <- vm <- device. A KVM VM may only be driven by the process that created it.
"""
