"""Rule: a trainable prompt prepended at the input embedding."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule
from .inputs import Entry


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


class PromptEmbedding(nn.Module):
    """num_tokens trainable vectors; an optional encoder (e.g. P-tuning's) maps them before use."""

    def __init__(self, weight: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.encoder = encoder

    def forward(self, batch: int) -> torch.Tensor:
        p = self.weight if self.encoder is None else self.encoder(self.weight)
        return p.unsqueeze(0).expand(batch, -1, -1)


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
        emb = model.get_submodule(sites[0].path)
        with torch.no_grad():
            w = torch.zeros(self.num_tokens, emb.weight.shape[1]) if init is None else init(emb, self.num_tokens)
            w = w.to(device=emb.weight.device, dtype=emb.weight.dtype)
        enc = self.encoder(w.shape[-1]) if self.encoder else None
        return {sites[0].path: PromptEmbedding(w.clone(), enc)}

    def attach(self, model, sites, built, switch, sitemap):
        path = sites[0].path
        yield from Entry(model, sitemap, path, self.num_tokens, built[path], switch).attach(model)

    def loading(self, settings):
        """Loading overwrites the vectors: no initialisation from the embedding."""
        return Prompt(self.num_tokens, None, self.encoder, self.targets)

    def describe(self, site, built):
        return f"{self.num_tokens} virtual tokens prepended to the embeddings"
