"""Built-in named recipes (``get(name)``, ``list_recipes()``).

All keep embeddings and the output head in floating point (``DEFAULT_KEEP_FLOAT``).
The ``{rtn,gptq,smoothquant,quarot,ostquant}-{w4a16,w4a8kv8,w4a4kv4}`` family compares
equivalence transforms at equal bits (OSTQuant spec §3.1: per-channel symmetric int4
weights with MSE clip search, per-token asymmetric activations, per-head asymmetric KV).
``w4``/``w3``/``w2`` integer weights are asymmetric (min-max with a zero
point, as in GPTQ), ``w8`` symmetric; activations are quantized dynamically
per token. ``gptvq-w{2,2.25,3}`` and ``pcdvq-w{2,2.25,3}`` are the vector-quantization
recipes at about 2, 2.25 and 3 index bits per weight (``VQ_SETTINGS``; bits per weight
including codebooks: ``jquant.size_report``). ``{rtn-mamba,mambaquant}-{w8a8,w4a8}`` are the
MambaQuant settings for the Mamba families (per-tensor activations, as the paper), with the depthwise conv1d in
float; ``{rtn-mamba,mambaquant}-{w8a8,w4a8}-conv`` quantize it too (MambaQuant with S7 smoothing), and
``{rtn-mamba,mambaquant}-{w8a8,w4a8}-ssm`` quantize the Mamba-1 SSM matmul's operands (MambaQuant with S4 and R4;
S4 by SmoothQuant's balanced rule over h and C, not the official code's C-only rule, which raised the SSM-matmul
error on the test model with outlier states where the balanced rule lowered it:
tests/transforms/test_mamba_ssm_matmul.py).
``{gptq,quarot-gptq}-moe-w{4,3}`` and ``moequant-w{4,3}`` are MoEQuant's settings for MoE models.
``mquant-w4a8``, ``mquant-w4a8-vit4``, ``quarot-w4a8-dynamic-vl`` and ``quarot-w4a8-static-vl`` are MQuant's settings for multimodal models
(Qwen2-VL): static per-modality activation scales against the per-token dynamic baseline.

Symmetric integer weights below 8 bits use the full range (``int4-full``: all 2^b codes, scale
amax / ((2^b - 1) / 2), compressed-tensors' convention) and 8-bit ones the restricted range
(``int8``: [-127, 127], scale amax / 127), as measured in experiments/results/symmetric_convention.md
(a trained Qwen2, KL to the float model: the full range is lower at W4/W3/W2 in groups of 64 and
per channel with the MSE clip search; at 8 bits the two do not differ measurably).

GPTQ runs with activation order and static groups (``GPTQConfig``'s default ``act_order=True``; pass
``options={"act_order": False}`` to a rule for the original column order): experiments/results/gptq_act_order.md
measures both on jq-llama-small at the GPTQ weight settings these recipes use, over three calibration seeds, and
act-order is ahead at more of them than it is behind (perplexity where the paired difference is beyond two standard
errors, else KL to the float model).
"""

from __future__ import annotations

import dataclasses

from jquant.recipes.rules import Recipe, Rule, TransformStep

ALL = r".*"
# Per-channel symmetric int4 with the MSE clip search of OSTQuant/QuaRot's GPTQ (shrink 1.00, 0.99, ..., 0.21).
W4_MSE = {"clip_search": True, "clip_grid": 79, "clip_min_ratio": 0.21}
# Symmetric weights below 8 bits: the full range (see the module docstring).
SYMMETRIC_LOW_BIT = "-full"
# Activation / KV settings of the rotation papers: per-token (KV: per token and head) asymmetric.
SETTINGS = {"w4a16": (None, None), "w4a8kv8": ("int8-asym", "int8-asym"), "w4a4kv4": ("int4-asym", "int4-asym")}


def _recipe(name: str, description: str, transforms: tuple = (), kv_cache: str | None = None, **rule) -> Recipe:
    return Recipe(name=name, description=description, rules=(Rule(pattern=ALL, **rule),), transforms=transforms,
                  kv_cache=kv_cache)


# bits -> (GPTVQ format, PCDVQ format). GPTVQ: 2-D vectors, one fp16 codebook per group of
# rows x columns (overhead 0.0625 / 0.25 / 0.0625 bits); PCDVQ: spec §3.3's (k, a, b) = (8, 14, 2)
# and (8, 16, 2), and (4, 10, 2) for 3 bits (k = 8 would need a 22-bit direction index).
VQ_SETTINGS = {"w2": ("vq-d2-k4-cb256x32", "pcdvq-d8-a14-b2"),
               "w2.25": ("vq-d2-k4-cb128x16", "pcdvq-d8-a16-b2"),
               "w3": ("vq-d2-k6-cb256x128", "pcdvq-d4-a10-b2")}


def _vq_recipes() -> list[Recipe]:
    out = []
    for bits, (vq, polar) in VQ_SETTINGS.items():
        out += [_recipe(f"gptvq-{bits}", f"GPTVQ-style {vq}: weighted k-means codebooks, error feedback, tuned codebooks",
                        weight=vq, algorithm="gptvq"),
                _recipe(f"pcdvq-{bits}", f"PCDVQ {polar}: random Hadamard, E8/lattice directions x Lloyd-Max "
                        "magnitudes, BlockLDLQ error feedback", weight=polar, algorithm="pcdvq")]
    return out


# MambaQuant spec §3.1/3.8: per-output-channel asymmetric RTN weights, dynamic per-tensor asymmetric int8 activations.
MAMBA_SETTINGS = {"w8a8": "int8-asym", "w4a8": "int4-asym"}


# The Mamba families keep their depthwise conv1d in floating point under the recipes above (the family's keep_float);
# the ``-conv`` recipes name only the embedding and head, so the conv1d weights (per channel, over the taps) and
# inputs (site a1) are quantized as well, as in the paper, and MambaQuant adds S7 smoothing of the conv1d input.
MAMBA_CONV_KEEP_FLOAT = ("embed_tokens", "lm_head")
MAMBA_SSM_FORMAT = "int8-asym"  # the SSM matmul's operands, per token (spec §3.1: per-token quantization at a4)


def _mamba_recipes() -> list[Recipe]:
    """RTN and MambaQuant (KLT-enhanced + smooth-fused rotation) at W8A8 and W4A8 for the Mamba families, without
    and with the depthwise convolutions quantized."""
    out = []
    for setting, weight in MAMBA_SETTINGS.items():
        common = dict(weight=weight, activation="int8-tensor-asym")
        what = f"{weight} per-channel weights, int8 per-tensor dynamic asymmetric activations"
        out += [_recipe(f"rtn-mamba-{setting}", f"Mamba: {what}, round to nearest", **common),
                _recipe(f"mambaquant-{setting}", f"MambaQuant (KLT R1/R5, S2/S5 smoothing, online Hadamard R2): {what}",
                        transforms=(TransformStep("mambaquant", {}),), **common)]
        conv = "; the conv1d weights and inputs quantized too"
        out += [dataclasses.replace(
                    _recipe(f"rtn-mamba-{setting}-conv", f"Mamba: {what}, round to nearest{conv}", **common),
                    keep_float=MAMBA_CONV_KEEP_FLOAT),
                dataclasses.replace(
                    _recipe(f"mambaquant-{setting}-conv", f"MambaQuant (KLT R1/R5, S2/S5/S7 smoothing, online Hadamard "
                            f"R2): {what}{conv}", transforms=(TransformStep("mambaquant", {"smooth_conv": True}),),
                            **common),
                    keep_float=MAMBA_CONV_KEEP_FLOAT)]
        ssm = "; the SSM matmul's state h and C quantized per token (int8 asymmetric, Mamba-1 only)"
        out += [dataclasses.replace(_recipe(f"rtn-mamba-{setting}-ssm", f"Mamba: {what}, round to nearest{ssm}",
                                            **common), ssm_matmul=MAMBA_SSM_FORMAT),
                dataclasses.replace(
                    _recipe(f"mambaquant-{setting}-ssm", f"MambaQuant (KLT R1/R5, S2/S4/S5 smoothing, online Hadamards "
                            f"R2/R4): {what}{ssm}",
                            transforms=(TransformStep("mambaquant", {"smooth_state": True, "state_rule": "balanced",
                                                             "rotate_state": True}),),
                            **common), ssm_matmul=MAMBA_SSM_FORMAT)]
    return out


def _rotation_recipes() -> list[Recipe]:
    """RTN, GPTQ, SmoothQuant, QuaRot and OSTQuant at W4A16, W4A8KV8 and W4A4KV4 (per-channel int4 weights)."""
    out = [_recipe("smoothquant-w8a8", "SmoothQuant (alpha 0.5), int8 per-channel weights, int8 per-token activations",
                   transforms=(TransformStep("smoothquant", {"alpha": 0.5}),), weight="int8", activation="int8")]
    for setting, (act, kv) in SETTINGS.items():
        online = ["down", "qk"] if kv else ["down"]
        what = f"int4 per-channel weights (MSE clip){', ' + act + ' activations, ' + kv + ' KV' if act else ''}"
        common = dict(weight=f"int4{SYMMETRIC_LOW_BIT}", weight_options=W4_MSE, activation=act, kv_cache=kv)
        out += [
            _recipe(f"rtn-{setting}", f"{what}, round to nearest", **common),
            _recipe(f"gptq-{setting}", f"{what}, GPTQ", algorithm="gptq", **common),
            _recipe(f"smoothquant-{setting}", f"SmoothQuant (alpha 0.5), {what}, round to nearest",
                    transforms=(TransformStep("smoothquant", {"alpha": 0.5}),), **common),
            _recipe(f"quarot-{setting}", f"QuaRot random-Hadamard rotations (online: {', '.join(online)}), {what}, GPTQ",
                    transforms=(TransformStep("quarot", {"online": online}),), algorithm="gptq", **common),
            _recipe(f"ostquant-{setting}", f"OSTQuant learned rotations and scalings (KL-Top, 150 steps; online: "
                    f"{', '.join(online)}), {what}, GPTQ",
                    transforms=(TransformStep("ostquant", {"online": online, "init": "womi" if act else "hadamard"}),),
                    algorithm="gptq", **common),
        ]
    return out


def _moe_recipes() -> list[Recipe]:
    """MoEQuant spec §3.4 at W4/W3: per-channel symmetric GPTQ with the MSE clip search on every linear.

    ``gptq-moe-w{b}``: plain GPTQ; ``quarot-gptq-moe-w{b}``: the paper's Table 1 baseline (offline
    random-Hadamard rotation, no online rotations); ``moequant-w{b}``: the same plus affinity-guided expert
    Hessians (AGQ). MoEQuant proper calibrates on the model's own expert-balanced text (EBSS:
    ``jquant quantize --calib-source ebss``).
    """
    rotation = (TransformStep("quarot", {"online": []}),)
    out = []
    for bits in (4, 3):
        fmt = dict(weight=f"int{bits}{SYMMETRIC_LOW_BIT}", weight_options=W4_MSE, algorithm="gptq")
        experts = Rule(pattern=r".*/experts/.*", options={"hessian": "affinity"}, **fmt)
        what = f"int{bits} per-channel symmetric weights (MSE clip), GPTQ"
        out += [_recipe(f"gptq-moe-w{bits}", f"MoE: {what}", **fmt),
                _recipe(f"quarot-gptq-moe-w{bits}", f"MoE: QuaRot offline rotation, {what}", transforms=rotation, **fmt),
                Recipe(name=f"moequant-w{bits}", description=f"MoEQuant: QuaRot offline rotation, {what} with "
                       "affinity-weighted expert Hessians (calibrate on EBSS text)",
                       rules=(experts, Rule(pattern=ALL, **fmt)), transforms=rotation)]
    return out


# MQuant (spec §3.0, §3.7): the vision tower and merger static per-tensor A8; the LLM W4 GPTQ per channel (MSE clip)
# with static A8, one scale per modality at every decoder linear (MSQ: the family's activation groups text/image).
VL_VISION = r"visual/.*"
VL_LLM = r"layers/.*"
# RMS (spec §3.4, §7.3): the online-Hadamard linears, LLM down_proj and vision fc2, each split where Eq. 9 holds.
VL_RMS = TransformStep("rms_split", {"tau": 1.0, "layers": r"layers/\d+/mlp/down_proj|visual/blocks/\d+/mlp/fc2"})


def _mquant_recipes() -> list[Recipe]:
    """``mquant-w4a8`` (visual W8A8 + LLM W4A8) and ``mquant-w4a8-vit4`` (visual W4A8): the ViT's LayerNorm -> RMSNorm
    conversion and rotation (online Hadamard before fc2), QuaRot (online Hadamard before down_proj), RMS and MSQ;
    ``quarot-w4a8-dynamic-vl``: the same rotations with per-token dynamic A8 (the latency/accuracy baseline of
    MQuant's Table 10); ``quarot-w4a8-static-vl``: the same rotations with one shared static A8 scale per
    decoder linear over text and image tokens (the single-scale baseline of Table 7)."""
    rotation = (TransformStep("vision_rotation", {}), TransformStep("quarot", {"online": ["down"]}))
    mquant = (*rotation, VL_RMS)
    llm_w4 = dict(weight=f"int4{SYMMETRIC_LOW_BIT}", weight_options=W4_MSE, algorithm="gptq")
    out = []
    for name, vision_weight in (("mquant-w4a8", "int8"), ("mquant-w4a8-vit4", f"int4{SYMMETRIC_LOW_BIT}")):
        vision = dict(weight=vision_weight, algorithm="gptq",
                      weight_options=W4_MSE if vision_weight != "int8" else None)
        vision = {k: v for k, v in vision.items() if v is not None}
        static = dict(activation="int8-tensor", static_activation=True)
        out.append(Recipe(name=name, description=f"MQuant: ViT LayerNorm -> RMSNorm + rotation (online fc2), QuaRot "
                          f"(online down), RMS split of fc2 / down_proj where Eq. 9 holds, visual {vision_weight} GPTQ "
                          "+ static per-tensor A8, LLM int4 GPTQ + static A8 per modality (MSQ); use prefill(aifs=True)",
                          rules=(Rule(pattern=VL_VISION, **vision, **static), Rule(pattern=VL_LLM, **llm_w4, **static)),
                          transforms=mquant))
    out.append(Recipe(name="quarot-w4a8-dynamic-vl", description="MQuant's dynamic baseline: ViT rotation (online "
                      "fc2), QuaRot (online down), visual int8 / LLM int4 GPTQ weights, per-token dynamic int8 "
                      "activations",
                      rules=(Rule(pattern=VL_VISION, weight="int8", activation="int8", algorithm="gptq"),
                             Rule(pattern=VL_LLM, activation="int8", **llm_w4)),
                      transforms=rotation))
    shared = dict(activation="int8-tensor", static_activation="shared")
    out.append(Recipe(name="quarot-w4a8-static-vl", description="MQuant's single-scale baseline: ViT rotation (online "
                      "fc2), QuaRot (online down), visual int8 / LLM int4 GPTQ weights, static per-tensor A8 with one "
                      "scale over text and image tokens",
                      rules=(Rule(pattern=VL_VISION, weight="int8", algorithm="gptq", **shared),
                             Rule(pattern=VL_LLM, **llm_w4, **shared)),
                      transforms=rotation))
    return out


# 6Bit-Diffusion (jquant.video_mixed): NVFP4 weights of each video DiT block's attention projections and
# feed-forward; their activations are routed NVFP4 / INT8 per step at run time by the method, not by the recipe.
VIDEO_ROUTED = r"transformer_blocks/\d+/(attn1/(to_q|to_k|to_v|to_out)|ff/(proj|out))"


VIDEO_HADAMARD = TransformStep("block_hadamard", {"layers": VIDEO_ROUTED, "block": 128})
"""6Bit-Diffusion's outlier smoothing: an online block Hadamard-128 before every routed linear (spec §3.1)."""


def _six_bit_diffusion_recipe() -> Recipe:
    return Recipe(name="6bit-diffusion", description="6Bit-Diffusion's weights: block Hadamard-128 rotation, then "
                  "NVFP4 attention projections and feed-forward of every video DiT block (adaLN, embeddings, head "
                  "float); `jquant quantize` of a text-to-video pipeline also calibrates the NVFP4/INT8 activation "
                  "predictor and the Temporal Delta Cache (six_bit_diffusion.json)",
                  transforms=(VIDEO_HADAMARD,), rules=(Rule(pattern=VIDEO_ROUTED, weight="nvfp4"),))


BUILTIN: dict[str, Recipe] = {
    r.name: r
    for r in (
        _recipe("rtn-w8a8", "int8 per-channel weights, int8 per-token dynamic activations, round to nearest",
                weight="int8", activation="int8"),
        _recipe("rtn-w8a8-static", "int8 per-channel weights, int8 activations with one calibrated scale per layer",
                weight="int8", activation="int8-tensor", static_activation=True),
        _recipe("rtn-w8", "int8 per-channel weights, round to nearest", weight="int8"),
        _recipe("rtn-w4g128", "int4 asymmetric weights in groups of 128, round to nearest", weight="int4-g128-asym"),
        _recipe("rtn-w4g64", "int4 asymmetric weights in groups of 64, round to nearest", weight="int4-g64-asym"),
        _recipe("rtn-w3g128", "int3 asymmetric weights in groups of 128, round to nearest", weight="int3-g128-asym"),
        _recipe("rtn-w2g64", "int2 asymmetric weights in groups of 64, round to nearest", weight="int2-g64-asym"),
        _recipe("gptq-w8", "int8 per-channel weights, GPTQ", weight="int8", algorithm="gptq"),
        _recipe("gptq-w4g128", "int4 asymmetric weights in groups of 128, GPTQ", weight="int4-g128-asym", algorithm="gptq"),
        _recipe("gptq-w4g64", "int4 asymmetric weights in groups of 64, GPTQ", weight="int4-g64-asym", algorithm="gptq"),
        _recipe("gptq-w3g128", "int3 asymmetric weights in groups of 128, GPTQ", weight="int3-g128-asym", algorithm="gptq"),
        _recipe("gptq-w2g64", "int2 asymmetric weights in groups of 64, GPTQ", weight="int2-g64-asym", algorithm="gptq"),
        _recipe("fp8-w8a8", "fp8 e4m3 per-channel weights, fp8 e4m3 per-token dynamic activations",
                weight="fp8-e4m3", activation="fp8-e4m3"),
        _recipe("fp8-w8a16", "fp8 e4m3 per-channel weights only", weight="fp8-e4m3"),
        _recipe("nvfp4-w4a16", "NVFP4 weights (E2M1, 16-blocks, E4M3 block scales, fp32 tensor scale)", weight="nvfp4"),
        _recipe("mxfp4-w4a16", "MXFP4 weights (E2M1, 32-blocks, E8M0 scales)", weight="mxfp4"),
        *_rotation_recipes(),
        *_mamba_recipes(),
        *_vq_recipes(),
        *_moe_recipes(),
        *_mquant_recipes(),
        _six_bit_diffusion_recipe(),
    )
}


def list_recipes() -> list[Recipe]:
    return list(BUILTIN.values())


def get(name: str, *, transform_options: dict | None = None, **rule_overrides) -> Recipe:
    """A built-in recipe by name.

    ``rule_overrides`` replace fields of its rule (e.g. ``options={"damp": 0.1}``);
    ``transform_options`` update the options of its transform steps (e.g.
    ``{"steps": 50}`` for OSTQuant), the ones each step knows being validated by ``quantize``.
    """
    if name not in BUILTIN:
        raise ValueError(f"unknown recipe {name!r}; built-in recipes: {', '.join(BUILTIN)}. "
                         "Custom recipes: Recipe(...) or Recipe.from_file(path).")
    recipe = BUILTIN[name]
    if transform_options:
        if not recipe.transforms:
            raise ValueError(f"recipe {name!r} has no transform steps to pass options {sorted(transform_options)} to.")
        steps = tuple(TransformStep(t.kind, {**dict(t.options), **transform_options}) for t in recipe.transforms)
        recipe = dataclasses.replace(recipe, transforms=steps)
    if not rule_overrides:
        return recipe
    rules = tuple(dataclasses.replace(r, **rule_overrides) for r in recipe.rules)
    return dataclasses.replace(recipe, rules=rules)
