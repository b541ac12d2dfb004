"""A plain PyTorch training script, federated with a few lines (marked ``# fedgrad``).

It trains a small classifier on its shard of scikit-learn's handwritten digits with its
own DataLoader, loss and optimizer. The marked lines turn it into a fedgrad node: the
aggregator holds the model (``--model examples.own_loop:make_model``, no Task needed),
each round the node takes ``--local-steps`` of its own SGD steps and the pseudo-gradient
goes up (FedAvg), and the optimizer's state stays on the node across rounds. From the
repository root::

    fedgrad aggregator --model examples.own_loop:make_model --lr 1.0 --nodes 2 \\
        --rounds 20 --listen localhost:50051
    python examples/own_loop.py --aggregator localhost:50051 --node-id site-0 --shard 0/2
    python examples/own_loop.py --aggregator localhost:50051 --node-id site-1 --shard 1/2

Without the marked lines (and with ``for epoch in range(args.epochs)`` for the
``while``), it is the same script training alone.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fedgrad  # fedgrad


def make_model() -> nn.Module:
    """The model, on the nodes and (by ``--model``) on the aggregator."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_shard(index: int, count: int) -> TensorDataset:
    """This site's training data: every ``count``-th digit from ``index`` (the first 1,500)."""
    digits = load_digits()
    x = torch.tensor(digits.data[:1500] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:1500], dtype=torch.long)
    return TensorDataset(x[index::count], y[index::count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregator", default="localhost:50051")
    parser.add_argument("--node-id", default="site-0")
    parser.add_argument("--shard", default="0/1", help="I/N: this site's part of the data")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=10)
    args = parser.parse_args()
    index, count = (int(v) for v in args.shard.split("/"))

    torch.manual_seed(index)
    data = load_shard(index, count)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    node = fedgrad.connect(args.aggregator, args.node_id, num_samples=len(data))  # fedgrad
    opt = node.distributed_optimizer(model, local=opt, local_steps=args.local_steps)  # fedgrad

    while not node.finished:  # fedgrad: was `for epoch in range(args.epochs):`
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if node.finished:  # fedgrad
                break  # fedgrad
    node.close()  # fedgrad
    print(
        f"{args.node_id}: done after round {node.current_round}, last batch loss {float(loss):.3f}"
    )


if __name__ == "__main__":
    main()
