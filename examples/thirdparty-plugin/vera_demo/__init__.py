"""vera-demo: a third-party method that defines its own Rule (VeRA, Kopiczko et al., 2024). Every targeted linear
gets the update diag(b) · B · diag(d) · A, where A (r x in) and B (out x r) are random, frozen and shared by all
sites (slices of one pair drawn from a seed), and only the vectors d (r, starting at 0.1) and b (out, starting at
zero, so the model starts as the base) train. Built only from peftsurgery's public API: the Rule contract
(check, build, attach yielding changes, check_merge, merge, state, loading, describe) in peftsurgery.rewrite."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftsurgery import SurgeryError, hookimpl
from peftsurgery.checks import integer, selector
from peftsurgery.rewrite import Hooked, Rule, hooks_before, park

__version__ = "0.1.0"


class Vectors(nn.Module):
    """One site's trainable vectors; A and B are buffers (frozen, not saved: state() keeps the seed instead)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.d = nn.Parameter(torch.full((A.shape[0],), 0.1, dtype=A.dtype, device=A.device))
        self.b = nn.Parameter(torch.zeros(B.shape[0], dtype=A.dtype, device=A.device))
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.merged = False   # merge() sets it; park() takes the hook off while merged
        self.parked: dict = {}

    def delta(self) -> torch.Tensor:
        return self.b[:, None] * (self.B * self.d) @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x.to(self.A.dtype), self.A) * self.d, self.B) * self.b


class _Hook:
    """Forward hook adding the update to a linear's output. A class (not a closure) so the model pickles; it
    returns None when it does nothing (the core's probe forward counts that as "declined")."""
    additive = True   # adds to the output: merging an adapter attached earlier in front of it stays exact

    def __init__(self, owner: Vectors, switch):
        self.owner, self.switch = owner, switch   # .owner: park() finds the hooks of a merged module by it

    def __call__(self, module, args, out):
        if not self.switch.on or self.owner.merged:
            return None
        return out + self.owner(args[0]).to(out.dtype)


class VeRA(Rule):
    kinds = ("linear",)          # module linears only (kinds: linear, param-linear, tensor, embedding, attention)
    mergeable = True

    def __init__(self, targets: str, r: int, seed: int = 0):
        super().__init__(targets)
        self.r, self.seed = r, seed

    def check(self, model, sites):   # every precondition, before anything changes
        for s in sites:
            m = model.get_submodule(s.path)
            if not isinstance(m, nn.Linear):
                raise SurgeryError(f"vera-demo acts on nn.Linear modules; {s.path} is a {type(m).__name__}")

    def build(self, model, sites, sitemap):   # trainable modules keyed by site path; the model is not changed
        width, height = max(s.in_features for s in sites), max(s.out_features for s in sites)
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(self.r, width, generator=g) / width ** 0.5
        B = torch.randn(height, self.r, generator=g) / self.r ** 0.5
        out = {}
        for s in sites:
            w = model.get_submodule(s.path).weight
            out[s.path] = Vectors(A[:, :s.in_features].to(w), B[:s.out_features].to(w))
        return out

    def attach(self, model, sites, built, switch, sitemap):   # one Change per change, yielded as made
        for s in sites:
            yield Hooked(model, s.path, _Hook(built[s.path], switch))

    def check_merge(self, model, sites, built):
        for s in sites:
            m = model.get_submodule(s.path)
            if not m.weight.is_floating_point():
                raise SurgeryError(f"{s.path} has a quantized weight; merge onto a float copy of the model")
            if any(not getattr(h, "additive", False) for h in hooks_before(m, built[s.path])):
                raise SurgeryError(f"an adapter attached earlier transforms {s.path}'s output first; merge or "
                                   "remove it first")

    def merge(self, model, sites, built, sign):
        for s in sites:
            v, m = built[s.path], model.get_submodule(s.path)
            if (sign > 0) != v.merged:
                with torch.no_grad():
                    m.weight.add_(v.delta().to(m.weight.dtype), alpha=sign)
                v.merged = sign > 0
                park(m, v)

    def state(self, built):   # only the vectors are saved; the seed rebuilds A and B
        return {k: {"d": v.d, "b": v.b} for k, v in built.items()}, {"seed": self.seed}

    def loading(self, settings):
        return VeRA(self.targets, self.r, int(settings["seed"]))

    def describe(self, site, built):
        return f"VeRA r={self.r}: out + b * B(d * A(x)), A and B frozen (seed {self.seed})"


@dataclass
class VeraConfig:
    r: int = 16
    targets: str = "attn.q,attn.v"
    seed: int = 0

    def __post_init__(self):
        integer("vera-demo", "r", self.r)
        selector("vera-demo", "targets", self.targets)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise SurgeryError(f"vera-demo: seed must be a non-negative integer, got {self.seed!r}")


@hookimpl
def peftsurgery_config():
    return VeraConfig


@hookimpl
def peftsurgery_describe():
    return "VeRA demo: frozen shared random A, B; trainable vectors d, b per linear (third-party, own Rule)"


@hookimpl
def peftsurgery_rules(config, sites):
    return [VeRA(config.targets, config.r, config.seed)]


@hookimpl
def peftsurgery_budget(config, sites):
    return sum(config.r + s.out_features for s in sites.select(config.targets, VeRA.kinds))
