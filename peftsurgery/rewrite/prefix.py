"""Rule: trainable keys/values prepended at attention sites (prefix tuning, P-tuning v2).

The prefix is added inside the attention call (see attention.py), after rotary embeddings and after any cache
update, so it never enters the cache and nothing depends on the layout of cache objects.

Where the model adds a position bias to the scores over the keys (ALiBi, relative positions), keys put in front of
the call's own would have no position. There the prefix is seated in the sequence instead: the entry puts as many
placeholder tokens right before each row's first real token (as a prompt), so the model gives their keys positions,
masks and biases itself, and at every attention call their keys and values are replaced by the prefix's.
"""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn

from ..errors import SurgeryError
from ..sites import Site
from . import attention
from .attention import NO_MASK, Intercepted, extend_mask, note_bias, repeat_heads
from .base import Rule, Switch
from .inputs import Entry


class PrefixKV(nn.Module):
    """The keys and values of every site of one shape in one tensor, (sites, 2, kv_heads, num_tokens, head_dim):
    the optimizer steps one parameter rather than two per layer. Keys and values of different head sizes (latent
    attention) sit side by side instead, (sites, kv_heads, num_tokens, head_dim + v_head_dim), split at `split`."""

    def __init__(self, kv: torch.Tensor, split: int | None = None):
        super().__init__()
        self.kv, self.split = nn.Parameter(kv), split

    def site(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split is None:
            return self.kv[i].unbind(0)
        return self.kv[i, ..., :self.split], self.kv[i, ..., self.split:]


class PrefixMLP(nn.Module):
    """Reparameterisation: an embedding through a two-layer MLP gives every site's keys and values."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, shapes: list[tuple[int, int, int]], device=None):
        super().__init__()
        self.shapes = shapes  # per site: kv heads, key and value head sizes
        total = sum(h * (d + dv) for h, d, dv in shapes)
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim, device=device) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, device=device), nn.Tanh(),
                                 nn.Linear(hidden, total, device=device))
        self._cache = None

    def train(self, mode=True):
        self._cache = None
        return super().train(mode)

    def _versions(self) -> tuple:
        return tuple(p._version for p in self.parameters())

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # reused within no-grad evaluation only while no parameter has changed (an optimizer step bumps versions)
        if self._cache is not None and not torch.is_grad_enabled() and self._cache[0] == self._versions():
            return self._cache[1]
        out, i, P = self.mlp(self.embedding), 0, self.embedding.shape[0]
        kvs = []
        for h, d, dv in self.shapes:
            k = out[:, i:i + h * d].reshape(P, h, d).transpose(0, 1)
            v = out[:, i + h * d:i + h * (d + dv)].reshape(P, h, dv).transpose(0, 1)
            kvs.append((k, v))
            i += h * (d + dv)
        if not self.training and not torch.is_grad_enabled():
            self._cache = (self._versions(), kvs)
        return kvs

    def site(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self()[i]


class _Site(nn.Module):
    """One site's view on a shared PrefixKV or PrefixMLP (no parameters of its own): key and value are
    (kv_heads, num_tokens, head_dim) and (kv_heads, num_tokens, v_head_dim)."""

    def __init__(self, shared: PrefixKV | PrefixMLP, index: int, size: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)
        self.index, self.size = index, size

    def forward(self):
        return self.shared.site(self.index)

    def numel(self) -> int:
        """This site's share of the shared parameters (what inspect() reports for it)."""
        return self.size

    key = property(lambda self: self()[0])
    value = property(lambda self: self()[1])


class _Editor:
    def __init__(self, source: nn.Module, switch: Switch, causal: bool):
        self.source, self.switch, self.causal = source, switch, causal

    on = property(lambda self: self.switch.on)

    def apart(self):
        """The keys and values this editor adds, seen by every row, to be attended apart (attention._apart)."""
        return (*self.source(), None)

    def __call__(self, module, q, k, v, mask, kwargs):
        if not self.switch.on:
            return k, v, mask, kwargs
        pk, pv = self.source()
        B, H, P = k.shape[0], k.shape[1], pk.shape[1]
        pk, pv = repeat_heads(pk, H), repeat_heads(pv, H)
        old = k.shape[-2]
        k = torch.cat([pk.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1), k], -2)
        v = torch.cat([pv.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1), v], -2)
        if kwargs.get(NO_MASK):  # the caller extends what is combined with the scores itself
            return k, v, mask, kwargs
        causal = bool(kwargs.get("is_causal")) or (mask is None and getattr(module, "is_causal", self.causal)
                                                    and self.causal)
        if mask is not None:
            note_bias(self, mask, type(module).__name__, "mask")
        mask = extend_mask(mask, q, k.shape[-2], P, causal)
        return k, v, mask, extended(kwargs, mask, old, P, lambda t, name: note_bias(self, t, type(module).__name__,
                                                                                     name))


class Seats:
    """The placeholder tokens of a seated prefix: zero vectors in the sequence (`ramp`: -1 to 1 along the features,
    which a norm does not flatten to what zeros give), whose keys and values _Seated replaces at every attention
    call (so what they hold does not reach the real tokens, unless the model reads their keys elsewhere: see
    seated())."""
    seated = True

    def __init__(self, num: int, dim: int):
        self.num, self.dim, self.ramp = num, dim, False

    def __call__(self, batch: int) -> torch.Tensor:
        if self.ramp:
            return torch.linspace(-1, 1, self.dim).expand(batch, self.num, -1)
        return torch.zeros(batch, self.num, self.dim)


class _Seated:
    """Attention editor of a seated prefix: the keys and values of the placeholder tokens the entry put after each
    row's left padding become the prefix's."""

    def __init__(self, source: nn.Module, switch: Switch, entry: Entry):
        self.source, self.switch, self.entry = source, switch, entry

    def __call__(self, module, q, k, v, mask, kwargs):
        if not self.switch.on:
            return k, v, mask, kwargs
        pk, pv = self.source()
        return seat(k, pk, self.entry.lead), seat(v, pv, self.entry.lead), mask, kwargs


def seat(t: torch.Tensor, p: torch.Tensor, lead) -> torch.Tensor:
    """t, (batch, heads, keys, dim), with p, (kv_heads, n, dim), in the n key columns after each row's `lead`
    ((batch, 1) left padding; None: none)."""
    B, H, n = t.shape[0], t.shape[1], p.shape[-2]
    p = repeat_heads(p, H).to(t.dtype).unsqueeze(0).expand(B, -1, -1, -1)
    if lead is None:
        return torch.cat([p, t[:, :, n:]], -2)
    where = (lead + torch.arange(n, device=t.device)).view(B, 1, n, 1).expand(B, H, n, t.shape[-1])
    return t.scatter(2, where, p)


def seated(model: nn.Module, sites: list[Site], sitemap, num: int) -> dict[str, str]:
    """Where a prefix of `num` tokens sits in the sequence: {site path: the entry whose tokens its keys are}. None
    unless a forward with the prefix in front finds a position bias (_biased); then a forward with placeholders
    seated tells where they go (_seatings). Without example inputs (or on the meta device): none."""
    embed = next((s.path for s in sitemap if s.role == "embed"), None)
    p = next(model.parameters(), None)
    if not sitemap.inputs or embed is None or sitemap.entry is None or p is None or p.device.type == "meta":
        return {}
    longest = _biased(model, sites, sitemap, num)
    return _seatings(model, sites, sitemap, embed, longest) if longest else {}


def _biased(model: nn.Module, sites: list[Site], sitemap, num: int) -> int:
    """One forward on the example inputs with `num` zero keys and values put in front at every site: if a position
    bias is added to the scores somewhere, the most keys a site saw (else 0)."""
    p, longest = next(model.parameters()), [0]

    def in_front(s):
        ed = _Editor(lambda: (p.new_zeros(s.kv_heads, num, s.head_dim), p.new_zeros(s.kv_heads, num, _vdim(s))),
                     Switch(), bool(s.causal))

        def edit(module, q, k, v, mask, kwargs):
            longest[0] = max(longest[0], k.shape[-2])
            return ed(module, q, k, v, mask, kwargs)
        return edit
    attention.look.found = []
    try:
        _run(model, sitemap, (Intercepted(model, s.path, in_front(s), s.impl or "", s.heads) for s in sites))
        return longest[0] if attention.look.found else 0
    except Exception:   # apply's own forward says what is wrong
        return 0
    finally:
        attention.look.found = None


def _seatings(model: nn.Module, sites: list[Site], sitemap, embed: str, longest: int) -> dict[str, str]:
    """Placeholders seated at each module taking token ids (the entry; an encoder-decoder's decoder stack), more at
    each than any site saw keys and a different number at each, so a site's key count tells whose sequence it
    attends over (cross-attention reads the encoder's outputs, placeholders already dropped: it keeps the prefix in
    front). Zero keys and values are swapped in there, and two forwards with different placeholders must give the
    same outputs; where they do not, the model reads the placeholders beside the swapped products: said."""
    entries = {}
    for i, (at, emb) in enumerate(_entries(sitemap, embed)):
        n = (longest + 1) * (i + 1)
        entries[at] = Entry(model, sitemap, emb, n, Seats(n, model.get_submodule(emb).weight.shape[-1]), Switch(),
                            at=at)
    seen = {}

    def recorder(path):
        def ed(module, q, k, v, mask, kwargs):
            at = next((a for a, e in entries.items() if e.pending and e.pending[-1]
                       and k.shape[-2] == e.pending[-1].total), None)
            seen[path] = at if seen.get(path, at) == at else None   # every call over one entry's tokens
            if at is None:
                return k, v, mask, kwargs
            e = entries[at]
            return tuple(seat(t, t.new_zeros(t.shape[1], e.num, t.shape[-1]), e.lead) for t in (k, v)) + (mask, kwargs)
        return ed

    def forward(seated: dict, ramp: bool):
        for e in seated.values():
            e.prompt.ramp = ramp
        return _run(model, sitemap, itertools.chain((c for e in seated.values() for c in e.attach(model)),
                                                    (Intercepted(model, s.path, recorder(s.path), s.impl or "",
                                                                 s.heads) for s in sites)))
    try:
        out = forward(entries, False)
        where = {s.path: seen[s.path] for s in sites if seen.get(s.path) is not None}
        used = {at: e for at, e in entries.items() if at in where.values()}   # as apply will seat them
        if not where or not all(s.path in seen for s in sites):   # (a site never reached: apply refuses)
            return where
        if len(used) < len(entries):
            out = forward(used, False)
        if not _same(out, forward(used, True)):
            warnings.warn(f"prefix tuning: {type(model).__name__} reads the seated placeholders' own keys or values "
                          "beside the attention products where they are swapped for the prefix's (as DeBERTa's "
                          "position-to-content term does), so there the prefix does not take their place",
                          stacklevel=5)
        return where
    except SurgeryError:   # it cannot be seated beside another adapter's virtual tokens
        raise
    except Exception:
        return {}


def _same(a, b) -> bool:
    """Whether two model outputs hold the same tensors, bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return True


def _entries(sitemap, embed: str) -> list[tuple[str, str]]:
    """(module, embedding) of each place token ids come in: the entry, and an encoder-decoder's decoder stack."""
    return [(sitemap.entry, embed)] + ([(sitemap.decoder_entry, sitemap.decoder_embed)]
                                       if sitemap.decoder_entry else [])


def _run(model: nn.Module, sitemap, making):
    """One forward on the example inputs with the changes `making` makes (each on construction), then every one
    made undone, also when making one fails: its output."""
    changes = []
    try:
        changes.extend(making)
        return sitemap.run(model)
    finally:
        for c in reversed(changes):
            c.undo(model)


def extended(kwargs: dict, mask, old: int, n: int, added_to=lambda t, name: None) -> dict:
    """An attention call's other arguments once n prefix keys precede its `old` keys: no is_causal flag where a
    mask now says it, and additive biases over the keys (relative position bias) zero for the prefix (each seen by
    added_to first)."""
    if "is_causal" in kwargs:
        kwargs = {**kwargs, "is_causal": False if mask is not None else kwargs["is_causal"]}
    for name, t in list(kwargs.items()):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == old and t.is_floating_point():
            added_to(t, name)
            kwargs = {**kwargs, name: torch.cat([t.new_zeros(*t.shape[:-1], n), t], -1)}
    return kwargs


class Prefix(Rule):
    """init(model, sites) -> list of (key, value) per site, or None for random; projection: MLP hidden size
    (0 for none)."""
    kinds = ("attention",)
    phase = 2

    def __init__(self, targets: str, num_tokens: int, projection: int = 0, init=None):
        super().__init__(targets)
        self.num_tokens, self.projection, self.init = num_tokens, projection, init
        self.seated = {}   # site -> entry, where it sits in the sequence: decided by build (see seated())

    def build(self, model, sites, sitemap):
        init, self.init = self.init, None  # used once here; the rule stays on the model and must pickle
        self.seated = seated(model, sites, sitemap, self.num_tokens)
        p = next(model.parameters())
        dev = p.device
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        P = self.num_tokens
        if self.projection:
            embed = next((s for s in sitemap if s.role == "embed"), None)
            dim = embed.out_features if embed else sites[0].heads * sites[0].head_dim
            shapes = [(s.kv_heads, s.head_dim, _vdim(s)) for s in sites]
            shared = PrefixMLP(P, dim, self.projection, shapes, device=dev)
            out = {"_mlp": shared}
            out.update({s.path: _Site(shared, i, P * h * (d + dv))
                        for i, (s, (h, d, dv)) in enumerate(zip(sites, shapes))})
            return out
        start = init(model, sites) if init else None
        groups: dict[tuple, list] = {}  # sites by key and value shapes: one PrefixKV each
        for i, s in enumerate(sites):
            if start is not None:
                k, v = start[i]
                if k.shape[0] != s.kv_heads:  # recorded after grouped-query repetition: one copy per kv head
                    rep = k.shape[0] // s.kv_heads
                    k, v = k[::rep], v[::rep]
            else:
                k = torch.randn(s.kv_heads, P, s.head_dim, device=dev) * 0.02
                v = torch.randn(s.kv_heads, P, _vdim(s), device=dev) * 0.02
            kv = torch.stack([k, v]) if k.shape == v.shape else torch.cat([k, v], -1)
            groups.setdefault((k.shape, v.shape), []).append((s.path, kv.to(dtype)))
        out = {}
        for g, ((ks, vs), members) in enumerate(groups.items()):
            shared = out[f"_kv{g or ''}"] = PrefixKV(torch.stack([kv for _, kv in members]),
                                                     None if ks == vs else ks[-1])
            out.update({path: _Site(shared, j, kv.numel()) for j, (path, kv) in enumerate(members)})
        return out

    def attach(self, model, sites, built, switch, sitemap):
        embed = next((x.path for x in sitemap if x.role == "embed"), None)
        entries = {}
        for at, emb in _entries(sitemap, embed) if self.seated else ():
            if at in self.seated.values():
                seats = Seats(self.num_tokens, model.get_submodule(emb).weight.shape[-1])
                entries[at] = Entry(model, sitemap, emb, self.num_tokens, seats, switch, at=at)
                yield from entries[at].attach(model)
        for s in sites:
            at = self.seated.get(s.path)
            ed = _Editor(built[s.path], switch, bool(s.causal)) if at is None else \
                _Seated(built[s.path], switch, entries[at])
            yield Intercepted(model, s.path, ed, s.impl or "", s.heads)
        if embed is not None and sitemap.entry not in entries:   # real tokens' positions after the prefix
            yield from Entry(model, sitemap, embed, self.num_tokens, None, switch).attach(model)

    def route(self, model, entries, rows, cache):
        """Row i gets its adapter's keys/values at every site (see rowprefix.py)."""
        if self.seated:
            raise SurgeryError("route() does not serve prefixes seated in the sequence (this model adds a position "
                               "bias to its scores); run each adapter by itself with set_active")
        from .rowprefix import route_prefixes
        return route_prefixes(model, entries, rows, cache)

    def state(self, built):
        """Saved per site, its keys and values, however they are held: an MLP is folded away (computed once).
        Without an MLP they are views of the shared tensors, so loading writes through them."""
        with torch.no_grad():
            kvs = built["_mlp"]() if "_mlp" in built else None
            state = {p: dict(zip(("key", "value"), m() if kvs is None else kvs[m.index]))
                     for p, m in built.items() if isinstance(m, _Site)}
        return state, {}

    def loading(self, settings):
        """What is saved is always the keys and values themselves: load them without an MLP and without any
        initialisation from the model."""
        return Prefix(self.targets, self.num_tokens, 0)

    def describe(self, site: Site, built):
        shape = f"{site.kv_heads}x{site.head_dim}" + (f", values {site.kv_heads}x{_vdim(site)}"
                                                     if _vdim(site) != site.head_dim else "")
        where = "seated before the first real token" if site.path in self.seated else "prepended in attention"
        return f"{self.num_tokens} prefix keys/values ({shape}) {where}"


def _vdim(site: Site) -> int:
    """Features per head of the values (of the keys where locate saw no other)."""
    return site.v_head_dim or site.head_dim


def record_kv(model: nn.Module, sites: list[Site], inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the model once on `inputs` (the token ids first) and return, for each attention site, the keys and
    values it computed (batch 0)."""
    got: dict[str, tuple] = {}
    undo = []
    n = next(iter(inputs.values())).shape[-1]  # other adapters may have put virtual tokens before these

    def recorder(path):
        def ed(module, q, k, v, mask, kwargs):
            got.setdefault(path, (k[0, :, -n:].detach().clone(), v[0, :, -n:].detach().clone()))
            return k, v, mask, kwargs
        return ed
    try:
        for s in sites:
            undo.append(Intercepted(model, s.path, recorder(s.path), s.impl or "", s.heads))
        with torch.no_grad():
            model(**inputs)
    finally:
        for u in reversed(undo):
            u.undo(model)
    missing = [s.path for s in sites if s.path not in got]
    if missing:
        raise SurgeryError(f"no attention call at {missing[0]} could be intercepted (it computes attention in its "
                           "own way); prefixes cannot be added there")
    return [got[s.path] for s in sites]
