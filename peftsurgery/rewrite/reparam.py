"""Rule kind: weight reparametrisation. Instead of adding a branch beside a linear, the linear computes with an
effective weight W' = f(W, θ) made from its frozen base weight W and trainable tensors θ.

Reparam does the surgery once for every such method: a forward hook per linear handing the base output to the
module the rule built for that linear, merging (W <- W' and back), the checks, and loading without initialising.
What W' is comes from that module, a Reparametrization, through four methods:
  init(w)             set θ from the base weight as it is when the adapter is attached (after the adapter's own
                      quantization, if any), so that W' = W; not called when a saved state is loaded
  output(out, x, w)   the linear's output: `out` is what the base linear returned (bias included), x its input
  fold(W) -> W'       the weight merge() writes (the module may remember what unfold needs)
  unfold(W') -> W     its inverse, for unmerge()
`w` is a BaseWeight: w.get() is W as an (out, in) matrix in θ's dtype whatever the linear is (nn.Linear,
transformers' Conv1D which stores (in, out), or a bitsandbytes 4-bit layer, dequantized), read on first use;
w.key changes whenever the stored weight does (for caches); w.bias is the linear's bias. θ gets no gradient through
W (the base stays frozen). Merging into a 4-bit base is refused.

A method subclasses Reparam and implements build() (a Reparametrization per site, from the Rule contract in
base.py), and may implement route() (per-row adapters, see surgery.route). MagnitudeDirection below is one.

A reparametrisation must see the linear's own output and weight: a linear already carrying an output hook of
another kind of adapter is refused at apply (attach the reparametrisation first; adapters attached after it act on
its output). Several reparametrisations may share a linear (to be routed per row, or used one at a time; active
together, each later one acts on the output of those before it), but then none of them merges. Unmerging is
refused once the weight changed after the merge (another adapter merged since).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from .base import Hooked, Rule, Switch, hooks_before, park
from .lowrank import LowRank, LowRankBranch, _Routed, keep_pools


class BaseWeight:
    """A linear's base weight as (out, in) in `dtype`, read (and dequantized from 4-bit) on first use."""

    def __init__(self, linear: nn.Module, dtype: torch.dtype):
        w = linear.weight
        self.linear, self.dtype, self.bias = linear, dtype, linear.bias
        # what the cached norm depends on (none inside torch.compile, which caches nothing here)
        self.key = None if torch.compiler.is_compiling() else (id(w), w._version, w.data_ptr(), dtype)
        self._w = None

    def get(self) -> torch.Tensor:
        if self._w is None:
            self._w = _oriented(self.linear).detach().to(self.dtype)
        return self._w


class Reparametrization(nn.Module):
    """What a Reparam rule builds for one linear (see the module docstring for the four methods)."""

    def __init__(self):
        super().__init__()
        self.merged = False
        self.parked: dict = {}      # while merged: the hooks taken off the linear (see base.park)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def init(self, w: BaseWeight) -> None:
        raise NotImplementedError

    def output(self, out: torch.Tensor, x: torch.Tensor, w: BaseWeight) -> torch.Tensor:
        raise NotImplementedError

    def fold(self, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unfold(self, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Reparametrized:
    """Forward hook: the linear's output as its Reparametrization computes it (a class, so deepcopy carries it)."""

    def __init__(self, module: Reparametrization, switch: Switch):
        self.owner, self.switch = module, switch

    def __call__(self, module, args, out):
        if not self.switch.on or self.owner.merged:
            return None
        return self.owner.output(out, args[0], BaseWeight(module, self.owner.dtype))


class Reparam(Rule):
    """Weight reparametrisation of whole linears (float or 4-bit base); mergeable into float bases."""
    kinds = ("linear",)
    mergeable = True
    initialise = True   # False on the copy that loads a saved state (see loading())

    def check(self, model, sites):
        for s in sites:
            if s.experts:
                raise SurgeryError(f"{s.path} holds stacked expert weights, which a weight reparametrisation does "
                                   "not cover; choose other targets")
            m = _linear(model, s)
            w = m.weight
            if not w.dtype.is_floating_point and getattr(w, "quant_state", None) is None:
                raise SurgeryError(f"{s.path} has a {w.dtype} base that is neither float nor 4-bit; a weight "
                                   "reparametrisation cannot read it, choose other targets")
            if m.__dict__.get(FOLDED):
                raise SurgeryError(f"another weight reparametrisation is merged into {s.path}: unmerging it later "
                                   "would change the weight this one reads; unmerge it first")
            other = next((h for h in m._forward_hooks.values()
                          if hasattr(h, "owner") and not isinstance(h, _Reparametrized)), None)
            if other is not None:
                raise SurgeryError(f"{s.path} already carries a {type(other).__name__} hook of another adapter, "
                                   "and a weight reparametrisation must see the linear's own output: apply it "
                                   "before that adapter, or target other linears")

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            r, m = built[s.path], model.get_submodule(s.path)
            if self.initialise and m.weight.device.type != "meta":
                with torch.no_grad():
                    r.init(BaseWeight(m, r.dtype))
            yield Hooked(model, s.path, _Reparametrized(r, switch))

    def loading(self, settings):
        rule = copy.copy(self)
        rule.initialise = False   # the saved tensors are written in before attach
        return rule

    def check_merge(self, model, sites, built):
        for s in sites:
            m, r = _linear(model, s), built[s.path]
            if not m.weight.dtype.is_floating_point:
                raise SurgeryError(f"{s.path} has a quantized base ({m.weight.dtype}); merge onto a float copy of "
                                   "the model")
            if not r.merged and hooks_before(m, r):
                raise SurgeryError(f"at {s.path} a {type(hooks_before(m, r)[0]).__name__} hook of an adapter "
                                   "attached earlier acts on the output first, so merging would change what the "
                                   "model computes; merge or remove that adapter first")
            # (un)merging changes the weight that another, unmerged reparametrisation here reads. Merges made
            # since this one came in are the core's to order (surgery.unmerge takes them out first).
            if any(isinstance(h, _Reparametrized) and h.owner is not r for h in m._forward_hooks.values()):
                raise SurgeryError(f"another weight reparametrisation at {s.path} reads the weight this "
                                   f"{'unmerge' if r.merged else 'merge'} would change; merge or remove the other "
                                   "adapter first")

    def merge(self, model, sites, built, sign):
        for s in sites:
            r = built[s.path]
            if (sign > 0) == r.merged:
                continue
            m = model.get_submodule(s.path)
            w = _oriented(m)   # a view of the stored weight
            with torch.no_grad():
                W = w.detach().to(r.dtype)
                w.copy_((r.fold(W) if sign > 0 else r.unfold(W)).to(w.dtype))
            r.merged = sign > 0
            folded = m.__dict__.setdefault(FOLDED, [])
            folded.append(r) if r.merged else folded.remove(r)
            park(m, r)


# ---------------------------------------------------------------- magnitude and direction (DoRA)

class DecomposedWeight(Reparametrization):
    """W' = m ⊙ (W + ΔW) / ‖W + ΔW‖: a magnitude m per output feature (trainable, starting at ‖W‖) times the
    direction of W + ΔW, ΔW = scale·B·A the low-rank update of a LowRankBranch (the low-rank rule's factors,
    dropout and scale), ‖·‖ the L2 norm of each output row. The norm is a constant to autograd (Liu et al., 2024,
    section 4.3), so gradients reach m directly and A, B through the direction's numerator only. With s = m / ‖W +
    ΔW‖ the output is s ⊙ (W x + ΔW dropout(x)) + bias, computed from the base output without a second matmul;
    dropout applies to the low-rank branch's input only, as in LoRA."""

    def __init__(self, branch: LowRankBranch, d_out: int):
        super().__init__()
        self.branch = branch
        ref = branch.A.weight
        self.magnitude = nn.Parameter(torch.ones(d_out, device=ref.device, dtype=ref.dtype))
        self.folded = None   # while merged: the s used, which unfold() divides back out

    def norm(self, w: BaseWeight) -> torch.Tensor:
        """‖W + ΔW‖ per output row, without gradient; kept while W, A, B and the scale are unchanged."""
        b = self.branch
        if w.key is None:
            with torch.no_grad():
                return torch.linalg.vector_norm(w.get() + b.delta(), dim=1)
        key = (w.key, b.scale, *((id(p), p._version, p.data_ptr()) for p in (b.A.weight, b.B.weight)))
        hit = self.__dict__.get("_norm")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self.__dict__["_norm"] = (key, torch.linalg.vector_norm(w.get() + b.delta(), dim=1))
        return hit[1]

    def scale(self, w: BaseWeight) -> torch.Tensor:
        """s = m / ‖W + ΔW‖, per output feature."""
        return self.magnitude / self.norm(w)

    def init(self, w):
        self.magnitude.copy_(self.norm(w))

    def output(self, out, x, w):
        inner = out if w.bias is None else out - w.bias     # W x
        s = self.scale(w).to(out.dtype)
        return out + (self.branch.add_to(inner, x) * s - inner)   # = s ⊙ (W x + ΔW x) + bias; exact at s = 1

    def fold(self, W):
        V = W + self.branch.delta()
        self.folded = (self.magnitude / torch.linalg.vector_norm(V, dim=1)).detach()
        return V * self.folded[:, None]

    def unfold(self, W):
        back = W / self.folded[:, None] - self.branch.delta()
        self.folded = None
        return back


class _RoutedScaled:
    """Forward hook under route(): row i gets s_i ⊙ (W x + ΔW_i x) + bias for the adapter of slot rows[i] (s = 1
    and ΔW = 0 for rows on the base or on other rules' adapters): the low-rank rule's per-row gather for ΔW_i x,
    then each row's scale, gathered from the stacked scales."""

    def __init__(self, path: str, modules: dict[int, DecomposedWeight], rows: torch.Tensor, cache: dict):
        self.modules, self.rows, self.slots = modules, rows, cache["slots"]
        self.lowrank = _Routed(path, {k: m.branch for k, m in modules.items()}, rows, cache)

    def __call__(self, module, args, out):
        inner = out if module.bias is None else out - module.bias
        y = self.lowrank(module, args, inner)   # checks the batch has one row per name
        weights = {}
        ones = out.new_ones(out.shape[-1])
        s = torch.stack([self.modules[k].scale(weights.setdefault(self.modules[k].dtype, BaseWeight(
            module, self.modules[k].dtype))).to(out.dtype) if k in self.modules else ones
            for k in range(self.slots + 1)])[self.rows]
        return out + (y * s.view(s.shape[0], *(1,) * (y.dim() - 2), -1) - inner)


class MagnitudeDirection(Reparam):
    """Each targeted linear computes with m ⊙ (W + ΔW) / ‖W + ΔW‖ (a DecomposedWeight), ΔW a rank-r update
    built, checked and scaled by the low-rank rule (alpha / r, or alpha / sqrt(r) with rslora)."""

    def __init__(self, targets: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(targets)
        self.lowrank = LowRank(targets, r, alpha, dropout, rslora)

    @staticmethod
    def size(site, r: int) -> int:
        """Trainable parameters at a site: the rank-r factors and the magnitude."""
        return LowRank.size(site, r) + site.out_features

    def check(self, model, sites):
        super().check(model, sites)
        self.lowrank.check(model, sites)
        for s in sites:
            m = _linear(model, s)
            if m.weight.device.type != "meta":
                zero = int((torch.linalg.vector_norm(BaseWeight(m, torch.float32).get(), dim=1) == 0).sum())
                if zero:
                    raise SurgeryError(f"{s.path} has {zero} all-zero weight rows, which have no direction to "
                                       "decompose (their scale would be 0/0, NaN); leave it out of targets, or use a "
                                       "plain low-rank branch there")

    def build(self, model, sites, sitemap):
        branches = self.lowrank.build(model, sites, sitemap)
        return {s.path: DecomposedWeight(branches[s.path], s.out_features) for s in sites}

    def route(self, model, entries, rows, cache):
        """One hook per site for all routed adapters of this rule (stacked factors cached apart from the
        low-rank rule's, which may route the same linears)."""
        by_site: dict[str, dict[int, DecomposedWeight]] = {}
        for slot, sites, built in entries:
            for s in sites:
                by_site.setdefault(s.path, {})[slot] = built[s.path]
        mine = cache.setdefault(("reparam",), {})
        mine["slots"], mine["call"] = cache["slots"], cache["call"]
        keep_pools(mine, by_site)
        return [Hooked(model, path, _RoutedScaled(path, mods, rows, mine)) for path, mods in by_site.items()]

    def describe(self, site, built):
        lr = self.lowrank
        return f"magnitude x direction of W + B·A, r={lr.r} scale={lr.scale:g}: m (W + BA) / |W + BA|"


FOLDED = "_peftsurgery_folded"   # on a linear: the reparametrisations merged into its weight


def _linear(model: nn.Module, site) -> nn.Module:
    try:
        m = model.get_submodule(site.path)
    except AttributeError:
        raise SurgeryError(f"{site.path} is not in this model; locate it again") from None
    if not is_linear_module(m):
        raise SurgeryError(f"{site.path} is a {type(m).__name__}, not a linear layer; a weight reparametrisation "
                           "needs one")
    return m


def _oriented(m: nn.Module) -> torch.Tensor:
    """The linear's weight as (out, in): a view of the stored one (Conv1D stores (in, out)); a 4-bit weight
    dequantized (a copy)."""
    w = m.weight
    state = getattr(w, "quant_state", None)
    if state is not None:
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(w.data, state)
    return w.t() if bool(Conv1D) and isinstance(m, Conv1D) else w

