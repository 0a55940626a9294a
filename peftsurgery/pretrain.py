"""PPT (Gu et al., 2022): pre-train a soft prompt on unlabelled text with the base frozen, through self-supervised
tasks cast in a downstream format, so that a downstream prompt starts from it (prompt-tuning `init=pretrained:DIR`)
instead of from random or vocabulary vectors. Beside the core, like tasks.py and train.py, whose Task and fit it
uses; `peftsurgery pretrain-prompt` is its command.

Raw text: documents separated by blank lines; a document's sentences are split at line breaks and after . ! ?
followed by white space. Formats (the paper's, built from that text alone):
- pair (sentence-pair classification; the paper's next sentence prediction with three labels): sentence A and a
  sentence B that follows it directly (yes), comes from the same document but not right after it (maybe), or
  comes from another document (no); labels balanced.
- choice (multiple choice; the paper's next sentence selection): sentence A and `options` candidates, one the
  sentence that follows A, the others from other documents, in random order; the label is the right one's letter.
The paper's single-sentence format needs pseudo-labels from a trained classifier and is not built here.
"""
from __future__ import annotations

import random
import re
import string

from .errors import SurgeryError
from .train import Example

FORMATS = {   # format -> its template
    "pair": "{text}\n{text_b}\nDoes the second sentence follow the first?{answer}",
    "choice": "{text}\nWhich sentence comes next?\n{text_b}\nAnswer:{answer}",
}
PAIR_WORDS = {"next": " yes", "same": " maybe", "other": " no"}   # choice: " A", " B", ...
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def documents(path: str) -> list[list[str]]:
    """The documents of a UTF-8 text file, each a list of sentences."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise SurgeryError(f"{path} is not a file; give a UTF-8 text file of documents separated by blank lines") \
            from None
    except UnicodeDecodeError:
        raise SurgeryError(f"{path} is not UTF-8 text; convert it (documents separated by blank lines)") from None
    docs = []
    for block in re.split(r"\n\s*\n", text):
        sentences = [s.strip() for line in block.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]
        if sentences:
            docs.append(sentences)
    return docs


def examples(docs: list[list[str]], fmt: str, n: int, options: int = 3, seed: int = 0) -> list[Example]:
    """n self-supervised examples in format `fmt` drawn (seeded) from the documents."""
    if fmt not in FORMATS:
        raise SurgeryError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "choice" and (not isinstance(options, int) or not 2 <= options <= 26):
        raise SurgeryError(f"options must be an integer from 2 to 26, got {options!r}")
    if not isinstance(n, int) or n < 1:
        raise SurgeryError(f"the number of examples must be a positive integer, got {n!r}")
    # (document, sentence) pairs that have a next sentence
    starts = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - 1)]
    if len(docs) < 2 or not starts:
        raise SurgeryError(f"the text holds {len(docs)} document(s) and {len(starts)} sentence(s) followed by "
                           "another; give at least two documents (separated by blank lines) with two or more "
                           "sentences")
    rng = random.Random(seed)
    other = lambda d: rng.choice(docs[rng.choice([e for e in range(len(docs)) if e != d])])
    if fmt == "pair":
        far = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc)) if len(doc) >= 3]
        if not far:
            raise SurgeryError("the pair format's 'maybe' label needs a document of three or more sentences; give "
                               "longer documents, or use --format choice")
        out = []
        for k in range(n):
            label = ("next", "same", "other")[k % 3]
            if label == "same":
                d, i = rng.choice(far)
                j = rng.choice([j for j in range(len(docs[d])) if j not in (i, i + 1)])
                out.append(Example(docs[d][i], label, docs[d][j]))
                continue
            d, i = rng.choice(starts)
            out.append(Example(docs[d][i], label, docs[d][i + 1] if label == "next" else other(d)))
        rng.shuffle(out)
        return out
    out = []
    for _ in range(n):
        d, i = rng.choice(starts)
        candidates = [docs[d][i + 1]]
        for _ in range(100 * options):   # distinct candidates
            if len(candidates) == options:
                break
            c = other(d)
            if c not in candidates:
                candidates.append(c)
        else:
            raise SurgeryError(f"the other documents hold too few distinct sentences for {options} options; give "
                               "more text or fewer --options")
        order = list(range(options))
        rng.shuffle(order)
        listed = "\n".join(f"{string.ascii_uppercase[k]}. {candidates[c]}" for k, c in enumerate(order))
        out.append(Example(docs[d][i], string.ascii_uppercase[order.index(0)], listed))
    return out


def task_for(tokenizer, fmt: str, kind: str, options: int = 3, max_length: int = 256):
    """The format's Task: its template and label words."""
    from .tasks import Task, Verbalizer
    words = PAIR_WORDS if fmt == "pair" else {c: " " + c for c in string.ascii_uppercase[:options]}
    return Task(tokenizer, FORMATS[fmt], Verbalizer(list(words), words), kind, max_length)


def pretrain_prompt(model, tokenizer, path: str, fmt: str = "pair", n: int = 2000, options: int = 3,
                    epochs: int = 1, batch_size: int = 16, lr: float | None = None, seed: int = 0,
                    progress: bool = False, kind: str | None = None, **config) -> dict:
    """Attach a prompt-tuning adapter (options `config`: num_tokens, init, ...) and train it on n examples of
    format `fmt` built from the text file at `path`; the base stays frozen. Returns fit's result with the task,
    the learning rate and the examples' count; save the adapter with peftsurgery.save."""
    import torch

    from .registry import Method
    from .surgery import apply
    from .tasks import kind_of
    from .train import fit
    method = Method("prompt-tuning")
    settings = method.config(config)      # bad options refused before the text is read
    data = examples(documents(path), fmt, n, options, seed)
    task = task_for(tokenizer, fmt, kind or kind_of(model) or "causal", options)
    rate = lr if lr is not None else method.learning_rate(settings)
    torch.manual_seed(seed)
    apply(model, "prompt-tuning", **config)
    result = fit(model, task, data, epochs, batch_size, rate, seed, progress=progress, desc=f"pretrain ({fmt})")
    return {**result, "task": task, "lr": rate, "examples": len(data)}
