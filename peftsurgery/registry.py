"""Discovering methods: every plugin, built-in or third-party, comes from the "peftsurgery" entry-point group.
A plugin that cannot be imported or breaks the hook contract is left out and remembered as broken, with a
one-line reason: the other methods keep working, and using the broken one raises that reason."""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import typing
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .checks import one_line, positive
from .errors import SurgeryError

GROUP = "peftsurgery"
REQUIRED = ("peftsurgery_config", "peftsurgery_rules", "peftsurgery_budget")
HOOKS = sorted(n for n in vars(hookspecs) if n.startswith("peftsurgery_"))
_pm: pluggy.PluginManager | None = None
_broken: dict[str, str] = {}


def manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        _broken.clear()
        for ep in entry_points(group=GROUP):
            if pm.get_plugin(ep.name) is None and ep.name not in _broken:
                problem = _register(pm, ep)
                if problem:
                    _broken[ep.name] = problem
        _pm = pm
    return _pm


def _register(pm: pluggy.PluginManager, ep) -> str | None:
    """Load and register one entry point; on failure leave it out and return why, in one line."""
    try:
        plugin = ep.load()
    except Exception as e:
        return f"plugin {ep.name!r}: cannot import {ep.value} ({one_line(e)}); fix or uninstall it"
    try:
        pm.register(plugin, name=ep.name)
        problem = _problem(pm, ep.name, plugin)
    except (pluggy.PluginValidationError, ValueError) as e:  # a hook's arguments differ from its spec
        problem = f"plugin {ep.name!r}: {one_line(e)}; fix the plugin"
    if problem and pm.get_plugin(ep.name) is plugin:
        pm.unregister(name=ep.name)
    return problem


def _problem(pm: pluggy.PluginManager, name: str, plugin) -> str | None:
    """Why a registered plugin breaks the hook contract (a hook that is no peftsurgery hook, a required one
    missing), or None."""
    hooks = {c.name: c for c in pm.get_hookcallers(plugin) or []}
    for hook, caller in sorted(hooks.items()):
        if caller.spec is None:
            near = difflib.get_close_matches(hook, HOOKS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f" (hooks: {', '.join(HOOKS)})"
            return f"plugin {name!r}: hook {hook!r} is not a peftsurgery hook{hint}; fix the plugin"
    missing = [h for h in REQUIRED if h not in hooks]
    if missing:
        return (f"plugin {name!r}: required hook {missing[0]!r} is missing (every method implements "
                f"{', '.join(REQUIRED)}, each marked @peftsurgery.hookimpl); fix the plugin")
    return None


def reload() -> None:
    """Forget discovered plugins (after installing one in the running process)."""
    global _pm
    _pm = None


def names() -> list[str]:
    return sorted(n for n, _ in manager().list_name_plugin())


def broken() -> dict[str, str]:
    """Installed plugins left out at discovery: name -> one-line reason."""
    manager()
    return dict(_broken)


class Method:
    """One plugin, seen through its hooks."""

    def __init__(self, name: str):
        pm = manager()
        plugin = pm.get_plugin(name)
        if plugin is None:
            raise SurgeryError(_broken.get(name) or
                               f"no method named {name!r}; installed: {', '.join(names()) or 'none'}")
        problem = _problem(pm, name, plugin)  # also plugins registered directly, not through discovery
        if problem:
            raise SurgeryError(problem)
        self.name, self.plugin = name, plugin
        others = [p for n, p in pm.list_name_plugin() if n != name]
        self._call = lambda hook, **kw: pm.subset_hook_caller(hook, remove_plugins=others)(**kw)
        self.version = _version(plugin)

    @property
    def config_class(self):
        cls = self._call("peftsurgery_config")
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise self._returned("peftsurgery_config", cls, "a dataclass (the config class itself)")
        return cls

    def describe(self) -> str:
        return self._call("peftsurgery_describe") or ""

    def config(self, values: dict | None = None):
        """A validated config from keyword values (strings from the command line are converted)."""
        cls = self.config_class
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(values or {})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SurgeryError(f"{self.name} has no option {unknown[0]!r}; options: {', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        conv = {k: _convert(k, v, hints.get(k)) for k, v in values.items()}
        try:
            return cls(**conv)
        except SurgeryError:
            raise
        except (TypeError, ValueError) as e:
            raise SurgeryError(f"{self.name}: {e}") from None

    def rules(self, config, sites) -> list:
        from .rewrite import Rule
        rules = self._call("peftsurgery_rules", config=config, sites=sites)
        if not isinstance(rules, (list, tuple)) or not all(isinstance(r, Rule) for r in rules):
            raise self._returned("peftsurgery_rules", rules, "a list of peftsurgery.rewrite.Rule instances")
        return list(rules)

    def budget(self, config, sites) -> int:
        n = self._call("peftsurgery_budget", config=config, sites=sites)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise self._returned("peftsurgery_budget", n, "an int (the number of trainable parameters it adds)")
        return int(n)

    def learning_rate(self, config) -> float:
        """The method's own default (peftsurgery_learning_rate), else 1e-3."""
        lr = self._call("peftsurgery_learning_rate", config=config)
        if lr is None:
            return 1e-3
        positive(f"plugin {self.name!r}", "what hook 'peftsurgery_learning_rate' returns", lr)
        return float(lr)

    def learning_rates(self, config) -> list[float]:
        """The rates choosing one tries, ascending: the method's own (peftsurgery_learning_rates), else its
        default times 1/3, 1 and 3."""
        rates = self._call("peftsurgery_learning_rates", config=config)
        if rates is None:
            d = self.learning_rate(config)
            return [d / 3, d, d * 3]
        if not isinstance(rates, (list, tuple)) or not rates or not all(_rate(r) for r in rates):
            raise self._returned("peftsurgery_learning_rates", rates, "a non-empty list of rates above 0")
        return sorted({float(r) for r in rates})

    def _returned(self, hook: str, value, wanted: str) -> SurgeryError:
        shown = repr(value)
        if len(shown) > 60 or "\n" in shown:
            shown = f"a {type(value).__name__}"
        return SurgeryError(f"plugin {self.name!r}: hook {hook!r} returned {shown}, not {wanted}; fix the plugin")


def _rate(r) -> bool:
    return isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r < float("inf")


def _version(plugin) -> str:
    v = getattr(plugin, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import packages_distributions, version
        top = getattr(plugin, "__name__", "").split(".")[0]
        dists = packages_distributions().get(top) or []
        return version(dists[0]) if dists else "0"
    except Exception:
        return "0"


def _convert(key: str, value, hint):
    """Convert a command-line string to the field's type; other values pass through."""
    if not isinstance(value, str) or hint in (str, None):
        return value
    base = typing.get_origin(hint) or hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if base is typing.Union or str(base) == "types.UnionType":
        if value.lower() in ("none", "null", ""):
            return None
        base = args[0] if args else str
    try:
        if base is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base in (int, float):
            return base(value)
    except ValueError:
        raise SurgeryError(f"option {key}={value!r} is not a valid {base.__name__}") from None
    return value
