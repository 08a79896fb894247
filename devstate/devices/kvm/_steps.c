/* devstate.devices.kvm._steps: run a program of ioctl steps over many vCPU records, with the
 * GIL released for the whole batch.
 *
 * Why native: a vCPU's get is ~10 ioctls of ~5 us each. From Python every one of them hands
 * the GIL over twice, so several Python threads on one VM are slower than one; from C the
 * same ioctls on threads of one process reach the host's limit (shared/tools/kvm-limit).
 *
 * What it knows: nothing of KVM. Python (devstate/devices/kvm/engine.py) turns the save and
 * restore order into a program: a flat array of fixed-size steps (struct step below), each
 * an ioctl on a byte range of the record, a copy from or check against a template, or a
 * masked comparison of the record with a scratch record (the readback). run() executes the
 * program once per vCPU, records in place (each a writable buffer: an arena slot), and
 * stops at the first failing step, returning where and why.
 *
 * Threads: run() itself is single-threaded; callers run it on several threads at once over
 * disjoint vCPU ranges (it holds no global state; its scratch is its own).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

enum kind {
    STEP_COPY = 1,     /* target[off + i*stride, +len) = template[same], i < count */
    STEP_CHECK = 2,    /* target[off + i*stride, +len) == template[same], i < count */
    STEP_ID = 3,       /* u32 at target[off] = the vCPU's id */
    STEP_CHECK_ID = 4, /* u32 at target[off] == the vCPU's id */
    STEP_IOCTL = 5,    /* ioctl(fd, request, target + off) >= 0 */
    STEP_COUNTED = 6,  /* ioctl(fd, request, {u32 count, u32 0, target[off, +len)}) == count;
                          arg & 1: copy the entries back into the target afterwards */
    STEP_VERIFY = 7,   /* record[off, +len) == scratch[same] wherever mask[] is nonzero */
    STEP_WITHIN = 8,   /* |scratch - record| <= arg for the little-endian int of len 4 or 8
                          at off */
};

enum target { TARGET_RECORD = 0, TARGET_SCRATCH = 1 };

/* One step; Python packs the same layout (engine.py STEP, "<8I2q"). */
struct step {
    uint32_t kind, target, phase, offset, length, count, stride, reserved;
    int64_t request, arg;
};
_Static_assert(sizeof(struct step) == 48, "struct step is packed by Python as 48 bytes");

#define PHASES 2

struct failure {
    Py_ssize_t vcpu; /* position in the batch; -1: none failed */
    Py_ssize_t step;
    int err;         /* errno, or 0 where the step's check (not the kernel) failed */
    long long result;
};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); /* CPU time: preemption is not a cost */
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static long long le_int(const uint8_t *p, uint32_t len) {
    if (len == 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        return (long long)(int32_t)v;
    }
    int64_t v;
    memcpy(&v, p, 8);
    return (long long)v;
}

/* Run one step on one vCPU; 0 if it held, else fill *f (vcpu and step are the caller's). */
static int run_step(const struct step *s, int fd, uint32_t id, uint8_t *record, uint8_t *scratch,
                    const uint8_t *template, const uint8_t *mask, uint8_t *counted,
                    struct failure *f) {
    uint8_t *t = s->target == TARGET_SCRATCH ? scratch : record;
    switch (s->kind) {
    case STEP_COPY:
        for (uint32_t i = 0; i < s->count; i++) {
            size_t at = (size_t)s->offset + (size_t)i * s->stride;
            memcpy(t + at, template + at, s->length);
        }
        return 0;
    case STEP_CHECK:
        for (uint32_t i = 0; i < s->count; i++) {
            size_t at = (size_t)s->offset + (size_t)i * s->stride;
            if (memcmp(t + at, template + at, s->length) != 0) {
                f->err = 0;
                f->result = (long long)at;
                return -1;
            }
        }
        return 0;
    case STEP_ID:
        memcpy(t + s->offset, &id, 4);
        return 0;
    case STEP_CHECK_ID: {
        uint32_t got;
        memcpy(&got, t + s->offset, 4);
        if (got != id) {
            f->err = 0;
            f->result = got;
            return -1;
        }
        return 0;
    }
    case STEP_IOCTL: {
        int r = ioctl(fd, (unsigned long)s->request, t + s->offset);
        if (r < 0) {
            f->err = errno;
            f->result = r;
            return -1;
        }
        return 0;
    }
    case STEP_COUNTED: {
        uint32_t head[2] = {s->count, 0};
        memcpy(counted, head, sizeof head);
        memcpy(counted + sizeof head, t + s->offset, s->length);
        int r = ioctl(fd, (unsigned long)s->request, counted);
        if (r < 0 || (uint32_t)r != s->count) {
            f->err = r < 0 ? errno : 0;
            f->result = r;
            return -1;
        }
        if (s->arg & 1)
            memcpy(t + s->offset, counted + sizeof head, s->length);
        return 0;
    }
    case STEP_VERIFY:
        for (uint32_t i = s->offset; i < s->offset + s->length; i++) {
            if (mask[i] && record[i] != scratch[i]) {
                f->err = 0;
                f->result = i;
                return -1;
            }
        }
        return 0;
    case STEP_WITHIN: {
        long long d = le_int(scratch + s->offset, s->length) - le_int(record + s->offset, s->length);
        if (d > s->arg || -d > s->arg) {
            f->err = 0;
            f->result = d;
            return -1;
        }
        return 0;
    }
    default:
        f->err = EINVAL;
        f->result = s->kind;
        return -1;
    }
}

/* Check the program against the sizes it will touch, with the GIL held. */
static int check_program(const struct step *steps, Py_ssize_t n, Py_ssize_t record_bytes,
                         size_t *counted_bytes) {
    *counted_bytes = 8;
    for (Py_ssize_t k = 0; k < n; k++) {
        const struct step *s = &steps[k];
        uint64_t reach = (uint64_t)s->offset + s->length;
        if (s->kind == STEP_COPY || s->kind == STEP_CHECK) {
            if (s->count == 0)
                continue;
            reach = (uint64_t)s->offset + (uint64_t)(s->count - 1) * s->stride + s->length;
        } else if (s->kind == STEP_ID || s->kind == STEP_CHECK_ID) {
            reach = (uint64_t)s->offset + 4;
        } else if (s->kind == STEP_WITHIN && s->length != 4 && s->length != 8) {
            PyErr_Format(PyExc_ValueError, "step %zd: WITHIN of %u bytes", k, s->length);
            return -1;
        }
        if (s->kind == STEP_COUNTED && (size_t)s->length + 8 > *counted_bytes)
            *counted_bytes = (size_t)s->length + 8;
        if (reach > (uint64_t)record_bytes || s->target > TARGET_SCRATCH || s->phase >= PHASES) {
            PyErr_Format(PyExc_ValueError, "step %zd reaches byte %llu of a %zd-byte record",
                         k, (unsigned long long)reach, record_bytes);
            return -1;
        }
    }
    return 0;
}

static void release_all(Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

PyDoc_STRVAR(run_doc,
"run(program, template, mask, fds, ids, records, writable) -> (vcpu, step, errno, result,\n"
"                                                            ns_phase0, ns_phase1)\n\n"
"Run ``program`` (packed steps) once per vCPU, ``records[i]`` in place, the GIL released.\n"
"``vcpu`` is -1 if every step held, else the position of the vCPU whose ``step`` failed\n"
"(``errno`` 0: a check failed; ``result``: the ioctl's return, or the check's finding).\n"
"``records`` must be writable if ``writable``. The ns are the CPU time this thread spent\n"
"in each phase.");

static PyObject *run(PyObject *self, PyObject *args) {
    Py_buffer program, template, mask;
    PyObject *fds_obj, *ids_obj, *records_obj;
    int writable;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*OOOp", &program, &template, &mask, &fds_obj, &ids_obj,
                          &records_obj, &writable))
        return NULL;
    PyObject *result = NULL, *fds = NULL, *ids = NULL, *records = NULL;
    Py_buffer *views = NULL;
    int *fd = NULL;
    uint32_t *id = NULL;
    uint8_t *scratch = NULL, *counted = NULL;
    Py_ssize_t n = 0, held = 0;
    size_t counted_bytes;
    Py_ssize_t nsteps = program.len / (Py_ssize_t)sizeof(struct step);
    const struct step *steps = program.buf;

    if (program.len % (Py_ssize_t)sizeof(struct step) || mask.len != template.len) {
        PyErr_SetString(PyExc_ValueError, "program is not whole steps, or mask and template differ");
        goto out;
    }
    if (check_program(steps, nsteps, template.len, &counted_bytes) < 0)
        goto out;
    fds = PySequence_Fast(fds_obj, "fds must be a sequence");
    ids = fds ? PySequence_Fast(ids_obj, "ids must be a sequence") : NULL;
    records = ids ? PySequence_Fast(records_obj, "records must be a sequence") : NULL;
    if (!records)
        goto out;
    n = PySequence_Fast_GET_SIZE(fds);
    if (PySequence_Fast_GET_SIZE(ids) != n || PySequence_Fast_GET_SIZE(records) != n) {
        PyErr_SetString(PyExc_ValueError, "fds, ids and records differ in length");
        goto out;
    }
    views = PyMem_Calloc(n ? n : 1, sizeof *views);
    fd = PyMem_Calloc(n ? n : 1, sizeof *fd);
    id = PyMem_Calloc(n ? n : 1, sizeof *id);
    scratch = PyMem_Calloc(1, (size_t)template.len);
    counted = PyMem_Calloc(1, counted_bytes);
    if (!views || !fd || !id || !scratch || !counted) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        fd[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
        id[i] = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(ids, i));
        if (PyErr_Occurred())
            goto out;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(records, i), &views[i],
                               writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            goto out;
        held++;
        if (views[i].len < template.len) {
            PyErr_Format(PyExc_ValueError, "record %zd holds %zd bytes, the program needs %zd",
                         i, views[i].len, template.len);
            goto out;
        }
    }

    struct failure f = {-1, -1, 0, 0};
    int64_t spent[PHASES] = {0, 0};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && f.vcpu < 0; i++) {
        uint32_t phase = nsteps ? steps[0].phase : 0;
        int64_t since = now_ns();
        for (Py_ssize_t k = 0; k < nsteps; k++) {
            if (steps[k].phase != phase) {
                int64_t t = now_ns();
                spent[phase] += t - since;
                since = t;
                phase = steps[k].phase;
            }
            if (run_step(&steps[k], fd[i], id[i], views[i].buf, scratch, template.buf, mask.buf,
                         counted, &f) < 0) {
                f.vcpu = i;
                f.step = k;
                break;
            }
        }
        spent[phase] += now_ns() - since;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nniLLL", f.vcpu, f.step, f.err, f.result, (long long)spent[0],
                           (long long)spent[1]);
out:
    release_all(views, held);
    PyMem_Free(views);
    PyMem_Free(fd);
    PyMem_Free(id);
    PyMem_Free(scratch);
    PyMem_Free(counted);
    Py_XDECREF(fds);
    Py_XDECREF(ids);
    Py_XDECREF(records);
    PyBuffer_Release(&program);
    PyBuffer_Release(&template);
    PyBuffer_Release(&mask);
    return result;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_steps",
    "Run programs of ioctl steps over vCPU records with the GIL released.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__steps(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "STEP_BYTES", sizeof(struct step)) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
