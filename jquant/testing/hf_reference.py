"""Tiny random Hugging Face (PyTorch) models written to disk, for parity checks.

Every tensor is perturbed after initialisation (norm weights away from 1,
biases away from 0) so that no code path is compared vacuously, and the model
is written with ``save_pretrained`` so the loader reads what real checkpoints
contain.  Requires torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LLAMA_BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128,
    attn_implementation="eager",
)
_ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (transformers model class, config class, config overrides)
LLAMA_FAMILY_CASES: dict[str, tuple[str, str, dict]] = {
    "llama3-gqa-untied": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=_ROPE_LLAMA3)),
    "llama2-mha-tied-bias": ("LlamaForCausalLM", "LlamaConfig",
                             dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral-sliding-window": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=5, head_dim=16)),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=24, num_key_value_heads=1)),
}


def build_llama_family(case: str, folder: str | Path, *, seed: int = 0, max_shard_size: str = "1GB", scale: float = 0.2):
    """Write a perturbed tiny transformers model of ``case`` (a key of ``LLAMA_FAMILY_CASES``) to ``folder``.

    Returns the PyTorch model in eval mode.
    """
    import torch
    import transformers

    if case not in LLAMA_FAMILY_CASES:
        raise ValueError(f"unknown case {case!r}; choose one of {sorted(LLAMA_FAMILY_CASES)}.")
    cls_name, cfg_name, extra = LLAMA_FAMILY_CASES[case]
    cfg = getattr(transformers, cfg_name)(**{**LLAMA_BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Logits of a transformers causal LM for ``tokens [B, T]`` as numpy (no grad)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def torch_ssm_decode_logits(model, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """transformers' own cached decoding of a Mamba/Mamba-2 LM: one ``prefill`` chunk, then one token per call."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor(tokens[:, :prefill], dtype=torch.long), use_cache=True)
        logits = [out.logits]
        for t in range(prefill, tokens.shape[1]):
            out = model(torch.tensor(tokens[:, t : t + 1], dtype=torch.long), cache_params=out.cache_params,
                        use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).numpy()


def copy_with_config(src: str | Path, dst: str | Path, **changes) -> Path:
    """A copy of checkpoint folder ``src`` at ``dst`` with ``config.json`` entries replaced by ``changes``."""
    import json
    import shutil

    dst = Path(dst)
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def relative_error(got, expected) -> float:
    """``max |got - expected| / max |expected|`` computed in float64."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
