"""The benchmark cases. Each builds peftsurgery's candidate and PEFT's from the same seeded base model and data,
interleaves their repetitions after a warm-up, and reports medians and ratios ours/PEFT."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

import peftsurgery
from peftsurgery.rewrite import kernels
from peftsurgery.rewrite.lowrank import LowRankBranch

from .common import (Ctx, Result, bandwidth, branch_bytes, branch_flops, clock, clone, floor_inputs_require_grad,
                     flop_ideal, interleave, linear_targets, llama, matmul_rate, med, mib, peak_cuda, saved_activations,
                     tokens, train_step, trainable_bytes)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sizes(ctx: Ctx) -> dict:
    """The model and batch: Llama-style, hidden 512, 4 layers, 8 heads, intermediate 1376, 8 x 128; with
    --scale 1b TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads, intermediate 5632) and
    prompts of 512 tokens."""
    if ctx.quick:
        return dict(hidden=64, layers=2, heads=4, kv_heads=4, inter=172, vocab=512, batch=2, seq=32)
    if ctx.scale == "1b":
        return dict(hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632, vocab=32000, batch=8, seq=512)
    return dict(hidden=512, layers=4, heads=8, kv_heads=8, inter=1376, vocab=32000, batch=8, seq=128)


def _model(ctx, z, seed=0):
    return llama(z["hidden"], z["layers"], z["heads"], z["kv_heads"], z["inter"], z["vocab"], ctx.device, seed,
                 dtype=ctx.dtype)


def _peft_lora(model, r=16, alpha=32, name="default"):
    import peft
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LINEARS)
    return peft.get_peft_model(model, cfg, adapter_name=name)


def _branches(model, name="default") -> dict[str, LowRankBranch]:
    att = peftsurgery.adapters(model)[name]
    return next(r.built for r in att.records if r.built and isinstance(next(iter(r.built.values())), LowRankBranch))


def copy_lora(peft_model, ours, name="default", random_b: float = 0.0, seed: int = 0):
    """Make our adapter equal to PEFT's (its A; B zero, or random when random_b > 0, in both)."""
    g = torch.Generator().manual_seed(seed)
    root = peft_model.base_model.model
    with torch.no_grad():
        for path, b in _branches(ours, name).items():
            mod = root.get_submodule(path)
            la, lb = mod.lora_A[name].weight, mod.lora_B[name].weight
            if random_b:
                lb.copy_(torch.randn(lb.shape, generator=g) * random_b)
            b.A.weight.copy_(la)
            b.B.weight.copy_(lb)
            assert abs(b.scale - mod.scaling[name]) < 1e-12


def _adamw(model):
    ps = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(ps, lr=1e-4) if ps else None


def _train_cases(ctx, cands: dict, batch: dict, reps: int) -> tuple[dict, dict]:
    """Interleaved training steps of several models; also their saved activations (and CUDA peaks)."""
    opts = {n: _adamw(m) for n, m in cands.items()}
    for m in cands.values():
        m.train()
    fns = {n: (lambda m=m, o=opts[n]: train_step(m, o, batch, ctx.device)) for n, m in cands.items()}
    samples = interleave(fns, reps, ctx.w())
    mem = {}
    for n, m in cands.items():
        with saved_activations(m) as box:
            loss = m(**batch).loss
        loss.backward()
        m.zero_grad(set_to_none=True)
        mem[n] = {"activations_mib": mib(box["bytes"]), "trainable_state_mib": mib(trainable_bytes(m)),
                  "cuda_peak_mib": mib(peak_cuda(ctx.device, lambda m=m, o=opts[n]: train_step(m, o, batch,
                                                                                              ctx.device)))}
    return samples, mem


def case_lora_train(ctx: Ctx) -> Result:
    z = sizes(ctx)
    res = Result("1", "LoRA training step, all linears, r=16", setup={**z, "r": 16, "alpha": 32})
    base = _model(ctx, z)
    ids = tokens(z["batch"], z["seq"], z["vocab"], ctx.device)
    batch = {"input_ids": ids, "labels": ids}
    floor = floor_inputs_require_grad(clone(base))
    ours = peftsurgery.apply(clone(base), "lora", r=16, alpha=32, targets="all-linear")
    pm = _peft_lora(clone(base))
    copy_lora(pm, ours)
    with torch.no_grad():
        res.extra["parity_loss_abs_diff"] = abs(float(ours(**batch).loss) - float(pm(**batch).loss))
    samples, mem = _train_cases(ctx, {"ours": ours, "peft": pm, "floor": floor}, batch, ctx.n(10, 3))
    ideal = flop_ideal(16, linear_targets(base))
    res.extra["flop_ideal_overhead"] = ideal
    for ph in ("forward", "backward", "optimizer", "step"):
        o, p, f = med(samples, "ours", ph), med(samples, "peft", ph), med(samples, "floor", ph)
        res.row(f"{ph} (median)", "ms", o * 1e3, p * 1e3, floor=None if ph == "optimizer" else f * 1e3)
    for n in ("ours", "peft"):
        for ph in ("forward", "backward"):
            res.extra[f"{n}_{ph}_over_floor"] = med(samples, n, ph) / med(samples, "floor", ph) - 1
        fb = lambda who: med(samples, who, "forward") + med(samples, who, "backward")
        res.extra[f"{n}_fwd_bwd_over_floor"] = fb(n) / fb("floor") - 1
    res.row("activations saved for backward", "MiB", mem["ours"]["activations_mib"], mem["peft"]["activations_mib"],
            floor=mem["floor"]["activations_mib"])
    res.row("trainable params + grads + AdamW state", "MiB", mem["ours"]["trainable_state_mib"],
            mem["peft"]["trainable_state_mib"])
    if ctx.device.startswith("cuda"):
        res.row("CUDA peak during a step", "MiB", mem["ours"]["cuda_peak_mib"], mem["peft"]["cuda_peak_mib"],
                floor=mem["floor"]["cuda_peak_mib"])
    for r in res.rows:
        res.target(f"ours/PEFT {r['metric']}", r["ratio"], 1.0)
    res.target("training overhead (fwd+bwd) above the floor / FLOP-ideal", res.extra["ours_fwd_bwd_over_floor"] /
               ideal, 1.5, note=f"FLOP-ideal {ideal:.1%}; ours {res.extra['ours_fwd_bwd_over_floor']:.1%}, "
                                f"PEFT {res.extra['peft_fwd_bwd_over_floor']:.1%} above the floor")
    # the memory-traffic floor: the bytes the branches must move, at this machine's copy bandwidth
    moved = branch_bytes(16, linear_targets(base), z["batch"] * z["seq"], next(base.parameters()).element_size())
    rate = bandwidth(ctx.device)
    floor_s = (moved["forward"] + moved["backward"]) / rate
    res.extra.update(branch_bytes=moved, bandwidth_bytes_per_s=rate, traffic_floor_ms=floor_s * 1e3)
    for n in ("ours", "peft"):
        over = sum(med(samples, n, ph) - med(samples, "floor", ph) for ph in ("forward", "backward"))
        res.extra[f"{n}_over_traffic_floor"] = over / floor_s
    # the arithmetic floor beside it: the branches' FLOPs at the rate dense products of these shapes reach here;
    # where it exceeds the traffic floor the device runs the branches compute-bound, out of the traffic goal's reach
    flops = branch_flops(16, linear_targets(base), z["batch"] * z["seq"])
    compute_s = flops / matmul_rate(ctx.device, z["batch"] * z["seq"], linear_targets(base), ctx.dtype)
    res.extra.update(branch_flops=flops, compute_floor_ms=compute_s * 1e3)
    for n in ("ours", "peft"):
        res.extra[f"{n}_over_compute_floor"] = res.extra[f"{n}_over_traffic_floor"] * floor_s / compute_s
    res.target("branch time (fwd+bwd above the floor) / memory-traffic floor", res.extra["ours_over_traffic_floor"],
               1.3, note=f"{(moved['forward'] + moved['backward']) / 2**20:.0f} MiB at {rate / 1e9:.1f} GB/s = "
                         f"{floor_s * 1e3:.2f} ms; PEFT {res.extra['peft_over_traffic_floor']:.2f}; their "
                         f"{flops / 1e9:.1f} GFLOP at the dense products' rate take {compute_s * 1e3:.2f} ms "
                         f"(ours {res.extra['ours_over_compute_floor']:.2f}x that, PEFT "
                         f"{res.extra['peft_over_compute_floor']:.2f}x)")
    # the same three with transformers' gradient checkpointing (the forward runs again inside backward)
    for m in (ours, pm, floor):
        m.gradient_checkpointing_enable()
    ckpt, _ = _train_cases(ctx, {"ours": ours, "peft": pm, "floor": floor}, batch, ctx.n(10, 3))
    o, p, f = (med(ckpt, k, "step") for k in ("ours", "peft", "floor"))
    res.row("step with gradient checkpointing (median)", "ms", o * 1e3, p * 1e3, floor=f * 1e3)
    res.target("ours/PEFT step with gradient checkpointing", o / p, 1.0)
    res.extra["samples_checkpointing"] = ckpt
    res.extra["samples"] = samples
    return res


def case_inference(ctx: Ctx) -> Result:
    z = sizes(ctx)
    res = Result("2", "Inference with an unmerged and a merged adapter, against the bare base",
                 setup={**z, "r": 16})
    base = _model(ctx, z).eval()
    ids = tokens(z["batch"], z["seq"], z["vocab"], ctx.device)
    ours = peftsurgery.apply(clone(base), "lora", r=16, alpha=32, targets="all-linear").eval()
    pm = _peft_lora(clone(base)).eval()
    copy_lora(pm, ours, random_b=0.02)
    ours_m = peftsurgery.apply(clone(base), "lora", r=16, alpha=32, targets="all-linear").eval()
    copy_lora(pm, ours_m)  # the same adapter again (an adapted model does not deepcopy: its plugin is a module)
    peftsurgery.merge(ours_m)
    pm_m = clone(pm)
    pm_m.merge_adapter()
    models = {"base": base, "ours": ours, "peft": pm, "ours_merged": ours_m, "peft_merged": pm_m}

    def fwd(m):
        def f():
            t0 = clock(ctx.device)
            with torch.no_grad():
                m(input_ids=ids)
            return {"forward": clock(ctx.device) - t0}
        return f
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        res.extra["parity_max_abs_diff_unmerged"] = float((ours(input_ids=ids).logits - ref).abs().max())
        res.extra["parity_max_abs_diff_merged"] = float((ours_m(input_ids=ids).logits - ref).abs().max())
    samples = interleave({n: fwd(m) for n, m in models.items()}, ctx.n(12, 3), ctx.w())
    b = med(samples, "base", "forward")
    for kind in ("", "_merged"):
        o, p = med(samples, "ours" + kind, "forward"), med(samples, "peft" + kind, "forward")
        res.row(f"forward, {'merged' if kind else 'unmerged'} adapter", "ms", o * 1e3, p * 1e3, base=b * 1e3,
                ours_over_base=o / b - 1, peft_over_base=p / b - 1)
        res.target(f"ours/PEFT {'merged' if kind else 'unmerged'}", o / p, 1.0)
    res.target("merged inference above the base", med(samples, "ours_merged", "forward") / b - 1, 0.01)
    res.extra["samples"] = samples
    return res


def case_mixed(ctx: Ctx) -> Result:
    z = sizes(ctx)
    n_ad, rows = (8, 32) if not ctx.quick else (3, 6)
    res = Result("3", f"Mixed-adapter batch inference: {n_ad} LoRA adapters, each of {rows} rows its own",
                 setup={**z, "adapters": n_ad, "rows": rows, "r": 16})
    base = _model(ctx, z).eval()
    names = [f"a{i}" for i in range(n_ad)]
    ours, pm = clone(base), None
    for i, n in enumerate(names):
        peftsurgery.apply(ours, "lora", name=n, r=16, alpha=32, targets="all-linear")
        if pm is None:
            pm = _peft_lora(clone(base), name=n)
        else:
            import peft
            pm.add_adapter(n, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS))
        copy_lora(pm, ours, name=n, random_b=0.02, seed=i)
    ours.eval(), pm.eval()
    per_row = [names[i % n_ad] for i in range(rows)]
    shapes = {"prefill": z["seq"], "one token": 1}
    for label, seq in shapes.items():
        ids = tokens(rows, seq, z["vocab"], ctx.device, seed=3)

        def run_ours():
            t0 = clock(ctx.device)
            with torch.no_grad(), peftsurgery.route(ours, per_row):
                ours(input_ids=ids)
            return {"forward": clock(ctx.device) - t0}

        def run_peft():
            t0 = clock(ctx.device)
            with torch.no_grad():
                pm(input_ids=ids, adapter_names=per_row)
            return {"forward": clock(ctx.device) - t0}

        def run_base():
            t0 = clock(ctx.device)
            with torch.no_grad():
                base(input_ids=ids)
            return {"forward": clock(ctx.device) - t0}
        with torch.no_grad(), peftsurgery.route(ours, per_row):
            got = ours(input_ids=ids).logits
        with torch.no_grad():
            want = pm(input_ids=ids, adapter_names=per_row).logits
        res.extra[f"parity_max_abs_diff_{label}"] = float((got - want).abs().max())
        samples = interleave({"ours": run_ours, "peft": run_peft, "base": run_base}, ctx.n(7, 3), ctx.w(2, 1))
        o, p, b = (med(samples, n, "forward") for n in ("ours", "peft", "base"))
        tok = rows * seq
        res.row(f"{label}: {rows} x {seq} tokens, time", "ms", o * 1e3, p * 1e3, base=b * 1e3)
        res.row(f"{label}: throughput", "tokens/s", tok / o, tok / p, base=tok / b)
        res.target(f"{label}: throughput ours/PEFT", p / o, 3.0, better=">=",
                   note=f"the base model alone bounds it at {p / b:.2f}x")
        res.target(f"{label}: time ours/PEFT", o / p, 1.0)
        res.extra[f"samples_{label}"] = samples
    return res


def case_prompts(ctx: Ctx) -> Result:
    import peft
    z = sizes(ctx)
    res = Result("4", "Prompt tuning and prefix tuning training steps, 20 virtual tokens",
                 setup={**z, "num_virtual_tokens": 20})
    base = _model(ctx, z)
    ids = tokens(z["batch"], z["seq"], z["vocab"], ctx.device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    floor = floor_inputs_require_grad(clone(base))
    for label, plugin, pcfg in (
            ("prompt tuning", "prompt-tuning", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
            ("prefix tuning", "prefix-tuning", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))):
        try:
            ours = peftsurgery.apply(clone(base), plugin, num_tokens=20, init="random")
            pm = peft.get_peft_model(clone(base), pcfg)
            samples, mem = _train_cases(ctx, {"ours": ours, "peft": pm, "floor": floor}, batch, ctx.n(7, 3))
        except Exception as e:  # one method failing must not lose the others' figures
            res.errors.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
            continue
        for ph in ("forward", "backward", "optimizer", "step"):
            o, p = med(samples, "ours", ph), med(samples, "peft", ph)
            f = med(samples, "floor", ph)
            r = res.row(f"{label}: {ph}", "ms", o * 1e3, p * 1e3, floor=None if ph == "optimizer" else f * 1e3)
            res.target(f"ours/PEFT {label} {ph}", r, 1.0)
        res.row(f"{label}: activations saved", "MiB", mem["ours"]["activations_mib"], mem["peft"]["activations_mib"])
        res.extra[f"samples_{label}"] = samples
    return res


def case_mixed_prompts(ctx: Ctx) -> Result:
    """A batch mixing prompt-tuning adapters, row i with its own (peftsurgery.route), against one batch per adapter
    (the only way PEFT runs several prompts: set_adapter, then that adapter's rows); the same prompts in both."""
    import peft
    z = sizes(ctx)
    n_ad, rows, P = (8, 32, 20) if not ctx.quick else (3, 6, 4)
    res = Result("7", f"Mixed-task batch inference: {n_ad} prompt-tuning adapters of {P} tokens, each of {rows} rows "
                 "its own, against one batch per adapter", setup={**z, "adapters": n_ad, "rows": rows,
                                                               "num_virtual_tokens": P})
    base = _model(ctx, z).eval()
    names = [f"t{i}" for i in range(n_ad)]
    ours, pm = clone(base), None
    for i, n in enumerate(names):
        peftsurgery.apply(ours, "prompt-tuning", name=n, num_tokens=P, init="random", seed=i)
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        if pm is None:
            pm = peft.get_peft_model(clone(base), cfg, adapter_name=n)
        else:
            pm.add_adapter(n, cfg)
        with torch.no_grad():
            pm.prompt_encoder[n].embedding.weight.copy_(
                next(iter(peftsurgery.adapters(ours)[n].records[0].built.values())).weight)
    ours.eval(), pm.eval()
    per_row = [names[i % n_ad] for i in range(rows)]
    groups = {n: [i for i, m in enumerate(per_row) if m == n] for n in names}
    ids = tokens(rows, z["seq"], z["vocab"], ctx.device, seed=3)
    mask = torch.ones_like(ids)

    def routed():
        with torch.no_grad(), peftsurgery.route(ours, per_row):
            return ours(input_ids=ids, attention_mask=mask).logits

    def per_adapter(model, activate):
        out = {}
        with torch.no_grad():
            for n, idx in groups.items():
                activate(n)
                out[n] = model(input_ids=ids[idx], attention_mask=mask[idx]).logits
        return out

    def timed(fn):
        def run():
            t0 = clock(ctx.device)
            fn()
            return {"forward": clock(ctx.device) - t0}
        return run
    run_ours_split = lambda: per_adapter(ours, lambda n: peftsurgery.set_active(ours, [n]))
    run_peft = lambda: per_adapter(pm, pm.set_adapter)
    got, want = routed(), run_peft()
    res.extra["parity_max_abs_diff"] = max(float((got[idx] - want[n][:, P:]).abs().max())
                                           for n, idx in groups.items())
    samples = interleave({"ours": timed(routed), "peft": timed(run_peft), "ours_split": timed(run_ours_split)},
                         ctx.n(7, 3), ctx.w(2, 1))
    o, p, s = (med(samples, n, "forward") for n in ("ours", "peft", "ours_split"))
    tok = rows * z["seq"]
    res.row(f"{rows} x {z['seq']} tokens, one mixed batch vs one per adapter, time", "ms", o * 1e3, p * 1e3,
            ours_one_per_adapter=s * 1e3)
    res.row("throughput (user tokens)", "tokens/s", tok / o, tok / p, ours_one_per_adapter=tok / s)
    res.target("throughput ours/PEFT", p / o, 1.0, better=">=")
    res.extra["samples"] = samples
    return res


def case_locate(ctx: Ctx) -> Result:
    import peft
    if ctx.quick:
        cfg = dict(hidden=256, layers=4, heads=8, kv_heads=2, inter=704, vocab=1000)
    else:  # TinyLlama-1.1B's shape
        cfg = dict(hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632, vocab=32000)
    res = Result("5", "Locate + apply, all linears, on a meta-device Llama", setup=cfg)
    build = lambda: llama(cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["inter"], cfg["vocab"],
                          meta=True)
    first = {}

    def ours():
        m = build()
        t0 = time.perf_counter()
        sm = peftsurgery.sitemap(m)
        t1 = time.perf_counter()
        peftsurgery.apply(m, "lora", r=16, alpha=32, targets="all-linear")
        t2 = time.perf_counter()
        first.setdefault("ours", t2 - t0)
        return {"locate": t1 - t0, "apply": t2 - t1, "total": t2 - t0, "sites": len(sm)}

    def theirs():
        m = build()
        t0 = time.perf_counter()
        peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LINEARS))
        t = time.perf_counter() - t0
        first.setdefault("peft", t)
        return {"total": t}
    samples = interleave({"ours": ours, "peft": theirs}, ctx.n(7, 2), ctx.w(2, 1))
    params = sum(p.numel() for p in build().parameters())
    res.setup["parameters"] = params
    o, p = med(samples, "ours", "total"), med(samples, "peft", "total")
    res.row("locate + apply (warm)", "s", o, p, locate=med(samples, "ours", "locate"),
            apply=med(samples, "ours", "apply"))
    res.extra["first_call_s"] = first  # includes one-time imports and torch.export's start-up
    res.extra["sites"] = samples["ours"]["sites"][0]
    res.target("ours/PEFT locate + apply", o / p, 1.0)
    res.target("locate + apply on the 1.1B config", o, 1.0, note="seconds")
    return res


def _quantize_like_ours(model):
    """PEFT's side of case 6: the same NF4 double-quantized base as qlora's Quantize rule builds."""
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear and cname in LINEARS:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                                        device=child.weight.device)
                new.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=True)
                new.support_avx512bf16_for_cpu = False   # the same dequantize-and-matmul path as ours
                setattr(mod, cname, new.to(child.weight.device))
    return model


def _resident(model) -> tuple[int, int]:
    """(bytes, original parameter count) of the quantized linears: packed weights plus quantization state."""
    import bitsandbytes as bnb
    nbytes = count = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            nbytes += w.numel() * w.element_size()
            qs = w.quant_state
            for t in qs.as_dict(packed=True).values():
                if isinstance(t, torch.Tensor):
                    nbytes += t.numel() * t.element_size()
            count += int(torch.Size(qs.shape).numel())
            if m.bias is not None:
                nbytes += m.bias.numel() * m.bias.element_size()
                count += m.bias.numel()
    return nbytes, count


def case_qlora(ctx: Ctx) -> Result:
    z = sizes(ctx)
    if not ctx.quick:
        z = {**z, "batch": 4}  # the 4-bit CPU kernels are slow: half the batch of case 1
    res = Result("6", "QLoRA: NF4 double-quantized base, LoRA r=16 on all linears", setup=z)
    base = _model(ctx, z)
    ids = tokens(z["batch"], z["seq"], z["vocab"], ctx.device)
    batch = {"input_ids": ids, "labels": ids}
    ours = peftsurgery.apply(clone(base), "qlora", r=16, alpha=32)
    pm = _peft_lora(_quantize_like_ours(clone(base)))
    copy_lora(pm, ours)
    ob, oc = _resident(ours)
    pb, pc = _resident(pm)
    res.row("resident memory of the quantized linears", "bytes/param", ob / oc, pb / pc, fp32=4.0)
    samples, mem = _train_cases(ctx, {"ours": ours, "peft": pm}, batch, ctx.n(6, 2))
    for ph in ("forward", "backward", "optimizer", "step"):
        r = res.row(f"{ph} (median)", "ms", med(samples, "ours", ph) * 1e3, med(samples, "peft", ph) * 1e3)
        res.target(f"ours/PEFT {ph}", r, 1.0)
    res.target("ours/PEFT resident bytes per parameter", (ob / oc) / (pb / pc), 1.0)
    res.extra["samples"] = samples
    return res


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def case_serving(ctx: Ctx) -> Result:
    """Serving: one decoding step (every row one new token after its cached prompt) with N LoRA adapters of mixed
    ranks on q/k/v/o, row i routed to adapter i mod N (peftsurgery.route against PEFT's adapter_names=), beside the
    bare base; and prefix and prompt tuning's decoding steps against the base. Each candidate keeps its own cache,
    cropped back to the prompt after every step; the step's logits are checked against PEFT's first."""
    import peft
    z = sizes(ctx)
    counts, rows, P = ((1, 8, 64, 256), 64, 20) if not ctx.quick else ((1, 3, 8), 8, 4)
    ranks = (8, 16, 32)
    res = Result("8", f"Serving: a decoding step of {rows} rows after {z['seq']}-token prompts, with "
                 f"{'/'.join(map(str, counts))} LoRA adapters (ranks {'/'.join(map(str, ranks))}, q/k/v/o), one per "
                 f"row; prefix and prompt tuning ({P} tokens)",
                 setup={**z, "rows": rows, "adapters": counts, "ranks": ranks, "dtype": str(ctx.dtype),
                        "prefix_tokens": P})
    base = _model(ctx, z).eval()
    ids = tokens(rows, z["seq"], z["vocab"], ctx.device, seed=3)
    nxt = tokens(rows, 1, z["vocab"], ctx.device, seed=4)

    def stepper(model, around=lambda: contextlib.nullcontext(), fill=True, **kw):
        """(one timed decoding step, its logits): the cache of the prompt is built once (an empty cache passed in,
        as generate() does; fill=False: the model makes its own), cropped after each step."""
        from transformers import DynamicCache
        given = {"past_key_values": DynamicCache(config=model.config)} if fill else {}
        with torch.no_grad(), around():
            cache = model(input_ids=ids, use_cache=True, **given, **kw).past_key_values
        keep = cache.get_seq_length()

        def logits():
            with torch.no_grad(), around():
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw).logits
            cache.crop(keep - cache.get_seq_length())   # a negative count: remove the step's token
            return out

        def run():
            t0 = clock(ctx.device)
            logits()
            return {"step": clock(ctx.device) - t0}
        return run, logits

    base_run, _ = stepper(base)
    for n_ad in counts:
        names = [f"a{i}" for i in range(n_ad)]
        ours, pm = clone(base), None
        for i, n in enumerate(names):
            r = ranks[i % len(ranks)]
            peftsurgery.apply(ours, "lora", name=n, r=r, alpha=2 * r, targets="attn.q,attn.k,attn.v,attn.o")
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=ATTN)
            pm = peft.get_peft_model(clone(base), cfg, adapter_name=n) if pm is None else pm
            if n not in pm.peft_config:
                pm.add_adapter(n, cfg)
            copy_lora(pm, ours, name=n, random_b=0.02, seed=i)
        ours.eval(), pm.eval()
        per_row = [names[i % n_ad] for i in range(rows)]
        ours_run, ours_logits = stepper(ours, lambda: peftsurgery.route(ours, per_row))
        peft_run, peft_logits = stepper(pm, adapter_names=per_row)
        res.extra[f"parity_max_abs_diff_{n_ad}"] = float((ours_logits() - peft_logits()).abs().max())
        cands = {"ours": ours_run, "peft": peft_run, "base": base_run}
        if kernels.usable(ids):   # the triton kernel ran: time the torch path beside it
            torch_run, torch_logits = stepper(ours, lambda: _torch_path(ours, per_row))
            res.extra[f"kernel_vs_torch_max_abs_diff_{n_ad}"] = float((ours_logits() - torch_logits()).abs().max())
            cands["torch path"] = torch_run
        samples = interleave(cands, ctx.n(7, 3), ctx.w(2, 1))
        o, p, b = (med(samples, k, "step") for k in ("ours", "peft", "base"))
        res.row(f"decoding step, {n_ad} adapters", "ms", o * 1e3, p * 1e3, base=b * 1e3)
        if "torch path" in samples:
            res.row(f"decoding step, {n_ad} adapters, our torch path (kernel off)", "ms",
                    med(samples, "torch path", "step") * 1e3, p * 1e3, base=b * 1e3)
        res.row(f"decoding, {n_ad} adapters: tokens/s", "tokens/s", rows / o, rows / p, base=rows / b)
        if n_ad in (8, 64):
            res.target(f"{n_ad} adapters: ours / base tokens/s", b / o, 0.85 if n_ad == 8 else 0.70, better=">=")
        res.extra[f"samples_{n_ad}"] = samples
        if n_ad == counts[-1]:
            _replace_one(ctx, res, ours, pm, per_row, ids, ranks, n_ad)
        del ours, pm
    for method, key in (("prefix-tuning", "prefix"), ("prompt-tuning", "prompt")):
        ours = clone(base)
        peftsurgery.apply(ours, method, num_tokens=P, init="random")
        ours.eval()
        run, got = stepper(ours)
        cands = {"ours": run, "base": base_run}
        if key == "prompt":   # beside it the prompt in the sequence and the cache (a cache the model makes itself)
            cands["in sequence"], want = stepper(ours, fill=False)
            res.extra["prompt_apart_vs_in_sequence_max_abs_diff"] = float((got() - want()).abs().max())
        samples = interleave(cands, ctx.n(7, 3), ctx.w(2, 1))
        o, b = med(samples, "ours", "step"), med(samples, "base", "step")
        res.row(f"{key} tuning ({P} tokens): decoding step", "ms", o * 1e3, None, base=b * 1e3)
        if "in sequence" in samples:
            res.row(f"{key} tuning: decoding step, prompt in the sequence and the cache", "ms",
                    med(samples, "in sequence", "step") * 1e3, None, base=b * 1e3)
        res.target(f"{key} tuning: ours / base tokens/s", b / o, 0.98, better=">=")
        res.extra[f"samples_{key}"] = samples
    return res


@contextlib.contextmanager
def _torch_path(model, rows):
    """route() with the triton kernel off: the torch path it falls back to."""
    kernels.ENABLED = False
    try:
        with peftsurgery.route(model, rows):
            yield
    finally:
        kernels.ENABLED = True


def _replace_one(ctx, res, ours, pm, per_row, ids, ranks, held: int):
    """A server holding N adapters swaps one for a new one (removed, another applied): the first routed prefill
    that serves it (ours: only the new adapter's slots of the stacked factors are written), against PEFT's first
    after delete_adapter / add_adapter and against our next, steady prefill."""
    import peft
    times = {"ours": [], "peft": [], "steady": []}
    for k in range(ctx.n(3, 1)):
        old, new = per_row[k], f"new{k}"
        rows = [new if n == old else n for n in per_row]
        peftsurgery.remove(ours, old)
        pm.delete_adapter(old)
        r = ranks[k % len(ranks)]
        peftsurgery.apply(ours, "lora", name=new, r=r, alpha=2 * r, targets="attn.q,attn.k,attn.v,attn.o")
        pm.add_adapter(new, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=ATTN))
        copy_lora(pm, ours, name=new, random_b=0.02, seed=100 + k)
        ours.eval(), pm.eval()
        for key, model, around, kw in (("ours", ours, lambda: peftsurgery.route(ours, rows), {}),
                                       ("peft", pm, contextlib.nullcontext, {"adapter_names": rows}),
                                       ("steady", ours, lambda: peftsurgery.route(ours, rows), {})):
            t0 = clock(ctx.device)
            with torch.no_grad(), around():
                model(input_ids=ids, **kw)
            times[key].append(clock(ctx.device) - t0)
        per_row = rows
    o, p, b = (statistics.median(times[k]) for k in ("ours", "peft", "steady"))
    res.row(f"one of {held} adapters replaced: first prefill", "ms", o * 1e3, p * 1e3,
            ours_steady=b * 1e3)
    res.extra["replace_one"] = times


def case_compiled(ctx: Ctx) -> Result:
    """torch.compile: the bare base, ours and PEFT (LoRA r=16 on every linear, the same factors), eager against
    compiled, for an inference forward and a training step (the base's step is the floor of case 1). Graph breaks
    are counted first (torch._dynamo.explain); a model without any is compiled with fullgraph=True."""
    z = sizes(ctx)
    res = Result("9", f"torch.compile (backend {ctx.backend}) against eager: forward and LoRA training step",
                 setup={**z, "r": 16, "backend": ctx.backend})
    base = _model(ctx, z)
    ids = tokens(z["batch"], z["seq"], z["vocab"], ctx.device)
    batch = {"input_ids": ids, "labels": ids}
    models = {"ours": peftsurgery.apply(clone(base), "lora", r=16, alpha=32, targets="all-linear"),
              "peft": _peft_lora(clone(base)), "base": base, "floor": floor_inputs_require_grad(clone(base))}
    copy_lora(models["peft"], models["ours"], random_b=0.02)
    torch._dynamo.reset()
    compiled = {}
    for n, m in models.items():
        breaks = torch._dynamo.explain(m)(**batch).graph_break_count
        res.extra[f"graph_breaks_{n}"] = breaks
        compiled[n] = torch.compile(m, fullgraph=breaks == 0, backend=ctx.backend)
    res.target("graph breaks, ours", res.extra["graph_breaks_ours"], res.extra["graph_breaks_base"],
               note=f"PEFT {res.extra['graph_breaks_peft']}, base {res.extra['graph_breaks_base']}, floor "
                    f"{res.extra['graph_breaks_floor']}")
    with torch.no_grad():
        eager, done = models["ours"](**batch).logits, compiled["ours"](**batch).logits
        res.extra["parity_compiled_max_abs_diff"] = float((eager - done).abs().max())
        res.extra["parity_peft_max_abs_diff"] = float((done - compiled["peft"](**batch).logits).abs().max())

    def forward(m):
        def run():
            t0 = clock(ctx.device)
            with torch.no_grad():
                m(**batch)
            return {"forward": clock(ctx.device) - t0}
        return run
    reps, warm = ctx.n(7, 2), ctx.w(2, 1)
    for kind, ms in (("eager", models), ("compiled", compiled)):
        for m in models.values():
            m.eval()
        samples = interleave({n: forward(ms[n]) for n in ("ours", "peft", "base")}, reps, warm)
        res.row(f"forward, {kind}", "ms", *(med(samples, n, "forward") * 1e3 for n in ("ours", "peft")),
                base=med(samples, "base", "forward") * 1e3)
        res.extra[f"samples_forward_{kind}"] = samples
        for m in models.values():
            m.train()
        opts = {n: _adamw(models[n]) for n in ("ours", "peft", "floor")}
        samples = interleave({n: (lambda m=ms[n], o=o: train_step(m, o, batch, ctx.device)) for n, o in opts.items()},
                             reps, warm)
        res.row(f"training step, {kind}", "ms", *(med(samples, n, "step") * 1e3 for n in ("ours", "peft")),
                floor=med(samples, "floor", "step") * 1e3)
        res.extra[f"samples_step_{kind}"] = samples
    for r in res.rows:
        if "compiled" in r["metric"]:
            res.target(f"ours/PEFT {r['metric']}", r["ratio"], 1.0)
    return res


CASES = {"1": case_lora_train, "2": case_inference, "3": case_mixed, "4": case_prompts, "5": case_locate,
         "6": case_qlora, "7": case_mixed_prompts, "8": case_serving,
         "9": case_compiled}
