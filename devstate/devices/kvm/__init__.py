"""The ``kvm`` backend: real x86 vCPUs and VM-level state through ``/dev/kvm``.

:mod:`.uapi` is the ABI (ctypes structs, ioctl numbers, the one ioctl call); :mod:`.record`
a vCPU record's sections, order and framing; :mod:`.vcpu` gets and puts one vCPU's state
as a record through ctypes; :mod:`.engine` gets and puts a batch of vCPUs, natively (the C
extension ``_steps``, running programs it builds from the record's order) or through
:mod:`.vcpu`; :mod:`.seed` gives a vCPU distinct test state; :mod:`.verify` compares a
readback field by field; :mod:`.vm` owns a KVM VM and what it learned about the host;
:mod:`.batch` is a VM's vCPUs as one batch; :mod:`.device` is the backend the workers
drive. Arrows point one way: uapi <- record <- seed, verify <- vcpu <- engine, vm <- batch
<- device. A KVM VM may only be driven by the process that created it.

A live guest (a spec with ``[ram]``): :mod:`.ram` is its RAM, a memfd every worker maps;
:mod:`.guest_program` the program its vCPUs run (source ``guest.S``) and :mod:`.guest`
where it lives in RAM and how vCPUs enter it, :mod:`.guest_view` how the host reads its
progress and judges it after a move; :mod:`.run`
runs the vCPUs in KVM_RUN on threads (natively: the C extension ``_run``; else
:mod:`.run_threads`) and stops and resumes them, :mod:`.exits` says how a KVM_RUN ended;
:mod:`.live` is that guest on its owner's VM; :mod:`.memory` moves a range of its RAM as
a stream.
"""
