"""What every rewrite rule shares: site selection, building trainable modules, attaching them, undoing it."""
from __future__ import annotations

from torch import nn

from ..errors import SurgeryError
from ..sites import Site, SiteMap


class Switch:
    """On/off for one attached adapter; every hook of the adapter reads it."""

    def __init__(self):
        self.on = True


class Undo:
    """A removable change (a hook, a swapped module, a changed attribute)."""

    def __init__(self, fn):
        self.fn = fn

    def remove(self):
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class Rule:
    """A rewrite rule. Subclasses set `kinds` (site kinds they apply to) and `phase` (quantize 0, branches 1,
    inputs 2), and implement build() and attach(). Nothing is changed on the model before attach()."""
    kinds: tuple[str, ...] = ("linear",)
    phase = 1
    mergeable = False

    def __init__(self, targets: str):
        self.targets = targets

    def select(self, sitemap: SiteMap) -> list[Site]:
        return sitemap.select(self.targets, self.kinds)

    def build(self, model: nn.Module, sites: list[Site], sitemap: SiteMap) -> dict[str, nn.Module]:
        """Trainable modules, keyed by site path (or any key); their parameters are the adapter's."""
        return {}

    def attach(self, model: nn.Module, sites: list[Site], built: dict[str, nn.Module], switch: Switch,
               sitemap: SiteMap) -> list[Undo]:
        raise NotImplementedError

    def merge(self, model: nn.Module, sites: list[Site], built: dict[str, nn.Module], sign: float) -> None:
        raise SurgeryError(f"{type(self).__name__} cannot be merged into the base weights; keep it attached")

    def route(self, model: nn.Module, entries: list, rows, cache: dict) -> list[Undo]:
        """Give each batch row its own adapter (see surgery.route). entries: (slot, sites, built) for every
        routed adapter using this rule class; rows: (batch,) slot per row, len(slots) meaning the base. Returns
        the hooks to remove afterwards. A rule that changes the base for every row (quantization) returns []."""
        raise SurgeryError(f"{type(self).__name__} cannot give each batch row its own adapter; "
                           "route() works with low-rank adapters only")

    def export(self, built: dict[str, nn.Module]) -> tuple[dict, dict]:
        """(tensors to save keyed like built's state, config overrides for loading them back)."""
        return {k: {n: t for n, t in m.state_dict().items()} for k, m in built.items()}, {}

    def describe(self, site: Site, built: nn.Module | None) -> str:
        return type(self).__name__


def hook_output(module: nn.Module, fn) -> Undo:
    return Undo(module.register_forward_hook(fn).remove)


def park(module: nn.Module, owner: nn.Module) -> None:
    """For a mergeable rule: once `owner` (a built module with .merged and .parked) is merged into `module`'s
    weights, the output hooks that run it (those whose .owner it is) come off `module`, so a merged model takes
    torch's hook-free call path like the base; on unmerge they go back in their original places."""
    hooks = module._forward_hooks
    if owner.merged:
        owner.parked = {k: h for k, h in hooks.items() if getattr(h, "owner", None) is owner}
        for k in owner.parked:
            del hooks[k]
    else:
        hooks.update(owner.parked)
        owner.parked = {}
        for k in sorted(hooks):  # hook ids grow with registration: their order is the original one
            hooks.move_to_end(k)


def reference(site: Site, model: nn.Module) -> nn.Module:
    try:
        return model.get_submodule(site.path)
    except AttributeError:
        raise SurgeryError(f"site {site.path} is not in this model; locate it again") from None
