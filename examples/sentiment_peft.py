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

from peftsurgery import SurgeryError
from peftsurgery.tasks import Task, Verbalizer
from peftsurgery.train import evaluate, fit, read_examples
from peftsurgery.zoo import gguf_folder
from sentiment import INIT_TEXT, PEER, TEMPLATE, WORDS


def peft_model(name: str, folder: str, device: str, seed: int):
    """PEFT's method under the settings of examples/sentiment.py (its defaults where we have no counterpart:
    prefix tuning's N(0,1) prefix), loaded as a PEFT user would: qlora loads the base 4-bit NF4 directly through
    transformers, never as floats."""
    import peft
    import transformers as tf
    causal = peft.TaskType.CAUSAL_LM
    q = None
    if name == "lora":
        cfg = peft.LoraConfig(task_type=causal, r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"])
    elif name == "qlora":
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
        cfg = peft.LoraConfig(task_type=causal, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    elif name == "prompt-tuning":
        cfg = peft.PromptTuningConfig(task_type=causal, num_virtual_tokens=20,
                                      prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=folder)
    else:
        cfg = peft.PrefixTuningConfig(task_type=causal, num_virtual_tokens=20)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32,
                                                    device_map=device)
    torch.manual_seed(seed)   # PEFT's initial values, as `peftsurgery train --seed` seeds ours
    return peft.get_peft_model(model, cfg), tf.AutoTokenizer.from_pretrained(folder)


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
    model, tokenizer = peft_model(args.method, folder, args.device, args.seed)
    task = Task(tokenizer, TEMPLATE.replace("\\n", "\n"), Verbalizer(sorted(WORDS), WORDS))  # labels sorted, as the CLI
    result = fit(model, task, train, 3, 16, args.lr, args.seed, progress=True, desc=f"train PEFT {args.method}")
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
