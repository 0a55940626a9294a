"""The peer on the same split: Hugging Face PEFT's version of one method, trained and scored by the very loop
that `peftsurgery train` uses (peftsurgery.train: same prompts, label words, batches, seed, AdamW, learning
rate), so the only difference is whose method code runs. examples/sentiment.py --peer calls it once
per method; by hand:

    python examples/sentiment_peft.py lora SmolLM2-135M-Instruct.Q4_1.gguf --dir results/sentiment --lr 5e-4

Prints one JSON line: accuracy on DIR/test.jsonl after training on DIR/train.jsonl, trainable parameters,
median seconds per step, peak memory. Needs peft==0.21.2 (requirements-test.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from peftsurgery import SurgeryError
from peftsurgery.tasks import Task, Template, Verbalizer
from peftsurgery.train import evaluate, fit, read_examples
from peftsurgery.zoo import gguf_folder
from sentiment import INIT_TEXT, PEER, TEMPLATE, TEMPLATES, WORDS


def peft_model(name: str, folder: str, device: str, seed: int, steps: int | None = None):
    """PEFT's method under the settings of examples/sentiment.py (its defaults where we have no counterpart:
    prefix tuning's N(0,1) prefix), loaded as a PEFT user would: qlora loads the base 4-bit NF4 directly through
    transformers, never as floats. adalora needs `steps`, the optimizer steps of the run (its total_step)."""
    import peft
    import transformers as tf
    causal = peft.TaskType.CAUSAL_LM
    q = None
    if name == "lora":
        cfg = peft.LoraConfig(task_type=causal, r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"])
    elif name == "dora":
        cfg = peft.LoraConfig(task_type=causal, r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"], use_dora=True)
    elif name == "ia3":   # ours: attn.k, attn.v (outputs) and mlp.down (input)
        cfg = peft.IA3Config(task_type=causal, target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"])
    elif name == "adalora":   # the adalora plugin's defaults, by PEFT's names
        if not steps:
            raise SurgeryError("adalora needs the run's optimizer steps (its total_step)")
        cfg = peft.AdaLoraConfig(task_type=causal, init_r=12, target_r=8, tinit=0, tfinal=0, deltaT=1, beta1=0.85,
                                 beta2=0.85, orth_reg_weight=0.1, lora_alpha=16, lora_dropout=0.0,
                                 target_modules=["q_proj", "v_proj"], total_step=steps)
    elif name == "qlora":
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
        cfg = peft.LoraConfig(task_type=causal, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    elif name == "prompt-tuning":
        cfg = peft.PromptTuningConfig(task_type=causal, num_virtual_tokens=20,
                                      prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=folder)
    elif name == "p-tuning":   # PEFT's P-tuning: as many virtual tokens as our hybrid template's soft tokens, all in
        # front of TEMPLATE (its anchors); its LSTM + MLP encoder with the shapes of ours (LSTM width per direction:
        # half the model's); PEFT's own initial values
        width = tf.AutoConfig.from_pretrained(folder).hidden_size
        cfg = peft.PromptEncoderConfig(task_type=causal, num_virtual_tokens=Template(TEMPLATES[name]).soft,
                                       encoder_reparameterization_type="LSTM", encoder_hidden_size=width // 2)
    else:
        cfg = peft.PrefixTuningConfig(task_type=causal, num_virtual_tokens=20)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32,
                                                    device_map=device)
    torch.manual_seed(seed)   # PEFT's initial values, as `peftsurgery train --seed` seeds ours
    model = peft.get_peft_model(model, cfg)
    if name == "adalora":
        adalora_calls(model, steps)
    return model, tf.AutoTokenizer.from_pretrained(folder)


def adalora_calls(model, steps: int) -> None:
    """What PEFT asks of an AdaLoRA training loop, done under the shared loop (which calls only peftsurgery's
    hooks): PEFT's orthogonality term, which its AdaLoraModel.forward adds to `outputs.loss` (so the inner model
    reports a zero loss while training for it to add to; the cloze loss reads only the logits), back-propagated
    before each optimizer step (the gradients add up as for loss + term), and
    `base_model.update_and_allocate(step)` after each step, before zero_grad, step counting 1..steps as
    peftsurgery.step does. The optimizer hooks remove themselves after the run's last step."""
    inner, terms, done = model.base_model.model, [], [0]
    plain = inner.forward

    def forward(*args, **kwargs):
        out = plain(*args, **kwargs)
        if inner.training and out.get("loss") is None:
            out["loss"] = out.logits.new_zeros(())
        return out
    inner.forward = forward
    model.base_model.register_forward_hook(
        lambda module, args, out: terms.append(out.loss) if module.training and out.get("loss") is not None else None)
    ours = {id(p) for p in model.parameters() if p.requires_grad}

    def mine(opt):
        return any(id(p) in ours for g in opt.param_groups for p in g["params"])

    def before(opt, args, kwargs):
        if mine(opt) and terms:
            sum(terms).backward()
            terms.clear()

    def after(opt, args, kwargs):
        if not mine(opt):
            return
        done[0] += 1
        model.base_model.update_and_allocate(done[0])
        if done[0] == steps:
            hooks[0].remove()
            hooks[1].remove()
    hooks = (register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=PEER)
    p.add_argument("model", help="a .gguf file (converted once, as peftsurgery does) or an HF folder")
    p.add_argument("--dir", required=True, help="folder holding train.jsonl and test.jsonl")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = read_examples(os.path.join(args.dir, "train.jsonl"))
    test = read_examples(os.path.join(args.dir, "test.jsonl"))
    folder = gguf_folder(args.model) if args.model.endswith(".gguf") else args.model
    epochs, batch = 3, 16
    model, tokenizer = peft_model(args.method, folder, args.device, args.seed,
                                  steps=epochs * -(-len(train) // batch))
    task = Task(tokenizer, TEMPLATE.replace("\\n", "\n"), Verbalizer(sorted(WORDS), WORDS))  # labels sorted, as the CLI
    result = fit(model, task, train, epochs, batch, args.lr, args.seed, progress=True, desc=f"train PEFT {args.method}")
    row = {"method": args.method, "lr": args.lr,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "median_s_per_step": round(result["median_step_seconds"], 3),
           "peak_memory_mb": round(result["peak_memory_bytes"] / 2**20),
           "accuracy": evaluate(model, task, test, 32, progress=True)}
    print(json.dumps(row))


if __name__ == "__main__":
    try:
        main()
    except SurgeryError as e:
        sys.exit(f"sentiment_peft: {e}")
