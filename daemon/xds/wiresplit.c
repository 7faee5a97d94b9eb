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
 * those cleared). vd is daemon.state._pack(hash(Any.value), version): 7 bytes of digest, then
 * the version (see pack_vd). address is bytes when there is exactly one, else a tuple.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

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

#define DIGEST_MASK ((UINT64_C(1) << 55) - 1)
#define VD_PACKED (UINT64_C(1) << 55)

static int hexval(unsigned char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* daemon.state._pack: 7 bytes of digest (the low 55 bits of the hash; the top bit flags a
 * packed version), then the version: its 8 bytes when it is 16 lowercase hex digits, else its
 * UTF-8 as is. */
static PyObject *pack_vd(uint64_t h, ptr ver, uint64_t ver_len)
{
    uint64_t d = h & DIGEST_MASK;
    int packed = ver_len == 16;
    for (uint64_t i = 0; packed && i < 16; i++)
        packed = hexval(ver[i]) >= 0;
    PyObject *vd = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(7 + (packed ? 8 : ver_len)));
    if (vd == NULL)
        return NULL;
    unsigned char *v = (unsigned char *)PyBytes_AS_STRING(vd);
    if (packed) {
        d |= VD_PACKED;
        for (int i = 0; i < 8; i++)
            v[7 + i] = (unsigned char)(hexval(ver[2 * i]) << 4 | hexval(ver[2 * i + 1]));
    } else if (ver_len) {
        memcpy(v + 7, ver, (size_t)ver_len);
    }
    for (int i = 0; i < 7; i++)
        v[i] = (unsigned char)(d >> (8 * i));
    return vd;
}

/* The parts of a plain Workload in the Any at [p, end): 1 and parts[5] filled (new references),
 * 0 when it is not a plain valid Workload, -1 with an exception set. want: the resource name
 * ("" when unnamed) the uid must equal; ver: the version packed into vd. */
static int split_any(ptr p, ptr end, const char *want, Py_ssize_t want_len, const char *ver,
                     Py_ssize_t ver_len, PyObject **parts)
{
    ptr value = NULL, data;
    uint64_t tag, n, vlen = 0;
    int typed = 0;

    /* google.protobuf.Any: type_url (1) must be the Address type, value (2); nothing else */
    while (p < end) {
        if (!varint(&p, end, &tag))
            return 0;
        if (tag == 0x0a && !typed) {
            if (!payload(&p, end, &data, &n) || n != sizeof(ADDRESS_TYPE) - 1 || memcmp(data, ADDRESS_TYPE, n))
                return 0;
            typed = 1;
        } else if (tag == 0x12 && value == NULL) {
            if (!payload(&p, end, &value, &vlen))
                return 0;
        } else {
            return 0;
        }
    }
    if (!typed || value == NULL)
        return 0;

    /* istio.workload.Address holding only a workload (1) */
    p = value;
    end = value + vlen;
    if (!varint(&p, end, &tag) || tag != 0x0a || !varint(&p, end, &n) || (uint64_t)(end - p) != n)
        return 0;

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
            return 0;
        uint64_t num = tag >> 3;
        if (num == 1 || num == 3 || num == 20) {
            if ((tag & 7) != 2 || ncut == MAX_CUT || !payload(&p, end, &data, &n))
                return 0;
            if (num == 1) {
                if (name != NULL)
                    return 0;
                name = data;
                name_len = n;
            } else if (num == 20) {
                if (uid != NULL)
                    return 0;
                uid = data;
                uid_len = n;
            } else {
                if (n != 4 && n != 16)
                    return 0;
                addrs[naddr] = data;
                addr_len[naddr++] = n;
            }
            cuts[ncut].start = field;
            cuts[ncut++].end = p;
        } else {
            if (!skip(&p, end, (unsigned)(tag & 7)))
                return 0;
            rest_len += (uint64_t)(p - field);
        }
    }
    if (uid == NULL || uid_len == 0)
        return 0;
    if (want_len && ((uint64_t)want_len != uid_len || memcmp(want, uid, uid_len)))
        return 0;

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
    vd = pack_vd((uint64_t)_Py_HashBytes(value, (Py_ssize_t)vlen), (ptr)ver, (uint64_t)ver_len);
    if (vd == NULL)
        goto fail;
    parts[0] = uid_s;
    parts[1] = name_s;
    parts[2] = addr;
    parts[3] = rest;
    parts[4] = vd;
    return 1;

invalid: /* bad UTF-8 in uid or name: protobuf rejects it, with its message */
    PyErr_Clear();
    Py_XDECREF(uid_s);
    return 0;
fail:
    Py_XDECREF(uid_s);
    Py_XDECREF(name_s);
    Py_XDECREF(addr);
    Py_XDECREF(rest);
    Py_XDECREF(vd);
    return -1;
}

static PyObject *workload(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyUnicode_Check(args[1]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "workload(any: bytes, name: str, version: str)");
        return NULL;
    }
    Py_ssize_t want_len, ver_len;
    const char *want = PyUnicode_AsUTF8AndSize(args[1], &want_len);
    const char *ver = want ? PyUnicode_AsUTF8AndSize(args[2], &ver_len) : NULL;
    if (ver == NULL)
        return NULL;
    ptr p = (ptr)PyBytes_AS_STRING(args[0]);
    PyObject *parts[5];
    int got = split_any(p, p + PyBytes_GET_SIZE(args[0]), want, want_len, ver, ver_len, parts);
    if (got < 0)
        return NULL;
    if (got == 0)
        Py_RETURN_NONE;
    PyObject *t = PyTuple_New(5);
    if (t == NULL) {
        for (int i = 0; i < 5; i++)
            Py_DECREF(parts[i]);
        return NULL;
    }
    for (int i = 0; i < 5; i++)
        PyTuple_SET_ITEM(t, i, parts[i]); /* the tuple takes our references */
    return t;
}


/* 1 when [p, p+n) is valid UTF-8 (what protobuf checks of a string field it parses). */
static int utf8_ok(ptr p, uint64_t n)
{
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
    if (s == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(s);
    return 1;
}

/* The Address value of an Any of the Address type at [p, end): 1 with value/vlen set, or 0. */
static int address_value(ptr p, ptr end, ptr *value, uint64_t *vlen)
{
    ptr data;
    uint64_t tag, n;
    int typed = 0;
    *value = NULL;
    while (p < end) {
        if (!varint(&p, end, &tag))
            return 0;
        if (tag == 0x0a && !typed) {
            if (!payload(&p, end, &data, &n) || n != sizeof(ADDRESS_TYPE) - 1 || memcmp(data, ADDRESS_TYPE, n))
                return 0;
            typed = 1;
        } else if (tag == 0x12 && *value == NULL) {
            if (!payload(&p, end, value, vlen))
                return 0;
        } else {
            return 0;
        }
    }
    return typed && *value != NULL;
}

/* A plain Service in the Any at [p, end) -> new references in parts: name ("ns/hostname"),
 * namespace, hostname, vips tuple, ports tuple of (service_port, target_port), raw (the
 * Address bytes). 1 done, 0 not plain or invalid (the caller decodes it), -1 error. Plain:
 * only fields service_record reads, plus the varint ones it ignores (9, 11, 12, 14). */
static int split_service(ptr p, ptr end, const char *want, Py_ssize_t want_len, PyObject **parts,
                         ptr *value_out, uint64_t *vlen_out)
{
    ptr value, data, ns = NULL, host = NULL;
    uint64_t vlen = 0, tag, n, ns_len = 0, host_len = 0;
    if (!address_value(p, end, &value, &vlen))
        return 0;
    p = value;
    end = value + vlen;
    if (!varint(&p, end, &tag) || tag != 0x12 || !varint(&p, end, &n) || (uint64_t)(end - p) != n)
        return 0;
    ptr start = p;
    int nvip = 0, nport = 0, seen_name = 0;
    /* first pass: validate and count */
    while (p < end) {
        if (!varint(&p, end, &tag))
            return 0;
        switch (tag) {
        case 0x0a: /* name: unused, but must be UTF-8 */
            if (seen_name || !payload(&p, end, &data, &n) || !utf8_ok(data, n))
                return 0;
            seen_name = 1;
            break;
        case 0x12:
            if (ns != NULL || !payload(&p, end, &ns, &ns_len))
                return 0;
            break;
        case 0x1a:
            if (host != NULL || !payload(&p, end, &host, &host_len))
                return 0;
            break;
        case 0x22: { /* NetworkAddress: network (1, string), address (2), length (3) */
            ptr q, qend, addr = NULL;
            uint64_t alen = 0, t2;
            if (!payload(&p, end, &q, &n))
                return 0;
            qend = q + n;
            int seen_net = 0;
            while (q < qend) {
                if (!varint(&q, qend, &t2))
                    return 0;
                if (t2 == 0x0a && !seen_net) {
                    if (!payload(&q, qend, &data, &n) || !utf8_ok(data, n))
                        return 0;
                    seen_net = 1;
                } else if (t2 == 0x12 && addr == NULL) {
                    if (!payload(&q, qend, &addr, &alen))
                        return 0;
                } else if (t2 == 0x18) {
                    if (!varint(&q, qend, &n))
                        return 0;
                } else {
                    return 0;
                }
            }
            if (alen != 4 && alen != 16)
                return 0;
            nvip++;
            break;
        }
        case 0x2a: { /* Port: service_port (1), target_port (2), app_protocol (3) */
            ptr q, qend;
            uint64_t t2, sp = 0, tp = 0;
            int seen_sp = 0, seen_tp = 0;
            if (!payload(&p, end, &q, &n))
                return 0;
            qend = q + n;
            while (q < qend) {
                if (!varint(&q, qend, &t2))
                    return 0;
                if (t2 == 0x08 && !seen_sp) {
                    if (!varint(&q, qend, &sp))
                        return 0;
                    seen_sp = 1;
                } else if (t2 == 0x10 && !seen_tp) {
                    if (!varint(&q, qend, &tp))
                        return 0;
                    seen_tp = 1;
                } else if (t2 == 0x18) {
                    if (!varint(&q, qend, &n))
                        return 0;
                } else {
                    return 0;
                }
            }
            if (sp < 1 || sp > 65535 || tp > 65535)
                return 0;
            nport++;
            break;
        }
        case 0x48: case 0x58: case 0x60: case 0x70: /* ip_families, canonical, ingress_use_waypoint, visibility */
            if (!varint(&p, end, &n))
                return 0;
            break;
        default:
            return 0;
        }
    }
    if (ns == NULL || host == NULL || ns_len == 0 || host_len == 0)
        return 0;
    if (want_len && ((uint64_t)want_len != ns_len + 1 + host_len || memcmp(want, ns, ns_len) ||
                     want[ns_len] != '/' || memcmp(want + ns_len + 1, host, host_len)))
        return 0;

    PyObject *ns_s = PyUnicode_DecodeUTF8((const char *)ns, (Py_ssize_t)ns_len, NULL);
    PyObject *host_s = ns_s ? PyUnicode_DecodeUTF8((const char *)host, (Py_ssize_t)host_len, NULL) : NULL;
    if (host_s == NULL) {
        PyErr_Clear();
        Py_XDECREF(ns_s);
        return 0;
    }
    PyObject *name_s = PyUnicode_FromFormat("%U/%U", ns_s, host_s);
    PyObject *vips = PyTuple_New(nvip), *ports = PyTuple_New(nport);
    PyObject *raw = PyBytes_FromStringAndSize((const char *)value, (Py_ssize_t)vlen);
    if (name_s == NULL || vips == NULL || ports == NULL || raw == NULL)
        goto fail;
    /* second pass: build (the bytes were validated above) */
    int iv = 0, ip = 0;
    p = start;
    while (p < end) {
        varint(&p, end, &tag);
        if (tag == 0x22 || tag == 0x2a) {
            ptr q, qend;
            uint64_t t2 = 0, a = 0, b = 0;
            payload(&p, end, &q, &n);
            qend = q + n;
            ptr addr = NULL;
            uint64_t alen = 0;
            while (q < qend) {
                varint(&q, qend, &t2);
                if (tag == 0x22 && t2 == 0x12)
                    payload(&q, qend, &addr, &alen);
                else if (tag == 0x2a && t2 == 0x08)
                    varint(&q, qend, &a);
                else if (tag == 0x2a && t2 == 0x10)
                    varint(&q, qend, &b);
                else
                    skip(&q, qend, (unsigned)(t2 & 7));
            }
            PyObject *item;
            if (tag == 0x22) {
                item = PyBytes_FromStringAndSize((const char *)addr, (Py_ssize_t)alen);
                if (item == NULL)
                    goto fail;
                PyTuple_SET_ITEM(vips, iv++, item);
            } else {
                item = Py_BuildValue("(KK)", (unsigned long long)a, (unsigned long long)b);
                if (item == NULL)
                    goto fail;
                PyTuple_SET_ITEM(ports, ip++, item);
            }
        } else {
            skip(&p, end, (unsigned)(tag & 7));
        }
    }
    parts[0] = name_s;
    parts[1] = ns_s;
    parts[2] = host_s;
    parts[3] = vips;
    parts[4] = ports;
    parts[5] = raw;
    *value_out = value;
    *vlen_out = vlen;
    return 1;
fail:
    Py_XDECREF(ns_s);
    Py_XDECREF(host_s);
    Py_XDECREF(name_s);
    Py_XDECREF(vips);
    Py_XDECREF(ports);
    Py_XDECREF(raw);
    return -1;
}

static PyTypeObject *record_type; /* daemon.state.WorkloadRecord's storage (below) */
static long long vd_digest(PyObject *vd);
static PyObject *new_record(PyObject *uid, PyObject *name, PyObject *addr, PyObject *profile, PyObject *vd);

/* A WorkloadRecord held: compare its digest and set its version here, without the attribute
 * calls (a resync that resends 100k unchanged workloads). 1 same, 0 changed, -1 error. */
static int unchanged_record(PyObject *old, long long digest, ptr ver, uint64_t ver_len);

/* held(name) re-sent unchanged? Then its version is set: 1; 0 not held or changed; -1 error. */
static int unchanged_held(PyObject *held, PyObject *name, long long digest, ptr ver, uint64_t ver_len)
{
    if (held == Py_None)
        return 0;
    int same = 0;
    PyObject *old = PyObject_CallOneArg(held, name);
    if (old == NULL)
        return -1;
    if (record_type != NULL && Py_IS_TYPE(old, record_type)) {
        same = unchanged_record(old, digest, ver, ver_len);
    } else if (old != Py_None) {
        PyObject *theirs = PyObject_GetAttrString(old, "digest");
        PyObject *mine = theirs ? PyLong_FromLongLong(digest) : NULL;
        same = mine ? PyObject_RichCompareBool(theirs, mine, Py_EQ) : -1;
        Py_XDECREF(theirs);
        Py_XDECREF(mine);
        if (same == 1) {
            PyObject *version = PyUnicode_DecodeUTF8(ver ? (const char *)ver : "", (Py_ssize_t)ver_len, NULL);
            PyObject *r = version ? PyObject_CallMethod(old, "set_version", "O", version) : NULL;
            Py_XDECREF(version);
            if (r == NULL)
                same = -1;
            Py_XDECREF(r);
        }
    }
    Py_DECREF(old);
    return same;
}

/* A plain Service resource -> make_service(name, namespace, hostname, vips, ports, raw,
 * version); Py_None when re-sent unchanged (counted) or left to the caller; NULL on error. */
static PyObject *one_service(ptr any, uint64_t any_len, ptr name, uint64_t name_len, ptr ver, uint64_t ver_len,
                             PyObject *make_service, PyObject *held, Py_ssize_t *unchanged)
{
    PyObject *parts[6];
    ptr value;
    uint64_t vlen;
    int got = split_service(any, any + any_len, (const char *)name, (Py_ssize_t)name_len, parts, &value, &vlen);
    if (got <= 0) {
        if (got == 0)
            Py_RETURN_NONE;
        return NULL;
    }
    PyObject *rec = NULL;
    int same = unchanged_held(held, parts[0], (long long)((uint64_t)_Py_HashBytes(value, (Py_ssize_t)vlen) & DIGEST_MASK),
                              ver, ver_len);
    if (same == 1) {
        ++*unchanged;
        rec = Py_None;
        Py_INCREF(rec);
    } else if (same == 0) {
        PyObject *version = PyUnicode_DecodeUTF8(ver ? (const char *)ver : "", (Py_ssize_t)ver_len, NULL);
        if (version != NULL) {
            PyObject *args[7] = {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], version};
            rec = PyObject_Vectorcall(make_service, args, 7, NULL);
            Py_DECREF(version);
        }
    }
    for (int i = 0; i < 6; i++)
        Py_DECREF(parts[i]);
    return rec;
}

/* The content digest packed at the start of a vd (little-endian, signed). */
static long long vd_digest(PyObject *vd)
{
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(vd);
    uint64_t h = 0;
    for (int i = 6; i >= 0; i--)
        h = h << 8 | b[i];
    return (long long)(h & DIGEST_MASK);
}

/* One plain Workload resource (envoy Resource bytes: version 1, resource 2, name 3, nothing
 * else) -> its record via make(uid, name, address(es), profile, vd); Py_None when the caller
 * must decode it; NULL on error. */
static PyObject *one(PyObject *raw, PyObject *profiles, PyObject *new_profile, PyObject *make,
                     PyObject *make_service, PyObject *held, Py_ssize_t *unchanged)
{
    ptr p = (ptr)PyBytes_AS_STRING(raw), end = p + PyBytes_GET_SIZE(raw), any = NULL, data;
    ptr name = NULL, ver = NULL;
    uint64_t tag, any_len = 0, name_len = 0, ver_len = 0;
    while (p < end) {
        if (!varint(&p, end, &tag))
            Py_RETURN_NONE;
        if (tag == 0x0a && ver == NULL) {
            if (!payload(&p, end, &ver, &ver_len))
                Py_RETURN_NONE;
        } else if (tag == 0x12 && any == NULL) {
            if (!payload(&p, end, &any, &any_len))
                Py_RETURN_NONE;
        } else if (tag == 0x1a && name == NULL) {
            if (!payload(&p, end, &name, &name_len))
                Py_RETURN_NONE;
        } else {
            Py_RETURN_NONE;
        }
    }
    /* unnamed: left to the caller (a delta response names every resource); the version must be
     * valid UTF-8 as protobuf would check (the name equals the uid, checked when decoded) */
    if (any == NULL || name_len == 0)
        Py_RETURN_NONE;
    if (ver_len) {
        PyObject *check = PyUnicode_DecodeUTF8((const char *)ver, (Py_ssize_t)ver_len, NULL);
        if (check == NULL) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        Py_DECREF(check);
    }
    (void)data;
    PyObject *parts[5];
    int got = split_any(any, any + any_len, (const char *)name, (Py_ssize_t)name_len,
                        ver ? (const char *)ver : "", (Py_ssize_t)ver_len, parts);
    if (got < 0)
        return NULL;
    if (got == 0)
        return one_service(any, any_len, name, name_len, ver, ver_len, make_service, held, unchanged);
    PyObject *rec = NULL;
    /* re-sent unchanged (same digest as the record held under this name, the uid): only the
     * version is taken, nothing is returned (Py_None, and not left to the caller) */
    int same = unchanged_held(held, parts[0], vd_digest(parts[4]), ver, ver_len);
    if (same < 0)
        goto done;
    if (same) {
        ++*unchanged;
        rec = Py_None;
        Py_INCREF(rec);
        goto done;
    }
    PyObject *prof = PyDict_GetItemWithError(profiles, parts[3]); /* borrowed */
    if (prof != NULL) {
        Py_INCREF(prof);
    } else if (!PyErr_Occurred()) {
        prof = PyObject_CallOneArg(new_profile, parts[3]);
    }
    if (prof == Py_None) {
        Py_DECREF(prof);
        rec = Py_None;
        Py_INCREF(rec);
    } else if (prof != NULL) {
        if (make == Py_None) {
            rec = new_record(parts[0], parts[1], parts[2], prof, parts[4]);
        } else {
            PyObject *args[5] = {parts[0], parts[1], parts[2], prof, parts[4]};
            rec = PyObject_Vectorcall(make, args, 5, NULL);
        }
        Py_DECREF(prof);
    }
done:
    for (int i = 0; i < 5; i++)
        Py_DECREF(parts[i]);
    return rec;
}

/* batch(resources, profiles, new_profile, make, make_service, held) -> (out, todo, unchanged)
 *   resources    iterable of envoy Resource bytes (ResponseView.resources)
 *   profiles     dict remainder -> profile (resources._PROFILES)
 *   new_profile  remainder -> profile or None, on a cache miss (it fills profiles)
 *   make         daemon.state.make_workload_record, or None: the same record made here (a
 *                Record, when daemon.state.WorkloadRecord is it), without a Python call a workload
 *   make_service (name, namespace, hostname, vips, ports, raw, version) -> ServiceRecord, for
 *                a plain Service (fields service_record reads; ports and addresses validated)
 *   held         name -> record held under it, or None (State.held); None: nothing is held
 * out[i] is resource i's WorkloadRecord, or None: when its index is in todo (the caller decodes
 * it: services, unusual layouts, anything invalid), or when it was re-sent unchanged (counted
 * in unchanged; its record got the new version). */
static PyObject *batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "batch(resources, profiles: dict, new_profile, make, make_service, held)");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(args[0]);
    if (it == NULL)
        return NULL;
    PyObject *out = PyList_New(0), *todo = PyList_New(0), *item;
    Py_ssize_t unchanged = 0;
    if (out == NULL || todo == NULL)
        goto fail;
    for (Py_ssize_t i = 0; (item = PyIter_Next(it)) != NULL; i++) {
        PyObject *rec;
        if (PyBytes_CheckExact(item)) {
            Py_ssize_t before = unchanged;
            rec = one(item, args[1], args[2], args[3], args[4], args[5], &unchanged);
            if (rec == Py_None && unchanged != before) { /* taken: neither a record nor to do */
                Py_DECREF(item);
                if (PyList_Append(out, rec)) {
                    Py_DECREF(rec);
                    goto fail;
                }
                Py_DECREF(rec);
                continue;
            }
        } else {
            rec = Py_None;
            Py_INCREF(rec);
        }
        Py_DECREF(item);
        if (rec == NULL)
            goto fail;
        int bad = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (bad)
            goto fail;
        if (rec == Py_None) {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (idx == NULL || PyList_Append(todo, idx)) {
                Py_XDECREF(idx);
                goto fail;
            }
            Py_DECREF(idx);
        }
    }
    if (PyErr_Occurred())
        goto fail;
    Py_DECREF(it);
    PyObject *n = PyLong_FromSsize_t(unchanged);
    PyObject *t = n ? PyTuple_Pack(3, out, todo, n) : NULL;
    Py_XDECREF(n);
    Py_DECREF(out);
    Py_DECREF(todo);
    return t;
fail:
    Py_DECREF(it);
    Py_XDECREF(out);
    Py_XDECREF(todo);
    return NULL;
}

/* Record: the storage of daemon.state.WorkloadRecord, 64 bytes with its digest and version.
 *
 * Why: at 100k workloads every object a record owns costs ~5 MiB. A Python class with four
 * slots is 64 bytes (16 of them the cyclic GC's header) plus a 48-byte object packing the
 * content digest and the xDS version (daemon.state._pack). Here the digest (55 bits) and a
 * version of 16 lowercase hex digits (a content hash, what the sandbox pilot sends) are stored
 * inline, and a record is not tracked by the GC: it refers to str/bytes/tuples and a shared
 * WorkloadProfile, never back to a record, so it can be in no cycle. ``extra`` is NULL in the
 * common case, else (name or None, version or None): a name that is not the uid's last
 * segment, a version that does not pack. A heap type made here (a Python subclass would be
 * GC-tracked again); daemon.state copies WorkloadRecord's other methods onto it. ``_vd`` reads
 * and writes the packed form, so records compare and rebuild as the Python class's do. */
typedef struct {
    PyObject_HEAD
    PyObject *uid, *addr, *profile, *extra;
    uint64_t digest;      /* 55 bits */
    unsigned char ver[8]; /* the version's 8 bytes when extra's version is None */
} Record;

static void record_dealloc(PyObject *self)
{
    Record *r = (Record *)self;
    PyTypeObject *tp = Py_TYPE(self);
    Py_CLEAR(r->uid);
    Py_CLEAR(r->addr);
    Py_CLEAR(r->profile);
    Py_CLEAR(r->extra);
    tp->tp_free(self);
    Py_DECREF(tp); /* instances of a heap type hold a reference to it */
}

static PyObject *extra_name(Record *r) /* borrowed, NULL: the uid's last segment */
{
    if (r->extra == NULL)
        return NULL;
    PyObject *n = PyTuple_GET_ITEM(r->extra, 0);
    return n == Py_None ? NULL : n;
}

static PyObject *extra_version(Record *r) /* borrowed, NULL: packed in ver */
{
    if (r->extra == NULL)
        return NULL;
    PyObject *v = PyTuple_GET_ITEM(r->extra, 1);
    return v == Py_None ? NULL : v;
}

/* Store (name or NULL, version str or NULL: packed) as extra. 0 ok, -1 error. */
static int set_extra(Record *r, PyObject *name, PyObject *version)
{
    PyObject *e = NULL;
    if (name != NULL || version != NULL) {
        e = PyTuple_Pack(2, name ? name : Py_None, version ? version : Py_None);
        if (e == NULL)
            return -1;
    }
    Py_XSETREF(r->extra, e);
    return 0;
}

/* Set the version from UTF-8 bytes: packed when 16 lowercase hex digits. */
static int record_set_version_utf8(Record *r, ptr ver, uint64_t ver_len)
{
    int packed = ver_len == 16;
    for (uint64_t i = 0; packed && i < 16; i++)
        packed = hexval(ver[i]) >= 0;
    PyObject *name = extra_name(r);
    Py_XINCREF(name);
    int rc;
    if (packed) {
        for (int i = 0; i < 8; i++)
            r->ver[i] = (unsigned char)(hexval(ver[2 * i]) << 4 | hexval(ver[2 * i + 1]));
        rc = set_extra(r, name, NULL);
    } else {
        PyObject *v = PyUnicode_DecodeUTF8(ver ? (const char *)ver : "", (Py_ssize_t)ver_len, NULL);
        rc = v == NULL ? -1 : set_extra(r, name, v);
        Py_XDECREF(v);
    }
    Py_XDECREF(name);
    return rc;
}

static PyObject *record_version(PyObject *self, void *closure)
{
    (void)closure;
    Record *r = (Record *)self;
    PyObject *v = extra_version(r);
    if (v != NULL)
        return Py_NewRef(v);
    static const char hex[] = "0123456789abcdef";
    char out[16];
    for (int i = 0; i < 8; i++) {
        out[2 * i] = hex[r->ver[i] >> 4];
        out[2 * i + 1] = hex[r->ver[i] & 15];
    }
    return PyUnicode_FromStringAndSize(out, 16);
}

static PyObject *record_set_version(PyObject *self, PyObject *value)
{
    if (!PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "set_version(value: str)");
        return NULL;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(value, &n);
    if (u == NULL || record_set_version_utf8((Record *)self, (ptr)u, (uint64_t)n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *record_digest(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((Record *)self)->digest);
}

static PyObject *record_name(PyObject *self, void *closure)
{
    (void)closure;
    Record *r = (Record *)self;
    PyObject *n = extra_name(r);
    if (n != NULL)
        return Py_NewRef(n);
    if (r->uid == NULL) {
        PyErr_SetString(PyExc_AttributeError, "uid");
        return NULL;
    }
    Py_ssize_t len = PyUnicode_GET_LENGTH(r->uid);
    Py_ssize_t at = PyUnicode_FindChar(r->uid, '/', 0, len, -1);
    if (at == -2)
        return NULL;
    return PyUnicode_Substring(r->uid, at + 1, len);
}

static PyObject *record__name(PyObject *self, void *closure)
{
    (void)closure;
    PyObject *n = extra_name((Record *)self);
    return Py_NewRef(n ? n : Py_None);
}

/* _vd: daemon.state._pack(digest, version), or (that, name) when the name is kept. */
static PyObject *record_get_vd(PyObject *self, void *closure)
{
    (void)closure;
    Record *r = (Record *)self;
    PyObject *v = extra_version(r), *vd;
    if (v == NULL) {
        vd = PyBytes_FromStringAndSize(NULL, 15);
        if (vd == NULL)
            return NULL;
        unsigned char *b = (unsigned char *)PyBytes_AS_STRING(vd);
        uint64_t d = r->digest | VD_PACKED;
        for (int i = 0; i < 7; i++)
            b[i] = (unsigned char)(d >> (8 * i));
        memcpy(b + 7, r->ver, 8);
    } else {
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(v, &n);
        if (u == NULL)
            return NULL;
        vd = pack_vd(r->digest, (ptr)u, (uint64_t)n);
        if (vd == NULL)
            return NULL;
    }
    PyObject *name = extra_name(r);
    if (name == NULL)
        return vd;
    PyObject *t = PyTuple_Pack(2, vd, name);
    Py_DECREF(vd);
    return t;
}

static int record_set_vd(PyObject *self, PyObject *value, void *closure)
{
    (void)closure;
    Record *r = (Record *)self;
    PyObject *vd = value, *name = NULL;
    if (value != NULL && PyTuple_CheckExact(value) && PyTuple_GET_SIZE(value) == 2) {
        vd = PyTuple_GET_ITEM(value, 0);
        name = PyTuple_GET_ITEM(value, 1);
        if (!PyUnicode_Check(name))
            vd = NULL;
    }
    if (vd == NULL || !PyBytes_CheckExact(vd) || PyBytes_GET_SIZE(vd) < 7) {
        PyErr_SetString(PyExc_TypeError, "_vd: daemon.state._pack(...) bytes, or (those, name)");
        return -1;
    }
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(vd);
    Py_ssize_t n = PyBytes_GET_SIZE(vd);
    uint64_t d = 0;
    for (int i = 6; i >= 0; i--)
        d = d << 8 | b[i];
    if (d & VD_PACKED) {
        if (n != 15) {
            PyErr_SetString(PyExc_ValueError, "_vd: a packed version is 8 bytes");
            return -1;
        }
        memcpy(r->ver, b + 7, 8);
        r->digest = d & DIGEST_MASK;
        return set_extra(r, name, NULL);
    }
    PyObject *v = PyUnicode_DecodeUTF8((const char *)b + 7, n - 7, NULL);
    if (v == NULL)
        return -1;
    r->digest = d & DIGEST_MASK;
    int rc = set_extra(r, name, v);
    Py_DECREF(v);
    return rc;
}

/* daemon.state.make_workload_record(uid, name, address, profile, vd) in C: the packed digest
 * and version go in as the _vd setter takes them, with the name kept only when it is not the
 * uid's last segment (the common case needs no extra). ~0.2 us a workload less than the call. */
static PyObject *new_record(PyObject *uid, PyObject *name, PyObject *addr, PyObject *profile, PyObject *vd)
{
    if (record_type == NULL || !PyUnicode_Check(uid) || !PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "new_record: str uid and name, and the Record type");
        return NULL;
    }
    PyObject *self = record_type->tp_alloc(record_type, 0);
    if (self == NULL)
        return NULL;
    Record *r = (Record *)self;
    r->uid = Py_NewRef(uid);
    r->addr = Py_NewRef(addr);
    r->profile = Py_NewRef(profile);
    Py_ssize_t n = PyUnicode_GET_LENGTH(name), u = PyUnicode_GET_LENGTH(uid);
    int tail = n > 0 && u > n && PyUnicode_ReadChar(uid, u - n - 1) == '/';
    if (tail) {
        tail = (int)PyUnicode_Tailmatch(uid, name, 0, PY_SSIZE_T_MAX, 1);
        if (tail < 0) {
            Py_DECREF(self);
            return NULL;
        }
    }
    int rc;
    if (tail) {
        rc = record_set_vd(self, vd, NULL);
    } else {
        PyObject *t = PyTuple_Pack(2, vd, name);
        rc = t == NULL ? -1 : record_set_vd(self, t, NULL);
        Py_XDECREF(t);
    }
    if (rc < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return self;
}

static int unchanged_record(PyObject *old, long long digest, ptr ver, uint64_t ver_len)
{
    Record *r = (Record *)old;
    if (r->digest != ((uint64_t)digest & DIGEST_MASK))
        return 0;
    return record_set_version_utf8(r, ver, ver_len) < 0 ? -1 : 1;
}

static PyMemberDef record_members[] = {
    {"uid", T_OBJECT_EX, offsetof(Record, uid), 0, NULL},
    {"_addr", T_OBJECT_EX, offsetof(Record, addr), 0, NULL},
    {"profile", T_OBJECT_EX, offsetof(Record, profile), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef record_getset[] = {
    {"_vd", record_get_vd, record_set_vd, NULL, NULL},
    {"version", record_version, NULL, NULL, NULL},
    {"digest", record_digest, NULL, NULL, NULL},
    {"name", record_name, NULL, NULL, NULL},
    {"_name", record__name, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef record_methods[] = {
    {"set_version", record_set_version, METH_O, "set_version(value): the xDS version"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot record_slots[] = {
    {Py_tp_dealloc, record_dealloc},
    {Py_tp_members, record_members},
    {Py_tp_getset, record_getset},
    {Py_tp_methods, record_methods},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL},
};

static PyType_Spec record_spec = {
    .name = "kmesh_wiresplit.Record",
    .basicsize = sizeof(Record),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = record_slots,
};

static PyMethodDef methods[] = {
    {"workload", (PyCFunction)(void (*)(void))workload, METH_FASTCALL,
     "workload(any, name, version) -> (uid, name, address(es), remainder, vd) or None"},
    {"batch", (PyCFunction)(void (*)(void))batch, METH_FASTCALL,
     "batch(resources, profiles, new_profile, make, make_service, held) -> (records, indexes left, unchanged)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "kmesh_wiresplit", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit_kmesh_wiresplit(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *record = PyType_FromSpec(&record_spec);
    if (record == NULL || PyModule_AddObject(m, "Record", record) < 0) {
        Py_XDECREF(record);
        Py_DECREF(m);
        return NULL;
    }
    record_type = (PyTypeObject *)record; /* the module keeps it */
    return m;
}
