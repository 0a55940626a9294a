"""Where the command line gets its MODEL from: a built-in tiny model, a local Hugging Face folder, a GGUF file
(or a folder holding one; converted once into a cached Hugging Face folder), or `module:factory`. Also how a
merged model is written back to disk."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys

import torch
from torch import nn

from .checks import one_line
from .errors import SurgeryError

# name -> (config class, model class, config values); small enough to build in well under a second
TINY = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)),
    "tiny-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "tiny-bert": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128)),
    "tiny-t5": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0)),
}
FORMS = (f"give one of {', '.join(TINY)}, a folder with a Hugging Face config.json, a .gguf file (or a folder "
         "holding one), or module:factory")
GGUF_PIN = "gguf==0.19.0"


def load_model(spec: str) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer or None) for a MODEL argument."""
    if spec in TINY:
        return _tiny(spec), None
    if os.path.isfile(spec) and spec.lower().endswith(".gguf"):
        return _converted(spec)
    if os.path.isdir(spec):
        ggufs = sorted(f for f in os.listdir(spec) if f.lower().endswith(".gguf"))
        if not os.path.isfile(os.path.join(spec, "config.json")) and ggufs:
            if len(ggufs) > 1:
                raise SurgeryError(f"{spec} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); give one of them")
            return _converted(os.path.join(spec, ggufs[0]))
        return _folder(spec)
    if ":" in spec and not os.path.exists(spec):
        return _factory(spec), None
    raise SurgeryError(f"unknown model {spec!r}: {FORMS}")


def _converted(gguf: str) -> tuple[nn.Module, object]:
    """The model of a GGUF file from its cached conversion; a damaged cache entry says how to redo it."""
    folder = gguf_folder(gguf)
    try:
        return _folder(folder)
    except Exception as e:  # SurgeryError, or what a truncated weights file raises (safetensors' own error)
        message = str(e) if isinstance(e, SurgeryError) else f"cannot load {folder}: {one_line(e)}"
        raise SurgeryError(f"{message}; it is the cached conversion of {gguf}: delete {folder} and run again to "
                           "convert it again") from None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SurgeryError("Hugging Face models need transformers: pip install transformers") from None
    return transformers


def _tiny(name: str) -> nn.Module:
    tf = _transformers()
    cfg_cls, model_cls, values = TINY[name]
    torch.manual_seed(0)
    cfg = getattr(tf, cfg_cls)(**values)
    return getattr(tf, model_cls)(cfg).eval()


def _folder(path: str) -> tuple[nn.Module, object]:
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        raise SurgeryError(f"{path} has no config.json; {FORMS}")
    try:
        with open(cpath) as f:
            archs = json.load(f).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise SurgeryError(f"{cpath} is not a valid JSON config") from None
    tf = _transformers()
    cls = getattr(tf, archs[0], None) if archs else None
    if cls is None:
        raise SurgeryError(f"{cpath} names no architecture transformers knows ({', '.join(archs) or 'none'})")
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SurgeryError(f"cannot load {path}: {str(e).splitlines()[0][:160]}") from None
    tokenizer = None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a model folder need not hold a tokenizer
        pass
    return model.eval(), tokenizer


def cache_dir() -> str:
    """$PEFTSURGERY_CACHE, else $XDG_CACHE_HOME/peftsurgery, else ~/.cache/peftsurgery."""
    root = os.environ.get("PEFTSURGERY_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "peftsurgery")
    return root


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder(path: str) -> str:
    """A plain Hugging Face folder (float32 safetensors, config, tokenizer) converted from a GGUF file, made once
    and kept in the cache under the file's SHA-256; later calls only hash the file."""
    digest = _sha256(path)
    target = os.path.join(cache_dir(), "models", digest[:16])
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import importlib.util
    if importlib.util.find_spec("gguf") is None:
        raise SurgeryError(f"reading a GGUF file needs the gguf package: pip install {GGUF_PIN}")
    tf = _transformers()
    folder, name = os.path.split(os.path.abspath(path))
    print(f"peftsurgery: converting {name} once into {target}", file=sys.stderr)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SurgeryError(f"cannot read {path} as a GGUF model: {str(e).splitlines()[0][:160]}") from None
    # the loaded model remembers its GGUF origin and refuses save_pretrained: rebuild a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    from .io import atomic_dir
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "peftsurgery-source.json"), "w") as f:
            json.dump({"gguf": os.path.abspath(path), "sha256": digest}, f, indent=2)
    return target


def _factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # let `my_models:build` find my_models.py next to the user
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as e:  # the module's own code may raise anything
        raise SurgeryError(f"cannot import {spec!r} ({one_line(e)}); {FORMS}") from None
    try:
        model = fn()
    except Exception as e:
        raise SurgeryError(f"the factory {spec} raised {one_line(e)}; fix it so that it returns the model") from None
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def save_model(model: nn.Module, directory: str) -> str:
    """Write a (merged) model to `directory`, replacing it atomically: Hugging Face models with save_pretrained,
    other modules as model.safetensors. peftsurgery's own container is left out."""
    from safetensors.torch import save_file

    from .io import atomic_dir
    from .surgery import CONTAINER
    with atomic_dir(directory) as tmp:
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(CONTAINER + ".")}
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, state_dict=state)
        else:
            # clone: tied weights share storage, which safetensors refuses
            tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
            save_file(tensors, os.path.join(tmp, "model.safetensors"))
    return os.path.abspath(directory)
