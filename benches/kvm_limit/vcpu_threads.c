// Copied from the project's shared tools (tools/kvm-limit/vcpu_threads.c) so that the
// benchmarks can build the reference from a clean clone; see benches/one_vm.py. One
// addition, off unless asked: a third argument TICK_NS arms every vCPU's LAPIC timer as a
// live guest's tick (periodic, TICK_NS apart) before the timed rounds, on this VM and on a
// second, idle VM of as many vCPUs: a live migration has two VMs whose timers fire on the
// host while their vCPUs are stopped or being loaded, and what those interrupts cost the
// same ioctls is part of the limit for such a guest.
// Physical-limit probe: get (and put) the state of N KVM vCPUs of ONE VM from T threads of
// one process, in C, with nothing else in the loop. Tells whether the kernel lets the
// vCPUs of one VM be read/written in parallel on this host (the only path a real VMM has).
// Build: gcc -O2 -pthread vcpu_threads.c -o vcpu_threads ; run: ./vcpu_threads NVCPUS ROUNDS [TICK_NS]
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static int nv; static int *vfd;
// The same state a VMM migrates: CPUID set from KVM_GET_SUPPORTED_CPUID, SREGS2, XSAVE2 at
// the size KVM asks for, and every MSR of KVM_GET_MSR_INDEX_LIST that a vCPU really reads.
#define MAXMSR 512
struct st { struct kvm_regs r; struct kvm_sregs2 s; struct kvm_lapic_state l;
            struct kvm_xcrs x; struct kvm_vcpu_events e; struct kvm_debugregs d; struct kvm_mp_state m;
            struct { struct kvm_msrs h; struct kvm_msr_entry e[MAXMSR]; } msrs; char *xsave; };
static struct st *state;
static unsigned msr_idx[MAXMSR]; static unsigned NMSR; static int xsave_size;
static int do_put;
struct arg { int lo, hi, cpu; };
static void getone(int i) {
  struct st *s = &state[i]; int fd = vfd[i];
  if (ioctl(fd, KVM_GET_MP_STATE, &s->m) < 0) perror("mp");
  if (ioctl(fd, KVM_GET_REGS, &s->r) < 0) perror("regs");
  if (ioctl(fd, KVM_GET_SREGS2, &s->s) < 0) perror("sregs2");
  if (ioctl(fd, KVM_GET_XSAVE2, s->xsave) < 0) perror("xsave2");
  if (ioctl(fd, KVM_GET_XCRS, &s->x) < 0) perror("xcrs");
  s->msrs.h.nmsrs = NMSR; for (unsigned k=0;k<NMSR;k++) s->msrs.e[k].index = msr_idx[k];
  if (ioctl(fd, KVM_GET_MSRS, &s->msrs) != (int)NMSR) perror("msrs");
  if (ioctl(fd, KVM_GET_LAPIC, &s->l) < 0) perror("lapic");
  if (ioctl(fd, KVM_GET_VCPU_EVENTS, &s->e) < 0) perror("events");
  if (ioctl(fd, KVM_GET_DEBUGREGS, &s->d) < 0) perror("dbg");
}
static void putone(int i) {
  struct st *s = &state[i]; int fd = vfd[i];
  ioctl(fd, KVM_SET_MP_STATE, &s->m); ioctl(fd, KVM_SET_REGS, &s->r); ioctl(fd, KVM_SET_SREGS2, &s->s);
  ioctl(fd, KVM_SET_XSAVE, s->xsave); ioctl(fd, KVM_SET_XCRS, &s->x); if (ioctl(fd, KVM_SET_MSRS, &s->msrs) != (int)NMSR) { static int once; if (!once++) fprintf(stderr, "set msrs: short\n"); }
  ioctl(fd, KVM_SET_LAPIC, &s->l); ioctl(fd, KVM_SET_VCPU_EVENTS, &s->e); ioctl(fd, KVM_SET_DEBUGREGS, &s->d);
}
static void *worker(void *p) {
  struct arg *a = p;
  if (a->cpu >= 0) { cpu_set_t c; CPU_ZERO(&c); CPU_SET(a->cpu, &c); sched_setaffinity(0, sizeof c, &c); }
  for (int i = a->lo; i < a->hi; i++) do_put ? putone(i) : getone(i);
  return NULL;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec*1e3 + t.tv_nsec/1e6; }
static double run(int threads, int put, int pin) {
  do_put = put; pthread_t th[64]; struct arg a[64]; double t0 = now();
  for (int k = 0; k < threads; k++) { a[k].lo = nv*k/threads; a[k].hi = nv*(k+1)/threads; a[k].cpu = pin ? k : -1;
    pthread_create(&th[k], NULL, worker, &a[k]); }
  for (int k = 0; k < threads; k++) pthread_join(th[k], NULL);
  return now() - t0;
}
int cmp(const void *a, const void *b) { double x=*(double*)a, y=*(double*)b; return x<y?-1:x>y; }
int main(int argc, char **argv) {
  nv = argc > 1 ? atoi(argv[1]) : 288; int rounds = argc > 2 ? atoi(argv[2]) : 9;
  int kvm = open("/dev/kvm", O_RDWR); int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) perror("irqchip");
  if (ioctl(vm, KVM_CREATE_PIT2, &(struct kvm_pit_config){0}) < 0) perror("pit2");
  struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid = {.h.nent = 256};
  if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) { perror("supported cpuid"); return 1; }
  xsave_size = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2); if (xsave_size < 4096) xsave_size = 4096;
  struct { struct kvm_msr_list h; unsigned idx[MAXMSR]; } list = {.h.nmsrs = MAXMSR};
  if (ioctl(kvm, KVM_GET_MSR_INDEX_LIST, &list) < 0) { perror("msr list"); return 1; }
  vfd = calloc(nv, sizeof *vfd); state = calloc(nv, sizeof *state);
  for (int i = 0; i < nv; i++) { vfd[i] = ioctl(vm, KVM_CREATE_VCPU, i); if (vfd[i] < 0) { perror("vcpu"); return 1; }
    if (ioctl(vfd[i], KVM_SET_CPUID2, &cpuid) < 0) { perror("set cpuid"); return 1; }
    state[i].xsave = aligned_alloc(64, xsave_size); memset(state[i].xsave, 0, xsave_size); }
  for (unsigned k = 0; k < list.h.nmsrs; k++) {   // keep the MSRs vCPU 0 really reads
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } one = {.h.nmsrs = 1, .e.index = list.idx[k]};
    if (ioctl(vfd[0], KVM_GET_MSRS, &one) == 1 && NMSR < MAXMSR) msr_idx[NMSR++] = list.idx[k]; }
  printf("state per vCPU: %u MSRs, xsave %d bytes\n", NMSR, xsave_size);
  run(1, 0, 0);
  unsigned tick_ns = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 10) : 0;
  if (tick_ns) {   // the live guest's timers: see the top of the file
    int vm2 = ioctl(kvm, KVM_CREATE_VM, 0);
    if (ioctl(vm2, KVM_CREATE_IRQCHIP, 0) < 0) { perror("irqchip 2"); return 1; }
    for (int i = 0; i < nv; i++) {
      char *r = state[i].l.regs;
      *(unsigned *)(r + 0xF0) |= 0x100;               // SVR: APIC software-enabled
      *(unsigned *)(r + 0x3E0) = 0xB;                 // TDCR: divide by 1 (KVM's bus: 1 ns)
      *(unsigned *)(r + 0x320) = (1u << 17) | 0xEC;   // LVTT: periodic, vector 0xEC
      *(unsigned *)(r + 0x380) = tick_ns;             // TMICT: the period
      int other = ioctl(vm2, KVM_CREATE_VCPU, i);
      if (other < 0 || ioctl(other, KVM_SET_CPUID2, &cpuid) < 0) { perror("vcpu 2"); return 1; }
      if (ioctl(vfd[i], KVM_SET_LAPIC, &state[i].l) < 0 || ioctl(other, KVM_SET_LAPIC, &state[i].l) < 0) {
        perror("arm lapic"); return 1; }
    }
    printf("LAPIC timers armed every %u ns on both VMs\n", tick_ns);
  }
  run(1, 1, 0);
  const char *names[] = {"get 1 thread", "get 2 threads", "put 1 thread", "put 2 threads"};
  double t[4][64];
  for (int r = 0; r < rounds; r++) {   // interleaved, so noise hits every variant alike
    t[0][r] = run(1, 0, 0); t[1][r] = run(2, 0, 1); t[2][r] = run(1, 1, 0); t[3][r] = run(2, 1, 1);
  }
  for (int v = 0; v < 4; v++) { qsort(t[v], rounds, sizeof(double), cmp);
    printf("%-14s %d vCPUs: median %.2f ms (%.1f us/vCPU) min %.2f\n", names[v], nv, t[v][rounds/2], t[v][rounds/2]*1e3/nv, t[v][0]); }
  printf("speed-up get %.2fx, put %.2fx\n", t[0][rounds/2]/t[1][rounds/2], t[2][rounds/2]/t[3][rounds/2]);
  return 0;
}
