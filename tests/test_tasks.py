"""The task layer (peftsurgery.tasks): templates, verbalizers and scoring for causal, masked and encoder-decoder
models, checked against references computed here one example at a time from the model's raw outputs; tiny random
models and word-level tokenizers built in the test (no download)."""
import inspect
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from conftest import raises_one_line
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import peftsurgery
from peftsurgery.cli import main
from peftsurgery.tasks import Task, Template, Verbalizer, soft_tokens_of
from peftsurgery.train import Example, evaluate, fit, loss_of, read_examples, write_jsonl

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "film", "was", "plot", "acting", "very", "quite", "a", "movie", "story", "it", "."]
WORDS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "</s>", "Review", "Sentiment", "Question", ":", "positive",
         "negative", *GOOD, *BAD, *FILLER]
ID = {w: i for i, w in enumerate(WORDS)}


def tokenizer(wrap: str | None = None, mask: bool = True):
    """Word-level; wrap "bert" adds [CLS] ... [SEP], "t5" adds </s>; mask=False: no mask token."""
    tok = Tokenizer(models.WordLevel(dict(ID), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if wrap == "bert":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    elif wrap == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 5)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                      mask_token="[MASK]" if mask else None, cls_token="[CLS]", sep_token="[SEP]",
                                      eos_token="</s>")


def llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1, attn_implementation="sdpa")).eval()


def gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            pad_token_id=1)).eval()


def bert():
    torch.manual_seed(0)
    return tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=1, attn_implementation="sdpa")).eval()


def t5():
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=1, eos_token_id=5, decoder_start_token_id=1, attn_implementation="sdpa")).eval()


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda pool: pool[int(torch.randint(0, len(pool), (1,), generator=g))]
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [pick(FILLER[:10]) for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
        words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=g)), pick(GOOD if label == "pos" else BAD))
        out.append(Example(" ".join(words), label))
    return out


CAUSAL = "Review: {text}\nSentiment:"
MASKED = "{text} it was {answer} ."
MULTI = {"pos": [" good", " very good"], "neg": [" bad", " quite bad"]}   # several words, two of two tokens


# ---- references: one example alone, from the model's raw outputs --------------------------------------------------

def render(template, e, answer=""):
    return template.replace("{text}", e.text).replace("{text_b}", e.text_b or "").replace("{answer}", answer)


def word_scores(kind, model, tok, template, e, words, score="sum", single=False):
    """Each word's score for example e: sum (or mean) of its tokens' log-probabilities; with `single` (every word
    of the verbalizer one token), its logit instead."""
    ids = [tok.encode(w, add_special_tokens=False) for w in words]
    out = []
    with torch.no_grad():
        for w in ids:
            if kind == "causal":
                prompt = tok.encode(render(template, e))
                logits = model(input_ids=torch.tensor([prompt + w[:-1]])).logits[0]
                rows = [len(prompt) - 1 + k for k in range(len(w))]
            elif kind == "masked":
                seq = tok.encode(render(template, e, tok.mask_token * len(w)))
                logits = model(input_ids=torch.tensor([seq])).logits[0]
                rows = [i for i, t in enumerate(seq) if t == tok.mask_token_id]
                assert len(rows) == len(w)
            else:
                enc, start = tok.encode(render(template, e)), model.config.decoder_start_token_id
                dec = torch.tensor([[start] + w[:-1]])
                logits = model(input_ids=torch.tensor([enc]), decoder_input_ids=dec).logits[0]
                rows = list(range(len(w)))
            vals = [(logits[r] if single else logits[r].log_softmax(-1))[t] for r, t in zip(rows, w)]
            s = sum(vals)
            out.append(s / len(w) if score == "mean" else s)
    return torch.stack(out)


def label_scores(kind, model, tok, template, e, words: dict, score="sum", combine="mean"):
    words = {lab: [ws] if isinstance(ws, str) else ws for lab, ws in words.items()}
    single = all(len(tok.encode(w, add_special_tokens=False)) == 1 for ws in words.values() for w in ws)
    out = []
    for lab, ws in words.items():
        s = word_scores(kind, model, tok, template, e, ws, score, single)
        out.append(s.mean() if combine == "mean" else s.exp().sum().log())
    return torch.stack(out)


# ---- templates ------------------------------------------------------------------------------------------------------

def test_template_parts_and_errors():
    t = Template("{soft:2}Q: {text}{soft} and {text_b}? {answer} {x")
    assert t.parts == [("soft", 2), ("lit", "Q: "), ("field", "text"), ("soft", 1), ("lit", " and "),
                       ("field", "text_b"), ("lit", "? "), ("answer", None), ("lit", " {x")]
    assert t.fields == ("text", "text_b") and t.soft == 3 and not t.answer_last
    assert Template("{text}:").parts[-1] == ("answer", None)   # no {answer}: at the end
    raises_one_line(lambda: Template("{txt} x"), "unknown placeholder {txt}")
    raises_one_line(lambda: Template("Review:"), "no {text} placeholder")
    raises_one_line(lambda: Template("{text}{answer}{answer}"), "2 {answer} slots")
    raises_one_line(lambda: Template("{text}{soft:0}"), "at least one soft token")
    raises_one_line(lambda: Template("{text:2}"), "only {soft:N} takes a count")
    v = Verbalizer(["pos", "neg"])
    raises_one_line(lambda: Task(tokenizer(), "{text} {answer} film", v), "{answer} must end the template")
    raises_one_line(lambda: Task(tokenizer(), "{text} {answer} film", v, kind="seq2seq"), "must end the template")
    raises_one_line(lambda: Task(tokenizer(), CAUSAL, v, kind="decoder"), "unknown model kind 'decoder'")
    raises_one_line(lambda: Task(tokenizer(), CAUSAL, v, padding_side="middle"), "unknown padding side")


def test_verbalizer_errors():
    raises_one_line(lambda: Verbalizer(["pos"], {"neutral": " the"}), "'neutral', which is not a label")
    raises_one_line(lambda: Verbalizer(["pos"], {"pos": []}), "needs non-empty words")
    raises_one_line(lambda: Verbalizer(["pos"], score="max"), "unknown verbalizer score 'max'")
    raises_one_line(lambda: Verbalizer(["pos"], combine="sum"), "unknown verbalizer combine 'sum'")
    raises_one_line(lambda: Verbalizer(["a", "a"]), "distinct")
    same = Verbalizer(["pos", "neg"], {"pos": [" good", " fine"], "neg": " fine"})
    raises_one_line(lambda: Task(tokenizer(), CAUSAL, same), "labels 'pos' and 'neg' have the same word tokens")
    raises_one_line(lambda: Task(tokenizer(), MASKED, Verbalizer(["pos"], {"pos": " "})), "needs non-empty words")
    assert Verbalizer(["pos", "neg"], {"pos": [" good", " fine"]}).to_json()["words"] == {
        "pos": [" good", " fine"], "neg": " neg"}


def test_rendering_owners_soft_positions_and_pairs():
    tok = tokenizer("bert")
    task = Task(tok, "{soft:2}Question: {text}{soft} {text_b} it was {answer} .", Verbalizer(["pos"], {"pos": " good"}),
                kind="masked")
    b = task.encode([Example("good film", "pos", "the plot"), Example("bad", "pos", "a")])
    S, M, P, C = ID["[SEP]"], ID["[MASK]"], ID["[PAD]"], ID["[CLS]"]
    row0 = [C, P, P, ID["Question"], ID[":"], ID["good"], ID["film"], P, ID["the"], ID["plot"], ID["it"], ID["was"], M,
            ID["."], S]
    row1 = [P, P, C, P, P, ID["Question"], ID[":"], ID["bad"], P, ID["a"], ID["it"], ID["was"], M, ID["."], S]
    assert b.input_ids.tolist() == [row0, row1]
    assert b.attention_mask.tolist() == [[1] * 15, [0, 0] + [1] * 13]
    assert b.soft_positions() == [[1, 2, 7], [3, 4, 8]]
    assert b.pos.tolist() == [12, 12] and b.tok.tolist() == [ID["good"]] * 2 and b.targets.tolist() == [0, 0]
    raises_one_line(lambda: task.encode([Example("good", "pos")]), "an example has no text_b")


class Spaces:
    """A tokenizer without offsets (not `is_fast`): whitespace words and their ids, nothing else."""
    is_fast = False
    pad_token_id = ID["[PAD]"]

    def encode(self, text, add_special_tokens=True):
        return [ID.get(w, 0) for w in text.replace(":", " : ").split()]


def test_a_tokenizer_without_offsets_tokenizes_each_segment():
    task = Task(Spaces(), CAUSAL, Verbalizer(["pos", "neg"], {"pos": " positive", "neg": " negative"}),
                max_length=7)
    b = task.encode([Example("the film was very good", "pos")])
    assert b.input_ids.tolist() == [[ID[w] for w in ["Review", ":", "the", "film", "was", "Sentiment", ":"]]]


def bpe():
    """A byte-level BPE (GPT-2 style: a word's leading space is part of its token), trained here on a few lines."""
    from tokenizers import decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["Review: the film was very good\nSentiment: positive", "Review: a dull plot\nSentiment: negative"] * 5
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_bpe_tokens_are_those_of_the_whole_text_and_truncation_keeps_the_template():
    tok = bpe()
    task = Task(tok, CAUSAL, Verbalizer(["pos", "neg"], {"pos": " positive", "neg": " negative"}))
    e = Example("the film was very good", "pos")
    whole = tok.encode(CAUSAL.replace("{text}", e.text))
    assert tok.convert_ids_to_tokens(whole)[:3] == ["Review", ":", "Ġthe"]   # the space rides on the word
    assert all(len(ids) == 1 for ids in task.words)   # one sequence per row: the prompt alone
    assert task.encode([e]).input_ids.tolist() == [whole]
    short = tok.encode(CAUSAL.replace("{text}", "the film"))
    task = Task(tok, CAUSAL, task.verbalizer, max_length=len(short))
    assert task.encode([e]).input_ids.tolist() == [short]


def test_a_causal_word_is_read_as_the_text_goes_on_after_the_template():
    """After "Sentiment:" a word keeps its leading space; after white space (a template ending in a newline, a chat's
    assistant turn, a trailing space) it loses it: prompt ids and word ids decode to the rendered text, and where the
    text's ids start with the prompt's, the word's are the rest."""
    tok = bpe()
    v = Verbalizer(["pos", "neg"], {"pos": " positive", "neg": " negative"})
    e = Example("the film was very good", "pos")
    for template in (CAUSAL, "Review: {text}\nSentiment:\n", "Review: {text}\nSentiment: "):
        task = Task(tok, template, v)
        prompt, whole = tok.encode(task.render(e)), tok.encode(task.render(e, " positive"))
        assert tok.decode(prompt + list(task.words[0])) == task.render(e, " positive"), template
        assert whole[:len(prompt)] != prompt or task.words[0] == tuple(whole[len(prompt):]), template
    assert Task(tok, CAUSAL, v).words[0] == tuple(tok.encode(" positive"))
    assert Task(tok, "Review: {text}\nSentiment:\n", v).words[0] == tuple(tok.encode("positive"))
    assert Task(tok, "Review: {text}\nSentiment: ", v).words[0] == tuple(tok.encode("positive"))
    chat = bpe()
    chat.chat_template = "{% for m in messages %}{{ 'User: ' + m['content'] + '\\n' }}{% endfor %}{{ 'Assistant:\\n' }}"
    assert Task(chat, "{text}", v, chat=True).words[0] == tuple(tok.encode("positive"))
    # a field right before the answer: its trailing white space goes, so the word reads the same after any text
    task = Task(tok, "Review: {text}", v)
    for text in ("a dull plot", "a dull plot ", "a dull plot\n"):
        e = Example(text, "neg")
        assert task.render(e, " negative") == "Review: a dull plot negative"
        assert task.encode([e]).input_ids.tolist() == [tok.encode("Review: a dull plot")]
    assert task.words[1] == tuple(tok.encode(" negative"))


def test_truncation_cuts_fields_longest_first_never_the_template():
    v = Verbalizer(["pos"], {"pos": " good"})
    pair = Example("the film was very good", "pos", "a plot")   # 5 and 2 tokens
    t = Task(tokenizer(), "{text} Question {text_b} :", v, max_length=6)
    # 2 template tokens leave 4: cut the longer field first (5,2)->(4,2)->(3,2)->(2,2)
    assert t.encode([pair]).input_ids.tolist() == [[ID[w] for w in ["the", "film", "Question", "a", "plot", ":"]]]
    t = Task(tokenizer(), "{text} Question {text_b} :", v, max_length=5)   # (2,2) -> (1,2): ties cut the first
    assert t.encode([pair]).input_ids.tolist() == [[ID[w] for w in ["the", "Question", "a", "plot", ":"]]]
    # multi-token words: a causal row leaves room for the longest word's tokens but the last
    t = Task(tokenizer(), CAUSAL, Verbalizer(["pos", "neg"], MULTI), max_length=7)
    b = t.encode([Example("the film was very good", "pos")])
    kept = [ID[w] for w in ["Review", ":", "the", "film", "Sentiment", ":"]]
    assert b.input_ids[b.seq[b.pair == 1][0]].tolist() == kept + [ID["very"]]   # " very good" read after "very"
    # a masked row keeps the same text for every mask count, sized for the most masks (7 fixed tokens of 9)
    t = Task(tokenizer("bert"), MASKED, Verbalizer(["pos", "neg"], MULTI), kind="masked", max_length=9)
    b = t.encode([Example("the film was very good", "pos")])
    C, S, M = ID["[CLS]"], ID["[SEP]"], ID["[MASK]"]
    text = [ID["the"], ID["film"]]
    assert b.input_ids.tolist() == [[1, C, *text, ID["it"], ID["was"], M, ID["."], S],
                                    [C, *text, ID["it"], ID["was"], M, M, ID["."], S]]
    t = Task(tokenizer(), "Review Sentiment : {text}", v, max_length=3)   # room for the template alone
    assert t.encode([pair]).input_ids.tolist() == [[ID["Review"], ID["Sentiment"], ID[":"]]]
    t = Task(tokenizer(), "Review Sentiment : {text}", v, max_length=2)
    raises_one_line(lambda: t.encode([pair]), "takes 3 tokens, more than max_length 2")


# ---- scoring --------------------------------------------------------------------------------------------------------

def old_cloze_scores(model, tok, template, texts, word_ids):
    """How the task layer's predecessor (train.Cloze) scored: the whole prompt tokenized at once, cut to its last
    256 tokens, left-padded, positions counting real tokens, the label words' logits at the last position."""
    seqs = [list(tok.encode(template.replace("{text}", t)))[-256:] for t in texts]
    n = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[:, -1, word_ids].float()


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_one_token_causal_scores_exactly_as_before(factory):
    model, tok = factory(), tokenizer()
    peftsurgery.apply(model, "lora", r=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()                     # a LoRA update that changes the logits
    exs = examples(7)
    task = Task(tok, CAUSAL, Verbalizer(["neg", "pos"], {"pos": " positive", "neg": " negative"}))
    with torch.no_grad():
        new = task.scores(model, task.encode(exs))
        old = old_cloze_scores(model, tok, CAUSAL, [e.text for e in exs], [ID["negative"], ID["positive"]])
    assert torch.equal(new, old)


CASES = [  # kind, factory, template, tokenizer wrap
    ("causal", llama, CAUSAL, None),
    ("causal", gpt2, CAUSAL, None),
    ("masked", bert, MASKED, "bert"),
    ("seq2seq", t5, "Review: {text} Sentiment:", "t5"),
]


@pytest.mark.parametrize("kind,factory,template,wrap", CASES, ids=[f"{c[0]}-{c[1].__name__}" for c in CASES])
@pytest.mark.parametrize("words,score,combine", [
    ({"pos": " positive", "neg": " negative"}, "sum", "mean"),        # one one-token word per label: logits
    ({"pos": [" good", " great"], "neg": [" bad", " poor"]}, "sum", "logsumexp"),
    (MULTI, "sum", "mean"),
    (MULTI, "mean", "logsumexp"),
    ({"pos": [" good", " very good"], "neg": " bad"}, "sum", "mean"),   # a one-token label beside multi-token ones
], ids=["one-token", "several-one-token", "multi-sum-mean", "multi-mean-logsumexp", "mixed"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_match_each_example_alone(kind, factory, template, wrap, words, score, combine, side):
    model, tok = factory(), tokenizer(wrap)
    task = Task(tok, template, Verbalizer(["pos", "neg"], words, score, combine), kind=kind, padding_side=side)
    exs = examples(5, seed=3)
    b = task.encode(exs)
    assert (b.attention_mask[:, -1 if side == "left" else 0] == 1).all()
    assert bool((b.attention_mask == 0).any())   # rows of different lengths: padding on that side
    with torch.no_grad():
        got = task.scores(model, b)
    want = torch.stack([label_scores(kind, model, tok, template, e, words, score, combine) for e in exs])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_hand_computed_verbalizer_arithmetic():
    """Scores of a stand-in causal LM whose log-probabilities are known: combine and score on numbers."""
    tok = tokenizer()
    table = torch.full((len(WORDS),), -10.0)
    table[[ID["good"], ID["very"], ID["bad"]]] = torch.tensor([-1.0, -2.0, -3.0])

    class Fixed(torch.nn.Module):   # the same distribution at every position: log p = table (normalised below)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None):
            return (table + self.w).expand(*input_ids.shape, -1)

    lse = float(table.logsumexp(-1))   # log p(t) = table[t] - lse
    lp = {w: float(table[ID[w]]) - lse for w in ("good", "very", "bad", "quite")}
    e = [Example("film", "pos")]
    for score, combine, pos in [
        ("sum", "mean", (lp["good"] + lp["very"] + lp["good"]) / 2),
        ("mean", "mean", (lp["good"] + (lp["very"] + lp["good"]) / 2) / 2),
        ("sum", "logsumexp", torch.tensor([lp["good"], lp["very"] + lp["good"]]).logsumexp(0).item()),
    ]:
        task = Task(tok, CAUSAL, Verbalizer(["pos", "neg"], MULTI, score, combine))
        s = task.scores(Fixed(), task.encode(e))[0]
        assert s[0].item() == pytest.approx(pos, abs=1e-5)
    task = Task(tok, CAUSAL, Verbalizer(["pos", "neg"], {"pos": " good", "neg": " bad"}))
    assert task.scores(Fixed(), task.encode(e))[0].tolist() == [-1.0, -3.0]   # one token each: the logits


def test_kind_mismatch_and_missing_logits_are_errors():
    v = Verbalizer(["pos", "neg"], {"pos": " positive", "neg": " negative"})
    task = Task(tokenizer(), CAUSAL, v)
    raises_one_line(lambda: task.scores(bert(), task.encode(examples(2))), "is for a causal model but the model is "
                    "masked", "--model-kind masked")
    masked = Task(tokenizer(), MASKED, v, kind="masked")
    raises_one_line(lambda: masked.scores(tf.BertModel(bert().config).eval(), masked.encode(examples(2))),
                    "gives no logits")
    raises_one_line(lambda: Task(tokenizer(mask=False), MASKED, v, kind="masked"), "needs a tokenizer with a mask")
    raises_one_line(lambda: Task(None, MASKED, v), "needs the model's tokenizer")


class Recorder(torch.nn.Module):
    """Wraps a model; records the soft-token mask visible while it runs."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.seen.append(soft_tokens_of(self))
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_soft_tokens_need_a_method_that_fills_them_and_are_exposed_to_it():
    task = Task(tokenizer(), "{soft:2}" + CAUSAL, Verbalizer(["pos", "neg"], {"pos": " positive", "neg": " negative"}))
    model = Recorder(llama())
    b = task.encode(examples(3))
    raises_one_line(lambda: task.scores(model, b), "no active method fills them")
    peftsurgery.apply(model.inner, "lora", r=2)   # an adapter whose rules do not fill soft tokens: still refused
    model.__dict__["_peftsurgery_adapters"] = peftsurgery.adapters(model.inner)
    raises_one_line(lambda: task.scores(model, b), "no active method fills them")
    filler = SimpleNamespace(switch=SimpleNamespace(on=True),
                             records=[SimpleNamespace(rule=SimpleNamespace(fills_soft_tokens=True))])
    model.__dict__["_peftsurgery_adapters"] = {"p": filler}   # a rule declaring it fills them
    with torch.no_grad():
        task.scores(model, b)
    assert torch.equal(model.seen[-1], b.soft) and soft_tokens_of(model) is None
    L = b.input_ids.shape[1]   # left padding, no special tokens: the two soft tokens open each row
    assert b.soft_positions() == [[L - n, L - n + 1] for n in b.attention_mask.sum(1).tolist()]
    filler.switch.on = False
    raises_one_line(lambda: task.scores(model, b), "no active method fills them")


# ---- end to end ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,factory,template,wrap", CASES[::2] + CASES[3:], ids=["causal", "masked", "seq2seq"])
def test_each_pipeline_trains_and_evaluates(kind, factory, template, wrap):
    model, tok = factory(), tokenizer(wrap)
    words = {"pos": [" good", " very good"], "neg": " bad"}
    task = Task(tok, template, Verbalizer(["neg", "pos"], words), kind=kind)
    peftsurgery.apply(model, "lora", r=4, targets="all-linear")
    train = examples(32)
    with torch.no_grad():
        before = float(loss_of(model, task, train))
    fit(model, task, train, epochs=3, batch_size=8, lr=1e-2, seed=0)
    with torch.no_grad():
        after = float(loss_of(model, task, train))
        right = sum(int(label_scores(kind, model, tok, template, e, {"neg": words["neg"], "pos": words["pos"]})
                        .argmax()) == ["neg", "pos"].index(e.label) for e in train)
    assert after < before - 0.05, (before, after)
    assert evaluate(model, task, train, batch_size=5) == right / len(train)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for name, factory, wrap in [("causal", llama, None), ("masked", bert, "bert")]:
        factory().save_pretrained(root / name)
        tokenizer(wrap).save_pretrained(root / name)
    exs = examples(48)
    write_jsonl(exs[:32], str(root / "train.jsonl"))
    write_jsonl(exs[32:], str(root / "test.jsonl"))
    return root


def _json(capsys, row=-1):
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[row]), err


def test_cli_masked_lm_with_several_multi_token_words(folders, tmp_path, capsys):
    test = read_examples(str(folders / "test.jsonl"))
    labels = ["--label", "pos=good|very good", "--label", "neg=bad", "--verbalizer-combine", "logsumexp"]
    code = main(["train", str(folders / "masked"), "--plugin", "lora", "--data", str(folders / "train.jsonl"),
                 "--eval-data", str(folders / "test.jsonl"), "--template", MASKED, *labels, "--padding-side", "right",
                 "--epochs", "1", "--lr", "1e-2", "--quiet", "--json", "-o", str(tmp_path / "ad")])
    row, err = _json(capsys, -2)
    assert code == 0, err
    saved = json.load(open(tmp_path / "ad" / "train.json"))
    assert (saved["kind"], saved["template"], saved["combine"], saved["score"], saved["padding_side"]) == (
        "masked", MASKED, "logsumexp", "sum", "right")
    assert saved["words"] == {"pos": [" good", " very good"], "neg": " bad"} and saved["labels"] == ["neg", "pos"]
    trained = peftsurgery.load(bert(), str(tmp_path / "ad"))
    words = {"neg": " bad", "pos": [" good", " very good"]}
    right = sum(int(label_scores("masked", trained, tokenizer("bert"), MASKED, e, words, combine="logsumexp")
                    .argmax()) == ["neg", "pos"].index(e.label) for e in test)
    assert row["accuracy"] == right / len(test)
    assert main(["eval", str(folders / "masked"), "--adapter", str(tmp_path / "ad"), "--data",
                 str(folders / "test.jsonl"), "--quiet", "--json"]) == 0   # the task read back from train.json
    assert _json(capsys)[0]["accuracy"] == row["accuracy"]


def test_cli_eval_reads_an_adapter_saved_before_the_task_layer(folders, tmp_path, capsys):
    """train.json of old (template, labels, one word per label, max_length): same task, same accuracy."""
    args = ["--template", CAUSAL.replace("\n", "\\n"), "--label", "pos=positive", "--label", "neg=negative"]
    assert main(["train", str(folders / "causal"), "--plugin", "lora", "--data", str(folders / "train.jsonl"),
                 "--eval-data", str(folders / "test.jsonl"), *args, "--epochs", "1", "--lr", "1e-2", "--quiet",
                 "--json", "-o", str(tmp_path / "ad")]) == 0
    row, _ = _json(capsys, -2)
    shutil.copytree(tmp_path / "ad", tmp_path / "old")
    new = json.load(open(tmp_path / "ad" / "train.json"))
    old = {k: new[k] for k in ("template", "labels", "words", "max_length", "results")}
    json.dump(old, open(tmp_path / "old" / "train.json", "w"))
    assert main(["eval", str(folders / "causal"), "--adapter", str(tmp_path / "old"), "--data",
                 str(folders / "test.jsonl"), "--quiet", "--json"]) == 0
    assert _json(capsys)[0]["accuracy"] == row["accuracy"]


@pytest.mark.parametrize("argv,message", [
    (["--template", "{{text}} {{answer}} ."], "a causal model writes the answer after the whole input"),
    (["--template", "{{txt}}"], "unknown placeholder {txt}"),
    (["--model-kind", "masked", "--template", "{{text}} it was {{answer}} ."], "but the model is causal"),
    (["--verbalizer-score", "max"], "invalid choice: 'max'"),
    (["--max-length", "1"], "more than max_length 1"),
])
def test_cli_task_errors_are_one_line(folders, capsys, argv, message):
    code = main(["eval", str(folders / "causal"), "--data", str(folders / "test.jsonl"), "--label", "pos=positive",
                 "--label", "neg=negative", "--quiet", *[a.format() for a in argv]])
    err = capsys.readouterr()[1]
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
