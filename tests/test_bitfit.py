"""BitFit and norm tuning: base tensors found by data flow (linear and norm biases, norm weights) train as base +
delta, which is training the tensor itself, while the base stays untouched."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import peftsurgery as ps
from conftest import raises_one_line
from zoo import FACTORIES


def ids():
    return torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def sgd_steps(model, params, x, steps=2):
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_biases_found_by_data_flow_are_every_bias(arch):
    m = FACTORIES[arch]()
    sm = ps.locate(m)
    biases = {s.path for s in sm if s.kind == "tensor" and s.role == "bias"}
    every = {id(p) for n, p in m.named_parameters() if n.endswith(".bias")}
    assert {id(m.get_parameter(b)) for b in biases} == every


@pytest.mark.parametrize("arch", ["llama", "gemma", "t5"])
def test_norm_weights_found_by_data_flow(arch):
    """Written-out RMS norms (Llama, Gemma's 1 + w, T5) are found from x * rsqrt(mean(x^2)) times a vector."""
    m = FACTORIES[arch]()
    norms = {s.path for s in ps.locate(m) if s.kind == "tensor" and s.role == "norm"}
    every = {n for n, mod in m.named_modules() if "norm" in type(mod).__name__.lower()}
    assert norms == {f"{n}.weight" for n in every} and norms


class _Norm(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how, self.weight, self.bias = how, torch.nn.Parameter(torch.ones(16)), torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        if self.how == "layer":   # a LayerNorm written out: divided by a square root, times a weight, plus a bias
            x = x - x.mean(-1, keepdim=True)
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight + self.bias
        ms = x.pow(2).mean(-1, keepdim=True) + 1e-6
        return x * (torch.pow(ms, -0.5) if self.how == "pow" else torch.rsqrt(ms)) * self.weight


@pytest.mark.parametrize("how", ["rsqrt", "pow", "layer"])
def test_norms_written_out_each_way_are_found(how):
    """x * rsqrt(ms), x * pow(ms, -0.5) (Gemma-3n's RMS norms: none was found there, so norm tuning was refused) and
    x / sqrt(var) all normalise; the vector multiplying the result is the norm's weight (one added after it is a
    bias, as a LayerNorm's)."""
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), _Norm(how), torch.nn.Linear(16, 100))
    sm = ps.locate(model, example_inputs={"input": ids()})
    found = {s.path: s.role for s in sm if s.kind == "tensor"}
    assert found["1.weight"] == "norm"
    assert found.get("1.bias") == ("bias" if how == "layer" else None)


class _Head(torch.nn.Module):
    """A list whose layers of one kind are not all at its front (YOLOS's detection head): 16->16, 16->16, 16->100."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 100)])

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_a_repeated_list_analysed_by_its_representatives_gives_each_site_its_own_width():
    """locate analyses one layer of each kind (here layers 0 and 2, standing at 0 and 1 while captured); the last
    bias was measured at the restored list's position 1 (16 wide) and named layers.2 (100 wide), and bitfit was
    refused as a plugin whose budget is wrong."""
    model = _Head()
    sm = ps.locate(model, example_inputs={"input_ids": ids()})
    widths = {s.path: s.out_features for s in sm if s.kind == "tensor"}
    assert widths == {f"layers.{i}.bias": model.layers[i].bias.numel() for i in range(3)}
    ps.apply(model, "bitfit")
    assert ps.budget(model)["trainable"] == 16 + 16 + 100


def test_training_the_delta_is_training_the_biases():
    x = ids()
    m = FACTORIES["gpt2"]()
    ref = copy.deepcopy(m)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    ps.apply(m, "bitfit", norms=True)
    assert ps.budget(m)["trainable"] == sum(p.numel() for n, p in ref.named_parameters()
                                            if n.endswith(".bias") or ".ln_" in n)
    assert torch.equal(m(input_ids=x).logits, ref(input_ids=x).logits)   # deltas start at zero
    sgd_steps(m, [p for p in m.parameters() if p.requires_grad], x)
    for n, p in ref.named_parameters():
        p.requires_grad_(n.endswith(".bias") or ".ln_" in n)
    sgd_steps(ref, [p for p in ref.parameters() if p.requires_grad], x)
    torch.testing.assert_close(m(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=0)
    assert all(torch.equal(t, before[n]) for n, t in m.state_dict().items() if n in before)   # base untouched
    trained = m(input_ids=x).logits
    with ps.disabled(m):
        assert torch.equal(m(input_ids=x).logits, FACTORIES["gpt2"]()(input_ids=x).logits)
    ps.merge(m)
    torch.testing.assert_close(m(input_ids=x).logits, trained, atol=1e-5, rtol=0)
    ps.unmerge(m)
    ps.remove(m)
    torch.testing.assert_close(m(input_ids=x).logits, FACTORIES["gpt2"]()(input_ids=x).logits, atol=1e-6, rtol=0)


def test_save_holds_only_the_deltas_and_loads_exactly(tmp_path):
    x = ids()
    m = FACTORIES["gpt2"]()
    ps.apply(m, "bitfit")
    sgd_steps(m, [p for p in m.parameters() if p.requires_grad], x)
    ps.save(m, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter.safetensors")
    assert len(saved) == len(ps.adapters(m)["default"].records[0].sites)
    assert sum(t.numel() for t in saved.values()) == ps.budget(m)["trainable"]
    fresh = FACTORIES["gpt2"]()
    ps.load(fresh, tmp_path / "a")
    assert torch.equal(fresh(input_ids=x).logits, m(input_ids=x).logits)


def test_a_model_without_biases_is_a_one_line_error():
    m = FACTORIES["llama"]()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    raises_one_line(lambda: ps.apply(m, "bitfit"), "'bias' matches no tensor site", "norm")
    assert not ps.adapters(m) and all(torch.equal(t, before[n]) for n, t in m.state_dict().items())
    ps.apply(m, "bitfit", targets="norm")   # norm tuning works there
    assert ps.budget(m)["trainable"] == sum(p.numel() for n, p in m.named_parameters()
                                            if "norm" in n and not n.startswith("_peftsurgery"))
