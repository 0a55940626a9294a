"""IA3: learned vectors rescaling the keys, the values and the feed-forward's inner activations (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"). The key and value
projections' outputs are scaled, and so is the input of the feed-forward down-projection; every vector starts at
ones, so the model starts as the base. Mergeable.

On a fused projection (GPT-2's c_attn) `attn.k,attn.v` scale the key and value slices only, as the paper does;
`targets=attn.qkv` scales the whole projection, queries included, as PEFT's IA3 does for GPT-2."""
from dataclasses import dataclass

from peftsurgery import SurgeryError, hookimpl
from peftsurgery.checks import selector
from peftsurgery.rewrite import Scale, ScaleInput

__version__ = "1.0"


@dataclass
class IA3Config:
    targets: str = "attn.k,attn.v"     # linears (or slices of fused projections) whose outputs are scaled; "" none
    feedforward: str = "mlp.down"      # linears whose inputs are scaled; "" none

    def __post_init__(self):
        if self.targets == "" and self.feedforward == "":
            raise SurgeryError("ia3: targets and feedforward are both empty; give linears to scale in one of them")
        for name in ("targets", "feedforward"):
            if getattr(self, name) != "":
                selector("ia3", name, getattr(self, name))


@hookimpl
def peftsurgery_config():
    return IA3Config


@hookimpl
def peftsurgery_describe():
    return "IA3: trainable vectors scaling key/value outputs and feed-forward inputs, starting at ones; mergeable"


@hookimpl
def peftsurgery_rules(config, sites):
    return [rule(sel) for rule, sel in ((Scale, config.targets), (ScaleInput, config.feedforward)) if sel]


@hookimpl
def peftsurgery_budget(config, sites):
    return sum(rule.features(s) for rule, sel in ((Scale, config.targets), (ScaleInput, config.feedforward))
               if sel for s in sites.select(sel, rule.kinds))


@hookimpl
def peftsurgery_learning_rate(config):
    # the best rate on both tasks it was chosen on (seed 0 each): the sentiment example's 500 validation sentences
    # 83.8% here, 82.8% at 3e-3 (the paper's, T-Few) and at 1e-3; hedge detection's 200: 67.5% here, 64.5% at 3e-3,
    # 60.5% at 1e-3 (README, "Real model example")
    return 1e-2
