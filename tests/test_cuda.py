"""The same surgery on a CUDA device: every built-in method applies to a model already on the GPU, trains
there with the base frozen, and agrees with the CPU; adapters saved on the GPU load on the CPU. Skipped where no
CUDA device is visible (CI has none; these ran on the GPU lent through the device tool)."""
import pytest
import torch

import peftsurgery as ps

from conftest import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

METHODS = {"lora": {"r": 4, "targets": "all-linear"}, "adapter": {"bottleneck": 4},
           "prompt-tuning": {"num_tokens": 3}, "prefix-tuning": {"num_tokens": 3}}
IDS = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def _nudge(model, seed=1):
    """Move the adapter away from its (often output-preserving) start values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._peftsurgery.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.2).to(p.device))
    return model


def _same_adapter(cpu, gpu):
    """Random starting values are drawn on the device they live on: give the GPU copy the CPU's values."""
    gpu._peftsurgery.load_state_dict(cpu._peftsurgery.state_dict())
    return gpu


@pytest.mark.parametrize("method", list(METHODS))
def test_applies_on_gpu_trains_and_matches_cpu(method, tmp_path):
    cpu = _nudge(ps.apply(tiny_llama(), method, **METHODS[method]))
    gpu = _same_adapter(cpu, ps.apply(tiny_llama().cuda(), method, **METHODS[method]))
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    with torch.no_grad():
        want = cpu(input_ids=IDS).logits
        got = gpu(input_ids=IDS.cuda()).logits
    assert torch.allclose(got.cpu(), want, atol=1e-4), float((got.cpu() - want).abs().max())

    frozen = {n: p.detach().clone() for n, p in gpu.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in gpu.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in gpu.parameters() if p.requires_grad], lr=1e-2)
    gpu.train()
    gpu(input_ids=IDS.cuda(), labels=IDS.cuda()).loss.backward()
    opt.step()
    gpu.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in gpu.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trainable[n]) for n, p in gpu.named_parameters() if n in trainable)

    ps.save(gpu, tmp_path / "a")
    back = ps.load(tiny_llama(), tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(back(input_ids=IDS).logits, gpu(input_ids=IDS.cuda()).logits.cpu(), atol=1e-4)


def test_lora_merge_and_routing_on_gpu():
    m = tiny_llama().cuda()
    for i, name in enumerate(["a", "b"]):
        _nudge(ps.apply(m, "lora", name=name, r=4, targets="all-linear"), seed=i + 1)
    ids = IDS.cuda()
    with torch.no_grad():
        alone = {}
        for name in ["a", "b"]:
            ps.set_active(m, [name])
            alone[name] = m(input_ids=ids).logits
        ps.set_active(m, ["a", "b"])
        rows = ["b", "a", None]
        with ps.route(m, rows):
            got = m(input_ids=ids).logits
        with ps.disabled(m):
            base = m(input_ids=ids).logits
        for i, want in enumerate([alone["b"], alone["a"], base]):
            assert torch.allclose(got[i], want[i], atol=1e-4), i
        ps.set_active(m, ["a"])
        ps.merge(m)
        assert torch.allclose(m(input_ids=ids).logits, alone["a"], atol=1e-4)


def test_qlora_on_gpu_quantizes_there_and_trains():
    bnb = pytest.importorskip("bitsandbytes")
    m = ps.apply(tiny_llama().cuda(), "qlora", r=4)
    quantized = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert quantized and all(q.weight.device.type == "cuda" for q in quantized)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(5):
        loss = m(input_ids=IDS.cuda(), labels=IDS.cuda()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_prefix_generate_on_gpu_matches_cpu():
    cpu = _nudge(ps.apply(tiny_llama(), "prefix-tuning", num_tokens=3))
    gpu = _same_adapter(cpu, ps.apply(tiny_llama().cuda(), "prefix-tuning", num_tokens=3))
    ids = IDS[:1]
    with torch.no_grad():
        want = cpu.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = gpu.generate(ids.cuda(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.cpu().tolist() == want.tolist()
