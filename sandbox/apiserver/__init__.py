"""An in-memory Kubernetes-compatible API server for the one-machine sandbox.

``ApiServer(port=0).start()`` in-process, or ``python -m sandbox.apiserver`` as a process.
"""

from .objects import LOG_PATH_ANNOTATION
from .server import ApiServer

__all__ = ["ApiServer", "LOG_PATH_ANNOTATION"]
