"""The sandbox's istiod stand-in: workload xDS (delta ADS) built from the sandbox API server.

- ``python -m sandbox.pilot``: the process (see ``__main__``).
- ``server``: ``ResourceStore`` + ``DeltaAdsServer`` + ``serve()`` (istiod's delta semantics;
  reusable with synthetic resources by tests and benchmarks).
- ``translate``: Pods/Services -> Workload/Service resources; ``authz``: AuthorizationPolicy ->
  Authorization resources (and which workloads name them); ``controller``: the watches;
  ``auth``: TokenReview + cluster id + node identity; ``ca``: the root and serving certificate.
"""
