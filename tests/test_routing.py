"""route(): each row of a batch runs with its own adapter, by batched gathers in the low-rank rule (prompts and
prefixes: tests/test_route_prompts.py)."""
import pickle

import pytest
import torch

import peftsurgery
from peftsurgery import SurgeryError

from conftest import tiny_gpt2, tiny_llama


def _with_adapters(model, names, ranks=None, targets="all-linear"):
    g = torch.Generator().manual_seed(1)
    for i, n in enumerate(names):
        r = ranks[i] if ranks else 4
        peftsurgery.apply(model, "lora", name=n, r=r, alpha=2 * r + i, targets=targets)
        with torch.no_grad():  # B starts at zero: give every adapter a distinct, non-trivial update
            for b in peftsurgery.adapters(model)[n].records[0].built.values():
                b.B.weight.copy_(torch.randn(b.B.weight.shape, generator=g) * 0.1)
    model.eval()
    return model


def _alone(model, ids, name):
    """The reference: this row by itself, with only its adapter active (or none)."""
    if name in (None, "base"):
        with peftsurgery.disabled(model):
            return model(input_ids=ids).logits
    before = {n: a.switch.on for n, a in peftsurgery.adapters(model).items()}
    peftsurgery.set_active(model, [name])
    try:
        return model(input_ids=ids).logits
    finally:
        for n, a in peftsurgery.adapters(model).items():
            a.switch.on = before[n]


def _check_rows(model, factory, ids, rows, got):
    """Row i of a routed batch equals that row alone with only adapter rows[i] active (to 1e-5); a row routed to
    None / "base" is exactly the base model's row (a fresh model of the same seed, on the same batch)."""
    with torch.no_grad():
        base = factory()(input_ids=ids).logits
        for i, n in enumerate(rows):
            if n in (None, "base"):
                assert torch.equal(got[i], base[i]), (i, n)
            else:
                torch.testing.assert_close(got[i:i + 1], _alone(model, ids[i:i + 1], n), atol=1e-5, rtol=0,
                                           msg=lambda m: f"row {i} ({n}): {m}")
                assert (got[i] - base[i]).abs().max() > 1e-3, (i, n)  # the adapter changes the row


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_each_row_matches_its_adapter_alone(factory):
    model = _with_adapters(factory(), ["a", "b", "c"], ranks=[4, 2, 6])
    rows = ["a", "b", "a", "base", "c", None, "c", "b"]  # repeats, base rows, ranks of different sizes
    ids = torch.randint(0, 128, (len(rows), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with peftsurgery.route(model, rows):
            got = model(input_ids=ids).logits
    _check_rows(model, factory, ids, rows, got)


def test_route_is_exact_after_training_steps_and_restores_switches():
    model = _with_adapters(tiny_llama(), ["a", "b"])
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    rows = ["b", "a", "b", None]
    with torch.no_grad(), peftsurgery.route(model, rows):
        model(input_ids=ids)  # fills the cache of stacked factors
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    with peftsurgery.route(model, rows):  # gradients flow through the routed branches
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in peftsurgery.adapters(model)["a"].records[0].built["model.layers.0.mlp.up_proj"].parameters())
    opt.step()
    model.eval()
    with torch.no_grad():
        with peftsurgery.route(model, rows):  # the step changed the factors: the cache must not be reused
            got = model(input_ids=ids).logits
    _check_rows(model, tiny_llama, ids, rows, got)
    peftsurgery.set_active(model, ["a"])
    with peftsurgery.route(model, ["b"] * 4):
        pass
    assert peftsurgery.adapters(model)["a"].switch.on and not peftsurgery.adapters(model)["b"].switch.on


def test_merge_without_a_name_folds_only_the_active_adapters():
    model = _with_adapters(tiny_llama(), ["a", "b"])
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    peftsurgery.set_active(model, ["a"])
    q = model.model.layers[0].self_attn.q_proj
    hooks = list(q._forward_hooks.items())
    with torch.no_grad():
        want = model(input_ids=ids).logits
        peftsurgery.merge(model)
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
        assert len(q._forward_hooks) == len(hooks) - 1  # the merged branch's hook is off: the linear runs bare
    peftsurgery.unmerge(model)
    assert list(q._forward_hooks.items()) == hooks   # back, in the same order
    with torch.no_grad(), peftsurgery.route(model, ["b", "a"]):  # "b" was never merged, "a" is unmerged again
        got = model(input_ids=ids).logits
    _check_rows(model, tiny_llama, ids, ["b", "a"], got)


def test_route_errors_name_the_problem():
    model = _with_adapters(tiny_llama(), ["a"])
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(SurgeryError, match="no adapter named 'zz'"):
        with peftsurgery.route(model, ["a", "zz"]):
            pass
    with pytest.raises(SurgeryError, match="give one name per row"):
        with torch.no_grad(), peftsurgery.route(model, ["a"] * 3):
            model(input_ids=ids)
    merged = peftsurgery.merge(_with_adapters(tiny_llama(), ["a"]))  # (unmerging leaves rounding in the base)
    with pytest.raises(SurgeryError, match="merged"):
        with peftsurgery.route(merged, ["a", "a"]):
            pass
    peftsurgery.apply(model, "adapter", name="s", bottleneck=4)
    with pytest.raises(SurgeryError, match="cannot give each batch row its own adapter"):
        with peftsurgery.route(model, ["a", "s"]):
            pass
    with torch.no_grad(), peftsurgery.route(model, ["a", None]):  # an unnamed adapter that cannot route is off
        out = model(input_ids=ids).logits
    _check_rows(model, tiny_llama, ids, ["a", None], out)  # the reference for "a" has only "a" on


def test_one_token_rows_from_a_larger_pool_dense_or_gathered(monkeypatch):
    """Decoding rows of a pool of adapters: the dense path computes only the slots the rows use (a new set of rows
    in a later route() call is not served the last call's factors); more distinct slots than DENSE_SLOTS gather
    each row's factors instead. Every row still gets only its own adapter."""
    from peftsurgery.rewrite import lowrank
    monkeypatch.setattr(lowrank, "DENSE_SLOTS", 2)
    dense = []
    used_stacks = lowrank._Routed.used_stacks
    monkeypatch.setattr(lowrank._Routed, "used_stacks",
                        lambda self, A, B: dense.append(1) or used_stacks(self, A, B))
    model = _with_adapters(tiny_llama(), ["a", "b", "c", "d", "e"], ranks=[2, 4, 3, 1, 5])
    for seed, (rows, dense_path) in enumerate(((["b", "e", "b"], True), (["d", "a", "a"], True),
                                               (["c", "a", None], False), (["e", "b", "e"], True))):
        dense.clear()
        ids = torch.randint(0, 128, (len(rows), 1), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            with peftsurgery.route(model, rows):
                got = model(input_ids=ids).logits
        assert bool(dense) is dense_path, rows
        _check_rows(model, tiny_llama, ids, rows, got)


def test_route_one_token_per_row_matches_too():
    """Decoding shape (few tokens per row) takes the dense path: every row still gets only its adapter."""
    model = _with_adapters(tiny_llama(), ["a", "b", "c"], ranks=[2, 4, 3])
    rows = ["c", "a", None, "b", "a"]
    for seq in (1, 3):
        ids = torch.randint(0, 128, (len(rows), seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            with peftsurgery.route(model, rows):
                got = model(input_ids=ids).logits
        _check_rows(model, tiny_llama, ids, rows, got)


def test_adding_or_removing_an_adapter_rewrites_only_its_own_pool_slots():
    """Without gradients the stacked factors live in a pool per site that route() calls share: a new adapter takes
    a free slot and only that slot is written (the pool and every other slot stay as they were); a removed one
    frees its slot; an adapter removed and applied again under its old name is never served the old factors. Every
    row still gets only its own adapter."""
    model = _with_adapters(tiny_llama(), ["a", "b", "c"], ranks=[2, 4, 3])
    ids = torch.randint(0, 128, (4, 3), generator=torch.Generator().manual_seed(5))
    path = "model.layers.0.self_attn.q_proj"

    def run(rows):
        with torch.no_grad(), peftsurgery.route(model, rows):
            got = model(input_ids=ids).logits
        _check_rows(model, tiny_llama, ids, rows, got)
        return model._peftsurgery_route_cache["pools"][path]

    pool = run(["a", "b", "c", None])
    A, held = pool.A, list(pool.held)
    _with_adapters(model, ["d"], ranks=[4])   # a fourth adapter: a free slot of the pool
    again = run(["d", "b", "a", "c"])
    assert again is pool and again.A is A   # not rebuilt
    assert all(again.held[i] is h for i, h in enumerate(held) if h is not None)   # not rewritten
    peftsurgery.remove(model, "b")
    run(["c", None, "d", "a"])
    _with_adapters(model, ["b"], ranks=[4])   # the same name, new factors
    run(["b", "b", "a", "d"])
    copied = pickle.loads(pickle.dumps(model))   # the pool's weak references do not travel; the copy refills it
    with torch.no_grad(), peftsurgery.route(copied, ["a", "d", None, "b"]):
        got = copied(input_ids=ids).logits
    _check_rows(copied, tiny_llama, ids, ["a", "d", None, "b"], got)
