"""Zero-shot chain of thought (Kojima et al., 2022): the model first writes a rationale after the task's prompt
and a cue ("Let's think step by step."), greedily; then the prompt, the cue, the rationale and a trigger ("Therefore,
the answer is") are scored with the task's own verbalizer, so every query gets one of the labels (no pattern can
fail to match). Beside the task layer (tasks.py), which it uses; `peftsurgery eval --cot` runs it.
"""
from __future__ import annotations

import torch

from .errors import SurgeryError
from .train import Example, _bar, _batches, evaluate, evaluating

CUE = "Let's think step by step."
TRIGGER = "Therefore, the answer is"


def rationales(model, task, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
               progress: bool = False) -> list[str]:
    """What the model writes after each prompt (greedy, at most max_new_tokens), decoded."""
    tok = task.tokenizer
    dev = next(model.parameters()).device
    out = []
    bar = _bar(len(prompts), "reasoning", progress)
    try:
        with evaluating(model):
            for chunk in _batches(prompts, batch_size):
                rows = [task.prefix + tok.encode(p, add_special_tokens=False) for p in chunk]
                L = max(map(len, rows))
                ids = torch.full((len(rows), L), task.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), L), dtype=torch.long)
                for i, r in enumerate(rows):   # left padding: every row's continuation starts at column L
                    ids[i, L - len(r):] = torch.tensor(r)
                    mask[i, L - len(r):] = 1
                new = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=task.pad_id)[:, L:]
                eos = getattr(tok, "eos_token_id", None)
                for row in new.tolist():
                    out.append(tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True))
                bar.update(len(chunk))
    finally:
        bar.close()
    return out


def chain_of_thought(model, task, examples: list[Example], max_new_tokens: int = 64, cue: str = CUE,
                     trigger: str = TRIGGER, batch_size: int = 8, progress: bool = False, samples: int = 3) -> dict:
    """Accuracy of the labels scored after each query's rationale, and the first `samples` rationales."""
    from .tasks import Task
    if task.kind != "causal":
        raise SurgeryError(f"chain of thought generates a rationale, which needs a causal model, not a {task.kind} "
                           "one; leave --cot out")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SurgeryError(f"--cot-tokens must be a positive integer, got {max_new_tokens!r}")
    prompts = [task.render(e) + " " + cue for e in examples]
    written = rationales(model, task, prompts, max_new_tokens, batch_size, progress)
    answer = Task(task.tokenizer, "{text}\n" + trigger, task.verbalizer, "causal",
                  task.max_length + max_new_tokens + 64, task.padding_side)
    if task.chat:
        answer.prefix = []    # the rendered chat text holds its special tokens
    reasoned = [Example(p + r, e.label) for p, r, e in zip(prompts, written, examples)]
    accuracy = evaluate(model, answer, reasoned, batch_size, progress, desc="answering")
    return {"accuracy": accuracy, "cue": cue, "trigger": trigger,
            "samples": [{"text": e.text, "label": e.label, "rationale": r} for e, r in
                        zip(examples[:samples], written)]}
