"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): soft tokens placed by the task's template anywhere among
real anchor tokens (hybrid prompts, `{soft:2}{text}{soft} It was{soft}{answer}`), their vectors produced by a
prompt encoder (a bidirectional LSTM + MLP, the paper's, or an MLP alone) and written at the soft positions of the
input embeddings. Training runs through the encoder; a saved adapter holds its output only (num_tokens x width).

The soft positions are those of the batch the task layer scores (peftsurgery.tasks.soft_tokens_of): outside
scoring (a plain forward, generate()) the model is the base; scoring a template without soft tokens, or with another
number of them than num_tokens, is a one-line error.
"""
from dataclasses import dataclass

import torch
from torch import nn

from peftsurgery import SurgeryError, adapters, hookimpl
from peftsurgery.checks import integer
from peftsurgery.rewrite import Hooked, Rule, text_ids
from peftsurgery.rewrite.prompt import PromptEmbedding, starting_vectors
from peftsurgery.tasks import soft_tokens_of

__version__ = "1.0"
ENCODERS = ("lstm", "mlp")
INITS = ("vocab", "random")


@dataclass
class PTuningConfig:
    num_tokens: int = 4        # soft tokens per input: must equal the template's {soft} count
    encoder: str = "lstm"      # lstm: bidirectional 2-layer LSTM + MLP (the paper's) | mlp: MLP only
    encoder_hidden: int = 0    # the encoder's width (LSTM: half per direction); 0: the model's width
    init: str = "vocab"        # soft tokens not given by `text`: vocab (sampled token embeddings) | random
    text: str = ""             # token ids (`--set-ids text=...` tokenizes a text): soft tokens text_at, ... start there
    text_at: int = 0           # the first soft token (counted over the whole template) that `text` initialises
    seed: int = 0

    def __post_init__(self):
        integer("p-tuning", "num_tokens", self.num_tokens)
        integer("p-tuning", "encoder_hidden", self.encoder_hidden, least=0)
        integer("p-tuning", "text_at", self.text_at, least=0)
        integer("p-tuning", "seed", self.seed, least=None)
        if self.encoder not in ENCODERS:
            raise SurgeryError(f"p-tuning: encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.init not in INITS:
            raise SurgeryError(f"p-tuning: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.encoder == "lstm" and self.encoder_hidden % 2:
            raise SurgeryError(f"p-tuning: encoder_hidden must be even for the bidirectional LSTM (half per "
                               f"direction), got {self.encoder_hidden}")
        if self.text:
            try:
                n = len(text_ids(self.text))
            except SurgeryError as e:
                raise SurgeryError(f"p-tuning: {e}") from None
            if self.text_at + n > self.num_tokens:
                raise SurgeryError(f"p-tuning: text has {n} token ids from soft token {self.text_at} on, more than "
                                   f"num_tokens={self.num_tokens}; shorten the text or lower text_at")


class PromptEncoder(nn.Module):
    """(n, d) -> (n, d): x + MLP(BiLSTM(x)) (or x + MLP(x)). The MLP's last layer starts at zero, so every soft
    token starts exactly at its initial vector (a real word's embedding where chosen)."""

    def __init__(self, dim: int, hidden: int, kind: str):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden // 2, num_layers=2, bidirectional=True, batch_first=True) \
            if kind == "lstm" else None
        self.mlp = nn.Sequential(nn.Linear(hidden if self.lstm is not None else dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x):
        h = x if self.lstm is None else self.lstm(x[None])[0][0]
        return x + self.mlp(h)


def encoder_size(dim: int, hidden: int, kind: str) -> int:
    """Parameters of PromptEncoder(dim, hidden, kind)."""
    mlp = hidden * hidden + hidden + hidden * dim + dim
    if kind == "mlp":
        return dim * hidden + hidden + hidden * dim + dim
    h = hidden // 2   # per direction; layer 1 reads dim, layer 2 the 2h outputs of layer 1; two bias vectors
    return 2 * (4 * h * (dim + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h) + mlp


class _Fill:
    """Forward hook on the input embedding: the soft positions of the batch being scored get the prompt's vectors,
    in order (row-major, as the template placed them)."""

    def __init__(self, model: nn.Module, prompt: PromptEmbedding, switch, num_tokens: int):
        self.model, self.prompt, self.switch, self.num = model, prompt, switch, num_tokens

    def __call__(self, module, args, out):
        if not self.switch.on:
            return None
        soft = soft_tokens_of(self.model, take=True)
        if soft is None:      # not scoring a task: the base model
            return None
        counts = soft.sum(1)
        if not bool(counts.any()):
            raise SurgeryError("p-tuning fills soft tokens but the template has none; put {soft:N} in the template "
                               f"(N = num_tokens = {self.num}), or turn the adapter off")
        if bool((counts != self.num).any()):
            raise SurgeryError(f"the template has {int(counts.max())} soft tokens but the p-tuning adapter has "
                               f"num_tokens={self.num}; make them equal")
        if out.dim() != 3 or tuple(out.shape[:2]) != tuple(soft.shape):
            raise SurgeryError(f"p-tuning: the embedding gave shape {tuple(out.shape)} for a batch of "
                               f"{tuple(soft.shape)} tokens; apply p-tuning before methods that add tokens")
        fillers = [a.name for a in adapters(self.model).values() if a.switch.on
                   for r in a.records if getattr(r.rule, "fills_soft_tokens", False)]
        if len(fillers) > 1:
            raise SurgeryError(f"active adapters {', '.join(fillers)} all fill the soft tokens; keep one active "
                               "(set_active)")
        rows, cols = soft.nonzero(as_tuple=True)
        vectors = self.prompt(1)[0].to(out.dtype)
        return out.index_put((rows, cols), vectors.repeat(soft.shape[0], 1))


class _Filled(Hooked):
    """The fill hook; the probe forward (which has no soft tokens) proves only that the embedding ran."""

    def watch(self, model):
        ran = []
        handle = model.get_submodule(self.path).register_forward_hook(lambda *a: ran.append(True))
        return lambda: (handle.remove(), None if ran else "the embedding never ran on the example inputs")[1]


class SoftTokens(Rule):
    """num_tokens vectors (through `encoder` while training) written at the template's soft positions."""
    kinds = ("embedding",)
    phase = 2
    fills_soft_tokens = True

    def __init__(self, num_tokens: int, init=None, encoder=None):
        super().__init__("embed")
        self.num_tokens, self.init, self.encoder = num_tokens, init, encoder

    def select(self, sitemap):
        return super().select(sitemap)[:1]

    def build(self, model, sites, sitemap):
        init, self.init = self.init, None   # used once here; the rule stays on the model and must pickle
        w = starting_vectors(model.get_submodule(sites[0].path), self.num_tokens, init)
        enc = None
        if self.encoder is not None:
            kind, hidden = self.encoder
            enc = PromptEncoder(w.shape[1], hidden or w.shape[1], kind).to(device=w.device, dtype=w.dtype)
        return {sites[0].path: PromptEmbedding(w.clone(), enc)}

    def attach(self, model, sites, built, switch, sitemap):
        path = sites[0].path
        yield _Filled(model, path, _Fill(model, built[path], switch, self.num_tokens))

    def state(self, built):
        """The encoder folded away: its output is what is saved (loaded without an encoder, see loading)."""
        (path, m), = built.items()
        if m.encoder is None:
            return {path: {"weight": m.weight}}, {}
        with torch.no_grad():
            return {path: {"weight": m(1)[0].detach().clone()}}, {}

    def loading(self, settings):
        return SoftTokens(self.num_tokens)

    def describe(self, site, built):
        how = "" if self.encoder is None else f" (from a {self.encoder[0]} prompt encoder)"
        return f"{self.num_tokens} soft tokens written at the template's {{soft}} positions{how}"


def initial(config):
    def init(embedding, n):
        g = torch.Generator().manual_seed(config.seed)
        w = embedding.weight.detach()
        if config.init == "random":
            start = torch.empty(n, w.shape[1]).uniform_(-0.5, 0.5, generator=g).to(w.device) * w.float().std()
        else:
            start = w[torch.randint(0, w.shape[0], (n,), generator=g).to(w.device)].float()
        if config.text:
            ids = text_ids(config.text, vocab=w.shape[0])
            start[config.text_at:config.text_at + len(ids)] = w[ids.to(w.device)].float()
        return start
    return init


@hookimpl
def peftsurgery_config():
    return PTuningConfig


@hookimpl
def peftsurgery_describe():
    return ("P-tuning: soft tokens anywhere in the template (hybrid prompts) from a prompt encoder (lstm|mlp), "
            "folded away when saved")


@hookimpl
def peftsurgery_rules(config, sites):
    return [SoftTokens(config.num_tokens, initial(config), (config.encoder, config.encoder_hidden))]


@hookimpl
def peftsurgery_budget(config, sites):
    """While training: the vectors and the encoder. A saved (and loaded) adapter holds num_tokens x width."""
    dim = sites.select("embed", SoftTokens.kinds)[0].out_features
    return config.num_tokens * dim + encoder_size(dim, config.encoder_hidden or dim, config.encoder)


@hookimpl
def peftsurgery_learning_rate(config):
    # the sentiment task's validation sentences: 81.4% at 1e-3, 78.8% at 3e-3 (seed 0); a second task, hedge
    # detection (seed 0, 200 validation sentences): 62.5% at both
    return 1e-3
