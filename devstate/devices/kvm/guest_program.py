"""The guest program every vCPU of a live guest runs: its bytes, and the addresses and
constants it shares with the host.

Runs in: any process (constants and bytes only). :mod:`.guest` installs the program in
guest RAM, enters vCPUs into it and reads what it writes.

The source is ``guest.S`` next to this file (GNU as, ``.code64``), which explains the
program: why long mode with the work in user mode, the registers it keeps and checks, the
failure codes, the seqlock around the checksum, the tick and the yield.
:data:`PROGRAM` is its ``.text``, one instruction a line with the source as a comment (the
way LWN's "Using the KVM API" shows its guest); ``tests/test_guest_program.py`` assembles
``guest.S`` and asserts that the bytes, the labels and every ``.set`` symbol equal
:data:`PROGRAM`, :data:`LABELS` and :data:`SYMBOLS`. After changing ``guest.S``, rebuild
the table from its listing (``as --64 -aln``).

Guest RAM starts at guest-physical 0, and the page tables map the low 4 GiB one to one,
so an address below is a virtual address, a guest-physical one and an offset in the
RAM's memfd at once::

    0x0000  unused (a stray write through a null pointer lands where nothing lives)
    0x1000  params block (PARAMS_*, written by the host)
    0x2000  the program (CODE: PROGRAM, at most a page)
    0x3000  IDT: 256 gates of 16 bytes
    0x4000  page tables: PML4, PDPT, 4 page directories of 2 MiB pages (6 pages)
    0xa000  GDT: 5 descriptors, then each vCPU's TSS descriptor (16 bytes each)
    then    one page per vCPU (GuestLayout.area), from the page after the GDT:
              +0x000  control block (CB_*: counter, failure, seqlock, sum, identity)
              +0x080  TSS (its RSP0 is the kernel stack top)
              +0x100  checksum block: CHECKSUM_WORDS u32
              +0x800  top of the user stack (RSP's value; the program pushes nothing)
              +0x1000 top of the kernel stack (interrupt and exception frames)
    then    the working sets: every vCPU's share of the rest of the RAM below 3 GiB
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

# ---------------------------------------------------------------- where things live (RAM)
PAGE_BYTES = 0x1000
PARAMS = 0x1000
CODE = 0x2000
IDT = 0x3000
IDT_GATES = 256  # 16 bytes each
PML4 = 0x4000
PDPT = 0x5000
PAGE_DIRECTORIES = 0x6000  # one per GiB of the identity map
IDENTITY_MAP_GIB = 4  # the low 4 GiB: RAM below the hole and the LAPIC's page
GDT = 0xA000
GDT_FIXED_ENTRIES = 5  # null, kernel code, kernel data, user data, user code
# In a vCPU's page:
CONTROL_BLOCK_BYTES = 0x50
TSS = 0x80
TSS_BYTES = 0x68  # a 64-bit TSS without an I/O permission bitmap
CHECKSUM_BLOCK = 0x100
USER_STACK_TOP = 0x800
KERNEL_STACK_TOP = 0x1000

# GDT selectors; user ones with RPL 3.
KERNEL_CODE_SELECTOR = 0x08
KERNEL_DATA_SELECTOR = 0x10
USER_DATA_SELECTOR = 0x1B
USER_CODE_SELECTOR = 0x23
FIRST_TSS_SELECTOR = 8 * GDT_FIXED_ENTRIES  # vCPU i's is this + 16 * i
USER_RFLAGS = 0x202  # IF and the reserved bit

# ------------------------------------------------------------------------- params block
# u32 fields. The host writes the block before any vCPU runs; the guest reads TICK_NS at
# entry and the others on every tick. MAGIC goes last: a reader finding it finds the rest.
PARAMS_MAGIC = PARAMS + 0x00  # MAGIC: the RAM holds an installed guest
PARAMS_VERSION = PARAMS + 0x04  # VERSION: this block's and the control blocks' layout
PARAMS_VCPUS = PARAMS + 0x08
PARAMS_TICK_NS = PARAMS + 0x0C
PARAMS_LOOPS_PER_TICK = PARAMS + 0x10
PARAMS_DIRTY_PAGES = PARAMS + 0x14  # working-set pages each vCPU dirties per tick
PARAMS_WS_PAGES = PARAMS + 0x18  # pages of its working set each vCPU cycles through
MAGIC = int.from_bytes(b"DSGP", "little")
VERSION = 2

# ----------------------------------------------------------------------- control block
# At the start of each vCPU's page, which is also its FS segment's base. The guest writes
# the first part; the host writes the identity part (INDEX...) before the vCPU runs.
CB_COUNTER = 0x00  # u64: loops done, one atomic 8-byte store each
CB_FAIL_CODE = 0x08  # u32: a Failure, 0 while all checks held
CB_FAIL_WHERE = 0x0C  # u32: the register's number, or the exception's vector
CB_FAIL_VALUE = 0x10  # u64: the register's value, or the exception's RIP
CB_SEQ = 0x18  # u32: odd while the checksum block and CB_SUM are being changed
CB_SUM = 0x1C  # u32: sum of the checksum block's words, mod 2**32
CB_TICKS = 0x20  # u32: timer interrupts taken
CB_BUDGET = 0x24  # u32: loops left before this tick's yield
CB_WS_CURSOR = 0x28  # u32: next working-set page to dirty
CB_INDEX = 0x30  # u64, host: the vCPU's index
CB_STACK_TOP = 0x38  # u64, host: RSP's value at the top of every loop (user mode)
CB_BLOCK = 0x40  # u64, host: the checksum block's address
CB_WS_BASE = 0x48  # u64, host: the first page of the vCPU's working set
CHECKSUM_WORDS = 64

# ------------------------------------------------------------------------ the program's
# xAPIC registers (MMIO, emulated by KVM's in-kernel LAPIC; names as Linux's apicdef.h).
APIC_BASE = 0xFEE00000
APIC_EOI = APIC_BASE + 0xB0
APIC_SPIV = 0xF0  # offsets from APIC_BASE
APIC_LVTT = 0x320
APIC_TMICT = 0x380
APIC_TDCR = 0x3E0
TIMER_VECTOR = 0x20
SPURIOUS_VECTOR = 0xFF
INVALID_OPCODE_VECTOR = 6  # #UD: the yield call comes this way
EXCEPTION_VECTORS = 32
APIC_ENABLE = 0x100
APIC_TIMER_PERIODIC = 0x20000
APIC_DIVIDE_BY_1 = 0xB
# Exceptions that push an error code: 8, 10-14, 17, 21, 29, 30.
ERROR_CODE_VECTORS = 0x60227D00
# RBP = index * INDEX_MUL + INDEX_ADD mod 2**64: distinct for every index (odd multiplier).
INDEX_MUL = 0x9E3779B97F4A7C15
INDEX_ADD = 0x6A09E667F3BCC909
# A word written to the checksum block: counter * VALUE_MUL ^ EBP (FNV's prime).
VALUE_MUL = 0x01000193

# x86 register numbers, as CB_FAIL_WHERE names general registers.
REGISTERS = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
             "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")


class Failure(enum.IntEnum):
    """What the guest writes to CB_FAIL_CODE when a check fails (then it halts for good);
    CB_FAIL_WHERE and CB_FAIL_VALUE say more, as each member's comment says."""

    GENERAL_REGISTER = 1  # where: the register (RSI, RBP, R8-R10, R12-R15); value: its value
    VECTOR_REGISTER = 2  # where: 0 for YMM0, 15 for YMM15
    CHECKSUM = 3  # the block's words do not add up to CB_SUM; value: what they add up to
    SKEW = 4  # RBX is not CB_SUM: registers and RAM from different instants; value: RBX
    STACK = 5  # RSP is not the stack top at a loop's start; value: RSP
    EXCEPTION = 6  # a CPU exception; where: its vector; value: the RIP it hit at


# The constants guest.S defines with .set, by name (the test compares them with its own).
SYMBOLS: Mapping[str, int] = {
    "CODE": CODE,
    "PARAMS_TICK_NS": PARAMS_TICK_NS,
    "PARAMS_LOOPS_PER_TICK": PARAMS_LOOPS_PER_TICK,
    "PARAMS_DIRTY_PAGES": PARAMS_DIRTY_PAGES,
    "PARAMS_WS_PAGES": PARAMS_WS_PAGES,
    "CB_COUNTER": CB_COUNTER,
    "CB_FAIL_CODE": CB_FAIL_CODE,
    "CB_FAIL_WHERE": CB_FAIL_WHERE,
    "CB_FAIL_VALUE": CB_FAIL_VALUE,
    "CB_SEQ": CB_SEQ,
    "CB_SUM": CB_SUM,
    "CB_TICKS": CB_TICKS,
    "CB_BUDGET": CB_BUDGET,
    "CB_WS_CURSOR": CB_WS_CURSOR,
    "CB_INDEX": CB_INDEX,
    "CB_STACK_TOP": CB_STACK_TOP,
    "CB_BLOCK": CB_BLOCK,
    "CB_WS_BASE": CB_WS_BASE,
    "USER_DATA_SELECTOR": USER_DATA_SELECTOR,
    "USER_CODE_SELECTOR": USER_CODE_SELECTOR,
    "USER_RFLAGS": USER_RFLAGS,
    "APIC_BASE": APIC_BASE,
    "APIC_EOI": APIC_EOI,
    "APIC_SPIV": APIC_SPIV,
    "APIC_LVTT": APIC_LVTT,
    "APIC_TMICT": APIC_TMICT,
    "APIC_TDCR": APIC_TDCR,
    "TIMER_VECTOR": TIMER_VECTOR,
    "SPURIOUS_VECTOR": SPURIOUS_VECTOR,
    "APIC_ENABLE": APIC_ENABLE,
    "APIC_TIMER_PERIODIC": APIC_TIMER_PERIODIC,
    "APIC_DIVIDE_BY_1": APIC_DIVIDE_BY_1,
    "INDEX_MUL": INDEX_MUL,
    "INDEX_ADD": INDEX_ADD,
    "VALUE_MUL": VALUE_MUL,
    "CHECKSUM_WORDS": CHECKSUM_WORDS,
    "ERROR_CODE_VECTORS": ERROR_CODE_VECTORS,
    **{f"FAIL_{failure.name}": failure.value for failure in Failure},
    **{f"REG_{name}": REGISTERS.index(name) for name in ("RBX", "RSP", "RBP", "RSI")},
}


def _listing(*lines: str) -> tuple[bytes, Mapping[str, int]]:
    """The bytes of a listing of hex instructions and ``label:`` lines, and the labels'
    offsets."""
    code = bytearray()
    labels = {}
    for line in lines:
        if line.endswith(":"):
            labels[line[:-1]] = len(code)
        else:
            code += bytes.fromhex(line)
    return bytes(code), labels


# exceptions + 4v, for each vector v below 32: push $v (6a v), jmp exception (eb rel8). The
# stubs end where exception starts, so the jump from stub v skips the 4 * (31 - v) bytes
# of the stubs after it.
_EXCEPTION_STUBS = tuple(f"6a {v:02x} eb {4 * (EXCEPTION_VECTORS - 1 - v):02x}"
                         for v in range(EXCEPTION_VECTORS))

PROGRAM, LABELS = _listing(
    # kernel entry (CPL 0): start the LAPIC timer, go to user mode
    "kernel_entry:",
    "bf 00 00 e0 fe",                 # mov    $APIC_BASE, %edi
    "c7 87 f0 00 00 00 ff 01 00 00",  # movl   $(APIC_ENABLE | SPURIOUS_VECTOR), APIC_SPIV(%rdi)
    "c7 87 e0 03 00 00 0b 00 00 00",  # movl   $APIC_DIVIDE_BY_1, APIC_TDCR(%rdi)
    "c7 87 20 03 00 00 20 00 02 00",  # movl $(APIC_TIMER_PERIODIC | TIMER_VECTOR), APIC_LVTT(%rdi)
    "8b 04 25 0c 10 00 00",           # mov    PARAMS_TICK_NS, %eax
    "89 87 80 03 00 00",              # mov    %eax, APIC_TMICT(%rdi)
    "6a 1b",                          # pushq  $USER_DATA_SELECTOR
    "64 ff 34 25 38 00 00 00",        # pushq  %fs:CB_STACK_TOP
    "68 02 02 00 00",                 # pushq  $USER_RFLAGS
    "6a 23",                          # pushq  $USER_CODE_SELECTOR
    "68 48 20 00 00",                 # pushq  $(CODE + user_entry - kernel_entry)
    "48 cf",                          # iretq
    # user entry (CPL 3): make the register values
    "user_entry:",
    "48 bd 15 7c 4a 7f b9 79 37 9e",  # movabs $INDEX_MUL, %rbp
    "48 0f af ee",                    # imul   %rsi, %rbp
    "48 b8 09 c9 bc f3 67 e6 09 6a",  # movabs $INDEX_ADD, %rax
    "48 01 c5",                       # add    %rax, %rbp
    "49 89 e8",                       # mov    %rbp, %r8
    "49 c1 c0 08",                    # rol    $8, %r8
    "49 89 e9",                       # mov    %rbp, %r9
    "49 c1 c1 09",                    # rol    $9, %r9
    "49 89 ea",                       # mov    %rbp, %r10
    "49 c1 c2 0a",                    # rol    $10, %r10
    "49 89 ec",                       # mov    %rbp, %r12
    "49 c1 c4 0c",                    # rol    $12, %r12
    "49 89 ed",                       # mov    %rbp, %r13
    "49 c1 c5 0d",                    # rol    $13, %r13
    "49 89 ee",                       # mov    %rbp, %r14
    "49 c1 c6 0e",                    # rol    $14, %r14
    "49 89 ef",                       # mov    %rbp, %r15
    "49 c1 c7 0f",                    # rol    $15, %r15
    "c4 e1 f9 6e c6",                 # vmovq  %rsi, %xmm0
    "c4 e3 f9 22 c5 01",              # vpinsrq $1, %rbp, %xmm0, %xmm0
    "c5 f1 76 c9",                    # vpcmpeqd %xmm1, %xmm1, %xmm1
    "c5 f9 ef c9",                    # vpxor  %xmm1, %xmm0, %xmm1
    "c4 e3 7d 18 c1 01",              # vinsertf128 $1, %xmm1, %ymm0, %ymm0
    "c5 f4 c2 c9 0f",                 # vcmptrueps %ymm1, %ymm1, %ymm1
    "c5 7c 57 f9",                    # vxorps %ymm1, %ymm0, %ymm15
    "64 8b 1c 25 1c 00 00 00",        # mov    %fs:CB_SUM, %ebx
    "8b 04 25 10 10 00 00",           # mov    PARAMS_LOOPS_PER_TICK, %eax
    "64 89 04 25 24 00 00 00",        # mov    %eax, %fs:CB_BUDGET
    # one loop: the checks
    "work:",
    "64 48 3b 34 25 30 00 00 00",     # cmp    %fs:CB_INDEX, %rsi
    "0f 85 a2 01 00 00",              # jne    bad_rsi
    "48 b8 15 7c 4a 7f b9 79 37 9e",  # movabs $INDEX_MUL, %rax
    "48 0f af c6",                    # imul   %rsi, %rax
    "48 ba 09 c9 bc f3 67 e6 09 6a",  # movabs $INDEX_ADD, %rdx
    "48 01 d0",                       # add    %rdx, %rax
    "48 39 c5",                       # cmp    %rax, %rbp
    "0f 85 88 01 00 00",              # jne    bad_rbp
    "48 89 e8",                       # mov    %rbp, %rax
    "48 c1 c0 08",                    # rol    $8, %rax
    "49 39 c0",                       # cmp    %rax, %r8
    "0f 85 82 01 00 00",              # jne    bad_r8
    "48 d1 c0",                       # rol    $1, %rax
    "49 39 c1",                       # cmp    %rax, %r9
    "0f 85 80 01 00 00",              # jne    bad_r9
    "48 d1 c0",                       # rol    $1, %rax
    "49 39 c2",                       # cmp    %rax, %r10
    "0f 85 7e 01 00 00",              # jne    bad_r10
    "48 c1 c0 02",                    # rol    $2, %rax
    "49 39 c4",                       # cmp    %rax, %r12
    "0f 85 7b 01 00 00",              # jne    bad_r12
    "48 d1 c0",                       # rol    $1, %rax
    "49 39 c5",                       # cmp    %rax, %r13
    "0f 85 79 01 00 00",              # jne    bad_r13
    "48 d1 c0",                       # rol    $1, %rax
    "49 39 c6",                       # cmp    %rax, %r14
    "0f 85 77 01 00 00",              # jne    bad_r14
    "48 d1 c0",                       # rol    $1, %rax
    "49 39 c7",                       # cmp    %rax, %r15
    "0f 85 75 01 00 00",              # jne    bad_r15
    "64 48 3b 24 25 38 00 00 00",     # cmp    %fs:CB_STACK_TOP, %rsp
    "0f 85 75 01 00 00",              # jne    bad_rsp
    "c4 e1 f9 6e ce",                 # vmovq  %rsi, %xmm1
    "c4 e3 f1 22 cd 01",              # vpinsrq $1, %rbp, %xmm1, %xmm1
    "c5 e9 76 d2",                    # vpcmpeqd %xmm2, %xmm2, %xmm2
    "c5 f1 ef d2",                    # vpxor  %xmm2, %xmm1, %xmm2
    "c4 e3 75 18 ca 01",              # vinsertf128 $1, %xmm2, %ymm1, %ymm1
    "c5 f4 57 d0",                    # vxorps %ymm0, %ymm1, %ymm2
    "c4 e2 7d 17 d2",                 # vptest %ymm2, %ymm2
    "0f 85 5c 01 00 00",              # jnz    bad_ymm0
    "c4 c1 74 57 d7",                 # vxorps %ymm15, %ymm1, %ymm2
    "c5 e4 c2 db 0f",                 # vcmptrueps %ymm3, %ymm3, %ymm3
    "c4 e2 7d 17 d3",                 # vptest %ymm3, %ymm2
    "0f 83 4b 01 00 00",              # jnc    bad_ymm15
    "64 3b 1c 25 1c 00 00 00",        # cmp    %fs:CB_SUM, %ebx
    "0f 85 4b 01 00 00",              # jne    bad_skew
    "64 48 8b 3c 25 40 00 00 00",     # mov    %fs:CB_BLOCK, %rdi
    "31 c0",                          # xor    %eax, %eax
    "b9 40 00 00 00",                 # mov    $CHECKSUM_WORDS, %ecx
    "03 44 8f fc",                    # 1: add    -4(%rdi,%rcx,4), %eax
    "ff c9",                          # dec    %ecx
    "75 f8",                          # jnz    1b
    "39 c3",                          # cmp    %eax, %ebx
    "0f 85 3a 01 00 00",              # jne    bad_sum
    # one loop: the work. Word (counter mod 64) of the block := counter * VALUE_MUL ^ EBP
    "64 48 8b 04 25 00 00 00 00",     # mov    %fs:CB_COUNTER, %rax
    "89 c2",                          # mov    %eax, %edx
    "83 e2 3f",                       # and    $(CHECKSUM_WORDS - 1), %edx
    "69 c0 93 01 00 01",              # imul   $VALUE_MUL, %eax, %eax
    "31 e8",                          # xor    %ebp, %eax
    "64 ff 04 25 18 00 00 00",        # incl   %fs:CB_SEQ
    "2b 1c 97",                       # sub    (%rdi,%rdx,4), %ebx
    "01 c3",                          # add    %eax, %ebx
    "89 04 97",                       # mov    %eax, (%rdi,%rdx,4)
    "64 89 1c 25 1c 00 00 00",        # mov    %ebx, %fs:CB_SUM
    "64 ff 04 25 18 00 00 00",        # incl   %fs:CB_SEQ
    "64 48 ff 04 25 00 00 00 00",     # incq   %fs:CB_COUNTER
    "64 ff 0c 25 24 00 00 00",        # decl   %fs:CB_BUDGET
    "0f 85 ad fe ff ff",              # jnz    work
    # end of the tick's work: dirty the working set, then yield until the next tick
    "8b 0c 25 14 10 00 00",           # mov    PARAMS_DIRTY_PAGES, %ecx
    "85 c9",                          # test   %ecx, %ecx
    "74 3d",                          # jz     2f
    "64 8b 14 25 28 00 00 00",        # mov    %fs:CB_WS_CURSOR, %edx
    "64 48 8b 3c 25 00 00 00 00",     # mov    %fs:CB_COUNTER, %rdi
    "3b 14 25 18 10 00 00",           # 1: cmp    PARAMS_WS_PAGES, %edx
    "72 02",                          # jb     3f
    "31 d2",                          # xor    %edx, %edx
    "48 89 d0",                       # 3: mov    %rdx, %rax
    "48 c1 e0 0c",                    # shl    $12, %rax
    "64 48 03 04 25 48 00 00 00",     # add    %fs:CB_WS_BASE, %rax
    "48 89 38",                       # mov    %rdi, (%rax)
    "ff c2",                          # inc    %edx
    "ff c9",                          # dec    %ecx
    "75 dc",                          # jnz    1b
    "64 89 14 25 28 00 00 00",        # mov    %edx, %fs:CB_WS_CURSOR
    "8b 04 25 10 10 00 00",           # 2: mov    PARAMS_LOOPS_PER_TICK, %eax
    "64 89 04 25 24 00 00 00",        # mov    %eax, %fs:CB_BUDGET
    "yield_site:",
    "0f 0b",                          # ud2
    "e9 4f fe ff ff",                 # jmp    work
    # a failed check: the code in EAX, the register's number in ECX, its value in RDX
    "bad_rsi:",
    "b9 06 00 00 00",                 # mov    $REG_RSI, %ecx
    "48 89 f2",                       # mov    %rsi, %rdx
    "eb 4e",                          # jmp    bad_register
    "bad_rbp:",
    "b9 05 00 00 00",                 # mov    $REG_RBP, %ecx
    "48 89 ea",                       # mov    %rbp, %rdx
    "eb 44",                          # jmp    bad_register
    "bad_r8:",
    "b9 08 00 00 00",                 # mov    $8, %ecx
    "4c 89 c2",                       # mov    %r8, %rdx
    "eb 3a",                          # jmp    bad_register
    "bad_r9:",
    "b9 09 00 00 00",                 # mov    $9, %ecx
    "4c 89 ca",                       # mov    %r9, %rdx
    "eb 30",                          # jmp    bad_register
    "bad_r10:",
    "b9 0a 00 00 00",                 # mov    $10, %ecx
    "4c 89 d2",                       # mov    %r10, %rdx
    "eb 26",                          # jmp    bad_register
    "bad_r12:",
    "b9 0c 00 00 00",                 # mov    $12, %ecx
    "4c 89 e2",                       # mov    %r12, %rdx
    "eb 1c",                          # jmp    bad_register
    "bad_r13:",
    "b9 0d 00 00 00",                 # mov    $13, %ecx
    "4c 89 ea",                       # mov    %r13, %rdx
    "eb 12",                          # jmp    bad_register
    "bad_r14:",
    "b9 0e 00 00 00",                 # mov    $14, %ecx
    "4c 89 f2",                       # mov    %r14, %rdx
    "eb 08",                          # jmp    bad_register
    "bad_r15:",
    "b9 0f 00 00 00",                 # mov    $15, %ecx
    "4c 89 fa",                       # mov    %r15, %rdx
    "bad_register:",
    "b8 01 00 00 00",                 # mov    $FAIL_GENERAL_REGISTER, %eax
    "eb 3d",                          # jmp    fail
    "bad_rsp:",
    "b9 04 00 00 00",                 # mov    $REG_RSP, %ecx
    "48 89 e2",                       # mov    %rsp, %rdx
    "b8 05 00 00 00",                 # mov    $FAIL_STACK, %eax
    "eb 2e",                          # jmp    fail
    "bad_ymm0:",
    "31 c9",                          # xor    %ecx, %ecx
    "eb 05",                          # jmp    bad_vector
    "bad_ymm15:",
    "b9 0f 00 00 00",                 # mov    $15, %ecx
    "bad_vector:",
    "31 d2",                          # xor    %edx, %edx
    "b8 02 00 00 00",                 # mov    $FAIL_VECTOR_REGISTER, %eax
    "eb 1c",                          # jmp    fail
    "bad_skew:",
    "b9 03 00 00 00",                 # mov    $REG_RBX, %ecx
    "48 89 da",                       # mov    %rbx, %rdx
    "b8 04 00 00 00",                 # mov    $FAIL_SKEW, %eax
    "eb 0d",                          # jmp    fail
    "bad_sum:",
    "b9 03 00 00 00",                 # mov    $REG_RBX, %ecx
    "48 89 c2",                       # mov    %rax, %rdx
    "b8 03 00 00 00",                 # mov    $FAIL_CHECKSUM, %eax
    "fail:",
    "64 48 89 14 25 10 00 00 00",     # mov    %rdx, %fs:CB_FAIL_VALUE
    "64 89 0c 25 0c 00 00 00",        # mov    %ecx, %fs:CB_FAIL_WHERE
    "64 89 04 25 08 00 00 00",        # mov    %eax, %fs:CB_FAIL_CODE
    "0f 0b",                          # ud2
    # kernel: interrupt and exception handlers (interrupt gates: IF clear inside)
    "timer_interrupt:",
    "64 ff 04 25 20 00 00 00",        # incl   %fs:CB_TICKS
    "a3 b0 00 e0 fe 00 00 00 00",     # movabs %eax, APIC_EOI
    "48 cf",                          # iretq
    "spurious_interrupt:",
    "48 cf",                          # iretq
    "invalid_opcode:",
    "48 81 3c 24 77 22 00 00",        # cmpq   $(CODE + yield_site - kernel_entry), (%rsp)
    "75 21",                          # jne    exceptions + 4 * 6
    "48 83 04 24 02",                 # addq   $2, (%rsp)
    "fb",                             # sti
    "f4",                             # hlt
    "48 cf",                          # iretq
    "exceptions:",
    *_EXCEPTION_STUBS,
    "exception:",
    "5a",                             # pop    %rdx
    "64 83 3c 25 08 00 00 00 00",     # cmpl   $0, %fs:CB_FAIL_CODE
    "75 2f",                          # jne    halt_forever
    "b8 00 7d 22 60",                 # mov    $ERROR_CODE_VECTORS, %eax
    "0f a3 d0",                       # bt     %edx, %eax
    "73 04",                          # jnc    1f
    "48 83 c4 08",                    # add    $8, %rsp
    "48 8b 04 24",                    # 1: mov    (%rsp), %rax
    "64 48 89 04 25 10 00 00 00",     # mov    %rax, %fs:CB_FAIL_VALUE
    "64 89 14 25 0c 00 00 00",        # mov    %edx, %fs:CB_FAIL_WHERE
    "64 c7 04 25 08 00 00 00 06 00 00 00",# movl   $FAIL_EXCEPTION, %fs:CB_FAIL_CODE
    "halt_forever:",
    "fa",                             # cli
    "f4",                             # hlt
    "eb fc",                          # jmp    halt_forever
)
assert len(PROGRAM) <= PAGE_BYTES, "the program outgrew its page"
