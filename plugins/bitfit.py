"""BitFit: train only the model's biases (Ben Zaken et al., 2022); with norms=True also the norms' weights (norm
tuning). Biases and norms are found by data flow: a linear's bias, a norm's weight and bias."""
from dataclasses import dataclass

from peftsurgery import hookimpl
from peftsurgery.checks import flag, selector
from peftsurgery.rewrite import BaseTensors

__version__ = "1.0"


@dataclass
class BitFitConfig:
    targets: str = "bias"         # roles of base tensors: bias, norm (selectors work as for linears)
    norms: bool = False           # also the norms' weights (adds `norm` to targets)

    def __post_init__(self):
        selector("bitfit", "targets", self.targets)
        flag("bitfit", "norms", self.norms)

    @property
    def selected(self) -> str:
        return self.targets + (",norm" if self.norms else "")


@hookimpl
def peftsurgery_config():
    return BitFitConfig


@hookimpl
def peftsurgery_describe():
    return "BitFit: biases (and norms with norms=True) trained as base + delta; mergeable"


@hookimpl
def peftsurgery_rules(config, sites):
    return [BaseTensors(config.selected)]


@hookimpl
def peftsurgery_budget(config, sites):
    return sum(s.out_features for s in sites.select(config.selected, BaseTensors.kinds))


@hookimpl
def peftsurgery_learning_rate(config):
    # chosen on the sentiment example's validation sentences, one seed, as norm tuning (SmolLM2 has no biases):
    # 82.8% at 1e-3, 81.0% at 3e-3, 66.0% at 1e-2 (README, "Real model example"); on a second task, hedge detection
    # (one seed, 200 validation sentences): 66.5% here and at 3e-4, 69.0% at 3e-3 (the two tasks' means differ by
    # 0.35 points: not moved)
    return 1e-3
