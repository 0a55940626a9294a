"""PPT (peftsurgery/pretrain.py, `peftsurgery pretrain-prompt`, prompt-tuning init=pretrained:DIR): the
self-supervised examples are what their labels say, pre-training trains the prompt only, and a downstream prompt
starts from exactly the saved vectors; every mistake is one line and leaves the model as it was."""
import json
import string

import pytest
import torch
import transformers as tf
from conftest import raises_one_line, tiny_gpt2
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

import peftsurgery as ps
from peftsurgery.cli import main
from peftsurgery.pretrain import FORMATS, documents, examples, pretrain_prompt

TEMPLATE_WORDS = ["Does", "the", "second", "sentence", "follow", "first", "?", "Which", "comes", "next", "Answer",
                  ":", ".", "yes", "maybe", "no", *string.ascii_uppercase[:4]]
TOPICS = {"sea": ["boat", "wave", "fish", "sail"], "farm": ["cow", "barn", "hay", "field"],
          "city": ["car", "road", "shop", "tower"]}
WORDS = ["[UNK]", "[PAD]", *TEMPLATE_WORDS, *(w for ws in TOPICS.values() for w in ws), *TOPICS]


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


IR = 0.2    # weights large enough that a 4-token prompt can move the label scores of a random model


def tiny_model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=1, attn_implementation="sdpa", initializer_range=IR)
    return tf.LlamaForCausalLM(cfg).eval()


def corpus(path, docs=6, sentences=5):
    """Documents on one topic each: sentence i of a document names its topic and i's word, so B following A is
    visible in the text; a last word, unknown to the tokenizer, makes every sentence unique."""
    g = torch.Generator().manual_seed(0)
    blocks = []
    for d in range(docs):
        topic = list(TOPICS)[d % 3]
        words = TOPICS[topic]
        blocks.append(" ".join(f"{topic} {words[(i + int(torch.randint(0, 4, (1,), generator=g))) % 4]} "
                               f"{words[i % 4]} n{d}x{i}." for i in range(sentences)))   # n..: unique, unknown
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_documents_and_sentences(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("One. Two! Three?\nFour\n\n  \nFive. Six.\n", encoding="utf-8")
    assert documents(str(p)) == [["One.", "Two!", "Three?", "Four"], ["Five.", "Six."]]


def test_pair_examples_are_what_their_labels_say(tmp_path):
    docs = documents(corpus(tmp_path / "c.txt"))
    where = {s: (d, i) for d, doc in enumerate(docs) for i, s in enumerate(doc)}
    assert len(where) == sum(map(len, docs))   # every sentence unique, so its place is known
    out = examples(docs, "pair", 90, seed=3)
    assert [sum(e.label == lab for e in out) for lab in ("next", "same", "other")] == [30, 30, 30]
    for e in out:
        (da, ia), (db, ib) = where[e.text], where[e.text_b]
        assert {"next": da == db and ib == ia + 1, "same": da == db and ib not in (ia, ia + 1),
                "other": da != db}[e.label], e
    assert examples(docs, "pair", 90, seed=3) == out and examples(docs, "pair", 90, seed=4) != out


def test_choice_examples_put_the_next_sentence_at_the_label(tmp_path):
    docs = documents(corpus(tmp_path / "c.txt"))
    where = {s: (d, i) for d, doc in enumerate(docs) for i, s in enumerate(doc)}
    out = examples(docs, "choice", 60, options=4, seed=1)
    assert {e.label for e in out} == set("ABCD")
    for e in out:
        lines = e.text_b.split("\n")
        assert [x[:3] for x in lines] == ["A. ", "B. ", "C. ", "D. "] and len({x[3:] for x in lines}) == 4
        d, i = where[e.text]
        for x in lines:
            dx, ix = where[x[3:]]
            assert (dx, ix) == (d, i + 1) if x[0] == e.label else dx != d


def test_text_that_cannot_make_a_format_is_refused(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a. b. c.\n", encoding="utf-8")
    raises_one_line(lambda: examples(documents(str(one)), "pair", 5), "1 document", "at least two documents")
    short = tmp_path / "short.txt"
    short.write_text("a. b.\n\nc. d.\n", encoding="utf-8")
    raises_one_line(lambda: examples(documents(str(short)), "pair", 5), "three or more sentences", "choice")
    assert len(examples(documents(str(short)), "choice", 5, options=2)) == 5
    raises_one_line(lambda: examples(documents(str(short)), "choice", 5, options=1), "options", "2 to 26")
    raises_one_line(lambda: examples(documents(str(short)), "choice", 5, options=4), "too few distinct sentences")
    raises_one_line(lambda: examples(documents(str(short)), "cloze", 5), "unknown format", "pair, choice")
    raises_one_line(lambda: documents(str(tmp_path / "missing.txt")), "is not a file")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00a")
    raises_one_line(lambda: documents(str(bad)), "not UTF-8")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pretraining_trains_the_prompt_only_and_lowers_the_loss(fmt, tmp_path):
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = pretrain_prompt(model, tokenizer(), corpus(tmp_path / "c.txt"), fmt, n=12, epochs=20, batch_size=12,
                             lr=3e-2, num_tokens=4, init="random")
    assert result["steps"] == 20 and result["examples"] == 12
    first, last = sum(result["losses"][:3]) / 3, sum(result["losses"][-3:]) / 3
    assert last < first - 0.2, (first, last)   # the prompt alone fits the examples (1.27 -> 0.77, 1.24 -> 0.78)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "_peftsurgery.default.0.model/embed_tokens.weight"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


def test_cli_then_a_downstream_prompt_starts_from_it(model_dir, tmp_path, capsys):
    text = corpus(tmp_path / "c.txt")
    assert main(["pretrain-prompt", str(model_dir), "--text", text, "--examples", "32", "--set", "num_tokens=4",
                 "--set", "init=random", "--quiet", "--json", "-o", str(tmp_path / "ppt")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert row["format"] == "pair" and row["steps"] == 2 and row["trainable_params"] == 4 * 32
    saved = load_file(str(tmp_path / "ppt" / "adapter.safetensors"))
    (vectors,) = saved.values()
    assert json.loads((tmp_path / "ppt" / "train.json").read_text())["labels"] == ["next", "same", "other"]

    model = tiny_model()
    ps.apply(model, "prompt-tuning", num_tokens=4, init=f"pretrained:{tmp_path / 'ppt'}")
    (start,) = ps.adapters(model)["default"].records[0].state()[0].values()
    assert torch.equal(start, vectors)
    fresh = ps.apply(tiny_model(), "prompt-tuning", num_tokens=4, init="random")
    assert not torch.equal(next(iter(ps.adapters(fresh)["default"].records[0].state()[0].values())), vectors)


def test_pretrained_init_mistakes_are_one_line_and_leave_the_model(model_dir, tmp_path):
    text = corpus(tmp_path / "c.txt")
    main(["pretrain-prompt", str(model_dir), "--text", text, "--examples", "16", "--set", "num_tokens=4",
          "--quiet", "-o", str(tmp_path / "ppt")])
    ps.save(ps.apply(tiny_model(), "lora", r=2), str(tmp_path / "lora"))
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ppt = f"pretrained:{tmp_path / 'ppt'}"
    for options, needles in [
            (dict(num_tokens=5, init=ppt), ("holds 4 virtual tokens", "num_tokens=4")),
            (dict(num_tokens=4, init=f"pretrained:{tmp_path / 'lora'}"), ("holds a lora adapter", "prompt-tuning")),
            (dict(num_tokens=4, init=f"pretrained:{tmp_path / 'none'}"), ("is not a directory",)),
            (dict(num_tokens=4, init="pretrained:"), ("needs the folder",)),
            (dict(num_tokens=4, init="glove"), ("pretrained:DIR",))]:
        raises_one_line(lambda: ps.apply(model, "prompt-tuning", **options), *needles)
    raises_one_line(lambda: ps.apply(tiny_gpt2(), "prompt-tuning", num_tokens=4, init=ppt),
                    "different architecture", "start from an adapter of")
    assert not ps.adapters(model) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert main(["pretrain-prompt", str(model_dir), "--text", text, "--format", "cloze", "-o",
                 str(tmp_path / "x")]) == 2
    assert main(["pretrain-prompt", str(model_dir), "--text", text, "--examples", "0", "-o",
                 str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
