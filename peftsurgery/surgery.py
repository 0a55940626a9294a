"""The Python API: apply a method to a model in place, and manage what is attached."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SurgeryError
from .locate import locate
from .registry import Method
from .rewrite import Rule, Switch, Undo
from .sites import CONTAINER, Site, SiteMap


class Container(nn.ModuleDict):
    """Holds every adapter's modules under one name. Its forward passes its input through unchanged, so a
    model whose forward runs each child in turn (nn.Sequential) still computes what it did."""

    def forward(self, *args):
        return args[0] if len(args) == 1 else args


@dataclass
class Attached:
    """What one named adapter put on a model."""
    name: str
    method: Method
    config: object
    rules: list[Rule]
    sites: list[list[Site]]
    built: list[dict[str, nn.Module]]
    switch: Switch
    undo: list[Undo] = field(default_factory=list)
    budget: int = 0


def sitemap(model: nn.Module, example_inputs=None) -> SiteMap:
    """The model's SiteMap, located once and kept on the model."""
    sm = model.__dict__.get("_peftsurgery_sitemap")
    if sm is None or example_inputs is not None:
        sm = locate(model, example_inputs)
        object.__setattr__(model, "_peftsurgery_sitemap", sm)
    return sm


def adapters(model: nn.Module) -> dict[str, Attached]:
    reg = model.__dict__.get("_peftsurgery_adapters")
    if reg is None:
        reg = {}
        object.__setattr__(model, "_peftsurgery_adapters", reg)
    return reg


def _key(path: str) -> str:
    return path.replace(".", "/") or "/"


def apply(model: nn.Module, plugin: str, name: str = "default", example_inputs=None, **config) -> nn.Module:
    """Rewrite `model` in place with method `plugin` and return it. Only the new adapter's parameters (and those
    of adapters attached before) stay trainable. Raises SurgeryError, leaving the model untouched, on any
    invalid config, a selector matching nothing, or a budget mismatch."""
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"apply needs a torch.nn.Module, got {type(model).__name__}")
    if not name or "." in name:
        raise SurgeryError(f"adapter name {name!r} must be non-empty and have no '.'")
    if name in adapters(model):
        raise SurgeryError(f"an adapter named {name!r} is already attached; pick another name or remove it")
    method = Method(plugin)
    cfg = method.config(config)
    return attach(model, method, cfg, name, example_inputs)


def attach(model, method: Method, cfg, name: str, example_inputs=None, check_budget: bool = True):
    sm = sitemap(model, example_inputs)
    rules = sorted(method.rules(cfg, sm), key=lambda r: r.phase)
    chosen = [r.select(sm) for r in rules]            # raises before anything is built
    budget = method.budget(cfg, sm)
    built = [r.build(model, s, sm) for r, s in zip(rules, chosen)]
    box = nn.ModuleList([nn.ModuleDict({_key(k): m for k, m in b.items()}) for b in built])
    made = sum(p.numel() for p in {id(p): p for p in box.parameters()}.values())
    if check_budget and made != budget:
        raise SurgeryError(f"method {method.name} declared {budget} trainable parameters but built {made}; "
                           "its peftsurgery_budget hook is wrong")
    switch = Switch()
    att = Attached(name, method, cfg, rules, chosen, built, switch, budget=made)
    try:
        for r, s, b in zip(rules, chosen, built):
            att.undo += r.attach(model, s, b, switch, sm)
    except Exception:
        for u in reversed(att.undo):
            u.remove()
        raise
    if not adapters(model):  # remember the base's trainability, given back when the last adapter goes
        object.__setattr__(model, "_peftsurgery_requires_grad",
                           {n: p.requires_grad for n, p in model.named_parameters()})
    for n, p in model.named_parameters():  # the base freezes; earlier adapters keep their own setting
        if not n.startswith(CONTAINER + "."):
            p.requires_grad_(False)
    if CONTAINER not in model._modules:
        model.add_module(CONTAINER, Container())
    model._modules[CONTAINER][name] = box
    box.requires_grad_(True)
    box.train(model.training)  # new modules start in training mode; follow the model (dropout off in eval)
    adapters(model)[name] = att
    return model


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Detach adapters (all, or one by name) and restore the base model as it was (unless merged)."""
    reg = adapters(model)
    for n in ([name] if name else list(reg)):
        att = _get(model, n)
        for u in reversed(att.undo):
            u.remove()
        del model._modules[CONTAINER][n]
        del reg[n]
    if CONTAINER in model._modules and not len(model._modules[CONTAINER]):
        del model._modules[CONTAINER]
    if not reg:
        flags = model.__dict__.pop("_peftsurgery_requires_grad", {})
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
    return model


def _get(model, name: str) -> Attached:
    reg = adapters(model)
    if name not in reg:
        raise SurgeryError(f"no adapter named {name!r} on this model; attached: {', '.join(reg) or 'none'}")
    return reg[name]


def _merged(a: Attached) -> bool:
    """Whether any of the adapter's modules is folded into the base weights."""
    return any(r.mergeable and any(getattr(m, "merged", False) for m in b.values()) for r, b in zip(a.rules, a.built))


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside this block the model computes exactly what its base computes."""
    atts = list(adapters(model).values())
    merged = [a for a in atts if _merged(a)]
    if merged:
        raise SurgeryError(f"adapter {merged[0].name!r} is merged into the weights; unmerge it first")
    before = [a.switch.on for a in atts]
    for a in atts:
        a.switch.on = False
    try:
        yield model
    finally:
        for a, on in zip(atts, before):
            a.switch.on = on


def set_active(model: nn.Module, names: list[str] | str) -> None:
    """Only these adapters take part in forward passes."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _get(model, n)
    for n, a in adapters(model).items():
        a.switch.on = n in names


BASE = "base"


@contextlib.contextmanager
def route(model: nn.Module, names):
    """Inside this block, row i of each batch runs with adapter names[i] alone (None or "base": no adapter).

    Names may repeat. Each rule does it once per site for all adapters (low-rank branches: the adapters' factors
    stacked, gathered per row, two batched matmuls), so a batch mixing 8 adapters costs about one adapter, not 8.
    Adapters not named are off inside the block. Raises SurgeryError for an unknown name, a merged adapter, or
    a method whose rules cannot route per row (prompts and prefixes change the sequence, not a row's weights).
    """
    names = [names] if isinstance(names, str) else list(names)
    reg = adapters(model)
    for n in names:
        if n is not None and n != BASE:
            _get(model, n)
    # every adapter that can be routed gets a slot (stable across batches, so stacked factors are reused)
    routable = lambda a: all(type(r).route is not Rule.route for r in a.rules)
    wanted = [a for a in reg.values() if a.name in names or routable(a)]
    slots = {a.name: i for i, a in enumerate(wanted)}
    for a in reg.values():
        if _merged(a):
            raise SurgeryError(f"adapter {a.name!r} is merged into the weights; unmerge it before routing rows")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = torch.tensor([slots.get(n, len(slots)) for n in names], dtype=torch.long, device=dev)
    cache = model.__dict__.setdefault("_peftsurgery_route_cache", {})
    if cache.get("adapters") != tuple(slots):  # stacked factors are kept for the same adapters, in order
        cache.clear()
        cache["adapters"] = tuple(slots)
    cache["slots"] = len(slots)
    groups: dict[type, tuple[Rule, list]] = {}
    for a in wanted:
        for r, s, b in zip(a.rules, a.sites, a.built):
            groups.setdefault(type(r), (r, []))[1].append((slots[a.name], s, b))
    before = {a.name: a.switch.on for a in reg.values()}
    undo = []
    try:
        for r, entries in groups.values():
            undo += r.route(model, entries, rows, cache)
        for a in reg.values():
            a.switch.on = False
        yield model
    finally:
        for u in reversed(undo):
            u.remove()
        for a in reg.values():
            a.switch.on = before[a.name]


def merge(model: nn.Module, name: str | None = None, unload: bool = False) -> nn.Module:
    """Fold an adapter (by name, else every active one) into the base weights, so the model computes what it
    computed before; with unload=True also detach them, leaving a plain model."""
    targets = [_get(model, name)] if name else [a for a in adapters(model).values() if a.switch.on]
    for a in targets:
        bad = [type(r).__name__ for r in a.rules if not r.mergeable and r.phase != 0]
        if bad:
            raise SurgeryError(f"adapter {a.name!r} ({a.method.name}) uses {bad[0]}, which cannot be merged")
    for a in targets:
        for r, s, b in zip(a.rules, a.sites, a.built):
            if r.mergeable:
                r.merge(model, s, b, +1.0)
        if unload:
            remove(model, a.name)
    return model


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    for a in ([_get(model, name)] if name else list(adapters(model).values())):
        for r, s, b in zip(a.rules, a.sites, a.built):
            if r.mergeable:
                r.merge(model, s, b, -1.0)
    return model


def budget(model: nn.Module) -> dict:
    """Trainable parameters per attached adapter, against the base's parameter count."""
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(CONTAINER + "."))
    rows = {n: a.budget for n, a in adapters(model).items()}
    return {"adapters": rows, "trainable": sum(rows.values()), "base": base}


def inspect(model: nn.Module) -> list[dict]:
    """One row per rewritten site: which adapter did what there."""
    rows = []
    for a in adapters(model).values():
        for r, sites, b in zip(a.rules, a.sites, a.built):
            for s in sites:
                m = b.get(s.path)
                n = 0 if m is None else m.numel() if hasattr(m, "numel") else sum(p.numel() for p in m.parameters())
                rows.append({"adapter": a.name, "method": a.method.name, "site": s.path, "role": s.role,
                             "rule": type(r).__name__, "what": r.describe(s, m), "params": n,
                             "producer": s.producer, "consumer": s.consumer})
    return rows


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
