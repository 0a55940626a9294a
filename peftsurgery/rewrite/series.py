"""Rule: a bottleneck adapter in series after a site, y = h + up(act(down(h))), up starting at zero."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Hooked, Rule, Switch

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class _After:
    def __init__(self, adapter: Bottleneck, switch: Switch):
        self.adapter, self.switch = adapter, switch

    def __call__(self, module, args, out):
        if not self.switch.on:
            return None
        if not isinstance(out, torch.Tensor):
            raise SurgeryError(f"{type(module).__name__} returns {type(out).__name__}; an adapter needs a tensor output")
        return self.adapter(out)


class Series(Rule):
    kinds = ("linear",)

    def __init__(self, targets: str, bottleneck: int, activation: str = "relu"):
        super().__init__(targets)
        self.bottleneck, self.activation = bottleneck, activation

    def build(self, model, sites, sitemap):
        out = {}
        for s in sites:
            w = model.get_submodule(s.path).weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            out[s.path] = Bottleneck(s.out_features, self.bottleneck, self.activation, device=w.device, dtype=dtype)
        return out

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            yield Hooked(model, s.path, _After(built[s.path], switch))

    def describe(self, site, built):
        return f"bottleneck adapter {site.out_features}->{self.bottleneck}->{site.out_features} in series"
