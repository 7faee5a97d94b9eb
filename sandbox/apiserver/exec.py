"""The pods/exec subresource over WebSocket, as kube-apiserver + kubelet serve it to kubectl.

Protocols ``v5.channel.k8s.io`` and ``v4.channel.k8s.io``: every binary message starts with a
channel byte (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; v5 adds 255 "close" whose second
byte names the channel the client is done writing, so ``echo hi | kubectl exec -i POD -- cat``
ends). When the command exits the error channel carries a ``metav1.Status``: Success, or Failure
with reason ``NonZeroExitCode`` and an ``ExitCode`` cause, from which kubectl takes its own exit
code. Then the connection closes.

The command runs through ``python -m sandbox.kubelet.launch enter`` (the same code as
``kmeshctl sandbox exec``): the container's cgroup, network (unless hostNetwork), UTS and mount
namespaces and root. With ``tty=true`` it gets a real pty (resize messages set its window size);
otherwise pipes. A client that goes away gets its command's process group killed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from . import errors, podruntime, websocket
from .model import Request, Response, Target, truthy
from .store import Store

audit = logging.getLogger("sandbox.apiserver.audit")
audit.setLevel(logging.INFO)  # who exec'd / port-forwarded what: always in the API server's log

EXEC_PROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
DRAIN_GRACE = 2.0  # seconds to wait for output after the command exits (background children)


def query_all(req: Request) -> list[tuple[str, str]]:
    return parse_qsl(getattr(req, "raw_query", "") or "", keep_blank_values=True)


def exit_status(code: int, command: list[str]) -> dict[str, Any]:
    """The error-channel Status kubelet sends when the command ends (client-go decodes it)."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command "
        f"[{' '.join(command)}], exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def require_upgrade(req: Request, protocols: list[str]) -> str:
    """The WebSocket subprotocol to answer with; BadRequest when this is no usable upgrade."""
    if not websocket.is_websocket(req.headers):
        raise errors.bad_request("Upgrade request required")
    proto = websocket.choose_protocol(req.headers, protocols)
    if proto is None:
        offered = ", ".join(websocket.offered_protocols(req.headers)) or "none"
        raise errors.bad_request(
            f"unable to upgrade connection: none of the offered subprotocols ({offered}) is supported; "
            f"supported: {', '.join(protocols)}"
        )
    return proto


class ExecEndpoints:
    """GET (WebSocket) pods/NAME/exec?command=...&container=&stdin=&stdout=&stderr=&tty=."""

    store: Store
    stream_counts: dict[str, int]
    _require: Callable[[Target], dict[str, Any]]

    def _exec(self, req: Request, t: Target) -> Response:
        if req.method not in ("GET", "POST"):
            raise errors.method_not_allowed()
        pod = self._require(t)
        params = query_all(req)
        command = [v for k, v in params if k == "command"]
        q = dict(params)
        stdin, stdout, stderr, tty = (truthy(q.get(k)) for k in ("stdin", "stdout", "stderr", "tty"))
        if not command:
            raise errors.bad_request("you must specify at least 1 command")
        if not (stdin or stdout or stderr):
            raise errors.bad_request("you must specify at least one of stdin, stdout, stderr")
        name = t.name or ""
        container = podruntime.pick_container(pod, name, q.get("container"))
        runtime = podruntime.resolve(pod)
        podruntime.running_container(runtime, name, container)
        proto = require_upgrade(req, EXEC_PROTOCOLS)
        from sandbox.kubelet.launch import enter_argv, enter_env

        argv = enter_argv(runtime.info, container, command, tty=tty)
        self.stream_counts["exec"] = self.stream_counts.get("exec", 0) + 1
        audit.info("exec %s/%s container=%s user=%s tty=%s command=%s", t.namespace, name, container,
                   req.user, tty, json.dumps(command))

        def serve(handler: Any) -> None:
            ws = websocket.WebSocket.accept(handler.connection, handler.rfile, req.headers, proto)
            ExecSession(ws, argv, enter_env(), command, stdin=stdin, stdout=stdout,
                        stderr=stderr and not tty, tty=tty, v5=proto.startswith("v5")).run()

        return Response(101, upgrade=serve)


class ExecSession:
    """One running command bridged to one WebSocket (see module doc)."""

    def __init__(self, ws: websocket.WebSocket, argv: list[str], env: dict[str, str], command: list[str],
                 stdin: bool, stdout: bool, stderr: bool, tty: bool, v5: bool) -> None:
        self.ws, self.argv, self.env, self.command = ws, argv, env, command
        self.want_stdin, self.want_stdout, self.want_stderr = stdin, stdout, stderr
        self.tty, self.v5 = tty, v5
        self.proc: subprocess.Popen[bytes] | None = None
        self.master: int | None = None
        self.stdin_fd: int | None = None
        self.readers: list[threading.Thread] = []
        # stdin goes through a writer thread, so a command that does not read cannot stall the
        # reading of the WebSocket (and with it the noticing of a client that went away).
        self.stdin_q: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self.writer: threading.Thread | None = None
        self.done = threading.Event()  # the command ended and its output is drained
        self.input_done = threading.Event()  # the client closed or vanished

    # ---------------------------------------------------------------- start
    def _spawn(self) -> None:
        if self.tty:
            import pty

            self.master, slave = pty.openpty()
            try:
                self.proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave, env=self.env,
                                             start_new_session=True, close_fds=True)
            finally:
                os.close(slave)
            self.stdin_fd = self.master if self.want_stdin else None
            self._reader(self.master, STDOUT)
            self._start_writer()
            return
        dev = subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.argv, env=self.env, start_new_session=True, close_fds=True,
            stdin=subprocess.PIPE if self.want_stdin else dev,
            stdout=subprocess.PIPE if self.want_stdout else dev,
            stderr=subprocess.PIPE if self.want_stderr else dev,
        )
        if self.proc.stdin is not None:
            self.stdin_fd = self.proc.stdin.fileno()
        if self.proc.stdout is not None:
            self._reader(self.proc.stdout.fileno(), STDOUT)
        if self.proc.stderr is not None:
            self._reader(self.proc.stderr.fileno(), STDERR)
        self._start_writer()

    def _start_writer(self) -> None:
        if self.stdin_fd is None:
            return

        def write() -> None:
            while True:
                item = self.stdin_q.get()
                if item is None:
                    self._close_stdin()
                    return
                try:
                    _write_all(self.stdin_fd, item)  # type: ignore[arg-type]
                except (OSError, TypeError):
                    self._close_stdin()
                    return

        self.writer = threading.Thread(target=write, name="exec-stdin", daemon=True)
        self.writer.start()

    def _feed(self, item: bytes | None) -> bool:
        """Queue stdin for the writer; False when the client vanished while the command was not
        reading (or the command ended)."""
        if self.writer is None or not self.writer.is_alive():
            return True
        while True:
            try:
                self.stdin_q.put(item, timeout=0.5)
                return True
            except queue.Full:
                if self.done.is_set() or _peer_gone(self.ws.sock):
                    return False

    def _reader(self, fd: int, channel: int) -> None:
        def pump() -> None:
            prefix = bytes([channel])
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the pty's last slave closed
                    return
                if not data or not self.ws.send(prefix + data):
                    return

        th = threading.Thread(target=pump, name=f"exec-out-{channel}", daemon=True)
        th.start()
        self.readers.append(th)

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        try:
            self._spawn()
        except OSError as e:
            self.ws.send(bytes([ERROR]) + json.dumps(exit_status(126, self.command) | {
                "message": f"cannot start the command: {e}"}).encode())
            self.ws.shutdown()
            return
        waiter = threading.Thread(target=self._wait, name="exec-wait", daemon=True)
        waiter.start()
        try:
            self._input_loop()
        finally:
            self.input_done.set()
            if not self.done.is_set():
                self._kill()  # the client went away: nothing may outlive its session
            waiter.join()
            if self.writer is not None:
                try:
                    self.stdin_q.put_nowait(None)
                except queue.Full:
                    pass  # the command is gone: the writer's next write fails and it ends
                self.writer.join(2.0)
            self._close_fds()

    def _input_loop(self) -> None:
        while True:
            msg = self.ws.recv()
            if msg is None:
                return
            _, data = msg
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel == STDIN and payload:
                if not self._feed(payload):
                    return
            elif channel == RESIZE and self.master is not None:
                _resize(self.master, payload)
            elif channel == CLOSE and self.v5 and payload[:1] == bytes([STDIN]):
                if not self._feed(None):
                    return

    def _close_stdin(self) -> None:
        if self.tty:
            if self.stdin_fd is not None:
                try:
                    os.write(self.stdin_fd, b"\x04")  # end of input on a terminal: ^D
                except OSError:
                    pass
            return
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.stdin_fd = None

    def _wait(self) -> None:
        assert self.proc is not None
        code = self.proc.wait()
        for th in self.readers:
            th.join(DRAIN_GRACE)
        if any(th.is_alive() for th in self.readers):
            self._kill()  # a background child still holds the output open
            for th in self.readers:
                th.join(DRAIN_GRACE)
        self.done.set()
        if code < 0:
            code = 128 - code  # killed by a signal: the shell's convention, as runtimes report it
        self.ws.send(bytes([ERROR]) + json.dumps(exit_status(code, self.command)).encode())
        self.ws.close()
        # Give the client a moment to answer our close, then end the connection either way.
        if not self.input_done.wait(5.0):
            self.ws.shutdown()

    def _kill(self) -> None:
        """SIGKILL the command's whole session (its shell's jobs have process groups of their own)."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *_session_members(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _close_fds(self) -> None:
        if self.master is not None:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = None
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass


def _peer_gone(sock: socket.socket) -> bool:
    """The client closed or reset its end, even with unread bytes of it still queued here
    (the TCP state says so: CLOSE after a reset, CLOSE_WAIT after its FIN)."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (OSError, ValueError, IndexError):
        return True
    return state in (7, 8)  # TCP_CLOSE, TCP_CLOSE_WAIT


def _session_members(sid: int) -> list[int]:
    """Pids whose session id is ``sid`` (field 6 of /proc/PID/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and fields[3] == str(sid).encode():
            out.append(int(entry))
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _resize(master: int, payload: bytes) -> None:
    """A resize message: ``{"Width": W, "Height": H}`` -> TIOCSWINSZ on the pty."""
    import fcntl
    import termios

    try:
        size = json.loads(payload)
        rows, cols = int(size.get("Height") or 0), int(size.get("Width") or 0)
    except (ValueError, TypeError, AttributeError):
        return
    if rows > 0 and cols > 0:
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass
