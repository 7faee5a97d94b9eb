"""Delta ADS client for Istio workload xDS (the part of ztunnel/Kmesh that talks to istiod).

One ``DeltaAggregatedResources`` stream carries two wildcard subscriptions, Address first and
then Authorization, exactly as ztunnel opens them. Every response is ACKed; resources that fail
validation are named in a NACK while the valid ones of the same response are applied. The
stream is re-opened forever with capped exponential backoff and jitter; the state (cache) is
kept across streams and announced to the server with ``initial_resource_versions`` so it can
send removals for what disappeared meanwhile.

Why metadata per stream instead of channel call-credentials: the token file is projected and
rotated by the kubelet, so it is re-read for every stream; and plaintext (istiod :15010) must
still be possible, where grpcio refuses call credentials.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.state import State
from daemon.xds.resources import ADDRESS_TYPE, AUTHORIZATION_TYPE, decode_batch

log = logging.getLogger("kmesh.xds")

MAX_RECEIVE_BYTES = 200 * 1024 * 1024  # ztunnel allows 200 MiB messages
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
_SHORT = {ADDRESS_TYPE: "address", AUTHORIZATION_TYPE: "authorization"}
INVALID_ARGUMENT = 3  # google.rpc.Code
DECODE_SLICE = 16384  # resources of a big Address response decoded and applied at a time (~5 MB of records)


@dataclass
class XdsConfig:
    """Where and who: the daemon's XDS_ADDRESS, CLUSTER_ID, POD_* and token/CA settings."""

    address: str  # "host:port"
    cluster_id: str = "Kubernetes"
    token_path: Path | None = None
    ca_path: Path | None = None
    server_name: str | None = None  # TLS name override (ztunnel ALT_XDS_HOSTNAME)
    plaintext: bool = False  # only with this explicit flag (istiod :15010)
    pod_name: str = ""
    pod_namespace: str = ""
    instance_ip: str = "1.1.1.1"
    node_name: str = ""
    service_account: str = ""
    mesh_id: str = "cluster.local"
    network: str = ""
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 15.0
    max_receive_bytes: int = MAX_RECEIVE_BYTES

    @property
    def node_id(self) -> str:
        ns = self.pod_namespace
        return f"ztunnel~{self.instance_ip}~{self.pod_name}.{ns}~{ns}.svc.cluster.local"


class XdsClient:
    """Background delta ADS client feeding a ``State``. ``status()`` is safe from any thread."""

    def __init__(self, config: XdsConfig, state: State) -> None:
        self.config = config
        self.state = state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._call: Any = None
        self._connected = False
        self._ready = False
        self._last_error = ""
        self._acks = 0
        self._nacks = 0
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._backoff = 0.0
        self._reconnects = 0
        self._streams = 0
        self._responses = 0
        self._unchanged = 0  # resources received identical to what was held (skipped)
        self._last_initial_versions: dict[str, dict[str, str]] = {}
        self.ready_event = threading.Event()
        self.last_received_monotonic = 0.0  # when the latest response was handed to us by gRPC

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        malloc_tune()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="xds-client", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "address": self.config.address,
                "cluster_id": self.config.cluster_id,
                "node_id": self.config.node_id,
                "connected": self._connected,
                "ready": self._ready,
                "last_error": self._last_error,
                "acks": self._acks,
                "nacks": self._nacks,
                "history": list(self._history),
                "resources": self.state.counts(),
                "backoff_s": round(self._backoff, 3),
                "reconnects": self._reconnects,
                "streams": self._streams,
                "responses": self._responses,
                "unchanged_skipped": self._unchanged,
                "initial_resource_versions": {k: len(v) for k, v in self._last_initial_versions.items()},
            }

    @property
    def last_initial_versions(self) -> dict[str, dict[str, str]]:
        """What the latest stream announced, per type URL (for tests and debugging)."""
        return self._last_initial_versions

    # ---- the reconnect loop ----------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.config.initial_backoff_s
        while not self._stop.is_set():
            healthy = False
            try:
                healthy = self._stream_once()
            except Exception as e:  # noqa: BLE001 - any failure means: back off and retry
                self._set_error(_describe(e))
            finally:
                with self._lock:
                    self._connected = False
                    self._call = None
            if self._stop.is_set():
                break
            if healthy:  # a stream that delivered responses: reconnect promptly, reset backoff
                backoff = self.config.initial_backoff_s
                delay = random.uniform(0, 0.05)
            else:
                delay = min(backoff, self.config.max_backoff_s)
                delay = min(delay * random.uniform(1.0, 1.25), self.config.max_backoff_s)
                backoff = min(backoff * 2, self.config.max_backoff_s)
            with self._lock:
                self._backoff = delay
                self._reconnects += 1
            log.info("xds stream to %s ended; reconnecting in %.2fs", self.config.address, delay)
            self._stop.wait(delay)

    def _channel(self) -> Any:
        """Our HTTP/2 gRPC transport (daemon/xds/h2grpc.py); grpcio with KMESH_XDS_TRANSPORT=grpcio."""
        if os.environ.get("KMESH_XDS_TRANSPORT", "h2") == "grpcio":
            return self._grpcio_channel()
        import ssl

        from daemon.xds import h2grpc

        tls = None
        if not self.config.plaintext:
            root = self._root_pem()
            tls = ssl.create_default_context(cadata=root.decode(errors="replace"))
            tls.set_alpn_protocols(["h2"])
        return h2grpc.Channel(self.config.address, tls=tls, server_name=self.config.server_name,
                              max_receive_bytes=self.config.max_receive_bytes)

    def _root_pem(self) -> bytes:
        if self.config.ca_path is None:
            raise ConfigError("TLS needs a root certificate (ca_path); or set plaintext explicitly")
        try:
            return Path(self.config.ca_path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read root certificate {self.config.ca_path}: {e.strerror}") from None

    def _grpcio_channel(self) -> Any:
        import grpc

        # no client keepalive pings: servers enforce a minimum ping interval (GOAWAY too_many_pings)
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", self.config.max_receive_bytes)]
        if self.config.plaintext:
            return grpc.insecure_channel(self.config.address, options=opts)
        root = self._root_pem()
        if self.config.server_name:
            opts.append(("grpc.ssl_target_name_override", self.config.server_name))
        return grpc.secure_channel(self.config.address, grpc.ssl_channel_credentials(root_certificates=root),
                                   options=opts)

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("clusterid", self.config.cluster_id)]
        if self.config.token_path is not None:
            try:
                token = Path(self.config.token_path).read_text().strip()
            except OSError as e:
                raise ConfigError(f"cannot read token {self.config.token_path}: {e.strerror}") from None
            md.insert(0, ("authorization", f"Bearer {token}"))
        return md

    def _node(self) -> Any:
        from google.protobuf import struct_pb2

        from daemon.xds.gen.kmesh import ads_pb2

        c = self.config
        meta = struct_pb2.Struct()
        meta.update({
            "NAMESPACE": c.pod_namespace, "CLUSTER_ID": c.cluster_id, "INSTANCE_IPS": c.instance_ip,
            "NODE_NAME": c.node_name, "SERVICE_ACCOUNT": c.service_account, "MESH_ID": c.mesh_id,
            "NETWORK": c.network, "NAME": c.pod_name,
        })
        return ads_pb2.Node(id=c.node_id, metadata=meta)

    def _stream_once(self) -> bool:
        """Run one stream to its end. Returns True if it was healthy (got a response)."""
        from daemon.xds.gen.kmesh import ads_pb2 as discovery_pb2  # Envoy's wire format, our module
        from daemon.xds.gen.kmesh import decode_pb2

        metadata = self._metadata()
        channel = self._channel()
        requests: queue.Queue[Any] = queue.Queue()

        def request_iter() -> Iterator[Any]:
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        node = self._node()
        initial = {t: self.state.resource_versions(_SHORT[t]) for t in TYPES}
        self._last_initial_versions = initial
        for t in TYPES:
            requests.put(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=t,
                                                             initial_resource_versions=initial[t]))
        stream = channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            # a view: each Resource stays bytes, the decoder reads them (daemon/xds/resources.py)
            response_deserializer=decode_pb2.ResponseView.FromString,
        )
        call = stream(request_iter(), metadata=metadata)
        with self._lock:
            self._call = call
            self._streams += 1
        if self._stop.is_set():
            call.cancel()
        responded: set[str] = set()
        healthy = False
        try:
            for resp in call:
                if not healthy:
                    healthy = True
                    with self._lock:
                        self._connected = True
                        self._last_error = ""
                received = time.monotonic()
                self.last_received_monotonic = received
                type_url, nonce, count = resp.type_url, resp.nonce, len(resp.resources)
                error = self._handle(resp)
                del resp
                if count > 1000 and self.state.synced:
                    # the parsed push alone is ~40 MB at 100k resources: give it back. Not before
                    # the first sync: the data plane's full sync follows at once and trims after
                    # it, so trimming here would only delay the ACK on the way to converged maps
                    malloc_trim()
                applied_ms = (time.monotonic() - received) * 1000
                ack = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
                if error:
                    ack.error_detail.CopyFrom(discovery_pb2.Status(code=INVALID_ARGUMENT, message=error))
                requests.put(ack)
                self._record(type_url, nonce, error, count, applied_ms)
                if type_url in TYPES and type_url not in responded:
                    responded.add(type_url)
                    if len(responded) == len(TYPES):
                        with self._lock:
                            self._ready = True
                        self.state.mark_synced()
                        self.ready_event.set()
        except Exception as e:  # noqa: BLE001
            if not self._stop.is_set():
                self._set_error(_describe(e))
        else:
            if not self._stop.is_set():
                self._set_error("stream closed by server")
        finally:
            requests.put(None)
            channel.close()
        return healthy

    # ---- responses -------------------------------------------------------------------------
    def _handle(self, resp: Any) -> str:
        """Apply one response; returns the NACK message ('' = ACK)."""
        type_url = resp.type_url
        removed = list(resp.removed_resources)
        removed += [r.name for r in resp.removed_resource_names]
        if type_url not in TYPES:
            return f"{type_url}: unsupported type"
        resources = resp.resources
        bulk = len(resources) > 1000
        if bulk:  # a full push allocates ~1M objects: cyclic GC passes would cost seconds
            gc.disable()
        try:
            held = self.state.held(type_url == ADDRESS_TYPE)
            if type_url == ADDRESS_TYPE and len(resources) > DECODE_SLICE:
                # decoded a slice at a time, each applied while its records are still cached
                # (State.apply_address_batches): ~10% of a 1M push's decode + apply
                errors: list[str] = []
                unchanged = 0

                def slices() -> Iterator[list[Any]]:
                    nonlocal unchanged
                    for i in range(0, len(resources), DECODE_SLICE):
                        recs, errs, unch = decode_batch(resources[i:i + DECODE_SLICE], type_url, held)
                        errors.extend(errs)
                        unchanged += unch
                        yield recs

                self.state.apply_address_batches(slices(), removed)
            else:
                records, errors, unchanged = decode_batch(resources, type_url, held)
                if type_url == ADDRESS_TYPE:
                    self.state.apply_addresses(records, removed)
                else:
                    self.state.apply_policies(records, removed)
                del records
        finally:
            if bulk:
                gc.enable()
                gc.freeze()  # what survived is long-lived state: keep it out of future GC passes
        with self._lock:
            self._responses += 1
            self._unchanged += unchanged
        if errors:
            log.warning("NACK %s: %s", type_url, "; ".join(errors))
        return "; ".join(errors)

    def _record(self, type_url: str, nonce: str, error: str, resources: int = 0,
                apply_ms: float = 0.0) -> None:
        with self._lock:
            if error:
                self._nacks += 1
            else:
                self._acks += 1
            self._history.append({"time": time.time(), "type_url": type_url, "nonce": nonce,
                                  "ack": not error, "error": error, "resources": resources,
                                  "apply_ms": round(apply_ms, 2)})

    def _set_error(self, message: str) -> None:
        log.warning("xds %s: %s", self.config.address, message)
        with self._lock:
            self._last_error = message


_LIBC: Any = None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def malloc_tune(threshold: int = 1024 * 1024) -> None:
    """Fix glibc's mmap threshold so big transient buffers always come from (and go back to) mmap.

    Why: by default the threshold adapts upwards to the largest block freed so far; after the
    first full push frees its ~24 MB response buffer, every later allocation below that size
    comes from the heap arenas, interleaves with long-lived state, and the freed holes stay in
    the RSS (measured: ~12 MiB at 100k workloads, whatever the data plane thread allocates).
    Process-wide; idempotent.
    """
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        _LIBC = False


def malloc_trim() -> None:
    """Return freed heap to the OS after a big push (the parsed response alone is ~40 MB at 100k)."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class ConfigError(Exception):
    """Local misconfiguration (missing CA or token file): reported and retried like any error."""


def _describe(e: BaseException) -> str:
    """One line: gRPC status name and details (e.g. 'UNAUTHENTICATED: authentication failure')."""
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    if callable(code) and callable(details):
        try:
            c = code()
            return f"{c.name if c is not None else 'UNKNOWN'}: {details()}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(e).__name__}: {e}"
