"""Rule: a trainable prompt prepended at the input embedding."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule
from .inputs import Entry, routed_entry


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
        yield from Entry(model, sitemap, path, self.num_tokens, built[path], switch).attach(model)

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
        return f"{self.num_tokens} virtual tokens prepended to the embeddings"


def starting_vectors(emb: nn.Module, num_tokens: int, init) -> torch.Tensor:
    """(num_tokens, width) vectors to start soft tokens from: init(emb, num_tokens), or zeros without one, on the
    embedding's device and dtype."""
    with torch.no_grad():
        w = torch.zeros(num_tokens, emb.weight.shape[1]) if init is None else init(emb, num_tokens)
        return w.to(device=emb.weight.device, dtype=emb.weight.dtype)
