"""The cloze-classifier path of the real-model example (peftsurgery.train, `peftsurgery train` / `eval`, GGUF
loading), on a tiny random Llama with a word-level tokenizer built in the test: no download."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

import peftsurgery
from peftsurgery import SurgeryError
from peftsurgery.cli import main
from peftsurgery.registry import Method
from peftsurgery.tasks import Task, Verbalizer
from peftsurgery.train import Example, balanced_split, evaluate, fit, loss_of, read_examples, write_jsonl
from peftsurgery.zoo import load_model

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "film", "was", "plot", "acting", "very", "quite", "a", "movie", "story"]
WORDS = ["[UNK]", "[PAD]", "Review", "Sentiment", ":", "positive", "negative", *GOOD, *BAD, *FILLER]
TEMPLATE = "Review: {text}\nSentiment:"


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def tiny_model(hidden=32):
    """hidden=64: linears 64 and 128 wide, which bitsandbytes' 4-bit layers take on every CPU (conftest's
    tiny_llama_4bit)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=1, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).eval()


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        pool = GOOD if label == "pos" else BAD
        words = [FILLER[int(j)] for j in torch.randint(0, len(FILLER), (int(torch.randint(1, 7, (1,), generator=g)),),
                                                        generator=g)]
        words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=g)), pool[int(torch.randint(0, 4, (1,),
                                                                                                    generator=g))])
        out.append(Example(" ".join(words), label))
    return out


WORDMAP = {"pos": " positive", "neg": " negative"}


def _saved(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _saved(tmp_path_factory, tiny_model())


@pytest.fixture(scope="module")
def model_dir_4bit(tmp_path_factory):
    return _saved(tmp_path_factory, tiny_model(hidden=64))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    exs = examples(96)
    write_jsonl(exs[:64], str(d / "train.jsonl"))
    write_jsonl(exs[64:], str(d / "test.jsonl"))
    return d


# ---- data -----------------------------------------------------------------------------------------------------

def test_read_csv_pang_lee_layout_jsonl_and_header(tmp_path):
    p = tmp_path / "pl.csv"
    p.write_bytes('\ufeff"1","a "" quoted "" film . \n"\r\n"-1","dull\n"\r\n'.encode("utf-8"))
    assert read_examples(str(p)) == [Example('a " quoted " film .', "1"), Example("dull", "-1")]
    h = tmp_path / "h.csv"
    h.write_text("id,text,label\n7,nice,pos\n8,bad,neg\n")
    assert read_examples(str(h)) == [Example("nice", "pos"), Example("bad", "neg")]
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "ok", "label": 1}\n\n{"text": "no", "label": 0}\n')
    assert read_examples(str(j)) == [Example("ok", "1"), Example("no", "0")]
    j.write_text('{"text": "ok"}\n')
    with pytest.raises(SurgeryError, match=r"d.jsonl:1 is not a JSON object with text and label"):
        read_examples(str(j))
    with pytest.raises(SurgeryError, match="is not a file"):
        read_examples(str(tmp_path / "missing.csv"))


def test_balanced_split_is_deterministic_disjoint_and_balanced():
    exs = [Example(f"text {i}", "1" if i % 3 else "-1") for i in range(300)] + [Example("text 1", "1")]
    tr, te = balanced_split(exs, 40, 100, seed=0)
    assert (tr, te) == balanced_split(exs, 40, 100, seed=0)
    assert (tr, te) != balanced_split(exs, 40, 100, seed=1)
    assert len(tr) == 40 and len(te) == 100
    assert not {e.text for e in tr} & {e.text for e in te}
    assert [sum(e.label == lab for e in tr) for lab in ("1", "-1")] == [20, 20]
    assert [sum(e.label == lab for e in te) for lab in ("1", "-1")] == [50, 50]
    with pytest.raises(SurgeryError, match="needed"):
        balanced_split(exs, 40, 1000)


# ---- the cloze task ---------------------------------------------------------------------------------------------

def cloze(labels, template=TEMPLATE, words=WORDMAP):
    return Task(tokenizer(), template, Verbalizer(labels, words))


def test_template_needs_text():
    with pytest.raises(SurgeryError, match="placeholder"):
        cloze(["pos", "neg"], "Review:")


def tiny_gpt2():
    """Absolute position embeddings: left padding must not shift a row's positions."""
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            pad_token_id=1)).eval()


@pytest.mark.parametrize("factory", [tiny_model, tiny_gpt2])
@pytest.mark.parametrize("method,options", [(None, {}), ("lora", {}), ("prompt-tuning", {"num_tokens": 3}),
                                            ("prefix-tuning", {"num_tokens": 3})])
def test_scores_are_last_real_token_logits_with_left_padding(factory, method, options):
    model = factory()
    if method:
        peftsurgery.apply(model, method, **options)
    task = cloze(["pos", "neg"])
    exs = [Example("good", "pos"), Example("the film was quite very dull", "neg"), Example("fine plot", "pos")]
    encoded = task.encode(exs)
    ids, mask, y = encoded.input_ids, encoded.attention_mask, encoded.targets
    assert y.tolist() == [0, 1, 0]
    assert (mask[:, -1] == 1).all() and mask[0, 0] == 0 and (ids[mask == 0] == 1).all()  # left padding with [PAD]
    with torch.no_grad():
        batch = task.scores(model, encoded)
        for i, e in enumerate(exs):
            alone_ids = torch.tensor([tokenizer().encode(TEMPLATE.replace("{text}", e.text))])
            logits = model(input_ids=alone_ids).logits[0, -1]
            word = [tokenizer().encode(WORDMAP[lab], add_special_tokens=False)[0] for lab in ("pos", "neg")]
            torch.testing.assert_close(batch[i], logits[word], atol=1e-5, rtol=1e-5)


def correct_by_hand(model, exs):
    """The reference accuracy: each example alone (no padding, no batching), the model's logits for the two label
    words at its last token, counted here rather than by Task.scores / evaluate."""
    tok = tokenizer()
    pos, neg = (tok.encode(WORDMAP[lab], add_special_tokens=False)[0] for lab in ("pos", "neg"))
    right = 0
    with torch.no_grad():
        for e in exs:
            logits = model(input_ids=torch.tensor([tok.encode(TEMPLATE.replace("{text}", e.text))])).logits[0, -1]
            right += ("pos" if logits[pos] > logits[neg] else "neg") == e.label
    return right


def test_fit_lowers_the_loss_and_evaluate_counts_correct_argmax():
    model = tiny_model()
    task = cloze(["neg", "pos"])
    train = examples(64)
    peftsurgery.apply(model, "lora", r=4, targets="all-linear")
    base = {k: v.clone() for k, v in model.state_dict().items() if "_peftsurgery" not in k}
    with torch.no_grad():
        before = float(loss_of(model, task, train))
    result = fit(model, task, train, epochs=3, batch_size=16, lr=1e-2, seed=0)
    with torch.no_grad():
        after = float(loss_of(model, task, train))
    assert result["steps"] == 12 and len(result["step_seconds"]) == 12 and result["peak_memory_bytes"] > 0
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # base frozen
    acc = evaluate(model, task, train, batch_size=7)
    assert acc == correct_by_hand(model, train) / len(train)
    with pytest.raises(SurgeryError, match="has no label word"):
        evaluate(model, task, [Example("good", "maybe")])


class Rigged(torch.nn.Module):
    """A stand-in language model whose label-word logits are set by rule: `answer(row ids)` -> "pos" / "neg"."""

    def __init__(self, answer):
        super().__init__()
        self.answer, self.dummy = answer, torch.nn.Parameter(torch.zeros(()))
        tok = tokenizer()
        self.pos, self.neg = (tok.encode(WORDMAP[lab], add_special_tokens=False)[0] for lab in ("pos", "neg"))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, len(WORDS))
        for b, row in enumerate(input_ids.tolist()):
            logits[b, :, self.pos if self.answer(row) == "pos" else self.neg] = 1.0
        return tf.modeling_outputs.CausalLMOutput(logits=logits + 0 * self.dummy)


@pytest.mark.parametrize("answer,expected", [
    (lambda row: "pos" if {WORDS.index(w) for w in GOOD} & set(row) else "neg", 1.0),   # reads the review
    (lambda row: "neg" if {WORDS.index(w) for w in GOOD} & set(row) else "pos", 0.0),   # always wrong
    (lambda row: "pos", 0.5),                                                          # one class, balanced data
], ids=["right", "wrong", "constant"])
def test_evaluate_gives_the_known_accuracy_of_a_rigged_model(answer, expected):
    task = cloze(["neg", "pos"])
    exs = examples(30)
    assert sum(e.label == "pos" for e in exs) == 15
    assert evaluate(Rigged(answer), task, exs, batch_size=4) == expected


def _cached_kv(ids):
    """The reference: transformers' own cache for these tokens (keys after rotary), one (keys, values) per layer,
    each (kv_heads, tokens, head_dim)."""
    with torch.no_grad():
        cache = tiny_model()(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def _prefix_kv(model):
    built = peftsurgery.adapters(model)["default"].records[0].built
    return [(built[f"model.layers.{i}.self_attn"].key.detach(), built[f"model.layers.{i}.self_attn"].value.detach())
            for i in range(model.config.num_hidden_layers)]


def test_prefix_init_text_is_the_cached_keys_values_of_the_text():
    model = tiny_model()
    ids = tokenizer().encode("Review: good film", add_special_tokens=False)
    assert len(ids) == 4
    peftsurgery.apply(model, "prefix-tuning", num_tokens=6, init="text", text=",".join(map(str, ids)))
    got, want = _prefix_kv(model), _cached_kv(ids + ids[:2])  # the text's ids repeated to fill 6 tokens
    assert len(got) == len(want) == 2
    for (k, v), (wk, wv) in zip(got, want):
        assert k.shape == wk.shape == (2, 6, 8)
        torch.testing.assert_close(k, wk)
        torch.testing.assert_close(v, wv)
    with pytest.raises(SurgeryError, match="init=text needs text"):
        Method("prefix-tuning").config({"init": "text"})


def test_prefix_init_vocab_is_the_cached_keys_values_of_real_tokens():
    """The sampled tokens are not known to the test: each position's token is recovered from the first layer's
    keys (which depend only on that token and its position), then every layer must match the cache of them."""
    model = tiny_model()
    peftsurgery.apply(model, "prefix-tuning", num_tokens=5, init="vocab", seed=3)
    got = _prefix_kv(model)
    with torch.no_grad():  # every token at every position: row t is token t repeated
        every = tiny_model()(input_ids=torch.arange(len(WORDS))[:, None].expand(-1, 5), use_cache=True)
    k0 = every.past_key_values.layers[0].keys  # (tokens, kv_heads, positions, head_dim)
    dist = (k0 - got[0][0][None]).abs().amax(dim=(1, 3))  # (tokens, positions)
    ids = dist.argmin(0).tolist()
    assert float(dist.min(0).values.max()) < 1e-5, dist.min(0).values   # a real token at every position
    want = _cached_kv(ids)
    for (k, v), (wk, wv) in zip(got, want):
        torch.testing.assert_close(k, wk)
        torch.testing.assert_close(v, wv)


def test_linear_schedule_decays_to_zero_and_changes_training(monkeypatch):
    task = cloze(["neg", "pos"])
    trained = {}
    for schedule in ("constant", "linear"):
        model = tiny_model()
        peftsurgery.apply(model, "lora", r=4, targets="all-linear")
        seen, real = [], torch.optim.AdamW.step
        monkeypatch.setattr(torch.optim.AdamW, "step",
                            lambda opt, *a, **k: (seen.append(opt.param_groups[0]["lr"]), real(opt, *a, **k))[1])
        fit(model, task, examples(32), epochs=2, batch_size=8, lr=1e-2, seed=0, schedule=schedule)
        monkeypatch.undo()
        trained[schedule] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        expected = [1e-2] * 8 if schedule == "constant" else [1e-2 * (1 - i / 8) for i in range(8)]
        assert seen == pytest.approx(expected)
    assert any(not torch.equal(a, b) for a, b in zip(trained["constant"], trained["linear"]))


# the defaults documented in the README ("Methods and defaults"), each declared by its plugin
DOCUMENTED_LR = {"lora": 5e-4, "adapter": 6e-4, "qlora": 3e-4, "prompt-tuning": 1e-3, "prefix-tuning": 3e-3,
                 "ia3": 1e-2, "bitfit": 1e-3, "adalora": 1e-2, "dora": 5e-4}


def test_methods_declare_their_documented_learning_rates():
    for name, lr in DOCUMENTED_LR.items():
        m = Method(name)
        assert m.learning_rate(m.config({})) == lr, name


# ---- command line -------------------------------------------------------------------------------------------------

def _record_lr(monkeypatch):
    """The learning rate of every AdamW step actually taken, as the optimizer holds it."""
    seen, real = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda opt, *a, **k: (seen.append([g["lr"] for g in opt.param_groups]), real(opt, *a, **k))[1])
    return seen


def test_cli_train_then_eval(model_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "adapter"
    seen = _record_lr(monkeypatch)
    code = main(["train", str(model_dir), "--plugin", "prompt-tuning", "--set", "num_tokens=4", "--set", "init=text",
                 "--set-ids", "text=Review Sentiment", "--data", str(data / "train.jsonl"),
                 "--eval-data", str(data / "test.jsonl"), "--template", "Review: {text}\\nSentiment:",
                 "--label", "pos=positive", "--label", "neg=negative", "--epochs", "1", "--batch-size", "16",
                 "--quiet", "--json", "-o", str(out)])
    monkeypatch.undo()
    stdout, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(stdout.strip().splitlines()[-2])
    assert row["method"] == "prompt-tuning" and row["steps"] == 4 and row["trainable_params"] == 4 * 32
    assert seen == [[1e-3]] * 4 and row["lr"] == 1e-3          # prompt-tuning's own default, no --lr given
    saved = json.load(open(out / "train.json"))
    assert saved["template"] == TEMPLATE and saved["words"] == WORDMAP and saved["config"]["text"] == "2,3"
    assert saved["results"]["lr"] == 1e-3
    assert os.path.isfile(out / "adapter.safetensors")
    test = read_examples(str(data / "test.jsonl"))
    trained = peftsurgery.load(tiny_model(), str(out))
    assert row["accuracy"] == correct_by_hand(trained, test) / len(test)
    # eval reads template and label words from the adapter and reproduces the accuracy train reported
    code = main(["eval", str(model_dir), "--adapter", str(out), "--data", str(data / "test.jsonl"), "--quiet",
                 "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["accuracy"] == row["accuracy"]
    code = main(["eval", str(model_dir), "--data", str(data / "test.jsonl"), "--template", TEMPLATE.replace(
        "\n", "\\n"), "--label", "pos=positive", "--label", "neg=negative", "--quiet", "--json"])
    zero = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])["accuracy"]
    assert code == 0 and zero == correct_by_hand(tiny_model(), test) / len(test)   # zero-shot: the base model


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix-tuning", "qlora"])
def test_cli_train_uses_the_methods_learning_rate_unless_lr_is_given(method, model_dir, model_dir_4bit, data, tmp_path,
                                                                     capsys, monkeypatch):
    model = model_dir_4bit if method == "qlora" else model_dir   # 4-bit layers need widths every CPU takes
    argv = ["train", str(model), "--plugin", method, "--data", str(data / "train.jsonl"), "--template",
            "Review: {text}\\nSentiment:", "--label", "pos=positive", "--label", "neg=negative", "--epochs", "1",
            "--batch-size", "32", "--quiet", "--json"]
    for extra, lr in [([], DOCUMENTED_LR[method]), (["--lr", "0.0123"], 0.0123)]:
        out = tmp_path / str(lr)
        seen = _record_lr(monkeypatch)
        code = main(argv + extra + ["-o", str(out)])
        monkeypatch.undo()
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert seen == [[lr], [lr]]                       # both steps (64 examples, batch 32) at that rate
        assert json.loads(stdout.strip().splitlines()[-2])["lr"] == lr
        assert json.load(open(out / "train.json"))["results"]["lr"] == lr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cli_trains_on_cuda_and_the_adapter_scores_the_same_on_the_cpu(model_dir, data, tmp_path, capsys):
    out, test = tmp_path / "adapter", str(data / "test.jsonl")
    code = main(["train", str(model_dir), "--plugin", "lora", "--data", str(data / "train.jsonl"), "--eval-data", test,
                 "--template", "Review: {text}\\nSentiment:", "--label", "pos=positive", "--label", "neg=negative",
                 "--device", "cuda", "--quiet", "--json", "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(stdout.strip().splitlines()[-2])
    assert row["peak_memory_mb"] > 0
    for device in ("cuda", "cpu"):
        assert main(["eval", str(model_dir), "--adapter", str(out), "--data", test, "--device", device, "--quiet",
                     "--json"]) == 0
        assert json.loads(capsys.readouterr()[0].strip().splitlines()[-1])["accuracy"] == pytest.approx(
            row["accuracy"], abs=1 / 32)


@pytest.mark.parametrize("argv,message", [
    (["eval", "{model}", "--data", "{missing}"], "is not a file"),
    (["eval", "tiny-llama", "--data", "{test}"], "needs the model's tokenizer"),
    (["eval", "{model}", "--data", "{test}", "--label", "pos=good|"], "--label needs LABEL=WORD"),
    (["eval", "{model}", "--data", "{test}", "--template", "{{text}} {{answer}} film"],
     "{answer} must end the template"),
    (["eval", "{model}", "--data", "{test}", "--template", "{{soft:2}}{{text}}", "--label", "pos=positive",
      "--label", "neg=negative"], "no active method fills them"),
    (["eval", "{model}", "--data", "{test}", "--label", "pos"], "--label needs LABEL=WORD"),
    (["train", "{model}", "--plugin", "nope", "--data", "{test}", "-o", "{out}"], "no method named 'nope'"),
    (["train", "{model}", "--plugin", "lora", "--data", "{test}", "--epochs", "0", "-o", "{out}"], "must be positive"),
    (["train", "{model}", "--plugin", "lora", "--data", "{test}", "--schedule", "cosine", "-o", "{out}"],
     "unknown schedule 'cosine'"),
    (["eval", "{model}", "--data", "{test}", "--device", "gpu0"], "is not a torch device"),
    pytest.param(["eval", "{model}", "--data", "{test}", "--device", "cuda"], "torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")),
])
def test_cli_errors_are_one_line(model_dir, data, tmp_path, capsys, argv, message):
    values = {"model": model_dir, "missing": tmp_path / "nothing.csv", "test": data / "test.jsonl",
              "out": tmp_path / "o"}
    labels = ["--label", "pos=positive", "--label", "neg=negative"] if argv[0] == "train" else []
    code = main([a.format(**values) for a in argv] + labels + ["--quiet"])
    err = capsys.readouterr()[1]
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


PEER_OPTIONS = {"lora": {"r": 8, "alpha": 16, "targets": "attn.q,attn.v"}, "prompt-tuning": {"num_tokens": 20},
                "ia3": {}, "dora": {"r": 8, "alpha": 16, "targets": "attn.q,attn.v"},
                "adalora": {"init_r": 12, "target_r": 8, "targets": "attn.q,attn.v"}}


@pytest.mark.parametrize("method", list(PEER_OPTIONS))
def test_peer_script_trains_peft_with_the_same_loop_and_budget(model_dir, tmp_path, method):
    """examples/sentiment_peft.py (sentiment.py --peer): PEFT's method on the example's files, same budget as ours."""
    exs = [Example(e.text, "1" if e.label == "pos" else "-1") for e in examples(48)]
    write_jsonl(exs[:32], str(tmp_path / "train.jsonl"))
    write_jsonl(exs[32:], str(tmp_path / "test.jsonl"))
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "sentiment_peft.py")
    out = subprocess.run([sys.executable, script, method, str(model_dir), "--dir", str(tmp_path), "--lr", "1e-2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    m = Method(method)
    assert row["trainable_params"] == m.budget(m.config(PEER_OPTIONS[method]), peftsurgery.sitemap(tiny_model()))
    assert row["lr"] == 1e-2
    # the accuracy it printed is that of the PEFT model it trained: train the same one here (same seed, threads,
    # data, loop) and count its right answers by hand over one left-padded batch of the test set, as it scored it
    sys.path.insert(0, os.path.dirname(script))
    threads = torch.get_num_threads()
    try:
        from sentiment_peft import peft_model
        torch.set_num_threads(2)
        peer, tok = peft_model(method, str(model_dir), "cpu", 0, steps=6)
        fit(peer, Task(tok, TEMPLATE, Verbalizer(["-1", "1"], {"1": " positive", "-1": " negative"})),
            read_examples(str(tmp_path / "train.jsonl")), 3, 16, 1e-2, 0)
    finally:
        sys.path.remove(os.path.dirname(script))
        torch.set_num_threads(threads)
    if method == "adalora":   # PEFT's rank allocation ran under the shared loop and ended at the target ranks
        kept = peer.peft_config["default"].rank_pattern
        assert kept is not None and sum(map(sum, kept.values())) == 8 * len(kept) < 12 * len(kept)
    test = read_examples(str(tmp_path / "test.jsonl"))
    seqs = [tok.encode(TEMPLATE.replace("{text}", e.text)) for e in test]
    n = max(map(len, seqs))
    ids = torch.tensor([[1] * (n - len(q)) + q for q in seqs])
    mask = torch.tensor([[0] * (n - len(q)) + [1] * len(q) for q in seqs])
    pos, neg = WORDS.index("positive"), WORDS.index("negative")
    with torch.no_grad():
        last = peer(input_ids=ids, attention_mask=mask).logits[:, -1]
    right = sum(("1" if a[pos] > a[neg] else "-1") == e.label for a, e in zip(last, test))
    assert row["accuracy"] == right / len(test), (row["accuracy"], right)
    if method == "adalora":   # while training, PEFT's orthogonality term reaches the loop: 0.1 x its mean norm
        peer.train()
        with torch.no_grad():
            term = peer(input_ids=ids, attention_mask=mask).loss
            grams = [p @ p.T if "lora_A" in n else p.T @ p for n, p in peer.named_parameters() if "lora_A" in n
                     or "lora_B" in n]
            norms = [torch.dist(g, torch.eye(len(g))) for g in grams]
        assert len(norms) == 8 and torch.allclose(term, 0.1 * sum(norms) / len(norms)), term   # 2 layers x q, v x P, Q


# ---- GGUF ------------------------------------------------------------------------------------------------------------

def _write_gguf(path, model, vocab):
    """A float32 Llama GGUF file with a BPE tokenizer, written with the gguf package's writer."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(t, heads):  # llama.cpp's interleaved rotary layout, which transformers undoes when reading
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, H)
            elif gg == "attn_k":
                t = permute(t, KV)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_or_folder_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTSURGERY_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    folder = tmp_path / "gg"
    folder.mkdir()
    _write_gguf(folder / "tiny.gguf", model, WORDS)
    loaded, tok = load_model(str(folder / "tiny.gguf"))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert tok.convert_ids_to_tokens(list(range(len(WORDS)))) == WORDS and tok.pad_token_id == 1  # the file's
    ids = torch.tensor([[2, 4, 7, 13, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    cached = os.listdir(tmp_path / "cache" / "models")
    assert len(cached) == 1
    stamp = os.path.getmtime(tmp_path / "cache" / "models" / cached[0] / "config.json")
    again, _ = load_model(str(folder))                      # a folder holding one GGUF: the cached copy
    assert os.path.getmtime(tmp_path / "cache" / "models" / cached[0] / "config.json") == stamp
    assert torch.equal(again.model.embed_tokens.weight, loaded.model.embed_tokens.weight)
    (folder / "second.gguf").write_bytes(b"")
    with pytest.raises(SurgeryError, match="holds 2 GGUF files"):
        load_model(str(folder))


def test_gguf_without_the_gguf_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import importlib.util
    monkeypatch.setenv("PEFTSURGERY_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["locate", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr()[1]
    assert "pip install gguf==" in err and len(err.strip().splitlines()) == 1


def test_sentiment_table_shows_untrained_rows_against_zero_shot():
    """examples/sentiment.py: the prompting rows (nothing trained) sit in the same table as the trained methods, and
    PET's rows say what they trained."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        from sentiment import summarize, table
    finally:
        sys.path.pop(0)
    runs = [{"method": "zero-shot", "accuracy": 0.75}, {"method": "4-shot", "accuracy": 0.8},
            {"method": "lora", "accuracy": 0.84, "lr": 1e-3, "trainable_params": 10, "median_s_per_step": 2.0,
             "peak_memory_mb": 100}, {"method": "lora", "accuracy": 0.82, "lr": 1e-3, "trainable_params": 10,
                                      "median_s_per_step": 4.0, "peak_memory_mb": 120},
            {"method": "PET distilled", "accuracy": 0.81, "trained": "head + LoRA"}]
    rows = summarize(runs)
    assert [r["method"] for r in rows] == ["zero-shot", "4-shot", "lora", "PET distilled"]
    assert rows[2]["median_s_per_step"] == 3.0 and rows[2]["peak_memory_mb"] == 120
    lines = table(rows).splitlines()
    assert lines[2].startswith("| zero-shot | 75.0% |  |") and lines[3].startswith("| 4-shot | 80.0% | +5.0 |")
    assert lines[4].startswith("| lora | 83.0% | +8.0 |")
    assert lines[3].endswith("| 0 | | | |") and lines[5] == "| PET distilled | 81.0% | +6.0 | 81.0 | head + LoRA | | | |"
