"""QLoRA's compute dtype on a bfloat16 model: the default (each linear's own dtype, here bfloat16) against
compute_dtype=float32 (what every 4-bit layer used before), one process, interleaved after a warm-up.

    python -m benchmarks.qlora_dtype --device cuda            # TinyLlama-1.1B's layer shape, 4 layers, 4 x 512
    python -m benchmarks.qlora_dtype                          # a small CPU run

Prints the median training-step time (forward, backward, AdamW) and the peak memory of each, and their ratios."""
from __future__ import annotations

import argparse

import torch

import peftsurgery
from benchmarks.common import clock, interleave, llama, med, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    shape = dict(hidden=2048, heads=32, kv_heads=4, inter=5632) if cuda else dict(hidden=256, heads=4, inter=512)
    batch, seq = (4, 512) if cuda else (2, 64)
    models, opts, peaks = {}, {}, {}
    ids = tokens(batch, seq, 32000, args.device)
    for name, dtype in (("auto (bf16)", "auto"), ("float32", "float32")):
        m = llama(layers=args.layers, device=args.device, **shape).to(torch.bfloat16)
        peftsurgery.apply(m, "qlora", r=16, alpha=32, compute_dtype=dtype)
        m.train()
        models[name] = m
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def step(name):
        def run():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = clock(args.device)
            loss = models[name](input_ids=ids, labels=ids).loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            t = clock(args.device) - t0
            if cuda:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            return {"step": t}
        return run

    samples = interleave({n: step(n) for n in models}, args.reps, warmup=3)
    a, f = med(samples, "auto (bf16)", "step"), med(samples, "float32", "step")
    print(f"device {args.device}, {args.layers} layers {shape}, batch {batch} x {seq}, {args.reps} steps each")
    print(f"median step: auto (bf16) {a * 1000:.1f} ms, float32 {f * 1000:.1f} ms, ratio auto/float32 {a / f:.2f}")
    if cuda:
        print(f"peak memory: auto (bf16) {peaks['auto (bf16)'] / 2**30:.2f} GiB, float32 "
              f"{peaks['float32'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
