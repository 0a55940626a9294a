"""Houlsby bottleneck adapters in series after attention output and feed-forward output (Houlsby et al., 2019)."""
from dataclasses import dataclass

from peftsurgery import SurgeryError, hookimpl
from peftsurgery.checks import integer, selector
from peftsurgery.rewrite import Series
from peftsurgery.rewrite.series import ACTIVATIONS

__version__ = "1.0"


@dataclass
class AdapterConfig:
    bottleneck: int = 16
    activation: str = "relu"
    targets: str = "attn.o,mlp.down"

    def __post_init__(self):
        integer("adapter", "bottleneck", self.bottleneck)
        if self.activation not in ACTIVATIONS:
            raise SurgeryError(f"adapter: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        selector("adapter", "targets", self.targets)


@hookimpl
def peftsurgery_config():
    return AdapterConfig


@hookimpl
def peftsurgery_describe():
    return "Houlsby adapter: bottleneck MLP with a residual, in series after sites"


@hookimpl
def peftsurgery_rules(config, sites):
    return [Series(config.targets, config.bottleneck, config.activation)]


@hookimpl
def peftsurgery_budget(config, sites):
    b = config.bottleneck
    return sum(2 * s.out_features * b + b + s.out_features for s in sites.select(config.targets, Series.kinds))


@hookimpl
def peftsurgery_learning_rate(config):
    # chosen on validation sentences outside the example's train and test sets, mean over 5 seeds (README,
    # "Real model example");
    # on a second task, hedge detection (one seed, 200 validation sentences): 62.0% at this rate, 66.5% at 6e-4,
    # 59.0% at 6.7e-5 (a gap within one seed's noise: not moved)
    return 2e-4
