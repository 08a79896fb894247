"""A userspace delay line: every packet written to a TUN device comes back out of it later.

Why this exists: the test VM's kernel is built without ``sch_netem`` (and without
``sch_fq``), and has no loadable modules, so ``tc`` cannot add delay. What it does have is
``cls_u32``, ``act_mirred`` and TUN. ``tests/netns.py`` therefore redirects every IPv4
packet arriving on a namespace's veth (tc ingress, ``mirred egress redirect``) to a TUN
device owned by this script, which holds each packet for the delay and then writes it back
into the same TUN device; the kernel then receives it as if it had just arrived and
delivers it locally.

Why on the *receiving* side: a packet held on the sender's side still belongs to its socket,
and TCP Small Queues stop a socket with ~1 ms of data queued below it, so a delay line
there would cap a flow at a fraction of the link. The veth orphans a packet when it crosses
to the peer, so the receiver can hold it as long as it likes.

Offloads: the TUN device is opened with ``IFF_VNET_HDR`` and announces TSO and checksum
offload, so a 64 KiB TCP segment from the veth passes through as one read and one write
(with its virtio-net header, copied back unchanged) instead of ~45 MTU-sized packets; a
Python loop keeps up with a few hundred Mbit/s that way.

Usage (inside the namespace): ``python netns_delay.py DEVICE DELAY_MS``. It creates
DEVICE, prints ``ready`` once the device exists, and runs until SIGTERM or SIGINT; the
device disappears with it.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import sys
import time
from collections import deque

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
_TUN_F_TSO6 = 0x04
_TUN_F_TSO_ECN = 0x08

# A veth's largest GSO packet is 64 KiB; the virtio-net header adds 10 bytes. Larger reads
# cost nothing and survive a veth with a raised gso_max_size.
_READ_SIZE = 256 * 1024
# Like netem's default ``limit 1000``: a backlog past this is dropped, as a full router
# queue would, instead of growing without bound if the reader falls behind.
_MAX_QUEUED = 1000


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (gone when the fd closes); return its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifreq = struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR)
    fcntl.ioctl(fd, _TUNSETIFF, ifreq)
    fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6 | _TUN_F_TSO_ECN)
    return fd


def read_ready(fd: int, queue: deque[tuple[float, bytes]], delay: float) -> None:
    """Queue every packet the kernel has handed the device, each due ``delay`` from now."""
    while True:
        try:
            packet = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if len(queue) < _MAX_QUEUED:
            queue.append((time.monotonic() + delay, packet))


def write_due(fd: int, queue: deque[tuple[float, bytes]]) -> None:
    """Give back to the kernel every packet whose time has come, oldest first."""
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, packet = queue.popleft()
        try:
            os.write(fd, packet)
        except OSError:
            # A packet the kernel refuses is a lost packet; the line must go on.
            pass


def run(name: str, delay: float) -> None:
    """Delay every packet on ``name`` by ``delay`` seconds until told to stop."""
    fd = open_tun(name)
    print("ready", flush=True)
    # All packets get the same delay, so arrival order is due order: a FIFO is the schedule.
    queue: deque[tuple[float, bytes]] = deque()
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        readable, _, _ = select.select([fd], [], [], timeout)
        if readable:
            read_ready(fd, queue, delay)
        write_due(fd, queue)


def main() -> None:
    name, delay_ms = sys.argv[1], float(sys.argv[2])
    # SIGTERM is how tests/netns.py stops the line; exit quietly rather than with a traceback.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run(name, delay_ms / 1000.0)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
