"""GPTQ-format checkpoints (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``) load into QArrays exactly.

The checkpoints are built here: GPTQ-style groups (act-order: groups over a random permutation of the input
channels, as ``desc_act`` produces), integer codes and zero points packed word by word as AutoGPTQ's
``QuantLinear.pack`` does (an independent loop, not jquant's packing), zero points stored minus one in the
original format and as is in ``gptq_v2``. The reference weight is AutoGPTQ's dequantization of the stored
tensors, ``s[g_idx[i]] (q - z[g_idx[i]])`` (``z`` = stored + 1 in the original format).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jquant as jq
from jquant.formats import QArray, dequantize
from jquant.models import llama

TINY = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def autogptq_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing of unsigned ``values [n, cols]`` into int32 words along rows: value i's bits at
    stream bits [i b, (i + 1) b), spilling into the next word when they cross a word boundary."""
    n, cols = values.shape
    words = np.zeros((-(-n * bits // 32), cols), np.uint64)
    for i in range(n):
        word, shift = divmod(i * bits, 32)
        v = values[i].astype(np.uint64)
        words[word] |= (v << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[word + 1] |= v >> np.uint64(32 - shift)
    return words.astype(np.uint32).view(np.int32)


def gptq_layer(w: np.ndarray, bits: int, group: int, sym: bool, act_order: bool, v2: bool,
               rng) -> tuple[dict, np.ndarray]:
    """GPTQ tensors of ``w [out, in]`` (round to nearest in GPTQ's groups) and AutoGPTQ's dequantization of them."""
    out, n = w.shape
    order = rng.permutation(n) if act_order else np.arange(n)
    g_idx = np.empty(n, np.int32)
    g_idx[order] = np.arange(n) // group
    maxq = 2 ** bits - 1
    scales = np.zeros((n // group, out), np.float32)
    zeros = np.zeros((n // group, out), np.int64)
    for g in range(n // group):
        cols = w[:, g_idx == g]
        lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        if sym:
            amax = np.maximum(-lo, hi)
            scales[g], zeros[g] = 2 * amax / maxq, (maxq + 1) // 2
        else:
            scales[g] = (hi - lo) / maxq
            zeros[g] = np.round(-lo / scales[g])
    if not sym:
        zeros[0, 0] = 0  # the original format's historic off-by-one: stored as -1, read back as 2^b
    scales = scales.astype(np.float16)
    s = scales.astype(np.float32)[g_idx].T
    q = np.clip(np.round(w / s) + zeros[g_idx].T, 0, maxq).astype(np.int64)
    stored = zeros if v2 else (zeros - 1) & maxq
    read_zeros = stored if v2 else stored + 1
    reference = s * (q - read_zeros[g_idx].T)
    tensors = {"qweight": autogptq_pack(q.T, bits), "qzeros": autogptq_pack(stored.T, bits).T.copy(),
               "scales": scales, "g_idx": g_idx}
    return tensors, reference.astype(np.float32)


def write_gptq(folder, bits: int, group: int, sym: bool, act_order: bool, v2: bool, seed: int) -> tuple[dict, dict]:
    """A GPTQ checkpoint of a random tiny Llama in ``folder``: the reference weights by module name and the
    checkpoint's tensors."""
    rng = np.random.default_rng(seed)
    model = llama.init_model(TINY, jax.random.key(seed))
    float_folder = llama.to_hf(model, folder.parent / f"{folder.name}-float")
    tensors = llama.to_tensors(model)
    references = {}
    for layer in range(TINY.num_layers):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}"
            gptq, references[name] = gptq_layer(tensors.pop(name + ".weight"), bits, group, sym, act_order, v2, rng)
            tensors.update({f"{name}.{k}": v for k, v in gptq.items()})
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((float_folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                                     "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    (folder / "config.json").write_text(json.dumps(config))
    return references, tensors


@pytest.mark.parametrize("bits,group,sym,act_order,v2", [(4, 16, True, False, False), (4, 16, True, True, False),
                                                          (4, 32, False, True, False), (4, 16, False, False, True),
                                                          (3, 32, False, True, True), (8, 32, True, True, False),
                                                          (2, 16, False, False, False)])
def test_gptq_checkpoint_loads_exactly(tmp_path, bits, group, sym, act_order, v2):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    references, tensors = write_gptq(tmp_path / "gptq", bits, group, sym, act_order, v2, seed)
    model = jq.load(tmp_path / "gptq")
    for name, reference in references.items():
        module = model
        for part in name.removeprefix("model.").split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        q = module.kernel.get_value()
        assert isinstance(q, QArray) and q.format.bits == bits and q.format.symmetric == sym
        if sym:
            assert q.format.symmetric_range == "full"
        if not act_order:
            assert q.format.group_size == group
        np.testing.assert_array_equal(np.asarray(dequantize(q)).T, reference)
    floats = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "g_idx")}
    dense = llama.from_tensors(model.config, {**floats, **{k + ".weight": v for k, v in references.items()}})
    tokens = np.random.default_rng(seed).integers(0, 64, (2, 10))
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(dense(tokens)), rtol=1e-5, atol=1e-5)
    jq.save(model, tmp_path / "jq")
    np.testing.assert_array_equal(np.asarray(jq.load(tmp_path / "jq")(tokens)), np.asarray(model(tokens)))


def test_gptq_errors(tmp_path):
    write_gptq(tmp_path / "gptq", 4, 16, True, False, False, 0)
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        jq.load(tmp_path / "gptq")
