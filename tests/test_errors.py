"""User errors: a SurgeryError with a one-line message, and the model left exactly as it was. Saving is atomic."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import transformers as tf

import peftsurgery as ps
import peftsurgery.io

try:
    from conftest import raises_one_line
except ImportError:  # tests/ collected as a package
    from tests.conftest import raises_one_line

V = 128
IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def llama(layers=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)).eval()


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=2)).eval()


def snapshot(model):
    """Everything an error must not change: weights, trainability, module tree, hooks, attention setting, outputs."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    with torch.no_grad():
        out = model(IDS, attention_mask=MASK).logits.clone()
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": hooks,
        "attn": model.config._attn_implementation,
        "adapters": sorted(ps.adapters(model)),
        "out": out,
    }


def assert_same(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["grad"] == before["grad"]
    assert after["attn"] == before["attn"]
    assert after["adapters"] == before["adapters"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert torch.equal(after["out"], before["out"])


@pytest.fixture(scope="module")
def located():
    m = llama()
    ps.sitemap(m)  # locate once; copies carry the site map along
    return m


@pytest.fixture
def model(located):
    return copy.deepcopy(located)


# ---------------------------------------------------------------- apply
@pytest.mark.parametrize("plugin,config,needles", [
    ("no-such-method", {}, ["no-such-method", "lora", "prefix-tuning"]),
    ("lora", {"rank": 4}, ["rank", "r", "alpha"]),
    ("lora", {"r": 0}, ["r must be a positive integer"]),
    ("lora", {"r": -3}, ["r must be"]),
    ("lora", {"r": "abc"}, ["abc"]),
    ("lora", {"dropout": 2}, ["dropout"]),
    ("lora", {"dropout": -0.1}, ["dropout"]),
    ("adapter", {"bottleneck": 0}, ["bottleneck"]),
    ("adapter", {"activation": "swish"}, ["activation"]),
    ("prompt-tuning", {"init": "bogus"}, ["init", "bogus"]),
    ("prompt-tuning", {"num_tokens": 0}, ["num_tokens"]),
    ("prompt-tuning", {"init": "text", "text": "12,x"}, ["text"]),
    ("prompt-tuning", {"init": "text", "text": "500"}, ["500"]),
    ("prefix-tuning", {"init": "bogus"}, ["init", "bogus"]),
    ("prefix-tuning", {"projection": -1}, ["projection"]),
    ("lora", {"targets": "xattn.q"}, ["lora option targets='xattn.q': selector", "attn.q", "mlp.down", "head"]),
    ("ia3", {"feedforward": "moe.down"}, ["ia3 option feedforward='moe.down': selector 'moe.down' matches no"]),
    ("qlora", {"quantize": "xattn.*"}, ["qlora option quantize='xattn.*'"]),
    ("lora", {"targets": "path:*nowhere*"}, ["roles here"]),
    ("lora", {"targets": "attn.q,blocks:7-9"}, ["blocks:7-9"]),
    ("lora", {"targets": "blocks:x-y"}, ["blocks"]),
    ("adapter", {"targets": "xattn.o"}, ["attn.o"]),
    ("prefix-tuning", {"targets": "xattn"}, ["attn"]),
], ids=lambda v: v if isinstance(v, str) else ("-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict)
                                              else None))
def test_apply_errors_leave_model_untouched(model, plugin, config, needles):
    before = snapshot(model)
    raises_one_line(lambda: ps.apply(model, plugin, **config), *needles)
    assert_same(model, before)
    ps.apply(model, "lora")  # the model is still usable
    assert list(ps.adapters(model)) == ["default"]


def test_a_term_of_a_given_selector_that_matches_nothing_is_said(model, recwarn):
    """A typo, or a role the model lacks (experts it does not hold as moe.*), beside terms that match: the rest is
    applied and the dead term is said once, naming the option and the roles there are. A method's own default,
    meant for many models (prefix tuning's attn,xattn on a decoder-only model), stays quiet."""
    from peftsurgery.surgery import SelectorWarning
    ps.apply(model, "lora", targets="attn.q,atn.v")
    said = [str(w.message) for w in recwarn if issubclass(w.category, SelectorWarning)]
    assert len(said) == 1 and re.search(r"targets='attn.q,atn.v'.*'atn.v' adds nothing.*roles here: attn.k", said[0])
    assert {r["site"].rsplit(".", 1)[-1] for r in ps.inspect(model)} == {"q_proj"}
    recwarn.clear()
    ps.apply(model, "prefix-tuning", name="p")
    ps.apply(model, "adapter", name="a", targets="attn.o,mlp.down")   # given, but the default: every term matches
    assert not [w for w in recwarn if issubclass(w.category, SelectorWarning)]


class _FixedLength(torch.nn.Module):
    """Runs on sequences of 5 tokens only (as Nystromformer's segment means need one length)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(V, 16), torch.nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return self.out(h.view(h.shape[0], 5, 16))


def test_a_change_the_model_cannot_run_with_is_refused_saying_so():
    model = _FixedLength()
    before = copy.deepcopy(model.state_dict())
    raises_one_line(lambda: ps.apply(model, "prompt-tuning", num_tokens=2, example_inputs={"input_ids": IDS}),
                    "prompt-tuning broke the model's forward", "does not run with this change", "another method")
    assert not ps.adapters(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items()) and model.state_dict().keys() == \
        before.keys()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model(IDS).shape == (2, 5, V)


def test_prompt_tuning_on_a_model_without_a_token_embedding_says_what_to_use():
    """A vision model (patches, no table the ids index): the refusal says why there is no embedding site and which
    methods go instead."""
    from zoo import FACTORIES
    model = FACTORIES["vit"]()
    raises_one_line(lambda: ps.apply(model, "prompt-tuning", num_tokens=2), "matches no embedding site",
                    "a table the token ids index themselves", "use a method that changes linear layers")
    assert not ps.adapters(model)


@pytest.mark.parametrize("name", ["", "a.b"])
def test_bad_adapter_name(model, name):
    before = snapshot(model)
    raises_one_line(lambda: ps.apply(model, "lora", name=name), repr(name))
    assert_same(model, before)


def test_duplicate_adapter_name(model):
    ps.apply(model, "lora")
    before = snapshot(model)
    raises_one_line(lambda: ps.apply(model, "adapter"), "'default'", "already attached")
    raises_one_line(lambda: ps.apply(model, "prefix-tuning", name="default"), "already attached")
    assert_same(model, before)


def test_error_after_another_adapter_keeps_it(model):
    ps.apply(model, "lora", name="one")
    with torch.no_grad():
        for p in model._peftsurgery.parameters():
            p.add_(0.1)
    before = snapshot(model)
    raises_one_line(lambda: ps.apply(model, "lora", name="two", targets="xattn.*"), "roles here")
    assert_same(model, before)
    assert all(p.requires_grad for p in model._peftsurgery.parameters())


def test_not_a_module():
    raises_one_line(lambda: ps.apply("model.bin", "lora"), "nn.Module")


def test_unknown_adapter_name_elsewhere(model):
    raises_one_line(lambda: ps.save(model, "/tmp/never", name="ghost"), "ghost")
    raises_one_line(lambda: ps.remove(model, "ghost"), "ghost")
    raises_one_line(lambda: ps.set_active(model, "ghost"), "ghost")


# ---------------------------------------------------------------- load
@pytest.fixture
def saved(tmp_path, located):
    m = ps.apply(copy.deepcopy(located), "lora", r=4)
    with torch.no_grad():
        for p in m._peftsurgery.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    path = str(tmp_path / "adapter")
    ps.save(m, path)
    return m, path


@pytest.mark.parametrize("target", [lambda: llama(hidden=64), lambda: llama(layers=3), gpt2],
                         ids=["wider", "deeper", "gpt2"])
def test_load_onto_other_architecture(saved, target):
    _, path = saved
    m = target()
    before = snapshot(m)
    raises_one_line(lambda: ps.load(m, path), "different architecture", "fingerprint")
    assert_same(m, before)


def test_load_roundtrip_is_exact(saved, located):
    m, path = saved
    back = ps.load(copy.deepcopy(located), path)
    with torch.no_grad():
        assert torch.equal(back(IDS, attention_mask=MASK).logits, m(IDS, attention_mask=MASK).logits)


def _corrupt_json(path):
    with open(os.path.join(path, "adapter.json"), "w") as f:
        f.write('{"format": 1, "method": "lora", "config": {')


def _json_wrong_shape(path):
    with open(os.path.join(path, "adapter.json"), "w") as f:
        json.dump(["not", "a", "dict"], f)


def _json_missing_keys(path):
    with open(os.path.join(path, "adapter.json"), "w") as f:
        json.dump({"format": 1, "method": "lora"}, f)


def _json_binary(path):
    with open(os.path.join(path, "adapter.json"), "wb") as f:
        f.write(b"\xff\xfe\x00garbage")


def _truncate_weights(path):
    p = os.path.join(path, "adapter.safetensors")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])


def _chop_tail(path):
    p = os.path.join(path, "adapter.safetensors")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[:-3])


def _garbage_weights(path):
    with open(os.path.join(path, "adapter.safetensors"), "wb") as f:
        f.write(os.urandom(512))


def _empty_weights(path):
    open(os.path.join(path, "adapter.safetensors"), "wb").close()


def _scribble_header(path):
    p = os.path.join(path, "adapter.safetensors")
    data = bytearray(open(p, "rb").read())
    data[12:30] = b"#" * 18
    with open(p, "wb") as f:
        f.write(bytes(data))


def _remove_weights(path):
    os.remove(os.path.join(path, "adapter.safetensors"))


def _remove_config(path):
    os.remove(os.path.join(path, "adapter.json"))


@pytest.mark.parametrize("damage,needles", [
    (_corrupt_json, ["adapter.json", "corrupted"]),
    (_json_wrong_shape, ["adapter.json", "corrupted"]),
    (_json_missing_keys, ["adapter.json", "corrupted"]),
    (_json_binary, ["adapter.json"]),
    (_truncate_weights, ["adapter.safetensors", "corrupted"]),
    (_chop_tail, ["adapter.safetensors", "corrupted"]),
    (_garbage_weights, ["adapter.safetensors", "corrupted"]),
    (_empty_weights, ["adapter.safetensors", "corrupted"]),
    (_scribble_header, ["adapter.safetensors", "corrupted"]),
    (_remove_weights, ["adapter.safetensors"]),
    (_remove_config, ["adapter.json"]),
], ids=lambda v: getattr(v, "__name__", "")[1:] or None)
def test_damaged_adapter_files(saved, damage, needles, located):
    _, path = saved
    damage(path)
    m = copy.deepcopy(located)
    before = snapshot(m)
    raises_one_line(lambda: ps.load(m, path), *needles)
    assert_same(m, before)


def test_tensors_that_do_not_fit_roll_back(saved, located):
    """A config that disagrees with the stored tensors fails after building; everything built is undone."""
    _, path = saved
    meta = json.load(open(os.path.join(path, "adapter.json")))
    meta["config"]["r"] = 8
    json.dump(meta, open(os.path.join(path, "adapter.json"), "w"))
    m = copy.deepcopy(located)
    before = snapshot(m)
    raises_one_line(lambda: ps.load(m, path), "shape")
    assert_same(m, before)
    assert "_peftsurgery" not in m._modules


def test_unknown_method_in_file(saved, located):
    _, path = saved
    meta = json.load(open(os.path.join(path, "adapter.json")))
    meta["method"] = "gone-method"
    json.dump(meta, open(os.path.join(path, "adapter.json"), "w"))
    m = copy.deepcopy(located)
    before = snapshot(m)
    raises_one_line(lambda: ps.load(m, path), "gone-method")
    assert_same(m, before)


def test_missing_directory(tmp_path, located):
    m = copy.deepcopy(located)
    before = snapshot(m)
    raises_one_line(lambda: ps.load(m, str(tmp_path / "nowhere")), "nowhere", "not a directory")
    raises_one_line(lambda: ps.load(m, str(tmp_path)), "holds no adapter")
    assert_same(m, before)


def test_load_under_taken_name(saved, located):
    m0, path = saved
    m = ps.apply(copy.deepcopy(located), "adapter")
    before = snapshot(m)
    raises_one_line(lambda: ps.load(m, path), "already attached")
    assert_same(m, before)
    ps.load(m, path, name="second")
    assert sorted(ps.adapters(m)) == ["default", "second"]


# ---------------------------------------------------------------- atomic save
def test_save_is_atomic_when_writing_fails(saved, monkeypatch, tmp_path, located):
    m, path = saved
    old = {k: v.clone() for k, v in m._peftsurgery.state_dict().items()}
    with torch.no_grad():
        want = m(IDS, attention_mask=MASK).logits
        for p in m._peftsurgery.parameters():
            p.add_(1.0)  # the model moves on; the failed save must not replace the adapter on disk

    real = peftsurgery.io.save_file

    def fail_midway(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:1]), filename, metadata=metadata)  # a partial file, then a crash
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peftsurgery.io, "save_file", fail_midway)
    with pytest.raises(OSError):
        ps.save(m, path)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directories left behind
    assert sorted(os.listdir(path)) == ["adapter.json", "adapter.safetensors"]
    back = ps.load(copy.deepcopy(located), path)
    for k, v in back._peftsurgery.state_dict().items():
        assert torch.equal(v, old[k]), k
    with torch.no_grad():
        assert torch.equal(back(IDS, attention_mask=MASK).logits, want)

    # and a save that succeeds replaces it, still leaving nothing else behind
    ps.save(m, path)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    again = ps.load(copy.deepcopy(located), path)
    for k, v in again._peftsurgery.state_dict().items():
        assert torch.equal(v, m._peftsurgery.state_dict()[k]), k


def test_save_onto_a_file_fails_cleanly(saved, tmp_path):
    m, _ = saved
    target = tmp_path / "afile"
    target.write_text("precious")
    raises_one_line(lambda: ps.save(m, str(target)), "not a directory")
    assert target.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["adapter", "afile"]
