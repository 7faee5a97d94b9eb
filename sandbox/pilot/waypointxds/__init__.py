"""Envoy xDS for waypoint proxies: what the sandbox pilot serves to ``waypoint~`` nodes.

istiod configures a waypoint Envoy over the same delta ADS stream ztunnel uses for workload xDS;
this package is that half of the sandbox pilot. One module per job:

- ``inputs``: the Kubernetes objects a waypoint's config depends on (watched through the API);
- ``build``: those objects -> listeners, clusters and endpoints (JSON form) for one proxy,
  shaped like istiod's waypoint (``main_internal``, ``inbound-vip|<port>|http/<subset>|<host>``);
- ``envoyfilter``: EnvoyFilter patches applied to that config as istiod applies them;
- ``binding``: how traffic enters the waypoint in the sandbox (Kmesh's TLV on :15019 rendered
  as the ``kmesh_tlv`` dynamic module, or PROXY protocol on the Gateway's binding port);
- ``encode``: JSON form -> serialized protos for the wire;
- ``service``: per-proxy resource stores fed by all of the above, plugged into the ADS server.
"""
