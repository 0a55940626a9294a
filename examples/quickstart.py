"""Quickstart: LoRA on a tiny Llama, a short training loop, save, reload, compare.

    python examples/quickstart.py
"""
import torch

import peftsurgery
from peftsurgery.zoo import load_model

model, _ = load_model("tiny-llama")          # random weights, built from a config (no download)
base = {k: v.clone() for k, v in model.state_dict().items()}

# 1. Rewrite the model in place: a low-rank branch beside every attention and MLP linear.
peftsurgery.apply(model, "lora", r=8, alpha=16, targets="all-linear")
b = peftsurgery.budget(model)
print(f"trainable {b['trainable']:,} of {b['base']:,} base parameters")

# 2. Train on random tokens with a next-token loss; only the adapter's parameters get gradients.
torch.manual_seed(0)
data = torch.randint(0, 256, (16, 24))
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-2)
model.train()
for step in range(20):
    batch = data[torch.randint(0, len(data), (8,))]
    loss = model(input_ids=batch, labels=batch).loss     # HF shifts the labels for next-token loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")
model.eval()

# 3. The base weights are bit-identical; only the adapter changed.
now = model.state_dict()
assert all(torch.equal(now[k], v) for k, v in base.items()), "base weights changed"
print("base weights unchanged")

# 4. Save the adapter (safetensors + JSON) and load it into a fresh copy of the base model.
path = peftsurgery.save(model, "adapters/quickstart")
fresh, _ = load_model("tiny-llama")
peftsurgery.load(fresh, path)
ids = torch.randint(0, 256, (2, 12))
with torch.no_grad():
    a, b = model(input_ids=ids).logits, fresh(input_ids=ids).logits
    with peftsurgery.disabled(fresh):
        plain = fresh(input_ids=ids).logits
assert torch.allclose(a, b, atol=1e-6)
print(f"saved to {path}; reloaded outputs match (max diff {(a - b).abs().max():.2e}, "
      f"adapter moves logits by {(a - plain).abs().max():.3f})")
