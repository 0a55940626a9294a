"""torch.compile with fullgraph=True: a model with a method attached traces into one graph (hooks, attention
interception, virtual tokens and caches included) wherever the bare base does, computes the same outputs and trains
(the same gradients). The "eager" backend checks the tracing without paying for code generation."""
import pytest
import torch

import peftsurgery as ps
from conftest import tiny_llama, tiny_llama_4bit

METHODS = [("lora", {"targets": "all-linear"}), ("adapter", {}), ("prompt-tuning", {"num_tokens": 3}),
           ("prefix-tuning", {"num_tokens": 2}), ("bitfit", {"targets": "norm"}), ("dora", {}),
           ("adalora", {"init_r": 2, "target_r": 1}), ("ia3", {}), ("qlora", {}),
           ("multitask-prompt-tuning", {"num_tokens": 3, "tasks": 2}),
           ("p-tuning-v2", {"num_tokens": 2, "task": "sequence", "labels": 3}),
           ("task-head", {"task": "token", "labels": 3})]
# p-tuning is left out: outside task scoring its model is the base (see README, Methods)


@pytest.mark.parametrize("method, cfg", METHODS, ids=[m for m, _ in METHODS])
def test_compiles_in_one_graph_and_trains_alike(method, cfg):
    torch.manual_seed(0)
    model = (tiny_llama_4bit if method == "qlora" else tiny_llama)(num_hidden_layers=1).eval()
    ps.apply(model, method, **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():   # move off the identity start so every branch counts
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0   # left padding
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(m):   # a loss on the logits: task heads return theirs there; a task's unrouted factors get no grad
        loss = m(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean()
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    (want, want_grads), (got, got_grads) = step(model), step(compiled)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert sum(g is not None for g in want_grads) > 0
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# attention in a module's own code (reached by a torch-function mode; tokens_lm's in the compiled module's own
# forward), seated prefixes (ALiBi, relative positions)
OWN = ["bloom", "gptj", "falcon", "xglm", "deberta_v2", "t5", "mha_net", "einsum_lm", "tokens_lm"]


@pytest.mark.parametrize("arch", OWN)
def test_prefix_compiles_in_one_graph_where_attention_is_in_the_models_own_code(arch):
    from test_zoo import fresh, inputs, main
    kw = inputs(arch)
    torch._dynamo.reset()
    torch.compile(fresh(arch), fullgraph=True, backend="eager")(**kw)   # the bare base traces in one graph
    model = fresh(arch)
    ps.apply(model, "prefix-tuning", num_tokens=2, init="random")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)

    def step(m):
        out = main(m(**kw)).float().pow(2).mean()
        return out, torch.autograd.grad(out, params)

    torch._dynamo.reset()
    (want, want_grads), (got, got_grads) = step(model), step(torch.compile(model, fullgraph=True, backend="eager"))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
