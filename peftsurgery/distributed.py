"""Several processes (torchrun, accelerate launch): locate the sites once and share them.

    import torch.distributed as dist, peftsurgery
    from peftsurgery.distributed import shared_sitemap
    dist.init_process_group("gloo")        # or nccl
    shared_sitemap(model)                   # rank 0 locates; the others receive its SiteMap (JSON + safetensors)
    peftsurgery.apply(model, "lora", r=8)   # every rank: the same rules on the same sites
    model = DistributedDataParallel(model)  # or fully_shard(...) each block, then the model (FSDP2)

Saving and checkpoints: peftsurgery.integrations.save_adapters (every rank joins, rank 0 writes).
Nothing is pickled: the SiteMap travels as JSON, its example inputs as safetensors bytes.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import SurgeryError
from .sites import Site, SiteMap
from .surgery import sitemap

KEY = "_peftsurgery_sitemap"


def _fields(cls, values: dict) -> dict:
    """Dataclass fields back from JSON: lists become tuples where the field is a tuple."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            out[f.name] = tuple(v) if isinstance(v, list) and "tuple" in str(f.type) else v
    return out


def encode(sm: SiteMap) -> bytes:
    """A SiteMap as bytes: a JSON header (its fields, the sites, the example inputs' non-tensor values) followed by
    the example input tensors in safetensors form."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in sm.inputs.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in sm.inputs.items() if k not in tensors}
    try:
        head = json.dumps({**{f.name: getattr(sm, f.name) for f in dataclasses.fields(sm)
                              if f.name not in ("sites", "inputs")},
                           "sites": [dataclasses.asdict(s) for s in sm.sites], "values": values}).encode()
    except TypeError:
        raise SurgeryError(f"the example inputs ({', '.join(values)}) cannot be sent to the other ranks; give "
                           "example inputs made of tensors, numbers, strings and booleans") from None
    return len(head).to_bytes(8, "little") + head + st_save(tensors)


def decode(data: bytes) -> SiteMap:
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    inputs = {**st_load(data[8 + n:]), **head.pop("values")}
    sites = [Site(**_fields(Site, s)) for s in head["sites"]]
    return SiteMap(**_fields(SiteMap, {**head, "sites": sites, "inputs": inputs}))


def shared_sitemap(model: nn.Module, example_inputs=None, src: int = 0) -> SiteMap:
    """The model's SiteMap, located on rank `src` only and sent to every other rank, where it is kept on the model
    as if located there (so apply and load without example_inputs use it). Call it on every rank, before apply
    and before wrapping the model. Without an initialised process group it is peftsurgery.sitemap(model)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return sitemap(model, example_inputs)
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank == src:
        payload = torch.frombuffer(bytearray(encode(sitemap(model, example_inputs))), dtype=torch.uint8).to(dev)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    if rank != src:
        payload = torch.empty(int(size), dtype=torch.uint8, device=dev)
    dist.broadcast(payload, src)
    if rank == src:
        return model.__dict__[KEY]
    sm = decode(payload.cpu().numpy().tobytes())
    names = set(dict(model.named_modules()))
    missing = [s.path for s in sm.sites if s.kind in ("linear", "embedding", "attention") and (s.fused or s.path) not in names]
    if missing:
        raise SurgeryError(f"rank {rank} has no module {missing[0]} that rank {src} located; every rank must build "
                           "the same model")
    object.__setattr__(model, KEY, sm)
    return sm


def shard_from_rank0(model: nn.Module, shard, device) -> nn.Module:
    """Deferred initialisation with FSDP2, for a model too large for one device: only rank 0 holds the real base
    (from its checkpoint, in host memory), every other rank builds it on the meta device. Every rank has called
    shared_sitemap and apply with the same seed (on rank 0 the adapters start as in one process, from the real
    weights; on the meta device they are shapes only).
    `shard(model)` applies fully_shard (each block, then the model); then every rank gets real storage on `device`
    (to_empty) and rank 0's full state, base and adapters, is broadcast into the shards, its buffers (non-persistent
    ones such as rotary frequencies included) into every rank's copy. Call it on every rank, before the optimizer is
    made. Returns what `shard` returned."""
    dist = torch.distributed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    rank = dist.get_rank()
    metas = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    wrong = torch.tensor([float(rank == 0 and bool(metas))], device=device)
    dist.all_reduce(wrong, op=dist.ReduceOp.MAX)   # every rank refuses together, none waits in a collective
    if wrong.item():
        which = metas[0] if rank == 0 else "a tensor"
        raise SurgeryError(f"rank 0 must hold the real model, but its {which} is on the meta device; load the "
                           "checkpoint on rank 0 and build on the meta device elsewhere")
    full = model.state_dict() if rank == 0 else {}   # references: fully_shard leaves rank 0's tensors as they are
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if rank == 0 else {}
    sharded = shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if rank == 0:
                buf.copy_(buffers[name])
            dist.broadcast(buf, 0)
    return sharded
