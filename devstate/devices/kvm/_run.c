/* devstate.devices.kvm._run: one native thread per vCPU of a VM, looping in KVM_RUN, and
 * the stop and resume of all of them (devstate/devices/kvm/run.py drives it).
 *
 * Why native: resuming a VM is the end of the downtime. Python threads would each need the
 * GIL to wake up and to issue KVM_RUN, one after another; these threads never touch Python,
 * and a resume is one futex broadcast to all of them.
 *
 * The protocol (every word below is an atomic in struct shared or struct vcpu):
 *
 *   vCPU thread                           controller (stop / arm / resume / close)
 *   -----------                           ----------------------------------------
 *   phase == RUN? entered++ (the last     stop:   phase = STOP; released = 0 and wake;
 *     wakes the controller), wait until           for each vCPU immediate_exit = 1, then
 *     released, then loop KVM_RUN until           pthread_kill; wait until parked == n
 *     phase != RUN (EINTR or              arm:    parked = entered = 0; immediate_exit
 *     KVM_EXIT_INTR: look again; any              = 0; phase = RUN; generation++ and wake
 *     other exit: record a fault)                 all; return
 *   park: parked++ (the last wakes the    resume: arm, unless armed; wait until entered
 *     controller); futex-wait until               == n; then released = generation and
 *     generation changes                          wake all
 *   phase == CLOSE? exit                  close:  phase = CLOSE; as stop; generation++
 *                                                 and wake all; join
 *
 * Why arm apart: a destination arms its guest before its load, so the threads wake before
 * the source even stops, and the resume after the commit only releases them (the wake-ups
 * of 288 threads on 2 host CPUs took 1.7-2 ms of the downtime). Armed threads wait at the
 * barrier and touch no vCPU, so the load may put the vCPUs meanwhile, and a stop parks
 * them again (a migration that fails).
 *
 * Why the entry barrier: with busy guests, the first threads back in KVM_RUN take the host
 * CPUs, and the others wait for a time slice before they can even wake up (measured: 1.4 s
 * for the last of 288 spinning vCPUs on 2 host CPUs; 1 ms with the barrier). Waking every
 * thread while no vCPU is in the guest, then releasing them together, makes a resume as
 * long as the wake-ups, like QEMU's resume_all_vcpus; how the host then shares its CPUs
 * among runnable vCPUs is no longer the migration's doing. The controller releases them,
 * after it was woken, so that it is on a CPU when they become runnable: released by the
 * last thread, they took the CPUs first and the controller returned 0.4-0.7 s later.
 *
 * Why SCHED_BATCH for the vCPU threads: it is SCHED_OTHER (the same CPU share by nice
 * level) without wakeup preemption, so a thread woken by a resume, a kick or a guest
 * interrupt waits for the running task's slice instead of preempting it. Without it, the
 * controller, or any thread of the VMM's, stays preempted while host CPUs are overcommitted
 * (a resume of 64 spinning vCPUs on 2 host CPUs returned after 175-240 ms; of 288, ~1 s;
 * with it, 0.25 ms and 1.1-1.9 ms). On a host with a CPU per vCPU it changes nothing.
 *
 * immediate_exit closes the race of a kick that lands before the thread is in KVM_RUN: KVM
 * checks it on entry and returns EINTR at once. The kick (a signal with a handler that does
 * nothing, so KVM_RUN returns EINTR) gets a thread out of guest mode or out of a halt.
 * A parked thread touches neither its vCPU fd nor its kvm_run, so other threads may issue
 * the vCPU's KVM_GET_* and KVM_SET_* ioctls until the next resume.
 *
 * A thread records when it parks and when it arrives at the entry barrier; stop and resume
 * answer the latest of those times (CLOCK_MONOTONIC, Python's time.monotonic_ns).
 *
 * Memory: struct shared is plain C memory the threads use; the Python object only points
 * at it, and frees it after every thread it started has been joined.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* A vCPU thread runs KVM_RUN and a signal handler that does nothing: 64 KiB is plenty,
 * and 288 threads then reserve 18 MiB of address space instead of 2.3 GiB (8 MiB each). */
#define STACK_BYTES (64 * 1024)
/* What a fault keeps of kvm_run: the header and the exit union (the reason's details). */
#define SNAPSHOT_BYTES offsetof(struct kvm_run, kvm_valid_regs)

enum phase { PHASE_RUN = 0, PHASE_STOP = 1, PHASE_CLOSE = 2 };

struct shared;

struct vcpu {
    struct shared *s;
    int fd, id;
    struct kvm_run *run;  /* the vCPU fd's mmap; immediate_exit is written by the controller */
    pthread_t thread;
    int created;
    atomic_int parked;          /* 1 while the thread is parked (off KVM_RUN) */
    atomic_uint entered_gen;    /* the generation it last arrived at the entry barrier in */
    atomic_llong park_ns, enter_ns;
    /* A fault: written by the thread before it stores faulted = 1, read after. */
    atomic_int faulted;
    int fault_errno;  /* KVM_RUN's errno; 0 when it returned an exit reason */
    unsigned char snapshot[SNAPSHOT_BYTES];
};

struct shared {
    atomic_uint phase;
    atomic_uint generation;  /* futex: bumped by resume and close; starts at 1 */
    atomic_uint parked;      /* futex: threads parked; the last one to park wakes the waiter */
    atomic_uint entered;     /* futex: threads entered since the last resume; likewise */
    atomic_uint released;    /* futex: the generation the controller released; 0: none */
    atomic_llong released_ns; /* when the controller last released the threads */
    unsigned n;
    size_t map_bytes;
    int signum;
    pid_t owner;  /* the process whose threads these are (a forked child has none of them) */
    struct vcpu v[];
};

static int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The futex words are atomic_uint: the same size and representation as the kernel's u32. */
static void futex_wait(atomic_uint *word, unsigned expected, const struct timespec *timeout) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, timeout, NULL, 0);
}

static void futex_wake_all(atomic_uint *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static void kick_noop(int signum) { (void)signum; }

/* Give the kick signal our handler unless it has one: ignored, the kick would be lost (a
 * thread in guest mode would stay there); by default, it would end the process. Any
 * installed handler does, because KVM_RUN is never restarted. No SA_RESTART. */
static int ensure_kick_handler(int signum) {
    struct sigaction old;
    if (sigaction(signum, NULL, &old) < 0)
        return -1;
    if (!(old.sa_flags & SA_SIGINFO) && (old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = kick_noop;
        sigemptyset(&sa.sa_mask);
        return sigaction(signum, &sa, NULL);
    }
    return 0;
}

/* Arrive at the entry barrier of generation gen and wait until the controller releases it;
 * 1 when released, 0 when the phase left RUN first (a stop or close, which set released to
 * 0, so that a wait that began after the phase check fails at once). */
static int enter_together(struct vcpu *v, unsigned gen) {
    struct shared *s = v->s;
    atomic_store(&v->entered_gen, gen);
    atomic_store(&v->enter_ns, mono_ns());
    if (atomic_fetch_add(&s->entered, 1) + 1 == s->n)
        futex_wake_all(&s->entered);
    unsigned seen;
    while ((seen = atomic_load(&s->released)) != gen) {
        if (atomic_load(&s->phase) != PHASE_RUN)
            return 0;
        futex_wait(&s->released, seen, NULL);
    }
    return 1;
}

/* KVM_RUN until the phase leaves RUN, or an exit this runner does not handle (a fault). */
static void run_until_stopped(struct vcpu *v) {
    struct shared *s = v->s;
    while (atomic_load(&s->phase) == PHASE_RUN) {
        int r = ioctl(v->fd, KVM_RUN, 0);
        /* A kick, or immediate_exit: look at the phase again. */
        if ((r < 0 && errno == EINTR) || (r == 0 && v->run->exit_reason == KVM_EXIT_INTR))
            continue;
        v->fault_errno = r < 0 ? errno : 0;
        memcpy(v->snapshot, v->run, SNAPSHOT_BYTES);
        atomic_store(&v->faulted, 1);
        return;
    }
}

static void *vcpu_main(void *arg) {
    struct vcpu *v = arg;
    struct shared *s = v->s;
    unsigned gen = 1;  /* generation only moves once every thread has parked in this one */
    struct sched_param none = {0};
    /* Best effort (see the top of the file): refused, the thread is only less polite. */
    pthread_setschedparam(pthread_self(), SCHED_BATCH, &none);
    for (;;) {
        if (atomic_load(&s->phase) == PHASE_RUN && enter_together(v, gen))
            run_until_stopped(v);
        atomic_store(&v->parked, 1);
        atomic_store(&v->park_ns, mono_ns());
        if (atomic_fetch_add(&s->parked, 1) + 1 == s->n)
            futex_wake_all(&s->parked);
        unsigned now;
        while ((now = atomic_load(&s->generation)) == gen)
            futex_wait(&s->generation, gen, NULL); /* EINTR (a kick while parked): recheck */
        gen = now;
        atomic_store(&v->parked, 0);
        if (atomic_load(&s->phase) == PHASE_CLOSE)
            return NULL;
    }
}

/* Wait until *count reaches n or timeout_ns passes; 0 or -1 (timed out). No GIL. */
static int wait_all(struct shared *s, atomic_uint *count, int64_t timeout_ns) {
    int64_t deadline = mono_ns() + timeout_ns;
    for (;;) {
        unsigned c = atomic_load(count);
        if (c >= s->n)
            return 0;
        int64_t left = deadline - mono_ns();
        if (left <= 0)
            return -1;
        struct timespec t = {left / 1000000000, left % 1000000000};
        futex_wait(count, c, &t);
    }
}

/* Release the threads waiting at the entry barrier, once all arrived in time. */
static void release_all(struct shared *s, int late) {
    if (late)
        return;
    atomic_store(&s->released_ns, mono_ns());
    atomic_store(&s->released, atomic_load(&s->generation));
    futex_wake_all(&s->released);
}

/* Wake every parked thread to the entry barrier of a new generation (one broadcast); they
 * wait there, touching no vCPU, until release_all or a stop. */
static void wake_to_barrier(struct shared *s) {
    atomic_store(&s->parked, 0);
    atomic_store(&s->entered, 0);
    for (unsigned i = 0; i < s->n; i++)
        __atomic_store_n(&s->v[i].run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    atomic_store(&s->phase, PHASE_RUN);
    atomic_fetch_add(&s->generation, 1);
    futex_wake_all(&s->generation);
}

/* Out of the entry barrier and out of KVM_RUN, every thread not parked already; the
 * phase has left RUN. */
static void kick_all(struct shared *s) {
    atomic_store(&s->released, 0);
    futex_wake_all(&s->released);
    for (unsigned i = 0; i < s->n; i++) {
        struct vcpu *v = &s->v[i];
        __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        if (v->created && !atomic_load(&v->parked))
            pthread_kill(v->thread, s->signum);
    }
}

/* Every thread out of its loop and joined; after this no thread of ours exists. */
static void shut_down(struct shared *s) {
    atomic_store(&s->phase, PHASE_CLOSE);
    ensure_kick_handler(s->signum);
    kick_all(s);
    atomic_fetch_add(&s->generation, 1);
    futex_wake_all(&s->generation);
    for (unsigned i = 0; i < s->n; i++) {
        if (s->v[i].created) {
            pthread_join(s->v[i].thread, NULL);
            s->v[i].created = 0;
        }
    }
}

static void free_shared(struct shared *s) {
    for (unsigned i = 0; i < s->n; i++)
        if (s->v[i].run != NULL)
            munmap(s->v[i].run, s->map_bytes);
    PyMem_RawFree(s);
}

/* Start one thread per vCPU; 0, or an errno after joining those already started. */
static int spawn_all(struct shared *s) {
    pthread_attr_t attr;
    sigset_t mask;
    int err = pthread_attr_init(&attr);
    if (err)
        return err;
    /* Small stacks (see STACK_BYTES), and every signal blocked but the kick: SIGINT and
     * friends go to Python's threads, where Python handles them. */
    long least = sysconf(_SC_THREAD_STACK_MIN);
    err = pthread_attr_setstacksize(&attr, least > STACK_BYTES ? (size_t)least : STACK_BYTES);
    sigfillset(&mask);
    sigdelset(&mask, s->signum);
    if (!err)
        err = pthread_attr_setsigmask_np(&attr, &mask);
    for (unsigned i = 0; i < s->n && !err; i++) {
        err = pthread_create(&s->v[i].thread, &attr, vcpu_main, &s->v[i]);
        if (!err) {
            char name[16];
            s->v[i].created = 1;
            snprintf(name, sizeof name, "vcpu/%d", s->v[i].id);
            pthread_setname_np(s->v[i].thread, name);
        }
    }
    pthread_attr_destroy(&attr);
    if (err)
        shut_down(s);
    return err;
}

/* ------------------------------------------------------------------ the Python object */

typedef struct {
    PyObject_HEAD
    struct shared *s; /* NULL once closed */
    int started;
    int armed; /* woken to the entry barrier by arm(), not released yet */
} Runner;

static PyObject *late_list(struct shared *s, int stopping) {
    PyObject *late = PyList_New(0);
    for (unsigned i = 0; late && i < s->n; i++) {
        struct vcpu *v = &s->v[i];
        int ok = stopping ? atomic_load(&v->parked)
                          : atomic_load(&v->entered_gen) == atomic_load(&s->generation);
        if (!ok) {
            PyObject *at = PyLong_FromUnsignedLong(i);
            if (!at || PyList_Append(late, at) < 0)
                Py_CLEAR(late);
            Py_XDECREF(at);
        }
    }
    return late;
}

/* (latest park or entry ns, positions that did not get there in time) */
static PyObject *outcome(struct shared *s, int stopping) {
    long long latest = 0;
    for (unsigned i = 0; i < s->n; i++) {
        long long t = atomic_load(stopping ? &s->v[i].park_ns : &s->v[i].enter_ns);
        latest = t > latest ? t : latest;
    }
    PyObject *late = late_list(s, stopping);
    return late ? Py_BuildValue("(LN)", latest, late) : NULL;
}

static int check_open(Runner *self) {
    if (self->s == NULL) {
        PyErr_SetString(PyExc_ValueError, "the runner is closed");
        return -1;
    }
    if (self->s->owner != getpid()) {
        PyErr_SetString(PyExc_ValueError, "the runner belongs to another process");
        return -1;
    }
    return 0;
}

static int64_t to_ns(double seconds) { return (int64_t)(seconds * 1e9); }

static int Runner_init(Runner *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fds", "ids", "map_bytes", "signum", NULL};
    PyObject *fds_obj, *ids_obj;
    Py_ssize_t map_bytes;
    int signum;
    if (self->s != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Runner.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOni", kwlist, &fds_obj, &ids_obj, &map_bytes,
                                     &signum))
        return -1;
    PyObject *fds = PySequence_Fast(fds_obj, "fds must be a sequence");
    PyObject *ids = fds ? PySequence_Fast(ids_obj, "ids must be a sequence") : NULL;
    struct shared *s = NULL;
    int rc = -1;
    if (!ids)
        goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fds);
    if (PySequence_Fast_GET_SIZE(ids) != n || n < 1 || n > INT_MAX ||
        map_bytes < (Py_ssize_t)sizeof(struct kvm_run) || signum < SIGRTMIN || signum > SIGRTMAX) {
        PyErr_SetString(PyExc_ValueError, "fds and ids must be as long as each other and not "
                                          "empty, map_bytes hold a kvm_run, signum be a "
                                          "real-time signal");
        goto out;
    }
    s = PyMem_RawCalloc(1, sizeof *s + (size_t)n * sizeof(struct vcpu));
    if (!s) {
        PyErr_NoMemory();
        goto out;
    }
    s->n = (unsigned)n;
    s->map_bytes = (size_t)map_bytes;
    s->signum = signum;
    s->owner = getpid();
    atomic_store(&s->generation, 1);
    for (Py_ssize_t i = 0; i < n; i++) {
        struct vcpu *v = &s->v[i];
        v->s = s;
        v->fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
        v->id = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(ids, i));
        if (PyErr_Occurred())
            goto out;
        void *run = mmap(NULL, s->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (run == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
        v->run = run;
        /* An earlier runner of this vCPU closed with it set: KVM_RUN would never enter. */
        v->run->immediate_exit = 0;
    }
    if (ensure_kick_handler(signum) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    self->s = s;
    s = NULL;
    rc = 0;
out:
    if (s)
        free_shared(s);
    Py_XDECREF(fds);
    Py_XDECREF(ids);
    return rc;
}

PyDoc_STRVAR(start_doc,
"start(paused, timeout) -> (ns, late)\n\n"
"Start one thread per vCPU: running (released into KVM_RUN together) or, if ``paused``,\n"
"parked. Waits until every thread got there; ``ns`` is when the last did, ``late`` those\n"
"that did not (positions) within ``timeout`` seconds. Raises OSError if a thread cannot be created\n"
"(those already started are joined first).");

static PyObject *Runner_start(Runner *self, PyObject *args) {
    int paused, err = 0;
    double timeout;
    if (!PyArg_ParseTuple(args, "pd", &paused, &timeout) || check_open(self) < 0)
        return NULL;
    if (self->started) {
        PyErr_SetString(PyExc_ValueError, "the runner was started already");
        return NULL;
    }
    self->started = 1;
    struct shared *s = self->s;
    atomic_store(&s->phase, paused ? PHASE_STOP : PHASE_RUN);
    Py_BEGIN_ALLOW_THREADS
    err = spawn_all(s);
    if (!err && paused)
        wait_all(s, &s->parked, to_ns(timeout)); /* the late list says if not */
    else if (!err)
        release_all(s, wait_all(s, &s->entered, to_ns(timeout)) < 0);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return outcome(s, paused);
}

PyDoc_STRVAR(stop_doc,
"stop(timeout) -> (ns, late)\n\n"
"Get every vCPU out of KVM_RUN and parked; ``ns`` is when the last parked, ``late`` the\n"
"positions of those not parked within ``timeout`` seconds. The GIL is released.");

static PyObject *Runner_stop(Runner *self, PyObject *args) {
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout) || check_open(self) < 0)
        return NULL;
    struct shared *s = self->s;
    self->armed = 0;
    Py_BEGIN_ALLOW_THREADS
    atomic_store(&s->phase, PHASE_STOP);
    ensure_kick_handler(s->signum);
    kick_all(s);
    wait_all(s, &s->parked, to_ns(timeout));
    Py_END_ALLOW_THREADS
    return outcome(s, 1);
}

/* Every thread parked and none faulted: what arm and resume need (ValueError if not). */
static int check_parked(struct shared *s) {
    for (unsigned i = 0; i < s->n; i++) {
        if (!atomic_load(&s->v[i].parked) || atomic_load(&s->v[i].faulted)) {
            PyErr_Format(PyExc_ValueError, "vCPU at %u is not parked, or faulted", i);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(arm_doc,
"arm()\n\n"
"Wake every parked thread to the entry barrier (one broadcast; the GIL is released) and\n"
"return: the threads wait there, touching no vCPU, for resume() to release them, or\n"
"stop() to park them again. So the wake-ups are paid before the resume, not in it.\n"
"Every thread must be parked and none faulted (ValueError otherwise).");

static PyObject *Runner_arm(Runner *self, PyObject *unused) {
    (void)unused;
    if (check_open(self) < 0 || check_parked(self->s) < 0)
        return NULL;
    struct shared *s = self->s;
    Py_BEGIN_ALLOW_THREADS
    wake_to_barrier(s); /* a broadcast to n sleepers: ~1-2 ms for 288 on 2 host CPUs */
    Py_END_ALLOW_THREADS
    self->armed = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(resume_doc,
"resume(timeout) -> (ns, late)\n\n"
"Wake every parked thread to the entry barrier (unless arm() did), then, once all are\n"
"there, release them into KVM_RUN; ``ns`` is when they were released, ``late`` the\n"
"positions of those that did not arrive within ``timeout`` seconds (then none is\n"
"released, and ``ns`` is the last arrival). Every thread must be parked or armed and none\n"
"faulted (ValueError otherwise).");

static PyObject *Runner_resume(Runner *self, PyObject *args) {
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout) || check_open(self) < 0)
        return NULL;
    struct shared *s = self->s;
    int armed = self->armed;
    if (!armed && check_parked(s) < 0)
        return NULL;
    self->armed = 0;
    int late;
    Py_BEGIN_ALLOW_THREADS
    if (!armed)
        wake_to_barrier(s);
    late = wait_all(s, &s->entered, to_ns(timeout)) < 0;
    release_all(s, late);
    Py_END_ALLOW_THREADS
    if (late)
        return outcome(s, 0);
    PyObject *none_late = PyList_New(0);
    return none_late ? Py_BuildValue("(LN)", (long long)atomic_load(&s->released_ns),
                                     none_late) : NULL;
}

PyDoc_STRVAR(faults_doc,
"faults() -> [(position, errno, snapshot)]\n\n"
"The vCPUs whose KVM_RUN ended in a way the runner does not handle; ``snapshot`` is their\n"
"kvm_run up to the end of its exit union, as it was then.");

static PyObject *Runner_faults(Runner *self, PyObject *unused) {
    (void)unused;
    if (check_open(self) < 0)
        return NULL;
    PyObject *faults = PyList_New(0);
    for (unsigned i = 0; faults && i < self->s->n; i++) {
        struct vcpu *v = &self->s->v[i];
        if (!atomic_load(&v->faulted))
            continue;
        PyObject *item = Py_BuildValue("(Iiy#)", i, v->fault_errno, v->snapshot,
                                       (Py_ssize_t)SNAPSHOT_BYTES);
        if (!item || PyList_Append(faults, item) < 0)
            Py_CLEAR(faults);
        Py_XDECREF(item);
    }
    return faults;
}

static void close_runner(Runner *self) {
    struct shared *s = self->s;
    if (s == NULL)
        return;
    self->s = NULL;
    /* In a forked child the threads are the parent's, and so are the kvm_run pages
     * (MAP_SHARED): kicking would stop the parent's vCPUs, joining would wait forever. */
    if (s->owner != getpid())
        return;
    Py_BEGIN_ALLOW_THREADS
    shut_down(s);
    Py_END_ALLOW_THREADS
    free_shared(s);
}

PyDoc_STRVAR(close_doc,
"close()\n\n"
"Stop and join every thread, unmap every kvm_run. Idempotent.");

static PyObject *Runner_close(Runner *self, PyObject *unused) {
    (void)unused;
    close_runner(self);
    Py_RETURN_NONE;
}

static void Runner_dealloc(Runner *self) {
    close_runner(self); /* never leave a thread running on freed memory */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef runner_methods[] = {
    {"start", (PyCFunction)Runner_start, METH_VARARGS, start_doc},
    {"stop", (PyCFunction)Runner_stop, METH_VARARGS, stop_doc},
    {"arm", (PyCFunction)Runner_arm, METH_NOARGS, arm_doc},
    {"resume", (PyCFunction)Runner_resume, METH_VARARGS, resume_doc},
    {"faults", (PyCFunction)Runner_faults, METH_NOARGS, faults_doc},
    {"close", (PyCFunction)Runner_close, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "devstate.devices.kvm._run.Runner",
    .tp_doc = PyDoc_STR("Runner(fds, ids, map_bytes, signum): one native thread per vCPU "
                        "looping in KVM_RUN, stopped and resumed together."),
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Runner_init,
    .tp_dealloc = (destructor)Runner_dealloc,
    .tp_methods = runner_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_run",
    "Native vCPU threads looping in KVM_RUN, stopped and resumed together.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__run(void) {
    if (PyType_Ready(&RunnerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SNAPSHOT_BYTES", (long)SNAPSHOT_BYTES) < 0 ||
        PyModule_AddObjectRef(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
