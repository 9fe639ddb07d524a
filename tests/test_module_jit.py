"""``module_jit``: a compiled call over a module leaves the arrays it did not change in place (no copy of the
model per call), propagates the ones it changed, and computes what ``nnx.jit`` computes; ``quantize`` therefore
shares the caller's float arrays instead of copying the model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jquant.models import llama
from jquant.module_jit import module_jit
from jquant.quantization import quantize
from jquant.recipes import get

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def _arrays(module: nnx.Module) -> dict:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module))}


def test_a_forward_keeps_every_array_and_equals_nnx_jit():
    model = llama.init_model(CFG, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    before = _arrays(model)
    ours = module_jit(lambda m, t: m(t))(model, tokens)
    after = _arrays(model)
    assert before.keys() == after.keys()
    assert all(after[p] is before[p] for p in before), "a read-only call replaced arrays of the module"
    reference = nnx.jit(lambda m, t: m(t))(nnx.clone(model), tokens)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_a_training_step_updates_exactly_what_nnx_jit_updates():
    def step(model, optimizer, tokens):
        def loss(m):
            logits = m(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 10)), jnp.int32)
    results = []
    for jit in (module_jit, nnx.jit):
        model = llama.init_model(CFG, jax.random.key(3))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        compiled = jit(step)
        losses = [float(compiled(model, optimizer, tokens)) for _ in range(3)]
        results.append((losses, _arrays(model)))
    (ours, ours_state), (reference, reference_state) = results
    assert ours == reference and ours[2] < ours[0]
    for path, value in reference_state.items():
        np.testing.assert_array_equal(np.asarray(ours_state[path]), np.asarray(value), err_msg=str(path))


def test_quantize_shares_the_float_arrays_it_leaves_alone():
    """GPTQ calibration runs compiled calls over the copy ``quantize`` works on; the copy's embedding and head stay
    float, so they must be the caller's own arrays, not a second copy of them."""
    model = llama.init_model(CFG, jax.random.key(4))
    calib = np.random.default_rng(5).integers(0, 64, size=(8, 16)).astype(np.int32)
    qmodel = quantize(model, get("gptq-w4g128", weight="int4-g64-asym"), calib, progress=False)
    assert qmodel.quantization.unquantized == ("embed_tokens", "lm_head")
    ours, theirs = _arrays(qmodel), _arrays(model)
    shared = [p for p in theirs if p[0] in ("embed_tokens", "lm_head")]
    assert shared and all(ours[p] is theirs[p] for p in shared)
