/*
 * The codec's compiled paths (part of shmcache._speedups; see _codec.py):
 *
 *   - plain_tree: the free-form dict/list check of an update.  1 yes, 0 no (the
 *     Python check then finds and names the problem).
 *   - rebuild (and decode_plain: the header check, msgpack's unpackb and rebuild of a
 *     plain encoding in one call): the hit path's object rebuild (_codec.py's _rebuild_verified) over
 *     an unpacked payload: new objects, set up exactly as _build sets them up.
 *     It handles the common shapes only (a known tag of a class rebuilt like
 *     model_construct, the width of its class, no extra fields, a fields-set mask
 *     the Python decoder has already seen) and returns None for anything else,
 *     having built nothing the caller sees: the Python decoder then decides, and
 *     raises where the bytes are wrong.  So the C code never accepts what Python
 *     would refuse, and never has to word an error.
 *
 * Neither calls back into Python code it does not control, except ``content`` of a
 * freshly built message (a ChatGeneration stores its text as nil when it mirrors it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_speedups_codec.h"

/* ------------------------------------------------------------------ plain_tree */

/* Calls no Python code, so the tree cannot change meanwhile.  -1: error set. */
static int
plain_tree(PyObject *v, long depth, long max_depth, PyTypeObject *text_type)
{
    if (PyDict_CheckExact(v)) {
        if (depth >= max_depth) /* containers only, as in _check_dict */
            return 0;
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(v, &pos, &key, &item)) {
            if (!PyUnicode_CheckExact(key) && !Py_IS_TYPE(key, text_type))
                return 0;
            int ok = plain_tree(item, depth + 1, max_depth, text_type);
            if (ok != 1)
                return ok;
        }
        return 1;
    }
    if (PyList_CheckExact(v)) {
        if (depth >= max_depth)
            return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
            int ok = plain_tree(PyList_GET_ITEM(v, i), depth + 1, max_depth, text_type);
            if (ok != 1)
                return ok;
        }
        return 1;
    }
    if (v == Py_None || PyBool_Check(v) || PyUnicode_CheckExact(v) || PyBytes_CheckExact(v) ||
        Py_IS_TYPE(v, text_type))
        return 1;
    if (PyLong_CheckExact(v)) { /* msgpack stores -2**63 .. 2**64 - 1 */
        int overflow;
        PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow == 0)
            return 1;
        if (overflow < 0)
            return 0;
        PyLong_AsUnsignedLongLong(v);
        if (PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        return d == d; /* NaN never equals itself */
    }
    return 0;
}

static PyObject *
speedups_plain_tree(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "plain_tree(value, depth, max_depth, text_type) takes 4 arguments");
        return NULL;
    }
    long depth = PyLong_AsLong(args[1]);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    long max_depth = PyLong_AsLong(args[2]);
    if (max_depth == -1 && PyErr_Occurred())
        return NULL;
    if (depth < 0 || max_depth < 0 || max_depth > 1000) {
        PyErr_SetString(PyExc_ValueError, "depth must be >= 0 and max_depth in 0..1000");
        return NULL;
    }
    if (!PyType_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "text_type must be a type");
        return NULL;
    }
    int ok = plain_tree(args[0], depth, max_depth, (PyTypeObject *)args[3]);
    if (ok < 0)
        return NULL;
    return PyBool_FromLong(ok);
}

/* --------------------------------------------------------------------- rebuild */

/* A class's entry in a rebuild table (_codec.py's _compiled_table builds them):
   (cls, names, allows_extra, masks, message_slots, text_slot, mirror_slot). */
enum {
    SPEC_CLS, SPEC_NAMES, SPEC_ALLOWS_EXTRA, SPEC_MASKS, SPEC_MESSAGE_SLOTS,
    SPEC_TEXT_SLOT, SPEC_MIRROR_SLOT, SPEC_LEN
};
#define MAX_FIELDS 62 /* a mask of every field (and the extras bit) fits an int64 */
#define PAYLOAD_LEVELS 2 /* generations hold messages; messages hold no objects */

static PyObject *object_new;  /* object.__new__ */
static PyObject *s_dict, *s_fields_set, *s_extra, *s_private, *s_content, *s_surrogatepass;

/* Which of the two results a rebuild step gave besides an object. */
typedef enum { BUILT, DECLINED, FAILED } Outcome;

static int
is_slot(PyObject *slots, Py_ssize_t i)
{
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(slots); k++)
        if (PyLong_AsSsize_t(PyTuple_GET_ITEM(slots, k)) == i)
            return 1;
    return 0;
}

/* Set one of BaseModel's slots as object.__setattr__ does (past its own __setattr__). */
static int
set_slot(PyObject *obj, PyObject *name, PyObject *value)
{
    return PyObject_GenericSetAttr(obj, name, value);
}

static PyObject *
rebuild_one(PyObject *item, PyObject *const *tables, int level, Outcome *outcome);

/* The field values of one object, messages rebuilt, in field order; NULL: see outcome. */
static PyObject *
field_values(PyObject *item, PyObject *spec, PyObject *const *tables, int level,
             Outcome *outcome)
{
    PyObject *names = PyTuple_GET_ITEM(spec, SPEC_NAMES);
    PyObject *message_slots = PyTuple_GET_ITEM(spec, SPEC_MESSAGE_SLOTS);
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    PyObject *values = PyDict_New();
    if (values == NULL) {
        *outcome = FAILED;
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyList_GET_ITEM(item, 3 + i);
        int set;
        if (PyTuple_GET_SIZE(message_slots) && is_slot(message_slots, i)) {
            if (level + 1 >= PAYLOAD_LEVELS) {
                *outcome = DECLINED;
                Py_DECREF(values);
                return NULL;
            }
            PyObject *message = rebuild_one(value, tables, level + 1, outcome);
            if (message == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            set = PyDict_SetItem(values, PyTuple_GET_ITEM(names, i), message);
            Py_DECREF(message);
        } else {
            set = PyDict_SetItem(values, PyTuple_GET_ITEM(names, i), value);
        }
        if (set < 0) {
            *outcome = FAILED;
            Py_DECREF(values);
            return NULL;
        }
    }
    return values;
}

/* A nil text slot takes its message's str content, as _restore_text does. */
static int
restore_text(PyObject *values, PyObject *spec, Outcome *outcome)
{
    Py_ssize_t text_slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, SPEC_TEXT_SLOT));
    if (text_slot < 0)
        return 0;
    PyObject *names = PyTuple_GET_ITEM(spec, SPEC_NAMES);
    PyObject *text_name = PyTuple_GET_ITEM(names, text_slot);
    PyObject *text = PyDict_GetItemWithError(values, text_name);
    if (text == NULL) {
        *outcome = PyErr_Occurred() ? FAILED : DECLINED;
        return -1;
    }
    if (text != Py_None)
        return 0;
    Py_ssize_t mirror = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, SPEC_MIRROR_SLOT));
    PyObject *message = PyDict_GetItemWithError(values, PyTuple_GET_ITEM(names, mirror));
    if (message == NULL) {
        *outcome = PyErr_Occurred() ? FAILED : DECLINED;
        return -1;
    }
    PyObject *content = PyObject_GetAttr(message, s_content);
    if (content == NULL) {
        *outcome = FAILED;
        return -1;
    }
    int set = -1;
    if (!PyUnicode_CheckExact(content))
        *outcome = DECLINED; /* the Python decoder refuses it, and says why */
    else if ((set = PyDict_SetItem(values, text_name, content)) < 0)
        *outcome = FAILED;
    Py_DECREF(content);
    return set;
}

/* One [tag, mask, extras, *fields] array to an object; NULL: see outcome. */
static PyObject *
rebuild_one(PyObject *item, PyObject *const *tables, int level, Outcome *outcome)
{
    *outcome = DECLINED;
    PyObject *table = tables[level];
    if (!PyList_CheckExact(item) || PyList_GET_SIZE(item) < 3)
        return NULL;
    PyObject *tag = PyList_GET_ITEM(item, 0);
    PyObject *mask = PyList_GET_ITEM(item, 1);
    if (!PyLong_CheckExact(tag) || !PyLong_CheckExact(mask) || PyList_GET_ITEM(item, 2) != Py_None)
        return NULL;
    Py_ssize_t index = PyLong_AsSsize_t(tag);
    if (index == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (index < 0 || index >= PyTuple_GET_SIZE(table))
        return NULL;
    PyObject *spec = PyTuple_GET_ITEM(table, index);
    if (spec == Py_None)
        return NULL;
    PyObject *names = PyTuple_GET_ITEM(spec, SPEC_NAMES);
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (PyList_GET_SIZE(item) != 3 + n)
        return NULL;
    long long bits = PyLong_AsLongLong(mask);
    if (bits == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (bits < 0 || bits >= (1LL << n)) /* the extras bit needs extras */
        return NULL;
    PyObject *fields = PyDict_GetItemWithError(PyTuple_GET_ITEM(spec, SPEC_MASKS), mask);
    if (fields == NULL) { /* a mask the Python decoder has not met yet */
        if (PyErr_Occurred())
            *outcome = FAILED;
        return NULL;
    }
    PyObject *values = field_values(item, spec, tables, level, outcome);
    if (values == NULL)
        return NULL;
    PyObject *fields_set = NULL, *extras = NULL, *obj = NULL;
    if (restore_text(values, spec, outcome) < 0)
        goto done;
    *outcome = FAILED;
    fields_set = PySet_New(fields);
    extras = PyTuple_GET_ITEM(spec, SPEC_ALLOWS_EXTRA) == Py_True ? PyDict_New() : Py_NewRef(Py_None);
    if (fields_set == NULL || extras == NULL)
        goto done;
    obj = PyObject_CallOneArg(object_new, PyTuple_GET_ITEM(spec, SPEC_CLS));
    if (obj == NULL)
        goto done;
    if (set_slot(obj, s_dict, values) < 0 || set_slot(obj, s_fields_set, fields_set) < 0 ||
        set_slot(obj, s_extra, extras) < 0 || set_slot(obj, s_private, Py_None) < 0) {
        Py_CLEAR(obj);
        goto done;
    }
    *outcome = BUILT;
done:
    Py_DECREF(values);
    Py_XDECREF(fields_set);
    Py_XDECREF(extras);
    return obj;
}

/* The tables last found well-formed (held, so their ids cannot be reused): the
   codec passes the same two on every hit, and their tuples cannot change. */
static PyObject *checked_tables[2];

static int
check_table(PyObject *table, int which)
{
    if (table == checked_tables[which])
        return 0;
    if (!PyTuple_CheckExact(table))
        goto bad;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(table); i++) {
        PyObject *spec = PyTuple_GET_ITEM(table, i);
        if (spec == Py_None)
            continue;
        if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != SPEC_LEN ||
            !PyType_Check(PyTuple_GET_ITEM(spec, SPEC_CLS)) ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(spec, SPEC_NAMES)) ||
            PyTuple_GET_SIZE(PyTuple_GET_ITEM(spec, SPEC_NAMES)) > MAX_FIELDS ||
            !PyBool_Check(PyTuple_GET_ITEM(spec, SPEC_ALLOWS_EXTRA)) ||
            !PyDict_CheckExact(PyTuple_GET_ITEM(spec, SPEC_MASKS)) ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(spec, SPEC_MESSAGE_SLOTS)) ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(spec, SPEC_TEXT_SLOT)) ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(spec, SPEC_MIRROR_SLOT)))
            goto bad;
        Py_ssize_t n = PyTuple_GET_SIZE(PyTuple_GET_ITEM(spec, SPEC_NAMES));
        PyObject *slots = PyTuple_GET_ITEM(spec, SPEC_MESSAGE_SLOTS);
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(slots); k++) {
            PyObject *slot = PyTuple_GET_ITEM(slots, k);
            if (!PyLong_CheckExact(slot) || PyLong_AsSsize_t(slot) < 0 ||
                PyLong_AsSsize_t(slot) >= n)
                goto bad;
        }
        Py_ssize_t text = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, SPEC_TEXT_SLOT));
        Py_ssize_t mirror = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, SPEC_MIRROR_SLOT));
        if (PyErr_Occurred() || text < -1 || text >= n ||
            (text >= 0 && (mirror < 0 || mirror >= n)))
            goto bad;
    }
    Py_XSETREF(checked_tables[which], Py_NewRef(table));
    return 0;
bad:
    PyErr_Clear();
    PyErr_SetString(PyExc_TypeError,
                    "a rebuild table is a tuple of None or (cls, names, allows_extra, masks, "
                    "message_slots, text_slot, mirror_slot) tuples");
    return -1;
}

static PyObject *rebuild_payload(PyObject *payload, PyObject *const *tables);

static PyObject *
speedups_rebuild(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "rebuild(payload, generation_table, message_table) takes 3 arguments");
        return NULL;
    }
    if (check_table(args[1], 0) < 0 || check_table(args[2], 1) < 0)
        return NULL;
    return rebuild_payload(args[0], args + 1);
}

/* The objects of a payload (a list of object arrays), or None: see rebuild_one. */
static PyObject *
rebuild_payload(PyObject *payload, PyObject *const *tables)
{
    if (!PyList_CheckExact(payload))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(payload);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Outcome outcome;
        PyObject *obj = rebuild_one(PyList_GET_ITEM(payload, i), tables, 0, &outcome);
        if (obj == NULL) {
            Py_DECREF(out);
            if (outcome == FAILED)
                return NULL;
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(out, i, obj);
    }
    return out;
}

/* decode_plain(data, header, unpackb, ext_hook, generation_table, message_table):
   the whole hit-path decode of a plain (format 1) encoding: the header compared, the
   body unpacked by msgpack's unpackb with _codec.py's own arguments, the objects
   rebuilt.  None: not plain, or not a common shape (the Python decoder decides);
   unpackb's exceptions pass through as they would from _codec._unpack. */
static PyObject *kwnames_unpack;

static PyObject *
speedups_decode_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "decode_plain(data, header, unpackb, ext_hook, generation_table, "
                        "message_table) takes 6 arguments");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "header must be bytes");
        return NULL;
    }
    if (check_table(args[4], 0) < 0 || check_table(args[5], 1) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* not a flat buffer: the Python decoder says what it is */
        Py_RETURN_NONE;
    }
    Py_ssize_t header_len = PyBytes_GET_SIZE(args[1]);
    if (view.len <= header_len || memcmp(view.buf, PyBytes_AS_STRING(args[1]), header_len) != 0) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    /* A view of the body that lives only during the call (unpackb copies out). */
    PyObject *body = PyMemoryView_FromMemory((char *)view.buf + header_len,
                                             view.len - header_len, PyBUF_READ);
    PyObject *payload = NULL;
    if (body != NULL) {
        PyObject *call[4] = {NULL, body, s_surrogatepass, args[3]};
        payload = PyObject_Vectorcall(args[2], call + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                      kwnames_unpack);
        if (Py_REFCNT(body) > 1) { /* kept by someone: cut it off before the buffer goes */
            PyObject *done = PyObject_CallMethod(body, "release", NULL);
            if (done == NULL)
                Py_CLEAR(payload);
            Py_XDECREF(done);
        }
        Py_DECREF(body);
    }
    PyBuffer_Release(&view);
    if (payload == NULL)
        return NULL;
    PyObject *built = rebuild_payload(payload, args + 4);
    Py_DECREF(payload);
    return built;
}

/* --------------------------------------------------------------------- flatten */

/* An encoder entry (_codec.py's _compiled_encoders builds them):
   (tag, names, kinds, text_slot, mirror_slot); kinds[i] = (code, arg). */
enum { ENC_TAG, ENC_NAMES, ENC_KINDS, ENC_TEXT_SLOT, ENC_MIRROR_SLOT, ENC_LEN };
/* A field's check, as _codec.py's _CHECKS_BY_FIELD and _build_spec choose it. */
enum {
    KIND_STR, KIND_OPT_STR, KIND_FREE_DICT, KIND_OPT_FREE_DICT, KIND_DICT_LIST,
    KIND_CONTENT, KIND_ANY, KIND_LITERAL, KIND_MESSAGE, KIND_COUNT
};
#define MAX_NESTING 100 /* _codec.MAX_NESTING_DEPTH, passed in and checked */

typedef struct {
    PyObject *specs[PAYLOAD_LEVELS]; /* type -> encoder entry, per level */
    PyTypeObject *text_type;
    long max_depth;
} Encoding;

/* Does the field's value pass its check?  1 yes, 0 no (Python decides), -1 error. */
static int
field_passes(PyObject *v, long code, PyObject *arg, const Encoding *enc)
{
    switch (code) {
    case KIND_OPT_STR:
        if (v == Py_None)
            return 1;
        /* fall through */
    case KIND_STR: /* a TextAccessor is stored as the str it is (see kept_value) */
        return PyUnicode_CheckExact(v) || Py_IS_TYPE(v, enc->text_type);
    case KIND_OPT_FREE_DICT:
        if (v == Py_None)
            return 1;
        /* fall through */
    case KIND_FREE_DICT:
        if (!PyDict_CheckExact(v))
            return 0;
        return PyDict_GET_SIZE(v) == 0 ? 1 : plain_tree(v, 0, enc->max_depth, enc->text_type);
    case KIND_DICT_LIST:
        if (!PyList_CheckExact(v))
            return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++)
            if (!PyDict_CheckExact(PyList_GET_ITEM(v, i)))
                return 0;
        return plain_tree(v, 0, enc->max_depth, enc->text_type);
    case KIND_CONTENT:
        if (PyUnicode_CheckExact(v))
            return 1;
        if (!PyList_CheckExact(v))
            return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
            PyObject *item = PyList_GET_ITEM(v, i);
            if (!PyUnicode_CheckExact(item) && !PyDict_CheckExact(item))
                return 0;
        }
        return plain_tree(v, 0, enc->max_depth, enc->text_type);
    case KIND_ANY:
        return plain_tree(v, 0, enc->max_depth, enc->text_type);
    case KIND_LITERAL:
        if (v != Py_None && !PyUnicode_CheckExact(v))
            return 0;
        return PySet_Contains(arg, v);
    default:
        return 0;
    }
}

/* What a passed check returns, as _codec.py's checks do: the value itself, but a
   TextAccessor in a str field as a plain str (str.__str__ of it). */
static PyObject *
kept_value(PyObject *v, long code, const Encoding *enc)
{
    if ((code == KIND_STR || code == KIND_OPT_STR) && Py_IS_TYPE(v, enc->text_type))
        return PyUnicode_FromObject(v);
    return Py_NewRef(v);
}

static PyObject *flatten_one(PyObject *obj, const Encoding *enc, int level, Outcome *outcome);

/* Is a truthy slot of the object (extras, private attributes) set?  1, 0, -1 error. */
static int
slot_is_set(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    int set = PyObject_IsTrue(value);
    Py_DECREF(value);
    return set;
}

/* The fields-set mask over names (no extras here, so no extras bit). */
static int
fields_mask(PyObject *obj, PyObject *names, long long *mask)
{
    PyObject *fields_set = PyObject_GetAttr(obj, s_fields_set);
    if (fields_set == NULL)
        return -1;
    int ok = 0;
    *mask = 0;
    if (PyAnySet_Check(fields_set)) {
        ok = 1;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names) && ok == 1; i++) {
            int has = PySet_Contains(fields_set, PyTuple_GET_ITEM(names, i));
            if (has < 0)
                ok = -1;
            else if (has)
                *mask |= 1LL << i;
        }
    }
    Py_DECREF(fields_set);
    return ok;
}

/* Does the ChatGeneration-like text equal its message's str content (stored as nil)?
   As _encode_object: the object's own text and message, compared after the checks. */
static int
text_mirrors(PyObject *values, PyObject *names, Py_ssize_t text_slot, Py_ssize_t mirror)
{
    PyObject *message = PyDict_GetItemWithError(values, PyTuple_GET_ITEM(names, mirror));
    PyObject *text = PyDict_GetItemWithError(values, PyTuple_GET_ITEM(names, text_slot));
    if (message == NULL || text == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *content = PyObject_GetAttr(message, s_content);
    if (content == NULL)
        return -1;
    int same = PyUnicode_CheckExact(content) ? PyObject_RichCompareBool(text, content, Py_EQ) : 0;
    Py_DECREF(content);
    return same;
}

/* [tag, mask, None, *fields] of one object, as _encode_object writes it; NULL: outcome. */
static PyObject *
flatten_one(PyObject *obj, const Encoding *enc, int level, Outcome *outcome)
{
    *outcome = FAILED;
    PyObject *spec = PyDict_GetItemWithError(enc->specs[level], (PyObject *)Py_TYPE(obj));
    if (spec == NULL) {
        if (!PyErr_Occurred())
            *outcome = DECLINED;
        return NULL;
    }
    if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != ENC_LEN) {
        PyErr_SetString(PyExc_TypeError, "an encoder entry is (tag, names, kinds, text_slot, "
                                         "mirror_slot)");
        return NULL;
    }
    PyObject *names = PyTuple_GET_ITEM(spec, ENC_NAMES);
    PyObject *kinds = PyTuple_GET_ITEM(spec, ENC_KINDS);
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    int extra = slot_is_set(obj, s_extra), private = extra < 0 ? -1 : slot_is_set(obj, s_private);
    if (extra < 0 || private < 0)
        return NULL;
    long long mask;
    int masked = (extra || private) ? 0 : fields_mask(obj, names, &mask);
    if (masked <= 0) {
        if (masked == 0)
            *outcome = DECLINED;
        return NULL;
    }
    PyObject *values = PyObject_GetAttr(obj, s_dict);
    if (values == NULL)
        return NULL;
    PyObject *out = NULL;
    if (!PyDict_Check(values)) {
        *outcome = DECLINED;
        goto done;
    }
    out = PyList_New(3 + n);
    if (out == NULL)
        goto done;
    PyList_SET_ITEM(out, 0, Py_NewRef(PyTuple_GET_ITEM(spec, ENC_TAG)));
    PyObject *mask_obj = PyLong_FromLongLong(mask);
    if (mask_obj == NULL)
        goto fail;
    PyList_SET_ITEM(out, 1, mask_obj);
    PyList_SET_ITEM(out, 2, Py_NewRef(Py_None));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyDict_GetItemWithError(values, PyTuple_GET_ITEM(names, i));
        PyObject *kind = PyTuple_GET_ITEM(kinds, i);
        if (value == NULL) {
            if (!PyErr_Occurred())
                *outcome = DECLINED; /* a field with no value: Python says which */
            goto fail;
        }
        long code = PyLong_AsLong(PyTuple_GET_ITEM(kind, 0));
        PyObject *arg = PyTuple_GET_ITEM(kind, 1);
        if (code == KIND_MESSAGE) {
            int is = level + 1 < PAYLOAD_LEVELS ? PyObject_IsInstance(value, arg) : 0;
            if (is <= 0) {
                *outcome = is < 0 ? FAILED : DECLINED;
                goto fail;
            }
            PyObject *nested = flatten_one(value, enc, level + 1, outcome);
            if (nested == NULL)
                goto fail;
            PyList_SET_ITEM(out, 3 + i, nested);
            continue;
        }
        int ok = field_passes(value, code, arg, enc);
        if (ok <= 0) {
            *outcome = ok < 0 ? FAILED : DECLINED;
            goto fail;
        }
        PyObject *kept = kept_value(value, code, enc);
        if (kept == NULL)
            goto fail;
        PyList_SET_ITEM(out, 3 + i, kept);
    }
    Py_ssize_t text_slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, ENC_TEXT_SLOT));
    if (text_slot >= 0) {
        Py_ssize_t mirror = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, ENC_MIRROR_SLOT));
        int same = text_mirrors(values, names, text_slot, mirror);
        if (same < 0)
            goto fail;
        if (same && PyList_SetItem(out, 3 + text_slot, Py_NewRef(Py_None)) < 0)
            goto fail;
    }
    *outcome = BUILT;
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_DECREF(values);
    return out;
}

/* A kinds tuple must name a known check per field, with a frozenset for a literal
   and a type for a message: checked once per entry object, like the rebuild tables. */
static int
check_encoders(PyObject *specs)
{
    Py_ssize_t pos = 0;
    PyObject *cls, *spec;
    while (PyDict_Next(specs, &pos, &cls, &spec)) {
        if (!PyType_Check(cls) || !PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != ENC_LEN)
            return -1;
        PyObject *names = PyTuple_GET_ITEM(spec, ENC_NAMES);
        PyObject *kinds = PyTuple_GET_ITEM(spec, ENC_KINDS);
        if (!PyLong_CheckExact(PyTuple_GET_ITEM(spec, ENC_TAG)) || !PyTuple_CheckExact(names) ||
            PyTuple_GET_SIZE(names) > MAX_FIELDS || !PyTuple_CheckExact(kinds) ||
            PyTuple_GET_SIZE(kinds) != PyTuple_GET_SIZE(names))
            return -1;
        Py_ssize_t n = PyTuple_GET_SIZE(names);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *kind = PyTuple_GET_ITEM(kinds, i);
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i)) || !PyTuple_CheckExact(kind) ||
                PyTuple_GET_SIZE(kind) != 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(kind, 0)))
                return -1;
            long code = PyLong_AsLong(PyTuple_GET_ITEM(kind, 0));
            PyObject *arg = PyTuple_GET_ITEM(kind, 1);
            if (code < 0 || code >= KIND_COUNT ||
                (code == KIND_LITERAL && !PyFrozenSet_CheckExact(arg)) ||
                (code == KIND_MESSAGE && !PyType_Check(arg)))
                return -1;
        }
        Py_ssize_t text = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, ENC_TEXT_SLOT));
        Py_ssize_t mirror = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, ENC_MIRROR_SLOT));
        if (PyErr_Occurred() || text < -1 || text >= n || (text >= 0 && (mirror < 0 || mirror >= n)))
            return -1;
    }
    return 0;
}

static PyObject *checked_encoders[PAYLOAD_LEVELS];

static int
check_encoders_once(PyObject *specs, int which)
{
    if (specs == checked_encoders[which])
        return 0;
    if (!PyDict_CheckExact(specs) || check_encoders(specs) < 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError,
                        "an encoder table is a dict of type -> (tag, names, kinds, text_slot, "
                        "mirror_slot), kinds a (code, arg) per field");
        return -1;
    }
    Py_XSETREF(checked_encoders[which], Py_NewRef(specs));
    return 0;
}

/* flatten(generations, generation_encoders, message_encoders, text_type, max_depth):
   the payload encode_generations packs, for the common shapes; None: Python decides. */
static PyObject *
speedups_flatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "flatten(generations, generation_encoders, "
                                         "message_encoders, text_type, max_depth) takes 5 "
                                         "arguments");
        return NULL;
    }
    if (check_encoders_once(args[1], 0) < 0 || check_encoders_once(args[2], 1) < 0)
        return NULL;
    if (!PyType_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "text_type must be a type");
        return NULL;
    }
    Encoding enc = {{args[1], args[2]}, (PyTypeObject *)args[3], PyLong_AsLong(args[4])};
    if (enc.max_depth == -1 && PyErr_Occurred())
        return NULL;
    if (enc.max_depth < 0 || enc.max_depth > 1000) {
        PyErr_SetString(PyExc_ValueError, "max_depth must be in 0..1000");
        return NULL;
    }
    PyObject *generations = args[0];
    if (!PyList_CheckExact(generations) || PyList_GET_SIZE(generations) == 0)
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(generations);
    PyObject *payload = PyList_New(n);
    if (payload == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Outcome outcome;
        PyObject *item = flatten_one(PyList_GET_ITEM(generations, i), &enc, 0, &outcome);
        if (item == NULL) {
            Py_DECREF(payload);
            if (outcome == FAILED)
                return NULL;
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(payload, i, item);
    }
    return payload;
}

PyMethodDef speedups_codec_methods[] = {
    {"plain_tree", (PyCFunction)(void (*)(void))speedups_plain_tree, METH_FASTCALL,
     "plain_tree(value, depth, max_depth, text_type) -> bool: would _codec.py's "
     "free-form check of value pass (False: the Python check says why)."},
    {"rebuild", (PyCFunction)(void (*)(void))speedups_rebuild, METH_FASTCALL,
     "rebuild(payload, generation_table, message_table) -> list | None: the hit "
     "path's objects from an unpacked payload (None: the Python decoder decides)."},
    {"decode_plain", (PyCFunction)(void (*)(void))speedups_decode_plain, METH_FASTCALL,
     "decode_plain(data, header, unpackb, ext_hook, generation_table, message_table) "
     "-> list | None: header check, unpack and rebuild of a plain encoding in one call."},
    {"flatten", (PyCFunction)(void (*)(void))speedups_flatten, METH_FASTCALL,
     "flatten(generations, generation_encoders, message_encoders, text_type, max_depth) "
     "-> list | None: the payload an update packs (None: the Python encoder decides)."},
    {NULL, NULL, 0, NULL},
};

int
speedups_codec_init(void)
{
    PyObject *builtins = PyImport_ImportModule("builtins");
    if (builtins == NULL)
        return -1;
    PyObject *object = PyObject_GetAttrString(builtins, "object");
    Py_DECREF(builtins);
    if (object == NULL)
        return -1;
    object_new = PyObject_GetAttrString(object, "__new__");
    Py_DECREF(object);
    s_dict = PyUnicode_InternFromString("__dict__");
    s_fields_set = PyUnicode_InternFromString("__pydantic_fields_set__");
    s_extra = PyUnicode_InternFromString("__pydantic_extra__");
    s_private = PyUnicode_InternFromString("__pydantic_private__");
    s_content = PyUnicode_InternFromString("content");
    s_surrogatepass = PyUnicode_InternFromString("surrogatepass");
    PyObject *unicode_errors = PyUnicode_InternFromString("unicode_errors");
    PyObject *ext_hook = PyUnicode_InternFromString("ext_hook");
    if (unicode_errors != NULL && ext_hook != NULL)
        kwnames_unpack = PyTuple_Pack(2, unicode_errors, ext_hook);
    Py_XDECREF(unicode_errors);
    Py_XDECREF(ext_hook);
    if (object_new == NULL || s_dict == NULL || s_fields_set == NULL || s_extra == NULL ||
        s_private == NULL || s_content == NULL || s_surrogatepass == NULL ||
        kwnames_unpack == NULL)
        return -1;
    return 0;
}
