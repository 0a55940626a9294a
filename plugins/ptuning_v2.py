"""P-tuning v2 (Liu et al., 2022): deep prompts, trainable keys/values at every attention layer (no
reparameterisation by default; `projection` adds the optional MLP, folded away when saved), with the task head
the paper uses for NLU on encoders: sequence classification on the first real token, or token classification
(every token the user gave labelled; prompts never shift positions). The head is part of this adapter and of
its budget; while it is on, the model returns the head's logits (and `loss` when given `labels`), see
peftsurgery.rewrite.Head."""
from dataclasses import dataclass

from peftsurgery import hookimpl
from peftsurgery.checks import fraction, integer, selector
from peftsurgery.errors import SurgeryError
from peftsurgery.rewrite import Head, Prefix

__version__ = "1.1"   # 1.1: the prefix sits in the sequence where the model adds a position bias


@dataclass
class PTuningV2Config:
    task: str = "sequence"     # sequence: one label per row (first real token); token: one label per token
    labels: int = 2            # classes of the head
    num_tokens: int = 20       # prompt length at every layer
    projection: int = 0        # hidden size of the reparameterisation MLP; 0 trains keys/values directly
    dropout: float = 0.1       # before the head's linear layer
    pool: str = "auto"         # sequence: the token read, first | last | auto (last on a causal model, else first)
    targets: str = "attn"

    def __post_init__(self):
        if self.task not in Head.tasks:
            raise SurgeryError(f"p-tuning-v2: task must be one of {', '.join(Head.tasks)}, got {self.task!r}")
        integer("p-tuning-v2", "labels", self.labels, least=2)
        integer("p-tuning-v2", "num_tokens", self.num_tokens)
        integer("p-tuning-v2", "projection", self.projection, least=0)
        fraction("p-tuning-v2", "dropout", self.dropout)
        if self.pool not in Head.pools:
            raise SurgeryError(f"p-tuning-v2: pool must be one of {', '.join(Head.pools)}, got {self.pool!r}")
        selector("p-tuning-v2", "targets", self.targets)


@hookimpl
def peftsurgery_config():
    return PTuningV2Config


@hookimpl
def peftsurgery_describe():
    return "P-tuning v2: trainable keys/values at every attention layer plus a classification head (sequence|token)"


@hookimpl
def peftsurgery_rules(config, sites):
    return [Prefix(config.targets, config.num_tokens, config.projection),
            Head(config.task, config.labels, config.dropout, config.pool)]


@hookimpl
def peftsurgery_budget(config, sites):
    chosen = sites.select(config.targets, Prefix.kinds)
    per_token = sum(s.kv_heads * (s.head_dim + (s.v_head_dim or s.head_dim)) for s in chosen)   # keys + values
    head = Head.budget(sites, config.labels)
    if not config.projection:
        return config.num_tokens * per_token + head
    embed = next((s for s in sites if s.role == "embed"), None)
    dim = embed.out_features if embed else chosen[0].heads * chosen[0].head_dim
    h = config.projection
    return config.num_tokens * dim + dim * h + h + h * per_token + per_token + head


@hookimpl
def peftsurgery_learning_rate(config):
    return 5e-3
