"""In-context learning: k demonstrations from a pool of labelled examples placed before each query, written with
the task's own template and the label's (first) word in the answer slot, then the query as the task scores it. In a
chat task (Task(chat=True)) each demonstration is an earlier turn: the user's message, the word as the answer.
Beside the task layer (tasks.py), which it wraps; `peftsurgery eval --shots K` uses it.

    icl = InContext(task, pool, shots=4, selection="balanced", seed=0, calibrate=True, model=model)
    evaluate(model, icl, test)                   # peftsurgery.train.evaluate: any task-like object

Selection, per query (never the query itself): "random" (k drawn from the pool), "balanced" (the labels in turn,
each drawn at random), or "similar" (the k nearest by cosine similarity of the mean of the model's input-embedding
vectors of their text tokens, the nearest closest to the query). The demonstrations' draw and order come from the
seed and the query's text, so a query sees the same context in any batch or order. Demonstrations are never cut:
the query's fields are (the task's truncation); when the context leaves no room the error says so.

Contextual calibration (Zhao et al., 2021; with shots=0 too: zero-shot): each query is scored a second time with its fields replaced by a
content-free "N/A" behind the same demonstrations, and its label log-probabilities are taken relative to that
input's (log p - log p_cf, the diagonal calibration with no bias).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, replace

import torch

from .errors import SurgeryError
from .tasks import chat_around

SELECTIONS = ("random", "balanced", "similar")
CONTENT_FREE = "N/A"


@dataclass
class _Paired:
    """Queries and their content-free twins in one batch: `inner` holds 2n rows, `targets` the n queries'."""
    inner: object
    targets: torch.Tensor


def _key(e) -> tuple:
    return e.text, getattr(e, "text_b", None)


class InContext:
    def __init__(self, task, pool, shots: int, selection: str = "random", seed: int = 0, calibrate: bool = False,
                 model=None):
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0 or (shots == 0 and not calibrate):
            raise SurgeryError(f"--shots must be a positive integer (0 only with calibration), got {shots!r}")
        if selection not in SELECTIONS:
            raise SurgeryError(f"unknown demonstration selection {selection!r}; use one of {', '.join(SELECTIONS)}")
        pool = list(pool)
        unknown = sorted({e.label for e in pool} - set(task.labels))
        if unknown:
            raise SurgeryError(f"demonstration label {unknown[0]!r} has no label word (known: "
                               f"{', '.join(task.labels)})")
        if shots and len(pool) < shots + 1:   # + 1: a query found in the pool is left out of its own context
            raise SurgeryError(f"{shots} demonstrations need a pool of at least {shots + 1} examples, got "
                               f"{len(pool)}; give more or fewer --shots")
        if selection == "similar" and model is None:
            raise SurgeryError("similar demonstrations need the model (its input embeddings)")
        self.task, self.pool, self.shots, self.selection = task, pool, shots, selection
        self.seed, self.calibrate = seed, calibrate
        self.inner = copy.copy(task)
        self.chat = getattr(task, "chat", False)
        if self.chat:   # the demonstrations are earlier turns: the chat text before the query's message is the context
            self.inner.template = copy.copy(task.template)
            self.inner.template.parts = task.template.parts[1:]
            self.message = copy.copy(task)    # renders a user message: the template without chat text or answer
            self.message.template = copy.copy(task.template)
            self.message.template.parts = task.template.parts[1:-2]
        self.contexts = {}    # id(example) -> its demonstrations' text, while a batch is encoded
        self.inner.context = lambda e: self.contexts[id(e)]
        if selection == "similar":
            self.model = model
            self.vectors = self._embed([e.text for e in pool])

    @property
    def labels(self) -> list[str]:
        return self.task.labels

    def to_json(self) -> dict:
        return {**self.task.to_json(), "shots": self.shots, "selection": self.selection, "shot_seed": self.seed,
                "calibrate": self.calibrate}

    # ---- choosing and writing demonstrations -------------------------------------------------------------------

    def demonstrations(self, query) -> list:
        """The query's k demonstrations, in the order they are written."""
        rng = random.Random(f"{self.seed}\0{_key(query)}")
        keep = [i for i, e in enumerate(self.pool) if _key(e) != _key(query)]
        pool = [self.pool[i] for i in keep]
        if len(pool) < self.shots:
            raise SurgeryError(f"the pool holds {len(pool)} examples other than the query {query.text[:40]!r}; give "
                               "more examples or fewer --shots")
        if self.selection == "random":
            return rng.sample(pool, self.shots)
        if self.selection == "balanced":
            by_label = {lab: [e for e in pool if e.label == lab] for lab in self.labels}
            for v in by_label.values():
                rng.shuffle(v)
            order = [lab for lab in self.labels if by_label[lab]]
            rng.shuffle(order)
            out = []
            while len(out) < self.shots:
                for lab in order:
                    if by_label[lab] and len(out) < self.shots:
                        out.append(by_label[lab].pop())
            return out
        sim = self.vectors[keep] @ self._embed([query.text])[0]
        nearest = sim.topk(self.shots).indices.tolist()       # nearest first
        return [self.pool[keep[i]] for i in reversed(nearest)]  # ... written last, next to the query

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Unit mean input-embedding vectors of the texts' tokens."""
        emb = self.model.get_input_embeddings().weight.detach()
        out = []
        for t in texts:
            ids = self.task.tokenizer.encode(t, add_special_tokens=False) or [self.task.pad_id]
            out.append(emb[torch.tensor(ids, device=emb.device)].float().mean(0).cpu())
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def context(self, query) -> str:
        """The demonstrations, each written with the template and its label's first word, then a blank line; in a
        chat, each as a user's message and the word as the assistant's answer, before the query's message."""
        demos = self.demonstrations(query) if self.shots else []
        words = self.task.verbalizer.words
        if self.chat:
            turns = [m for d in demos for m in ({"role": "user", "content": self.message.render(d)},
                                                {"role": "assistant", "content": words[d.label][0].lstrip()})]
            return chat_around(self.task.tokenizer, turns)[0]
        return "".join(self.task.render(d, words[d.label][0]) + "\n\n" for d in demos)

    # ---- the task-like interface (encode / scores) -----------------------------------------------------------

    def encode(self, examples):
        examples = list(examples)
        rows = list(examples)
        if self.calibrate:
            rows += [replace(e, text=CONTENT_FREE, text_b=None if e.text_b is None else CONTENT_FREE)
                     for e in examples]
        self.contexts = {id(r): self.context(examples[i % len(examples)]) for i, r in enumerate(rows)}
        try:
            batch = self.inner.encode(rows)
        finally:
            self.contexts = {}
        return _Paired(batch, batch.targets[:len(examples)]) if self.calibrate else batch

    def scores(self, model, batch) -> torch.Tensor:
        if not self.calibrate:
            return self.inner.scores(model, batch)
        s = self.inner.scores(model, batch.inner).float().log_softmax(-1)
        n = len(batch.targets)
        return s[:n] - s[n:]
