"""Reproducible measurements behind `make bench` (``python -m benchmarks``).

Modules, one job each:

- ``dataplane_http``: wrk against a real HTTP backend through three client paths (direct to the
  pod IP, the service VIP translated by our connect programs, an Envoy TCP proxy hop), in a
  network-namespace topology of its own.
- ``dataplane_maps``: reconciler figures (owned by the data-plane area).
- ``controlplane``: xDS convergence, single update, daemon RSS (owned by the xDS area).
- ``cli``: ``kmeshctl --help`` and ``kmeshctl dump workloads`` at 10,000 workloads.
- ``report``: the table on stdout, ``results/latest.json`` and ``results/latest.md``.
"""
