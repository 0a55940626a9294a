"""P-tuning (v1) plugin: soft tokens placed by the template among real anchor tokens, filled at the embedding output
with a prompt encoder's output (LSTM + MLP or MLP), folded away when saved. Tiny random causal and masked LMs and
the word-level tokenizers of test_tasks (no download)."""
import json

import pytest
import torch
from conftest import raises_one_line
from safetensors.torch import load_file
from test_tasks import bert, examples, gpt2, llama, t5, tokenizer

import peftsurgery
from peftsurgery.cli import main
from peftsurgery.registry import Method
from peftsurgery.surgery import CONTAINER
from peftsurgery.tasks import Task, Verbalizer
from peftsurgery.train import fit, loss_of, write_jsonl

WORDS = {"pos": " positive", "neg": " negative"}
# hybrid templates: soft runs before the text, between the text and an anchor, and before the answer
HYBRID = {"causal": "{soft:2}Review : {text}{soft} Sentiment :{soft}",
          "masked": "{soft:2}{text}{soft} it was {soft}{answer} .",
          "seq2seq": "{soft:2}Review : {text}{soft} Sentiment :{soft}"}
MODELS = [("causal", llama, None), ("causal", gpt2, None), ("masked", bert, "bert"), ("seq2seq", t5, "t5")]
IDS = ["causal-llama", "causal-gpt2", "masked-bert", "seq2seq-t5"]


def task_for(kind, wrap, template=None, padding="left"):
    return Task(tokenizer(wrap), template or HYBRID[kind], Verbalizer(["neg", "pos"], WORDS), kind=kind,
                padding_side=padding)


def base_state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith(CONTAINER)}


def embedding(model):
    """The embedding site p-tuning fills (T5: the encoder's, a module of its own tied to the decoder's)."""
    return model.get_submodule(next(s.path for s in peftsurgery.sitemap(model) if s.role == "embed"))


def filled_embeddings(model, task, batch):
    """The embedding output the model runs on while `batch` is scored (after the p-tuning hook)."""
    seen = []
    handle = embedding(model).register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            task.scores(model, batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind,factory,wrap", MODELS, ids=IDS)
@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_trains_through_the_encoder_base_frozen_and_identity_without_soft_tokens(kind, factory, wrap, encoder):
    model, task = factory(), task_for(kind, wrap)
    kw = {"input_ids": torch.tensor([[6, 9, 30, 12, 31]])}
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.tensor([[1, 10]])
    with torch.no_grad():
        plain = model(**kw).logits
    before = base_state(model)
    peftsurgery.apply(model, "p-tuning", num_tokens=4, encoder=encoder, encoder_hidden=8)
    train = examples(16)
    with torch.no_grad():
        start_loss = float(loss_of(model, task, train))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(n.startswith(CONTAINER) for n in params)
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    graded = set()
    for _ in range(3):   # the encoder's last layer starts at zero: its earlier layers get gradient from step 2
        opt.zero_grad()
        loss_of(model, task, train).backward()
        graded |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum())}
        opt.step()
    assert graded == set(params)    # the vectors and every encoder tensor (LSTM included) learn
    assert all(not torch.equal(start[n], p) for n, p in params.items())
    after = base_state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad():
        assert float(loss_of(model, task, train)) != start_loss
        assert torch.equal(model(**kw).logits, plain)   # no soft positions (not scoring a task): the base
    with peftsurgery.disabled(model):
        raises_one_line(lambda: task.scores(model, task.encode(train[:2])), "no active method fills them")


@pytest.mark.parametrize("kind,factory,wrap", MODELS, ids=IDS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_soft_positions_filled_exactly_where_the_template_put_them(kind, factory, wrap, padding):
    model, task = factory(), task_for(kind, wrap, padding=padding)
    base_emb = embedding(model).weight.detach().clone()
    peftsurgery.apply(model, "p-tuning", num_tokens=4, encoder_hidden=8)
    train = examples(8)
    fit(model, task, train, epochs=1, batch_size=4, lr=1e-2)   # vectors away from their start
    model.eval()
    prompt = next(m for m in model.modules() if type(m).__name__ == "PromptEmbedding")
    with torch.no_grad():
        vectors = prompt(1)[0]
    batch = task.encode(examples(5, seed=3))
    out = filled_embeddings(model, task, batch)
    ids, soft = batch.input_ids, batch.soft
    # the template's runs 2 + 1 + 1, in its order, in every sequence, after left padding or before right padding
    for s, row in enumerate(batch.soft_positions()):
        real = batch.attention_mask[s].nonzero().flatten()
        first = int(real[0])
        template_at = [0, 1] if kind != "masked" else [1, 2]   # after [CLS] for the masked LM
        assert row[:2] == [first + k for k in template_at]
        assert len(row) == 4 and torch.equal(out[s, row], vectors)
    assert torch.equal(out[~soft], base_emb[ids[~soft]])   # every other position is the base embedding
    # a row scores the same alone as in the padded batch
    with torch.no_grad():
        together = task.scores(model, batch)
        alone = torch.cat([task.scores(model, task.encode([e])) for e in examples(5, seed=3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,factory,wrap", MODELS[::2] + MODELS[3:], ids=IDS[::2] + IDS[3:])
@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_save_holds_the_encoder_output_only_and_load_is_exact(tmp_path, kind, factory, wrap, encoder):
    model, task = factory(), task_for(kind, wrap)
    width = embedding(model).weight.shape[1]
    peftsurgery.apply(model, "p-tuning", num_tokens=4, encoder=encoder)
    training_budget = peftsurgery.budget(model)["trainable"]
    fit(model, task, examples(8), epochs=1, batch_size=4, lr=1e-2)
    model.eval()
    batch = task.encode(examples(6, seed=5))
    with torch.no_grad():
        trained = task.scores(model, batch)
    peftsurgery.save(model, str(tmp_path / "a"))
    saved = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert [tuple(t.shape) for t in saved.values()] == [(4, width)]   # no encoder tensor is saved
    meta = json.load(open(tmp_path / "a" / "adapter.json"))
    assert meta["trainable_parameters"] == training_budget > 4 * width
    fresh = factory()
    before = base_state(fresh)
    peftsurgery.load(fresh, str(tmp_path / "a"))
    assert peftsurgery.budget(fresh)["trainable"] == 4 * width
    with torch.no_grad():
        assert torch.equal(task.scores(fresh, batch), trained)
    after = base_state(fresh)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # loaded with trainable=True it trains its vectors directly
    again = peftsurgery.load(factory(), str(tmp_path / "a"), trainable=True)
    assert sum(p.numel() for p in again.parameters() if p.requires_grad) == 4 * width


@pytest.mark.parametrize("cfg", [{}, {"encoder": "mlp"}, {"encoder_hidden": 6}, {"encoder": "mlp", "encoder_hidden": 5},
                                 {"num_tokens": 1}])
@pytest.mark.parametrize("factory", [llama, bert], ids=["llama", "bert"])
def test_declared_budget_equals_built(factory, cfg):
    model = factory()
    peftsurgery.apply(model, "p-tuning", name="mine", **cfg)
    built = sum(p.numel() for p in model._modules[CONTAINER]["mine"].parameters() if p.requires_grad)
    method = Method("p-tuning")
    assert method.budget(method.config(cfg), peftsurgery.sitemap(model)) == built == peftsurgery.budget(model)["trainable"]
    width, n = embedding(model).weight.shape[1], cfg.get("num_tokens", 4)
    encoder = [m for m in model.modules() if type(m).__name__ == "PromptEncoder"][0]
    assert built == n * width + sum(p.numel() for p in encoder.parameters())


def test_chosen_soft_tokens_start_at_real_words():
    model, task = llama(), task_for("causal", None)
    emb = embedding(model).weight.detach().clone()
    peftsurgery.apply(model, "p-tuning", num_tokens=4, text="10,11", text_at=1, seed=3)
    batch = task.encode(examples(3))
    out = filled_embeddings(model, task, batch)
    row = batch.soft_positions()[0]
    assert torch.equal(out[0, row[1]], emb[10]) and torch.equal(out[0, row[2]], emb[11])
    sampled = torch.randint(0, emb.shape[0], (4,), generator=torch.Generator().manual_seed(3))   # init=vocab
    assert torch.equal(out[0, row[0]], emb[sampled[0]]) and torch.equal(out[0, row[3]], emb[sampled[3]])
    model = llama()
    peftsurgery.apply(model, "p-tuning", num_tokens=4, init="random", text="10", text_at=3)
    out = filled_embeddings(model, task, batch)
    assert torch.equal(out[0, row[3]], emb[10])
    assert not any(torch.equal(out[0, row[0]], e) for e in emb)


def test_errors_are_one_line_and_leave_the_model_as_it_was():
    model, tok = llama(), tokenizer()
    for cfg, needle in [({"encoder": "gru"}, "encoder must be one of lstm, mlp"),
                        ({"encoder_hidden": 7}, "must be even"),
                        ({"num_tokens": 2, "text": "10,11", "text_at": 1}, "more than num_tokens=2"),
                        ({"text": "10,x"}, "token ids like 12,7,99")]:
        raises_one_line(lambda: peftsurgery.apply(model, "p-tuning", **cfg), needle)
    assert peftsurgery.adapters(model) == {}
    peftsurgery.apply(model, "p-tuning", num_tokens=4)
    exs = examples(3)
    plain = Task(tok, "Review : {text} Sentiment :", Verbalizer(["neg", "pos"], WORDS))
    raises_one_line(lambda: plain.scores(model, plain.encode(exs)), "the template has none", "{soft:N}",
                    "num_tokens = 4")
    three = Task(tok, "{soft:2}Review : {text}{soft} Sentiment :", Verbalizer(["neg", "pos"], WORDS))
    raises_one_line(lambda: three.scores(model, three.encode(exs)), "the template has 3 soft tokens",
                    "num_tokens=4")
    peftsurgery.apply(model, "p-tuning", name="other", num_tokens=4)
    hybrid = task_for("causal", None)
    raises_one_line(lambda: hybrid.scores(model, hybrid.encode(exs)), "default, other", "keep one active")
    peftsurgery.set_active(model, ["other"])
    with torch.no_grad():
        hybrid.scores(model, hybrid.encode(exs))
    # nothing is left over from a failed scoring: the model still runs as the base outside scoring
    with torch.no_grad(), peftsurgery.disabled(model):
        base = model(input_ids=torch.tensor([[6, 9, 30]])).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.tensor([[6, 9, 30]])).logits, base)


def json_row(capsys):
    return json.loads(next(x for x in reversed(capsys.readouterr().out.splitlines()) if x.startswith("{")))


def test_cli_trains_a_hybrid_template_and_eval_reads_it_back(tmp_path, capsys):
    folder = tmp_path / "causal"
    llama().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    exs = examples(40)
    write_jsonl(exs[:24], str(tmp_path / "train.jsonl"))
    write_jsonl(exs[24:], str(tmp_path / "test.jsonl"))
    template = HYBRID["causal"]
    args = ["--template", template, "--label", "pos=positive", "--label", "neg=negative", "--quiet", "--json"]
    assert main(["train", str(folder), "--plugin", "p-tuning", "--set", "num_tokens=4", "--set-ids",
                 "text=Sentiment", "--set", "text_at=3", "--data", str(tmp_path / "train.jsonl"), "--eval-data",
                 str(tmp_path / "test.jsonl"), "--epochs", "1", "--lr", "1e-2", *args, "-o",
                 str(tmp_path / "ad")]) == 0
    row = json_row(capsys)
    assert row["trainable_params"] == Method("p-tuning").budget(Method("p-tuning").config({"num_tokens": 4}),
                                                                peftsurgery.sitemap(llama()))
    assert main(["eval", str(folder), "--adapter", str(tmp_path / "ad"), "--data", str(tmp_path / "test.jsonl"),
                 "--quiet", "--json"]) == 0
    assert json_row(capsys)["accuracy"] == row["accuracy"]
    assert main(["train", str(folder), "--plugin", "p-tuning", "--set", "num_tokens=3", "--data",
                 str(tmp_path / "train.jsonl"), "--epochs", "1", *args, "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the template has 4 soft tokens but the p-tuning adapter has num_tokens=3" in err
