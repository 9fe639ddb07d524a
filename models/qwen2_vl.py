"""The Qwen2-VL / Qwen2.5-VL family: its declaration, presets and public API.

The model is ``qwen2_vl_model`` (config, M-RoPE decoder, ``rope_index``, ``generate``), its vision tower
``qwen2_vl_vision`` (``VisionTower``, ``images_to_patches``) and the Hugging Face conversion ``qwen2_vl_hf``.
"""

from __future__ import annotations

from jquant.models.family import LM_KEEP_FLOAT
from jquant.models.family import Family as FamilyDeclaration
from jquant.models.llama import LlamaConfig
from jquant.models.qwen2_vl_hf import config_from_hf, config_to_hf, from_hf, to_hf
from jquant.models.qwen2_vl_model import (IMAGE, TEXT, Qwen2VL, Qwen2VLConfig, VLInputs, abstract_model, generate,
                                          init_model, rope_index)
from jquant.models.qwen2_vl_vision import VisionConfig, images_to_patches

__all__ = ["FAMILY", "IMAGE", "TEXT", "Qwen2VL", "Qwen2VLConfig", "VLInputs", "VisionConfig", "abstract_model",
           "config_from_hf", "config_to_hf", "from_hf", "generate", "images_to_patches", "init_model", "rope_index",
           "to_hf"]

# jq-vl-tiny: a small vision tower (32-64 px images, 4 px patches, 2x2 merge -> 16-64 image tokens) on jq-llama-tiny's
# decoder shape made Qwen2-style (zero-initialised q/k/v biases, so jq-llama-tiny's weights load unchanged), with
# four extra vocabulary ids for the image / video / vision-start / vision-end tokens.
_TINY_TEXT = LlamaConfig(family="qwen2", qkv_bias=True, vocab_size=4100, hidden_size=192, intermediate_size=512,
                         num_layers=4, num_heads=6, num_kv_heads=2, max_position_embeddings=1024, bos_token_id=0,
                         eos_token_id=1)
_TINY_VISION = VisionConfig(variant="qwen2_vl", depth=3, embed_dim=96, num_heads=3, intermediate_size=384,
                            out_hidden_size=192, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)

FAMILY = FamilyDeclaration(
    name="qwen2_vl",
    config_class=Qwen2VLConfig,
    model_class=Qwen2VL,
    hf_model_types=("qwen2_vl", "qwen2_5_vl"),
    presets={
        "jq-vl-tiny": Qwen2VLConfig(text=_TINY_TEXT, vision=_TINY_VISION, mrope_section=(4, 6, 6),
                                    image_token_id=4096, video_token_id=4097, vision_start_token_id=4098,
                                    vision_end_token_id=4099),
    },
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=config_to_hf,
    config_from_json=config_from_hf,
    checkpoint_protocol="the manifest's config is the Hugging Face config.json dict (config_to_hf).",
    from_hf=from_hf,
    to_hf=to_hf,
    keep_float=(*LM_KEEP_FLOAT, "visual/patch_embed/proj"),
)
