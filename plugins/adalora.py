"""AdaLoRA: a low-rank update in SVD form, P diag(E) Q, whose ranks are allocated across the targeted linears
during training by importance (Zhang et al., 2023). Needs the training-time hooks: peftsurgery.extra_loss(model)
added to the loss and peftsurgery.step(model, step, total) after each optimizer step (peftsurgery train and
peftsurgery.integrations.SurgeryTrainer do both)."""
from dataclasses import dataclass

from peftsurgery import SurgeryError, hookimpl
from peftsurgery.checks import fraction, integer, positive, selector
from peftsurgery.rewrite import SVD

__version__ = "1.0"


@dataclass
class AdaLoraConfig:
    init_r: int = 12               # triplets per targeted linear at the start
    target_r: int = 8              # kept at the end, on average per targeted linear
    target_total: int | None = None   # kept at the end over all targeted linears (instead of target_r)
    t_init: int = 0                # warm-up steps with every triplet
    t_final: int = 0               # final steps with the ranks fixed
    delta_t: int = 1               # steps between allocations while the budget falls
    beta1: float = 0.85            # EMA of the sensitivity
    beta2: float = 0.85            # EMA of the uncertainty
    orth_reg_weight: float = 0.1   # weight of ||P^T P - I||^2 + ||Q Q^T - I||^2, summed over linears
    alpha: float = 16.0            # the update is scaled by alpha / init_r
    dropout: float = 0.0
    targets: str = "attn.q,attn.v"

    def __post_init__(self):
        integer("adalora", "init_r", self.init_r)
        integer("adalora", "target_r", self.target_r)
        if self.target_r > self.init_r:
            raise SurgeryError(f"adalora: target_r={self.target_r} is above init_r={self.init_r}; the ranks only fall")
        if self.target_total is not None:
            integer("adalora", "target_total", self.target_total)
        for name in ("t_init", "t_final"):
            integer("adalora", name, getattr(self, name), least=0)
        integer("adalora", "delta_t", self.delta_t)
        fraction("adalora", "beta1", self.beta1)
        fraction("adalora", "beta2", self.beta2)
        if self.orth_reg_weight != 0:
            positive("adalora", "orth_reg_weight", self.orth_reg_weight)
        positive("adalora", "alpha", self.alpha)
        fraction("adalora", "dropout", self.dropout)
        selector("adalora", "targets", self.targets)


@hookimpl
def peftsurgery_config():
    return AdaLoraConfig


@hookimpl
def peftsurgery_describe():
    return "AdaLoRA: SVD-form low-rank update, ranks allocated by importance while training; mergeable"


@hookimpl
def peftsurgery_rules(config, sites):
    target = config.target_total
    if target is None:
        target = config.target_r * len(sites.select(config.targets, SVD.kinds))
    return [SVD(config.targets, config.init_r, config.alpha, target, config.dropout, config.t_init, config.t_final,
                config.delta_t, config.beta1, config.beta2, config.orth_reg_weight)]


@hookimpl
def peftsurgery_budget(config, sites):
    return sum(config.init_r * (s.in_features + s.out_features + 1) for s in sites.select(config.targets, SVD.kinds))


@hookimpl
def peftsurgery_learning_rate(config):
    # chosen on the sentiment example's validation sentences, one seed: 76.8% at 1e-3, 79.2% at 3e-3, 85.2% at
    # 1e-2, 83.2% at 3e-2 (README, "Real model example"); E starts at zero and the ranks are cut while training,
    # so it wants a higher rate than lora's; on a second task, hedge detection (one seed, 200 validation
    # sentences): 63.5% here, 64.0% at 3e-2, 56.5% at 3e-3 (best on the mean of both tasks)
    return 1e-2
