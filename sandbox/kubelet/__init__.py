"""The sandbox's one node: ``python -m sandbox.kubelet --kubeconfig PATH --state-dir DIR --cgroup-root DIR
--prefix P [--bpffs DIR] [--node-name N] [--pod-cidr CIDR]``.

Modules, one job each:

- ``runtime``: pod network namespaces on a private bridge, pod cgroups, container processes
  (``Runtime``, ``PodNetwork``, ``cleanup_node``) -- usable without an API server.
- ``launch``: the single-threaded helper that joins a container's cgroup and namespaces, builds its
  private mount tree and execs it; also ``enter`` for ``kmeshctl sandbox exec``.
- ``podspec``: env, volumes, mounts and probes from a Pod spec (pure rules).
- ``controllers``: Deployment -> ReplicaSet -> Pods, DaemonSet -> one Pod, owner garbage collection.
- ``node``: the kubelet loop (``Kubelet``): pods bound to this node, restarts, status, events,
  hosts files, the Node object.
- ``api``: JSON REST over the kubeconfig's connection settings.

What the API server sees: a Node named after the host (InternalIP 127.0.0.1), Pods with podIP from
the pod CIDR (10.244.0.0/24; hostNetwork pods 127.0.0.1), containerStatuses with restartCount and
state, Ready from the process (plus tcpSocket/httpGet readiness probes, run inside the pod's netns),
events (Scheduled, Started, Killing, BackOff, Failed, FailedMount) and the annotation
``sandbox.kmesh.io/log-path.<container>`` from which the API server serves ``kubectl logs``.
There is no kube-proxy: a ClusterIP answers only when the Kmesh data plane translates the connect()
of an enrolled pod (pods get a default route to the bridge, whose netns drops what it cannot
deliver). Names resolve from each pod's /etc/hosts (Services as <svc>, <svc>.<ns>, ...svc,
...svc.cluster.local; for hostNetwork pods the sandbox's istiod-* Services are 127.0.0.1).
Per pod on disk: ``<state dir>/pods/<uid>/pod.json`` (netns, cgroup, container pids) for exec.
"""
