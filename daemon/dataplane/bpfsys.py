"""The few bpf(2) commands bcc's Python API lacks, called directly through libc.

Used to open pinned maps without compiling anything (read-back of existing pins, migration
of the manage map), and to detach / query cgroup attachments.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import os
import struct

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_OBJ_GET = 7
BPF_PROG_DETACH = 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_PROG_GET_FD_BY_ID = 13

# attach types (enum bpf_attach_type)
CGROUP_SOCK_OPS = 3
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
