"""WKVQuant (Yue et al., 2024): 4-bit weights and 4-bit KV cache, activations in full precision.

Three parts (spec §3; the paper's code is not public, the exact forms are the spec's reconstruction):

1. **Past-only quantization** (§3.2): the current token attends to its own key and value exactly;
   ``KVCacheConfig(past_only=True)``.
2. **Two-dimensional KV quantization** (§3.3): static per-channel smoothing
   ``x~ = (x - shift) / scale`` (``jquant.kv.smoothing.KVSmoothing``; keys after RoPE) then dynamic
   per-token min-max quantization in groups of ``head_dim`` channels. Initialised from the
   calibration range: ``shift_c = (max_c + min_c) / 2``, ``scale_c = max((max_c - min_c) / 2, 1e-5)``.
3. **Cross-block reconstruction regularisation** (§3.4) with OmniQuant's learnable weight clipping
   (§3.1). Block ``i`` is trained alone, in order; its loss compares the output of the next
   ``crr_depth`` full-precision blocks::

       L_i = mean | F_{i+k}..F_{i+1}( F^_i(X_i^q) ) - F_{i+k}..F_{i+1}( F_i(X_i^fp) ) |

   ``F^_i`` is block ``i`` with fake-quantized weights (per output channel and group of
   ``weight_group`` inputs: ``h = (sig(gamma) max w - sig(beta) min w) / (2^b - 1)``,
   ``z = -round(sig(beta) min w / h)``, ``w^ = (clip(round(w / h) + z, 0, 2^b - 1) - z) h``, rounding
   straight-through) and its KV quantized as in 2 with past-only attention; ``X_i^q`` is the output of
   the already quantized blocks, ``X_i^fp`` the full-precision one. The trainable parameters are
   ``gamma, beta`` of the block's linears (lr 1e-2) and the smoothing ``shift, scale`` (lr 5e-3),
   AdamW without weight decay, batch 1. After training the weights are stored as ``int4`` group
   QArrays with the learned scales and zero points (``IntFormat.quantize_with_scales``).

The algorithm uses only the block protocol (``model.blocks()``, ``model.block_inputs(tokens)``,
``block.calibration_forward(hidden, context)``), ``jquant.sites`` and the attention layers'
``kv_cache``/``kv_smoothing`` attributes; it imports no model family. ``train_blocks`` is the training;
the entry point ``jquant.methods.wkvquant.wkvquant`` adds the weights' ``QuantizationReport``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jquant.formats import IntFormat
from jquant.kv.cache import KVCacheConfig
from jquant.kv.calibrate import attention_layers, capture_kv, set_kv_cache
from jquant.kv.quantizer import KVQuantizer
from jquant.kv.smoothing import KVSmoothing
from jquant.calib.sequential import BlockVisit, walk_blocks
from jquant.sites import find_sites

LWC_INIT = 4.0  # sigmoid(4) = 0.982: almost no clipping at the start (OmniQuant)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WKVQuantConfig:
    """WKVQuant settings (spec §3.5). ``weight_bits=None`` leaves the weights in full precision (KV only)."""

    weight_bits: int | None = 4
    weight_group: int = 128
    key_bits: float = 4
    value_bits: float = 4
    kv_group: int | None = None  # channels per KV group; None: head_dim
    meta_dtype: str = "float16"
    crr_depth: int = 1
    loss: str = "mae"
    epochs: int = 5
    lr_clipping: float = 1e-2
    lr_smoothing: float = 5e-3
    learn_smoothing: bool = True
    smoothing: bool = True
    past_only: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.loss not in ("mae", "mse"):
            raise ValueError(f"WKVQuantConfig.loss must be 'mae' or 'mse', got {self.loss!r}.")
        if self.crr_depth < 0 or self.epochs < 0:
            raise ValueError("WKVQuantConfig: crr_depth and epochs must be >= 0.")


@dataclasses.dataclass(frozen=True)
class WKVQuantReport:
    """Per block: the CRR loss before and after training; the total seconds."""

    loss_before: list[float]
    loss_after: list[float]
    seconds: float


def _round_ste(u):
    return u + jax.lax.stop_gradient(jnp.round(u) - u)


def _lwc_range(w: jax.Array, gamma: jax.Array, beta: jax.Array, bits: int, group: int):
    """Grouped ``w [G, group, out]`` (float32), step ``h`` and clipped minimum ``sig(beta) min w``, each ``[G, 1, out]``."""
    n_in, n_out = w.shape
    wg = w.astype(jnp.float32).reshape(n_in // group, group, n_out)
    hi = jax.nn.sigmoid(gamma)[:, None] * wg.max(axis=1, keepdims=True)
    lo = jax.nn.sigmoid(beta)[:, None] * wg.min(axis=1, keepdims=True)
    return wg, jnp.maximum((hi - lo) / (2 ** bits - 1), 1e-8), lo


def lwc_fake_quantize(w: jax.Array, gamma: jax.Array, beta: jax.Array, bits: int, group: int) -> jax.Array:
    """OmniQuant's learnable weight clipping on ``w [in, out]`` with ``gamma, beta [in // group, out]``."""
    wg, h, lo = _lwc_range(w, gamma, beta, bits, group)
    z = -_round_ste(lo / h)
    q = jnp.clip(_round_ste(wg / h) + z, 0, 2 ** bits - 1)
    return ((q - z) * h).reshape(w.shape).astype(w.dtype)


def _lwc_scales(w: jax.Array, gamma: jax.Array, beta: jax.Array, bits: int, group: int):
    """The learned step and zero point per group ``[G, out]``, as ``IntFormat.quantize_with_scales`` takes them."""
    _, h, lo = _lwc_range(w, gamma, beta, bits, group)
    return h[:, 0], jnp.clip(-jnp.round(lo / h), 0, 2 ** bits - 1)[:, 0]


def _kv_config(cfg: WKVQuantConfig, head_dim: int) -> KVCacheConfig:
    g = cfg.kv_group or head_dim
    return KVCacheConfig(key=KVQuantizer(bits=cfg.key_bits, group_size=g, meta_dtype=cfg.meta_dtype),
                         value=KVQuantizer(bits=cfg.value_bits, group_size=g, meta_dtype=cfg.meta_dtype),
                         past_only=cfg.past_only)


def _initial_smoothing(samples) -> tuple[np.ndarray, ...]:
    k_lo, k_hi = samples.channel_range(samples.k)
    v_lo, v_hi = samples.channel_range(samples.v)
    return ((k_hi + k_lo) / 2, np.maximum((k_hi - k_lo) / 2, 1e-5), (v_hi + v_lo) / 2, np.maximum((v_hi - v_lo) / 2, 1e-5))


def train_blocks(model: nnx.Module, calib_tokens: np.ndarray, config: WKVQuantConfig = WKVQuantConfig(), *,
                 progress: bool = True) -> tuple[nnx.Module, WKVQuantReport]:
    """A copy of ``model`` with WKVQuant's W4 weights, smoothed KV4 cache and past-only attention, trained block by
    block (parts 1-3 above).

    The stored int4 weights carry no ``quantization`` report: ``jquant.methods.wkvquant.wkvquant`` (which sits
    above ``jquant.quantize``) runs this and adds it, so ``jquant.save`` / ``load`` rebuild their formats.
    """
    t0 = time.perf_counter()
    calib_tokens = np.asarray(calib_tokens)
    reference, out = nnx.clone(model), nnx.clone(model)
    attn_paths = list(attention_layers(out))
    samples = capture_kv(model, calib_tokens) if config.smoothing else {}
    ref_blocks, blocks = reference.blocks(), out.blocks()
    if len(attn_paths) != len(blocks):
        raise ValueError(f"wkvquant: {len(attn_paths)} attention layers for {len(blocks)} blocks; one per block expected.")
    if config.weight_bits is not None:
        for site in (s for b in blocks for s in find_sites(b)):
            if site.weight.get_value().shape[0] % config.weight_group:
                raise ValueError(f"wkvquant: weight_group={config.weight_group} does not divide the input size "
                                 f"{site.weight.get_value().shape[0]} of {site.path}.")
    before, after, x_fp = [], [], []

    def visit(v: BlockVisit) -> None:
        """Train block ``v.index`` on the quantized stream ``v.inputs`` against the float stream ``x_fp``."""
        i, block = v.index, v.block
        if i == 0:
            x_fp.extend(h for h, _ in v.inputs)
        (attn_path, attn), = attention_layers(block).items()
        set_kv_cache(block, {attn_path: _kv_config(config, attn.cfg.head_dim)})
        if config.smoothing:
            attn.kv_smoothing = KVSmoothing(*(jnp.asarray(a, jnp.float32)
                                              for a in _initial_smoothing(samples[attn_paths[i]])))
        following = ref_blocks[i + 1:i + 1 + config.crr_depth]
        x_fp[:] = [v.forward(ref_blocks[i], h, c) for h, (_, c) in zip(x_fp, v.inputs)]
        x_q = jnp.concatenate([h for h, _ in v.inputs])
        context = jnp.concatenate([c for _, c in v.inputs])
        loss_b, loss_a = _train_block(block, following, x_q, jnp.concatenate(x_fp), context, config)
        before.append(loss_b)
        after.append(loss_a)

    walk_blocks(out, calib_tokens, visit, batch_size=FORWARD_BATCH, capture=False, description="wkvquant",
                progress=progress, final_states=False)
    return out, WKVQuantReport(loss_before=before, loss_after=after, seconds=time.perf_counter() - t0)


FORWARD_BATCH = 4
"""Calibration sequences per block forward (the walker's batch); training uses all of them at once."""


def _train_block(block, following, x_q, target_in, context, config: WKVQuantConfig) -> tuple[float, float]:
    """Learn block's clipping and smoothing on the CRR loss; then store its weights quantized. Returns losses."""
    sites = find_sites(block) if config.weight_bits is not None else []
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
    kernel_keys = {s.path: next(k for k in flat if "/".join(map(str, k)) == f"{s.path}/{s.spec.param}") for s in sites}
    smooth_keys = [k for k in flat if "kv_smoothing" in map(str, k)]
    g = config.weight_group
    theta = {
        # float32, not weakly typed (a Python fill value): the updated values are float32, and a weak first input
        # would compile the training step and the loss once more per block
        "lwc": {p: (jnp.full((flat[k].shape[0] // g, flat[k].shape[1]), LWC_INIT, jnp.float32),) * 2
                for p, k in kernel_keys.items()},
        "smooth": {"/".join(map(str, k)): flat[k].get_value() for k in smooth_keys} if config.learn_smoothing else {},
    }
    fixed = {k: v.get_value() for k, v in flat.items()}
    follow = [nnx.split(b) for b in following]

    def quantized_forward(th, x, ctx):
        values = dict(fixed)
        for p, k in kernel_keys.items():
            gamma, beta = th["lwc"][p]
            values[k] = lwc_fake_quantize(fixed[k], gamma, beta, config.weight_bits, g)
        for k in smooth_keys:
            name = "/".join(map(str, k))
            if name in th["smooth"]:
                values[k] = th["smooth"][name]
        state = nnx.from_flat_state([(k, flat[k].replace(values[k])) for k in flat])
        y = nnx.merge(graphdef, state, rest).calibration_forward(x, ctx)
        for gd, st in follow:
            y = nnx.merge(gd, st).calibration_forward(y, ctx)
        return y

    def target_forward(y, ctx):
        for gd, st in follow:
            y = nnx.merge(gd, st).calibration_forward(y, ctx)
        return y

    def loss_fn(th, x, y, ctx):
        d = quantized_forward(th, x, ctx).astype(jnp.float32) - y.astype(jnp.float32)
        return jnp.mean(jnp.abs(d)) if config.loss == "mae" else jnp.mean(d * d)

    target_step = jax.jit(target_forward)
    targets = jnp.concatenate([target_step(target_in[j:j + 1], context[j:j + 1]) for j in range(target_in.shape[0])])
    labels = {"lwc": jax.tree.map(lambda _: "lwc", theta["lwc"]), "smooth": jax.tree.map(lambda _: "smooth", theta["smooth"])}
    opt = optax.multi_transform({"lwc": optax.adam(config.lr_clipping), "smooth": optax.adam(config.lr_smoothing)}, labels)
    opt_state = opt.init(theta)
    step = jax.jit(lambda th, st, x, y, ctx: _update(loss_fn, opt, th, st, x, y, ctx))
    eval_loss = jax.jit(loss_fn)

    def mean_loss(th):
        return float(np.mean([eval_loss(th, x_q[j:j + 1], targets[j:j + 1], context[j:j + 1]) for j in range(len(x_q))]))

    before = mean_loss(theta)
    rng = np.random.default_rng(config.seed)
    trainable = bool(kernel_keys) or bool(theta["smooth"])
    for _ in range(config.epochs if trainable else 0):
        for j in rng.permutation(len(x_q)):
            theta, opt_state = step(theta, opt_state, x_q[j:j + 1], targets[j:j + 1], context[j:j + 1])
    after = mean_loss(theta)
    for k in smooth_keys:
        name = "/".join(map(str, k))
        if name in theta["smooth"]:
            flat[k].set_value(theta["smooth"][name])
    fmt = IntFormat(bits=config.weight_bits, symmetric=False, group_size=g) if config.weight_bits else None
    for s in sites:
        w = fixed[kernel_keys[s.path]]
        scales, zeros = _lwc_scales(w, *theta["lwc"][s.path], config.weight_bits, g)
        s.weight.set_value(fmt.quantize_with_scales(w, scales, zeros, axis=0))
    nnx.update(block, nnx.from_flat_state(list(flat.items())))
    return before, after


def _update(loss_fn, opt, theta, opt_state, x, y, ctx):
    grads = jax.grad(loss_fn)(theta, x, y, ctx)
    updates, opt_state = opt.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state
