"""Rule: scale a linear's output by a trainable per-feature vector, y = base(x) * v, v starting at ones (IA3)."""
from __future__ import annotations

import torch
from torch import nn

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from .base import Rule, Switch, hook_output, park


class ScaleVector(nn.Module):
    """One trainable factor per output feature."""

    def __init__(self, features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features, device=device, dtype=dtype))
        self.merged = False
        self.parked: dict = {}   # while merged: the hooks taken off the linear (see base.park)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out * self.weight.to(out.dtype)


class _Scaled:
    """Forward hook multiplying a linear's output by the vector (a class, so deepcopy carries it along)."""

    def __init__(self, vector: ScaleVector, switch: Switch):
        self.owner, self.switch = vector, switch

    def __call__(self, module, args, out):
        if not self.switch.on or self.owner.merged:
            return out
        return self.owner(out)


class Scale(Rule):
    kinds = ("linear",)
    mergeable = True

    def build(self, model, sites, sitemap):
        out = {}
        for s in sites:
            w = _linear(model, s.path).weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            out[s.path] = ScaleVector(s.out_features, device=w.device, dtype=dtype)
        return out

    def attach(self, model, sites, built, switch, sitemap):
        return [hook_output(_linear(model, s.path), _Scaled(built[s.path], switch)) for s in sites]

    def merge(self, model, sites, built, sign):
        """Fold the vector into the weight rows (and bias); sign -1 divides it back out."""
        for s in sites:
            v = built[s.path]
            if (sign > 0) == v.merged:
                continue
            m = _linear(model, s.path)
            if not m.weight.dtype.is_floating_point:
                raise SurgeryError(f"{s.path} has a quantized base ({m.weight.dtype}); merge onto a float copy")
            f = v.weight.detach().to(m.weight.dtype)
            f = f if sign > 0 else 1.0 / f
            with torch.no_grad():
                m.weight.mul_(f[None, :] if bool(Conv1D) and isinstance(m, Conv1D) else f[:, None])
                if m.bias is not None:
                    m.bias.mul_(f)
            v.merged = sign > 0
            park(m, v)

    def describe(self, site, built):
        return f"scale output by a trainable vector ({site.out_features}): out * v"


def _linear(model: nn.Module, path: str) -> nn.Module:
    m = model.get_submodule(path)
    if not is_linear_module(m):
        raise SurgeryError(f"{path} is a {type(m).__name__}, not a linear layer; Scale needs one")
    return m
