"""The rule vocabulary. Every method is built from these; each is implemented once, here."""
from .base import Change, Hooked, Rule, Swapped, Switch, hooks_before, park, substitute, substituted
from .head import Head, HeadOutput
from .lowrank import LowRank
from .prefix import Prefix, record_kv
from .prompt import Prompt, check_text_init, text_ids
from .quantize import Quantize
from .reparam import BaseWeight, MagnitudeDirection, Reparam, Reparametrization
from .scale import Scale, ScaleInput
from .series import Series
from .tensors import BaseTensors
from .svd import SVD

__all__ = ["Rule", "Switch", "Change", "Hooked", "Swapped", "LowRank", "Series", "Prompt", "Prefix", "Quantize", "Reparam", "Reparametrization", "BaseWeight", "MagnitudeDirection", "Scale", "ScaleInput", "SVD", "BaseTensors", "substitute", "substituted", "hooks_before", "park", "record_kv", "check_text_init", "text_ids", "Head", "HeadOutput"]
