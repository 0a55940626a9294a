"""scale-demo: multiply the output of chosen linears by a trainable vector that starts at ones (IA3-like,
Liu et al., 2022). Built only from peftsurgery's public API."""
from dataclasses import dataclass

from peftsurgery import SurgeryError, hookimpl
from peftsurgery.rewrite import Scale

__version__ = "0.1.0"


@dataclass
class ScaleDemoConfig:
    targets: str = "attn.k,attn.v,mlp.down"

    def __post_init__(self):
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise SurgeryError("scale-demo: targets must be a selector such as attn.k,attn.v,mlp.down")


@hookimpl
def peftsurgery_config():
    return ScaleDemoConfig


@hookimpl
def peftsurgery_describe():
    return "IA3-like demo: trainable per-feature scaling of chosen linear outputs (third-party)"


@hookimpl
def peftsurgery_rules(config, sites):
    return [Scale(config.targets)]


@hookimpl
def peftsurgery_budget(config, sites):
    return sum(s.out_features for s in sites.select(config.targets, Scale.kinds))
