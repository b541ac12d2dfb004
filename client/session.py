"""Your own training loop as a fedgrad node: ``fedgrad.connect`` and its optimizer.

A plain torch loop (``loss.backward(); opt.step()``) becomes a node with a few lines::

    node = fedgrad.connect("agg:50051", node_id="n1", num_samples=len(dataset))
    opt = node.distributed_optimizer(model, local=torch.optim.SGD(model.parameters(), lr=0.1))
    while not node.finished:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()          # FedSGD: push this gradient, load the next parameters
            if node.finished:
                break

With ``local_steps=K`` the wrapped optimizer takes K of your steps, then the
pseudo-gradient ``theta_start - theta_now`` goes up (FedAvg); ``with node.round(model)``
pushes whatever your own code did inside the block. The local optimizer (and its state,
e.g. momentum) is yours and persists across rounds; the aggregator applies its own
optimizer to the reduced update. Everything the service node does is here too: the
codecs, error feedback, buffers, TLS, retries and reconnects (``fedgrad.client.node``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedgrad.client.node import Node
from fedgrad.client.transport import Action, Failure
from fedgrad.config import NodeConfig
from fedgrad.errors import FedgradError, RefusedError
from fedgrad.task import RoundContext, Task, device_of, trainable_parameters

__all__ = ["Connection", "DistributedOptimizer", "connect"]

log = logging.getLogger("fedgrad.node")


class _OwnLoop(Task):
    """The task behind a connection: the user's model and sample count, no data."""

    def __init__(self, model: nn.Module, num_samples: int) -> None:
        super().__init__()
        self._model, self._samples = model, num_samples

    def model(self) -> nn.Module:
        return self._model

    def shard(self, index: int, count: int) -> None:
        return None

    def num_samples(self, data: Any) -> int:
        return self._samples

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise FedgradError("an own-loop node computes its updates itself")


class Connection:
    """A node whose updates come from your own code. Build it with ``fedgrad.connect``.

    Attributes:
        current_round: the round whose parameters the model holds (the next push's round).
        context: that round's ``RoundContext`` (round, total rounds, the aggregator's config).
        finished: the model holds the final parameters; training is over.
    """

    def __init__(
        self, cfg: NodeConfig, num_samples: int, seeded: bool = False, placed: bool = False
    ) -> None:
        self.cfg, self.num_samples, self.seeded, self.placed = cfg, num_samples, seeded, placed
        self.node: Node | None = None
        self.current_round = 0
        self.context: RoundContext | None = None
        self.finished = False

    # -- set-up ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Join with ``model`` and load the aggregator's current parameters into it.

        Raises:
            FedgradError: the model is already attached, or another model is.
            RefusedError, TaskError, GaveUpError: as ``fedgrad node``.
        """
        if self.node is not None:
            if self.node.model is not model:
                raise FedgradError("this connection already trains another model")
            return
        # Node seeds torch for a task's model; this model is the user's: keep their RNG.
        rng = torch.random.get_rng_state()
        if not self.placed:  # the model stays where the user put it
            self.cfg = replace(self.cfg, device=str(device_of(model)))
        try:
            self.node = Node(_OwnLoop(model, self.num_samples), self.cfg)
        finally:
            torch.random.set_rng_state(rng)
        if not self.seeded:  # an own loop's randomness is its own: no seed to agree on
            self.node.join_request.ClearField("seed")
        try:
            self.current_round = self.node.join().round
        except Failure as failure:
            raise RefusedError(
                f"the aggregator refused node {self.cfg.node_id!r}: {failure}"
            ) from None
        self._pull(self.current_round)

    def distributed_optimizer(
        self,
        model: nn.Module,
        local: torch.optim.Optimizer | None = None,
        local_steps: int = 0,
    ) -> DistributedOptimizer:
        """Return an optimizer whose ``step()`` trains ``model`` in the federation.

        Args:
            model: your model; its parameters now hold the aggregator's.
            local: your optimizer over ``model``'s parameters (needed with local steps;
                with FedSGD it only zeroes gradients: the aggregator steps).
            local_steps: 0 for FedSGD (every step's gradient is one round's update), K > 0
                for K local steps per round, then the pseudo-gradient.
        """
        if local_steps < 0 or (local_steps > 0 and local is None):
            raise FedgradError("local_steps must be >= 0, and local steps need local=OPTIMIZER")
        self.attach(model)
        return DistributedOptimizer(self, model, local, local_steps)

    @contextmanager
    def round(self, model: nn.Module, num_samples: int | None = None) -> Iterator[RoundContext]:
        """Run any number of your own steps; at the end push ``theta_start - theta_end``.

        Yields the round's context. If the block raises, nothing is pushed and the model
        keeps this round's parameters.
        """
        self.attach(model)
        if self.finished:
            raise FedgradError("training is finished: the model holds the final parameters")
        params = _params(model)
        start = [p.detach().clone() for p in params]
        assert self.context is not None
        yield self.context
        with torch.no_grad():
            update = [s - p.detach() for s, p in zip(start, params, strict=True)]
        self.push(update, num_samples)

    # -- rounds ---------------------------------------------------------------------------
    def push(
        self,
        update: list[torch.Tensor],
        num_samples: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Upload ``update`` for the open round, then load the next round's parameters.

        A round that closed before the upload counted (a slow node) drops it, as for any
        node; the model then holds the current round's parameters.

        Raises:
            FedgradError: training is finished.
        """
        node = self.node
        if node is None:
            raise FedgradError("attach a model first (distributed_optimizer or round)")
        if self.finished:
            raise FedgradError(
                f"training is finished (round {self.current_round}): stop when node.finished is true"
            )
        samples = self.num_samples if num_samples is None else num_samples
        while True:
            try:
                node.push(
                    self.current_round, [u.detach() for u in update], samples, dict(metrics or {})
                )
                node.uploads += 1
                following = self.current_round + 1
                break
            except Failure as failure:
                following = node._recover(failure, self.current_round)
                if (
                    failure.action in (Action.REJOIN, Action.BACK_OFF)
                    and following == self.current_round
                ):
                    continue  # the aggregator restarted or was away: send it again
                log.info(
                    "the update of round %d did not count; continuing at round %d",
                    self.current_round,
                    following,
                    extra={"node": self.cfg.node_id, "round": self.current_round, "event": "stale"},
                )
                break
        self._pull(following)

    def _pull(self, min_round: int) -> None:
        node = self.node
        assert node is not None
        while True:
            try:
                header = node.pull(min_round)
                break
            except Failure as failure:
                min_round = node._recover(failure, min_round)
        if header.session_id != node.session_id:  # a new federation: start over in it
            self.current_round = node.join().round
            self._pull(self.current_round)
            return
        self.current_round = header.round
        self.finished = header.finished
        self.context = RoundContext(header.round, header.total_rounds, dict(header.config))
        node.task.context = self.context

    def close(self) -> None:
        """Leave the federation (unless training finished) and close the channel."""
        if self.node is not None:
            if not self.finished:
                self.node.leave()
            self.node.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DistributedOptimizer:
    """Your optimizer in the federation: ``step()`` after your own ``backward()``."""

    def __init__(
        self,
        connection: Connection,
        model: nn.Module,
        local: torch.optim.Optimizer | None,
        local_steps: int,
    ) -> None:
        self.connection, self.model, self.local, self.local_steps = (
            connection,
            model,
            local,
            local_steps,
        )
        self.params = _params(model)
        self.taken = 0
        self.start = [p.detach().clone() for p in self.params]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.local.param_groups if self.local is not None else []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the model's parameters."""
        if self.local is not None:
            self.local.zero_grad(set_to_none=set_to_none)
        else:
            for p in self.params:
                p.grad = None

    def step(self) -> None:
        """FedSGD: push the gradients as this round's update and load the next parameters.
        Local steps: step the local optimizer; every ``local_steps`` steps, push the
        pseudo-gradient and load the next parameters.

        Raises:
            FedgradError: training is finished (``connection.finished``).
        """
        if self.local_steps == 0:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            self.connection.push(grads)
            return
        if self.connection.finished:
            raise FedgradError("training is finished: stop when node.finished is true")
        assert self.local is not None
        self.local.step()
        self.taken += 1
        if self.taken < self.local_steps:
            return
        with torch.no_grad():
            update = [s - p.detach() for s, p in zip(self.start, self.params, strict=True)]
        self.connection.push(update)
        self.taken = 0
        self.start = [p.detach().clone() for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        return self.local.state_dict() if self.local is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.local is not None:
            self.local.load_state_dict(state)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in trainable_parameters(model)]


def connect(
    aggregator: str,
    node_id: str,
    *,
    num_samples: int,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    token: str | None = None,
    **options: Any,
) -> Connection:
    """Connect your own training loop to ``fedgrad aggregator`` at ``aggregator``.

    Args:
        aggregator: ``HOST:PORT``.
        node_id: this node's stable id (1-128 chars of ``[A-Za-z0-9._-]``).
        num_samples: the samples behind each update (its weight in the weighted mean).
        tls_ca, tls_cert, tls_key: TLS (CA) and mutual TLS (certificate and key) files.
        token: a bearer token, if the aggregator has ``--tokens``.
        **options: any other ``NodeConfig`` setting (``compress="int8"``, ``seed=``,
            ``give_up_after=``, ...; see ``fedgrad node --help``).

    Returns:
        The connection; it joins when a model is attached (``distributed_optimizer``).

    Raises:
        ConfigError: a setting ``fedgrad node`` would refuse.
    """
    cfg = NodeConfig(
        aggregator=aggregator,
        node_id=node_id,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        token=token,
        task="",
        **options,
    )
    return Connection(cfg, num_samples, seeded="seed" in options, placed="device" in options)
