"""The rules' training-time hooks under the Hugging Face Trainer (needs transformers).

    trainer = SurgeryTrainer(model=model, args=args, train_dataset=data)   # a transformers.Trainer
    trainer.train()

SurgeryTrainer adds peftsurgery.extra_loss(model) to the training loss and runs peftsurgery.step after every
optimizer step (SurgeryCallback). With a Trainer subclass of your own (e.g. TRL's), put SurgeryLoss in front of
it: `class MyTrainer(SurgeryLoss, SFTTrainer)`, which also adds the callback. SurgeryCallback alone is enough for
rules without a loss term; where one has a loss term that never reached the loss, step() says so at the first
optimizer step.
"""
from __future__ import annotations

from transformers import Trainer, TrainerCallback

from .surgery import extra_loss, step


class SurgeryCallback(TrainerCallback):
    """Runs peftsurgery.step(model, step, total) after each optimizer step, before the Trainer zeroes the
    gradients: `step` is the optimizer steps done (global_step + 1 there), `total` the run's max_steps."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        step(model, state.global_step + 1, state.max_steps)


class SurgeryLoss:
    """Trainer mixin: the training loss gets peftsurgery.extra_loss(model), counted once per optimizer step
    under gradient accumulation; evaluation losses stay the task's. Registers SurgeryCallback."""

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
