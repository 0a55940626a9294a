"""A third-party method package (examples/thirdparty-plugin) installed with pip shows up everywhere and works
through the public API alone."""
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import peftsurgery
from peftsurgery import SurgeryError, registry
from peftsurgery.cli import main
from peftsurgery.zoo import load_model

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "thirdparty-plugin")
DIST = "peftsurgery-ia3-demo"


def _pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin") / "thirdparty-plugin"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = _pip("install", "--no-deps", "--no-build-isolation", "-q", str(src))
    assert r.returncode == 0, f"pip could not install the example plugin: {r.stderr.strip()[-2000:]}"
    importlib.invalidate_caches()
    registry.reload()
    yield
    _pip("uninstall", "-y", "-q", DIST)
    sys.modules.pop("ia3_demo", None)
    importlib.invalidate_caches()
    registry.reload()


def test_listed_by_registry_and_cli(capsys):
    assert "scale-demo" in registry.names()
    assert {"lora", "adapter"} <= set(registry.names())
    assert main(["plugins"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("scale-demo"))
    assert "0.1.0" in line and "IA3" in line and "targets=attn.k,attn.v,mlp.down" in line


def test_identity_at_init_and_exact_budget():
    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peftsurgery.apply(model, "scale-demo", name="ia3")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    # k, v: 64 -> 32 (two kv heads of 16); down: 128 -> 64; two blocks
    assert peftsurgery.budget(model)["adapters"] == {"ia3": 2 * (32 + 32 + 64)}
    rows = peftsurgery.inspect(model)
    assert {r["role"] for r in rows} == {"attn.k", "attn.v", "mlp.down"}
    assert all(r["rule"] == "Scale" for r in rows)


def test_training_changes_only_its_vectors():
    model, _ = load_model("tiny-llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peftsurgery.apply(model, "scale-demo", targets="attn.v,mlp.up")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("_peftsurgery.") and p.dim() == 1 for n, p in trainable.items())
    assert all(torch.equal(p, torch.ones_like(p)) for p in trainable.values())
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(0, 256, (4, 12))
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(not torch.equal(p, torch.ones_like(p)) for p in trainable.values())
    with peftsurgery.disabled(model), torch.no_grad():
        fresh, _ = load_model("tiny-llama")
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_save_load_and_merge(tmp_path):
    model, _ = load_model("tiny-gpt2")           # Conv1D: transposed weights
    peftsurgery.apply(model, "scale-demo", targets="attn.qkv,mlp.down")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    peftsurgery.save(model, tmp_path / "ad")
    fresh, _ = load_model("tiny-gpt2")
    peftsurgery.load(fresh, tmp_path / "ad")
    qkv = fresh.transformer.h[0].attn.c_attn
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=0, rtol=0)
        peftsurgery.merge(fresh)
        assert not qkv._forward_hooks  # merged: the vector's hook is off, the linear runs bare
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        peftsurgery.unmerge(fresh)
        assert len(qkv._forward_hooks) == 1
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        peftsurgery.merge(fresh, unload=True)
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not peftsurgery.adapters(fresh)


def test_invalid_config_and_cli_apply(capsys, tmp_path):
    model, _ = load_model("tiny-llama")
    with pytest.raises(SurgeryError, match="scale-demo: targets"):
        peftsurgery.apply(model, "scale-demo", targets=" ")
    assert main(["apply", "tiny-llama", "--plugin", "scale-demo", "--targets", "mlp.down", "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "scale-demo" in out and "128" in out                 # 2 blocks x 64
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter.json", "adapter.safetensors"]


def test_no_learning_rate_hook_means_1e_3_in_python_and_in_train(tmp_path, capsys, monkeypatch):
    """scale-demo declares no peftsurgery_learning_rate: the fallback is exactly 1e-3, and `peftsurgery train`
    without --lr steps its optimizer at that rate."""
    from peftsurgery.train import write_jsonl
    from test_train import TEMPLATE, examples, tiny_model, tokenizer
    m = registry.Method("scale-demo")
    assert not hasattr(m.plugin, "peftsurgery_learning_rate")
    assert m.learning_rate(m.config({})) == 1e-3
    tiny_model().save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    write_jsonl(examples(16), str(tmp_path / "train.jsonl"))
    seen, real = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda opt, *a, **k: (seen.append([g["lr"] for g in opt.param_groups]), real(opt, *a, **k))[1])
    code = main(["train", str(tmp_path / "model"), "--plugin", "scale-demo", "--data", str(tmp_path / "train.jsonl"),
                 "--template", TEMPLATE.replace("\n", "\\n"), "--label", "pos=positive", "--label",
                 "neg=negative", "--epochs", "1", "--batch-size", "8", "--quiet", "-o", str(tmp_path / "out")])
    monkeypatch.undo()
    assert code == 0, capsys.readouterr().err
    assert seen == [[1e-3], [1e-3]]


def test_own_rule_plugin_trains_saves_only_its_vectors_and_merges(tmp_path):
    """vera-demo defines its own Rule (VeRA: frozen shared random A, B from a seed; trainable d, b): it starts as
    the base, trains only d and b, saves only them (the seed rebuilds A and B on load), merges exactly."""
    from safetensors.torch import load_file
    assert "vera-demo" in registry.names()
    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    peftsurgery.apply(model, "vera-demo", r=4, seed=3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)          # b starts at zero
    # attn.q 64 -> 64 and attn.v 64 -> 32 in two blocks: r + out per site
    assert peftsurgery.budget(model)["adapters"] == {"default": 2 * ((4 + 64) + (4 + 32))}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert not torch.equal(want, base)
    peftsurgery.save(model, tmp_path / "v")
    saved = load_file(tmp_path / "v" / "adapter.safetensors")
    assert sorted({k.rsplit(".", 1)[1] for k in saved}) == ["b", "d"] and len(saved) == 8
    fresh, _ = load_model("tiny-llama")
    peftsurgery.load(fresh, tmp_path / "v")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
        peftsurgery.merge(fresh)
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(SurgeryError, match="cannot give each batch row its own adapter"):
        with peftsurgery.route(model, ["default", None]):
            pass
