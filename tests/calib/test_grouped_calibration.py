"""The core contracts on two families that are not token LMs: pytree calibration, stages, groups.

A patch tower feeding a small LLM (two calibration stages, modality groups per token) and a DiT-like
stack (timestep-bucket groups per sample) are calibrated and quantized through the one block walker,
with grouped statistics checked against numpy references and per-group static scales checked against
per-group maxima.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant.quantization as quantization
from jquant.calib import num_samples, walk_blocks
from jquant.formats import fake_quantize, get_format
from jquant.ops.linear import quantize_activation
from jquant.quantization import plan, quantize
from jquant.recipes import Recipe, Rule
from jquant.checkpoint import load, save
from jquant.models import registry
from jquant.testing.tiny_families import FAMILIES, TinyDiT, TinyDiTConfig, TinyMLLM, TinyMLLMConfig


@pytest.fixture(scope="module", autouse=True)
def tiny_families_registered():
    """Register the test families for this module only (the registry is process-wide)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
        for family in FAMILIES:
            registry.register(family)
        yield



@pytest.fixture(scope="module")
def mllm():
    return TinyMLLM(TinyMLLMConfig(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def dit():
    return TinyDiT(TinyDiTConfig(), rngs=nnx.Rngs(1))


def _mllm_calib(seed: int, n: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 32, (n, 6)).astype(np.int32),
            "patches": rng.normal(size=(n, 4, 12)).astype(np.float32)}


def _dit_calib(seed: int, timesteps) -> dict:
    rng = np.random.default_rng(seed)
    n = len(timesteps)
    return {"latents": rng.normal(size=(n, 6, 8)).astype(np.float32), "timesteps": np.asarray(timesteps, np.float32),
            "text": rng.normal(size=(n, 3, 16)).astype(np.float32)}


def _stored(scale: float) -> np.ndarray:
    """A static scale as int8-tensor stores it (float32 maths, then its scale dtype)."""
    return np.asarray(np.float32(scale)).astype(jnp.dtype(get_format("int8-tensor").scale_dtype))


def _stats(model, calib, batch_size=2):
    seen = {}
    walk_blocks(model, calib, lambda v: seen.update({f"{v.path}/{k}": s for k, s in v.stats.items()}),
                batch_size=batch_size, progress=False)
    return seen


def test_modality_statistics_equal_per_modality_sums(mllm):
    calib = _mllm_calib(0)
    captured = {}

    def visit(v):
        if v.path == "layers/0":
            captured["inputs"], captured["stats"] = list(v.inputs), v.stats

    walk_blocks(mllm, calib, visit, batch_size=2, progress=False)
    block = mllm.layers[0]
    rows = {0: [], 1: []}
    for hidden, modality in captured["inputs"]:
        x = np.asarray(block.norm1(hidden), np.float64).reshape(-1, hidden.shape[-1])
        for g in (0, 1):
            rows[g].append(x[np.asarray(modality).reshape(-1) == g])
    q = captured["stats"]["q_proj"]
    assert q.num_groups == 2
    for g, name in enumerate(("text", "image")):
        x = np.concatenate(rows[g])
        part = q.group(g)
        assert part.count == len(x), name
        np.testing.assert_allclose(part.hessian, x.T @ x, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(part.absmax, np.abs(x).max(0), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(part.total, x.sum(0), rtol=1e-5, atol=1e-5, err_msg=name)
    both = np.concatenate(rows[0] + rows[1])
    np.testing.assert_allclose(q.pooled().hessian, both.T @ both, rtol=1e-5, atol=1e-5)
    # the tower's sites receive no group ids: their statistics are over all tokens
    assert _stats(mllm, calib)["vision/0/q_proj"].num_groups is None


def test_timestep_bucket_statistics_equal_statistics_of_that_buckets_samples(dit):
    timesteps = [0.05, 0.9, 0.4, 0.2, 0.7, 0.5]
    calib = dit.check_calibration(_dit_calib(1, timesteps))
    grouped = _stats(dit, calib, batch_size=4)
    buckets = np.asarray(dit.bucket(jnp.asarray(timesteps)))
    for g in range(3):
        subset = {k: v[buckets == g] for k, v in calib.items()}
        alone = _stats(dit, subset, batch_size=4)
        for path in ("blocks_/0/q_proj", "blocks_/1/down_proj", "blocks_/1/modulation"):
            part, ref = grouped[path].group(g), alone[path].pooled()
            assert part.count == ref.count
            np.testing.assert_allclose(part.hessian, ref.hessian, rtol=2e-5, atol=1e-5, err_msg=f"{path} t{g}")
            np.testing.assert_allclose(part.absmax, ref.absmax, rtol=1e-6, err_msg=f"{path} t{g}")


def test_per_group_activation_quantization_matches_quantizing_each_group_alone():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 7, 16)) * rng.uniform(0.5, 4, size=(1, 1, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 3, (2, 7)), jnp.int32)
    int8, fp8 = get_format("int8"), get_format("fp8-e4m3")
    formats = (int8, None, fp8)
    out = np.asarray(quantize_activation(x, formats, None, ids))
    reference = {0: np.asarray(fake_quantize(x, int8, axis=-1)), 1: np.asarray(x), 2: np.asarray(fake_quantize(x, fp8, axis=-1))}
    for g, ref in reference.items():
        sel = np.asarray(ids) == g
        np.testing.assert_array_equal(out[sel], ref[sel])
    static = get_format("int8-tensor")
    table = jnp.asarray([0.01, 0.02, 0.05], jnp.float32)
    out = np.asarray(quantize_activation(x, static, table, ids))
    for g in range(3):
        sel = np.asarray(ids) == g
        s = float(np.asarray(table[g]).astype(jnp.dtype(static.scale_dtype)))  # the scale as the format stores it
        expected = np.clip(np.round(np.asarray(x) / s), -127, 127) * s
        np.testing.assert_allclose(out[sel], expected[sel], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="must pass groups="):
        quantize_activation(x, formats)


MSQ = Recipe(name="msq", rules=(  # the family keeps patch_embed, projector, embed_tokens, lm_head float
    Rule(pattern=r"(vision|layers)/.*", weight="int4-g16", algorithm="gptq", activation="int8-tensor",
         static_activation=True),))


def test_gptq_with_per_modality_static_scales(mllm, tmp_path):
    calib = _mllm_calib(3, n=6)
    qmodel = quantize(mllm, MSQ, calib, batch_size=2, progress=False)
    # a walk of the finished model sees again the calibration inputs of every site that reads its block's input
    # (earlier blocks were already quantized when it was calibrated; later sites of a block read its float outputs)
    refs = _stats(qmodel, calib)
    for path in ("layers/0/q_proj", "layers/1/v_proj"):
        module = qmodel.layers[int(path.split("/")[1])]
        site = getattr(module, path.split("/")[2])
        scales = np.asarray(site.activation_scale.get_value())
        assert scales.shape == (2,)
        for g in range(2):
            assert scales[g] == _stored(refs[path].group(g).absmax.max() / 127), (path, g)
        assert not np.isclose(scales[0], scales[1])
    tower = qmodel.vision[0].q_proj.activation_scale.get_value()
    assert np.shape(tower) == ()
    assert tower == _stored(refs["vision/0/q_proj"].absmax.max() / 127)
    assert "static per group" in qmodel.quantization.site("layers/0/q_proj")
    assert set(qmodel.quantization.unquantized) == {"patch_embed", "projector", "embed_tokens", "lm_head"}
    logits = np.asarray(qmodel(calib))
    assert np.all(np.isfinite(logits)) and not np.allclose(logits, np.asarray(mllm(calib)))
    save(qmodel, tmp_path / "mllm")
    restored = load(tmp_path / "mllm")
    np.testing.assert_array_equal(np.asarray(restored(calib)), logits)
    assert restored.quantization.sites == qmodel.quantization.sites


def test_when_rules_give_each_modality_its_own_activation_format(mllm, tmp_path):
    recipe = Recipe(name="image-int8", rules=(
        Rule(pattern=r"layers/.*", activation="int8-tensor", static_activation=True, when=("image",)),
        Rule(pattern=r"(vision|layers)/.*", weight="int8", algorithm="gptq"),
    ))
    calib = _mllm_calib(4)
    plans = {p.site.path: p for p in plan(mllm, recipe)}
    assert plans["layers/0/q_proj"].activation == (None, get_format("int8-tensor"))
    assert plans["vision/0/q_proj"].activation is None
    qmodel = quantize(mllm, recipe, calib, batch_size=5, progress=False)
    assert "text: float, image: int8-tensor" in qmodel.quantization.site("layers/1/up_proj")
    # text tokens' inputs are not quantized: switching the image format off changes only image positions' inputs
    site = qmodel.layers[0].q_proj
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 10, 32)), jnp.float32)
    ids = jnp.asarray([[1] * 4 + [0] * 6])
    quantized = np.asarray(quantize_activation(x, site.activation, site.activation_scale.get_value(), ids))
    np.testing.assert_array_equal(quantized[0, 4:], np.asarray(x)[0, 4:])
    assert not np.array_equal(quantized[0, :4], np.asarray(x)[0, :4])
    save(qmodel, tmp_path / "when")
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "when")(calib)), np.asarray(qmodel(calib)))


def test_dit_gptq_balanced_over_timestep_buckets_with_per_bucket_scales(dit, tmp_path):
    recipe = Recipe(name="dit-w4a8", rules=(
        Rule(pattern=r"blocks_/.*", weight="int4-g16", algorithm="gptq", activation="int8-tensor",
             static_activation=True, options={"group_weighting": "balanced"}),))
    calib = _dit_calib(6, [0.1, 0.2, 0.5, 0.8, 0.95, 0.15])
    qmodel = quantize(dit, recipe, calib, batch_size=3, progress=False)
    scales = np.asarray(qmodel.blocks_[1].up_proj.activation_scale.get_value())
    assert scales.shape == (3,) and len(set(scales.tolist())) == 3
    out = np.asarray(qmodel(calib))
    assert np.all(np.isfinite(out)) and out.shape == (6, 6, 8)
    save(qmodel, tmp_path / "dit")
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "dit")(calib)), out)


# --- bad input, refused before any work ------------------------------------------------------------


@pytest.fixture()
def no_work(monkeypatch):
    monkeypatch.setattr(quantization, "walk_blocks", lambda *a, **k: pytest.fail("calibration started"))


def test_calibration_leaves_that_disagree_on_n_are_named():
    with pytest.raises(ValueError, match=r"disagree on the number of samples.*\['patches'\]: 4, \['tokens'\]: 5"):
        num_samples({"tokens": np.zeros((5, 3)), "patches": np.zeros((4, 2, 2))})


def test_bad_calibration_is_refused_before_work(mllm, dit, no_work):
    calib = _mllm_calib(0)
    calib["patches"] = calib["patches"][:3]
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        quantize(mllm, MSQ, calib, progress=False)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1\]\): group id 3 is out of range"):
        quantize(dit, Recipe(name="x", rules=(Rule(pattern=".*", weight="int8", algorithm="gptq"),)),
                 _dit_calib(0, [0.5, 1.5]), progress=False)


def test_when_that_matches_no_group_is_refused(mllm, no_work):
    bad = Recipe(name="typo", rules=(Rule(pattern="layers/.*", activation="int8", when=("imag",)),
                                     Rule(pattern=".*", weight="int8")))
    with pytest.raises(ValueError, match=r"\['imag'\] match no group of the model; its groups are \['text', 'image'\]"):
        quantize(mllm, bad, _mllm_calib(0), progress=False)
    with pytest.raises(ValueError, match="declares no activation groups"):
        from jquant.models import llama

        tiny = llama.init_model(llama.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1,
                                                  num_heads=2, num_kv_heads=2), jax.random.key(0))
        quantize(tiny, bad, progress=False)
    with pytest.raises(ValueError, match="sets only activation formats"):
        Rule(pattern=".*", weight="int4", when=("image",))
    mixed = Recipe(name="mixed-static", rules=(
        Rule(pattern="layers/.*", activation="int8-tensor", static_activation=True, when=("image",)),
        Rule(pattern="layers/.*", activation="int8")))
    with pytest.raises(ValueError, match="disagree on static_activation"):
        quantize(mllm, mixed, _mllm_calib(0), progress=False)


def test_balanced_group_weighting_gives_each_group_the_same_weight():
    from jquant.calib.capture import InputStatistics
    from jquant.quantization import _group_weights

    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(n, 5)) for n in (3, 9, 0, 6)]
    stats = InputStatistics(hessian=np.stack([x.T @ x for x in xs]), count=np.array([len(x) for x in xs], float),
                            absmax=np.stack([np.abs(x).max(0) if len(x) else np.zeros(5) for x in xs]),
                            total=np.stack([x.sum(0) for x in xs]))
    balanced = stats.pooled(_group_weights(stats, "balanced"))
    seen = [x for x in xs if len(x)]
    expected = sum(x.T @ x / len(x) for x in seen) * sum(map(len, seen)) / len(seen)
    np.testing.assert_allclose(balanced.hessian, expected, rtol=1e-12)
    assert balanced.count == pytest.approx(18.0)
    np.testing.assert_allclose(stats.pooled().hessian, sum(x.T @ x for x in seen), rtol=1e-12)
    np.testing.assert_allclose(stats.pooled().absmax, np.max(np.abs(np.concatenate(seen)), axis=0))
