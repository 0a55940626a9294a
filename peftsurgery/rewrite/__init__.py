"""The rule vocabulary. Every method is built from these; each is implemented once, here."""
from .base import Change, Hooked, Rule, Swapped, Switch
from .lowrank import LowRank
from .prefix import Prefix, record_kv
from .prompt import Prompt, text_ids
from .quantize import Quantize
from .scale import Scale
from .series import Series

__all__ = ["Rule", "Switch", "Change", "Hooked", "Swapped", "LowRank", "Series", "Prompt", "Prefix", "Quantize", "Scale", "record_kv", "text_ids"]
