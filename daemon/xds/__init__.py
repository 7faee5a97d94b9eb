"""Istio workload xDS for the kmesh daemon.

- ``daemon.xds.client``: ``XdsConfig``, ``XdsClient`` (delta ADS over one stream, Address then
  Authorization, ACK/NACK, reconnect with backoff, ``status()``).
- ``daemon.xds.resources``: decode + validate resources into ``daemon.state`` records.
- ``daemon.xds.dump``: the ``istioctl ztunnel-config -o json`` shapes (``State.config_dump``).
- ``daemon.xds.genprotos``: regenerate ``daemon/xds/gen`` from ``daemon/xds/proto`` (``make protos``).

Nothing here imports grpc at import time; the client imports it when a stream starts.
"""
