"""What every rewrite rule shares: site selection, preconditions, building trainable modules, attaching them as
changes that can be undone by module path, merging, and the state a saved adapter holds.

A rule's life on a model (the core calls these in this order; see peftsurgery/surgery.py):
  select(sitemap)                     the sites it acts on (SurgeryError when a selector matches nothing)
  check(model, sites)                 every precondition; raises SurgeryError before anything is changed
  build(model, sites, sitemap)        trainable modules keyed by site path; must not change the model
  attach(model, sites, built, ...)    yields one Change per change made on the model, as soon as it is made
  check_merge / merge(sign)           fold into / out of the base weights (mergeable rules)
  state(built) / load_state(...)      the tensors and rule-level settings a saved adapter holds
  loading(settings)                   the rule to build when loading a saved state (skips costly initialisation)
Rules stay attached to the model (in its records), so they must be picklable: drop callables used only for
initialisation once build() has used them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from ..sites import Site, SiteMap


class Switch:
    """On/off for one attached adapter; every hook of the adapter reads it."""

    def __init__(self):
        self.on = True


class Change:
    """One change a rule made on the model. It is undone by module path, so a later swap of the module at that
    path (quantization replaces linears) cannot strand it. Picklable and deep-copyable with the model."""
    path = ""

    def undo(self, model: nn.Module) -> None:
        raise NotImplementedError

    def watch(self, model: nn.Module):
        """For the probe forward after apply and load: start recording whether this change acts, and return a
        function that stops recording and returns None if it acted, else why not (None: nothing to prove)."""
        return None

    def settle(self) -> None:
        """The apply (or load) that made this change is proven: drop what only undoing a failed one needed."""


class Watcher:
    """Wraps a hook or editor during the probe forward: did it run, and did it act (return something)?"""

    def __init__(self, fn):
        self.fn, self.ran, self.acted = fn, False, False

    def __call__(self, *args, **kwargs):
        self.ran = True
        out = self.fn(*args, **kwargs)
        self.acted |= out is not None
        return out

    def verdict(self, never: str, declined: str) -> str | None:
        return None if self.acted else declined if self.ran else never


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_ALL_HOOKS = tuple(k for k in vars(nn.Module()) if "hook" in k)   # every hook dict (and flag) of a module


class Hooked(Change):
    """A forward (or forward-pre) hook on the module at `path`, removed by identity from whatever module is
    there when undone (first: run before the hooks already there)."""

    def __init__(self, model: nn.Module, path: str, hook, pre: bool = False, with_kwargs: bool = False,
                 always_call: bool = False, acts: bool = True, first: bool = False):
        module = model.get_submodule(path)
        if pre:
            module.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=first)
        else:
            module.register_forward_hook(hook, with_kwargs=with_kwargs, always_call=always_call, prepend=first)
        self.path, self.hook, self.acts = path, hook, acts  # acts=False: a clean-up hook, nothing to prove

    def undo(self, model):
        drop_hook(model.get_submodule(self.path), self.hook)

    def watch(self, model):
        """A hook acts when it returns something (hooks that decline return None)."""
        module = model.get_submodule(self.path)
        for hooks in (getattr(module, d) for d in _HOOK_DICTS):
            for key, h in hooks.items():
                if h is self.hook and self.acts:
                    hooks[key] = w = Watcher(h)
                    return lambda: (hooks.__setitem__(key, h), w.verdict(
                        "its hook never ran: the module is not called when the model runs on its example inputs",
                        "its hook ran but declined: what it needs (e.g. token ids under the name it expects) did "
                        "not reach it"))[1]
        return None


def drop_hook(module: nn.Module, hook) -> None:
    """Take the hook object `hook` off `module` (forward and pre-hooks, with their flags)."""
    for name in _HOOK_DICTS:
        hooks = getattr(module, name)
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]
            for flag in _HOOK_FLAGS:
                getattr(module, flag).pop(key, None)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """`new` takes over `old`'s hook dicts themselves (for a module swapped in its place): the hooks keep their
    order and flags, and the handles that registered them still remove them."""
    new.__dict__.update({k: v for k, v in old.__dict__.items() if k in _ALL_HOOKS})


class _Substitute:
    """Pre- and post-hook pair on the module that uses a base tensor (see substitute())."""

    def __init__(self, rel: str, name: str, owner: nn.Module, switch: Switch, transposed: bool = False,
                 rows: tuple | None = None):
        self.rel, self.name, self.owner, self.switch = rel, name, owner, switch
        self.transposed, self.rows = transposed, rows   # rows: a slice, the delta fills these output features

    def pre(self, module, args):
        if not self.switch.on or self.owner.merged:
            return None
        holder = module.get_submodule(self.rel)
        w = holder._parameters[self.name]
        if isinstance(w, nn.Parameter):  # the first adapter here keeps the parameter to put back
            holder.__dict__.setdefault("_peftsurgery_weights", {})[self.name] = w
        d = self.owner.delta().to(w.dtype)
        if self.rows:
            d = torch.nn.functional.pad(d, (0, 0, self.rows[0], w.shape[-1 if self.transposed else -2] - self.rows[1]))
        holder._parameters[self.name] = w + (d.transpose(-1, -2) if self.transposed else d)
        return args  # acted (see Change.watch)

    def post(self, module, args, out):
        holder = module.get_submodule(self.rel)
        original = holder.__dict__.get("_peftsurgery_weights", {}).pop(self.name, None)
        if original is not None:
            holder._parameters[self.name] = original


def substitute(model: nn.Module, site: Site, owner: nn.Module, switch: Switch, transposed: bool = False):
    """For a base tensor used inside a module (a norm's weight, a bias, a bare weight such as
    nn.MultiheadAttention's in_proj_weight or stacked expert weights; site.path, or site.fused for a slice, names
    the parameter, site.runner the module whose forward uses it): while that module runs, the parameter reads
    tensor + owner.delta() (transposed on its last two dims if asked; for a slice, into its rows only), and is put
    back afterwards (also on error). The parameter keeps its name and object, the base tensor itself is never
    written, and several adapters add up. `owner` is a built module with .delta() and .merged (no delta while
    merged). Yields the two Hooked changes."""
    holder, _, name = (site.fused or site.path).rpartition(".")
    runner = _common(holder, holder if site.runner is None else site.runner)
    sub = _Substitute(holder[len(runner):].lstrip("."), name, owner, switch, transposed, site.rows)
    yield Hooked(model, runner, sub.pre, pre=True)
    yield Hooked(model, runner, sub.post, always_call=True, acts=False)


def substituted(model: nn.Module, path: str) -> list:
    """The tensors of the module at `path` that an unmerged substitute() of an adapter changes while it runs, as
    (name, rows or None): merging something that scales that module's output must take them into account."""
    out, parts = [], path.split(".") if path else []
    for i in range(len(parts) + 1):
        runner = ".".join(parts[:i])
        for h in model.get_submodule(runner)._forward_pre_hooks.values():
            sub = getattr(h, "__self__", None)
            if isinstance(sub, _Substitute) and not sub.owner.merged and \
                    ".".join(p for p in (runner, sub.rel) if p) == path:
                out.append((sub.name, sub.rows))
    return out


def _common(a: str, b: str) -> str:
    """The deepest module path that is `a` or an ancestor of it, and `b` or an ancestor of it."""
    parts = []
    for x, y in zip(a.split(".") if a else [], b.split(".") if b else []):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


class Swapped(Change):
    """The module at `path` was replaced; undo() puts `restore(module now there)` in its place, with its hooks."""

    def __init__(self, path: str, restore):
        self.path, self.restore = path, restore

    def watch(self, model):
        ran = []
        handle = model.get_submodule(self.path).register_forward_hook(lambda *a: ran.append(True))
        return lambda: (handle.remove(), None if ran else "the module put there never ran")[1]

    def undo(self, model):
        parent_path, _, name = self.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        now = getattr(parent, name)
        back = self.restore(now)
        carry_hooks(now, back)
        setattr(parent, name, back)


class Rule:
    """A rewrite rule. Subclasses set `kinds` (site kinds they apply to) and `phase` (quantize 0, branches 1,
    inputs 2), and implement build() and attach(). Nothing is changed on the model before attach()."""
    kinds: tuple[str, ...] = ("linear",)
    phase = 1
    mergeable = False
    additive = False   # merging only adds to the base tensors: it commutes with other additive merges

    def __init__(self, targets: str):
        self.targets = targets

    def select(self, sitemap: SiteMap) -> list[Site]:
        return sitemap.select(self.targets, self.kinds)

    def check(self, model: nn.Module, sites: list[Site]) -> None:
        """Raise SurgeryError when the rule cannot act on these sites of this model (called before any change)."""

    def build(self, model: nn.Module, sites: list[Site], sitemap: SiteMap) -> dict[str, nn.Module]:
        """Trainable modules, keyed by site path (or any key); their parameters are the adapter's."""
        return {}

    def attach(self, model: nn.Module, sites: list[Site], built: dict[str, nn.Module], switch: Switch,
               sitemap: SiteMap):
        """Make the changes on the model, yielding one Change for each as soon as it is made (so that a failure
        half-way can be undone)."""
        raise NotImplementedError

    def check_merge(self, model: nn.Module, sites: list[Site], built: dict[str, nn.Module]) -> None:
        """Raise SurgeryError when merge() could not fold every site (called before any site is merged)."""
        if not self.mergeable:
            raise SurgeryError(f"{type(self).__name__} cannot be merged into the base weights; keep it attached")

    def merge(self, model: nn.Module, sites: list[Site], built: dict[str, nn.Module], sign: float) -> None:
        raise SurgeryError(f"{type(self).__name__} cannot be merged into the base weights; keep it attached")

    def route(self, model: nn.Module, entries: list, rows, cache: dict) -> list[Change]:
        """Give each batch row its own adapter (see surgery.route). entries: (slot, sites, built) for every
        routed adapter using this rule class; rows: (batch,) slot per row, cache["slots"] (the slot count; a slot
        may be free) meaning the base. Returns the changes to undo afterwards. A rule that changes the base for
        every row (quantization) returns []."""
        raise SurgeryError(f"{type(self).__name__} cannot give each batch row its own adapter; "
                           "route() works with low-rank, prompt and prefix adapters")

    def state(self, built: dict[str, nn.Module]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(tensors to save, {key: {name: tensor}}, and rule-level settings needed to load them back). The
        tensors are views of the built parameters, so load_state() can write through them."""
        return {k: dict(m.state_dict(keep_vars=True)) for k, m in built.items()}, {}

    def loading(self, settings: dict) -> "Rule":
        """The rule to build when loading a state saved with these settings (default: this rule)."""
        return self

    def describe(self, site: Site, built: nn.Module | None) -> str:
        return type(self).__name__


def hooks_before(module: nn.Module, owner: nn.Module) -> list:
    """The forward hooks that run on `module`'s output before the one running `owner` (a built module): merging
    `owner` into the weights moves its effect in front of them, which is exact only if they commute with it."""
    out = []
    for h in module._forward_hooks.values():
        if getattr(h, "owner", None) is owner:
            return out
        out.append(h)
    return []


def park(module: nn.Module, owner: nn.Module, pre: bool = False) -> None:
    """For a mergeable rule: once `owner` (a built module with .merged and .parked) is merged into `module`'s
    weights, the output hooks (pre=True: forward pre-hooks) that run it (those whose .owner it is) come off
    `module`, so a merged model takes torch's hook-free call path like the base; on unmerge they go back in their
    original places."""
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    if owner.merged:
        owner.parked = {k: h for k, h in hooks.items() if getattr(h, "owner", None) is owner}
        for k in owner.parked:
            del hooks[k]
    else:
        hooks.update(owner.parked)
        owner.parked = {}
        for k in sorted(hooks):
            hooks.move_to_end(k)
