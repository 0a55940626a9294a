"""Prompt tuning: trainable virtual-token embeddings prepended to the input (Lester et al., 2021)."""
from dataclasses import dataclass

import torch

from peftsurgery import SurgeryError, hookimpl, read_adapter
from peftsurgery.checks import integer
from peftsurgery.rewrite import Prompt, check_text_init, text_ids

__version__ = "1.0"
INITS = ("random", "vocab", "text")
PRETRAINED = "pretrained:"


@dataclass
class PromptTuningConfig:
    num_tokens: int = 20
    # random | vocab (embeddings of sampled vocabulary tokens) | text | pretrained:DIR (the vectors of a
    # prompt-tuning adapter saved in DIR, e.g. by `peftsurgery pretrain-prompt`: PPT)
    init: str = "vocab"
    text: str = ""               # token ids, comma-separated, for init=text (or pass init_ids from Python)
    seed: int = 0

    def __post_init__(self):
        integer("prompt-tuning", "num_tokens", self.num_tokens)
        integer("prompt-tuning", "seed", self.seed, least=None)
        if str(self.init).startswith(PRETRAINED):
            if not self.init[len(PRETRAINED):]:
                raise SurgeryError("prompt-tuning: init=pretrained:DIR needs the folder of a saved prompt-tuning "
                                   "adapter")
        elif self.init not in INITS:
            raise SurgeryError(f"prompt-tuning: init must be one of {', '.join(INITS)} or pretrained:DIR, got "
                               f"{self.init!r}")
        check_text_init("prompt-tuning", self.init, self.text)


def initial(config):
    def init(embedding, n):
        g = torch.Generator().manual_seed(config.seed)
        w = embedding.weight
        if config.init == "random":
            u = torch.empty(n, w.shape[1]).uniform_(-0.5, 0.5, generator=g)
            return u.to(w.device) * w.detach().float().std()
        if config.init == "vocab":
            ids = torch.randint(0, w.shape[0], (n,), generator=g)
        else:  # text: repeat the ids to fill num_tokens, as the seeds describe
            ids = text_ids(config.text, n, w.shape[0])
        return w.detach()[ids.to(w.device)]
    return init


@hookimpl
def peftsurgery_config():
    return PromptTuningConfig


@hookimpl
def peftsurgery_describe():
    return "Prompt tuning: trainable virtual tokens prepended at the input embedding"


def pretrained(config, sites):
    """init=pretrained:DIR: the saved adapter's vectors, checked against this model and num_tokens."""
    directory = config.init[len(PRETRAINED):]
    _, tensors = read_adapter(directory, "prompt-tuning", sites)
    (w,) = tensors.values()
    if w.shape[0] != config.num_tokens:
        raise SurgeryError(f"{directory} holds {w.shape[0]} virtual tokens; set num_tokens={w.shape[0]}")
    return lambda embedding, n: w.to(embedding.weight.device)


@hookimpl
def peftsurgery_rules(config, sites):
    init = pretrained(config, sites) if config.init.startswith(PRETRAINED) else initial(config)
    return [Prompt(config.num_tokens, init)]


@hookimpl
def peftsurgery_budget(config, sites):
    embed = sites.select("embed", Prompt.kinds)[0]
    return config.num_tokens * embed.out_features


@hookimpl
def peftsurgery_learning_rate(config):
    # chosen on validation sentences outside the example's train and test sets, mean over 5 seeds (README,
    # "Real model example");
    # checked on a second task, hedge detection (one seed, 200 validation sentences): 57.5% at this rate, 59.0% at 3e-2
    return 1e-3


@hookimpl
def peftsurgery_learning_rates(config):
    # for --lr auto: from the default up to 3e-2, the best rate on a 5-topic task (issue #13), which is unstable on
    # the sentiment task (validated there from 1e-3 to 3e-2, README "Real model example")
    return [1e-3, 3e-3, 1e-2, 3e-2]
