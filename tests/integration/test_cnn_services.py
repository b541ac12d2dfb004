"""The built-in BatchNorm CNN (``--task-arg model=cnn``) as services, 4 nodes: held-out
accuracy of at least 0.97, and the saved running statistics are the nodes' averages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedgrad.history import read_history

RUN_TIMEOUT = 300.0
CNN = ("--task", "digits", "--task-arg", "model=cnn")


@pytest.mark.slow
def test_cnn_with_batchnorm_reaches_097_as_services(spawn, cli, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    aggregator = spawn(
        *cli.argv, "aggregator", *CNN, "--listen", "127.0.0.1:0", "--port-file", port_file,
        "--nodes", "4", "--rounds", "6", "--save", tmp_path / "cnn.safetensors",
        "--history", tmp_path / "history.csv", "--no-progress",
    )  # fmt: skip
    port = cli.wait_port(port_file, aggregator)
    nodes = spawn(
        *cli.argv, "node", *CNN, "--aggregator", f"127.0.0.1:{port}", "--count", "4",
        "--node-id", "site", "--threads", "1",
    )  # fmt: skip
    for name, proc in (("nodes", nodes), ("aggregator", aggregator)):
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{err[-3000:]}"
    history = read_history(tmp_path / "history.csv")
    assert history[-1].test_accuracy >= 0.97, [r.test_accuracy for r in history]
    saved = load_file(str(tmp_path / "cnn.safetensors"))
    assert "2.running_mean" in saved and "5.running_var" in saved
    assert not torch.equal(saved["2.running_mean"], torch.zeros(16)), "running_mean never moved"
    assert int(saved["2.num_batches_tracked"]) == 6 * 20  # rounds x the CNN's local steps
