"""Tiny random Qwen2-VL / Qwen2.5-VL transformers models on disk and image prompts, for parity checks.

Every tensor is perturbed after initialisation (norms off 1, biases off 0) and the model is written with
``save_pretrained``. Prompts are built as the processor builds them: ``vision_start``, one image token per
merged patch, ``vision_end``, with ``mm_token_type_ids`` marking the image tokens (Qwen2.5-VL silently falls
back to 1-D positions without it). Requires torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 90, 91, 92, 93
VOCAB = 96
TEXT_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
# Qwen2.5-VL: 16 px windows of 4 px patches merged 2x2 -> windows of 2x2 merged patches; block 1 attends fully.
VISION_CONFIGS = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                     spatial_merge_size=2, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=4,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1]),
}
CLASSES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}


def tiny_config(family: str):
    """A small jquant ``Qwen2VLConfig`` of ``family`` with this module's token ids (checkpoint and error tests)."""
    from jquant.models.llama import LlamaConfig
    from jquant.models.qwen2_vl_model import Qwen2VLConfig
    from jquant.models.qwen2_vl_vision import VisionConfig

    vision = dict(variant=family, depth=2, embed_dim=32, num_heads=2, intermediate_size=64, out_hidden_size=32,
                  patch_size=4)
    if family == "qwen2_5_vl":
        vision.update(hidden_act="silu", window_size=16, fullatt_block_indexes=(1,))
    text = LlamaConfig(family="qwen2", qkv_bias=True, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                       num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=128)
    return Qwen2VLConfig(family=family, text=text, vision=VisionConfig(**vision), mrope_section=(2, 3, 3),
                         image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                         vision_end_token_id=VISION_END)


def build_qwen2_vl(family: str, folder: str | Path, *, seed: int = 0, scale: float = 0.2, **overrides):
    """Write a perturbed tiny ``family`` ("qwen2_vl" / "qwen2_5_vl") model to ``folder``; returns it (eval mode).

    ``overrides`` update the top-level config (e.g. ``tie_word_embeddings=True``).
    """
    import torch
    import transformers

    name = CLASSES[family]
    cfg = getattr(transformers, f"{name}Config")(
        text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIGS[family]), image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def reload(family: str, folder: str | Path):
    """transformers' own reading of a checkpoint folder (eval mode)."""
    import transformers

    return getattr(transformers, f"{CLASSES[family]}ForConditionalGeneration").from_pretrained(folder).eval()


def image_prompt(vision, rows: list[list[tuple[int, int]]], seed: int) -> dict:
    """A batch whose row ``r`` holds images of the ``(height, width)`` px in ``rows[r]`` between random text.

    Returns ``tokens [B, L]``, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (rows padded
    with random text to one length). ``vision`` is a jquant ``VisionConfig``.
    """
    from jquant.models.qwen2_vl_vision import images_to_patches

    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(3, IMAGE_TOKEN, n).tolist()  # noqa: E731
    patches, grids, token_rows = [], [], []
    for sizes in rows:
        row = text(2)
        for h, w in sizes:
            pv, grid = images_to_patches(rng.random((1, h, w, 3)), vision)
            patches.append(pv), grids.append(grid)
            row += [VISION_START] + [IMAGE_TOKEN] * (int(np.prod(grid)) // vision.merge_unit) + [VISION_END] + text(2)
        token_rows.append(row)
    length = max(map(len, token_rows))
    tokens = np.array([r + text(length - len(r)) for r in token_rows], np.int32)
    return dict(tokens=tokens, pixel_values=np.concatenate(patches), image_grid_thw=np.concatenate(grids),
                mm_token_type_ids=(tokens == IMAGE_TOKEN).astype(np.int64))


def torch_vl_logits(model, prompt: dict, dtype: str = "float32") -> np.ndarray:
    """transformers' logits of an ``image_prompt`` batch (``dtype`` "float64" runs a double copy)."""
    import torch

    double = dtype == "float64"
    ref = model.double() if double else model
    try:
        with torch.no_grad():
            return ref(**_torch_inputs(prompt, torch.float64 if double else torch.float32)).logits.float().numpy()
    finally:
        model.float()


def torch_vl_generate(model, prompt: dict, n: int) -> np.ndarray:
    """transformers' greedy continuation of an ``image_prompt`` batch by ``n`` tokens (prompt included)."""
    import torch

    with torch.no_grad():
        return model.generate(**_torch_inputs(prompt, torch.float32), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy()


def _torch_inputs(prompt: dict, dtype) -> dict:
    import torch

    return dict(input_ids=torch.tensor(prompt["tokens"], dtype=torch.long),
                pixel_values=torch.tensor(prompt["pixel_values"], dtype=dtype),
                image_grid_thw=torch.tensor(prompt["image_grid_thw"]),
                mm_token_type_ids=torch.tensor(prompt["mm_token_type_ids"]))


def tiny_vqa_config(vocabulary: int = 4096):
    """A one-layer Qwen2-VL (width 32, one vision block of 4 px patches) on a text vocabulary of ``vocabulary``
    tokens followed by the four vision tokens (``jquant.train.vl.extend_tokenizer``'s ids): tests of the VQA
    training and commands on the bundled tokenizer."""
    from jquant.models import llama
    from jquant.models.qwen2_vl import Qwen2VLConfig, VisionConfig

    v = vocabulary
    text = llama.LlamaConfig(family="qwen2", qkv_bias=True, vocab_size=v + 4, hidden_size=32, intermediate_size=64,
                             num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=256, bos_token_id=0,
                             eos_token_id=1)
    vision = VisionConfig(depth=1, embed_dim=32, num_heads=2, intermediate_size=64, out_hidden_size=32, patch_size=4)
    return Qwen2VLConfig(text=text, vision=vision, mrope_section=(2, 3, 3), image_token_id=v, video_token_id=v + 1,
                         vision_start_token_id=v + 2, vision_end_token_id=v + 3)
