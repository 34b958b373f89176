/*
 * shmcache._speedups: hot paths of shmcache in C: the lock-free lookup of
 * shmcache/_arena.py (Arena.find) and the first step of a coalesced miss (claim)
 * here; the codec's free-form value check and hit-path rebuild (plain_tree,
 * rebuild) in _speedups_codec.c, registered with this module.
 *
 * Optional: shmcache runs the same algorithms in pure Python when this module is
 * absent (or SHMCACHE_PURE_PYTHON=1), and tests/test_speedups.py checks that both
 * give the same answer for every record state, damaged ones included
 * (tests/test_speedups_claim.py: the same lease entry, and every other case left
 * untouched; tests/test_speedups_codec.py and test_speedups_rebuild.py: the same
 * verdict on any tree, the same objects from any payload).  The
 * segment format and the reader protocol are exactly those of _arena.py:
 *
 *   - two candidate buckets per key, 8 tags each (a ghost's tag has the low bit
 *     clear, a live key's tag has it set, so ghosts never match);
 *   - a seqlock version word per bucket: position and length are read between two
 *     equal even versions;
 *   - the record is copied out of the log, then the log's tail is read again (a
 *     writer that reclaimed the bytes meanwhile makes it a miss), then its header,
 *     digest and crc32 are checked on the copy;
 *   - a hit raises the slot's 2-bit read frequency, test before set.
 *
 * find() writes nothing but that frequency byte and takes no lock.  claim() is the
 * common coalesced miss of _coalesce.py (Coalescer.step_locked) in one call: it
 * tries the writer lock once (flock, never waiting), looks the key up, and when it
 * is still absent, has no lease, and its lease window has a free entry, takes that
 * entry exactly as _leases.py's LeaseTable.take writes one.  Every other case (a
 * busy lock, an existing or lapsed lease, a full window, a bucket left mid-change)
 * is left, untouched, to the Python step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <limits.h>
#include <sys/file.h>

#include "_speedups_codec.h"

/* Layout constants, as in _arena.py (checked against it at Finder creation). */
#define BUCKET_WORDS 32
#define TAGS_AT 1
#define POS_AT 9
#define LENS_AT_BYTE 200
#define REFS_AT_BYTE 232
#define SLOTS 8
#define FREQ_MAX 3
#define SEQLOCK_TRIES 16
#define RECORD_HEADER 72
#define RECORD_MAGIC 0x31434552u
#define MAIN_BASE (UINT64_C(1) << 62)
/* A lease entry's words, as in _leases.py. */
#define LEASE_ENTRY_WORDS 4
#define LEASE_TAG 0
#define LEASE_OWNER 1
#define LEASE_DEADLINE 2
#define LEASE_CALLER 3

typedef struct {
    uint64_t tail_word;
    uint64_t head_word;
    uint64_t base;
    uint64_t size;
} Region;

typedef struct {
    PyObject_HEAD
    Py_buffer view;     /* the writable mapping; released by release() */
    int held;
    uint64_t n_buckets;
    uint64_t index_word;
    Region main;
    Region small;
    PyObject *contended; /* returned when a writer kept changing the bucket */
    PyObject *crc32;     /* zlib.crc32: the value's checksum (the header's is here) */
    /* The lease table and the lock-holder word, for claim() (0: not set). */
    uint64_t lock_pid_word;
    uint64_t lease_first_word;
    uint64_t lease_entries;
    uint64_t lease_window;
} Finder;

static uint32_t crc_table[256];

static void
crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
        crc_table[n] = c;
    }
}

/* zlib's crc32(data, start): the header part is 64 bytes, a table is enough. */
static uint32_t
crc_update(uint32_t start, const unsigned char *p, size_t n)
{
    uint32_t c = ~start;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return ~c;
}

static inline uint64_t
load_u64(const unsigned char *p)
{
    /* The words are 8-byte aligned in the mapping; an atomic load keeps the
       compiler from caching or tearing them. */
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

static inline uint64_t
read_u64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t
read_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static void
Finder_dealloc(Finder *self)
{
    if (self->held) {
        PyBuffer_Release(&self->view);
        self->held = 0;
    }
    Py_XDECREF(self->contended);
    Py_XDECREF(self->crc32);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Finder_init(Finder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mapping", "n_buckets", "index_word", "main", "small",
                             "contended", NULL};
    PyObject *mapping, *contended;
    unsigned long long n_buckets, index_word;
    unsigned long long m[4], s[4];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKK(KKKK)(KKKK)O", kwlist, &mapping,
                                     &n_buckets, &index_word, &m[0], &m[1], &m[2], &m[3],
                                     &s[0], &s[1], &s[2], &s[3], &contended))
        return -1;
    if (self->held) {
        PyErr_SetString(PyExc_RuntimeError, "Finder is already initialised");
        return -1;
    }
    if (n_buckets == 0 || m[3] == 0 || s[3] == 0) {
        PyErr_SetString(PyExc_ValueError, "n_buckets and log sizes must be positive");
        return -1;
    }
    if (PyObject_GetBuffer(mapping, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    self->held = 1;
    uint64_t len = (uint64_t)self->view.len;
    /* Every address find() computes stays inside the mapping: the index must fit,
       and each log region too (record bounds are checked against the region). */
    if ((index_word + n_buckets * BUCKET_WORDS) * 8 > len || m[2] + m[3] > len ||
        s[2] + s[3] > len || m[0] * 8 + 8 > len || m[1] * 8 + 8 > len ||
        s[0] * 8 + 8 > len || s[1] * 8 + 8 > len ||
        ((uintptr_t)self->view.buf & 7) != 0) {
        PyBuffer_Release(&self->view);
        self->held = 0;
        PyErr_SetString(PyExc_ValueError, "the geometry does not fit the mapping");
        return -1;
    }
    self->n_buckets = n_buckets;
    self->index_word = index_word;
    self->main = (Region){m[0], m[1], m[2], m[3]};
    self->small = (Region){s[0], s[1], s[2], s[3]};
    Py_INCREF(contended);
    Py_XSETREF(self->contended, contended);
    PyObject *zlib = PyImport_ImportModule("zlib");
    if (zlib == NULL)
        return -1;
    Py_XSETREF(self->crc32, PyObject_GetAttrString(zlib, "crc32"));
    Py_DECREF(zlib);
    return self->crc32 == NULL ? -1 : 0;
}

static PyObject *
Finder_release(Finder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->held) {
        PyBuffer_Release(&self->view);
        self->held = 0;
    }
    Py_RETURN_NONE;
}

/* The value's bytes as a memoryview over a private copy, or NULL with no error set
   for a miss (absent, reclaimed, damaged, expired). */
static PyObject *
read_record(Finder *self, uint64_t position, uint64_t length, const unsigned char *digest,
            double now, int *miss)
{
    const unsigned char *mm = (const unsigned char *)self->view.buf;
    const Region *r = position >= MAIN_BASE ? &self->main : &self->small;
    uint64_t offset = position % r->size;
    *miss = 1;
    if (position < load_u64(mm + r->tail_word * 8) ||
        position + length > load_u64(mm + r->head_word * 8) || length < RECORD_HEADER ||
        offset + length > r->size)
        return NULL;
    const unsigned char *rec = mm + r->base + offset;
    unsigned char header[RECORD_HEADER];
    memcpy(header, rec, RECORD_HEADER);
    uint32_t value_length = read_u32(header + 20);
    if ((uint64_t)RECORD_HEADER + value_length > length)
        return NULL;
    PyObject *value = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)value_length);
    if (value == NULL) {
        *miss = 0;
        return NULL;
    }
    memcpy(PyBytes_AS_STRING(value), rec + RECORD_HEADER, value_length);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (position < load_u64(mm + r->tail_word * 8)) {
        Py_DECREF(value); /* a writer reclaimed these bytes while we copied them */
        return NULL;
    }
    double expires;
    memcpy(&expires, header + 24, 8);
    if (read_u32(header) != RECORD_MAGIC || read_u64(header + 8) != position ||
        read_u32(header + 16) != length || memcmp(header + 40, digest, 32) != 0 ||
        (expires != 0.0 && expires <= now)) {
        Py_DECREF(value);
        return NULL;
    }
    PyObject *view = PyMemoryView_FromObject(value);
    Py_DECREF(value);
    if (view == NULL) {
        *miss = 0;
        return NULL;
    }
    uint32_t head_crc = crc_update(0, header + 8, RECORD_HEADER - 8);
    PyObject *start = PyLong_FromUnsignedLong(head_crc);
    if (start == NULL) {
        Py_DECREF(view);
        *miss = 0;
        return NULL;
    }
    PyObject *argv[2] = {view, start};
    PyObject *got = PyObject_Vectorcall(self->crc32, argv, 2, NULL);
    Py_DECREF(start);
    if (got == NULL) {
        Py_DECREF(view);
        *miss = 0;
        return NULL;
    }
    unsigned long crc = PyLong_AsUnsignedLong(got);
    Py_DECREF(got);
    if (crc != read_u32(header + 4)) {
        Py_DECREF(view);
        return NULL;
    }
    *miss = 0;
    return view;
}

/* The lock-free lookup of one digest: a new reference to the value's memoryview,
   Py_None (a miss) or the contended marker; NULL with an error set. */
static PyObject *
find_digest(Finder *self, const unsigned char *digest, double now)
{
    unsigned char *mm = (unsigned char *)self->view.buf;
    uint64_t tag = read_u64(digest) | 1;
    uint64_t seed = read_u64(digest + 8), seed2 = read_u64(digest + 16);
    uint64_t n = self->n_buckets;
    uint64_t first = seed % n;
    uint64_t bucket = self->index_word + first * BUCKET_WORDS;
    int slot = -1;
    for (int round = 0; round < 2 && slot < 0; round++) {
        if (round == 1) {
            uint64_t second = seed2 % n;
            if (second == first)
                second = (second + 1) % n;
            bucket = self->index_word + second * BUCKET_WORDS;
        }
        const unsigned char *tags = mm + (bucket + TAGS_AT) * 8;
        for (int i = 0; i < SLOTS; i++) {
            if (load_u64(tags + 8 * i) == tag) {
                slot = i;
                break;
            }
        }
    }
    if (slot < 0)
        Py_RETURN_NONE; /* absence needs no consistency check */
    const unsigned char *b = mm + bucket * 8;
    for (int attempt = 0; attempt < SEQLOCK_TRIES; attempt++) {
        uint64_t version = load_u64(b);
        if (version & 1)
            continue;
        uint64_t position = load_u64(b + (POS_AT + slot) * 8);
        uint32_t length = __atomic_load_n((const uint32_t *)(b + LENS_AT_BYTE + 4 * slot),
                                          __ATOMIC_ACQUIRE);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (load_u64(b) != version)
            continue;
        int miss;
        PyObject *found = read_record(self, position, length, digest, now, &miss);
        if (found == NULL) {
            if (miss)
                Py_RETURN_NONE;
            return NULL;
        }
        /* zlib.crc32 lets go of the GIL for big values: another thread may have
           released the mapping meanwhile (close()); then it is not touched again. */
        if (!self->held || self->view.buf != (void *)mm) {
            Py_DECREF(found);
            Py_RETURN_NONE;
        }
        unsigned char *ref = mm + bucket * 8 + REFS_AT_BYTE + slot;
        unsigned char freq = __atomic_load_n(ref, __ATOMIC_RELAXED);
        if (freq < FREQ_MAX) /* test before set: hot keys write nothing */
            __atomic_store_n(ref, (unsigned char)(freq + 1), __ATOMIC_RELAXED);
        return found;
    }
    Py_INCREF(self->contended);
    return self->contended;
}

/* The digest argument and a usable mapping, or NULL with an error set. */
static const unsigned char *
digest_arg(Finder *self, PyObject *digest)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "the Finder was released");
        return NULL;
    }
    if (!PyBytes_Check(digest) || PyBytes_GET_SIZE(digest) != 32) {
        PyErr_SetString(PyExc_TypeError, "digest must be 32 bytes");
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(digest);
}

static PyObject *
Finder_find(Finder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "find(digest, now) takes 2 arguments");
        return NULL;
    }
    const unsigned char *digest = digest_arg(self, args[0]);
    if (digest == NULL)
        return NULL;
    double now = PyFloat_AsDouble(args[1]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    return find_digest(self, digest, now);
}

static PyObject *
Finder_set_leases(Finder *self, PyObject *args)
{
    unsigned long long lock_pid_word, first_word, entries, window;
    if (!PyArg_ParseTuple(args, "KKKK", &lock_pid_word, &first_word, &entries, &window))
        return NULL;
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "the Finder was released");
        return NULL;
    }
    uint64_t words = (uint64_t)self->view.len / 8;
    if (window == 0 || entries < window || entries > words || lock_pid_word >= words ||
        first_word + entries * LEASE_ENTRY_WORDS > words) {
        PyErr_SetString(PyExc_ValueError, "the lease table does not fit the mapping");
        return NULL;
    }
    self->lock_pid_word = lock_pid_word;
    self->lease_first_word = first_word;
    self->lease_entries = entries;
    self->lease_window = window;
    Py_RETURN_NONE;
}

/* Under the writer lock: give a free entry of the key's window to the caller (the
   words in the order LeaseTable.take writes them, the tag published last).  -1 when
   the window holds the key already or has no free entry: the Python step decides. */
static long long
take_free_lease(Finder *self, uint64_t tag, uint64_t owner, uint64_t deadline,
                uint64_t caller)
{
    uint64_t *words = (uint64_t *)self->view.buf;
    uint64_t start = (tag >> 1) % (self->lease_entries - self->lease_window + 1);
    long long found = -1;
    for (uint64_t i = start; i < start + self->lease_window; i++) {
        uint64_t t = __atomic_load_n(&words[self->lease_first_word + i * LEASE_ENTRY_WORDS],
                                     __ATOMIC_ACQUIRE);
        if (t == tag)
            return -1; /* another caller's lease (or a lapsed one): wait or take over */
        if (t == 0 && found < 0)
            found = (long long)i;
    }
    if (found < 0)
        return -1; /* full: maybe a lapsed entry to reuse */
    uint64_t *e = &words[self->lease_first_word + (uint64_t)found * LEASE_ENTRY_WORDS];
    __atomic_store_n(&e[LEASE_OWNER], owner, __ATOMIC_RELAXED);
    __atomic_store_n(&e[LEASE_DEADLINE], deadline, __ATOMIC_RELAXED);
    __atomic_store_n(&e[LEASE_CALLER], caller, __ATOMIC_RELAXED);
    __atomic_store_n(&e[LEASE_TAG], tag, __ATOMIC_RELEASE);
    return found;
}

static PyObject *
Finder_claim(Finder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "claim(fd, digest, now, owner, deadline_ns, caller, pid) takes 7 "
                        "arguments");
        return NULL;
    }
    if (self->lease_window == 0) {
        PyErr_SetString(PyExc_RuntimeError, "claim() needs set_leases() first");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd > INT_MAX)
        fd = -1;
    const unsigned char *digest = digest_arg(self, args[1]);
    if (digest == NULL)
        return NULL;
    /* The caller's clocks (time.time(), time.monotonic_ns()), so both steps read
       the same ones. */
    double now = PyFloat_AsDouble(args[2]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    uint64_t v[4];
    for (int i = 0; i < 4; i++) {
        v[i] = PyLong_AsUnsignedLongLong(args[3 + i]);
        if (v[i] == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
    }
    uint64_t owner = v[0], deadline = v[1], caller = v[2], pid = v[3];
    if (owner == 0 || pid == 0) {
        PyErr_SetString(PyExc_ValueError, "claim() needs an owner and a pid");
        return NULL;
    }
    uint64_t tag = read_u64(digest) | 1; /* as _keys.split_digest */
    /* Never waits: a held lock (or a closed fd) sends the caller to the Python path,
       which waits with its back-off and deadline. */
    if (fd < 0 || flock((int)fd, LOCK_EX | LOCK_NB) != 0)
        Py_RETURN_NONE;
    /* From here to the unlock no Python code runs but what an allocation's garbage
       collection may run, and nothing raises in between: an interrupt waits for the
       return, so the lock is never left held. */
    uint64_t *words = (uint64_t *)self->view.buf;
    unsigned char *mm = (unsigned char *)self->view.buf;
    __atomic_store_n(&words[self->lock_pid_word], pid, __ATOMIC_RELAXED);
    PyObject *result = find_digest(self, digest, now);
    if (!self->held || self->view.buf != (void *)mm) {
        /* close() released the mapping while crc32 ran without the GIL */
        Py_XDECREF(result);
        result = NULL;
        PyErr_SetString(PyExc_ValueError, "the Finder was released");
    }
    else if (result == Py_None) {
        Py_DECREF(result);
        long long entry = take_free_lease(self, tag, owner, deadline, caller);
        result = entry < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(entry);
    }
    else if (result == self->contended) {
        Py_DECREF(result); /* a dead writer's bucket: the Python step reads it locked */
        result = Py_NewRef(Py_None);
    }
    if (self->held && self->view.buf == (void *)mm)
        __atomic_store_n(&words[self->lock_pid_word], 0, __ATOMIC_RELAXED);
    flock((int)fd, LOCK_UN);
    return result;
}

static PyObject *
speedups_crc32(PyObject *module, PyObject *args)
{
    Py_buffer data;
    unsigned int start = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &start))
        return NULL;
    uint32_t crc = crc_update(start, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef Finder_methods[] = {
    {"find", (PyCFunction)(void (*)(void))Finder_find, METH_FASTCALL,
     "find(digest, now) -> memoryview | None | contended: the lock-free lookup."},
    {"set_leases", (PyCFunction)Finder_set_leases, METH_VARARGS,
     "set_leases(lock_pid_word, first_word, entries, window): the lease table's layout."},
    {"claim", (PyCFunction)(void (*)(void))Finder_claim, METH_FASTCALL,
     "claim(fd, digest, now, owner, deadline_ns, caller, pid) -> memoryview | int | None: "
     "the common coalesced miss under the writer lock (None: not decided)."},
    {"release", (PyCFunction)Finder_release, METH_NOARGS,
     "Release the mapping's buffer (before the mapping is closed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FinderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcache._speedups.Finder",
    .tp_basicsize = sizeof(Finder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Arena.find in C over one mapped segment.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Finder_init,
    .tp_dealloc = (destructor)Finder_dealloc,
    .tp_methods = Finder_methods,
};

static PyMethodDef module_methods[] = {
    {"crc32", speedups_crc32, METH_VARARGS,
     "crc32(data, start=0): the table CRC-32 used for record headers (= zlib.crc32)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "shmcache._speedups",
    "Compiled fast paths of shmcache (optional; pure-Python fallback).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    crc_init();
    if (PyType_Ready(&FinderType) < 0)
        return NULL;
    if (speedups_codec_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddFunctions(m, speedups_codec_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&FinderType);
    if (PyModule_AddObject(m, "Finder", (PyObject *)&FinderType) < 0) {
        Py_DECREF(&FinderType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "RECORD_HEADER_BYTES", RECORD_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "BUCKET_WORDS", BUCKET_WORDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
