"""Intercepting an attention call at a site, to change its keys, values and mask.

Two ways, chosen per site:
- a module whose modelling code dispatches through transformers' attention-function registry:
  a wrapper implementation is registered under a new name and the module's config is pointed to it; the wrapper
  calls the original implementation. A mask function is registered under the same name (without one the
  padding mask would silently arrive as None).
- any other module calling F.scaled_dot_product_attention: a torch-function mode active only while the module
  runs rewrites that call.
Each intercepted module keeps a list of editors: edit(module, q, k, v, mask, kwargs) -> (k, v, mask, kwargs).
"""
from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import SurgeryError
from .base import Change, Hooked, Watcher

PREFIX = "peftsurgery+"


def _editors(module) -> list:
    eds = module.__dict__.get("_peftsurgery_editors")
    if eds is None:
        eds = []
        object.__setattr__(module, "_peftsurgery_editors", eds)
    return eds


def _apply(module, q, k, v, mask, kwargs):
    for ed in list(_editors(module)):
        k, v, mask, kwargs = ed(module, q, k, v, mask, kwargs)
    return k, v, mask, kwargs


def _registry_wrapper(original: str):
    def wrapped(module, query, key, value, attention_mask, **kwargs):
        key, value, attention_mask, kwargs = _apply(module, query, key, value, attention_mask, kwargs)
        return _original_fn(module, original)(module, query, key, value, attention_mask, **kwargs)
    return wrapped


def _original_fn(module, original: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    # "eager" is each modeling file's own function, the default its modules pass to the registry
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise SurgeryError(f"{type(module).__name__} uses attention '{original}' that cannot be wrapped; "
                           "load the model with attn_implementation='sdpa'")
    return fn


def _register(original: str) -> str:
    """Register the wrapper of attention implementation `original` (and its mask function) under a new name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    name = PREFIX + original
    AttentionInterface.register(name, _registry_wrapper(original))
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original)
    if mask_fn is not None:
        AttentionMaskInterface.register(name, mask_fn)
    return name


class _SDPAMode(TorchFunctionMode):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.pop("attn_mask", None)
            extra = {"is_causal": kwargs.pop("is_causal", args[5] if len(args) > 5 else False)}
            k, v, mask, extra = _apply(self.module, q, k, v, mask, extra)
            return func(q, k, v, attn_mask=mask, is_causal=extra["is_causal"], **kwargs)
        return func(*args, **kwargs)


class _ModeHooks:
    """Enter a torch-function mode rewriting F.scaled_dot_product_attention while the module runs."""

    def __init__(self):
        self.modes = []

    def pre(self, module, args):
        m = _SDPAMode(module)
        m.__enter__()
        self.modes.append(m)

    def post(self, module, args, out):
        if self.modes:
            self.modes.pop().__exit__(None, None, None)


def _dispatches(module: nn.Module) -> bool:
    """Whether the module's modelling code calls attention through transformers' registry (a config naming an
    implementation is not enough: Falcon's checks the name itself and falls back to its own attention)."""
    return "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules.get(type(module).__module__, object()))


class Intercepted(Change):
    """`editor` sees every attention call of the module at `path` (impl: what locate saw, "sdpa", "eager", ...)."""

    def __init__(self, model: nn.Module, path: str, editor, impl: str):
        module = model.get_submodule(path)
        cfg = getattr(module, "config", None)
        self.path, self.editor, self.original, self.hooks = path, editor, None, []
        if cfg is not None and hasattr(cfg, "_attn_implementation") and _dispatches(module):
            current = cfg._attn_implementation or "eager"
            self.original = current[len(PREFIX):] if current.startswith(PREFIX) else current
            if not current.startswith(PREFIX):
                cfg._attn_implementation = _register(self.original)
        elif impl == "sdpa":
            mode = _ModeHooks()
            self.hooks = [Hooked(model, path, mode.pre, pre=True), Hooked(model, path, mode.post, always_call=True)]
        else:
            raise SurgeryError(f"cannot add keys/values at {path}: its attention ({impl}) is neither "
                               "F.scaled_dot_product_attention nor transformers' attention interface")
        _editors(module).append(editor)

    def undo(self, model):
        module = model.get_submodule(self.path)
        eds = _editors(module)
        eds[:] = [e for e in eds if e is not self.editor]
        for h in self.hooks:
            h.undo(model)
        if self.original is not None:  # the config goes back once no module using it has editors left
            cfg = module.config
            if not any(getattr(m, "config", None) is cfg and m.__dict__.get("_peftsurgery_editors")
                       for m in model.modules()):
                cfg._attn_implementation = self.original

    def watch(self, model):
        eds = _editors(model.get_submodule(self.path))
        i = next((i for i, e in enumerate(eds) if e is self.editor), None)
        if i is None:
            return None
        eds[i] = w = Watcher(self.editor)
        return lambda: (eds.__setitem__(eds.index(w), self.editor), w.verdict(
            "no attention call of the module reached it: it computes attention in a way that cannot be intercepted "
            "(neither transformers' attention interface nor F.scaled_dot_product_attention)", "it declined"))[1]

    def __setstate__(self, state):  # a model unpickled in a new process needs the wrapper registered again
        self.__dict__.update(state)
        if self.original is not None:
            _register(self.original)


# the last call's (weak reference to the source mask or None, key, extended mask): every layer of a forward asks
# alike. An entry dies with its source mask; a causal mask (no source) is kept only up to _KEEP elements.
_last_mask: list = [None]
_KEEP = 1 << 24


def _forget(ref) -> None:
    last = _last_mask[0]
    if last is not None and last[0] is ref:
        _last_mask[0] = None


def extend_mask(mask, q, k_len_new: int, n: int, causal: bool):
    """Prepend n always-visible key positions to an attention mask (bool, additive float, or None). The result
    is reused while the same mask (same tensor, unchanged) or the same causal shape comes back."""
    if mask is None:
        if not causal or q.shape[-2] == 1:
            return None
        key = (q.shape[-2], k_len_new, q.device)
    else:
        key = (mask._version, n)
    last = _last_mask[0]  # one read: other threads may replace it meanwhile
    if last is not None and last[1] == key and (last[0] is None if mask is None else last[0]() is mask):
        return last[2]
    if mask is None:  # causal over the real keys; the n prefix keys precede them all, so visible to every query
        out = torch.ones(q.shape[-2], k_len_new, dtype=torch.bool, device=q.device).tril(k_len_new - q.shape[-2])
        out = out[None, None]
    else:
        pad_shape = (*mask.shape[:-1], n)
        if mask.dtype == torch.bool:
            pad = torch.ones(pad_shape, dtype=torch.bool, device=mask.device)
        else:
            pad = torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device)
        out = torch.cat([pad, mask], -1)
    if mask is not None:
        _last_mask[0] = (weakref.ref(mask, _forget), key, out)
    elif out.numel() <= _KEEP:
        _last_mask[0] = (None, key, out)
    return out
