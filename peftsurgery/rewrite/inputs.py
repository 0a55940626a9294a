"""Virtual tokens at the model's entry: what prompt and prefix methods need around the attention ops.

The entry is the module whose forward receives the token ids (found by locate). A pre-hook there
- for tokens placed in the sequence (prompts): prepends them to the input embeddings, extends the attention mask
  with ones and other per-token inputs (token type ids) with zeros, and afterwards a post-hook drops their
  positions from every output, so outputs line up with the user's tokens;
- for every kind: gives real tokens position ids that follow the attention mask, shifted by the number of
  virtual tokens, so padding (left or right) does not move them and virtual tokens sit just before the first
  real token.
During cached decoding (the mask is longer than the new tokens) nothing is prepended again. Where a prompt is
attended apart (`apart`, see prompt.Apart), a call without gradients that fills an empty cache puts nothing in the
sequence either: the prompt's keys and values are recorded once and every attention call of it and of the decoding
steps on that cache adds them, as a prefix's, and the real tokens' positions are shifted as a prefix shifts them.
Under route() one RoutedEntry serves every routed adapter: row i gets its own adapter's prompt, right-aligned in as
many slots as the batch's longest (the slots before a shorter prompt are masked out), and positions shifted by its
own prefix length.
"""
from __future__ import annotations

import inspect
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from .base import Change, Hooked, Switch


def cache_length(past) -> int:
    """Tokens a cache holds (0 for a cache of recurrent states only, which has no length: see holds_state)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        # the first layer's length, else the longest another layer holds: the first may keep no tokens (MiniMax's
        # linear attention keeps its state outside the cache's layers, whose first then has length 0)
        for i in range(max(1, len(getattr(past, "layers", ())))):
            try:
                n = int(past.get_seq_length(i) if i else past.get_seq_length())
            except (ValueError, IndexError):   # transformers: only attention layers have a length
                continue
            if n:
                return n
        return 0
    try:
        return int(past[0][0].shape[-2])
    except Exception:
        return 0


def holds_state(past) -> bool:
    """Whether a cache of recurrent states (Mamba-2's) holds the state of earlier tokens."""
    has = getattr(past, "has_previous_state", None)
    try:
        return bool(has()) if callable(has) else False
    except (ValueError, AttributeError):   # no recurrent layers (an encoder-decoder's cache has no layers of its own)
        return False


def find_cache(kwargs: dict):
    """The call's cache: `past_key_values`, or under another name (Mamba's `cache_params`), found by its type."""
    past = kwargs.get("past_key_values")
    return past if past is not None else next((v for v in kwargs.values() if hasattr(v, "get_seq_length")), None)


class _PerCall(threading.local):
    def __init__(self):
        self.pending, self.lead, self.recording = [], None, False


class Entry:
    """Hooks on the entry module (`at`: another module taking token ids, such as a decoder's stack), shared by
    every virtual-token rule of one adapter (`prompt` given: `num` tokens placed in the sequence; else a prefix of
    `num` keys/values, which only shifts positions)."""

    def __init__(self, model: nn.Module, sitemap, embed: str | None, num: int, prompt=None,
                 switch: Switch | None = None, at: str | None = None):
        self.entry, self.embed_path = sitemap.entry if at is None else at, embed
        self.module = model.get_submodule(self.entry)
        self.embed = model.get_submodule(embed) if embed else None
        self.prompt, self.switch = prompt, switch
        self.num = num if prompt is not None else 0   # virtual tokens in the sequence
        self.shift = 0 if prompt is not None else num  # positions taken before the sequence (prefix keys)
        self.lens = None   # under route(): (batch, 1) prompt tokens per row, when they differ (see RoutedEntry)
        self.params = list(inspect.signature(self.module.forward).parameters)
        # the token argument at the entry: the model input found to feed the embedding, else input_ids
        self.ids = sitemap.token_input if sitemap.token_input in self.params else "input_ids"
        self.call = _PerCall()
        self.apart = None   # a prompt's keys and values attended apart from the cache (prompt.Apart), where proven

    # what one call holds, per thread (two threads may run the model at once): the layouts of the calls under way
    # (0 where nothing was prepended), this call's left padding per row ((batch, 1), where the virtual tokens sit
    # after it), and whether the entry runs on the prompt alone (Apart.record: nothing to add)
    pending = property(lambda self: self.call.pending)
    lead = property(lambda self: self.call.lead, lambda self, v: setattr(self.call, "lead", v))
    recording = property(lambda self: self.call.recording, lambda self, v: setattr(self.call, "recording", v))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "call"}

    def __setstate__(self, state):
        self.__dict__.update(state, call=_PerCall())

    def attach(self, model: nn.Module):
        if self.prompt is not None:
            placed = [e.prompt for e in self.others() if e.prompt is not None]
            seats = [getattr(p, "seated", False) for p in placed + [self.prompt]]
            if placed and any(seats):
                raise SurgeryError("a prefix seated in the sequence (this model adds a position bias to its scores) "
                                   "cannot share it with another adapter's virtual tokens; remove the other adapter "
                                   "or use one at a time")
        yield Hooked(model, self.entry, self.pre, pre=True, with_kwargs=True)
        if self.prompt is not None:  # only tokens placed in the sequence are taken out of the outputs, the last
            # placed first (another adapter's prompt put in front of these is taken out before)
            yield Hooked(model, self.entry, self.post, with_kwargs=True, always_call=True, first=True)
            if "inputs_embeds" not in self.params:
                yield Hooked(model, self.embed_path, self.on_embed)

    def others(self) -> list["Entry"]:
        """The other adapters' entries hooked on the same module."""
        return [e for h in self.module._forward_pre_hooks.values()
                if isinstance(e := getattr(h, "__self__", None), Entry) and e is not self]

    def _push(self, done) -> None:
        """What this call prepended, for post() to take out (prompts only: prefixes put nothing in the sequence)."""
        if self.prompt is not None:
            self.pending.append(done)

    def _head(self, B: int, dtype, dev) -> torch.Tensor:
        """The attention mask of the virtual tokens, (B, num): ones, or under route() zeros before shorter
        prompts (so a row's prompt sits right before its first real token)."""
        if self.lens is None:
            return torch.ones(B, self.num, dtype=dtype, device=dev)
        return (torch.arange(self.num, device=dev) >= self.num - self.lens).to(dtype)

    def pre(self, module, args, kwargs):
        if not self.switch.on or self.recording:
            self._push(0)
            return None
        kwargs = {**dict(zip(self.params, args)), **kwargs}
        ids, embeds = kwargs.get(self.ids), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            self._push(0)
            return None
        B, S = x.shape[0], x.shape[1]
        P, dev = self.num, x.device
        self.check_batch(B)
        mask = kwargs.get("attention_mask")
        found = find_cache(kwargs)
        cache = found if mask is None else None
        past = cache_length(cache)
        decoding = (mask is not None and mask.shape[-1] > S) or past > 0 or holds_state(cache)
        apart = self.apart is not None and self.apart.takes(self, kwargs, found, decoding)
        P, shift = (0, self.num) if apart else (P, self.shift)
        prepend = self.prompt is not None and not decoding and not apart
        layout = Layout(mask, B, S, P, dev) if prepend else None
        self.lead = None
        if self.prompt is not None and not apart:
            if mask is not None or prepend and "attention_mask" in self.params:
                if mask is None:
                    mask = torch.ones(B, S, dtype=torch.long, device=dev)
                if mask.dim() == 2:  # while decoding the prompt is in the cache, after the same left padding
                    grown = layout if prepend else Layout(mask, B, mask.shape[1], P, dev)
                    mask = grown.place(torch.cat([self._head(B, mask.dtype, dev), mask], 1))
                    self.lead = None if grown.plain else grown.lead
                kwargs["attention_mask"] = mask
            if self.lens is not None and (mask is None or mask.dim() != 2):
                raise SurgeryError("route() with prompts of different lengths in one batch needs a (batch, "
                                   "sequence) attention_mask on every call; pass attention_mask")
        if prepend:
            for k, v in list(kwargs.items()):
                if k not in (self.ids, "inputs_embeds", "attention_mask", "position_ids", "labels") and \
                        isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (B, S):
                    kwargs[k] = layout.place(torch.cat([torch.zeros(B, P, dtype=v.dtype, device=dev), v], 1))
            if "inputs_embeds" in self.params:
                if embeds is None:
                    # an image's or a sound's features (not another sequence's states, which cross-attention reads,
                    # nor a mask given as floats)
                    media = next((k for k, v in kwargs.items() if k != "inputs_embeds" and not k.startswith("encoder_")
                                  and not k.endswith("mask") and isinstance(v, torch.Tensor) and v.is_floating_point()
                                  and v.dim() >= 3), None)
                    if media is not None:   # (Qwen2-Audio merges its sound only when given the ids: it was lost)
                        self._push(0)
                        raise SurgeryError(f"{type(module).__name__} is given {media} beside the token ids, which the "
                                           "virtual tokens turn into embeddings, and the model may place it by the "
                                           "ids; call it with token ids alone, or use a method that changes its "
                                           "layers")
                    embeds = self.embed(ids)
                kwargs["inputs_embeds"] = layout.place(torch.cat([self.prompt(B).to(embeds), embeds], 1))
                kwargs[self.ids] = None
        if "position_ids" in self.params:
            kwargs["position_ids"] = self._positions(kwargs.get("position_ids"), mask, B, S, past, layout, dev, P,
                                                     shift)
        self._push(layout or 0)
        return (), kwargs

    def check_batch(self, B: int) -> None:
        """Under route(): the batch must have one row per name."""

    def _positions(self, given, mask, B, S, past, layout, dev, P, shift):
        """Real tokens follow the mask (or the given position ids) after the P virtual tokens in the sequence;
        prompt tokens count from 0 right before a row's first real token; prefix keys (and a prompt attended apart)
        take the first `shift` positions."""
        if given is not None and given.dim() == 3:   # one row of positions per rotary section (Qwen2-VL's, Qwen3.5's)
            return torch.stack([self._positions(g, mask, B, S, past, layout, dev, P, shift) for g in given])
        if given is not None:
            pos = given + (P if self.lens is None else self.lens) + shift
            if layout is not None:
                head = torch.arange(P, device=dev).expand(B, P)
                if self.lens is not None:
                    head = (head - (P - self.lens)).clamp(min=0)
                pos = layout.place(torch.cat([head.to(pos.dtype), pos], 1))
            return pos
        n = S + P if layout is not None else S
        if mask is not None and mask.dim() == 2:   # prompts are in the mask; prefixes are not
            return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:] + shift
        return torch.arange(past, past + n, device=dev).expand(B, n) + shift

    def on_embed(self, module, args, out):
        layout = self.pending[-1] if self.pending else 0
        if layout and out.dim() == 3 and out.shape[1] + self.num == layout.total:
            return layout.place(torch.cat([self.prompt(out.shape[0]).to(out), out], 1))
        return None

    def post(self, module, args, kwargs, out):
        if self.apart is not None and not self.recording:
            self.apart.current = None
        layout = self.pending.pop() if self.pending else 0
        if not layout:
            return None
        first = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) and out else \
            next(iter(out.values()), None) if isinstance(out, dict) else None   # (a ModelOutput: its first field)
        if isinstance(first, torch.Tensor) and first.dim() >= 3 and first.shape[1] > layout.total:
            raise SurgeryError(f"{type(module).__name__} returned {first.shape[1]} positions for {layout.total - layout.P}"
                               f" tokens and {layout.P} virtual ones: it adds positions of its own (an image's or a "
                               "sound's), so where the virtual tokens sit in its outputs is unknown; call it with "
                               "token ids alone, or use a method that changes its layers")
        return _drop(out, layout)


class RoutedEntry(Entry):
    """Under route(): one entry hook for the virtual tokens of every routed adapter, row i getting those of its
    own adapter (see routed_entry). Rules add what they need, then attach what hooks() gives."""

    def __init__(self, model: nn.Module, sitemap, rows: torch.Tensor):
        super().__init__(model, sitemap, None, 0, None, Switch())
        self.rows, self.attached = rows, []

    def add_prompts(self, model: nn.Module, embed: str, prompt, lens: list[int]) -> None:
        """Row i gets lens[i] prompt tokens (0: none), right-aligned in max(lens) slots: prompt(B) gives them.
        Called by several rules (each row's prompt comes from one of them), their prompts go side by side."""
        if self.prompt is not None:
            before = self.lens.view(-1).tolist() if self.lens is not None else [self.num] * len(lens)
            lens = [a + b for a, b in zip(before, lens)]
            prompt = _Together(self.prompt, prompt, max(lens))
        if len(set(lens)) > 1:
            if "attention_mask" not in self.params:
                raise SurgeryError(f"route() cannot mix prompts of different lengths (or rows without one) in one "
                                   f"batch here: {type(self.module).__name__} takes no attention_mask to mask the "
                                   "shorter ones; route rows with prompts of one length")
            self.lens = torch.tensor(lens, device=self.rows.device).view(-1, 1)
        self.prompt, self.num, self.embed_path, self.embed = prompt, max(lens), embed, model.get_submodule(embed)

    def add_prefixes(self, lens: list[int]) -> None:
        """Row i has lens[i] prefix keys (0: none): its real tokens' positions come after them."""
        self.shift = torch.tensor(lens, device=self.rows.device).view(-1, 1) if len(set(lens)) > 1 else lens[0]

    def hooks(self, model: nn.Module) -> list[Change]:
        """The hooks this call still needs, attached now."""
        want = [(self.entry, self.pre, dict(pre=True, with_kwargs=True)),
                (self.entry, self.post, dict(with_kwargs=True, always_call=True))]
        if self.prompt is not None and "inputs_embeds" not in self.params:
            want.append((self.embed_path, self.on_embed, {}))
        new = [Hooked(model, path, fn, **kw) for path, fn, kw in want if fn not in self.attached]
        self.attached += [c.hook for c in new]
        return new

    def check_batch(self, B: int) -> None:
        if B != len(self.rows):
            raise SurgeryError(f"route was given {len(self.rows)} adapter names but the model sees a batch of {B} "
                               "rows; give one name per row")


class _Together:
    """The prompts of two rules for the rows of one batch (a row has those of one rule only: zeros in the other),
    right-aligned in P slots."""

    def __init__(self, a, b, P: int):
        self.a, self.b, self.P = a, b, P

    def __call__(self, batch: int) -> torch.Tensor:
        a, b = self.a(batch), self.b(batch)
        return F.pad(a, (0, 0, self.P - a.shape[1], 0)) + F.pad(b, (0, 0, self.P - b.shape[1], 0))


def routed_entry(model: nn.Module, rows: torch.Tensor, cache: dict) -> RoutedEntry:
    """The RoutedEntry of this route() call (kept in cache["call"], which route() sets up and clears)."""
    call = cache["call"]
    if "entry" not in call:
        call["entry"] = RoutedEntry(model, call["sitemap"], rows)
    return call["entry"]


class Layout:
    """Where a prompt of P virtual tokens goes in each row of a batch of S tokens: right before the row's first
    real token, after any left padding (so a padded row computes what it computes alone, also in models without
    attention masks). place() rearranges a (B, P + S, ...) tensor built prompt-first; keep() picks the user's S
    positions back out of any axis."""

    def __init__(self, mask, B: int, S: int, P: int, dev):
        lead = (mask.cumsum(-1) == 0).sum(-1, keepdim=True) if mask is not None and mask.dim() == 2 else \
            torch.zeros(B, 1, dtype=torch.long, device=dev)
        # no padding on the left: nothing to move (decided from the data, so not inside torch.compile)
        self.P, self.total, self.plain = P, S + P, not torch.compiler.is_compiling() and not bool(lead.any())
        self.lead = lead
        j, i = torch.arange(S + P, device=dev), torch.arange(S, device=dev)
        self.src = torch.where(j < lead, j + P, torch.where(j < lead + P, j - lead, j))   # (B, S + P)
        self.kept = torch.where(i < lead, i, i + P)                                         # (B, S)

    def place(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.plain else _gather(t, 1, self.src)

    def keep(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.plain:
            return t.narrow(dim, self.P, self.total - self.P)
        return _gather(t, dim, self.kept)


def _gather(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """t gathered along `dim` with a (batch, n) index, batch on axis 0."""
    shape = [index.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = index.shape[1]
    size = list(t.shape)
    size[dim] = index.shape[1]
    return t.gather(dim, index.view(shape).expand(size))


def _drop(out, layout: Layout, key: str = ""):
    """Take the prompt's positions back out of every tensor of an output where the entry put them: the sequence
    axis (1) of hidden states and logits; the query and key axes of attention maps (the last two axes of an entry
    named *attentions, or of a 4-D tensor whose last axis is the sequence; cross-attention maps only on their key
    axis)."""
    total = layout.total
    if isinstance(out, torch.Tensor):
        if "attention" in key or (out.dim() == 4 and out.shape[-1] == total):
            if out.shape[-1] == total:
                out = layout.keep(out, out.dim() - 1)
            if out.dim() >= 3 and out.shape[-2] == total and not key.startswith("cross"):
                out = layout.keep(out, out.dim() - 2)
            return out
        return layout.keep(out, 1) if out.dim() >= 2 and out.shape[1] == total else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_drop(o, layout, key) for o in out)
    if isinstance(out, list):
        return [_drop(o, layout, key) for o in out]
    if isinstance(out, dict):  # ModelOutput is a dict subclass with attributes
        for k in list(out.keys()):
            if k != "past_key_values":
                out[k] = _drop(out[k], layout, k)
        return out
    return out
