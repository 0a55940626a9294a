"""Rule: quantize the base weights of linears to 4-bit NormalFloat (NF4) through bitsandbytes.

The float weights are dropped (that is the memory saving); removing the rule puts back float linears holding
the dequantized weights."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule, Undo


class Quantize(Rule):
    kinds = ("linear",)
    phase = 0

    def __init__(self, targets: str, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32):
        super().__init__(targets)
        self.double_quant, self.compute_dtype = double_quant, compute_dtype

    def select(self, sitemap):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SurgeryError("quantization needs bitsandbytes: pip install bitsandbytes") from None
        return [s for s in super().select(sitemap)]

    def attach(self, model, sites, built, switch, sitemap):
        import bitsandbytes as bnb
        undo = []
        for s in sites:
            parent_path, _, name = s.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            old = getattr(parent, name)
            if type(old) is not nn.Linear:
                if isinstance(old, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                    continue  # already quantized
                raise SurgeryError(f"{s.path} is a {type(old).__name__}; only nn.Linear can be quantized")
            if old.weight.device.type == "meta":
                raise SurgeryError(f"{s.path} is on the meta device; load real weights before quantizing")
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=self.compute_dtype, compress_statistics=self.double_quant,
                                    quant_type="nf4", device=old.weight.device)
            new.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=self.double_quant)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
            new = new.to(old.weight.device)  # quantizes
            new._forward_hooks.update(old._forward_hooks)
            setattr(parent, name, new)  # the float weights are not kept: saving their memory is the point
            undo.append(Undo(lambda p=parent, n=name: setattr(p, n, _dequantized(getattr(p, n)))))
        return undo

    def route(self, model, entries, rows, cache):
        return []  # the quantized base is shared by every row

    def describe(self, site, built):
        return f"base weights quantized to nf4{' (double quant)' if self.double_quant else ''}"


def _dequantized(q: nn.Module) -> nn.Linear:
    """A float nn.Linear computing what the 4-bit layer computes (quantization is lossy: the original
    weights are gone)."""
    import bitsandbytes as bnb
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(q.compute_dtype or torch.float32)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    lin.requires_grad_(False)
    lin._forward_hooks.update(q._forward_hooks)
    return lin
