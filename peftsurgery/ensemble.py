"""Prompt ensembling (Lester et al., 2021): k adapters of one method (prompts, usually) for one task, trained
together in one batch, each example replicated across them and every replica routed to its own member (see
surgery.route), and combined when predicting: the mean of the members' class probabilities, or their majority
vote (ties go to the higher mean probability).

    names = apply_ensemble(model, "prompt-tuning", 5, num_tokens=20)
    ens = Ensemble(task, names)                 # task: a peftsurgery.tasks.Task
    fit(model, ens, examples)                   # peftsurgery.train.fit: one loss over every replica
    evaluate_ensemble(model, ens, test)         # {"accuracy": mean of probabilities, "accuracy_vote": ..., ...}
"""
from __future__ import annotations

import dataclasses

import torch

from .errors import SurgeryError
from .registry import Method
from .surgery import adapters, apply, remove, route
from .train import _known, evaluating

COMBINES = ("mean", "vote")


def members(name: str, k: int) -> list[str]:
    return [f"{name}-{i}" for i in range(k)]


def apply_ensemble(model, plugin: str, k: int, name: str = "ensemble", **config) -> list[str]:
    """Attach k adapters of `plugin` named name-0 .. name-(k-1) and return their names. A method with a `seed`
    option gets seed, seed + 1, ... Members must start apart: trained on the same replicated batches, members that
    start identical stay identical (an ensemble of one), which is refused. All or nothing: a failure removes those
    attached."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise SurgeryError(f"an ensemble needs at least 2 members, got {k!r}")
    seeded = "seed" in {f.name for f in dataclasses.fields(Method(plugin).config_class)}
    seed = int(config.pop("seed", 0)) if seeded else None
    done = []
    try:
        for i, n in enumerate(members(name, k)):
            apply(model, plugin, name=n, **config, **({} if seed is None else {"seed": seed + i}))
            done.append(n)
        start = [_start(model, n) for n in done]
        if all(len(s) == len(start[0]) and all(torch.equal(a, b) for a, b in zip(s, start[0])) for s in start[1:]):
            given = ", ".join(f"{key}={value}" for key, value in config.items()) or "its defaults"
            raise SurgeryError(f"the {k} {plugin} members start identical ({given}), so training would make them "
                               "one adapter; use an initialisation drawn from the seed (prompt methods: init=vocab "
                               "or init=random)")
    except BaseException:
        for n in reversed(done):
            remove(model, n)
        raise
    return done


def _start(model, name: str) -> list[torch.Tensor]:
    """The member's trainable tensors as built."""
    return [p for r in adapters(model)[name].records for m in r.built.values() for p in m.parameters()
            if p.requires_grad]


class Ensemble:
    """A task over k member adapters: encode() replicates each example k times (replica j of example i is row
    i * k + j, routed to member j) and scores() gives every replica's scores, (examples * k, labels), what
    training's cross-entropy takes (peftsurgery.train.fit); combine() and predict() give one answer per example."""

    def __init__(self, task, names: list[str], combine: str = "mean"):
        if len(names) < 2:
            raise SurgeryError(f"an ensemble needs at least 2 members, got {len(names)}")
        if combine not in COMBINES:
            raise SurgeryError(f"unknown ensemble combination {combine!r}; use one of {', '.join(COMBINES)}")
        self.task, self.names, self.how = task, list(names), combine

    @property
    def labels(self) -> list[str]:
        return self.task.labels

    def to_json(self) -> dict:
        return {**self.task.to_json(), "ensemble": self.names, "combine": self.how}

    def encode(self, examples):
        return self.task.encode([e for e in examples for _ in self.names])

    def scores(self, model, batch) -> torch.Tensor:
        k = len(self.names)
        with route(model, [self.names[int(r) % k] for r in batch.row_of]):
            return self.task.scores(model, batch)

    def combine(self, scores: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """(examples, labels) from every replica's scores: log of the mean probability, or votes (+ half the
        mean probability, which breaks ties only)."""
        how = how or self.how
        if how not in COMBINES:
            raise SurgeryError(f"unknown ensemble combination {how!r}; use one of {', '.join(COMBINES)}")
        p = scores.float().softmax(-1).view(-1, len(self.names), scores.shape[-1])
        if how == "mean":
            return p.mean(1).log()
        return torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).sum(1) + p.mean(1) / 2

    def predict(self, model, examples, how: str | None = None) -> torch.Tensor:
        """The label index predicted for each example."""
        with evaluating(model):
            return self.combine(self.scores(model, self.encode(examples)), how).argmax(-1).cpu()


def evaluate_ensemble(model, ens: Ensemble, examples, batch_size: int = 32) -> dict:
    """Accuracy of the mean of probabilities ("accuracy"), of the majority vote, and of each member alone."""
    _known(ens.task, examples, "evaluation")
    k = len(ens.names)
    right = {"mean": 0, "vote": 0, "members": torch.zeros(k, dtype=torch.long)}
    with evaluating(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            targets = torch.tensor([ens.labels.index(e.label) for e in chunk])
            s = ens.scores(model, ens.encode(chunk)).cpu()
            for how in COMBINES:
                right[how] += int((ens.combine(s, how).argmax(-1) == targets).sum())
            right["members"] += (s.argmax(-1).view(-1, k) == targets[:, None]).sum(0)
    n = len(examples)
    return {"accuracy": right["mean"] / n, "accuracy_vote": right["vote"] / n,
            "member_accuracy": [int(c) / n for c in right["members"]]}


def save_ensemble(model, ens: Ensemble, directory: str) -> str:
    """Every member in its own folder under `directory` (directory/name-i, each as peftsurgery.save writes it)."""
    import os

    from .io import save
    os.makedirs(directory, exist_ok=True)
    for n in ens.names:
        save(model, os.path.join(directory, n), name=n)
    return directory


def load_ensemble(model, task, directory: str, names: list[str], combine: str = "mean") -> Ensemble:
    """The members save_ensemble wrote, attached under their names (all or nothing), as an Ensemble over `task`."""
    import os

    from .io import load
    done = []
    try:
        for n in names:
            load(model, os.path.join(directory, n), name=n)
            done.append(n)
    except BaseException:
        for n in reversed(done):
            remove(model, n)
        raise
    return Ensemble(task, names, combine)
