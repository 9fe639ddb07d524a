"""Training and scoring a Qwen2-VL model on the VQA set (``jquant.data.vqa_scenes``): jq-vl-tiny.

Prompts (``encode_prompt``): ``<eos>`` (the corpus' start token), then the text of
``vqa_scenes.format_prompt(question)`` with each ``<image>`` replaced by ``<|vision_start|>``, one
``<|image_pad|>`` per merged image feature, ``<|vision_end|>``; the target is ``" " + answer`` then ``<eos>``.
A text-only prompt (``image=False``) drops the image placeholder. Rows are right-padded to one length with
``<|pad|>`` (the decoder is causal, so padding after a row changes none of its logits).

Loss (``answer_loss``): next-token cross-entropy on the answer tokens and the closing ``<eos>`` only,
``sum_t w_t CE(logits_t, token_{t+1}) / sum_t w_t`` with ``w_t = 1`` where ``token_{t+1}`` belongs to the
target.

Accuracy (``score``): greedy exact match. Greedy decoding emits the answer's tokens and then ``<eos>`` iff
each of them is the argmax of the logits given the gold prefix (by induction on the position), so one
teacher-forced forward pass of the padded batch gives the exact-match of greedy decoding without a decode
loop.

``extend_tokenizer`` adds the four vision tokens (ids 4096-4099 after jq-llama-tiny's 4096) and
``vl_from_lm`` builds a Qwen2-VL model whose decoder is a bundled Llama LM's (the embedding and lm_head
grown by the new rows, drawn N(0, 0.02²); the q/k/v biases stay zero, so text-only logits are the LM's on
its vocabulary) and whose vision tower is random.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.data.vqa_scenes import VQAScenes, format_prompt
from jquant.models.qwen2_vl_model import Qwen2VL, Qwen2VLConfig, init_model, rope_index
from jquant.models.qwen2_vl_vision import images_to_patches
from jquant.module_jit import module_jit

IMAGE_MARK = "<image>"
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""The tokenizer's names of ``image_token_id``, ``video_token_id``, ``vision_start_token_id``, ``vision_end_token_id``."""
NEW_ROW_STD = 0.02


# ------------------------------------------------------------------------ tokenizer and initialisation


def extend_tokenizer(tokenizer, cfg: Qwen2VLConfig):
    """``tokenizer`` (a copy) with :data:`VISION_TOKENS` added as special tokens at ``cfg``'s four ids."""
    import copy

    ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    if sorted(ids) != list(range(len(tokenizer), len(tokenizer) + 4)):
        raise ValueError(f"the config's vision token ids {ids} must be the four ids after the tokenizer's "
                         f"{len(tokenizer)} tokens ({len(tokenizer)}..{len(tokenizer) + 3}).")
    extended = copy.deepcopy(tokenizer)
    for token, wanted in sorted(zip(VISION_TOKENS, ids), key=lambda pair: pair[1]):
        extended.add_tokens([token], special_tokens=True)
        if extended.convert_tokens_to_ids(token) != wanted:
            raise ValueError(f"adding {token!r} gave id {extended.convert_tokens_to_ids(token)}, expected {wanted}.")
    return extended


def check_tokenizer(tokenizer, cfg: Qwen2VLConfig) -> None:
    """Refuse a tokenizer whose vision tokens are not at the model's ids (e.g. an LM's tokenizer)."""
    ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    got = tuple(tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    if got != ids:
        raise ValueError(f"the tokenizer maps {VISION_TOKENS} to {got}, but the model expects {ids}; use the "
                         "tokenizer saved with the model (jquant.train.vl.extend_tokenizer).")


def vl_from_lm(lm: nnx.Module, cfg: Qwen2VLConfig, key: jax.Array) -> Qwen2VL:
    """A ``Qwen2VL`` of ``cfg`` with ``lm``'s decoder weights (a Llama-family LM of the same shape and a
    vocabulary of ``cfg.vocab_size - 4``), new vocabulary rows ~ N(0, 0.02²), a random vision tower."""
    init_key, row_key = jax.random.split(key)
    model = init_model(cfg, init_key)
    lm_state = dict(nnx.to_flat_state(nnx.state(lm, nnx.Param)))
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "visual" or path not in lm_state:
            if path[0] != "visual" and path[-1] != "bias":
                raise ValueError(f"the LM has no parameter {'/'.join(map(str, path))}; it must be a Llama-family "
                                 "decoder of the VL model's text shape.")
            flat.append((path, var))
            continue
        value = jnp.asarray(lm_state[path][...], var.dtype)
        if value.shape != var.shape:
            axis = [a for a, (x, y) in enumerate(zip(value.shape, var.shape)) if x != y]
            if len(axis) != 1 or var.shape[axis[0]] - value.shape[axis[0]] != 4:
                raise ValueError(f"LM parameter {'/'.join(map(str, path))} has shape {value.shape}; the VL model "
                                 f"needs {var.shape} (the same but 4 more vocabulary rows).")
            row_key, sub = jax.random.split(row_key)
            shape = list(var.shape)
            shape[axis[0]] = 4
            rows = NEW_ROW_STD * jax.random.normal(sub, shape, jnp.float32)
            value = jnp.concatenate([value, rows.astype(var.dtype)], axis=axis[0])
        flat.append((path, var.replace(value)))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


# ------------------------------------------------------------------------ prompts and batches


def image_tokens(cfg: Qwen2VLConfig, image_size: tuple[int, int]) -> int:
    """Merged image features (placeholders) of one ``H x W`` image."""
    v = cfg.vision
    h, w = image_size
    return (h // v.patch_size) * (w // v.patch_size) // v.merge_unit


def encode_prompt(tokenizer, cfg: Qwen2VLConfig, text: str, num_images: int, tokens_per_image: int) -> list[int]:
    """``<eos>`` + ``text`` with each :data:`IMAGE_MARK` replaced by an image's placeholder block."""
    pieces = text.split(IMAGE_MARK)
    if len(pieces) - 1 != num_images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_MARK} placeholder(s) but {num_images} image(s) were "
                         f"given; put one {IMAGE_MARK} where each image goes.")
    block = [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens_per_image + [cfg.vision_end_token_id]
    ids = [tokenizer.eos_token_id]
    for i, piece in enumerate(pieces):
        ids += block if i else []
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
    return ids


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The target: ``" " + answer`` then ``<eos>``."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclasses.dataclass(frozen=True)
class EncodedSet:
    """A VQA set as padded rows: ``tokens [n, L]`` (prompt + target + pad), ``at [n, K]`` (the inputs whose next
    token is a target token, a row's last one repeated up to ``K``), ``positions [n, L, 3]``, the ``images
    [n, R, R, 3]`` uint8 (None for text-only rows) and the question ``kinds``."""

    tokens: np.ndarray
    at: np.ndarray
    positions: np.ndarray
    images: np.ndarray | None
    kinds: list[str]

    @property
    def num_targets(self) -> int:
        return int(np.sum(self.at[:, 1:] != self.at[:, :-1]) + len(self.at))


def encode_set(vqa: VQAScenes, tokenizer, cfg: Qwen2VLConfig, length: int, *, image: bool = True) -> EncodedSet:
    """Rows of ``vqa`` (``image=False``: text-only prompts without the image) right-padded to ``length``."""
    size = vqa.images.shape[1:3]
    per_image = image_tokens(cfg, size)
    n = len(vqa.questions)
    tokens = np.full((n, length), tokenizer.pad_token_id, np.int32)
    spans = []
    for i, (question, answer) in enumerate(zip(vqa.questions, vqa.answers)):
        prompt = encode_prompt(tokenizer, cfg, format_prompt(question, IMAGE_MARK if image else ""), int(image),
                               per_image)
        row = prompt + answer_ids(tokenizer, answer)
        if len(row) > length:
            raise ValueError(f"item {i} needs {len(row)} tokens but rows hold length={length}; raise the length.")
        tokens[i, :len(row)] = row
        spans.append(np.arange(len(prompt) - 1, len(row) - 1))
    k = max(map(len, spans))
    at = np.stack([np.concatenate([s, np.full(k - len(s), s[-1])]) for s in spans]).astype(np.int32)
    grid = np.array([[1, size[0] // cfg.vision.patch_size, size[1] // cfg.vision.patch_size]]) if image else None
    positions = np.concatenate([rope_index(cfg, tokens[i:i + 1], grid).positions for i in range(n)])
    return EncodedSet(tokens, at, positions, vqa.images if image else None, list(vqa.kinds))


def required_length(vqa: VQAScenes, tokenizer, cfg: Qwen2VLConfig, *, image: bool = True) -> int:
    """The longest prompt + target of ``vqa`` (with the image, or text-only) in tokens."""
    per_image = image_tokens(cfg, vqa.images.shape[1:3])
    return max(len(encode_prompt(tokenizer, cfg, format_prompt(q, IMAGE_MARK if image else ""), int(image), per_image))
               + len(answer_ids(tokenizer, a)) for q, a in zip(vqa.questions, vqa.answers))


def make_batch(data: EncodedSet, rows: np.ndarray, cfg: Qwen2VLConfig) -> dict:
    """The arrays of ``rows``: ``tokens``, ``at`` (target positions), ``positions`` and (with images) ``pixel_values [B, P, K]``."""
    batch = {"tokens": data.tokens[rows], "at": data.at[rows], "positions": data.positions[rows]}
    if data.images is not None:
        pixels, _ = images_to_patches(data.images[rows].astype(np.float32) / 255.0, cfg.vision)
        batch["pixel_values"] = pixels.reshape(len(rows), -1, pixels.shape[-1])
    return batch


def vision_context(model: Qwen2VL, image_size: tuple[int, int]) -> tuple:
    """The vision tower's context of one ``H x W`` image (shared by every row of a batch)."""
    p = model.config.vision.patch_size
    grid = np.array([[1, image_size[0] // p, image_size[1] // p]])
    return model.visual.context(grid, int(np.prod(grid)))


# ------------------------------------------------------------------------ loss and scoring


def _target_logits(model: Qwen2VL, batch: dict, context) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logits [B, K, V], targets [B, K], mask [B, K])`` at ``batch["at"]``: the decoder runs on every token, the
    output head only where a target is predicted (the answer is a few tokens of a long prompt)."""
    tokens, at = batch["tokens"], batch["at"]
    images = "pixel_values" in batch
    x = model.embed(tokens, batch.get("pixel_values"), context if images else None)
    layer_context = (batch["positions"], model.modality(tokens))
    for layer in model.layers:
        x, _ = layer(x, layer_context, None, None)
    h = model.norm(jnp.take_along_axis(x, at[..., None], axis=1))
    logits = model.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h)
    targets = jnp.take_along_axis(tokens, at + 1, axis=1)
    first = jnp.concatenate([jnp.ones_like(at[:, :1], bool), at[:, 1:] != at[:, :-1]], axis=1)  # padding repeats
    return logits.astype(jnp.float32), targets, first


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def answer_loss(model: Qwen2VL, batch: dict, context) -> jax.Array:
    """Mean cross-entropy over the target tokens of ``batch`` (module docstring)."""
    logits, targets, mask = _target_logits(model, batch, context)
    return jnp.sum(mask * _nll(logits, targets)) / jnp.sum(mask)


@module_jit
def _row_scores(model: Qwen2VL, batch: dict, context) -> tuple[jax.Array, jax.Array]:
    """Per row: greedy exact match (bool) and the summed target cross-entropy."""
    logits, targets, mask = _target_logits(model, batch, context)
    hit = jnp.all(jnp.argmax(logits, axis=-1) == targets, axis=1)  # padding repeats a real target
    return hit, jnp.sum(mask * _nll(logits, targets), axis=1)


def score(model: Qwen2VL, data: EncodedSet, *, batch_size: int = 64) -> dict:
    """Greedy exact-match accuracy per question kind and overall, and the mean target loss per token."""
    n = len(data.tokens)
    context = vision_context(model, data.images.shape[1:3]) if data.images is not None else None
    hits, nll = [], []
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size) % n  # the last batch wraps around (one compiled shape)
        h, l = _row_scores(model, make_batch(data, rows, model.config), context)
        keep = min(batch_size, n - start)
        hits.append(np.asarray(h)[:keep]), nll.append(np.asarray(l)[:keep])
    hits_all, nll_all = np.concatenate(hits), np.concatenate(nll)
    kinds = np.array(data.kinds)
    per_kind = {k: float(hits_all[kinds == k].mean()) for k in dict.fromkeys(data.kinds)}
    return {"accuracy": float(hits_all.mean()), "per_kind": per_kind, "items": n,
            "target_loss": float(nll_all.sum() / data.num_targets)}


def batch_sampler(data: EncodedSet, cfg: Qwen2VLConfig, batch_size: int, seed: int):
    """``sample_batch(step)`` for ``loop.fit``: ``batch_size`` rows drawn from ``default_rng([seed, step])``."""
    def sample(step: int) -> dict:
        rows = np.random.default_rng([seed, step]).integers(len(data.tokens), size=batch_size)
        return {k: jnp.asarray(v) for k, v in make_batch(data, rows, cfg).items()}

    return sample


def check_image(image: np.ndarray, cfg: Qwen2VLConfig, expected: Sequence[int] | None, *, argument: str) -> None:
    """Refuse an image ``[H, W, C]`` of the wrong channel count, a size the merger cannot take, or (when
    ``expected`` is given) another size than the model was trained on."""
    if image.ndim != 3 or image.shape[-1] != cfg.vision.in_channels:
        channels = 1 if image.ndim == 2 else image.shape[-1]
        raise ValueError(f"{argument}: the model takes {cfg.vision.in_channels}-channel (RGB) images, got {channels} "
                         f"channel(s) (shape {image.shape}); convert it to RGB first.")
    h, w = image.shape[:2]
    if expected is not None and (h, w) != tuple(expected):
        raise ValueError(f"{argument}: the model was trained on {expected[0]}x{expected[1]} images, got {h}x{w}; "
                         "resize it first (or pass --resize).")
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    if h % unit or w % unit:
        raise ValueError(f"{argument}: a {h}x{w} image cannot be merged: height and width must be multiples of "
                         f"patch_size * spatial_merge_size = {unit} px; resize it first (or pass --resize).")


def export(model: Qwen2VL, tokenizer, folder, info: dict, *, history: list[dict] | None = None,
           overwrite: bool = False) -> None:
    """Write ``model`` as a Hugging Face Qwen2-VL folder with ``tokenizer`` (with the vision tokens),
    ``reference_info.json`` (``info``; its ``image_size`` is the size ``jquant generate`` expects) and, given a
    ``history``, ``loss_curve.png``."""
    import json
    from pathlib import Path

    from jquant.models.qwen2_vl_hf import to_hf
    from jquant.train.loop import plot_history

    check_tokenizer(tokenizer, model.config)

    def extra(target: Path) -> None:
        tokenizer.save_pretrained(target)
        (target / "reference_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if history:
            plot_history(history, target / "loss_curve.png", title=info.get("name", "vl"),
                         ylabel="answer cross-entropy / (1 - validation accuracy)")

    to_hf(model, folder, extra_files=extra, overwrite=overwrite)
