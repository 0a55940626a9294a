"""Rules: scale a linear's output features, y = base(x) * v (Scale), or its input features, y = base(x * v)
(ScaleInput), by a trainable vector v starting at ones (IA3). Scale also acts on a slice of a fused projection
(attn.k inside attn.qkv): only that slice's features are scaled. Merging folds v into the weight's rows (and the
bias) for Scale, into its columns for ScaleInput (Conv1D stores the weight transposed)."""
from __future__ import annotations

import torch
from torch import nn

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from .base import Hooked, Rule, Switch, hooks_before, park, substituted
from .slices import apart, into


class ScaleVector(nn.Module):
    """One trainable factor per feature."""

    def __init__(self, features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features, device=device, dtype=dtype))
        self.merged = False
        self.parked: dict = {}   # while merged: the hooks taken off the linear (see base.park)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out * self.weight.to(out.dtype)


class _Scaled:
    """Forward hook multiplying a linear's output (features `rows` of it, for a slice) by the vector (a class,
    so deepcopy carries it along)."""

    def __init__(self, vector: ScaleVector, switch: Switch, rows: tuple | None = None):
        self.owner, self.switch, self.rows = vector, switch, rows

    def __call__(self, module, args, out):
        if not self.switch.on or self.owner.merged:
            return None
        return self.owner(out) if self.rows is None else into(out, self.rows, self.owner)


class _ScaledInput:
    """Forward pre-hook multiplying a linear's input by the vector."""

    def __init__(self, vector: ScaleVector, switch: Switch):
        self.owner, self.switch = vector, switch

    def __call__(self, module, args):
        if not self.switch.on or self.owner.merged:
            return None
        return (self.owner(args[0]), *args[1:])


class Scale(Rule):
    """Output scaling of linears and of slices of fused projections (kinds include "slice")."""
    kinds = ("linear", "slice")
    mergeable = True

    @staticmethod
    def features(site) -> int:
        """The vector's length at a site (what a plugin's budget counts)."""
        return site.out_features

    def build(self, model, sites, sitemap):
        out = {}
        for s in sites:
            w = _linear(model, s).weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            out[s.path] = ScaleVector(self.features(s), device=w.device, dtype=dtype)
        return out

    def check(self, model, sites):
        for s in sites:
            _linear(model, s)

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            yield Hooked(model, _path(s), _Scaled(built[s.path], switch, s.rows))

    def check_merge(self, model, sites, built):
        for s in sites:
            m = _linear(model, s)
            if not m.weight.dtype.is_floating_point:
                raise SurgeryError(f"{_path(s)} has a quantized base ({m.weight.dtype}); merge onto a float copy")
            self._check_hooks(model, s, m, built[s.path])
            if not built[s.path].merged and bool((built[s.path].weight == 0).any()):
                raise SurgeryError(f"the scale vector at {s.path} has a zero entry, so unmerging could not "
                                   "divide it back out; keep the adapter unmerged")

    def _check_hooks(self, model, s, m, vector) -> None:
        """Merging moves the scaling in front of the output hooks attached earlier: exact for other scalings and
        for hooks on other features of the output. A delta another adapter adds to the weight or bias while the
        linear runs (BitFit's) would stay unscaled: merging (or unmerging) then waits until that one is merged."""
        ahead = [h for h in hooks_before(m, vector) if not isinstance(h, _Scaled) and not apart(h, s.rows)]
        if ahead:
            raise SurgeryError(f"at {_path(s)} a {type(ahead[0]).__name__} hook of an adapter attached earlier acts "
                               "on the output first, so merging the scale would change what the model computes; "
                               "merge or remove that adapter first")
        inside = [name for name, rows in substituted(model, _path(s))
                  if rows is None or s.rows is None or not (rows[1] <= s.rows[0] or s.rows[1] <= rows[0])]
        if inside:
            raise SurgeryError(f"at {_path(s)} another adapter adds to its {inside[0]} while it runs, and the scale "
                               "acts on that too, so merging or unmerging the scale would change what the model "
                               "computes; merge or remove that adapter first")

    def merge(self, model, sites, built, sign):
        """Fold the vector into the weight (and bias); sign -1 divides it back out."""
        for s in sites:
            v = built[s.path]
            if (sign > 0) == v.merged:
                continue
            m = _linear(model, s)
            f = v.weight.detach().to(m.weight.dtype)
            with torch.no_grad():
                self._fold(m, f if sign > 0 else 1.0 / f, s.rows)
            v.merged = sign > 0
            self._park(m, v)

    def _fold(self, m: nn.Module, f: torch.Tensor, rows: tuple | None) -> None:
        a, b = rows or (0, f.shape[0])
        w = m.weight.T if bool(Conv1D) and isinstance(m, Conv1D) else m.weight   # as (out, in)
        w[a:b].mul_(f[:, None])
        if m.bias is not None:
            m.bias[a:b].mul_(f)

    def _park(self, m: nn.Module, v: ScaleVector) -> None:
        park(m, v)

    def describe(self, site, built):
        where = f"features {site.rows[0]}:{site.rows[1]} of {site.fused}" if site.rows else "output"
        return f"scale {where} by a trainable vector ({site.out_features}): out * v"


class ScaleInput(Scale):
    """Input scaling of whole linears (a slice has no input of its own)."""
    kinds = ("linear",)

    @staticmethod
    def features(site) -> int:
        return site.in_features

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            yield Hooked(model, s.path, _ScaledInput(built[s.path], switch), pre=True)

    def _check_hooks(self, model, s, m, vector) -> None:
        """Merging changes the input every later hook sees: refused while another adapter's hook reads it."""
        pre = list(m._forward_pre_hooks.values())
        mine = [i for i, h in enumerate(pre) if getattr(h, "owner", None) is vector]
        later = pre[mine[0] + 1:] if mine else []
        readers = later + [h for h in m._forward_hooks.values() if not isinstance(h, _Scaled)]
        if readers:
            raise SurgeryError(f"at {s.path} a {type(readers[0]).__name__} hook of another adapter reads the input "
                               "after the scale, so merging it would change what the model computes; merge or "
                               "remove that adapter first")

    def _fold(self, m: nn.Module, f: torch.Tensor, rows: tuple | None) -> None:
        w = m.weight.T if bool(Conv1D) and isinstance(m, Conv1D) else m.weight   # as (out, in)
        w.mul_(f[None, :])

    def _park(self, m: nn.Module, v: ScaleVector) -> None:
        park(m, v, pre=True)   # the pre-hook: off the linear while merged, back in its place after

    def describe(self, site, built):
        return f"scale input by a trainable vector ({site.in_features}): base(x * v)"


def _path(site) -> str:
    return site.fused or site.path


def _linear(model: nn.Module, site) -> nn.Module:
    path = _path(site)
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise SurgeryError(f"{path} is not in this model; locate it again") from None
    if not is_linear_module(m):
        raise SurgeryError(f"{path} is a {type(m).__name__}, not a linear layer; scaling needs one")
    return m
