"""Start a container process, or enter a running one, with only the standard library.

Why a separate process: the kubelet is multi-threaded, and joining namespaces or building a
mount tree in a forked child of a threaded Python program is unsafe. So the kubelet spawns
``python -m sandbox.kubelet.launch run SPEC.json``, which (single-threaded) does, in order:

1. joins the container's cgroup (so /proc/<pid>/cgroup names the pod UID, as under a kubelet),
2. joins the pod's network namespace (unless hostNetwork) and a new UTS namespace (hostname),
3. unshares a mount namespace, makes every mount in it private (nothing propagates back to the
   machine), builds a root on a tmpfs from recursive binds of the machine's top-level
   directories, bind-mounts the volumes at their mountPaths (directories that do not exist are
   created by shadowing their nearest existing parent with a tmpfs that re-binds its entries, so
   nothing is ever created on the machine's filesystem), binds the pod's /etc/hosts,
4. chroots into that root and execs the container's program.

``enter`` does the same for ``kmeshctl sandbox exec``: cgroup, network, UTS and mount namespace
and root of a running container process, then exec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import stat
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LaunchError(Exception):
    """A container could not be set up; the message is what the Pod status shows."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def umount_detach(target: str) -> None:
    _libc.umount2(target.encode(), MNT_DETACH)


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def sethostname(name: str) -> None:
    raw = name.encode()[:64]
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def join_cgroup(cgroup_dir: str) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


class RootBuilder:
    """Builds a private root in a mount namespace this process already owns (see module doc)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._ours: set[str] = {self.root}  # tmpfs directories we may create entries in
        self._shadow_count = 0

    def build(self) -> None:
        mount("tmpfs", self.root, "tmpfs", 0, "mode=755,size=16m")
        self._populate(self.root, "/")
        # The bind of the directory holding our root also shows our root: hide that loop.
        inner = self.root + self.root
        if os.path.ismount(inner):
            umount_detach(inner)

    def _populate(self, dest: str, source: str) -> None:
        for entry in sorted(os.listdir(source)):
            src = os.path.join(source, entry)
            dst = os.path.join(dest, entry)
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
                continue
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst, stat.S_IMODE(st.st_mode))
            else:
                open(dst, "w").close()
            try:
                mount(src, dst, None, MS_BIND | MS_REC)
            except LaunchError:
                # Unreadable special entries are left out rather than failing the container.
                continue

    def _shadow(self, directory: str) -> None:
        """Make an existing bound directory writable in this namespace only (see module doc)."""
        if directory in self._ours:
            return
        self._shadow_count += 1
        staging = os.path.join(self.root, f".kmesh-shadow-{self._shadow_count}")
        os.mkdir(staging)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        mount(directory, staging, None, MS_BIND | MS_REC)
        mount("tmpfs", directory, "tmpfs", 0, f"mode={mode:o},size=16m")
        self._populate(directory, staging)
        umount_detach(staging)
        os.rmdir(staging)
        self._ours.add(directory)

    def ensure(self, path: str, is_file: bool) -> str:
        """Return the host path of container `path` under root, creating it if missing."""
        resolved = self._resolve_abs(path)
        if os.path.lexists(resolved):
            return resolved
        stripped = path.rstrip("/")
        parent = self.ensure(os.path.dirname(stripped) or "/", is_file=False)
        self._shadow(parent)
        target = os.path.join(parent, os.path.basename(stripped))
        if is_file:
            open(target, "w").close()
        else:
            os.mkdir(target, 0o755)
            self._ours.add(target)
        return target

    def _resolve_abs(self, path: str) -> str:
        """Follow symlinks within the root; only the final missing tail is left unresolved."""
        parts = [p for p in path.split("/") if p and p != "."]
        current = self.root
        budget = 40
        while parts:
            head = parts.pop(0)
            if head == "..":
                if current != self.root:
                    current = os.path.dirname(current)
                continue
            candidate = os.path.join(current, head)
            if os.path.islink(candidate):
                budget -= 1
                if budget < 0:
                    raise LaunchError(f"too many symlinks resolving {path}")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    current = self.root
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            current = candidate
        return current

    def bind(self, source: str, target: str, read_only: bool) -> None:
        is_file = not os.path.isdir(source)
        dest = self.ensure(target, is_file)
        mount(source, dest, None, MS_BIND | MS_REC)
        if read_only:
            mount(None, dest, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def run(spec: dict) -> None:
    """Set up the container described by `spec` (written by runtime.py) and exec it."""
    join_cgroup(spec["cgroup"])
    if spec.get("netns"):
        setns(spec["netns"], CLONE_NEWNET)
    if spec.get("hostname"):
        unshare(CLONE_NEWUTS)
        sethostname(spec["hostname"])
    unshare(CLONE_NEWNS)
    # Nothing we mount may propagate to the machine: make the whole copied tree private first.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    builder = RootBuilder(spec["rootfs"])
    builder.build()
    # Parents before children (as runc orders them), so a volume never hides one mounted inside it.
    for m in sorted(spec.get("mounts", []), key=lambda m: len([p for p in m["target"].split("/") if p])):
        builder.bind(m["source"], m["target"], bool(m.get("read_only")))
    os.chroot(builder.root)
    os.chdir(spec.get("workdir") or "/")
    argv = spec["argv"]
    env = spec["env"]
    ready_fd = spec.get("ready_fd")
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise LaunchError(f"exec {argv[0]}: {e.strerror}") from e


def enter_argv(pod_info: dict, container: str, command: list[str], tty: bool = False) -> list[str]:
    """The command line that runs ``command`` in ``container`` of a pod the kubelet published in
    its ``pod.json`` (``kmeshctl sandbox exec`` and the API server's pods/exec both use it)."""
    c = pod_info["containers"][container]
    mode = "host" if pod_info.get("hostNetwork") else "net"
    return [sys.executable, "-m", "sandbox.kubelet.launch", "enter", str(c["pid"]), c["cgroup"], mode,
            *(["tty"] if tty else []), "--", *command]


def enter_env() -> dict[str, str]:
    """The environment for :func:`enter_argv`: this repository importable as ``sandbox``."""
    repo = str(Path(__file__).resolve().parents[2])
    extra = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=repo + (":" + extra if extra else ""))


def take_terminal() -> None:
    """Make stdin (a pty slave) our controlling terminal; we must be a session leader (setsid)."""
    import fcntl
    import termios

    try:
        os.setsid()
    except OSError:
        pass  # already a session leader (started with start_new_session)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def enter(pid: int, cgroup_dir: str | None, argv: list[str], host_network: bool, tty: bool = False) -> None:
    """Join the namespaces, cgroup and root of running container process `pid`, then exec argv.

    ``tty``: stdin is a pty slave that becomes the controlling terminal (``kubectl exec -t``).
    """
    if tty:
        take_terminal()
    proc = f"/proc/{pid}"
    if not os.path.exists(proc):
        raise LaunchError(f"container process {pid} is not running")
    if cgroup_dir:
        join_cgroup(cgroup_dir)
    root_fd = os.open(f"{proc}/root", os.O_RDONLY | os.O_DIRECTORY)
    cwd = os.readlink(f"{proc}/cwd")
    env_raw = Path(f"{proc}/environ").read_bytes().split(b"\0")
    env = dict(e.decode(errors="replace").split("=", 1) for e in env_raw if b"=" in e)
    if not host_network:
        setns(f"{proc}/ns/net", CLONE_NEWNET)
    setns(f"{proc}/ns/uts", CLONE_NEWUTS)
    setns(f"{proc}/ns/mnt", CLONE_NEWNS)
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise LaunchError(f"exec {argv[0]}: {e.strerror}") from e


def main(args: list[str]) -> int:
    try:
        if len(args) == 2 and args[0] == "run":
            run(json.loads(Path(args[1]).read_text()))
        elif len(args) >= 5 and args[0] == "enter" and "--" in args:
            sep = args.index("--")
            pid, cgroup_dir, host_network = int(args[1]), args[2] or None, args[3] == "host"
            enter(pid, cgroup_dir, args[sep + 1 :], host_network, tty="tty" in args[4:sep])
        else:
            print("usage: launch run SPEC.json | enter PID CGROUP net|host [tty] -- CMD...", file=sys.stderr)
            return 2
    except (LaunchError, OSError) as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 127 if isinstance(e, LaunchError) and str(e).startswith("exec ") else 126
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
