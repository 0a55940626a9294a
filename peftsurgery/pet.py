"""PET (Schick and Schuetze, 2021): several pattern-verbalizer pairs (PVPs) for one task, one adapter trained per
PVP on the small labelled set over one frozen base; their ensemble labels an unlabelled set with soft labels; a
final classifier (a task head, optionally with an adapter of its own) is distilled from those soft labels and then
classifies the plain text with no pattern. Beside the task layer (tasks.py) and the loop (train.py), which it uses;
`peftsurgery pet` is its command.

Soft labels: the PVPs' label scores averaged, each weighted by its accuracy on the labelled set before training
(the paper's weighting; weighted=False: equal weights), then softmax(s / temperature) (the paper's T = 2). The
final classifier reads the text (a pair as the tokenizer's pair encoding) and trains on the cross-entropy against
the soft labels (the paper's); final_labelled=True adds the labelled examples with their own labels (one-hot), the
merged set the seed document describes.
"""
from __future__ import annotations

import copy
import os

import torch

from .errors import SurgeryError
from .train import Example, _batches, _known, evaluate, evaluating, fit


def label_scores(model, task, examples: list[Example], batch_size: int = 32) -> torch.Tensor:
    """(examples, labels) scores of `task` on the model as it is (no gradients)."""
    with evaluating(model):
        return torch.cat([task.scores(model, task.encode(c)).float().cpu() for c in _batches(examples, batch_size)])


def soft_labels(scores: list[torch.Tensor], weights: list[float], temperature: float = 2.0) -> torch.Tensor:
    """softmax of the weighted mean of the PVPs' scores, divided by the temperature."""
    w = torch.tensor(weights, dtype=torch.float32)
    if not bool((w > 0).any()):
        w = torch.ones_like(w)   # every PVP at 0 accuracy: equal weights rather than none
    mean = sum(wi * s for wi, s in zip(w, scores)) / w.sum()
    return (mean / temperature).softmax(-1)


class Distill:
    """The final classifier's task: rows are (Example, soft label) pairs; the model's forward returns the task
    head's logits (batch, labels); loss() is the cross-entropy against the soft labels."""

    def __init__(self, tokenizer, max_length: int = 256):
        if getattr(tokenizer, "pad_token", None) is None:   # a copy that pads with its end-of-sequence token
            if getattr(tokenizer, "eos_token", None) is None:
                raise SurgeryError("the tokenizer has neither a padding nor an end-of-sequence token to pad with")
            tokenizer = copy.copy(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.max_length = tokenizer, max_length

    def inputs(self, examples: list[Example], device) -> dict:
        texts = [e.text for e in examples]
        pairs = [e.text_b for e in examples] if any(e.text_b is not None for e in examples) else None
        if pairs is not None and None in pairs:
            raise SurgeryError("some examples have text_b and some not; give pairs for all or none")
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def logits(self, model, examples) -> torch.Tensor:
        out = model(**self.inputs(examples, next(model.parameters()).device))
        logits = out["logits"] if isinstance(out, dict) else out[0]
        if logits.dim() != 2:
            raise SurgeryError("the final classifier's head gives no (batch, labels) logits; give a sequence-task "
                               f"head plugin ({', '.join(head_plugins()) or 'none installed'})")
        return logits.float()

    def loss(self, model, rows) -> torch.Tensor:
        q = torch.stack([t for _, t in rows]).to(next(model.parameters()).device)
        return -(q * self.logits(model, [e for e, _ in rows]).log_softmax(-1)).sum(-1).mean()

    def accuracy(self, model, examples: list[Example], labels: list[str], batch_size: int = 32) -> float:
        right = 0
        with evaluating(model):
            for c in _batches(examples, batch_size):
                pred = self.logits(model, c).argmax(-1).cpu()
                right += int((pred == torch.tensor([labels.index(e.label) for e in c])).sum())
        return right / len(examples)


def head_options(head: str, labels: int, config: dict | None = None) -> dict:
    """The final head's options (task="sequence", labels, then `config`), checked: a plugin that is no sequence
    head is refused in one line."""
    from .registry import Method
    options = {"task": "sequence", "labels": labels, **dict(config or {})}
    try:
        Method(head).config(options)
    except SurgeryError as e:
        raise SurgeryError(f"the final head {head!r} does not take these options ({e}); give a sequence-task head "
                           f"plugin ({', '.join(head_plugins()) or 'none installed'})") from None
    return options


def head_plugins() -> list[str]:
    """The installed methods that can be a final head: their config takes task="sequence" and a label count."""
    from .registry import Method, names
    out = []
    for name in names():
        try:
            Method(name).config({"task": "sequence", "labels": 2})
            out.append(name)
        except SurgeryError:
            pass
    return out


def pet(model, tokenizer, tasks: list, labelled: list[Example], unlabelled: list[Example], plugin: str = "lora",
        config: dict | None = None, epochs: int = 3, batch_size: int = 16, lr: float | None = None,
        weighted: bool = True, temperature: float = 2.0, final_plugin: str | None = None,
        final_config: dict | None = None, final_epochs: int = 3, final_lr: float = 1e-3, test: list | None = None,
        out: str | None = None, seed: int = 0, progress: bool = False, final_labelled: bool = False,
        head: str = "task-head", head_config: dict | None = None) -> dict:
    """The whole pipeline over `tasks` (peftsurgery.tasks.Task objects with the same labels, one per PVP). Each
    PVP's adapter is trained, scores the unlabelled set (and `test`), is saved under out/pvp-J when `out` is given,
    and is removed; then the final classifier (plugin `head` with task="sequence", labels=the number of labels and
    `head_config`: task-head, or p-tuning-v2 whose head comes with deep prompts; `final_plugin` beside it when given)
    is attached as adapters "final" (and "final-adapter") and distilled from the soft labels (final_labelled: the
    labelled examples too, their own labels as one-hot targets). Returns the accuracies and the soft labels."""
    from .io import save
    from .registry import Method
    from .surgery import adapters, apply, remove
    if adapters(model):
        raise SurgeryError(f"PET trains its own adapters on a bare model, and this one has {', '.join(adapters(model))}"
                           "; remove them first")
    labels = tasks[0].labels if tasks else []
    if len(tasks) < 2:
        raise SurgeryError(f"PET needs at least 2 patterns, got {len(tasks)}")
    if any(t.labels != labels for t in tasks):
        raise SurgeryError("every pattern needs the same labels in the same order")
    if not temperature > 0:
        raise SurgeryError(f"the temperature must be above 0, got {temperature!r}")
    if test:
        _known(tasks[0], test, "evaluation")
    head_config = head_options(head, len(labels), head_config)   # before any training: a bad head costs nothing
    config = dict(config or {})
    rate = lr if lr is not None else Method(plugin).learning_rate(Method(plugin).config(config))
    report, scores, test_scores, weights = {"pvps": []}, [], [], []
    target = torch.tensor([labels.index(e.label) for e in test]) if test else None
    for j, task in enumerate(tasks):
        name = f"pvp-{j}"
        weight = evaluate(model, task, labelled) if weighted else 1.0
        torch.manual_seed(seed + j)
        apply(model, plugin, name=name, **config)
        try:
            fit(model, task, labelled, epochs, batch_size, rate, seed + j, progress=progress, desc=f"train {name}")
            scores.append(label_scores(model, task, unlabelled))
            row = {"template": task.template.text, "weight": weight}
            if test:
                test_scores.append(label_scores(model, task, test))
                row["accuracy"] = float((test_scores[-1].argmax(-1) == target).float().mean())
            if out:
                save(model, os.path.join(out, name), name=name)
            report["pvps"].append(row)
            weights.append(weight)
        finally:
            remove(model, name)
    q = soft_labels(scores, weights, temperature)
    if test:
        ens = soft_labels(test_scores, weights, 1.0)
        report["ensemble_accuracy"] = float((ens.argmax(-1) == target).float().mean())
        report["mean_pvp_accuracy"] = sum(r["accuracy"] for r in report["pvps"]) / len(tasks)
    torch.manual_seed(seed)
    finals = ["final"] + (["final-adapter"] if final_plugin else [])
    try:   # all or nothing: a failure here leaves the model bare, as it came
        apply(model, head, name="final", **head_config)
        if final_plugin:
            apply(model, final_plugin, name="final-adapter", **dict(final_config or {}))
        distill = Distill(tokenizer, tasks[0].max_length)
        rows = list(zip(unlabelled, q))
        if final_labelled:
            rows += [(e, torch.eye(len(labels))[labels.index(e.label)]) for e in labelled]
        fit(model, distill, rows, final_epochs, batch_size, final_lr, seed, progress=progress, desc="distill")
    except BaseException:
        for name in finals:
            if name in adapters(model):
                remove(model, name)
        raise
    if test:
        report["final_accuracy"] = distill.accuracy(model, test, labels)
    if out:
        for name in finals:
            save(model, os.path.join(out, name), name=name)
    report["soft_labels"] = q
    return report
