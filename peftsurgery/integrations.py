"""The rules' training-time hooks under the Hugging Face Trainer (needs transformers).

    trainer = SurgeryTrainer(model=model, args=args, train_dataset=data)   # a transformers.Trainer
    trainer.train()

SurgeryTrainer adds peftsurgery.extra_loss(model) to the training loss and runs peftsurgery.step after every
optimizer step (SurgeryCallback). With a Trainer subclass of your own (e.g. TRL's), put SurgeryLoss in front of
it: `class MyTrainer(SurgeryLoss, SFTTrainer)`, which also adds the callback. SurgeryCallback alone is enough for
rules without a loss term; where one has a loss term that never reached the loss, step() says so at the first
optimizer step.

Checkpoints and save_model() hold the adapters only, in peftsurgery's format (save_adapters), never the base
model; resume_from_checkpoint and load_best_model_at_end write the saved tensors back into the attached adapters
(load_adapters). The Trainer's own files (optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json,
training_args.bin) are the Trainer's: it writes them with torch.save and reads them with weights_only=True.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import torch
from transformers import Trainer, TrainerCallback

from . import io
from .errors import SurgeryError
from .surgery import adapters, extra_loss, sitemap, step


class SurgeryCallback(TrainerCallback):
    """Runs peftsurgery.step(model, step, total) after each optimizer step, before the Trainer zeroes the
    gradients: `step` is the optimizer steps done (global_step + 1 there), `total` the run's max_steps."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        step(model, state.global_step + 1, state.max_steps)


class SurgeryLoss:
    """Trainer mixin: the training loss gets peftsurgery.extra_loss(model), counted once per optimizer step
    under gradient accumulation; evaluation losses stay the task's. Registers SurgeryCallback. Checkpoints and
    save_model() hold the adapters only (save_adapters); resuming and load_best_model_at_end read them back."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapters (save_adapters: every rank joins, sharded tensors are gathered, the main process writes),
        the processing class and the training arguments; never the base model's weights."""
        output_dir = output_dir or self.args.output_dir
        save_adapters(self.model, output_dir, write=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # the Trainer's own file
        self.accelerator.wait_for_everyone()   # other ranks may read the adapter next
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapters(self.model, resume_from_checkpoint)

    def _load_best_model(self):
        load_adapters(self.model, self.state.best_model_checkpoint)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(c, SurgeryCallback) for c in self.callback_handler.callbacks):
            self.add_callback(SurgeryCallback())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        extra = extra_loss(self.model)
        if isinstance(extra, int):   # no rule has a loss term
            return out
        # training_step divides a per-batch loss by the accumulation steps; a loss already normalised over the
        # whole accumulated batch is used as is, so the extra term is divided here
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if scaled:
            extra = extra / self.current_gradient_accumulation_steps
        if return_outputs:
            return out[0] + extra, out[1]
        return out + extra


class SurgeryTrainer(SurgeryLoss, Trainer):
    """transformers.Trainer running the rules' training-time hooks."""


# ---- adapter-only checkpoints ------------------------------------------------------------------------------------

def _main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _layout(model, directory: str) -> list[tuple[str, str]]:
    """(adapter name, folder) for every attached adapter: "default" (else the first attached) in `directory`
    itself, each other one in directory/<name>."""
    names = list(adapters(model))
    if not names:
        raise SurgeryError("no peftsurgery adapter is attached to this model; apply a method before training it")
    top = "default" if "default" in names else names[0]
    return [(n, directory if n == top else os.path.join(directory, n)) for n in names]


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


@contextlib.contextmanager
def _gathered(model):
    """Inside the block each adapter record's state() gives whole tensors: FSDP2-sharded ones (DTensors) are
    gathered, a collective every rank must join, in the same order on every rank."""
    recs = [rec for att in adapters(model).values() for rec in att.records]
    try:
        for rec in recs:
            tensors, settings = rec.state()
            if any(_is_dtensor(t) for t in tensors.values()):
                full = {k: t.full_tensor() if _is_dtensor(t) else t for k, t in tensors.items()}
                rec.state = lambda full=full, settings=settings: (full, settings)
        yield
    finally:
        for rec in recs:
            rec.__dict__.pop("state", None)


def save_adapters(model, directory: str, write: bool | None = None) -> str:
    """Write every adapter attached to `model` into `directory` as peftsurgery.save does (adapter.safetensors +
    adapter.json with the base's fingerprint), leaving the folder's other files alone: "default" (else the first
    attached) in `directory` itself, each other adapter in directory/<name>. Under torch.distributed call it on
    every rank: sharded (FSDP2) adapter tensors are gathered and only rank 0 writes (write overrides who does)."""
    layout = _layout(model, directory)
    write = _main() if write is None else write
    with _gathered(model):
        if not write:
            return os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        for name, path in layout:
            if path != directory:
                io.save(model, path, name)
                continue
            tmp = tempfile.mkdtemp(prefix=".adapter-", dir=directory)  # io.save replaces the folder it is given
            try:
                io.save(model, os.path.join(tmp, "a"), name)
                for f in (io.WEIGHTS, io.CONFIG):
                    os.replace(os.path.join(tmp, "a", f), os.path.join(directory, f))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return os.path.abspath(directory)


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def load_adapters(model, directory: str) -> None:
    """Write the adapters that save_adapters put in `directory` back into the adapters attached to `model`, in
    place: the parameters keep their identity (an optimizer or a DDP / FSDP2 wrapper built on them stays valid),
    sharded ones take their shard. The attached adapters must have the saved method, options and architecture;
    everything is checked before the first tensor is written. A rule with an after-step hook (AdaLoRA) keeps
    statistics no checkpoint holds, so it is refused rather than resumed inexactly."""
    todo = []
    for name, path in _layout(model, directory):
        meta, tensors = io.read(path)
        att = adapters(model)[name]
        if meta["method"] != att.method or meta["config"] != _plain(dataclasses.asdict(att.config)):
            raise SurgeryError(f"{path} holds a {meta['method']} adapter with other options than adapter {name!r} "
                               f"({att.method}) on this model; resume with the method and options it was saved with")
        if meta["base"]["fingerprint"] != sitemap(model).fingerprint():
            raise SurgeryError(f"{path} was saved from a different architecture ({meta['base'].get('class')}); "
                               "resume on the model it was trained on")
        hooked = [rec for rec in att.records if getattr(rec.rule, "after_step", None) is not None]
        if hooked:
            raise SurgeryError(f"adapter {name!r} ({att.method}) keeps training-time statistics "
                               f"({type(hooked[0].rule).__name__}'s after-step hook) that checkpoints do not hold, so "
                               "it cannot resume exactly; train it in one run, or load the adapter with "
                               "peftsurgery.load to go on from its final state")
        live, settings = {}, []
        for i, rec in enumerate(att.records):
            state, st = rec.state()
            settings.append(st)
            live.update({f"{i}.{k}": t for k, t in state.items()})
        if _plain(settings) != meta.get("rules", [{}] * len(settings)):
            raise SurgeryError(f"{path} was saved with other rule settings than adapter {name!r} has now; resume "
                               "with the adapter it was saved from")
        bad = sorted(set(live) ^ set(tensors)) or [k for k in live if tuple(live[k].shape) != tuple(tensors[k].shape)]
        if bad:
            raise SurgeryError(f"{path} does not fit adapter {name!r} on this model ({bad[0]}); resume with the "
                               "method and options it was saved with")
        todo.append((live, tensors))
    with torch.no_grad():
        for live, tensors in todo:
            for k, t in live.items():
                src = tensors[k]
                if _is_dtensor(t):
                    from torch.distributed.tensor import distribute_tensor
                    src = distribute_tensor(src.to(t.device, t.dtype), t.device_mesh, t.placements,
                                            src_data_rank=None)   # every rank read the file: no communication
                t.copy_(src)
