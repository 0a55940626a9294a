"""Instruction tuning (peftsurgery/sft.py, `peftsurgery sft`): only response tokens (and the end of sequence)
are trained, the loss is transformers' own on those labels, training lowers it, chat rows train the assistant's
text only, and every mistake is one line."""
import json

import pytest
import torch
import transformers as tf
from test_train import tokenizer as word_tokenizer

from conftest import raises_one_line
from peftsurgery import apply
from peftsurgery.cli import main
from peftsurgery.sft import InstructionTask, held_out_loss, read_sft
from peftsurgery.train import fit

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROWS = [{"instruction": "Review the film", "response": "good acting very good"},
        {"instruction": "Review the plot", "input": "the story", "response": "awful dull plot"},
        {"instruction": "Review the movie", "response": "lovely fine film"}]


def tokenizer():
    tok = word_tokenizer()
    tok.add_special_tokens({"eos_token": "</s>", "additional_special_tokens": [
        "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    tok.chat_template = CHAT
    return tok


def model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=1, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).eval()


def test_only_the_response_and_the_end_are_trained():
    tok = tokenizer()
    t = InstructionTask(tok)
    ids, labels = t.tokens(ROWS[1])
    prompt = tok.encode("Review the plot\n\nthe story\n\n")
    response = tok.encode("awful dull plot", add_special_tokens=False)
    assert ids == prompt + response + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + response + [tok.eos_token_id]
    ids, labels = InstructionTask(tok, chat=True).tokens(ROWS[0])
    head = tok.encode("<|user|>Review the film<|end|><|assistant|>", add_special_tokens=False)
    assert ids[:len(head)] == head and labels[:len(head)] == [-100] * len(head)
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Review the film"},
                         {"role": "assistant", "content": "good"}, {"role": "user", "content": "and the plot"},
                         {"role": "assistant", "content": "dull"}]}
    ids, labels = t.tokens(chat)
    trained = [i for i, x in zip(ids, labels) if x != -100]
    assert trained == tok.encode("good<|end|>dull<|end|></s>", add_special_tokens=False)
    assert tok.decode(ids) == tok.decode(tok.encode(tok.apply_chat_template(chat["messages"], tokenize=False)
                                                    + "</s>", add_special_tokens=False))


def test_the_loss_is_transformers_own_on_those_labels_and_training_lowers_it():
    m, t = model(), InstructionTask(tokenizer())
    batch = t.encode(ROWS)
    with torch.no_grad():
        want = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        torch.testing.assert_close(t.loss(m, ROWS), want, atol=1e-6, rtol=1e-6)
    before = held_out_loss(m, t, ROWS)
    apply(m, "lora", r=4, targets="attn.q,attn.v,mlp.down")
    fit(m, t, ROWS * 4, epochs=10, batch_size=4, lr=2e-2)
    assert held_out_loss(m, t, ROWS) < before - 0.3   # 3.38 -> 2.85 here


MESSAGES = {"messages": [{"role": "assistant", "content": "good film"}, {"role": "user", "content": "and"},
                         {"role": "assistant", "content": "lovely"}]}   # opens with a trained turn


def gpt2(impl):
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tokenizer()), n_embd=32, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=0, attn_implementation=impl)).eval()


def qwen2(impl):
    torch.manual_seed(0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              attn_implementation=impl)).eval()


@pytest.mark.parametrize("build", [lambda: model(), lambda: gpt2("sdpa"), lambda: gpt2("eager"),
                                   lambda: qwen2("eager")], ids=["llama", "gpt2", "gpt2-eager", "qwen2-eager"])
def test_packing_gives_the_unpacked_loss_and_gradients_in_fewer_sequences(build):
    rows = ROWS * 2 + [MESSAGES]
    packed, plain = InstructionTask(tokenizer(), 40, packing=True), InstructionTask(tokenizer(), 40)
    batch = packed.encode(rows)
    assert batch["input_ids"].shape[0] < len(rows) and batch["input_ids"].shape[1] <= 40   # 7 rows in 3 here
    assert int((batch["labels"] != -100).sum()) == sum(sum(x != -100 for x in lab[1:])
                                                       for lab in (plain.tokens(r)[1] for r in rows))
    grads = []
    for t in (packed, plain):
        m = apply(build(), "lora", r=4, targets="attn.q,attn.v")
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)    # B != 0: the adapter acts, so its gradients mean something
        loss = t.loss(m, rows)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert packed.checked is not None   # the first batch was checked both ways
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class Unmasked(tf.LlamaForCausalLM):
    """A model that drops the attention mask: packed rows would see each other."""
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
        return super().forward(input_ids=input_ids, position_ids=position_ids, **kw)


def test_packing_refuses_a_model_that_mixes_the_rows():
    torch.manual_seed(0)
    m = Unmasked(model().config).eval()
    raises_one_line(lambda: InstructionTask(tokenizer(), 64, packing=True).loss(m, ROWS), "mixes packed rows",
                    "leave --packing out")
    task = InstructionTask(tokenizer(), 64, packing=True)
    task.loss(model(), ROWS)                       # checked on a model that keeps rows apart ...
    raises_one_line(lambda: task.loss(m, ROWS), "mixes packed rows")   # ... and again on another one
    prompt = apply(model(), "prompt-tuning", num_tokens=3, init="random")   # its tokens widen every sequence
    raises_one_line(lambda: InstructionTask(tokenizer(), 64, packing=True).loss(prompt, ROWS), "cannot run packed",
                    "leave --packing out")
    same = model()
    task.loss(same, ROWS)                          # checked on this model as it is ...
    apply(same, "prompt-tuning", num_tokens=3, init="random")
    raises_one_line(lambda: task.loss(same, ROWS), "cannot run packed")   # ... and again once an adapter is added
    prefix = apply(model(), "prefix-tuning", num_tokens=3, init="random")   # its keys are every row's: packs
    torch.testing.assert_close(InstructionTask(tokenizer(), 64, packing=True).loss(prefix, ROWS),
                               InstructionTask(tokenizer(), 64).loss(prefix, ROWS), atol=1e-5, rtol=1e-5)


def test_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for text, needle in [('{"instruction": "x"}\n', "needs instruction and response"), ("nope\n", "is not JSON"),
                         ('{"messages": [{"role": "user", "content": "x"}]}\n', "assistant turn"), ("\n", "no rows")]:
        bad.write_text(text)
        raises_one_line(lambda: read_sft(str(bad)), needle)
    raises_one_line(lambda: read_sft(str(tmp_path / "none.jsonl")), "is not a file")
    raises_one_line(lambda: InstructionTask(tokenizer(), max_length=3).tokens(ROWS[1]), "leaves no response token")
    raises_one_line(lambda: InstructionTask(word_tokenizer(), chat=True), "no chat template")
    raises_one_line(lambda: InstructionTask(word_tokenizer()).tokens(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}), "chat template")


@pytest.mark.parametrize("chat", [False, True])
def test_cli(tmp_path, capsys, chat):
    path = tmp_path / "model"
    model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 3))
    out = tmp_path / "adapter"
    assert main(["sft", str(path), "--plugin", "lora", "--data", str(data), "--eval-data", str(data), "--epochs", "1",
                 "--batch-size", "3", "--samples", "2", "--new-tokens", "4", "--quiet", "--json", "-o", str(out),
                 *(["--chat", "--packing"] if chat else [])]) == 0
    printed = capsys.readouterr().out
    assert printed.count("generated:") == 2 and "held_out_loss" in printed
    record = json.loads((out / "sft.json").read_text())
    assert record["results"]["steps"] == 3 and len(record["samples"]) == 2 and (out / "adapter.safetensors").exists()
    assert record["packing"] is chat
    assert main(["sft", str(path), "--plugin", "lora", "--data", str(tmp_path / "missing.jsonl"), "-o",
                 str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
