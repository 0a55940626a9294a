"""Rule: train chosen base tensors (biases, norm weights) without writing them: each reads base + a trainable
delta (starting at zero) while the module using it runs, so the base tensor is kept as it was for disabled(),
remove() and failed loads, and only the deltas are saved. Training the delta is training the tensor: the same
gradients and, from the same start, the same values (base + delta)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule, substitute


class TensorDelta(nn.Module):
    """A trainable delta shaped like one base tensor."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        dtype = like.dtype if like.dtype.is_floating_point else torch.float32
        self.weight = nn.Parameter(torch.zeros(like.shape, dtype=dtype, device=like.device))
        self.merged = False

    def delta(self) -> torch.Tensor:
        return self.weight


class BaseTensors(Rule):
    """Sites of kind "tensor" (roles `bias`: a linear's or a norm's bias, `norm`: a norm's weight; see
    peftsurgery.analyze). Mergeable: merging adds the deltas into the base tensors."""
    kinds = ("tensor",)
    mergeable = True
    additive = True

    def check(self, model, sites):
        for s in sites:
            t = _tensor(model, s)
            if not t.is_floating_point():
                raise SurgeryError(f"{s.path} is stored as {t.dtype}; only float tensors can be trained")

    def build(self, model, sites, sitemap):
        return {s.path: TensorDelta(_tensor(model, s)) for s in sites}

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            yield from substitute(model, s, built[s.path], switch)

    def check_merge(self, model, sites, built):
        self.check(model, sites)

    def merge(self, model, sites, built, sign):
        for s in sites:
            d = built[s.path]
            if (sign > 0) != d.merged:
                t = _tensor(model, s)
                with torch.no_grad():
                    t.add_(d.weight.to(t.dtype), alpha=sign)
                d.merged = sign > 0

    def describe(self, site, built):
        return f"trains {site.role} {site.path} ({site.out_features} values) as base + delta"


def _tensor(model: nn.Module, site) -> torch.Tensor:
    try:
        return model.get_parameter(site.path)
    except AttributeError:
        raise SurgeryError(f"{site.path} is not a parameter of this model; locate it again") from None
