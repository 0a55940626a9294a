"""python -m benchmarks.run [--cases 1,2,...] [--quick] [--scale 1b] [--device cpu|cuda] [--out benchmarks/results]

Runs peftsurgery and Hugging Face PEFT side by side (same model, data and seed, one process, interleaved after a
warm-up) and prints medians and ratios ours/PEFT; writes DEVICE.json and DEVICE.png (DEVICE-quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

from .cases import CASES
from .common import Ctx


def _fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        if unit in ("tokens/s",):
            return f"{x:,.0f}"
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n[{r['case']}] {r['title']}")
        if r["rows"]:
            lines.append(f"  {'metric':<52} {'unit':<11} {'ours':>10} {'PEFT':>10} {'ours/PEFT':>9}  other")
        for row in r["rows"]:
            other = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                              if k not in ("metric", "unit", "ours", "peft", "ratio"))
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
            lines.append(f"  {row['metric']:<52} {row['unit']:<11} {_fmt(row['ours'], row['unit']):>10} "
                         f"{_fmt(row['peft'], row['unit']):>10} {ratio:>9}  {other}")
        for t in r["targets"]:
            mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            v = "-" if t["value"] is None else f"{t['value']:.3f}"
            lines.append(f"  target {t['name']}: {v} {t['better']} {t['limit']} -> {mark}"
                         + (f" ({t['note']})" if t["note"] else ""))
        for e in r.get("errors", []):
            lines.append(f"  ERROR {e}")
    return "\n".join(lines)


def chart(results: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, ratios = [], []
    for r in results:
        for row in r["rows"]:
            if row["ratio"] is not None and row["unit"] != "tokens/s":
                labels.append(f"[{r['case']}] {row['metric']}")
                ratios.append(row["ratio"])
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(labels) + 1.4))
    colors = ["tab:green" if x <= 1.0 else "tab:red" for x in ratios]
    ax.barh(range(len(labels)), ratios, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ours / PEFT (median; below 1 = peftsurgery faster or smaller)")
    ax.set_title(title, fontsize=9)
    for i, x in enumerate(ratios):
        ax.text(x, i, f" {x:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[2])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case numbers (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (a smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions per candidate (default: per case)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed repetitions first (default: per case)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the machine's cores)")
    ap.add_argument("--scale", choices=["1b"], help="1b: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 "
                    "key/value heads; bfloat16 on a GPU), prompts of 512 tokens; results go to DEVICE-1b.*")
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend for case 9 (default: inductor; "
                    "eager traces without generating code)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other cases of an existing result file, replacing only those run now")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    ctx = Ctx(a.device, a.quick, a.reps, a.warmup, a.scale or "", a.backend)
    import peft
    import transformers
    info = {"device": a.device, "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda")
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "quick": a.quick, "scale": a.scale,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results = []
    for c in [c.strip() for c in a.cases.split(",") if c.strip()]:
        if c not in CASES:
            ap.error(f"unknown case {c}; cases: {', '.join(CASES)}")
        t0 = time.perf_counter()
        print(f"case {c} ...", file=sys.stderr, flush=True)
        try:
            r = CASES[c](ctx).to_json()
        except Exception as e:
            traceback.print_exc()
            r = {"case": c, "title": CASES[c].__name__, "setup": {}, "rows": [], "targets": [], "extra": {},
                 "errors": [f"{type(e).__name__}: {str(e)[:300]}"]}
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
    info["load_average_at_end"] = os.getloadavg()
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, a.device.split(":")[0] + (f"-{a.scale}" if a.scale else "")
                        + ("-quick" if a.quick else ""))
    if a.merge and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            old = json.load(f)
        now = {r["case"] for r in results}
        for r in results:
            r["run"] = dict(info)  # when and how these cases were re-run
        results = sorted([r for r in old["cases"] if r["case"] not in now] + results, key=lambda r: r["case"])
        info = {**old, **{k: v for k, v in info.items() if k not in ("started", "load_average_at_start",
                                                                       "load_average_at_end")}}
        info.pop("cases", None)
    out = {**info, "cases": results}
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1, default=float)
    chart(results, stem + ".png", f"peftsurgery vs PEFT {peft.__version__} on {a.device} "
                                  f"({info['threads']} threads{', quick' if a.quick else ''})")
    print(f"device {a.device} ({info['device_name']}), {info['threads']} threads, torch {torch.__version__}, "
          f"peft {peft.__version__}, load average at start {info['load_average_at_start'][0]:.2f}")
    print(table(results))
    print(f"\nwrote {stem}.json and {stem}.png")
    return out


if __name__ == "__main__":
    main()
