"""A task head alone: sequence classification on the first real token, or token classification (every token
the user gave), on the model's final hidden states (peftsurgery.rewrite.Head). Stack it with another method as
its own adapter, e.g. LoRA + task-head, the baseline beside p-tuning-v2 (which has the same head built in)."""
from dataclasses import dataclass

from peftsurgery import hookimpl
from peftsurgery.checks import fraction, integer
from peftsurgery.errors import SurgeryError
from peftsurgery.rewrite import Head

__version__ = "1.0"


@dataclass
class TaskHeadConfig:
    task: str = "sequence"     # sequence: one label per row (first real token); token: one label per token
    labels: int = 2
    dropout: float = 0.1       # before the linear layer
    pool: str = "auto"         # sequence: the token read, first | last | auto (last on a causal model, else first)

    def __post_init__(self):
        if self.task not in Head.tasks:
            raise SurgeryError(f"task-head: task must be one of {', '.join(Head.tasks)}, got {self.task!r}")
        integer("task-head", "labels", self.labels, least=2)
        fraction("task-head", "dropout", self.dropout)
        if self.pool not in Head.pools:
            raise SurgeryError(f"task-head: pool must be one of {', '.join(Head.pools)}, got {self.pool!r}")


@hookimpl
def peftsurgery_config():
    return TaskHeadConfig


@hookimpl
def peftsurgery_describe():
    return "Task head: a trainable classification head (sequence|token) on the final hidden states"


@hookimpl
def peftsurgery_rules(config, sites):
    return [Head(config.task, config.labels, config.dropout, config.pool)]


@hookimpl
def peftsurgery_budget(config, sites):
    return Head.budget(sites, config.labels)


@hookimpl
def peftsurgery_learning_rate(config):
    return 1e-3
