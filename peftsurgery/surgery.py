"""The Python API: apply a method to a model in place, and manage what is attached."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, fields, is_dataclass

import torch
from torch import nn

from .checks import one_line
from .errors import SurgeryError
from .locate import locate
from .registry import Method
from .rewrite import Change, Rule, Switch
from .rewrite.slices import confirm
from .sites import CONTAINER, Site, SiteMap


class Container(nn.ModuleDict):
    """Holds every adapter's modules under one name. Its forward passes its input through unchanged, so a
    model whose forward runs each child in turn (nn.Sequential) still computes what it did."""

    def forward(self, *args):
        return args[0] if len(args) == 1 else args


class Record:
    """One applied rule: the sites it acts on, the modules it built (keyed by site path), the changes it made on
    the model (each undone by module path) and whether it is merged into the base weights."""

    def __init__(self, rule: Rule, sites: list[Site], built: dict[str, nn.Module]):
        self.rule, self.sites, self.built = rule, sites, built
        self.changes: list[Change] = []
        self.merged = False
        self.merged_at = 0   # when it was merged (merges on shared weights come out in reverse order)

    def attach(self, model: nn.Module, switch: Switch, sm: SiteMap) -> None:
        for change in self.rule.attach(model, self.sites, self.built, switch, sm):
            self.changes.append(change)  # kept as soon as made, so a failure half-way is undone too

    def detach(self, model: nn.Module) -> None:
        while self.changes:
            self.changes.pop().undo(model)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors keyed "site/path.param", rule-level settings): exactly what reloading needs."""
        tensors, settings = self.rule.state(self.built)
        return {f"{_key(k)}.{n}": t for k, params in tensors.items() for n, t in params.items()}, settings


@dataclass
class Attached:
    """What one named adapter put on a model: one Record per rule. The method is kept by name (with the
    version that built it), so everything attached pickles and deep-copies with the model."""
    name: str
    method: str
    method_version: str
    config: object
    records: list[Record]
    switch: Switch = field(default_factory=Switch)
    budget: int = 0


def sitemap(model: nn.Module, example_inputs=None, strict: bool = False) -> SiteMap:
    """The model's SiteMap, located once and kept on the model. strict=True refuses roles found by names."""
    sm = model.__dict__.get("_peftsurgery_sitemap")
    if sm is None or example_inputs is not None or strict:
        sm = locate(model, example_inputs, strict=strict)
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


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise SurgeryError(f"adapter name {name!r} must be a non-empty string without '.'")
    if name in adapters(model):
        raise SurgeryError(f"an adapter named {name!r} is already attached; pick another name or remove it")


def apply(model: nn.Module, plugin: str, name: str = "default", example_inputs=None, strict: bool = False,
          **config) -> nn.Module:
    """Rewrite `model` in place with method `plugin` and return it. Only the new adapter's parameters (and those
    of adapters attached before) stay trainable. Raises SurgeryError, leaving the model untouched, on any
    invalid config, a selector matching nothing, a site a rule cannot act on, or a budget mismatch.
    strict=True refuses a model whose roles could only be guessed from module names."""
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"apply needs a torch.nn.Module, got {type(model).__name__}")
    _check_name(model, name)
    method = Method(plugin)
    cfg = method.config(config)
    sm = sitemap(model, example_inputs, strict)
    rules = method.rules(cfg, sm)
    records = prepare(model, rules, sm, (method.name, cfg))
    declared = method.budget(cfg, sm)
    made = _count(records)
    if made != declared:
        raise SurgeryError(f"method {method.name} declared {declared} trainable parameters but built {made}; "
                           "its peftsurgery_budget hook is wrong")
    if made == 0:
        raise SurgeryError(f"method {method.name} builds no trainable parameters on this model with this config; "
                           "choose other targets or options")
    return attach(model, Attached(name, method.name, method.version, cfg, records, budget=made), sm)


def prepare(model: nn.Module, rules: list[Rule], sm: SiteMap, config: tuple[str, object] | None = None
            ) -> list[Record]:
    """Select every rule's sites, check every precondition, then build: nothing on the model changes. config:
    (method name, its config), to name the option whose selector matches nothing."""
    rules = sorted(rules, key=lambda r: r.phase)
    chosen = []
    name, cfg = config or ("", None)
    for r in rules:
        opt = next((f for f in fields(cfg) if getattr(cfg, f.name) == r.targets), None) if is_dataclass(cfg) else None
        try:
            chosen.append(r.select(sm))
        except SurgeryError as e:
            raise SurgeryError(f"{name} option {opt.name}={r.targets!r}: {e}" if opt else str(e)) from None
        if opt is not None and r.targets != opt.default:
            _unmatched_terms(sm, r, f"{name} option {opt.name}={r.targets!r}")
    for r, sites in zip(rules, chosen):
        r.check(model, sites)
        confirm(model, sites, sm)   # slices of fused projections hold what they say, whichever rule acts on them
    return [Record(r, sites, r.build(model, sites, sm)) for r, sites in zip(rules, chosen)]


def _unmatched_terms(sm: SiteMap, rule: Rule, what: str) -> None:
    """A selector the user gave whose other terms matched: each term matching nothing by itself is said (a typo, or
    a role this model lacks, such as experts it does not hold as moe.*), since it adds nothing."""
    for term in (t.strip() for t in str(rule.targets).split(",")):
        if term and not term.startswith("blocks:"):
            try:
                sm.select(term, rule.kinds)
            except SurgeryError as e:
                warnings.warn(f"{what}: the term {term!r} adds nothing here ({e})", SelectorWarning, stacklevel=4)


class SelectorWarning(UserWarning):
    """A term of a selector the user gave that matches nothing on this model."""


def _count(records: list[Record]) -> int:
    params = {id(p): p for r in records for m in r.built.values() for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def attach(model: nn.Module, att: Attached, sm: SiteMap) -> nn.Module:
    """Make every record's changes and prove them with one forward; if anything fails, undo all of them and
    re-raise (the model is as before)."""
    try:
        for rec in att.records:
            rec.attach(model, att.switch, sm)
        prove(model, att, sm)
    except BaseException:
        for rec in reversed(att.records):
            rec.detach(model)
        raise
    for rec in att.records:
        for c in rec.changes:
            c.settle()
    if not adapters(model):  # remember the base's trainability, given back when the last adapter goes
        object.__setattr__(model, "_peftsurgery_requires_grad",
                           {n: p.requires_grad for n, p in model.named_parameters()})
    for n, p in model.named_parameters():  # the base freezes; earlier adapters keep their own setting
        if not n.startswith(CONTAINER + "."):
            p.requires_grad_(False)
    if CONTAINER not in model._modules:
        model.add_module(CONTAINER, Container())
    box = nn.ModuleList([nn.ModuleDict({_key(k): m for k, m in r.built.items()}) for r in att.records])
    model._modules[CONTAINER][att.name] = box
    box.requires_grad_(True)
    box.train(model.training)  # new modules start in training mode; follow the model (dropout off in eval)
    adapters(model)[att.name] = att
    return model


def prove(model: nn.Module, att: Attached, sm: SiteMap) -> None:
    """One forward on the example inputs the sites were found with: every change of every record must act (a
    hook that never ran, or ran and declined, is a rule that would silently do nothing)."""
    if not sm.inputs:
        return
    dev = next((p.device for p in model.parameters()), None)
    if dev is not None and dev.type == "meta":
        warnings.warn(f"{att.method}: the model is on the meta device, where it cannot run; the forward that "
                      "proves every rule acts was skipped", stacklevel=3)
        return
    watches = [(rec, c, w) for rec in att.records for c in rec.changes if (w := c.watch(model)) is not None]
    try:
        sm.run(model)
    except SurgeryError as e:   # a hook's own refusal already says what to do
        raise SurgeryError(f"{att.method}: {e}") from e
    except Exception as e:
        raise SurgeryError(f"{att.method} broke the model's forward on its example inputs ({one_line(e)}): the "
                           "model does not run with this change (its code may need a sequence of fixed length, or "
                           "the token ids themselves where virtual tokens come as embeddings); choose other targets "
                           "or another method") from e
    finally:
        verdicts = [(rec, c, stop()) for rec, c, stop in watches]
    for rec, c, why in verdicts:
        if why:
            raise SurgeryError(f"{att.method}: rule {type(rec.rule).__name__} did not act at {c.path or '(root)'}: "
                               f"{why}; the method cannot work there, choose other targets or another method")


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Detach adapters (all, or one by name) and restore the base model as it was (a merged adapter's update
    stays in the weights)."""
    reg = adapters(model)
    atts = [_get(model, name)] if name else list(reg.values())
    for att in reversed(atts):
        for rec in reversed(att.records):
            rec.detach(model)
        del model._modules[CONTAINER][att.name]
        del reg[att.name]
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
    return any(r.merged for r in a.records)


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

    Names may repeat; low-rank, prompt and prefix adapters mix in one batch, in inference and in training (a
    row's loss reaches only its own adapter's parameters; adapters not named get no gradient at all). Each rule
    does it once per site for all adapters (low-rank branches: the adapters' factors stacked, gathered per row,
    two batched matmuls; prompts and prefixes: gathered per row, right-aligned, masked-out slots before shorter
    ones), so a batch mixing 8 adapters costs about one adapter, not 8. Adapters not named are off inside the
    block. Raises SurgeryError for an unknown name, a merged adapter, or a named adapter whose method cannot
    route per row.
    """
    names = [names] if isinstance(names, str) else list(names)
    reg = adapters(model)
    routable = lambda a: all(type(r.rule).route is not Rule.route for r in a.records)
    for n in names:
        if n is not None and n != BASE:
            a = _get(model, n)
            if not routable(a):
                rule = next(type(r.rule).__name__ for r in a.records if type(r.rule).route is Rule.route)
                raise SurgeryError(f"adapter {n!r} ({a.method}) cannot give each batch row its own adapter: its rule "
                                   f"{rule} has no per-row form; route() works with low-rank, prompt and prefix "
                                   "adapters")
    for a in reg.values():
        if _merged(a):
            raise SurgeryError(f"adapter {a.name!r} is merged into the weights; unmerge it before routing rows")
    cache = model.__dict__.setdefault("_peftsurgery_route_cache", {})
    if torch.is_grad_enabled():   # only the named adapters, so that no other adapter is touched by backward()
        slots = {n: i for i, n in enumerate(dict.fromkeys(n for n in names if n in reg))}
        count = len(slots)
    else:   # every routable adapter, each keeping its slot across calls (the rules keep stacked factors by slot)
        slots, count = _pool_slots(cache, [a.name for a in reg.values() if routable(a)])
    wanted = [reg[n] for n in slots]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = torch.tensor([slots.get(n, count) for n in names], dtype=torch.long, device=dev)
    cache["slots"] = count
    cache["call"] = {"sitemap": sitemap(model)}   # what the rules of this call share (the entry hook)
    groups: dict[type, tuple[Rule, list]] = {}
    for a in wanted:
        for rec in a.records:
            groups.setdefault(type(rec.rule), (rec.rule, []))[1].append((slots[a.name], rec.sites, rec.built))
    before = {a.name: a.switch.on for a in reg.values()}
    undo = []
    try:
        for r, entries in groups.values():
            undo += r.route(model, entries, rows, cache)
        for a in reg.values():
            a.switch.on = False
        yield model
    finally:
        cache.pop("call", None)
        for u in reversed(undo):
            u.undo(model)
        for a in reg.values():
            a.switch.on = before[a.name]


def _pool_slots(cache: dict, names: list[str]) -> tuple[dict[str, int], int]:
    """Slots for route() without gradients: an adapter keeps its slot while it exists, a new one takes a free slot,
    and the count doubles only when none is free, so adding or removing one adapter moves no other (nor the
    base, the slot after the last). Returns the slot of each name and the count."""
    held = cache.setdefault("held", [])   # slot -> adapter name, None when free
    alive = set(names)
    held[:] = [n if n in alive else None for n in held]
    free = [i for i, n in enumerate(held) if n is None][::-1]
    placed = set(held)
    for n in (n for n in names if n not in placed):   # in registration order: the same slots in every run
        if not free:   # double (at least 4 slots), the new slots taken lowest first
            start = len(held)
            held += [None] * max(4, start)
            free = list(range(len(held) - 1, start - 1, -1))
        held[free.pop()] = n
    return {n: i for i, n in enumerate(held) if n is not None}, len(held)


def merge(model: nn.Module, name: str | None = None, unload: bool = False) -> nn.Module:
    """Fold an adapter (by name, else every active one) into the base weights, so the model computes what it
    computed before; with unload=True also detach them, leaving a plain model. Every site of every adapter is
    checked first: a refusal leaves the model as it was."""
    targets = [_get(model, name)] if name else [a for a in adapters(model).values() if a.switch.on]
    todo, holders = [], None
    for a in targets:
        for rec in a.records:
            if rec.rule.phase == 0 or rec.merged:  # phase-0 rules (quantization) change the base itself
                continue
            try:
                rec.rule.check_merge(model, rec.sites, rec.built)
                holders = _holders(model) if holders is None else holders
                _check_untied(model, rec, holders)
            except SurgeryError as e:
                raise SurgeryError(f"adapter {a.name!r} ({a.method}) cannot be merged: {e}") from None
            todo.append(rec)
    last = max((getattr(r, "merged_at", 0) for a in adapters(model).values() for r in a.records), default=0)
    for rec in todo:
        rec.rule.merge(model, rec.sites, rec.built, +1.0)
        last += 1
        rec.merged, rec.merged_at = True, last
    if unload:
        for a in targets:
            remove(model, a.name)
    return model


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take merged adapters (by name, else all) back out of the base weights; checked first, like merge."""
    targets = [_get(model, name)] if name else list(adapters(model).values())
    todo = sorted((rec for a in targets for rec in a.records if rec.merged),
                  key=lambda r: -getattr(r, "merged_at", 0))   # the last merged comes out first
    others = [(a, rec) for a in adapters(model).values() for rec in a.records if rec.merged and rec not in todo]
    for rec in todo:
        for a, later in others:
            shared = _entangled(rec, later)
            if shared and getattr(later, "merged_at", 0) > getattr(rec, "merged_at", 0):
                raise SurgeryError(f"the weights of {shared} changed after this adapter was merged: adapter {a.name!r} "
                                   "was merged into them since and does not commute with it; unmerge that adapter "
                                   "first")
        rec.rule.check_merge(model, rec.sites, rec.built)
    for rec in todo:
        rec.rule.merge(model, rec.sites, rec.built, -1.0)
        rec.merged = False
    return model


def _entangled(a: Record, b: Record) -> str | None:
    """A module both records' merges write into, on overlapping rows, unless both only add to the weights
    (additive rules commute: any unmerge order is exact): there merges must come out in reverse order."""
    if getattr(a.rule, "additive", False) and getattr(b.rule, "additive", False):
        return None
    for m, rows in _written(a):
        for n, other in _written(b):
            if m == n and (rows is None or other is None or not (rows[1] <= other[0] or other[1] <= rows[0])):
                return m
    return None


def _holders(model: nn.Module) -> dict[int, dict[int, str]]:
    """For each parameter (by id), the modules holding it (by id) and a path of each."""
    out: dict[int, dict[int, str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for t in mod._parameters.values():
            if t is not None:
                out.setdefault(id(t), {}).setdefault(id(mod), path)
    return out


def _check_untied(model: nn.Module, rec: Record, holders: dict) -> None:
    """SurgeryError where a tensor a site's merge writes into is also held by a module other than the site's own
    and those around it (tied weights, as in Zamba's shared block, or an output head tied to the embedding):
    merging would change that module as well, and two sites' updates would add up in it."""
    for s in rec.sites:
        path = own = s.fused or s.path
        try:
            t = model.get_parameter(path)
            own = path.rpartition(".")[0]
        except AttributeError:
            t = getattr(model.get_submodule(path), "weight", None)
        # a module around the site holding the same tensor only registers it twice (BERT's prediction head bias)
        other = next((p for p in holders.get(id(t), {}).values()
                      if p != own and not own.startswith(p + ".") and p != ""), None)
        if other is not None:
            raise SurgeryError(f"the tensor its merge writes at {path} is also {other}'s (tied "
                               "weights), so merging would change that module too; keep the adapter unmerged")


def _written(rec: Record) -> list[tuple[str, tuple | None]]:
    """(module, rows or None) that each site's merge writes into (a bias or bare weight: its module's)."""
    return [(s.fused or (s.path if s.kind == "linear" else s.path.rpartition(".")[0]), s.rows) for s in rec.sites]


def _training_hooks(model: nn.Module, hook: str) -> list[tuple[Attached, Record]]:
    """(adapter, record) for every active adapter's rule that has training-time hook `hook` (see hookspecs)."""
    return [(a, rec) for a in adapters(model).values() if a.switch.on for rec in a.records
            if getattr(rec.rule, hook, None) is not None]


def extra_loss(model: nn.Module):
    """The sum of the extra loss terms of the active adapters' rules (e.g. AdaLoRA's orthogonality term), to add
    to the training loss before backward(); 0 when no rule has one."""
    total = 0
    for _, rec in _training_hooks(model, "extra_loss"):
        term = rec.rule.extra_loss(rec.sites, rec.built)
        if term is not None:
            total = total + term
    model.__dict__["_peftsurgery_loss_added"] = True
    return total


def step(model: nn.Module, step: int, total: int) -> None:
    """Run the active adapters' after-step hooks (e.g. AdaLoRA's rank allocation). Call it after each
    optimizer.step() and before optimizer.zero_grad(), with `step` the optimizer steps done so far (1..total) and
    `total` those of the whole run. A model whose rules have no such hook costs nothing. Raises SurgeryError when
    an adapter with hooks is merged, or when a rule adds a loss term and extra_loss(model) was not called since
    the previous step."""
    for name, v in (("step", step), ("total", total)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SurgeryError(f"peftsurgery.step: {name} must be a positive integer, got {v!r}")
    if step > total:
        raise SurgeryError(f"peftsurgery.step: step {step} is past total={total}; give the number of optimizer "
                           "steps of the whole run")
    added = model.__dict__.pop("_peftsurgery_loss_added", False)
    losses = _training_hooks(model, "extra_loss")
    if losses and not added:
        raise SurgeryError(f"adapter {losses[0][0].name!r} ({losses[0][0].method}) adds a loss term that was not "
                           "added: add peftsurgery.extra_loss(model) to the loss before backward() (with the HF "
                           "Trainer use peftsurgery.integrations.SurgeryTrainer)")
    hooked = _training_hooks(model, "after_step")
    merged = [a for a, rec in hooked if rec.merged]
    if merged:
        raise SurgeryError(f"adapter {merged[0].name!r} is merged into the weights; unmerge it before training")
    for _, rec in hooked:
        rec.rule.after_step(rec.sites, rec.built, step, total)


def budget(model: nn.Module) -> dict:
    """Trainable parameters per attached adapter, against the base's parameter count."""
    base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(CONTAINER + "."))
    rows = {n: a.budget for n, a in adapters(model).items()}
    return {"adapters": rows, "trainable": sum(rows.values()), "base": base}


def inspect(model: nn.Module) -> list[dict]:
    """One row per rewritten site: which adapter did what there."""
    rows = []
    for a in adapters(model).values():
        for rec in a.records:
            for s in rec.sites:
                m = rec.built.get(s.path)
                n = 0 if m is None else m.numel() if hasattr(m, "numel") else sum(p.numel() for p in m.parameters())
                rows.append({"adapter": a.name, "method": a.method, "site": s.path, "role": s.role,
                             "rule": type(rec.rule).__name__, "what": rec.rule.describe(s, m), "params": n,
                             "producer": s.producer, "consumer": s.consumer})
    return rows
