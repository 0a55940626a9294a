"""Rule: a trainable prompt prepended at the input embedding.

In a causal decoder the prompt's keys and values at every attention site depend on the prompt alone, and the real
tokens read the prompt only through them. Where that is proven on the example inputs (Apart.prove), a call without
gradients that fills an empty cache (generate()'s prefill) runs the prompt once by itself, records those keys and
values, and attends to them as a prefix's (prefix._Editor) in that call and in every decoding step on that cache:
the cache holds only the real tokens, and a step attends to the prompt apart from it and merges by log-sum-exp
instead of reading P more cached positions per layer.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import replace

import torch
from torch import nn

from ..errors import SurgeryError
from .attention import Intercepted
from .base import Rule
from .inputs import Entry, cache_length, holds_state, routed_entry
from .prefix import _biased, _Editor, _run, _same, seat


def text_ids(text: str, n: int | None = None, vocab: int | None = None) -> torch.Tensor:
    """Token ids written as "12,7,99" (tokenize text first); with n, repeated to fill n positions; with vocab,
    checked against the vocabulary size. SurgeryError when malformed, empty or out of range."""
    try:
        ids = torch.tensor([int(t) for t in str(text).replace(" ", "").split(",") if t], dtype=torch.long)
    except ValueError:
        raise SurgeryError(f"text must be token ids like 12,7,99 (tokenize the text first), got {text!r}") from None
    if not len(ids):
        raise SurgeryError("init=text needs text=<token ids> like 12,7,99")
    if vocab is not None and int(ids.max()) >= vocab:
        raise SurgeryError(f"token id {int(ids.max())} is outside the vocabulary of {vocab}")
    return ids if n is None else ids.repeat((n + len(ids) - 1) // len(ids))[:n]


def check_text_init(method: str, init: str, text: str) -> None:
    """A config's init and text together: init=text needs well-formed ids; text with another init would be
    ignored, so it is refused (one-line SurgeryError naming the method)."""
    if init == "text":
        try:
            text_ids(text)
        except SurgeryError as e:
            raise SurgeryError(f"{method}: {e}") from None
    elif str(text).strip():
        raise SurgeryError(f"{method}: text is read only with init=text, not init={init}; leave text out or set "
                           "init=text")


class PromptEmbedding(nn.Module):
    """num_tokens trainable vectors; an optional encoder (e.g. P-tuning's) maps them before use."""

    def __init__(self, weight: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.encoder = encoder

    def forward(self, batch: int) -> torch.Tensor:
        p = self.weight if self.encoder is None else self.encoder(self.weight)
        return p.unsqueeze(0).expand(batch, -1, -1)


class _RowPrompts:
    """Under route(): prompt(B) for a batch whose row i gets prompt index[i] (len(prompts): none), right-aligned
    in P slots, zeros before a shorter prompt. Only the prompts of this batch are computed (and trained)."""

    def __init__(self, prompts: list[PromptEmbedding], index: torch.Tensor, P: int):
        self.prompts, self.index, self.P = prompts, index, P

    def __call__(self, batch: int) -> torch.Tensor:
        vs = [p(1)[0] for p in self.prompts]
        table = [torch.cat([v.new_zeros(self.P - v.shape[0], v.shape[1]), v]) for v in vs]
        return torch.stack(table + [vs[0].new_zeros(self.P, vs[0].shape[1])])[self.index]


class Prompt(Rule):
    """init(embedding_module, num_tokens) -> (num_tokens, dim) tensor gives the starting vectors (None: zeros)."""
    kinds = ("embedding",)
    phase = 2

    def __init__(self, num_tokens: int, init, encoder=None, targets: str = "embed"):
        super().__init__(targets)
        self.num_tokens, self.init, self.encoder = num_tokens, init, encoder
        self.apart = False   # decided by attach: attended apart from the cache while decoding (Apart)

    def select(self, sitemap):
        sites = super().select(sitemap)
        if sitemap.entry is None:
            raise SurgeryError("no module receiving the token ids was found; prompts need a model taking input_ids")
        return sites[:1]

    def build(self, model, sites, sitemap):
        init, self.init = self.init, None  # used once here; the rule stays on the model and must pickle
        w = starting_vectors(model.get_submodule(sites[0].path), self.num_tokens, init)
        enc = self.encoder(w.shape[-1]) if self.encoder else None
        return {sites[0].path: PromptEmbedding(w.clone(), enc)}

    def attach(self, model, sites, built, switch, sitemap):
        path = sites[0].path
        entry = Entry(model, sitemap, path, self.num_tokens, built[path], switch)
        yield from entry.attach(model)
        yield from Apart.attach(model, sitemap, entry)
        self.apart = entry.apart is not None

    def route(self, model, entries, rows, cache):
        """Row i gets the prompt of its adapter (none for rows on other adapters or the base), all through one
        entry hook; prompts of different lengths sit right-aligned, masked-out slots before the shorter ones."""
        prompts = {}
        for slot, sites, built in entries:
            if slot in prompts:
                raise SurgeryError("route() cannot give a row two prompts of one adapter; route it by itself")
            prompts[slot] = built[sites[0].path]
        slots = rows.tolist()
        present = sorted({s for s in slots if s in prompts})
        if not present:
            return []
        lens = [prompts[s].weight.shape[0] if s in prompts else 0 for s in slots]
        index = torch.tensor([present.index(s) if s in prompts else len(present) for s in slots], device=rows.device)
        entry = routed_entry(model, rows, cache)
        entry.add_prompts(model, entries[0][1][0].path, _RowPrompts([prompts[s] for s in present], index,
                                                                    max(lens)), lens)
        return entry.hooks(model)

    def loading(self, settings):
        """Loading overwrites the vectors: no initialisation from the embedding."""
        return Prompt(self.num_tokens, None, self.encoder, self.targets)

    def describe(self, site, built):
        return f"{self.num_tokens} virtual tokens prepended to the embeddings" + (
            "; attended apart from the cache while decoding" if self.apart else "")


def starting_vectors(emb: nn.Module, num_tokens: int, init) -> torch.Tensor:
    """(num_tokens, width) vectors to start soft tokens from: init(emb, num_tokens), or zeros without one, on the
    embedding's device and dtype."""
    with torch.no_grad():
        w = torch.zeros(num_tokens, emb.weight.shape[1]) if init is None else init(emb, num_tokens)
        return w.to(device=emb.weight.device, dtype=emb.weight.dtype)


class Apart:
    """A prompt's keys and values at every attention site, recorded by running the prompt alone and attended as a
    prefix's (see the module's docstring): current holds them during a call that adds them, served those of each
    cache filled that way (a weak reference: they go with the cache)."""

    def __init__(self, sites):
        self.sites, self.call = sites, _Call()
        self.served = weakref.WeakKeyDictionary()

    # per thread: the keys and values this call adds, and {site index: (k, v)} while recording
    current = property(lambda self: self.call.current, lambda self, v: setattr(self.call, "current", v))
    got = property(lambda self: self.call.got, lambda self, v: setattr(self.call, "got", v))
    on = property(lambda self: self.current is not None)
    forced = False   # prove(): an apart call without a cache

    def __getstate__(self):   # what calls hold is not part of the model
        return {k: v for k, v in self.__dict__.items() if k not in ("call", "served")}

    def __setstate__(self, state):
        self.__dict__.update(state, call=_Call(), served=weakref.WeakKeyDictionary())

    @classmethod
    def attach(cls, model: nn.Module, sitemap, entry: Entry):
        """Editors at every attention site, and entry.apart set, where the prompt is proven to be attendable apart
        (prove()); else nothing: the prompt stays in the sequence and the model is as it was."""
        sites = [s for s in sitemap if s.kind == "attention"]
        p = next(model.parameters(), None)
        if (not sites or not sitemap.inputs or sitemap.decoder_entry or p is None or p.device.type == "meta"
                or entry.embed is None or not {"inputs_embeds", "past_key_values"} <= set(entry.params)):
            return   # no cache to keep the prompt out of, or no way to run the prompt alone
        apart, made, proven = cls(sites), [], False
        try:
            for i, s in enumerate(sites):
                made.append(_Unproven(model, s.path, _Slot(apart, i, bool(s.causal)), s.impl or "", s.heads))
            entry.apart = apart
            proven = apart.prove(model, sitemap, entry)
        except Exception:   # any failure leaves the prompt in the sequence, which apply then proves
            pass
        finally:   # (also when interrupted: these changes are not yet the caller's to undo)
            if not proven:
                entry.apart = None
                for c in reversed(made):
                    c.undo(model)
        if proven:
            yield from made

    def takes(self, entry: Entry, kwargs: dict, cache, decoding: bool) -> bool:
        """Whether this call adds the recorded keys and values (set as current) instead of putting the prompt in
        the sequence: a decoding step on a cache filled that way, or a call without gradients filling an empty
        cache while this prompt is the entry's only virtual tokens."""
        if decoding:
            self.current = None if cache is None else self.served.get(cache)
            return self.current is not None
        if ((cache is None and not self.forced) or torch.is_grad_enabled() or kwargs.get("output_attentions")
                or cache_length(cache) or holds_state(cache) or entry.lens is not None
                or any(e.switch.on for e in entry.others())):   # another adapter's virtual tokens are on
            return False
        self.current = self.record(entry)
        if cache is not None and self.current is not None:
            self.served[cache] = self.current
        return self.current is not None

    def record(self, entry: Entry):
        """Every site's keys and values of the prompt run alone through the entry at positions 0..P-1 (as the
        sequence has them), or None where a site was not reached, saw other keys, or slides a window."""
        P, dev, w = entry.num, entry.embed.weight.device, entry.embed.weight
        kw = {"inputs_embeds": entry.prompt(1).to(device=dev, dtype=w.dtype if w.is_floating_point() else None)}
        extra = {"attention_mask": torch.ones(1, P, dtype=torch.long, device=dev),
                 "position_ids": torch.arange(P, device=dev)[None], "use_cache": False}
        kw.update({k: v for k, v in extra.items() if k in entry.params})
        self.got, entry.recording = {}, True
        try:
            with torch.no_grad():
                entry.module(**kw)
            got = self.got
        finally:
            self.got, entry.recording = None, False
        if got.pop("window", False) or len(got) != len(self.sites) or any(k.shape[-2] != P for k, _ in got.values()):
            return None
        return [got[i] for i in range(len(self.sites))]

    def prove(self, model: nn.Module, sitemap, entry: Entry) -> bool:
        """On the example inputs' shape, with tokens x, and two probe prompts A and B (embedding rows, and 1 -
        those) in the sequence: no position bias is added to the scores over the keys (prefix._biased); A's keys
        and values at every site are the same after x reversed (the prompt sees no real token); B with A's keys and
        values swapped in at every site gives A's outputs (the real tokens read the prompt only there: no recurrent
        state, no other mixing); A run alone reaches every site with its P keys and no sliding window (record());
        and A attended apart gives A's outputs. "The same" is bit for bit in 16 bits, where rounding could hide a
        small dependence, and in 32 bits within 1e-4 of the keys' magnitude or of how far B's outputs are (a
        mixture of experts groups tokens by expert, so other tokens change the products' shapes and rounding); the
        outputs attended apart, which take other products, within 1e-3 (5e-2 in 16 bits) of that (_agree)."""
        ids = sitemap.inputs.get(entry.ids)
        mask = sitemap.inputs.get("attention_mask")
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[-1] < 2 or ids.is_floating_point()
                or (isinstance(mask, torch.Tensor) and not bool(mask.all()))):
            return False
        P, own, emb = entry.num, entry.prompt, entry.embed.weight
        if _biased(model, self.sites, sitemap, P):
            return False
        x = (torch.arange(ids.numel(), device=ids.device).view(ids.shape) * 7 + 3) % emb.shape[0]
        a = emb.detach()[torch.arange(P, device=emb.device) % emb.shape[0]].float()
        probes = {"A": a, "B": 1 - a}

        def run(probe, ids, edit=None, forced=False):
            entry.prompt = lambda batch: probes[probe].to(emb.dtype).expand(batch, -1, -1)
            self.forced = forced
            made = (Intercepted(model, s.path, edit(i), s.impl or "", s.heads) for i, s in enumerate(self.sites))
            try:
                if forced and self.record(entry) is None:
                    return None
                return _run(model, replace(sitemap, inputs={**sitemap.inputs, entry.ids: ids}), made if edit else ())
            finally:
                entry.prompt, self.forced = own, False

        def keep(into):
            def edit(i):
                def ed(module, q, k, v, mask, kwargs):
                    into.setdefault(i, (k[0, :, :P].clone(), v[0, :, :P].clone()))
                    return k, v, mask, kwargs
                return ed
            return edit

        def swap(i):
            def ed(module, q, k, v, mask, kwargs):
                return seat(k, kv_a[i][0], None), seat(v, kv_a[i][1], None), mask, kwargs
            return ed

        kv_a, kv_flip = {}, {}
        out_a = run("A", x, keep(kv_a))
        run("A", x.flip(-1), keep(kv_flip))
        if len(kv_a) != len(self.sites) or not all(_agree(kv_flip.get(i), kv_a[i]) for i in kv_a):
            return False
        out_b = run("B", x)
        if not _agree(run("B", x, swap), out_a, out_b):
            return False
        apart = run("A", x, forced=True)
        return apart is not None and _agree(apart, out_a, out_b, (1e-3, 5e-2))


class _Call(threading.local):
    current = None
    got = None


class _Slot(_Editor):
    """The editor of one attention site for Apart: while it records, it keeps the site's keys and values (batch row
    0); while a call adds them, it is a prefix's editor (put in front, or attended apart in a decoding step)."""

    def __init__(self, owner: Apart, i: int, causal: bool):
        self.owner, self.i, self.switch, self.causal = owner, i, owner, causal

    def source(self):
        return self.owner.current[self.i]

    on = property(lambda self: self.owner.current is not None or self.owner.got is not None)

    def apart(self):
        return super().apart() if self.owner.current is not None else None

    def __call__(self, module, q, k, v, mask, kwargs):
        got = self.owner.got
        if got is None:
            return super().__call__(module, q, k, v, mask, kwargs)
        if kwargs.get("sliding_window") is not None:
            got["window"] = True
        got.setdefault(self.i, (k[0].detach(), v[0].detach()))
        return k, v, mask, kwargs


class _Unproven(Intercepted):
    """An Apart editor: it acts only in calls that fill or read a cache, so the probe forward after apply has
    nothing to prove of it."""

    def watch(self, model):
        return None


def _agree(x, a, b=None, tol: tuple = (1e-4, 0.0)) -> bool:
    """Whether every tensor of output x is a's: bit for bit, or within tol (in 32 bits or more, in 16 bits) of how
    far b's is from a's (b None: of a's largest magnitude)."""
    if isinstance(x, torch.Tensor):
        if not isinstance(a, torch.Tensor) or x.shape != a.shape:
            return False
        if torch.equal(x, a) or not x.is_floating_point():
            return bool(torch.equal(x, a))
        t = tol[0] if x.element_size() >= 4 else tol[1]
        scale = (a.float() if b is None else b.float() - a.float()).abs().max()
        return bool((x.float() - a.float()).abs().max() <= t * scale)
    if isinstance(x, dict):
        return isinstance(a, dict) and x.keys() == a.keys() and all(
            _agree(x[k], a[k], None if b is None else b[k], tol) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(x) == len(a) and all(
            _agree(y, z, None if b is None else w, tol) for y, z, w in zip(x, a, b if b is not None else a))
    return True
