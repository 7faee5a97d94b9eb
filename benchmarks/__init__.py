"""Reproducible measurements behind `make bench` (``python -m benchmarks``).

Modules, one job each:

- ``dataplane_http``: a real HTTP backend through three client paths (direct to the pod IP, the
  service VIP translated by our connect programs, an Envoy TCP proxy hop): a new connection per
  request timed with connect() inside the clock (``connload``), the same with wrk (request only),
  keep-alive (wrk); paired rounds with the monitoring switch on and off.
- ``connload``: the C new-connection client (``connload.c``, built into ``.build/connload``).
- ``netns``: the throw-away namespace topology and cgroups (also used by ``dataplane_maps``),
  owner records and ``reap_stale()`` for runs that were killed.
- ``nginx_proc`` / ``envoy_proc``: the backend (nginx preferred, Envoy direct_response as the
  fallback) and the sidecar-like Envoy tcp_proxy.
- ``wrk``: running wrk and reading its exact percentiles.
- ``dataplane_maps``: reconciler figures (owned by the data-plane area).
- ``controlplane``: xDS convergence, single update, daemon RSS (owned by the xDS area).
- ``cli``: ``kmeshctl --help`` and ``kmeshctl dump workloads`` at 10,000 workloads.
- ``report``: the table on stdout, ``results/latest.json`` and ``results/latest.md``.
"""
