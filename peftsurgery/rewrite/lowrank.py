"""Rule: a low-rank branch on a linear, y = base(x) + scale * B(A(dropout(x)))."""
from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import Conv1D, is_linear_module
from ..errors import SurgeryError
from . import kernels
from .base import Hooked, Rule, Switch, hooks_before, park, substitute
from .slices import apart, into


class Factor(nn.Module):
    """One factor of a low-rank update: a bare weight used as F.linear(x, weight). Built directly as a Parameter
    (no nn.Linear construction and default initialisation to throw away)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class LowRankBranch(nn.Module):
    """The two factors of a low-rank update: A (r x in) then B (out x r), B starting at zero; for stacked expert
    weights, one pair per expert: A (experts x r x in), B (experts x out x r)."""

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0,
                 device=None, dtype=None, experts: int | None = None):
        super().__init__()
        lead = (experts,) if experts else ()
        self.A = Factor(torch.empty(*lead, r, d_in, device=device, dtype=dtype))
        self.B = Factor(torch.zeros(*lead, d_out, r, device=device, dtype=dtype))
        self.r, self.scale, self.p = r, scale, float(dropout)
        if self.A.weight.device.type != "meta":  # nothing to initialise on the meta device
            with torch.no_grad():  # each expert's A as a linear's weight (fan-in = d_in)
                nn.init.kaiming_uniform_(self.A.weight.view(-1, d_in), a=math.sqrt(5))
        self.merged = False
        self.parked: dict = {}   # while merged: the hooks taken off the linear (see base.park)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """A(dropout(x)), casting only when dtypes differ and calling dropout only when p > 0."""
        A = self.A.weight
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        return F.linear(x, A)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + scale * B(A(dropout(x))) with the scale and the sum folded into one addmm."""
        B = self.B.weight
        h = self._down(x)
        if out.dtype == B.dtype and out.dim() >= 2 and out.shape[-1] == B.shape[0]:
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(),
                               alpha=self.scale).view(out.shape)
        return out + (F.linear(h, B) * self.scale).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The update as a full (out x in) matrix (experts x out x in for stacked expert weights)."""
        return (self.B.weight @ self.A.weight) * self.scale


class _Branch:
    """Forward hook adding the branch to a linear's output (a class, so deepcopy carries it along)."""
    additive = True   # it adds to the output: merging another branch in front of it is exact

    def __init__(self, branch: LowRankBranch, switch: Switch, rows: tuple | None = None):
        self.owner, self.switch, self.rows = branch, switch, rows   # rows: a slice's features of the output

    def __call__(self, module, args, out):
        if not self.switch.on or self.owner.merged:
            return None
        if self.rows is None:
            return self.owner.add_to(out, args[0])
        return into(out, self.rows, lambda part: self.owner.add_to(part, args[0]))


DENSE_TOKENS = 4   # route(): at most this many tokens per row, and
DENSE_SLOTS = 16   # at most this many distinct slots among the rows: each used slot's projection computed densely
# (one matmul for all rows) instead of gathering each row's factors; past about 32 slots the gather costs less
# (64 rows of width 512, rank 32, one CPU thread: 16 slots 0.80 ms dense / 1.42 ms gathered, 64 slots 3.7 / 2.3)


class _Pool:
    """route()'s factors of every slot at one site, kept between calls without gradients: A (slots + 1, in, R),
    B (slots + 1, R, out) with the scale folded in, and each slot's dropout rate; the last slot stays zero (rows on
    the base). Only the slots a batch uses are checked, and one is written only when its branch changed (another
    adapter in the slot, new weights, another scale), so adding or removing an adapter copies nothing of the
    others."""

    def __init__(self, ref: torch.Tensor, slots: int, d_in: int, d_out: int, R: int):
        self.A, self.B = ref.new_zeros(slots + 1, d_in, R), ref.new_zeros(slots + 1, R, d_out)
        self.P = torch.zeros(slots + 1, device=ref.device)
        self.ranks = torch.zeros(slots + 1, dtype=torch.int32, device=ref.device)   # each slot's own rank
        self.R, self.held = R, [None] * slots   # per slot: what it holds (see _held)
        self.used = None   # the latest used_stacks()

    def __getstate__(self):   # a pickled or copied model's pool holds nothing yet (weak references do not pickle)
        return {**self.__dict__, "held": [None] * len(self.held), "used": None}

    def fits(self, ref: torch.Tensor, slots: int, R: int) -> bool:
        return len(self.held) == slots and self.R >= R and self.A.dtype == ref.dtype and self.A.device == ref.device

    def update(self, branches: dict[int, LowRankBranch], used: tuple) -> None:
        with torch.no_grad():
            for slot in used:
                if slot == len(self.held):   # the base
                    continue
                b = branches.get(slot)
                if _held(b, self.held[slot]):
                    continue
                self.A[slot].zero_(), self.B[slot].zero_()
                if b is not None:
                    self.A[slot, :, :b.r] = b.A.weight.t()
                    self.B[slot, :b.r] = (b.B.weight * b.scale).t()
                self.P[slot] = b.p if b is not None else 0.0
                self.ranks[slot] = b.r if b is not None else 0
                self.held[slot] = None if b is None else (weakref.ref(b.A.weight), weakref.ref(b.B.weight),
                                                          b.A.weight._version, b.B.weight._version, b.scale, b.p)


def _held(b: LowRankBranch | None, held) -> bool:
    """Whether a pool slot holding `held` (None: zeros) holds branch b as it is now (weak references, so that a
    freed adapter's reused memory address is never taken for it)."""
    if b is None or held is None:
        return b is None and held is None
    A, B = b.A.weight, b.B.weight
    return held[0]() is A and held[1]() is B and held[2:] == (A._version, B._version, b.scale, b.p)


class _Routed:
    """Forward hook under route(): row i of the batch gets the branch of slot rows[i] (no loop over adapters)."""

    def __init__(self, path: str, branches: dict[int, LowRankBranch], rows: torch.Tensor, cache: dict,
                 part: tuple | None = None):
        self.path, self.branches, self.rows, self.cache = path, branches, rows, cache
        self.slots = cache["slots"]
        call = cache["call"]   # the slots the rows use, found once per route() call for every site
        if "used" not in call:
            used, local = torch.unique(rows, return_inverse=True)
            call["used"] = (used, local, tuple(used.tolist()))
        self.used, self.local, self.used_key = call["used"]
        self.part = part   # a slice of a fused projection: its (start, stop) features of the output
        self.R = max(b.r for b in branches.values())   # the stacks' rank: the largest of the routed adapters'

    def stacks(self):
        """A, B and the dropout rates of every slot: without gradients from the site's _Pool; with them stacked
        from the branches, so that backward reaches them."""
        bs = self.branches
        any_b = next(iter(bs.values()))
        ref = any_b.A.weight
        d_out, d_in, R = any_b.B.weight.shape[0], any_b.A.weight.shape[1], self.R
        if not torch.is_grad_enabled():
            pools = self.cache["pools"]
            pool = pools.get(self.path)
            if pool is None or not pool.fits(ref, self.slots, R):
                pool = pools[self.path] = _Pool(ref, self.slots, d_in, d_out, R)
            pool.update(bs, self.used_key)
            return pool.A, pool.B, pool.P
        zeros_a, zeros_b = ref.new_zeros(d_in, R), ref.new_zeros(R, d_out)
        As, Bs, P = [], [], []
        for slot in range(self.slots + 1):
            b = bs.get(slot)
            if b is None:
                As.append(zeros_a), Bs.append(zeros_b), P.append(0.0)
                continue
            a, bb = b.A.weight.t(), (b.B.weight * b.scale).t()
            if b.r < R:
                a, bb = F.pad(a, (0, R - b.r)), F.pad(bb, (0, 0, 0, R - b.r))
            As.append(a), Bs.append(bb), P.append(b.p)
        return torch.stack(As), torch.stack(Bs), torch.tensor(P, device=ref.device)

    def used_stacks(self, A, B):
        """The factors of the slots the rows use, side by side, for batches of few tokens per row (decoding):
        (in, used R) and (used R, out); kept in the pool for the latest set of used slots while it is unchanged."""
        pool = self.cache["pools"].get(self.path) if not torch.is_grad_enabled() else None
        key = (A._version, B._version, self.used_key)
        if pool is not None and pool.A is A and pool.used is not None and pool.used[0] == key:
            return pool.used[1]
        A_u, B_u = A[self.used], B[self.used]
        out = (A_u.permute(1, 0, 2).reshape(A.shape[1], -1), B_u.reshape(-1, B.shape[2]))
        if pool is not None and pool.A is A:
            pool.used = (key, out)
        return out

    def __call__(self, module, args, out):
        if self.part is None:
            return self._add(args[0], out)
        return into(out, self.part, lambda part: self._add(args[0], part))

    def _add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if x.dim() < 2 or x.shape[0] != rows.shape[0]:
            raise SurgeryError(f"route was given {rows.shape[0]} adapter names but {self.path} sees a batch of "
                               f"{x.shape[0] if x.dim() else 0} rows; give one name per row")
        A, B, P = self.stacks()
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        if any(b.p and b.training for b in self.branches.values()):
            keep = 1.0 - P[rows].view(-1, 1, 1)   # each row's own dropout rate
            x3 = x3 * (torch.rand_like(x3) < keep) / keep
        o3 = out.reshape(out.shape[0], -1, out.shape[-1])
        if x3.shape[1] <= DENSE_TOKENS and not torch.is_grad_enabled() and kernels.usable(x3):
            # decoding on a GPU: each token's factors read from the pool inside one kernel per product
            pool = self.cache["pools"][self.path]
            try:
                idx = rows.repeat_interleave(x3.shape[1])
                return kernels.gathered(x3.reshape(-1, x3.shape[-1]), A, B, pool.ranks, idx,
                                        o3.reshape(-1, o3.shape[-1])).view(out.shape)
            except Exception as e:   # a triton or driver that cannot build it: said once, then the torch path
                kernels.failed(e)
        if x3.shape[1] <= DENSE_TOKENS and len(self.used_key) <= DENSE_SLOTS and o3.dtype == B.dtype:
            # few tokens per row and few adapters: gathering per-row factors would move more memory than computing
            # each used slot's rank-R projection; rows keep only their own slot's (the others multiplied by zero)
            A_cat, B_cat = self.used_stacks(A, B)
            b, t, slots = x3.shape[0], x3.shape[1], len(self.used_key)
            keep = F.one_hot(self.local, slots).to(x3.dtype).view(b, 1, slots, 1)
            h = (torch.matmul(x3, A_cat).view(b, t, slots, -1) * keep).view(b * t, -1)
            return torch.addmm(o3.reshape(b * t, -1), h, B_cat).view(out.shape)
        h = torch.bmm(x3, A[rows])
        if o3.dtype == B.dtype:
            return torch.baddbmm(o3, h, B[rows]).view(out.shape)
        return out + torch.bmm(h, B[rows]).view(out.shape).to(out.dtype)


class LowRank(Rule):
    """Low-rank branches on linears, bare weights, and slices of fused projections (B as wide as the slice,
    adding into its features only)."""
    kinds = ("linear", "param-linear", "slice")
    mergeable = True
    additive = True

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
                                        device=w.device, dtype=dtype, experts=s.experts)
        return out

    @staticmethod
    def size(site, r: int) -> int:
        """Trainable parameters of a rank-r branch at a site (a pair of factors per expert of stacked weights):
        what a plugin's budget adds up."""
        return r * (site.in_features + site.out_features) * (site.experts or 1)

    def check(self, model, sites):
        bare = [s.path for s in sites if s.kind == "param-linear"]
        if self.dropout and bare:
            warnings.warn(f"dropout={self.dropout} does not apply at {len(bare)} site(s) whose weight another module "
                          f"uses ({bare[0]}, ...): their update is added to the weight while it runs", stacklevel=4)
        named = {t.strip() for t in self.targets.split(",")}
        wide = []
        for s in sites:
            side = min(s.in_features, s.out_features)
            if self.r > side and (s.role in named or f"path:{s.path}" in named):
                raise SurgeryError(f"r={self.r} is larger than the smaller side of {s.path} ({s.in_features}->"
                                   f"{s.out_features}); use r <= {side} or other targets")
            if self.r > side:
                wide.append(f"{s.path} ({s.in_features}->{s.out_features})")
            _weight(model, s)
        if wide:   # picked by a glob or all-linear (a mixture's 1-output gate): as PEFT, the rank there stays r
            warnings.warn(f"r={self.r} is larger than the smaller side of {len(wide)} linear(s) {self.targets!r} "
                          f"picks ({', '.join(wide[:3])}{', ...' if len(wide) > 3 else ''}): their update has a "
                          "lower rank than r for the same parameters; leave them out of the targets to save them",
                          stacklevel=4)

    def attach(self, model, sites, built, switch, sitemap):
        for s in sites:
            if s.kind == "linear":
                yield Hooked(model, s.fused or s.path, _Branch(built[s.path], switch, s.rows))
            else:
                w = _weight(model, s)
                yield from substitute(model, s, built[s.path], switch, w.shape[-1] != s.in_features)

    def check_merge(self, model, sites, built):
        for s in sites:
            w = _weight(model, s)
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise SurgeryError(f"{s.path} has a quantized base ({w.dtype}); merge onto a float copy of the model")
            if s.kind == "linear":   # hooks ahead that add, or act on other features of the output, commute
                ahead = [h for h in hooks_before(model.get_submodule(s.fused or s.path), built[s.path])
                         if not getattr(h, "additive", False) and not apart(h, s.rows)]
                if ahead:
                    raise SurgeryError(f"at {s.path} a {type(ahead[0]).__name__} hook of an adapter attached earlier "
                                       "transforms the output first, so merging would change what the model "
                                       "computes; merge or remove that adapter first")

    def merge(self, model, sites, built, sign):
        for s in sites:
            b = built[s.path]
            if (sign > 0) == b.merged:
                continue
            w = _weight(model, s)
            d = b.delta().to(w.dtype)
            mod = model.get_submodule(s.fused or s.path) if s.kind == "linear" else None
            if (bool(Conv1D) and isinstance(mod, Conv1D)) or (s.kind == "param-linear"
                                                              and w.shape[-1] != s.in_features):
                w = w.transpose(-1, -2)   # a view as (out, in)
            start, stop = s.rows or (0, w.shape[-2])
            with torch.no_grad():
                w[..., start:stop, :].add_(d, alpha=sign)
            b.merged = sign > 0
            if mod is not None:
                park(mod, b)

    def route(self, model, entries, rows, cache):
        """One hook per site for all routed adapters: their factors stacked into (slots + 1, in, R) and
        (slots + 1, R, out) tensors (rank padded with zeros to the largest R, scale folded into B, the last slot
        zero for rows on the base; a _Pool kept between calls without gradients), gathered per row and applied
        with two batched matmuls."""
        by_site: dict[str, dict[int, LowRankBranch]] = {}
        where = {}
        for slot, sites, built in entries:
            for s in sites:
                if s.kind != "linear":
                    raise SurgeryError(f"route cannot give each row its own adapter at {s.path}: a {s.kind} site "
                                       "(a weight used inside another module) has no per-row input to hook")
                by_site.setdefault(s.path, {})[slot] = built[s.path]
                where[s.path] = s
        keep_pools(cache, by_site)
        return [Hooked(model, where[path].fused or path, _Routed(path, branches, rows, cache, where[path].rows))
                for path, branches in by_site.items()]

    def describe(self, site, built):
        if site.kind == "param-linear":
            each = " per expert" if site.experts else ""
            return f"low-rank update r={self.r}{each} scale={self.scale:g}: W + B·A while {site.runner} runs"
        if site.rows:
            return (f"low-rank branch r={self.r} scale={self.scale:g} on features {site.rows[0]}:{site.rows[1]} of "
                    f"{site.fused}: out + B(A(x))")
        return f"low-rank branch r={self.r} scale={self.scale:g}: out + B(A(x))"


def keep_pools(cache: dict, paths) -> None:
    """The _Pool of each site in `paths` is kept in cache["pools"] between route() calls; those of other sites
    (adapters removed, or no longer routed) are dropped."""
    pools = cache.setdefault("pools", {})
    for path in set(pools) - set(paths):
        del pools[path]


def _split(path: str) -> tuple[str, str]:
    return tuple(path.rsplit(".", 1)) if "." in path else ("", path)


def _weight(model: nn.Module, site) -> torch.Tensor:
    path = site.fused or site.path   # a slice's weight is its fused projection's
    try:
        if site.kind == "linear":
            m = model.get_submodule(path)
            if not is_linear_module(m):
                raise SurgeryError(f"{path} is a {type(m).__name__}, not a linear layer")
            return m.weight
        owner_path, name = _split(path)
        return getattr(model.get_submodule(owner_path), name)
    except AttributeError:
        raise SurgeryError(f"{path} is not in this model; locate it again") from None
