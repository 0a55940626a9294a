"""One rank of the multi-process tests (gloo on the CPU): tests/test_distributed.py forks two ranks of it; by hand
`torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT CASE...` runs the same.

Each case: rank 0 locates the sites and shares them (peftsurgery.distributed.shared_sitemap), every rank applies
the method with the same seed, wraps the model (DistributedDataParallel or FSDP2's fully_shard), trains STEPS
steps on its half of a global batch, checks what only the ranks can see (trainable parameters, gradients the same
on every rank, base bit-identical to its own copy from before and to rank 0's), and saves with save_adapters
(rank 0 writes). OUT/CASE/ gets the adapter and one rank{r}.json per rank."""
import json
import os
import sys
import warnings

import torch

import peftsurgery
from peftsurgery.integrations import save_adapters
from peftsurgery.surgery import CONTAINER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import VOCAB, tiny_llama, tiny_llama_4bit  # noqa: E402

STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 8
CASES = {   # case -> (wrapper, model factory, method, options)
    "ddp-lora": ("ddp", tiny_llama, "lora", {"r": 2, "targets": "attn.q,attn.v,mlp.up"}),
    "ddp-prompt": ("ddp", tiny_llama, "prompt-tuning", {"num_tokens": 3}),
    "ddp-qlora": ("ddp", tiny_llama_4bit, "qlora", {"r": 2}),
    "fsdp-lora": ("fsdp", tiny_llama, "lora", {"r": 2, "targets": "attn.q,attn.v,mlp.up"}),
    "fsdp-prompt": ("fsdp", tiny_llama, "prompt-tuning", {"num_tokens": 3}),
    # deferred initialisation: rank 1 builds on the meta device, rank 0's real model is broadcast into the shards
    "fsdp-meta-lora": ("fsdp-meta", tiny_llama, "lora", {"r": 2, "targets": "attn.q,attn.v,mlp.up"}),
    "fsdp-meta-prompt": ("fsdp-meta", tiny_llama, "prompt-tuning", {"num_tokens": 3, "init": "vocab"}),
}


def build(case: str, locate=peftsurgery.sitemap, meta=False):
    """The base model and its adapter, the same on every rank and in the single-process reference (`meta`: its
    shapes only, on the meta device)."""
    _, factory, method, options = CASES[case]
    with torch.device("meta" if meta else "cpu"):
        model = factory()
    locate(model)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peftsurgery.apply(model, method, **options)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(100 + step))


def train(model, rows=slice(None), check_grads=None):
    """STEPS AdamW steps on rows `rows` of each global batch (the loss: mean next-token loss over those rows)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(STEPS):
        x = batch(i)[rows]
        model(input_ids=x, labels=x).loss.backward()
        if check_grads:
            check_grads()
        opt.step()
        opt.zero_grad()
    model.eval()


def base_state(model) -> dict:
    """The base's tensors (parameters and buffers, adapters left out), whole (FSDP2 shards gathered)."""
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if CONTAINER not in n.split("."):
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[n.removeprefix("module.")] = t.detach().clone()
    return out


def run(case: str, out: str) -> None:
    import torch.distributed as dist
    from peftsurgery.distributed import shared_sitemap
    rank, world = dist.get_rank(), dist.get_world_size()
    wrapper = CASES[case][0]
    from peftsurgery import surgery
    located, locate = [], surgery.locate
    surgery.locate = lambda *a, **k: (located.append(1), locate(*a, **k))[1]
    try:
        model = build(case, shared_sitemap, meta=wrapper == "fsdp-meta" and rank != 0)
    finally:
        surgery.locate = locate
    before = base_state(model) if wrapper != "fsdp-meta" else None
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    grads_same = []
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)

        def check_grads():   # every rank holds the same (reduced) gradient
            for p in model.parameters():
                if p.requires_grad:
                    g = p.grad.clone()
                    dist.broadcast(g, 0)
                    grads_same.append(torch.equal(g, p.grad))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))

        def shard(model):
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        if wrapper == "fsdp":
            wrapped = shard(model)
        else:
            from peftsurgery.distributed import shard_from_rank0
            wrapped = shard_from_rank0(model, shard, "cpu")
            before = base_state(model)   # every tensor real now, buffers included
            built = build(case)          # what every rank must now hold, the adapter's initial values included
            want = {**base_state(built), **{n: p.detach() for n, p in built.named_parameters() if p.requires_grad}}
            have = {**before, **{n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad}}
            as_built = have.keys() == want.keys() and all(torch.equal(have[n], want[n]) for n in want)
        check_grads = None
    per = GLOBAL_BATCH // world
    train(wrapped, slice(rank * per, (rank + 1) * per), check_grads)
    after = base_state(model)
    from_rank0 = {}
    for n, t in after.items():
        t0 = t.clone()
        dist.broadcast(t0, 0)
        from_rank0[n] = torch.equal(t0, t)
    save_adapters(model, os.path.join(out, case))
    dist.barrier()
    result = {"trainable": trainable, "adapters_only": all(n.startswith(CONTAINER + ".") for n in trainable),
              "base_unchanged": before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in after),
              "base_as_rank0": all(from_rank0.values()), "grads_same": all(grads_same) if grads_same else None,
              "as_built": as_built if wrapper == "fsdp-meta" else None,
              "located": len(located), "sharded": any(hasattr(p, "full_tensor") for p in model.parameters() if p.requires_grad)}
    with open(os.path.join(out, case, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main(out: str, cases: list[str], rank: int | None = None, world: int = 2, init: str = "env://") -> None:
    """One rank: under torchrun the rank comes from the environment; the tests fork ranks and pass it."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    kw = {} if rank is None else {"rank": rank, "world_size": world}
    dist.init_process_group("gloo", init_method=init, timeout=datetime.timedelta(seconds=60), **kw)
    try:
        for case in cases:
            try:
                run(case, out)
            except Exception as e:   # the test shows it
                os.makedirs(os.path.join(out, case), exist_ok=True)
                with open(os.path.join(out, case, f"error{dist.get_rank()}.txt"), "w") as f:
                    f.write(f"{type(e).__name__}: {e}")
                raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
