"""Rule: quantize the base weights of linears (NF4 / int8 through bitsandbytes)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule, Undo


class Quantize(Rule):
    kinds = ("linear",)
    phase = 0

    def __init__(self, targets: str, scheme: str = "nf4", double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(targets)
        self.scheme, self.double_quant, self.compute_dtype = scheme, double_quant, compute_dtype

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
            if self.scheme == "nf4":
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                        compute_dtype=self.compute_dtype, compress_statistics=self.double_quant,
                                        quant_type="nf4", device=old.weight.device)
                new.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=self.double_quant)
            else:
                new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                          has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(old.weight.data.clone(), requires_grad=False,
                                               has_fp16_weights=False)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
            new = new.to(old.weight.device)  # quantizes
            new._forward_hooks.update(old._forward_hooks)
            setattr(parent, name, new)
            undo.append(Undo(lambda p=parent, n=name, o=old: setattr(p, n, o)))
        return undo

    def describe(self, site, built):
        return f"base weights quantized to {self.scheme}{' (double quant)' if self.double_quant else ''}"
