"""The `peftsurgery` command, run in-process through cli.main (and once as a real process)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peftsurgery
from peftsurgery.cli import main
from peftsurgery.zoo import load_model, save_model

BUILTINS = {"lora", "adapter", "prompt-tuning", "prefix-tuning", "qlora"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("peftsurgery: error: ")
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter for tiny-llama written by the CLI."""
    path = tmp_path_factory.mktemp("cli") / "lora"
    assert main(["apply", "tiny-llama", "--plugin", "lora", "--set", "r=4", "-o", str(path)]) == 0
    return path


# ---- plugins ---------------------------------------------------------------------------------------------------

def test_plugins_lists_builtins_with_options(capsys):
    code, out, err = run(capsys, "plugins")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines()[1:]}
    assert BUILTINS <= names
    lora = next(line for line in out.splitlines() if line.startswith("lora "))
    assert "r=8" in lora and "targets=attn.q,attn.v" in lora and "LoRA" in lora


def _command():
    exe = shutil.which("peftsurgery")
    return [exe] if exe else [sys.executable, "-m", "peftsurgery.cli"]


def test_real_process_success_and_error():
    ok = subprocess.run(_command() + ["plugins"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "prefix-tuning" in ok.stdout
    bad = subprocess.run(_command() + ["locate", "no-such-model"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("peftsurgery: error: unknown model 'no-such-model'")
    assert "tiny-llama" in bad.stderr and "Traceback" not in bad.stderr


# ---- locate ----------------------------------------------------------------------------------------------------

EXPECTED_ROLES = {
    "tiny-llama": {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "head"},
    "tiny-gpt2": {"embed", "attn.qkv", "attn.o", "mlp.up", "mlp.down", "head"},
    "tiny-bert": {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"},
    "tiny-t5": {"embed", "attn.q", "attn.k", "attn.v", "attn.o", "xattn.q", "xattn.k", "xattn.v", "xattn.o",
                "mlp.up", "mlp.down"},
}


@pytest.mark.parametrize("model", sorted(EXPECTED_ROLES))
def test_locate_text_shows_roles(capsys, model):
    code, out, _ = run(capsys, "locate", model)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("capture: ")
    assert lines[1].split() == ["path", "kind", "role", "shape", "block", "found_by"]
    roles = {line.split()[2] for line in lines[2:]}
    assert EXPECTED_ROLES[model] <= roles


def test_locate_json_is_the_sitemap(capsys):
    code, out, _ = run(capsys, "locate", "tiny-llama", "--format", "json")
    assert code == 0
    data = json.loads(out)
    model, _ = load_model("tiny-llama")
    assert data["fingerprint"] == peftsurgery.sitemap(model).fingerprint()
    q = [s for s in data["sites"] if s["role"] == "attn.q"]
    assert [s["path"] for s in q] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert q[0]["in_features"] == 64 and q[0]["out_features"] == 64


def test_tiny_models_are_deterministic():
    a, _ = load_model("tiny-gpt2")
    b, _ = load_model("tiny-gpt2")
    assert not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- apply -----------------------------------------------------------------------------------------------------

def test_apply_writes_adapter_and_prints_budget(capsys, tmp_path):
    out_dir = tmp_path / "ad"
    code, out, _ = run(capsys, "apply", "tiny-llama", "--plugin", "lora", "--set", "r=2", "--set", "alpha=4",
                       "--targets", "attn.q,mlp.down", "--name", "mine", "-o", out_dir)
    assert code == 0
    assert sorted(os.listdir(out_dir)) == ["adapter.json", "adapter.safetensors"]
    meta = json.loads((out_dir / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 2 and meta["config"]["targets"] == "attn.q,mlp.down"
    expected = 2 * 2 * (64 + 64) + 2 * 2 * (128 + 64)      # q: 64->64, down: 128->64, two blocks
    assert meta["trainable_parameters"] == expected
    header, row = out.splitlines()[:2]
    assert header.split() == ["adapter", "method", "trainable", "params", "base", "params", "percent"]
    assert row.split()[:3] == ["mine", "lora", f"{expected:,}"]
    assert row.split()[-1].endswith("%")
    assert f"wrote {out_dir}" in out


# ---- inspect ---------------------------------------------------------------------------------------------------

def test_inspect_text_without_and_with_plugins(capsys):
    code, plain, _ = run(capsys, "inspect", "tiny-llama")
    assert code == 0 and "model.layers.0.self_attn.q_proj" in plain and "rewritten" not in plain
    code, out, _ = run(capsys, "inspect", "tiny-llama", "--plugin", "lora", "--plugin", "adapter",
                       "--set", "adapter.bottleneck=4", "--set", "lora.r=2")
    assert code == 0
    graph = out.split("rewritten graph")[1].splitlines()[1:]
    assert len(graph) == 8                        # lora on q,v and adapter on o,down, in two blocks
    q = next(line for line in graph if "q_proj" in line)
    assert q.split()[0] == "model.layers.0.input_layernorm" and "[lora: low-rank branch r=2" in q
    assert q.rstrip().endswith("-> model.layers.0.self_attn")
    assert any("[adapter: bottleneck adapter 64->4->64" in line for line in graph)


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "tiny-llama", "--plugin", "lora", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert {s["role"] for s in data["sitemap"]["sites"]} >= {"attn.q", "mlp.down"}
    assert [(r["adapter"], r["role"]) for r in data["rewrites"]] == [("lora", "attn.q"), ("lora", "attn.v")] * 2
    assert data["rewrites"][0]["params"] == 8 * (64 + 64)


def test_inspect_dot(capsys):
    code, out, _ = run(capsys, "inspect", "tiny-llama", "--plugin", "lora", "--format", "dot")
    assert code == 0
    assert out.startswith("digraph peftsurgery {") and out.rstrip().endswith("}")
    assert out.count("{") == out.count("}")
    assert '"model.layers.0.self_attn.q_proj" [label=' in out
    assert out.count("shape=ellipse") == 4
    assert '"model.layers.1.self_attn.v_proj" -> rule3 [style=dashed];' in out


# ---- merge -----------------------------------------------------------------------------------------------------

def _trained_adapter(model, path, **config):
    peftsurgery.apply(model, "lora", **config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    peftsurgery.save(model, path)
    return model


def test_merge_hf_model_matches_adapted_outputs(capsys, tmp_path):
    model, _ = load_model("tiny-llama")
    _trained_adapter(model, tmp_path / "ad", targets="all-linear", r=4)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    code, out, _ = run(capsys, "merge", "tiny-llama", tmp_path / "ad", "-o", tmp_path / "merged")
    assert code == 0 and "wrote" in out
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any(k.startswith("_peftsurgery") for k in tensors)
    merged, _ = load_model(str(tmp_path / "merged"))
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    base, _ = load_model("tiny-llama")
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-3)   # the adapter did something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


FACTORY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


def build():
    torch.manual_seed(0)
    return Net()
"""


def test_merge_plain_module_from_factory(capsys, tmp_path, monkeypatch):
    (tmp_path / "cli_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = load_model("cli_factory_mod:build")
    _trained_adapter(model, tmp_path / "ad", targets="all", r=4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    code, _, _ = run(capsys, "merge", "cli_factory_mod:build", tmp_path / "ad", "-o", tmp_path / "m")
    assert code == 0
    fresh, _ = load_model("cli_factory_mod:build")
    fresh.load_state_dict(load_file(tmp_path / "m" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=1e-6, rtol=1e-6)


def test_save_model_replaces_directory_atomically(tmp_path):
    model, _ = load_model("tiny-bert")
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_model(model, target)
    assert "stale.txt" not in os.listdir(target) and "config.json" in os.listdir(target)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


# ---- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["apply", "tiny-llama", "--plugin", "no-such", "-o", "{tmp}/x"], "no method named 'no-such'"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "r=abc", "-o", "{tmp}/x"], "r='abc'"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "rank=4", "-o", "{tmp}/x"], "no option 'rank'"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "r", "-o", "{tmp}/x"], "KEY=VALUE"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "r=0", "-o", "{tmp}/x"], "positive integer"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "r=true", "-o", "{tmp}/x"], "r='true'"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "alpha=nan", "-o", "{tmp}/x"], "alpha must be"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "alpha=inf", "-o", "{tmp}/x"], "got inf"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "alpha=0", "-o", "{tmp}/x"], "above 0"),
    (["apply", "tiny-llama", "--plugin", "lora", "--set", "dropout=nan", "-o", "{tmp}/x"], "dropout must be"),
    (["apply", "tiny-llama", "--plugin", "lora", "--targets", "xattn.q", "-o", "{tmp}/x"], "matches no"),
    (["merge", "tiny-llama", "{tmp}/missing", "-o", "{tmp}/m"], "not a directory"),
    (["locate", "not-a-model"], "unknown model"),
    (["locate", "tiny-llama", "--format", "yaml"], "invalid choice"),
    (["apply", "tiny-llama"], "required"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_errors_are_one_line_exit_2(capsys, tmp_path, argv, words):
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert_one_line_error(code, err)
    assert words in err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "m")


def test_selector_error_lists_what_exists(capsys, tmp_path):
    code, _, err = run(capsys, "apply", "tiny-llama", "--plugin", "lora", "--targets", "nothing*", "-o", tmp_path / "x")
    assert_one_line_error(code, err)
    assert "attn.q" in err and "mlp.gate" in err


def test_corrupted_adapter_json(capsys, tmp_path, adapter_dir):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    (bad / "adapter.json").write_text("{not json")
    code, _, err = run(capsys, "merge", "tiny-llama", bad, "-o", tmp_path / "m")
    assert_one_line_error(code, err)
    assert "corrupted" in err
    assert not os.path.exists(tmp_path / "m")


def test_adapter_without_files(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "merge", "tiny-llama", tmp_path / "empty", "-o", tmp_path / "m")
    assert_one_line_error(code, err)
    assert "holds no adapter" in err


def test_adapter_for_another_architecture(capsys, tmp_path, adapter_dir):
    code, _, err = run(capsys, "merge", "tiny-bert", adapter_dir, "-o", tmp_path / "m")
    assert_one_line_error(code, err)
    assert "different architecture" in err


SPY = """
import os
from torch import nn


def build():
    open(os.environ["SPY_MARK"], "w").close()  # the model was loaded
    return nn.Linear(4, 4)
"""


@pytest.mark.parametrize("argv, words", [
    (["apply", "spy_mod:build", "--plugin", "lora", "--set", "alpha=nan", "-o", "{tmp}/x"], "alpha"),
    (["apply", "spy_mod:build", "--plugin", "lora", "--set", "rank=4", "-o", "{tmp}/x"], "no option 'rank'"),
    (["inspect", "spy_mod:build", "--plugin", "lora", "--set", "lora.r=0"], "r must be"),
    (["inspect", "spy_mod:build", "--plugin", "adapter", "--plugin", "lora", "--set", "bottleneck=x"], "bottleneck"),
    (["train", "spy_mod:build", "--plugin", "prompt-tuning", "--set", "num_tokens=0", "--data", "{tmp}/d.jsonl",
      "-o", "{tmp}/x"], "num_tokens"),
    (["train", "spy_mod:build", "--plugin", "prompt-tuning", "--set", "init=txt", "--set-ids", "text=hi",
      "--data", "{tmp}/d.jsonl", "-o", "{tmp}/x"], "init"),
], ids=["apply-value", "apply-name", "inspect", "inspect-second", "train", "train-set-ids"])
def test_bad_option_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, argv, words):
    (tmp_path / "spy_mod.py").write_text(SPY)
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": "1"}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPY_MARK", str(tmp_path / "loaded"))
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert_one_line_error(code, err)
    assert words in err
    assert not (tmp_path / "loaded").exists()
    assert not (tmp_path / "x").exists()


def test_train_set_ids_still_reach_the_config(capsys, tmp_path, monkeypatch):
    """--set-ids keys are checked with a placeholder before loading; an unknown one is still refused."""
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": "1"}\n')
    code, _, err = run(capsys, "train", "tiny-llama", "--plugin", "prompt-tuning", "--set-ids", "txt=hi",
                       "--data", tmp_path / "d.jsonl", "-o", tmp_path / "x")
    assert_one_line_error(code, err)
    assert "no option 'txt'" in err


FACTORIES = """
from torch import nn


def raises():
    raise RuntimeError("weights.bin is missing\\nsee the docs")


def not_a_module():
    return 42


def takes_an_argument(size):
    return nn.Linear(size, size)
"""


@pytest.mark.parametrize("spec, words", [
    ("cli_factories:raises", ["cli_factories:raises raised RuntimeError: weights.bin is missing see the docs"]),
    ("cli_factories:not_a_module", ["cli_factories:not_a_module returned int, not a torch.nn.Module"]),
    ("cli_factories:takes_an_argument", ["cli_factories:takes_an_argument raised TypeError", "size"]),
    ("cli_import_fails:build", ["cannot import 'cli_import_fails:build'", "ZeroDivisionError"]),
])
def test_factory_errors_are_one_line(capsys, tmp_path, monkeypatch, spec, words):
    (tmp_path / "cli_factories.py").write_text(FACTORIES)
    (tmp_path / "cli_import_fails.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "locate", spec)
    assert_one_line_error(code, err)
    assert all(w in err for w in words), err


MISLEADING = """
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Misleading(nn.Module):
    \"\"\"Reads a tensor's values through NumPy, which no tracer sees through; its attention output is called
    `setup` (the name says mlp.up) and its head `classify` (the name says nothing).\"\"\"

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.setup, self.classify = nn.Linear(d, d), nn.Linear(d, 32)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        if float(np.asarray(h.detach()).sum()) > 1e9:
            h = h * 2
        q, k, v = (p(h)[:, None] for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.classify(h + self.setup(F.scaled_dot_product_attention(q, k, v)[:, 0]))


def build():
    torch.manual_seed(0)
    return Misleading()
"""


@pytest.fixture
def misleading(tmp_path, monkeypatch):
    (tmp_path / "cli_misleading.py").write_text(MISLEADING)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_misleading:build"


def test_roles_from_names_warn_in_one_line(capsys, misleading, tmp_path):
    code, out, err = run(capsys, "locate", misleading)
    assert code == 0
    assert "setup     linear     mlp.up" in out and "hooks+name" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftsurgery: warning: roles of Misleading's 6 sites were "
                                                   "guessed from module names"), err
    assert "torch.export" in err and "--strict" in err
    code, out, err = run(capsys, "apply", misleading, "--plugin", "lora", "-o", tmp_path / "ad")
    assert code == 0 and err.startswith("peftsurgery: warning: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["locate"], ["inspect"], ["apply", "--plugin", "lora", "-o", "{tmp}/x"]],
                         ids=["locate", "inspect", "apply"])
def test_strict_refuses_roles_from_names(capsys, misleading, tmp_path, argv):
    cmd, *rest = argv
    code, out, err = run(capsys, cmd, misleading, "--strict", *[a.replace("{tmp}", str(tmp_path)) for a in rest])
    assert_one_line_error(code, err)
    assert "can only be guessed from module names" in err and out == ""
    assert not (tmp_path / "x").exists()


def test_strict_accepts_data_flow(capsys):
    code, out, err = run(capsys, "locate", "tiny-gpt2", "--strict")
    assert code == 0 and "export+dataflow" in out and err == ""


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "apply" in capsys.readouterr().out
