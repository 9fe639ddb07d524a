"""The per-layer QSUR report: one value per layer and site kind, equal to QSUR of the activations computed here by
running the model's modules by hand, and raised by a Hadamard rotation on a model with outlier channels (spec §5.4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import llama
from jquant.testing.tiny_models import outlier_model
from jquant.transforms import QSURReport, hadamard_matrix, qsur_from_covariance, qsur_report, quarot
from jquant.transforms.equivalence import split_weights
from jquant.transforms.report import SITE_KINDS

VOCAB = 97
CFG = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    return outlier_model(CFG, 0)


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(1).integers(0, VOCAB, size=(6, 64)).astype(np.int32)  # 384 tokens > widths


@pytest.fixture(scope="module")
def rotated(model):
    return quarot(model, jax.random.key(2))  # random-Hadamard residual, online Hadamards before down_proj and on q/k


@pytest.fixture(scope="module")
def reports(model, rotated, calib):
    return {False: qsur_report(model, calib, batch_size=6), True: qsur_report(rotated, calib, batch_size=6)}


def _layer0_inputs(model, tokens):
    """The four activations layer 0's quantizers see, ``[N·T, features]`` each, from the modules called by hand."""
    tokens = jnp.asarray(tokens)
    layer = model.layers[0]
    x = model.embed_tokens(tokens, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    normed = layer.input_layernorm(x)
    attention, _ = layer.self_attn(normed, positions, None, None)
    probe = nnx.clone(layer.self_attn)  # o_proj replaced by the identity (H·dh = d here): returns o_proj's input
    probe.o_proj.kernel.set_value(jnp.eye(CFG.num_heads * CFG.head_dim, dtype=jnp.float32))
    heads, _ = probe(normed, positions, None, None)
    mlp_in = layer.post_attention_layernorm(x + attention)
    product = jax.nn.silu(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in)
    if (n := layer.mlp.down_proj.input_rotation) is not None:  # the online Hadamard before down_proj
        product = np.asarray(product, np.float64) @ np.asarray(hadamard_matrix(n, jnp.float32), np.float64)
    flat = lambda a: np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])  # noqa: E731
    return {"qkv": flat(normed), "o_proj": flat(heads), "up_gate": flat(mlp_in), "down_proj": flat(product)}


def _qsur(x):
    """QSUR^{1/d} from the population mean and covariance of samples ``x [N, d]`` (what the report measures)."""
    mean = x.mean(axis=0)
    return qsur_from_covariance(np.cov(x, rowvar=False, bias=True), mean)


@pytest.mark.parametrize("is_rotated", [False, True])
def test_report_matches_hand_computed_activations(model, rotated, calib, reports, is_rotated):
    m = rotated if is_rotated else model
    report = reports[is_rotated]
    assert isinstance(report, QSURReport)
    assert set(report.values) == {(i, k) for i in range(CFG.num_layers) for k in SITE_KINDS}
    assert all(0 < v <= 1 for v in report.values.values())
    rows = report.rows()
    assert [r["layer"] for r in rows] == list(range(CFG.num_layers))
    assert rows[1]["o_proj"] == report.values[(1, "o_proj")]
    assert report.mean("qkv") == pytest.approx(np.mean([report.values[(i, "qkv")] for i in range(CFG.num_layers)]))
    assert report.mean() == pytest.approx(np.mean(list(report.values.values())))

    inputs = _layer0_inputs(m, calib)
    assert inputs["down_proj"].shape == (calib.size, CFG.intermediate_size)
    for kind, x in inputs.items():
        assert report.values[(0, kind)] == pytest.approx(_qsur(x), rel=1e-5), kind
    # the four kinds are different tensors with different values
    assert len({round(report.values[(0, k)], 6) for k in SITE_KINDS}) == 4


def test_report_is_independent_of_batching_and_leaves_the_model_alone(model, calib, reports):
    before = {k: np.asarray(v) for k, v in split_weights(model)[1].items()}
    a = reports[False]  # batches of 6
    b = qsur_report(model, calib, batch_size=4)
    assert a.values.keys() == b.values.keys()
    for key in a.values:
        assert a.values[key] == pytest.approx(b.values[key], rel=1e-9), key
    for path, value in split_weights(model)[1].items():
        np.testing.assert_array_equal(np.asarray(value), before[path], err_msg=path)


def test_hadamard_rotation_raises_qsur(reports):
    raw, rotated = reports[False], reports[True]
    # the outlier channels dominate the q/k/v and up/gate inputs; the residual Hadamard spreads them (spec §5.4)
    for kind in ("qkv", "up_gate"):
        assert rotated.mean(kind) > 1.5 * raw.mean(kind), (kind, raw.mean(kind), rotated.mean(kind))
        for i in range(CFG.num_layers):
            assert rotated.values[(i, kind)] > raw.values[(i, kind)], (i, kind)
    # the online Hadamard of the MLP product helps down_proj too
    assert rotated.mean("down_proj") > raw.mean("down_proj")
