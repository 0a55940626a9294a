"""route() with prompt and prefix adapters: row i of a batch mixing prompts and prefixes of different lengths,
LoRA rows and rows on the base computes what it computes alone with its adapter (left, right or no padding, and
through generate() with the cache); in training a row's loss reaches only its own adapter."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftsurgery as ps
from peftsurgery.sites import CONTAINER

from conftest import VOCAB, raises_one_line, tiny_gpt2, tiny_llama

ADAPTERS = {"p3": ("prompt-tuning", {"num_tokens": 3}), "p5": ("prompt-tuning", {"num_tokens": 5}),
            "x2": ("prefix-tuning", {"num_tokens": 2}), "x4": ("prefix-tuning", {"num_tokens": 4, "projection": 8}),
            "l": ("lora", {"r": 2, "targets": "all-linear"}), "m": ("lora", {"r": 3, "targets": "all-linear"})}
ROWS = ["p3", "x2", "l", None, "x4", "p5", "p3", "base"]   # repeats, every kind, two lengths of each; m off


def gpt2():
    return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)   # exact comparisons in training mode too


def adapted(factory, names=tuple(ADAPTERS)):
    """Every adapter of ADAPTERS on one model, each moved far from its start (prompts, prefixes, LoRA's B)."""
    model = factory()
    g = torch.Generator().manual_seed(7)
    for n in names:
        plugin, cfg = ADAPTERS[n]
        ps.apply(model, plugin, name=n, **({"init": "random"} if "lora" not in plugin else {}), **cfg)
        with torch.no_grad():
            for p in ps.adapters(model)[n].records[0].built.values() if plugin == "lora" else []:
                p.B.weight.copy_(torch.randn(p.B.weight.shape, generator=g) * 0.2)
            for name, p in model.named_parameters():
                if name.startswith(f"{CONTAINER}.{n}.") and plugin != "lora":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def batch(lengths, side: str, seed: int = 0):
    """Token rows of these lengths, padded on `side` ("none": all of the longest length, no mask)."""
    g = torch.Generator().manual_seed(seed)
    if side == "none":
        lengths = [max(lengths)] * len(lengths)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    S = max(lengths)
    ids, mask = torch.zeros(len(seqs), S, dtype=torch.long), torch.zeros(len(seqs), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        at = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        ids[i, at], mask[i, at] = s, 1
    return seqs, ids, (None if side == "none" else mask)


def alone(model, name, fn):
    """fn() with only adapter `name` on (None / "base": none), the switches put back afterwards."""
    before = {n: a.switch.on for n, a in ps.adapters(model).items()}
    ps.set_active(model, [] if name in (None, "base") else [name])
    try:
        return fn()
    finally:
        for n, a in ps.adapters(model).items():
            a.switch.on = before[n]


@pytest.mark.parametrize("side", ["left", "right", "none"])
@pytest.mark.parametrize("factory", [tiny_llama, gpt2])
def test_each_row_of_a_mixed_batch_matches_it_alone(factory, side):
    model = adapted(factory)
    seqs, ids, mask = batch([5, 7, 3, 6, 4, 7, 2, 6], side)
    with torch.no_grad(), ps.route(model, ROWS):
        got = model(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (len(ROWS), ids.shape[1], VOCAB)   # the outputs line up with the user's tokens
    with torch.no_grad():
        for i, (s, n) in enumerate(zip(seqs, ROWS)):
            want = alone(model, n, lambda: model(input_ids=s[None]).logits[0])
            row = got[i] if mask is None else got[i][mask[i].bool()]
            torch.testing.assert_close(row, want, atol=1e-5, rtol=0, msg=lambda m: f"row {i} ({n}): {m}")
            if n not in (None, "base"):   # the adapter changes the row
                assert (want - alone(model, None, lambda: model(input_ids=s[None]).logits[0])).abs().max() > 1e-3


@pytest.mark.parametrize("factory", [tiny_llama, gpt2])
def test_generate_with_the_cache_matches_each_row_alone(factory):
    model = adapted(factory)
    seqs, ids, mask = batch([5, 7, 3, 6, 4, 7, 2, 6], "left", seed=1)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), ps.route(model, ROWS):
        got = model.generate(ids, attention_mask=mask, **kw)
    with torch.no_grad():
        for i, (s, n) in enumerate(zip(seqs, ROWS)):
            want = alone(model, n, lambda: model.generate(s[None], attention_mask=torch.ones_like(s[None]), **kw))
            assert got.sequences[i, ids.shape[1]:].tolist() == want.sequences[0, len(s):].tolist(), (i, n)
            for step, (a, b) in enumerate(zip(got.logits, want.logits)):
                torch.testing.assert_close(a[i], b[0], atol=1e-5, rtol=0, msg=lambda m: f"row {i} step {step}: {m}")


def test_routed_decoding_attends_prefixes_apart_as_if_prepended(monkeypatch):
    """Decoding steps of a routed batch attend to each row's prefix slots apart from the cache (rows with a shorter
    prefix or none see only their own slots) and give what prepending them gives."""
    from peftsurgery.rewrite import attention
    model = adapted(tiny_llama)
    _, ids, mask = batch([5, 7, 3, 6, 4, 7, 2, 6], "left", seed=2)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    seen = []
    merged = attention._merged
    monkeypatch.setattr(attention, "_merged", lambda *a: seen.append(a[-1]) or merged(*a))
    with torch.no_grad(), ps.route(model, ROWS):
        got = torch.stack(model.generate(ids, attention_mask=mask, **kw).logits)
    assert len(seen) == 2 * 2 and all(v is not None and v.shape == (len(ROWS), 4) for v in seen)  # 2 steps, 2 layers
    assert seen[0].sum(-1).tolist() == [0, 2, 0, 0, 4, 0, 0, 0]   # each row sees its own prefix's slots
    monkeypatch.setattr(attention, "_apart", lambda *a: None)
    with torch.no_grad(), ps.route(model, ROWS):
        want = torch.stack(model.generate(ids, attention_mask=mask, **kw).logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _row_loss(logits, ids, mask=None):
    """Next-token cross-entropy of one row over its real tokens."""
    if mask is not None:
        logits, ids = logits[mask.bool()], ids[mask.bool()]
    return F.cross_entropy(logits[:-1], ids[1:])


@pytest.mark.parametrize("factory", [tiny_llama, gpt2])
def test_training_each_rows_loss_reaches_only_its_own_adapter(factory):
    model = adapted(factory)
    model.train()
    rows = ["p3", "x2", "l", "p3", None, "x4"]   # p5 and m are not in the batch
    seqs, ids, mask = batch([5, 7, 3, 6, 4, 7], "left", seed=2)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with ps.route(model, rows):
        logits = model(input_ids=ids, attention_mask=mask).logits
    sum(_row_loss(logits[i], ids[i], mask[i]) for i in range(len(rows))).backward()
    got = {n: p.grad for n, p in params.items()}
    for n in ("p5", "m"):   # not even zeros: an optimizer skips them
        assert all(g is None for k, g in got.items() if k.startswith(f"{CONTAINER}.{n}.")), n
    assert not any(p.grad is not None for n, p in model.named_parameters() if not p.requires_grad)
    for p in params.values():
        p.grad = None
    for s, n in zip(seqs, rows):   # the reference: each row by itself, only its adapter on
        if n is not None:
            alone(model, n, lambda: _row_loss(model(input_ids=s[None]).logits[0], s).backward())
    for name, p in params.items():
        if p.grad is None:
            assert got[name] is None or not got[name].any(), name
        else:
            assert got[name] is not None and p.grad.any(), name
            torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


class NoMask(nn.Module):
    """Takes token ids only: different prompt lengths cannot be masked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        h = self.mix(self.embed(input_ids))
        return self.head(h + F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None], is_causal=True)[:, 0])


def test_refusals_are_one_line_and_change_nothing():
    model = NoMask().eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    for n, k in (("a", 2), ("b", 3), ("c", 2)):   # (one prompt on at a time: it hooks the embedding's output)
        ps.set_active(model, [])
        ps.apply(model, "prompt-tuning", name=n, num_tokens=k, init="random", seed=k)
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    raises_one_line(lambda: ps.route(model, ["a", "b"]).__enter__(), "takes no attention_mask", "one length")
    raises_one_line(lambda: ps.route(model, ["a", None]).__enter__(), "takes no attention_mask")
    assert all(dict(m._forward_hooks) == f and dict(m._forward_pre_hooks) == p for m, f, p in hooks)
    with torch.no_grad(), ps.route(model, ["a", "c"]):   # one length: no mask needed
        got = model(ids)
    with torch.no_grad():
        for i, n in enumerate("ac"):
            torch.testing.assert_close(got[i], alone(model, n, lambda: model(ids[i:i + 1])[0]), atol=1e-5, rtol=0)
    assert [a.switch.on for a in ps.adapters(model).values()] == [False, False, True]   # as before the block

    llama = adapted(tiny_llama, ["p3", "p5", "x2"])
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ps.route(llama, ["p3", "p5"]):
        past = llama(input_ids=ids, attention_mask=torch.ones_like(ids)).past_key_values
        raises_one_line(lambda: llama(input_ids=ids[:, :1], past_key_values=past), "attention_mask")
        raises_one_line(lambda: llama(input_ids=ids[:1]), "2 adapter names", "give one name per row")
    with torch.no_grad(), ps.route(llama, ["x2", "p3", None]):
        raises_one_line(lambda: llama(input_ids=ids), "give one name per row")
    ps.apply(llama, "adapter", name="s", bottleneck=4)
    raises_one_line(lambda: ps.route(llama, ["p3", "s"]).__enter__(), "'s' (adapter)", "cannot give each batch row")
