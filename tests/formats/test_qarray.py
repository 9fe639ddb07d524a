"""QArray as a pytree and as an nnx.Param value: validation, jit, orbax, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jquant.formats import QArray, dequantize, get_format, quantize

FORMATS = ["int3-g32-asym", "fp8-e4m3", "nvfp4"]  # zeros, float8 codes, a tensor scale


class QLinear(nnx.Module):
    def __init__(self, w, fmt):
        self.kernel = nnx.Param(quantize(w, fmt, axis=0))
        self.bias = nnx.Param(jnp.zeros((w.shape[1],)))

    def __call__(self, x):
        return x @ dequantize(self.kernel.get_value(), x.dtype) + self.bias.get_value()[None, :]


def _w():
    return np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)


def _equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(la, lb):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))


@pytest.mark.parametrize("name", FORMATS)
def test_nnx_split_merge_jit_tree_map_and_orbax(name, tmp_path):
    w, x = _w(), jnp.ones((2, 64))
    m = QLinear(w, name)
    y = m(x)
    graphdef, state = nnx.split(m)
    m2 = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(m2(x)), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda mod, a: mod(a))(m, x)), np.asarray(y))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda st, a: nnx.merge(graphdef, st)(a))(state, x)), np.asarray(y))
    q = m.kernel.get_value()
    q2 = jax.tree.map(lambda a: a, q)
    assert isinstance(q2, QArray) and q2.format == q.format and q2.shape == (64, 16)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "ckpt", state)
    ck.wait_until_finished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored = ck.restore(tmp_path / "ckpt", abstract)
    _equal_trees(restored, state)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, restored)(x)), np.asarray(y))


def test_registered_as_nnx_data_and_abstract_shapes():
    q = quantize(_w(), "int4-g32", axis=0)

    class Holder(nnx.Module):
        def __init__(self):
            self.q = q  # a bare QArray attribute is data (nnx.register_data_type)

    assert nnx.is_data(q)
    leaves = jax.tree.leaves(nnx.state(Holder()))
    assert len(leaves) == 2  # codes and scales
    abstract = jax.eval_shape(lambda w: quantize(w, "int4-g32", axis=0), _w())
    assert isinstance(abstract, QArray) and abstract.nbytes == q.nbytes
    assert abstract.bits_per_element == 4.5
    abstract.validate()


def test_sharding_children_with_logical_rank_specs():
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    q = quantize(_w(), "int4-g32", axis=0)
    specs = q.partition_specs(P(None, "x"))
    assert specs.codes == P(None, "x") and specs.scales == P(None, "x")
    qs = jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    assert qs.codes.sharding.spec == P(None, "x")
    np.testing.assert_array_equal(np.asarray(dequantize(qs)), np.asarray(dequantize(q)))
    qc = quantize(_w(), "int8", axis=0)  # per-channel scales (1, out): the reduced dim replicates
    assert qc.partition_specs(P("x", None)).scales == P(None, None)
    nv = quantize(_w(), "nvfp4", axis=0)
    assert nv.partition_specs(P("x")).tensor_scale == P(None, None)


def test_validate_names_the_child_and_the_expected_layout():
    q = quantize(_w(), "int4-g32", axis=0)
    with pytest.raises(ValueError, match=r"QArray.scales is \(2, 16\) float32 but int4-g32 .* expects \(2, 16\) float16"):
        dataclasses.replace(q, scales=q.scales.astype(jnp.float32)).validate()
    with pytest.raises(ValueError, match=r"QArray.codes is \(31, 16\) uint8"):
        dataclasses.replace(q, codes=q.codes[:31]).validate()
    with pytest.raises(ValueError, match="QArray.zeros must be None"):
        dataclasses.replace(q, zeros=jnp.zeros((2, 16), jnp.uint8)).validate()
    with pytest.raises(ValueError, match="QArray.scales is missing"):
        dataclasses.replace(q, scales=None).validate()
    with pytest.raises(ValueError, match="axis"):
        dataclasses.replace(q, axis=2).validate()
    with pytest.raises(ValueError, match="group_size=32 does not divide"):
        dataclasses.replace(q, shape=(48, 16)).validate()
    assert get_format("int4-g32") == q.format and hash(q.format) == hash(get_format("int4-g32"))
