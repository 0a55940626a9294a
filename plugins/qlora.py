"""QLoRA: LoRA over a base quantized to 4-bit NormalFloat with double quantization (Dettmers et al., 2023)."""
from dataclasses import dataclass

from peftsurgery import SurgeryError, hookimpl
from peftsurgery.rewrite import LowRank, Quantize

__version__ = "1.0"


@dataclass
class QLoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    quantize: str = "all-linear"     # which linears get a 4-bit base
    double_quant: bool = True

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise SurgeryError(f"qlora: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise SurgeryError(f"qlora: dropout must be in [0, 1), got {self.dropout!r}")


@hookimpl
def peftsurgery_config():
    return QLoraConfig


@hookimpl
def peftsurgery_describe():
    return "QLoRA: LoRA on a base quantized to NF4 (bitsandbytes)"


@hookimpl
def peftsurgery_rules(config, sites):
    return [Quantize(config.quantize, config.double_quant),
            LowRank(config.targets, config.r, config.alpha, config.dropout)]


@hookimpl
def peftsurgery_budget(config, sites):
    return sum(config.r * (s.in_features + s.out_features) for s in sites.select(config.targets, LowRank.kinds))


@hookimpl
def peftsurgery_learning_rate(config):
    # chosen on validation sentences outside the example's train and test sets, mean over 5 seeds (README,
    # "Real model example")
    return 1e-4
