"""Fine-tune a causal language model as a cloze classifier, with any method.

Each example becomes a prompt from a template (`Review: {text}\nSentiment:`); every label has a one-token label
word (` positive`); the model's logits for the label words at the last real token are the class scores, and the
loss is cross-entropy over them. Batches are left-padded with an attention mask (and position ids counting real
tokens only, where the model takes them), so the last position is the last real token of every row. Works with
any model whose forward takes input_ids / attention_mask and returns logits, and any tokenizer with
`encode(text, add_special_tokens=...)`.
"""
from __future__ import annotations

import csv
import inspect
import json
import os
import random
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import SurgeryError
from .surgery import extra_loss
from .surgery import step as after_step

FALLBACK_LR = 1e-3


@dataclass(frozen=True)
class Example:
    text: str
    label: str


# ---- data -----------------------------------------------------------------------------------------------------

def read_examples(path: str) -> list[Example]:
    """Examples from JSONL (objects with "text" and "label") or CSV (a header naming text and label columns, or,
    without one, two columns label,text as in the Pang & Lee polarity files). Labels are kept as strings."""
    if not os.path.isfile(path):
        raise SurgeryError(f"{path} is not a file; give a .jsonl or .csv of text and label")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.lower().endswith((".jsonl", ".json")):
            out = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out.append(Example(str(row["text"]), str(row["label"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SurgeryError(f"{path}:{n} is not a JSON object with text and label") from None
        elif path.lower().endswith((".csv", ".tsv")):
            rows = list(csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))
            out = _csv_examples(path, rows)
        else:
            raise SurgeryError(f"{path}: give a .jsonl or .csv file")
    if not out:
        raise SurgeryError(f"{path} holds no examples")
    return out


def _csv_examples(path: str, rows: list[list[str]]) -> list[Example]:
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    if "text" in head and "label" in head:
        t, lab = head.index("text"), head.index("label")
        body = rows[1:]
    else:
        t, lab = 1, 0
        body = rows
    out = []
    for n, r in enumerate(body, 2 if body is not rows else 1):
        if len(r) <= max(t, lab):
            raise SurgeryError(f"{path}:{n} has {len(r)} columns; expected text and label")
        out.append(Example(r[t].strip(), r[lab].strip()))
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
            f.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- the cloze task -------------------------------------------------------------------------------------------

class Cloze:
    """Template + label words over a tokenizer. `words` maps each label to its word (default: " " + label)."""

    def __init__(self, tokenizer, template: str, labels: list[str], words: dict[str, str] | None = None,
                 max_length: int = 256):
        if tokenizer is None:
            raise SurgeryError("a cloze classifier needs the model's tokenizer; give a model folder (or GGUF) "
                               "that holds one")
        if "{text}" not in template:
            raise SurgeryError(f"template {template!r} has no {{text}} placeholder")
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.labels = list(labels)
        words = dict(words or {})
        unknown = sorted(set(words) - set(self.labels))
        if unknown:
            raise SurgeryError(f"label word given for {unknown[0]!r}, which is not a label of the data "
                               f"({', '.join(self.labels)})")
        self.words = {lab: words.get(lab, " " + lab) for lab in self.labels}
        ids = []
        for lab, w in self.words.items():
            t = tokenizer.encode(w, add_special_tokens=False)
            if len(t) != 1:
                raise SurgeryError(f"label word {w!r} is {len(t)} tokens in this tokenizer; pick one-token words "
                                   "(--label LABEL=WORD)")
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            raise SurgeryError("two labels have the same label-word token")
        self.word_ids = torch.tensor(ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
        self.pad_id = 0 if pad is None else int(pad)

    def encode(self, examples: list[Example]):
        """(input_ids, attention_mask, targets), left-padded."""
        seqs = []
        for e in examples:
            ids = self.tokenizer.encode(self.template.replace("{text}", e.text))
            seqs.append(list(ids)[-self.max_length:])
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
        targets = torch.tensor([self.labels.index(e.label) if e.label in self.labels else -1 for e in examples])
        return ids, mask, targets

    def scores(self, model, ids, mask) -> torch.Tensor:
        """(batch, labels): the label words' logits at the last position (the last real token)."""
        dev = next(model.parameters()).device
        kwargs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        params = _params(model)
        if "position_ids" in params:  # positions count real tokens only: a row scores the same in any batch
            kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, self.word_ids.to(logits.device)].float()

    def to_json(self) -> dict:
        return {"template": self.template, "labels": self.labels, "words": self.words,
                "max_length": self.max_length}


def _params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def labels_of(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _bar(total, desc, progress):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)


# ---- train / evaluate -----------------------------------------------------------------------------------------

def evaluate(model, cloze: Cloze, examples: list[Example], batch_size: int = 32, progress: bool = False,
             desc: str = "eval") -> float:
    """Accuracy of the argmax over the label words."""
    unknown = sorted({e.label for e in examples} - set(cloze.labels))
    if unknown:
        raise SurgeryError(f"label {unknown[0]!r} of the evaluation data has no label word "
                           f"(known: {', '.join(cloze.labels)})")
    was = model.training
    model.eval()
    correct = 0
    bar = _bar(len(examples), desc, progress)
    try:
        with torch.no_grad():
            for chunk in _batches(examples, batch_size):
                ids, mask, y = cloze.encode(chunk)
                correct += int((cloze.scores(model, ids, mask).argmax(-1).cpu() == y).sum())
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was)
    return correct / len(examples)


def loss_of(model, cloze: Cloze, examples: list[Example]) -> torch.Tensor:
    ids, mask, y = cloze.encode(examples)
    s = cloze.scores(model, ids, mask)
    return F.cross_entropy(s, y.to(s.device))


SCHEDULES = ("constant", "linear")


def fit(model, cloze: Cloze, examples: list[Example], epochs: int = 3, batch_size: int = 16, lr: float = 1e-3,
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
                loss = loss_of(model, cloze, chunk)
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
