"""ServerApp: FedAvg over all nodes; write the seconds of each round to ``out-file``.

Started by the SuperLink for ``flwr run``; see benchmarks/flower_deploy.py.
"""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds; a round ends when its aggregate exists (evaluate_fn is called)."""
    cfg = context.run_config
    nodes = int(cfg["num-nodes"])
    arrays = np.array_split(np.ones(int(cfg["params"]), dtype=np.float32), int(cfg["tensors"]))
    stamps: list[float] = []

    def stamp(server_round: int, _arrays: ArrayRecord) -> None:
        # Called before round 1 and after every round: the gaps are round times.
        stamps.append(time.monotonic())

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(arrays),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=600,
        evaluate_fn=stamp,
    )
    seconds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    Path(str(cfg["out-file"])).write_text(json.dumps(seconds))
