"""Rule: a low-rank branch on a linear, y = base(x) + scale * B(A(dropout(x)))."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from .base import Rule, Switch, Undo, hook_output


class LowRankBranch(nn.Module):
    """The two factors of a low-rank update: A (r x in) then B (out x r), B starting at zero."""

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.A = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(r, d_out, bias=False, device=device, dtype=dtype)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(self.dropout(x.to(self.A.weight.dtype)))) * self.scale

    def delta(self) -> torch.Tensor:
        """The update as a full (out x in) matrix."""
        return (self.B.weight @ self.A.weight) * self.scale


class _Branch:
    """Forward hook adding the branch to a linear's output (a class, so deepcopy carries it along)."""

    def __init__(self, branch: LowRankBranch, switch: Switch):
        self.branch, self.switch = branch, switch

    def __call__(self, module, args, out):
        if not self.switch.on or self.branch.merged:
            return out
        return out + self.branch(args[0]).to(out.dtype)


class _Delta(nn.Module):
    """Parametrization for a linear op on a bare weight (no linear module to hook): W + delta."""

    def __init__(self, branch: LowRankBranch, switch: Switch, transposed: bool):
        super().__init__()
        object.__setattr__(self, "branch", branch)  # not a submodule: the adapter owns it
        self.switch, self.transposed = switch, transposed

    def forward(self, w):
        if not self.switch.on or self.branch.merged:
            return w
        d = self.branch.delta().to(w.dtype)
        return w + (d.T if self.transposed else d)


class LowRank(Rule):
    kinds = ("linear", "param-linear")
    mergeable = True

    def __init__(self, targets: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(targets)
        self.r, self.dropout = r, dropout
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r

    def build(self, model, sites, sitemap):
        out = {}
        for s in sites:
            w = _weight(model, s)
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            out[s.path] = LowRankBranch(s.in_features, s.out_features, self.r, self.scale, self.dropout,
                                        device=w.device, dtype=dtype)
        return out

    def attach(self, model, sites, built, switch, sitemap):
        undo = []
        for s in sites:
            if s.kind == "linear":
                undo.append(hook_output(model.get_submodule(s.path), _Branch(built[s.path], switch)))
            else:
                owner_path, name = s.path.rsplit(".", 1) if "." in s.path else ("", s.path)
                owner = model.get_submodule(owner_path)
                w = getattr(owner, name)
                transposed = tuple(w.shape) != (s.out_features, s.in_features)
                parametrize.register_parametrization(owner, name, _Delta(built[s.path], switch, transposed),
                                                     unsafe=True)
                undo.append(Undo(lambda o=owner, n=name: parametrize.remove_parametrizations(
                    o, n, leave_parametrized=False)))
        return undo

    def merge(self, model, sites, built, sign):
        for s in sites:
            b = built[s.path]
            if (sign > 0) == b.merged:
                continue
            w = _weight(model, s)
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise SurgeryError(f"{s.path} has a quantized base ({w.dtype}); merge onto a float copy of the model")
            d = b.delta().to(w.dtype)
            mod = model.get_submodule(s.path) if s.kind == "linear" else None
            if bool(Conv1D) and isinstance(mod, Conv1D):
                d = d.T
            elif s.kind == "param-linear" and tuple(w.shape) != tuple(d.shape):
                d = d.T
            with torch.no_grad():
                w.add_(d, alpha=sign)
            b.merged = sign > 0

    def describe(self, site, built):
        return f"low-rank branch r={self.r} scale={self.scale:g}: out + B(A(x))"


def _weight(model: nn.Module, site) -> torch.Tensor:
    if site.kind == "linear":
        m = model.get_submodule(site.path)
        if not is_linear_module(m):
            raise SurgeryError(f"{site.path} is a {type(m).__name__}, not a linear layer")
        return m.weight
    owner_path, name = site.path.rsplit(".", 1) if "." in site.path else ("", site.path)
    owner = model.get_submodule(owner_path)
    if parametrize.is_parametrized(owner, name):
        return owner.parametrizations[name].original
    return getattr(owner, name)
