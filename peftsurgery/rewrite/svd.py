"""Rule: a low-rank branch in SVD form whose ranks are allocated during training, y = base(x) + scale * P diag(E) Q x
(AdaLoRA, Zhang et al., 2023).

Each site gets r triplets (a column of P, a value of E, a row of Q); E starts at zero, so the branch starts as the
identity. The rule uses both training-time hooks (see peftsurgery/hookspecs.py):
  extra_loss   weight * sum over sites of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (the paper's orthogonality term)
  after_step   tracks each entry's importance (sensitivity |w * grad| smoothed by an EMA, times its smoothed
               uncertainty), and keeps the total number of kept triplets over all sites on a schedule: all of them
               for the first t_init steps, then a cubic fall to `target` until step total - t_final, then fixed.
               Every delta_t steps (and at total - t_final) the lowest-scoring triplets get E = 0; until the next
               allocation they may grow back, as in the paper; from total - t_final on they stay at zero.
A saved adapter holds only the triplets that count (kept, or grown back since the last allocation), and loads with
those ranks, fixed: the schedule has run. Attaching, merging and bare weights are the low-rank rule's.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from .lowrank import LowRank, _weight

_TRIPLET = ("P", "E", "Q")


class SVDBranch(nn.Module):
    """scale * P diag(E) Q: P (out x r), E (r) starting at zero, Q (r x in), both factors N(0, 0.02). `keep` marks
    the triplets the last allocation kept; the importance statistics are buffers made at the first step."""

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.P = nn.Parameter(torch.empty(d_out, r, device=device, dtype=dtype))
        self.E = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.Q = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        if self.P.device.type != "meta":
            nn.init.normal_(self.P, std=0.02)
            nn.init.normal_(self.Q, std=0.02)
        self.register_buffer("keep", torch.ones(r, dtype=torch.bool, device=device), persistent=False)
        self.r, self.scale, self.p = r, scale, float(dropout)
        self.merged = False
        self.parked: dict = {}   # while merged: the hooks taken off the linear (see base.park)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + scale * P(E * Q(dropout(x))), the scale and the sum folded into one addmm. Without autograd only
        the triplets that count take part (see live())."""
        P, E, Q = (self.P, self.E, self.Q) if torch.is_grad_enabled() else self.live()
        if not E.shape[0]:   # every triplet of this site was allocated away
            return out
        if x.dtype != Q.dtype:
            x = x.to(Q.dtype)
        if self.p and self.training:
            x = F.dropout(x, self.p, True)
        h = F.linear(x, Q) * E
        if out.dtype == P.dtype and out.dim() >= 2 and out.shape[-1] == P.shape[0]:
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), P.t(),
                               alpha=self.scale).view(out.shape)
        return out + (F.linear(h, P) * self.scale).to(out.dtype)

    def live(self):
        """P, E, Q restricted to the triplets that count (kept, or E grown back): what a saved adapter holds, so
        inference computes exactly what the reloaded branch does (a matmul over fewer terms sums in another
        order). The indices are kept while E and keep are unchanged."""
        if torch.compiler.is_compiling():   # no cached indices inside a compiled graph: the triplets that do
            return self.P, self.E, self.Q    # not count have E = 0
        key = (self.E._version, self.keep._version, self.E.data_ptr(), self.keep.data_ptr())
        hit = self.__dict__.get("_live")
        if hit is None or hit[0] != key:
            alive = self.alive()
            hit = self.__dict__["_live"] = (key, None if bool(alive.all()) else alive.nonzero().view(-1))
        idx = hit[1]
        if idx is None:
            return self.P, self.E, self.Q
        return self.P.index_select(1, idx), self.E.index_select(0, idx), self.Q.index_select(0, idx)

    def alive(self) -> torch.Tensor:
        """The triplets that count: kept by the last allocation, or with E grown back since (the others have
        E = 0 and add nothing)."""
        return self.keep | (self.E.detach() != 0)

    def delta(self) -> torch.Tensor:
        """The update as a full (out x in) matrix (without autograd, from the triplets that count)."""
        P, E, Q = (self.P, self.E, self.Q) if torch.is_grad_enabled() else self.live()
        return (P @ (E[:, None] * Q)) * self.scale

    def orthogonality(self) -> torch.Tensor:
        """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2."""
        eye = torch.eye(self.r, device=self.P.device, dtype=self.P.dtype)
        return (self.P.t() @ self.P - eye).pow(2).sum() + (self.Q @ self.Q.t() - eye).pow(2).sum()

    @torch.no_grad()
    def track(self, beta1: float, beta2: float) -> None:
        """Update each entry's smoothed sensitivity (avg) and uncertainty (unc) from the current gradients."""
        for n in _TRIPLET:
            p = getattr(self, n)
            if not hasattr(self, f"avg_{n}"):
                self.register_buffer(f"avg_{n}", torch.zeros_like(p), persistent=False)
                self.register_buffer(f"unc_{n}", torch.zeros_like(p), persistent=False)
            avg, unc = getattr(self, f"avg_{n}"), getattr(self, f"unc_{n}")
            s = (p * p.grad).abs()
            avg.mul_(beta1).add_(s, alpha=1 - beta1)
            unc.mul_(beta2).add_((s - avg).abs(), alpha=1 - beta2)

    def scores(self) -> torch.Tensor | None:
        """Importance of each triplet: the value's avg * unc plus the mean over the triplet's column of P and over
        its row of Q (None before the first tracked step)."""
        if not hasattr(self, "avg_E"):
            return None
        s = {n: getattr(self, f"avg_{n}") * getattr(self, f"unc_{n}") for n in _TRIPLET}
        return s["E"] + s["P"].mean(0) + s["Q"].mean(1)

    @torch.no_grad()
    def mask(self) -> None:
        self.E.masked_fill_(~self.keep, 0.0)


def schedule(step: int, total: int, start: int, target: int, t_init: int, t_final: int) -> int:
    """The total kept rank after optimizer step `step` (1..total): `start` through step t_init, then a cubic fall
    to `target` at step total - t_final (rounded down), then `target`."""
    end = total - t_final
    if step <= t_init:
        return start
    if step >= end:
        return target
    return int((start - target) * (1 - (step - t_init) / (end - t_init)) ** 3 + target)


class SVD(LowRank):
    """An SVD-form low-rank branch on linears (and bare weights used as linears) with budgeted ranks: `r` triplets
    per site to start with, `target` kept in total over all sites at the end (None: all kept, no allocation).
    Mergeable; a saved state holds each site's final rank."""

    def __init__(self, targets: str, r: int, alpha: float, target: int | None = None, dropout: float = 0.0,
                 t_init: int = 0, t_final: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_weight: float = 0.0):
        super().__init__(targets, r, alpha, dropout)
        self.target, self.t_init, self.t_final, self.delta_t = target, t_init, t_final, delta_t
        self.beta1, self.beta2, self.orth_weight = beta1, beta2, orth_weight
        self.ranks: dict[str, int] | None = None   # set when loading: each site's rank, fixed
        # a hook set to None is no hook: the core skips this rule (no loss term; no allocation)
        if not orth_weight:
            self.extra_loss = None
        if target is None:
            self.after_step = None

    def check(self, model, sites):
        for s in sites:
            if getattr(s, "experts", None):
                raise SurgeryError(f"{s.path} holds stacked expert weights, which the SVD branch does not cover; "
                                   "choose other targets")
            if self.r > min(s.in_features, s.out_features):
                raise SurgeryError(f"init_r={self.r} is larger than the smaller side of {s.path} ({s.in_features}->"
                                   f"{s.out_features}); use init_r <= {min(s.in_features, s.out_features)} or "
                                   "other targets")
        if self.target is not None and self.target > self.r * len(sites):
            raise SurgeryError(f"the target total rank {self.target} exceeds the initial one ({self.r} x "
                               f"{len(sites)} sites = {self.r * len(sites)}); lower the target or raise init_r")
        super().check(model, sites)

    def build(self, model, sites, sitemap):
        out = {}
        for s in sites:
            w = _weight(model, s)
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
            r = self.r if self.ranks is None else self.ranks.get(s.path, self.r)
            out[s.path] = SVDBranch(s.in_features, s.out_features, r, self.scale, self.dropout,
                                    device=w.device, dtype=dtype)
        return out

    # ---- training-time hooks

    def extra_loss(self, sites, built):
        return self.orth_weight * sum(b.orthogonality() for b in built.values())

    def after_step(self, sites, built, step: int, total: int) -> None:
        end = total - self.t_final
        if self.t_init >= end:
            raise SurgeryError(f"t_init={self.t_init} and t_final={self.t_final} leave no steps of a {total}-step run "
                               "for the ranks to fall; lower them or train longer")
        branches = list(built.values())
        if step > end:   # final fine-tuning: the ranks stay as allocated at step total - t_final
            for b in branches:
                b.mask()
            return
        # every step up to `end` updates the importance (as in the paper, the final allocation's step included)
        missing = [k for k, b in built.items() if any(getattr(b, n).grad is None for n in _TRIPLET)]
        if missing:
            raise SurgeryError(f"the SVD branch at {missing[0]} has no gradient: call peftsurgery.step(model, "
                               "step, total) after optimizer.step() and before optimizer.zero_grad()")
        for b in branches:
            b.track(self.beta1, self.beta2)
        if step == end or (step > self.t_init and step % self.delta_t == 0):
            start = sum(b.r for b in branches)
            self._allocate(branches, schedule(step, total, start, self.target, self.t_init, self.t_final))
        if step == end:   # the statistics are not needed any more
            for b in branches:
                for n in _TRIPLET:
                    delattr(b, f"avg_{n}")
                    delattr(b, f"unc_{n}")

    def _allocate(self, branches: list[SVDBranch], budget: int) -> None:
        """Keep the `budget` highest-scoring triplets over all sites (ties: the earlier one), zero the others' E."""
        scores = [b.scores() for b in branches]
        if any(s is None for s in scores):
            raise SurgeryError("the ranks cannot be allocated before any importance was recorded: call "
                               "peftsurgery.step(model, step, total) after every optimizer step from the first")
        flat = torch.cat([s.float().to(scores[0].device) for s in scores])
        order = torch.sort(flat, descending=True, stable=True).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:budget]] = True
        for b, k in zip(branches, keep.split([b.r for b in branches])):
            b.keep.copy_(k.to(b.keep.device))
            b.mask()

    # ---- saving

    def state(self, built):
        """Per site, the triplets that count (SVDBranch.alive); dropping the others changes no output. Settings:
        each site's rank."""
        tensors, ranks = {}, {}
        for k, b in built.items():
            P, E, Q = b.live()   # the parameters themselves when every triplet counts (load writes through them)
            tensors[k] = {"P": P, "E": E, "Q": Q}
            ranks[k] = E.shape[0]
        return tensors, {"ranks": ranks}

    def loading(self, settings):
        ranks = settings.get("ranks")
        if ranks is None:
            return self
        if not isinstance(ranks, dict) or not all(isinstance(v, int) and 0 <= v <= self.r for v in ranks.values()):
            raise SurgeryError(f"the saved ranks must be integers from 0 to init_r={self.r} per site; the adapter "
                               "config is damaged, save it again")
        rule = copy.copy(self)
        rule.ranks, rule.after_step = dict(ranks), None   # the schedule has run: the ranks stay
        return rule

    def route(self, model, entries, rows, cache):
        raise SurgeryError("route() cannot give each batch row its own SVD-branch (AdaLoRA) adapter yet; run one "
                           "adapter at a time with set_active(), or merge it")

    def describe(self, site, built):
        rank = self.r if built is None else f"{int(built.keep.sum())}/{built.r}"
        return f"SVD branch rank {rank} scale={self.scale:g}: out + scale * P diag(E) Q x"
