"""A small convolutional image classifier: the judge behind prompt accuracy and the FD-emoji distance.

jquant trains it on its own emoji image set (``jquant.data.emoji``): it tells which glyph a generated
image shows (prompt accuracy), and its penultimate features are what the Fréchet distance "FD-emoji"
compares (never called FID: it is not Inception, and its numbers do not compare with published FIDs).

Architecture (channels last, ``images [B, H, W, 3]`` in ``[-1, 1]``)::

    h = SiLU(conv3x3(images))                             stem, width c_0
    for each width c_i (i >= 1): h = SiLU(conv3x3(h)); h = SiLU(conv3x3 stride 2(h))
    f = SiLU(W_f · mean_{H,W}(h) + b_f)                   features [B, feature_dim]
    logits = W_o · f + b_o                                [B, num_classes]

Convolutions and linears go through ``models.layers`` (so it quantizes like any family, though it is a
measuring instrument and is kept in float).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.models.config_io import check_dtypes_available, dataclass_config_from_json, dataclass_config_to_json
from jquant.models.family import Family
from jquant.models.layers import Conv, Linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageClassifierConfig:
    """Sizes of an ``ImageClassifier``; ``image_size`` is the square input resolution it was trained at."""

    num_classes: int
    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        for name in ("num_classes", "image_size", "feature_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageClassifierConfig.{name} must be a positive int, got {value!r}.")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"ImageClassifierConfig.widths must be positive channel counts, got {self.widths!r}.")
        if self.image_size % 2 ** (len(self.widths) - 1):
            raise ValueError(f"ImageClassifierConfig: image_size={self.image_size} must be divisible by "
                             f"2^{len(self.widths) - 1} (one stride-2 stage per width after the first).")

    def replace(self, **changes) -> ImageClassifierConfig:
        return dataclasses.replace(self, **changes)


class ImageClassifier(nnx.Module):
    """See the module docstring. ``__call__(images)`` -> logits; ``features(images)`` -> ``[B, feature_dim]``."""

    def __init__(self, config: ImageClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = jnp.dtype(config.param_dtype)

        def conv(c_in: int, c_out: int, stride: int = 1) -> Conv:
            return Conv(c_in, c_out, (3, 3), stride=stride, padding=1, use_bias=True, param_dtype=pd, rngs=rngs,
                        init_std=(2.0 / (9 * c_in)) ** 0.5)

        widths = config.widths
        self.stem = conv(3, widths[0])
        self.stages = nnx.List([nnx.List([conv(widths[i - 1], widths[i]), conv(widths[i], widths[i], stride=2)])
                                for i in range(1, len(widths))])
        self.feature = Linear(widths[-1], config.feature_dim, use_bias=True, sharding=(None, None), param_dtype=pd,
                              rngs=rngs, init_std=widths[-1] ** -0.5)
        self.head = Linear(config.feature_dim, config.num_classes, use_bias=True, sharding=(None, None),
                           param_dtype=pd, rngs=rngs, init_std=config.feature_dim ** -0.5)

    def _check(self, images: jax.Array) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"ImageClassifier: images must be [B, {size}, {size}, 3] (channels last, in [-1, 1]); "
                             f"got shape {tuple(images.shape)}. Resize generated images to the classifier's "
                             "resolution first.")

    def features(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3]`` -> the penultimate features ``[B, feature_dim]`` (what FD-emoji compares)."""
        self._check(images)
        h = jax.nn.silu(self.stem(images.astype(jnp.dtype(self.config.dtype))))
        for conv, down in self.stages:
            h = jax.nn.silu(down(jax.nn.silu(conv(h))))
        return jax.nn.silu(self.feature(h.mean(axis=(1, 2))))

    def __call__(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3]`` -> logits ``[B, num_classes]``."""
        return self.head(self.features(images))


def init_model(config: ImageClassifierConfig, key: jax.Array) -> ImageClassifier:
    """A randomly initialised classifier (He-normal convolutions)."""
    check_dtypes_available(config)
    return ImageClassifier(config, rngs=nnx.Rngs(params=key))


def abstract_model(config: ImageClassifierConfig) -> ImageClassifier:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return nnx.eval_shape(lambda: ImageClassifier(config, rngs=nnx.Rngs(0)))


FAMILY = Family(
    name="image_classifier",
    config_class=ImageClassifierConfig,
    model_class=ImageClassifier,
    init_model=init_model,
    abstract_model=abstract_model,
    config_to_json=dataclass_config_to_json,
    config_from_json=functools.partial(dataclass_config_from_json, ImageClassifierConfig),
    checkpoint_protocol="the manifest's config holds the ImageClassifierConfig fields "
                        "(config_io.dataclass_config_to_json).",
    presets={
        # the judge of the 32-glyph reference vocabulary at 32x32 (experiments/train_image_models.py)
        "jq-emoji-classifier": ImageClassifierConfig(num_classes=32, image_size=32),
    },
    keep_float=("stem", "head"),
)
