"""``--tensorboard DIR`` through a real federation: every round's metrics land in DIR."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedgrad import LocalCluster


def test_local_cluster_writes_every_round_for_tensorboard(tmp_path: Path) -> None:
    with LocalCluster("linear", nodes=2, tensorboard=str(tmp_path / "tb")) as cluster:
        result = cluster.run(rounds=3)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "test/loss", "round/bytes", "round/seconds"} <= tags
    loss = events.Scalars("test/loss")
    assert [e.step for e in loss] == [r.round for r in result.history] == [0, 1, 2]
    for event, record in zip(loss, result.history, strict=True):
        assert abs(event.value - record.test_loss) <= 1e-6 * max(1.0, abs(record.test_loss))
