"""Intercepting an attention call at a site, to change its keys, values and mask.

Two ways, chosen per site:
- a module whose modelling code dispatches through transformers' attention-function registry:
  a wrapper implementation is registered under a new name and the module's config is pointed to it; the wrapper
  calls the original implementation. A mask function is registered under the same name (without one the
  padding mask would silently arrive as None).
- any other module: a torch-function mode, active only while the module runs (and one of its editors is on),
  rewrites its F.scaled_dot_product_attention call (F.multi_head_attention_forward runs its body under the mode,
  which reaches the call inside it), or, for attention written as products and a softmax in the module's own
  code, rewrites the score and value products, found by data flow at run time (see _Mode).
Each intercepted module keeps a list of editors: edit(module, q, k, v, mask, kwargs) -> (k, v, mask, kwargs), with
q, k, v laid out (batch, heads, seq, head_dim). Editors that add keys and values put them first; one that does only
that may also have apart() -> (keys, values, visible): (kv_heads, n, head_dim) or (batch, kv_heads, n, head_dim) and
which of the n each row sees ((batch, n) bool, or None), or None when it adds none in this call: in a decoding step
they are then attended apart from the call's own keys and merged by log-sum-exp instead of being put in front of the
cache (_apart).
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import SurgeryError
from .base import Change, Watcher

PREFIX = "peftsurgery+"
NO_MASK = "peftsurgery_no_mask"   # in an editor's kwargs: the mask it returns is not used (see _Mode)


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
        added = _apart(module, query, key, value, kwargs) if original == "sdpa" else None
        if added is not None:   # decoding: the cache's keys attended as they are, the editors' merged in after
            scaling = kwargs.get("scaling")
            out, lse = _own(lambda: _original_fn(module, original)(module, query, key, value, attention_mask,
                                                                   **kwargs)[0], query, key, value, attention_mask,
                            scaling)
            return _merged(out, lse, query, scaling, *added), None
        key, value, attention_mask, kwargs = _apply(module, query, key, value, attention_mask, kwargs)
        return _original_fn(module, original)(module, query, key, value, attention_mask, **kwargs)
    return wrapped


# what a decoding step's attention call may carry for the editors' keys to be attended apart (nothing that changes
# the scores: no position bias, soft-capping or sink logits)
_APART_KWARGS = {"dropout", "scaling", "position_ids", "use_cache", "sliding_window", "is_causal", "cache_position",
                 "output_router_logits"}


def repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys or values (..., kv_heads, n, dim) repeated to `heads` heads, as grouped-query attention has them by
    the time they reach the attention call."""
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], -3)


def _apart(module, query, key, value, kwargs):
    """In a decoding step (one query per row, no gradients) where every active editor only adds keys and values
    (has `apart`): those keys and values ((kv_heads, n, dim) each when one editor's are seen by every row, else
    (batch, heads, n, dim)), and which of the n each row sees ((batch, n) bool, or None for all), to attend apart
    from the call's own keys and merge by log-sum-exp, so that the cache is not copied to put them in front;
    otherwise None."""
    if (query.shape[-2] != 1 or torch.is_grad_enabled() or query.shape[0] != key.shape[0]
            or set(kwargs) - _APART_KWARGS or (kwargs.get("dropout") and module.training)):
        return None
    eds = [ed for ed in _editors(module) if getattr(ed, "on", True)]
    if not eds or not all(hasattr(ed, "apart") for ed in eds):
        return None
    B, H = key.shape[:2]
    parts = [ed.apart() for ed in eds]   # k, v: (kv_heads, n, dim), or (batch, kv_heads, n, dim); None: not now
    if any(p is None for p in parts):
        return None
    for k, v, _ in parts:
        if (v.shape[-1] != value.shape[-1] or H % k.shape[-3] or query.shape[1] % H
                or k.dim() == 4 and k.shape[0] != B):   # the editor's own call says what is wrong
            return None
    if len(parts) == 1:
        k, v, visible = parts[0]
        return k.to(key.dtype), v.to(value.dtype), visible
    ks = [repeat_heads(k, H).expand(B, H, *k.shape[-2:]) for k, _, _ in parts]
    vs = [repeat_heads(v, H).expand(B, H, *v.shape[-2:]) for _, v, _ in parts]
    if all(x is None for _, _, x in parts):
        visible = None
    else:
        visible = torch.cat([torch.ones(B, k.shape[-2], dtype=torch.bool, device=k.device) if x is None else x
                             for k, (_, _, x) in zip(ks, parts)], -1)
    return torch.cat(ks, -2).to(key.dtype), torch.cat(vs, -2).to(value.dtype), visible


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _own(original, query, key, value, mask, scaling):
    """A decoding step's attention over the call's own keys, (batch, 1, heads, dv), and the log-sum-exp of its
    scores, (batch, heads, 1). On the CPU one kernel gives both (the flash attention the CPU's sdpa runs), with the
    grouped key heads read as they are; elsewhere `original()` gives the attention and the scores are computed
    again for their log-sum-exp (the keys read, not copied)."""
    b, h, q, d = query.shape
    kvh, L = key.shape[1], key.shape[-2]
    m = None if mask is None else mask[..., :L]
    if (_FLASH_CPU is not None and query.device.type == "cpu" and d == value.shape[-1]
            and query.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        if m is not None:   # masked out: the dtype's lowest, not -inf, which would give a row with every key masked
            low = torch.finfo(query.dtype).min   # a log-sum-exp of 0 instead of one far below the added keys'
            m = (torch.zeros(m.shape, dtype=query.dtype, device=m.device).masked_fill_(~m, low)
                 if m.dtype == torch.bool else m.to(query.dtype).clamp(min=low))
        out, lse = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=m, scale=scaling)
        return out.transpose(1, 2), lse
    scale = d ** -0.5 if scaling is None else scaling
    qg = query.reshape(b, kvh, h // kvh * q, d)   # query heads grouped by the key head they share
    s = torch.matmul(qg, key.transpose(-1, -2)).float().mul_(scale).view(b, h, q, L)
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    return original(), torch.logsumexp(s, -1)


def _merged(out, lse, query, scaling, k, v, visible):
    """`out` (batch, 1, heads, dv), the attention over the call's own keys, and `lse` (batch, heads, 1), the
    log-sum-exp of their scores, merged with the attention over the added keys k and values v ((kv_heads, n, ...)
    seen by every row, or (batch, kv_heads, n, ...)), of which each row sees `visible` ((batch, n), None: all):
    each part weighted by its share of the softmax's normaliser. The same as attending over both at once, up to
    float rounding."""
    b, h, q, d = query.shape
    kvh, n = k.shape[-3], k.shape[-2]
    scale = d ** -0.5 if scaling is None else scaling
    qg = query.reshape(b, kvh, h // kvh * q, d)   # query heads grouped by the key head they share
    shared = k.dim() == 3   # every row's keys the same: the rows folded into one product, the keys not copied

    def product(x, y):   # (b, kvh, g, ...) @ y, y shared by the rows or per row
        if not shared:
            return torch.matmul(x, y)
        x = x.transpose(0, 1).reshape(kvh, -1, x.shape[-1])
        return torch.matmul(x, y).view(kvh, b, -1, y.shape[-1]).transpose(0, 1)

    sp = product(qg, k.transpose(-1, -2)).float().mul_(scale)   # (b, kvh, g * q, n)
    if visible is not None:
        sp = sp.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse_p = torch.logsumexp(sp, -1, keepdim=True)
    probs = (sp - lse_p).exp_()   # the softmax, from its log-sum-exp
    if visible is not None:
        probs = probs.nan_to_num_(0.0)   # a row that sees none of the added keys: all zero
    lse_p = lse_p.reshape(b, h, q)
    out_p = product(probs.to(v.dtype), v).reshape(b, h, q, -1).transpose(1, 2).to(out.dtype)
    lse = lse.reshape(b, h, q)
    share = torch.sigmoid(lse_p - lse).transpose(1, 2).unsqueeze(-1).to(out.dtype)   # the added keys' share
    merged = torch.lerp(out, out_p, share)
    # a row whose own keys are all masked out attends to the added keys alone (its own output may be NaN)
    return torch.where(torch.isneginf(lse).transpose(1, 2).unsqueeze(-1), out_p, merged)


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


# Attention written in a module's own code: the score product (matmul, bmm, baddbmm, einsum) reaches a softmax over
# its last dim (the keys) through calls that keep that dim the keys; the softmax's output reaches the value
# product the same way. Editing there means: the score product again with the edited keys, those calls again on
# the wider scores, and the value product with the edited values. A tensor those calls combine with the scores
# over the keys (a mask, an ALiBi or relative-position bias, a causal mask buffer's slice) gets, in the new key
# columns, the value that leaves a score as it is: 0 added, 1 multiplied, not filled, -inf under an elementwise max,
# the scores picked by where.
_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
             torch.Tensor.baddbmm, torch.einsum}
_NEUTRAL = {**dict.fromkeys(("add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__",
                             "__isub__"), 0),
            **dict.fromkeys(("mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
                             "__itruediv__", "true_divide"), 1),
            **dict.fromkeys(("masked_fill", "masked_fill_"), False),
            **dict.fromkeys(("max", "maximum"), float("-inf")), **dict.fromkeys(("min", "minimum"), float("inf"))}
_ADDS = {name for name, fill in _NEUTRAL.items() if type(fill) is int and fill == 0}
_ALONE = {"view", "reshape", "contiguous", "to", "float", "half", "bfloat16", "double", "type", "type_as", "clone",
          "dropout", "tanh", "neg", "clamp", "softmax"}  # other tensors they take are not combined with the scores
_KEEPS = set(_NEUTRAL) | _ALONE | {"where"}


class _Node:
    """A call on the way from a product to a value product: kind "product", "softmax" or "op"; parents: (where in
    the call the tracked input sits, the node that made it)."""
    __slots__ = ("func", "args", "kwargs", "kind", "parents")

    def __init__(self, func, args, kwargs, kind, parents):
        self.func, self.args, self.kwargs, self.kind, self.parents = func, args, kwargs, kind, parents


def _tensors(args, kwargs):
    yield from ((i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    yield from ((k, a) for k, a in kwargs.items() if isinstance(a, torch.Tensor))


def _ways(node: _Node, kind: str) -> list:
    """Every chain of calls from a node of `kind` to `node`: lists of (node, where the tracked input sits)."""
    if node.kind == kind:
        return [[(node, None)]]
    return [way + [(node, at)] for at, parent in node.parents for way in _ways(parent, kind)]


def _product(func, args, kwargs):
    """(left, right, bias, rebuild(left, right, bias), einsum subscripts (left, right, out) or None)."""
    if func is torch.einsum:
        eq, ops = args[0].replace(" ", ""), args[1:]
        ops = ops[0] if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
        if len(ops) != 2 or "->" not in eq or "." in eq:
            return None
        ins, out = eq.split("->")
        return ops[0], ops[1], None, lambda a, b, _: torch.einsum(eq, a, b), (*ins.split(","), out)
    if func in (torch.baddbmm, torch.Tensor.baddbmm):
        p = {**dict(zip(("input", "batch1", "batch2"), args)), **kwargs}
        scale = {k: p[k] for k in ("beta", "alpha") if k in p}
        return p["batch1"], p["batch2"], p["input"], lambda a, b, c: torch.baddbmm(c, a, b, **scale), None
    right = args[1] if len(args) > 1 else next(iter(kwargs.values()), None)
    return args[0], right, None, lambda a, b, _: func(a, b), None


class _Unsupported(Exception):
    pass


def _layout(t: torch.Tensor | None, letters: str | None, seq, feat, batch: str = "") -> list[int]:
    """The permutation of t giving (batch..., seq, feat): einsum letters (batch letters in `batch`'s order), or
    matmul dims (seq, feat as negative dims, the batch dims leading)."""
    if letters is None:
        n = t.dim()
        return list(range(n - 2)) + [n + seq, n + feat]
    rest = [c for c in batch if c in letters and c not in (seq, feat)]
    if len(rest) + 2 != len(letters):
        raise _Unsupported(f"einsum operand {letters} has letters the output does not keep")
    return [letters.index(c) for c in rest + [seq, feat]]


def _to_heads(t: torch.Tensor, perm: list[int], heads: int | None) -> torch.Tensor:
    """(batch, heads, seq, features) from t permuted by perm; one leading dim is batch * heads."""
    t = t.permute(perm)
    if t.dim() == 3 and heads and t.shape[0] % heads == 0:
        return t.unflatten(0, (-1, heads))
    if t.dim() != 4:
        raise _Unsupported(f"a {t.dim()}-d operand, not (batch, heads, seq, features) or (batch*heads, seq, features)")
    return t


def _from_heads(t: torch.Tensor, perm: list[int]) -> torch.Tensor:
    if len(perm) == 3:
        t = t.flatten(0, 1)
    return t.permute([perm.index(i) for i in range(len(perm))])


def _prepend(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    if not n:
        return t
    return torch.cat([torch.full((*t.shape[:-1], n), fill, dtype=t.dtype, device=t.device), t], -1)


def _replay(node: _Node, at, x: torch.Tensor, n: int, added: int, added_to=lambda t, key: None) -> torch.Tensor:
    """node's call again with x (the scores, or probabilities, over added + n keys) where its tracked input sat;
    added_to(t, where in the call) sees each tensor added to them over the keys."""
    args, kwargs = list(node.args), dict(node.kwargs)
    name = node.func.__name__
    if isinstance(at, int):
        args[at] = x
    else:
        kwargs[at] = x
    if name in ("view", "reshape") and len(args) > 1:
        shape = list(args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:])
        if shape and shape[-1] == n:
            shape[-1] = n + added
        args = [args[0], shape]
    elif name not in _ALONE:
        for loc, t in list(_tensors(args, kwargs)):
            if loc == at or t.dim() == 0 or t.shape[-1] != n:
                continue
            if name == "where":  # torch.where(cond, a, b) or a.where(cond, b): the scores keep where they are picked
                cond = 0 if node.func is torch.where else 1
                fill = (at == (1 if cond == 0 else 0)) if loc == cond else 0
            else:
                fill = _NEUTRAL[name]
                if name in _ADDS:
                    added_to(t, loc)
            t = _prepend(t, added, fill)
            if isinstance(loc, int):
                args[loc] = t
            else:
                kwargs[loc] = t
    # in-place calls replayed out of place: a write autograd would reject here (SEW-D's softmax writes its output in
    # place inside an autograd Function, which the replay, outside it, is not)
    return (_OUT_OF_PLACE[name] if name in _OUT_OF_PLACE else node.func)(*args, **kwargs)


_OUT_OF_PLACE = {n: getattr(torch.Tensor, n[:-1]) for n in dir(torch.Tensor)
                 if n.endswith("_") and not n.endswith("__") and hasattr(torch.Tensor, n[:-1])}


_MHA: list = []


def _mha_body(*args, **kwargs):
    """F.multi_head_attention_forward hands itself whole to a torch-function mode, which would hide the attention
    call inside it: this copy runs its body (no hand-off) under the mode."""
    if not _MHA:
        fn = F.multi_head_attention_forward
        body = types.FunctionType(fn.__code__, dict(fn.__globals__, has_torch_function=lambda *a: False),
                                  fn.__name__, fn.__defaults__, fn.__closure__)
        body.__kwdefaults__ = fn.__kwdefaults__
        _MHA.append(body)
    return _MHA[0](*args, **kwargs)


class _Mode(TorchFunctionMode):
    """Active while one call of `module` runs. It rewrites F.scaled_dot_product_attention calls, and for attention
    in the module's own code it tracks the tensors that products make, through the calls that keep their last dim
    (the keys), so that at the value product it knows the score product and every call between them."""

    def __init__(self, module, owner: _ModeForward):
        super().__init__()
        self.module, self.heads, self.path, self.owner = module, owner.heads, owner.path, owner
        self.tracked: dict[int, tuple] = {}   # id(tensor) (while traced: order of tracking) -> (tensor, node)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.pop("attn_mask", None)
            extra = {"is_causal": kwargs.pop("is_causal", args[5] if len(args) > 5 else False)}
            plain = not (extra["is_causal"] or len(args) > 4 or set(kwargs) - {"scale", "dropout_p"}
                         or kwargs.get("dropout_p"))
            added = _apart(self.module, q, k, v, {"scaling": kwargs.get("scale")}) if plain else None
            if added is not None:   # decoding (see _registry_wrapper); this call's layout is (batch, heads, seq, dim)
                scale = kwargs.get("scale")
                out, lse = _own(lambda: func(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2), q, k, v, mask,
                                scale)
                return _merged(out, lse, q, scale, *added).transpose(1, 2)
            k, v, mask, extra = _apply(self.module, q, k, v, mask, extra)
            return func(q, k, v, attn_mask=mask, is_causal=extra["is_causal"], **kwargs)
        if func is F.multi_head_attention_forward:
            with self:
                return _mha_body(*args, **kwargs)
        if func in _PRODUCTS:
            out = self._value_product(func, args, kwargs) if self.tracked else None
            out = func(*args, **kwargs) if out is None else out
            if isinstance(out, torch.Tensor):
                self.track(out, _Node(func, args, kwargs, "product", []))
            return out
        if func is torch.Tensor.unflatten:   # its Python method calls super(), which torch.compile cannot follow
            func = torch.unflatten
        out = func(*args, **kwargs)
        if self.tracked and isinstance(out, torch.Tensor) and out.dim():
            name = getattr(func, "__name__", "")
            if name in _KEEPS:
                parents = [(at, self.node(t)) for at, t in _tensors(args, kwargs)
                           if self.node(t) is not None and t.dim() and t.shape[-1] == out.shape[-1]]
                if name == "softmax":
                    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                    parents = parents if dim in (-1, out.dim() - 1) else []
                if parents:
                    self.track(out, _Node(func, args, kwargs, "softmax" if name == "softmax" else "op", parents))
        return out

    def track(self, t: torch.Tensor, node: _Node) -> None:
        self.tracked[len(self.tracked) if torch.compiler.is_compiling() else id(t)] = (t, node)

    def node(self, t: torch.Tensor) -> _Node | None:
        """The node that made t, if t is tracked (the same tensor, not one that reused its id). While torch.compile
        traces, found by identity among all: a guard on the id of a tensor made in the traced frame fails."""
        if torch.compiler.is_compiling():
            return next((n for x, n in self.tracked.values() if x is t), None)
        e = self.tracked.get(id(t))
        return e[1] if e is not None and e[0] is t else None

    def _value_product(self, func, args, kwargs):
        """The value product's result with every editor's keys and values, or None when this call is not a value
        product (or no editor changes anything)."""
        p = _product(func, args, kwargs)
        if p is None:
            return None
        left, right, bias, rebuild, letters = p
        probs = next((i for i, t in enumerate((left, right)) if isinstance(t, torch.Tensor)
                      and self.node(t) is not None and (letters is not None or i == 0)), None)
        posts = _ways(self.node((left, right)[probs]), "softmax") if probs is not None else []
        if not posts:
            return None
        post = posts[0]
        pres = [w for at, parent in post[0][0].parents for w in _ways(parent, "product")]
        if len(pres) != 1:
            raise SurgeryError(f"cannot add keys/values at {self.path}: the scores reaching its softmax are made by "
                               f"{len(pres)} products, not one")
        way = pres[0] + [(post[0][0], post[0][0].parents[0][0])] + post[1:]
        score = way[0][0]
        try:
            sl, sr, sbias, srebuild, sletters = _product(score.func, score.args, score.kwargs)
            values = (left, right)[1 - probs]
            if letters is None:  # matmul: (.., q, d) x (.., d, k) and (.., q, k) x (.., k, dv)
                key_left = False
                qp, kp, vp = _layout(sl, None, -2, -1), _layout(sr, None, -1, -2), _layout(values, None, -2, -1)
            else:  # einsum: the keys hold the output's last letter; the features are summed over
                a, b, out = sletters
                key_left = out[-1] not in b
                ql, kl = (b, a) if key_left else (a, b)
                feat = next(c for c in kl if c in ql and c not in out)
                qp, kp = _layout(None, ql, out[-2], feat, out), _layout(None, kl, out[-1], feat, out)
                vp = _layout(None, letters[1 - probs], letters[probs][-1], letters[2][-1], letters[2])
            q, keys = (sr, sl) if key_left else (sl, sr)
            q4, k4, v4 = (_to_heads(t, perm, self.heads) for t, perm in ((q, qp), (keys, kp), (values, vp)))
        except (_Unsupported, StopIteration, ValueError, TypeError) as e:
            raise SurgeryError(f"cannot add keys/values at {self.path}: its score or value product has a layout "
                               f"that is not understood ({e or 'einsum subscripts'})") from None
        k2, v2, _, _ = _apply(self.module, q4, k4, v4, None, {NO_MASK: True})  # an edited mask is not used here
        if k2 is k4 and v2 is v4:
            return None
        n, added = k4.shape[-2], k2.shape[-2] - k4.shape[-2]
        if v2.shape[-2] - v4.shape[-2] != added:
            raise SurgeryError(f"at {self.path}: an editor added {added} keys but "
                               f"{v2.shape[-2] - v4.shape[-2]} values")
        k2 = _from_heads(k2, kp)
        kind = type(self.module).__name__

        def added_to(t, key):   # keys edited in place (seated prefixes) have the model's own bias
            if added:
                note_bias(self.owner, t, kind, key)
        if sbias is not None and sbias.dim() and sbias.shape[-1] == n:
            added_to(sbias, "score bias")
            sbias = _prepend(sbias, added, 0)
        x = srebuild(k2, q, sbias) if key_left else srebuild(q, k2, sbias)
        for i, (node, at) in enumerate(way[1:]):
            x = _replay(node, at, x, n, added, lambda t, loc, i=i: added_to(t, (i, loc)))
        v2 = _from_heads(v2, vp)
        return rebuild(x, v2, bias) if probs == 0 else rebuild(v2, x, bias)


class _ModeForward:
    """The forward of a module whose attention is reached by a _Mode: its own forward (or the one set on it before,
    kept and given back), run inside a _Mode if one of its editors is on (off, the module takes its own paths:
    nn.MultiheadAttention's fast path is not taken while a mode is active). A wrapper rather than a pre-hook
    entering the mode and a hook leaving it: torch.compile of the module that holds such hooks computes other
    outputs than eager; a `with` it follows. Its signature is the forward's (callers read parameter names)."""

    def __init__(self, module: nn.Module, heads: int | None, path: str):
        self.module, self.heads, self.path = module, heads, path
        self.inner = module.__dict__.get("forward")

    def __call__(self, *args, **kwargs):
        m = self.module
        if not any(getattr(getattr(e, "fn", e), "on", True) for e in _editors(m)):
            return self._forward(*args, **kwargs)
        with _Mode(m, self):
            return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __signature__(self):
        fwd = self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)
        return inspect.signature(fwd)


def _dispatches(module: nn.Module) -> bool:
    """Whether the module's own code calls attention through transformers' registry: its class's methods, or a
    function of its modelling file they call, read the registry (a config naming an implementation is not enough:
    Falcon's checks the name itself and falls back to its own attention; nor is the file importing the registry:
    BigBirdPegasus's encoder attention computes its own products beside a decoder attention that dispatches)."""
    return _class_dispatches(type(module))


@functools.cache
def _class_dispatches(kind: type) -> bool:
    """_dispatches for every module of one class (read once per class: every site and seating forward asks)."""
    space = vars(sys.modules.get(kind.__module__, object()))
    if "ALL_ATTENTION_FUNCTIONS" not in space:
        return False
    own = {n for cls in kind.__mro__ if cls not in (nn.Module, object)
           for f in vars(cls).values() if hasattr(f, "__code__") for n in _names(f.__code__)}
    return "ALL_ATTENTION_FUNCTIONS" in own or any(
        "ALL_ATTENTION_FUNCTIONS" in _names(space[n].__code__) for n in own if hasattr(space.get(n), "__code__"))


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object and the code nested in it read."""
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


class Intercepted(Change):
    """`editor` sees every attention call of the module at `path` (impl: what locate saw, "sdpa", "eager", ...;
    heads: the site's query heads, to read a (batch * heads, ...) layout)."""

    def __init__(self, model: nn.Module, path: str, editor, impl: str, heads: int | None = None):
        module = model.get_submodule(path)
        cfg = getattr(module, "config", None)
        self.path, self.editor, self.original = path, editor, None
        if cfg is not None and hasattr(cfg, "_attn_implementation") and _dispatches(module):
            current = cfg._attn_implementation or "eager"
            self.original = current[len(PREFIX):] if current.startswith(PREFIX) else current
            if not current.startswith(PREFIX):
                cfg._attn_implementation = _register(self.original)
        elif not isinstance(module.__dict__.get("forward"), _ModeForward):   # one per module, for all its editors
            module.forward = _ModeForward(module, heads, path)
        _editors(module).append(editor)

    def undo(self, model):
        module = model.get_submodule(self.path)
        eds = _editors(module)
        eds[:] = [e for e in eds if e is not self.editor]
        wrapper = module.__dict__.get("forward")
        if isinstance(wrapper, _ModeForward) and not eds:
            if wrapper.inner is not None:
                module.forward = wrapper.inner
            else:
                del module.__dict__["forward"]
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
            "(neither transformers' attention interface, F.scaled_dot_product_attention, nor a score product reaching "
            "a softmax whose output a value product takes)", "it declined"))[1]

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


class _Look(threading.local):
    """While `found` is a list (prefix.Prefix's look for a bias, in this thread only): the kinds of module in which
    note_bias found a position bias, recorded instead of warned about."""
    found: list | None = None


look = _Look()


def note_bias(owner, t: torch.Tensor, kind: str, key) -> None:
    """t is added to the scores over the keys and is 0 in the prefix columns: a mask leaves nothing out, but a
    position bias (ALiBi, relative positions) then gives the prefix no position. Each place (`key`: a mask, a
    named argument, a step between the products) of an attention site (`owner`: its hooks or editor) is looked at
    once; said once per module class and process (Python's default warning filter)."""
    looked = owner.__dict__.setdefault("_bias_looked", set())
    if key in looked or not t.is_floating_point():
        return
    looked.add(key)
    kept = t[t.isfinite() & (t > -1e4)]   # masked keys: -inf, the dtype's lowest value, or -10000
    if bool((kept != 0).any()):
        if look.found is not None:
            look.found.append(kind)
            return
        warnings.warn(f"prefix keys in {kind} get no position bias: the position bias it adds to the scores (ALiBi, "
                      "relative positions) is 0 for them where the prefix cannot be seated in the sequence (keys "
                      "over no token ids it could sit among, as in a model fed vectors), so there the virtual tokens "
                      "do not sit at positions before the first real token", stacklevel=3)


def extend_mask(mask, q, k_len_new: int, n: int, causal: bool):
    """Prepend n always-visible key positions to an attention mask (bool, additive float, or None). The result
    is reused while the same mask (same tensor, unchanged) or the same causal shape comes back (not while
    torch.compile traces: a traced graph computes it once anyway)."""
    if mask is None:
        if not causal or q.shape[-2] == 1:
            return None
        key = (q.shape[-2], k_len_new, q.device)
    else:
        key = None if torch.compiler.is_compiling() else (mask._version, n)
    last = _last_mask[0]  # one read: other threads may replace it meanwhile
    if last is not None and key is not None and last[1] == key and (
            last[0] is None if mask is None else last[0]() is mask):
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
    if key is None:
        return out
    if mask is not None:
        _last_mask[0] = (weakref.ref(mask, _forget), key, out)
    elif out.numel() <= _KEEP:
        _last_mask[0] = (None, key, out)
    return out
