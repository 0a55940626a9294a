"""Rule: a trainable prompt prepended at the input embedding."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError
from .base import Rule
from .inputs import Entry


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
    """init(embedding_module, num_tokens) -> (num_tokens, dim) tensor gives the starting vectors."""
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
        emb = model.get_submodule(sites[0].path)
        with torch.no_grad():
            w = self.init(emb, self.num_tokens).to(device=emb.weight.device, dtype=emb.weight.dtype)
        enc = self.encoder(w.shape[-1]) if self.encoder else None
        return {sites[0].path: PromptEmbedding(w.clone(), enc)}

    def attach(self, model, sites, built, switch, sitemap):
        return Entry(model, sitemap.entry, sites[0].path, self.num_tokens, built[sites[0].path], switch).attach()

    def describe(self, site, built):
        return f"{self.num_tokens} virtual tokens prepended to the embeddings"
