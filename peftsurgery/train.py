"""Fine-tune a language model as a cloze classifier, with any method: data, the training loop and evaluation.

The task (template, label words, how a model's output becomes class scores) is a peftsurgery.tasks.Task: its
encode(examples) gives a batch, its scores(model, batch) the (examples, labels) scores; the loss is
cross-entropy over them and the prediction their argmax.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import positive
from .errors import SurgeryError
from .surgery import extra_loss
from .surgery import step as after_step

FALLBACK_LR = 1e-3


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_b: str | None = None   # the second text of a pair, for templates with {text_b}


# ---- data -----------------------------------------------------------------------------------------------------

def read_examples(path: str, labelled: bool = True) -> list[Example]:
    """Examples from JSONL (objects with "text" and "label", optionally "text_b" for pairs) or CSV (a header
    naming text and label columns, optionally text_b, or, without one, two columns label,text as in the Pang & Lee
    polarity files). Labels are kept as strings. With labelled=False: texts only (label ""; any label ignored),
    from JSONL or from a .txt file with one text per line."""
    kinds = ".jsonl or .csv of text and label" if labelled else ".jsonl of texts or a .txt with one text per line"
    if not os.path.isfile(path):
        raise SurgeryError(f"{path} is not a file; give a {kinds}")
    low = path.lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        if low.endswith((".jsonl", ".json")):
            out = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    b = row.get("text_b")
                    label = str(row["label"]) if labelled else ""
                    out.append(Example(str(row["text"]), label, None if b is None else str(b)))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise SurgeryError(f"{path}:{n} is not a JSON object with text"
                                       + (" and label" if labelled else "")) from None
        elif labelled and low.endswith((".csv", ".tsv")):
            rows = list(csv.reader(f, delimiter="\t" if low.endswith(".tsv") else ","))
            out = _csv_examples(path, rows)
        elif not labelled and low.endswith(".txt"):
            out = [Example(line.strip(), "") for line in f if line.strip()]
        else:
            raise SurgeryError(f"{path}: give a {kinds}")
    if not out:
        raise SurgeryError(f"{path} holds no {'examples' if labelled else 'texts'}")
    return out


def _csv_examples(path: str, rows: list[list[str]]) -> list[Example]:
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    b = None
    if "text" in head and "label" in head:
        t, lab = head.index("text"), head.index("label")
        b = head.index("text_b") if "text_b" in head else None
        body = rows[1:]
    else:
        t, lab = 1, 0
        body = rows
    out = []
    for n, r in enumerate(body, 2 if body is not rows else 1):
        if len(r) <= max(t, lab, -1 if b is None else b):
            raise SurgeryError(f"{path}:{n} has {len(r)} columns; expected text and label")
        out.append(Example(r[t].strip(), r[lab].strip(), None if b is None else r[b].strip()))
    return out


def balanced_split(examples: list[Example], train: int, test: int, seed: int = 0):
    """(train, test): disjoint, each with the same number of examples per label, chosen by `seed`. Identical
    texts never land on both sides."""
    labels = sorted({e.label for e in examples})
    if train % len(labels) or test % len(labels):
        raise SurgeryError(f"train and test sizes must be multiples of the {len(labels)} labels")
    rng = random.Random(seed)
    seen, unique = set(), []
    for e in examples:
        if e.text not in seen:
            seen.add(e.text)
            unique.append(e)
    tr, te = [], []
    for lab in labels:
        group = [e for e in unique if e.label == lab]
        rng.shuffle(group)
        a, b = train // len(labels), test // len(labels)
        if len(group) < a + b:
            raise SurgeryError(f"label {lab!r} has {len(group)} examples; {a + b} are needed")
        tr += group[:a]
        te += group[a:a + b]
    rng.shuffle(tr)
    rng.shuffle(te)
    return tr, te


def write_jsonl(examples: list[Example], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in examples:
            row = {"text": e.text, "label": e.label, **({} if e.text_b is None else {"text_b": e.text_b})}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def labels_of(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _bar(total, desc, progress):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)


# ---- train / evaluate -----------------------------------------------------------------------------------------

def evaluate(model, task, examples: list[Example], batch_size: int = 32, progress: bool = False,
             desc: str = "eval") -> float:
    """Accuracy of the argmax over the labels' scores (task: a peftsurgery.tasks.Task)."""
    return _score(model, task, examples, batch_size, progress, desc)[0]


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode without gradients, its training mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


def _score(model, task, examples, batch_size=32, progress=False, desc="eval") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over `examples`."""
    _known(task, examples, "evaluation")
    correct, loss = 0, 0.0
    bar = _bar(len(examples), desc, progress)
    try:
        with evaluating(model):
            for chunk in _batches(examples, batch_size):
                batch = task.encode(chunk)
                s = task.scores(model, batch).float().cpu()
                correct += int((s.argmax(-1) == batch.targets).sum())
                loss += float(F.cross_entropy(s, batch.targets, reduction="sum"))
                bar.update(len(chunk))
    finally:
        bar.close()
    return correct / len(examples), loss / len(examples)


def _known(task, examples, what: str) -> None:
    unknown = sorted({e.label for e in examples} - set(task.labels))
    if unknown:
        raise SurgeryError(f"label {unknown[0]!r} of the {what} data has no label word "
                           f"(known: {', '.join(task.labels)})")


def loss_of(model, task, examples: list[Example]) -> torch.Tensor:
    """Cross-entropy of the labels' scores against the examples' labels (a task with its own `loss`, such as
    sft.InstructionTask, gives it)."""
    if hasattr(task, "loss"):
        return task.loss(model, examples)
    _known(task, examples, "training")
    batch = task.encode(examples)
    s = task.scores(model, batch)
    return F.cross_entropy(s, batch.targets.to(s.device))


SCHEDULES = ("constant", "linear")


def fit(model, task, examples: list[Example], epochs: int = 3, batch_size: int = 16, lr: float = 1e-3,
        seed: int = 0, progress: bool = False, desc: str = "train", schedule: str = "constant") -> dict:
    """Train the model's trainable parameters (AdamW) on `examples`; `schedule` "linear" decays the learning
    rate linearly to zero over the run; the rules' training-time hooks run (peftsurgery.extra_loss and .step).
    Returns the task losses per step, seconds per step and the peak memory while training."""
    if schedule not in SCHEDULES:
        raise SurgeryError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SurgeryError("the model has no trainable parameters; apply a method first")
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps if schedule == "linear" else 1.0)
    losses, seconds = [], []
    reset_peak_memory(model)
    model.train()
    bar = _bar(steps, desc, progress)
    try:
        for _ in range(epochs):
            order = list(examples)
            rng.shuffle(order)
            for chunk in _batches(order, batch_size):
                t = time.perf_counter()
                loss = loss_of(model, task, chunk)
                (loss + extra_loss(model)).backward()   # the rules' own terms; the task loss is what is reported
                loss = loss.detach()
                opt.step()
                after_step(model, len(losses) + 1, steps)   # the rules' schedules, while gradients are there
                decay.step()
                opt.zero_grad(set_to_none=True)
                seconds.append(time.perf_counter() - t)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{statistics.fmean(losses[-8:]):.3f}")
    finally:
        bar.close()
        model.eval()
    return {"steps": len(losses), "losses": losses, "step_seconds": seconds,
            "median_step_seconds": statistics.median(seconds), "peak_memory_bytes": peak_memory(model)}


# ---- choosing the learning rate -------------------------------------------------------------------------------

def holdout_split(examples: list[Example], fraction: float = 0.2, least: int = 2, seed: int = 0):
    """(rest, held): examples sharing a text form one group, counted under its first example's label; of each
    label's n groups, max(least, round(fraction * n)) chosen by `seed` are held out, at least `least` must remain.
    Both sides keep the examples' order; a text is never on both sides."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1) or isinstance(least, bool) or not (
            isinstance(least, int) and least >= 1):
        raise SurgeryError(f"holding out part of the data: give a fraction in (0, 1) and least >= 1, got "
                           f"{fraction!r} and {least!r}")
    groups: dict[str, str] = {}
    for e in examples:
        groups.setdefault(e.text, e.label)
    rng, held = random.Random(seed), set()
    for lab in labels_of(examples):
        texts = [t for t, g in groups.items() if g == lab]
        k = max(least, round(fraction * len(texts)))
        if len(texts) < k + least:
            raise SurgeryError(f"choosing the learning rate holds out {k} of the {len(texts)} distinct texts of "
                               f"label {lab!r} and needs {least} left to train on; give at least {k + least} "
                               "examples per label, or a fixed learning rate")
        rng.shuffle(texts)
        held.update(texts[:k])
    return [e for e in examples if e.text not in held], [e for e in examples if e.text in held]


def choose_lr(model, task, examples: list[Example], plugin: str, rates: list[float] | None = None, *,
              epochs: int = 3, batch_size: int = 16, seed: int = 0, schedule: str = "constant",
              fraction: float = 0.2, least: int = 2, eval_batch_size: int = 32, progress: bool = False,
              **config) -> dict:
    """Pick the learning rate for `plugin` (with `config`) on `examples`: holdout_split(examples, fraction,
    least, seed) sets part aside; for each rate (default: the method's, peftsurgery.registry.Method.learning_rates)
    torch.manual_seed(seed), apply(model, plugin, **config), fit on the rest with the same epochs, batch size and
    schedule, score the held-out part, remove the adapter. The highest held-out accuracy wins, ties going to the
    lower held-out loss, then to the method's default, then to the lower rate. The model ends as it began, also on
    failure. Train the final adapter on all of `examples` the same way: torch.manual_seed(seed), apply, fit at
    result["lr"].
    Returns {"lr", "default", "train", "held_out", "grid": [{"lr", "held_out_accuracy", "held_out_loss",
    "final_train_loss"}, ...]}."""
    import sys

    from .registry import Method
    from .surgery import adapters, apply, remove
    if adapters(model):
        raise SurgeryError("choosing the learning rate trains a fresh adapter on the bare model; remove the "
                           f"attached adapters ({', '.join(adapters(model))}) first")
    method = Method(plugin)
    cfg = method.config(config)
    default = method.learning_rate(cfg)
    if rates is None:
        rates = method.learning_rates(cfg)
    elif not rates:
        raise SurgeryError("give at least one learning rate to choose from")
    for r in rates:
        positive("choosing the learning rate", "each rate", r)
    rates = sorted({float(r) for r in rates})
    _known(task, examples, "training")
    rest, held = holdout_split(examples, fraction, least, seed)
    # the base's own tensors, kept (not copied): a method that swaps modules (qlora) gets back from remove() what
    # it computed with (dequantized weights), and these put the originals back
    base, was, grid = model.state_dict(), model.training, []
    for i, lr in enumerate(rates, 1):
        torch.manual_seed(seed)
        apply(model, plugin, **config)
        try:
            run = fit(model, task, rest, epochs, batch_size, lr, seed, progress, f"lr {lr:.3g} ({i}/{len(rates)})",
                      schedule)
            acc, loss = _score(model, task, held, eval_batch_size)
        finally:
            remove(model)
            model.load_state_dict(base)
            model.train(was)
        grid.append({"lr": lr, "held_out_accuracy": acc, "held_out_loss": loss,
                     "final_train_loss": run["losses"][-1]})
        if progress:
            print(f"lr {lr:.3g}: held-out accuracy {acc:.1%}, loss {loss:.4f} ({len(held)} examples)",
                  file=sys.stderr)
    best = min(grid, key=lambda g: (-g["held_out_accuracy"], g["held_out_loss"], g["lr"] != default))
    return {"lr": best["lr"], "default": default, "train": len(rest), "held_out": len(held), "grid": grid}


# ---- memory ---------------------------------------------------------------------------------------------------

def reset_peak_memory(model=None) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's resident-set high-water mark (Linux)."""
    if _cuda(model):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then covers the whole process


def peak_memory(model=None) -> int:
    """Bytes: peak CUDA memory allocated, or the peak resident set of this process since reset_peak_memory."""
    if _cuda(model):
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cuda(model) -> bool:
    try:
        return model is not None and next(model.parameters()).is_cuda
    except StopIteration:
        return False
