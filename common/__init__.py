"""fedgrad: train one PyTorch model across machines that share nothing but a network.

The public API::

    from fedgrad import LocalCluster, Task, Update, connect, load_task

``LocalCluster`` runs an aggregator and N nodes in-process over real gRPC;
``Task`` is what you subclass to train your own model; ``connect`` turns your own
training loop into a node (``fedgrad.client.session``). The services run as
``fedgrad aggregator`` and ``fedgrad node`` (see ``fedgrad --help``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedgrad.errors import ConfigError, FedgradError, GaveUpError, TaskError
from fedgrad.history import RoundRecord
from fedgrad.task import RoundContext, Task, Update, load_task

if TYPE_CHECKING:
    from fedgrad.client.session import connect
    from fedgrad.launch.local import ClusterResult, LocalCluster

__version__ = "0.1.0"

__all__ = [
    "ClusterResult",
    "ConfigError",
    "FedgradError",
    "GaveUpError",
    "LocalCluster",
    "RoundContext",
    "RoundRecord",
    "Task",
    "TaskError",
    "Update",
    "__version__",
    "connect",
    "load_task",
]


def __getattr__(name: str) -> Any:
    # LocalCluster pulls in the server and the client; import them only when asked.
    if name in ("LocalCluster", "ClusterResult"):
        from fedgrad.launch import local

        return getattr(local, name)
    if name == "connect":
        from fedgrad.client.session import connect

        return connect
    raise AttributeError(f"module 'fedgrad' has no attribute {name!r}")
