/* kmesh-py: split a workload xDS resource straight from its bytes (the decoder's hot path).
 *
 * Why C: a full push carries ~100k Workloads. In Python, taking uid, name and addresses out of
 * each and cutting the shared remainder (the profile cache key) costs ~1.5 us of bytecode per
 * workload; here it is one pass over ~150 bytes. Built on first use by daemon/xds/native.py
 * (and by `make setup`); without a compiler the decoder falls back to its Python path.
 *
 * workload(any, name, version) -> (uid, name, address(es), remainder, vd) | None
 *   any      the raw google.protobuf.Any of one Resource (ResourceView.resource)
 *   name     the Resource's name ("" when unnamed)
 *   version  the Resource's version
 * Returns None whenever the resource is not a plain, valid Workload (a Service, a duplicate
 * field, a bad length, an address that is not 4 or 16 bytes, a uid not matching the name,
 * invalid UTF-8 ...): the caller then decodes it with protobuf, which names the problem.
 * The remainder is the Workload's bytes without its name (1), addresses (3) and uid (20)
 * fields, other fields in the order they came (what upb serializes for a WorkloadHead with
 * those cleared). vd is the 8-byte little-endian hash(Any.value) followed by the version in
 * UTF-8 (daemon.state._pack). address is bytes when there is exactly one, else a tuple.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static const char ADDRESS_TYPE[] = "type.googleapis.com/istio.workload.Address";
#define MAX_CUT 32 /* name, uid and up to 30 addresses; more: the Python path */

typedef const unsigned char *ptr;

static int varint(ptr *p, ptr end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        unsigned char b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* Skip a field's payload of wire type wt; 0 when malformed (or a group: left to upb). */
static int skip(ptr *p, ptr end, unsigned wt)
{
    uint64_t n;
    switch (wt) {
    case 0:
        return varint(p, end, &n);
    case 1:
        if (end - *p < 8)
            return 0;
        *p += 8;
        return 1;
    case 2:
        if (!varint(p, end, &n) || (uint64_t)(end - *p) < n)
            return 0;
        *p += n;
        return 1;
    case 5:
        if (end - *p < 4)
            return 0;
        *p += 4;
        return 1;
    default:
        return 0;
    }
}

/* A length-delimited payload at *p: sets data and len, moves past it. */
static int payload(ptr *p, ptr end, ptr *data, uint64_t *len)
{
    if (!varint(p, end, len) || (uint64_t)(end - *p) < *len)
        return 0;
    *data = *p;
    *p += *len;
    return 1;
}

struct cut {
    ptr start, end;
};

static PyObject *workload(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyUnicode_Check(args[1]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "workload(any: bytes, name: str, version: str)");
        return NULL;
    }
    ptr p = (ptr)PyBytes_AS_STRING(args[0]);
    ptr end = p + PyBytes_GET_SIZE(args[0]);
    ptr value = NULL, data;
    uint64_t tag, n, vlen = 0;
    int typed = 0;

    /* google.protobuf.Any: type_url (1) must be the Address type, value (2); nothing else */
    while (p < end) {
        if (!varint(&p, end, &tag))
            Py_RETURN_NONE;
        if (tag == 0x0a && !typed) {
            if (!payload(&p, end, &data, &n) || n != sizeof(ADDRESS_TYPE) - 1 || memcmp(data, ADDRESS_TYPE, n))
                Py_RETURN_NONE;
            typed = 1;
        } else if (tag == 0x12 && value == NULL) {
            if (!payload(&p, end, &value, &vlen))
                Py_RETURN_NONE;
        } else {
            Py_RETURN_NONE;
        }
    }
    if (!typed || value == NULL)
        Py_RETURN_NONE;

    /* istio.workload.Address holding only a workload (1) */
    p = value;
    end = value + vlen;
    if (!varint(&p, end, &tag) || tag != 0x0a || !varint(&p, end, &n) || (uint64_t)(end - p) != n)
        Py_RETURN_NONE;

    /* istio.workload.Workload: cut name (1), addresses (3), uid (20) out, keep the rest */
    struct cut cuts[MAX_CUT];
    int ncut = 0, naddr = 0;
    ptr addrs[MAX_CUT];
    uint64_t addr_len[MAX_CUT];
    ptr name = NULL, uid = NULL, start = p;
    uint64_t name_len = 0, uid_len = 0, rest_len = 0;
    while (p < end) {
        ptr field = p;
        if (!varint(&p, end, &tag) || tag >> 3 == 0 || tag >> 3 > 536870911)
            Py_RETURN_NONE;
        uint64_t num = tag >> 3;
        if (num == 1 || num == 3 || num == 20) {
            if ((tag & 7) != 2 || ncut == MAX_CUT || !payload(&p, end, &data, &n))
                Py_RETURN_NONE;
            if (num == 1) {
                if (name != NULL)
                    Py_RETURN_NONE;
                name = data;
                name_len = n;
            } else if (num == 20) {
                if (uid != NULL)
                    Py_RETURN_NONE;
                uid = data;
                uid_len = n;
            } else {
                if (n != 4 && n != 16)
                    Py_RETURN_NONE;
                addrs[naddr] = data;
                addr_len[naddr++] = n;
            }
            cuts[ncut].start = field;
            cuts[ncut++].end = p;
        } else {
            if (!skip(&p, end, (unsigned)(tag & 7)))
                Py_RETURN_NONE;
            rest_len += (uint64_t)(p - field);
        }
    }
    if (uid == NULL || uid_len == 0)
        Py_RETURN_NONE;
    Py_ssize_t want_len;
    const char *want = PyUnicode_AsUTF8AndSize(args[1], &want_len);
    if (want == NULL)
        return NULL;
    if (want_len && ((uint64_t)want_len != uid_len || memcmp(want, uid, uid_len)))
        Py_RETURN_NONE;
    Py_ssize_t ver_len;
    const char *ver = PyUnicode_AsUTF8AndSize(args[2], &ver_len);
    if (ver == NULL)
        return NULL;

    PyObject *uid_s = NULL, *name_s = NULL, *addr = NULL, *rest = NULL, *vd = NULL;
    uid_s = PyUnicode_DecodeUTF8((const char *)uid, (Py_ssize_t)uid_len, NULL);
    if (uid_s == NULL)
        goto invalid;
    name_s = PyUnicode_DecodeUTF8(name ? (const char *)name : "", (Py_ssize_t)name_len, NULL);
    if (name_s == NULL)
        goto invalid;
    if (naddr == 1) {
        addr = PyBytes_FromStringAndSize((const char *)addrs[0], (Py_ssize_t)addr_len[0]);
    } else {
        addr = PyTuple_New(naddr);
        for (int i = 0; addr != NULL && i < naddr; i++) {
            PyObject *a = PyBytes_FromStringAndSize((const char *)addrs[i], (Py_ssize_t)addr_len[i]);
            if (a == NULL) {
                Py_CLEAR(addr);
                break;
            }
            PyTuple_SET_ITEM(addr, i, a);
        }
    }
    if (addr == NULL)
        goto fail;
    rest = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)rest_len);
    if (rest == NULL)
        goto fail;
    char *out = PyBytes_AS_STRING(rest);
    ptr from = start;
    for (int i = 0; i < ncut; i++) {
        memcpy(out, from, (size_t)(cuts[i].start - from));
        out += cuts[i].start - from;
        from = cuts[i].end;
    }
    memcpy(out, from, (size_t)(end - from));
    vd = PyBytes_FromStringAndSize(NULL, 8 + ver_len);
    if (vd == NULL)
        goto fail;
    uint64_t h = (uint64_t)_Py_HashBytes(value, (Py_ssize_t)vlen);
    unsigned char *v = (unsigned char *)PyBytes_AS_STRING(vd);
    for (int i = 0; i < 8; i++)
        v[i] = (unsigned char)(h >> (8 * i));
    memcpy(v + 8, ver, (size_t)ver_len);
    PyObject *t = PyTuple_New(5);
    if (t == NULL)
        goto fail;
    PyTuple_SET_ITEM(t, 0, uid_s); /* the tuple takes our references */
    PyTuple_SET_ITEM(t, 1, name_s);
    PyTuple_SET_ITEM(t, 2, addr);
    PyTuple_SET_ITEM(t, 3, rest);
    PyTuple_SET_ITEM(t, 4, vd);
    return t;

invalid: /* bad UTF-8 in uid or name: protobuf rejects it, with its message */
    PyErr_Clear();
    Py_XDECREF(uid_s);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(uid_s);
    Py_XDECREF(name_s);
    Py_XDECREF(addr);
    Py_XDECREF(rest);
    Py_XDECREF(vd);
    return NULL;
}

static PyMethodDef methods[] = {
    {"workload", (PyCFunction)(void (*)(void))workload, METH_FASTCALL,
     "workload(any, name, version) -> (uid, name, address(es), remainder, vd) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "kmesh_wiresplit", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit_kmesh_wiresplit(void)
{
    return PyModule_Create(&module);
}
