"""The built-in tasks: ``digits`` (FedAvg), ``linear`` (FedSGD), ``synthetic`` (benchmarks).

Select one by name (``fedgrad.task.load_task("digits")``, ``--task digits``);
see each class for its ``--task-arg`` options.
"""

from fedgrad.tasks.digits import DigitsTask
from fedgrad.tasks.linear import LinearTask
from fedgrad.tasks.synthetic import SyntheticTask

__all__ = ["DigitsTask", "LinearTask", "SyntheticTask"]
