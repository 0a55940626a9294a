"""Rule: scale a linear's output by a trainable per-feature vector, y = base(x) * v, v starting at ones (IA3)."""
from __future__ import annotations

import torch
from torch import nn

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from .base import Hooked, Rule, Switch, hooks_before, park


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
            return None
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

    def check(self, model, sites):
        for s in sites:
            _linear(model, s.path)

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            yield Hooked(model, s.path, _Scaled(built[s.path], switch))

    def check_merge(self, model, sites, built):
        for s in sites:
            w = _linear(model, s.path).weight
            if not w.dtype.is_floating_point:
                raise SurgeryError(f"{s.path} has a quantized base ({w.dtype}); merge onto a float copy")
            ahead = hooks_before(_linear(model, s.path), built[s.path])
            if ahead:
                raise SurgeryError(f"at {s.path} a {type(ahead[0]).__name__} hook of an adapter attached earlier acts "
                                   "on the output first, so merging the scale would change what the model computes; "
                                   "merge or remove that adapter first")
            if not built[s.path].merged and bool((built[s.path].weight == 0).any()):
                raise SurgeryError(f"the scale vector at {s.path} has a zero entry, so unmerging could not "
                                   "divide it back out; keep the adapter unmerged")

    def merge(self, model, sites, built, sign):
        """Fold the vector into the weight rows (and bias); sign -1 divides it back out."""
        for s in sites:
            v = built[s.path]
            if (sign > 0) == v.merged:
                continue
            m = _linear(model, s.path)
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
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise SurgeryError(f"{path} is not in this model; locate it again") from None
    if not is_linear_module(m):
        raise SurgeryError(f"{path} is a {type(m).__name__}, not a linear layer; Scale needs one")
    return m
