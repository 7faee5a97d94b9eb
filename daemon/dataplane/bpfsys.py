"""bpf(2) commands called directly through libc, so the long-lived daemon never loads libbcc.

Everything after the compile (which runs in a short-lived child, see loader.py) goes through
here: opening pinned maps, element and batch map I/O, attaching / detaching / querying cgroup
programs, object info.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import os
import struct

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_PROG_DETACH = 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_PROG_GET_FD_BY_ID = 13

# attach types (enum bpf_attach_type)
CGROUP_SOCK_OPS = 3
SK_MSG_VERDICT = 7
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30

_libc = ct.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ct.c_long


def _bpf(cmd: int, attr: ct.Array) -> int:
    res = _libc.syscall(ct.c_long(_NR_BPF), ct.c_int(cmd), attr, ct.c_uint(ct.sizeof(attr)))
    if res < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return int(res)


def _bpf_rc(cmd: int, attr: ct.Array) -> int:
    """Like _bpf but returns 0 or the errno instead of raising (batch calls report partial work)."""
    res = _libc.syscall(ct.c_long(_NR_BPF), ct.c_int(cmd), attr, ct.c_uint(ct.sizeof(attr)))
    return ct.get_errno() if res < 0 else 0


_ELEM = struct.Struct("=IIQQQ")  # map_fd, pad, key, value/next_key, flags
_BATCH = struct.Struct("=QQQQIIQQ")  # in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags


def map_lookup(fd: int, key: ct.Array, value: ct.Array) -> int:
    """0, or the errno (ENOENT when absent)."""
    attr = ct.create_string_buffer(_ELEM.size)
    _ELEM.pack_into(attr, 0, fd, 0, ct.addressof(key), ct.addressof(value), 0)
    return _bpf_rc(BPF_MAP_LOOKUP_ELEM, attr)


def map_delete(fd: int, key: ct.Array) -> int:
    attr = ct.create_string_buffer(_ELEM.size)
    _ELEM.pack_into(attr, 0, fd, 0, ct.addressof(key), 0, 0)
    return _bpf_rc(BPF_MAP_DELETE_ELEM, attr)


def map_batch(cmd: int, fd: int, keys: ct.Array | None, values: ct.Array | None, count: int,
              in_batch: ct.Array | None = None, out_batch: ct.Array | None = None) -> tuple[int, int]:
    """One BPF_MAP_*_BATCH call: returns (errno or 0, elements processed)."""
    attr = ct.create_string_buffer(_BATCH.size)
    _BATCH.pack_into(attr, 0, ct.addressof(in_batch) if in_batch is not None else 0,
                     ct.addressof(out_batch) if out_batch is not None else 0,
                     ct.addressof(keys) if keys is not None else 0,
                     ct.addressof(values) if values is not None else 0, count, fd, 0, 0)
    err = _bpf_rc(cmd, attr)
    return err, struct.unpack_from("=I", attr, 32)[0]


def prog_attach(cgroup_fd: int, prog_fd: int, attach_type: int) -> None:
    """BPF_PROG_ATTACH with flags 0: replaces our previous (single) program of that type in place."""
    attr = ct.create_string_buffer(20)
    struct.pack_into("=IIII", attr, 0, cgroup_fd, prog_fd, attach_type, 0)
    _bpf(BPF_PROG_ATTACH, attr)


def obj_get(path: str) -> int:
    """Open a pinned object (map or program); returns a new fd."""
    cpath = ct.create_string_buffer(os.fsencode(path))
    attr = ct.create_string_buffer(32)
    struct.pack_into("=Q", attr, 0, ct.addressof(cpath))
    return _bpf(BPF_OBJ_GET, attr)


def map_info(fd: int) -> dict[str, int]:
    """type, id, key_size, value_size, max_entries, map_flags of a map fd."""
    info = ct.create_string_buffer(96)
    attr = ct.create_string_buffer(16)
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    mtype, mid, ksz, vsz, maxe, flags = struct.unpack_from("=IIIIII", info, 0)
    return {"type": mtype, "id": mid, "key_size": ksz, "value_size": vsz, "max_entries": maxe,
            "map_flags": flags}


def obj_id(fd: int) -> int:
    """Kernel id of a program or map fd (bpf_prog_info.id / bpf_map_info.id, both at offset 4)."""
    info = ct.create_string_buffer(256)
    attr = ct.create_string_buffer(16)
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(struct.unpack_from("=I", info, 4)[0])


def prog_fd_by_id(prog_id: int) -> int:
    attr = ct.create_string_buffer(12)
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr)


def prog_name(fd: int) -> str:
    """bpf_prog_info.name (offset 64, 16 bytes) of a program fd."""
    info = ct.create_string_buffer(256)
    attr = ct.create_string_buffer(16)
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ct.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Program ids attached to this cgroup directly (not inherited) for one attach type."""
    ids = (ct.c_uint32 * 64)()
    attr = ct.create_string_buffer(40)
    struct.pack_into("=IIIIQI", attr, 0, cgroup_fd, attach_type, 0, 0, ct.addressof(ids), 64)
    _bpf(BPF_PROG_QUERY, attr)
    count = struct.unpack_from("=I", attr, 24)[0]
    return [ids[i] for i in range(min(count, 64))]


def prog_detach(cgroup_fd: int, attach_type: int, prog_fd: int = 0) -> None:
    """Detach the (single, non-multi) program of this attach type from the cgroup."""
    attr = ct.create_string_buffer(20)
    struct.pack_into("=IIII", attr, 0, cgroup_fd, prog_fd, attach_type, 0)
    _bpf(BPF_PROG_DETACH, attr)


def is_bpffs(path: str) -> bool:
    """Whether path (which must exist) is on a bpf filesystem (statfs magic BPF_FS_MAGIC)."""
    buf = ct.create_string_buffer(128)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err), path)
    return struct.unpack_from("=q", buf, 0)[0] == 0xCAFE4A11
