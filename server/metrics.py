"""Prometheus metrics of the aggregator, read from its state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from fedgrad.history import RoundRecord
from fedgrad.server.aggregator import Aggregator
from fedgrad.server.engine import EngineView, NodeState

__all__ = ["AggregatorCollector", "serve_metrics"]

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


class AggregatorCollector(Collector):
    """Expose rounds, phases, bytes, uploads, nodes, staging memory and loss."""

    def __init__(self, core: Aggregator) -> None:
        self.core = core
        self._durations: list[float] = []
        self._phases: dict[str, float] = {}
        core.on_round.append(self._record)

    def _record(self, record: RoundRecord) -> None:
        self._durations.append(record.seconds)
        for phase, seconds in self.core.counters.phase_seconds.items():
            self._phases[phase] = self._phases.get(phase, 0.0) + seconds

    def collect(self) -> Iterator[Any]:
        # Runs on the HTTP thread while the event loop mutates the core: read only
        # atomic copies (list()/dict() of a dict run in C under the GIL).
        core = self.core
        view = core.engine.view()
        counters = core.counters
        rejections = dict(counters.rejections)
        history = list(core.history)
        yield CounterMetricFamily(
            "fedgrad_rounds_completed", "Rounds closed and applied.", value=len(history)
        )
        yield GaugeMetricFamily("fedgrad_round", "The open round (0-based).", value=view.round)
        yield self._histogram()
        phases = CounterMetricFamily(
            "fedgrad_round_phase_seconds",
            "Time spent per round phase: collect, reduce, step, checkpoint, broadcast.",
            labels=["phase"],
        )
        for phase, seconds in sorted(self._phases.items()):
            phases.add_metric([phase], seconds)
        yield phases
        yield CounterMetricFamily(
            "fedgrad_bytes_received",
            "Gradient payload bytes counted.",
            value=counters.bytes_received,
        )
        yield CounterMetricFamily(
            "fedgrad_bytes_spilled",
            "Payload bytes of counted uploads a shard staged in files (--spill-dir).",
            value=counters.bytes_spilled,
        )
        yield CounterMetricFamily(
            "fedgrad_bytes_sent", "Parameter bytes streamed to nodes.", value=counters.bytes_sent
        )
        yield CounterMetricFamily(
            "fedgrad_uploads_accepted",
            "Uploads counted in a round.",
            value=counters.uploads_accepted,
        )
        rejected = CounterMetricFamily(
            "fedgrad_rejections", "Calls refused, by gRPC status code.", labels=["reason"]
        )
        for reason, count in sorted(rejections.items()):
            rejected.add_metric([reason], count)
        yield rejected
        states = GaugeMetricFamily("fedgrad_nodes", "Nodes known, by state.", labels=["state"])
        for state in NodeState:
            states.add_metric([state.value], sum(1 for r in view.nodes if r.state is state))
        yield states
        selected = view.selected
        yield GaugeMetricFamily(
            "fedgrad_selected_nodes",
            "Nodes the open round takes uploads from (sampled rounds; otherwise the active).",
            value=len(selected) if selected is not None else states_active(view),
        )
        yield GaugeMetricFamily(
            "fedgrad_reported_nodes",
            "Uploads counted in the open round (async: in the open version's buffer).",
            value=len(view.reported),
        )
        last_stale = history[-1].staleness_max if history else 0
        yield GaugeMetricFamily(
            "fedgrad_last_staleness_max",
            "Async mode: largest staleness of the uploads the last version applied.",
            value=last_stale,
        )
        norms = GaugeMetricFamily(
            "fedgrad_upload_norm",
            "L2 norm of each node's last applied upload (before clipping).",
            labels=["node"],
        )
        stats = GaugeMetricFamily(
            "fedgrad_robust_stat",
            "The robust rule's statistic of each node's last upload (selected, krum_score,"
            " trimmed_fraction, weight).",
            labels=["node", "stat"],
        )
        for node, values in sorted(dict(core.node_stats).items()):
            for stat, value in sorted(dict(values).items()):
                if stat == "norm":
                    norms.add_metric([node], value)
                else:
                    stats.add_metric([node, stat], value)
        yield norms
        yield stats
        yield GaugeMetricFamily(
            "fedgrad_staging_bytes",
            "Bytes of uploads staged in flight.",
            value=core.intake.staging_bytes,
        )
        epsilon = history[-1].epsilon if history else float("nan")
        yield GaugeMetricFamily(
            "fedgrad_dp_epsilon",
            "Differential privacy: epsilon spent so far at --dp-delta (NaN without DP).",
            value=epsilon,
        )
        last = history[-1].train_loss if history else float("nan")
        yield GaugeMetricFamily("fedgrad_last_loss", "Train loss of the last round.", value=last)
        evaluated = [r for r in history if r.federated_samples]
        yield GaugeMetricFamily(
            "fedgrad_federated_accuracy",
            "The nodes' held-out accuracy of the last --evaluate-every round (NaN before).",
            value=evaluated[-1].federated_accuracy if evaluated else float("nan"),
        )

    def _histogram(self) -> HistogramMetricFamily:
        buckets = [
            (str(b) if b != float("inf") else "+Inf", sum(1 for d in self._durations if d <= b))
            for b in _BUCKETS
        ]
        return HistogramMetricFamily(
            "fedgrad_round_duration_seconds",
            "Wall time of each round.",
            buckets=buckets,
            sum_value=sum(self._durations),
        )


def states_active(view: EngineView) -> int:
    """Return the number of active nodes in ``view``."""
    return sum(1 for r in view.nodes if r.state is NodeState.ACTIVE)


def serve_metrics(core: Aggregator, host: str, port: int) -> tuple[Any, int]:
    """Serve /metrics over HTTP on (host, port); return (server, bound port)."""
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(core))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
