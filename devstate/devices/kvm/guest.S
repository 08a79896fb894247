/*
 * The guest program every vCPU of devstate's live guest runs: the source of the byte table
 * in guest_program.py (PROGRAM). tests/test_guest_program.py assembles this file and
 * compares its bytes, labels and .set symbols with that module's:
 *
 *     as --64 -o guest.o guest.S && objcopy -O binary -j .text guest.o guest.bin
 *
 * Mode: 64-bit long mode, paging on (identity map of the low 4 GiB, 2 MiB pages), and the
 * work done in user mode (CPL 3). Why not 32-bit protected mode without paging, the plain
 * choice: the KVM of the hosts devstate runs on (kvm-pvm, "pagetable-based virtual
 * machine", in a nested VM) runs guest code natively only at CPL 3 with paging on. CPL 0
 * code it emulates an instruction at a time (measured: ~0.5 M instructions/s), and its
 * emulator refuses SSE and AVX (KVM_EXIT_INTERNAL_ERROR, emulation failed). So the kernel
 * part below (CPL 0) is a dozen instructions at entry and a few per tick, and the loop
 * with its checks runs natively. Everything the mode needs is in SREGS (CR0, CR3, CR4,
 * EFER, GDTR, IDTR, TR and the segment caches) and in guest RAM (page tables, GDT, IDT,
 * TSSs), both of which migrate.
 *
 * The host (guest.enter) starts every vCPU, APs too, at kernel_entry, CPL 0, IF = 0, with:
 *   RSI = the vCPU's index i        RSP = the top of its kernel stack (its TSS's RSP0)
 *   FS  = its control block: the segment's base, which the program never reloads, so
 *         %fs:0 is the vCPU's own block, found without trusting a general register
 *   TR  = its own TSS               XCR0 = x87 | SSE | AVX
 * kernel_entry programs the LAPIC timer and IRETs to user_entry (CPL 3, IF = 1).
 *
 * Registers the user part keeps, and checks on every loop:
 *   RSI        = i                                 (against the control block's index)
 *   RBP        = i * INDEX_MUL + INDEX_ADD         (recomputed from RSI)
 *   R8-R10, R12-R15 = RBP rotated left by the register's number of bits
 *   RSP        = the user stack top                (against the control block's)
 *   YMM0       = {RSI, RBP, ~RSI, ~RBP} (quadwords, low first); YMM15 = ~YMM0
 *   RBX        = the sum of the vCPU's checksum block, which the control block also holds
 * RAX, RCX, RDX, RDI and R11 are scratch. The first check that fails writes FAIL_* (code),
 * the register's number (where) and its value into the control block, then executes UD2
 * away from yield_site: the kernel then halts the vCPU for good, interrupts off.
 *
 * Each loop: the checks; then, inside a seqlock (SEQ odd meanwhile), one word of the block
 * and its sum change; then the 64-bit counter goes up by one aligned 8-byte store, which a
 * reader never sees torn. After LOOPS_PER_TICK loops the vCPU dirties DIRTY_PAGES pages of
 * its working set and yields until the next tick of its LAPIC timer, so that hundreds of
 * vCPUs share a few host CPUs.
 *
 * The yield is a UD2 at yield_site: the #UD handler, seeing that address, resumes after
 * it once a HLT has slept to the next timer interrupt. Not SYSCALL nor INT n, the natural
 * choices: kvm-pvm delivers exceptions and interrupts from user mode through the IDT, but
 * (observed) its SYSCALL jumps to LSTAR without leaving CPL 3, and INT n ends in #NP.
 * A yield costs ~100 us of host CPU (the #UD, the emulated handler, the sleep and the
 * wake-up, the timer interrupt): the tick period is the knob that bounds it.
 * The timer handler counts the tick, sends EOI and returns; it changes no register.
 */

.set CODE, 0x2000                   /* where the program lives (guest-physical = virtual) */

/* Params block (written by the host before any vCPU runs) */
.set PARAMS_TICK_NS,        0x100c  /* LAPIC timer initial count: ns at KVM's 1 GHz bus */
.set PARAMS_LOOPS_PER_TICK, 0x1010
.set PARAMS_DIRTY_PAGES,    0x1014  /* working-set pages dirtied per tick */
.set PARAMS_WS_PAGES,       0x1018  /* pages of each vCPU's working set in use */

/* Control block fields (offsets from FS) */
.set CB_COUNTER,     0x00  /* u64, loops done */
.set CB_FAIL_CODE,   0x08  /* u32, FAIL_* (0: none) */
.set CB_FAIL_WHERE,  0x0c  /* u32, the register's number, or the exception's vector */
.set CB_FAIL_VALUE,  0x10  /* u64, the register's value, or the exception's RIP */
.set CB_SEQ,         0x18  /* u32, odd while the block and its sum change */
.set CB_SUM,         0x1c  /* u32, sum of the block's words, mod 2^32 */
.set CB_TICKS,       0x20  /* u32, timer interrupts taken */
.set CB_BUDGET,      0x24  /* u32, loops left in this tick */
.set CB_WS_CURSOR,   0x28  /* u32, the next working-set page to dirty */
.set CB_INDEX,       0x30  /* u64, host: i */
.set CB_STACK_TOP,   0x38  /* u64, host: the user stack top */
.set CB_BLOCK,       0x40  /* u64, host: the checksum block's address */
.set CB_WS_BASE,     0x48  /* u64, host: the working set's first page */

/* GDT selectors for user mode (RPL 3) */
.set USER_DATA_SELECTOR, 0x1b
.set USER_CODE_SELECTOR, 0x23
.set USER_RFLAGS,        0x202     /* IF and the reserved bit */

/* xAPIC registers: MMIO at APIC_BASE, emulated by KVM's in-kernel LAPIC */
.set APIC_BASE,      0xfee00000
.set APIC_EOI,       0xfee000b0
.set APIC_SPIV,      0xf0          /* offsets from APIC_BASE */
.set APIC_LVTT,      0x320
.set APIC_TMICT,     0x380
.set APIC_TDCR,      0x3e0
.set TIMER_VECTOR,    0x20
.set SPURIOUS_VECTOR, 0xff
.set APIC_ENABLE,          0x100
.set APIC_TIMER_PERIODIC,  0x20000
.set APIC_DIVIDE_BY_1,     0xb

/* The values the program computes */
.set INDEX_MUL, 0x9e3779b97f4a7c15
.set INDEX_ADD, 0x6a09e667f3bcc909
.set VALUE_MUL, 0x01000193
.set CHECKSUM_WORDS, 64

/* Exceptions that push an error code: 8, 10-14, 17, 21, 29, 30 */
.set ERROR_CODE_VECTORS, 0x60227d00

/* Failure codes */
.set FAIL_GENERAL_REGISTER, 1
.set FAIL_VECTOR_REGISTER,  2
.set FAIL_CHECKSUM,         3
.set FAIL_SKEW,             4
.set FAIL_STACK,            5
.set FAIL_EXCEPTION,        6

/* Register numbers, for CB_FAIL_WHERE */
.set REG_RBX, 3
.set REG_RSP, 4
.set REG_RBP, 5
.set REG_RSI, 6

    .code64
    .text

/* ---- kernel entry (CPL 0): start the LAPIC timer, go to user mode */
kernel_entry:
    mov     $APIC_BASE, %edi
    movl    $(APIC_ENABLE | SPURIOUS_VECTOR), APIC_SPIV(%rdi)
    movl    $APIC_DIVIDE_BY_1, APIC_TDCR(%rdi)
    movl    $(APIC_TIMER_PERIODIC | TIMER_VECTOR), APIC_LVTT(%rdi)
    mov     PARAMS_TICK_NS, %eax
    mov     %eax, APIC_TMICT(%rdi)      /* starts the timer */
    pushq   $USER_DATA_SELECTOR         /* an IRET frame: SS, RSP, RFLAGS, CS, RIP */
    pushq   %fs:CB_STACK_TOP
    pushq   $USER_RFLAGS
    pushq   $USER_CODE_SELECTOR
    pushq   $(CODE + user_entry - kernel_entry)
    iretq

/* ---- user entry (CPL 3): make the register values */
user_entry:
    movabs  $INDEX_MUL, %rbp
    imul    %rsi, %rbp
    movabs  $INDEX_ADD, %rax
    add     %rax, %rbp
    mov     %rbp, %r8
    rol     $8, %r8
    mov     %rbp, %r9
    rol     $9, %r9
    mov     %rbp, %r10
    rol     $10, %r10
    mov     %rbp, %r12
    rol     $12, %r12
    mov     %rbp, %r13
    rol     $13, %r13
    mov     %rbp, %r14
    rol     $14, %r14
    mov     %rbp, %r15
    rol     $15, %r15
    vmovq   %rsi, %xmm0
    vpinsrq $1, %rbp, %xmm0, %xmm0
    vpcmpeqd %xmm1, %xmm1, %xmm1
    vpxor   %xmm1, %xmm0, %xmm1
    vinsertf128 $1, %xmm1, %ymm0, %ymm0
    vcmptrueps %ymm1, %ymm1, %ymm1
    vxorps  %ymm1, %ymm0, %ymm15
    mov     %fs:CB_SUM, %ebx            /* 0 on a fresh block */
    mov     PARAMS_LOOPS_PER_TICK, %eax
    mov     %eax, %fs:CB_BUDGET

/* ---- one loop: the checks */
work:
    cmp     %fs:CB_INDEX, %rsi
    jne     bad_rsi
    movabs  $INDEX_MUL, %rax
    imul    %rsi, %rax
    movabs  $INDEX_ADD, %rdx
    add     %rdx, %rax
    cmp     %rax, %rbp
    jne     bad_rbp
    mov     %rbp, %rax
    rol     $8, %rax
    cmp     %rax, %r8
    jne     bad_r8
    rol     $1, %rax
    cmp     %rax, %r9
    jne     bad_r9
    rol     $1, %rax
    cmp     %rax, %r10
    jne     bad_r10
    rol     $2, %rax
    cmp     %rax, %r12
    jne     bad_r12
    rol     $1, %rax
    cmp     %rax, %r13
    jne     bad_r13
    rol     $1, %rax
    cmp     %rax, %r14
    jne     bad_r14
    rol     $1, %rax
    cmp     %rax, %r15
    jne     bad_r15
    cmp     %fs:CB_STACK_TOP, %rsp
    jne     bad_rsp
    vmovq   %rsi, %xmm1                 /* YMM1: the pattern YMM0 must hold */
    vpinsrq $1, %rbp, %xmm1, %xmm1
    vpcmpeqd %xmm2, %xmm2, %xmm2
    vpxor   %xmm2, %xmm1, %xmm2
    vinsertf128 $1, %xmm2, %ymm1, %ymm1
    vxorps  %ymm0, %ymm1, %ymm2
    vptest  %ymm2, %ymm2                /* ZF: YMM0 == YMM1 */
    jnz     bad_ymm0
    vxorps  %ymm15, %ymm1, %ymm2
    vcmptrueps %ymm3, %ymm3, %ymm3
    vptest  %ymm3, %ymm2                /* CF: YMM15 == ~YMM1 */
    jnc     bad_ymm15
    cmp     %fs:CB_SUM, %ebx
    jne     bad_skew
    mov     %fs:CB_BLOCK, %rdi
    xor     %eax, %eax
    mov     $CHECKSUM_WORDS, %ecx
1:  add     -4(%rdi,%rcx,4), %eax
    dec     %ecx
    jnz     1b
    cmp     %eax, %ebx
    jne     bad_sum

/* ---- one loop: the work. Word (counter mod 64) of the block := counter * VALUE_MUL ^ EBP */
    mov     %fs:CB_COUNTER, %rax
    mov     %eax, %edx
    and     $(CHECKSUM_WORDS - 1), %edx
    imul    $VALUE_MUL, %eax, %eax
    xor     %ebp, %eax
    incl    %fs:CB_SEQ                  /* odd: the block and its sum disagree */
    sub     (%rdi,%rdx,4), %ebx
    add     %eax, %ebx
    mov     %eax, (%rdi,%rdx,4)
    mov     %ebx, %fs:CB_SUM
    incl    %fs:CB_SEQ                  /* even: they agree again */
    incq    %fs:CB_COUNTER              /* one aligned 8-byte store: never torn */
    decl    %fs:CB_BUDGET
    jnz     work

/* ---- end of the tick's work: dirty the working set, then yield until the next tick */
    mov     PARAMS_DIRTY_PAGES, %ecx
    test    %ecx, %ecx
    jz      2f
    mov     %fs:CB_WS_CURSOR, %edx
    mov     %fs:CB_COUNTER, %rdi        /* what each page gets: the counter */
1:  cmp     PARAMS_WS_PAGES, %edx
    jb      3f
    xor     %edx, %edx
3:  mov     %rdx, %rax
    shl     $12, %rax
    add     %fs:CB_WS_BASE, %rax
    mov     %rdi, (%rax)
    inc     %edx
    dec     %ecx
    jnz     1b
    mov     %edx, %fs:CB_WS_CURSOR
2:  mov     PARAMS_LOOPS_PER_TICK, %eax
    mov     %eax, %fs:CB_BUDGET
yield_site:
    ud2
    jmp     work

/* ---- a failed check: the code in EAX, the register's number in ECX, its value in RDX */
bad_rsi:
    mov     $REG_RSI, %ecx
    mov     %rsi, %rdx
    jmp     bad_register
bad_rbp:
    mov     $REG_RBP, %ecx
    mov     %rbp, %rdx
    jmp     bad_register
bad_r8:
    mov     $8, %ecx
    mov     %r8, %rdx
    jmp     bad_register
bad_r9:
    mov     $9, %ecx
    mov     %r9, %rdx
    jmp     bad_register
bad_r10:
    mov     $10, %ecx
    mov     %r10, %rdx
    jmp     bad_register
bad_r12:
    mov     $12, %ecx
    mov     %r12, %rdx
    jmp     bad_register
bad_r13:
    mov     $13, %ecx
    mov     %r13, %rdx
    jmp     bad_register
bad_r14:
    mov     $14, %ecx
    mov     %r14, %rdx
    jmp     bad_register
bad_r15:
    mov     $15, %ecx
    mov     %r15, %rdx
bad_register:
    mov     $FAIL_GENERAL_REGISTER, %eax
    jmp     fail
bad_rsp:
    mov     $REG_RSP, %ecx
    mov     %rsp, %rdx
    mov     $FAIL_STACK, %eax
    jmp     fail
bad_ymm0:
    xor     %ecx, %ecx
    jmp     bad_vector
bad_ymm15:
    mov     $15, %ecx
bad_vector:
    xor     %edx, %edx
    mov     $FAIL_VECTOR_REGISTER, %eax
    jmp     fail
bad_skew:
    mov     $REG_RBX, %ecx
    mov     %rbx, %rdx
    mov     $FAIL_SKEW, %eax
    jmp     fail
bad_sum:
    mov     $REG_RBX, %ecx
    mov     %rax, %rdx                  /* what the block adds up to */
    mov     $FAIL_CHECKSUM, %eax
fail:
    mov     %rdx, %fs:CB_FAIL_VALUE     /* the details first: valid once the code is set */
    mov     %ecx, %fs:CB_FAIL_WHERE
    mov     %eax, %fs:CB_FAIL_CODE
    ud2                                 /* not the yield: the kernel halts this vCPU */

/* ---- kernel: interrupt and exception handlers (interrupt gates: IF clear inside) */
timer_interrupt:
    incl    %fs:CB_TICKS
    movabs  %eax, APIC_EOI              /* any value ends the interrupt; EAX is unchanged */
    iretq
spurious_interrupt:                     /* no EOI for a spurious interrupt */
    iretq
invalid_opcode:                         /* #UD: the yield, or a real one */
    cmpq    $(CODE + yield_site - kernel_entry), (%rsp)
    jne     exceptions + 4 * 6
    addq    $2, (%rsp)                  /* return past the UD2 */
    sti
    hlt                                 /* until the timer interrupt, which returns here */
    iretq

/* One 4-byte stub per exception vector 0-31 (IDT entry v points at exceptions + 4v, but
 * #UD's at invalid_opcode): push the vector, go to the common part. */
exceptions:
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    push    $\vector
    jmp     exception
    .endr
exception:                              /* [RSP]: vector, then error code (some), RIP */
    pop     %rdx
    cmpl    $0, %fs:CB_FAIL_CODE
    jne     halt_forever                /* a failure written already stays the first */
    mov     $ERROR_CODE_VECTORS, %eax
    bt      %edx, %eax
    jnc     1f
    add     $8, %rsp
1:  mov     (%rsp), %rax
    mov     %rax, %fs:CB_FAIL_VALUE
    mov     %edx, %fs:CB_FAIL_WHERE
    movl    $FAIL_EXCEPTION, %fs:CB_FAIL_CODE
halt_forever:
    cli
    hlt
    jmp     halt_forever
