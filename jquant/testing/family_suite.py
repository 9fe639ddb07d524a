"""The checks every model family passes, written once: a family's test file subclasses ``FamilySuite``.

::

    class TestLlamaFamily(FamilySuite):
        spec = FamilySpec(family=llama.FAMILY, tiny_config=..., vocab_size=96, cases=(...),
                          build_reference=..., reference_logits=torch_reference_logits, ...)

The checks (each on fresh random tokens):

(a) ``test_reference_parity``: for every reference case, a perturbed-every-tensor checkpoint written by
    the reference implementation (``build_reference``, e.g. transformers' ``save_pretrained``) is read
    with ``load`` (default: the family's ``from_hf``); the full-sequence forward and the decode
    (``decode_prefill`` tokens, then one per ``step``) match the reference logits in float32 and, where
    ``float64_tolerance`` is set, in float64; ``test_greedy_generation`` (where ``reference_generate`` is
    set) compares greedy tokens of a model loaded through ``jquant.models.load``;
(b) ``test_checkpoint_round_trip``: ``jquant.save`` / ``jquant.load`` of a random ``tiny_config`` model,
    float and quantized with each of ``save_recipes``, gives bit-identical logits and the same config;
(c) ``test_hf_export_round_trip`` (families with ``to_hf``): exporting an imported checkpoint writes the
    same tensors bit for bit, and the reference implementation reads the export back to identical logits;
(d) ``test_decode_consistency``: ``model.step`` over a cache, fed in the pieces of each of
    ``decode_chunks``, equals the full forward (families whose models have ``init_cache``);

and ``test_keep_float_names_sites``: each of the family's ``keep_float`` patterns names a site of the tiny
model. Checks a family does not support are removed from its test class, not skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models.family import Family
from jquant.testing.hf_reference import relative_error
from jquant.testing.tiny_models import FAST_COMPILE, fast_logits


@dataclasses.dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """What the suite needs to know about one family.

    ``build_reference(case, folder, seed)`` writes the reference checkpoint of ``case`` (one of ``cases``)
    into ``folder`` and returns the reference model; ``reference_logits(reference, tokens, dtype)`` runs it
    (``dtype``: "float32" or "float64") -> ``[B, T, V]`` numpy logits; ``load(folder, dtype)`` is jquant's
    import of that folder (default: ``family.from_hf(folder, dtype=dtype)``); ``reload_reference(case,
    folder)`` reads a jquant export with the reference implementation; ``reference_generate(reference,
    prompt, n)`` is its greedy generation of ``n`` tokens. Tokens are drawn from ``[first_token, vocab_size)``.
    """

    family: Family
    tiny_config: Any
    vocab_size: int
    first_token: int = 0
    cases: tuple[str, ...] = ()
    build_reference: Callable[[str, Path, int], Any] | None = None
    reference_logits: Callable[[Any, np.ndarray, str], np.ndarray] | None = None
    load: Callable[[Path, str], Any] | None = None
    reload_reference: Callable[[str, Path], Any] | None = None
    reference_generate: Callable[[Any, np.ndarray, int], np.ndarray] | None = None
    parity_shape: tuple[int, int] = (2, 12)
    decode_prefill: int = 1
    float32_tolerance: float = 1e-5
    float64_tolerance: float | None = None
    export_options: dict = dataclasses.field(default_factory=dict)
    save_recipes: tuple = ()
    decode_shape: tuple[int, int] = (2, 12)
    decode_chunks: tuple[tuple[int, ...], ...] = ((1,) * 12, (7, 1, 4))

    def __post_init__(self):
        if self.cases and (self.build_reference is None or self.reference_logits is None):
            raise ValueError(f"FamilySpec of {self.family.name!r}: reference cases need build_reference and "
                             "reference_logits.")
        if self.load is None and self.cases and self.family.from_hf is None:
            raise ValueError(f"FamilySpec of {self.family.name!r}: the family has no from_hf; pass load=.")
        for chunks in self.decode_chunks:
            if sum(chunks) != self.decode_shape[1]:
                raise ValueError(f"FamilySpec of {self.family.name!r}: decode chunks {chunks} do not cover the "
                                 f"{self.decode_shape[1]} tokens of decode_shape.")

    def tokens(self, seed: int, shape: tuple[int, int]) -> np.ndarray:
        """Random int32 tokens of ``shape`` (a numpy draw, so no compilation)."""
        return np.random.default_rng(seed).integers(self.first_token, self.vocab_size, size=shape).astype(np.int32)

    def load_model(self, folder: Path, dtype: str):
        """jquant's import of a reference checkpoint folder with compute ``dtype``."""
        if self.load is not None:
            return self.load(folder, dtype)
        return self.family.from_hf(folder, dtype=dtype)


def torch_reference_logits(model, tokens: np.ndarray, dtype: str) -> np.ndarray:
    """Logits of a transformers causal LM in ``dtype`` (a float64 run casts it back to float32 afterwards)."""
    from jquant.testing.hf_reference import torch_logits

    if dtype == "float32":
        return torch_logits(model, tokens)
    try:
        return torch_logits(model.double(), tokens)
    finally:
        model.float()


def torch_greedy_tokens(model, prompt: np.ndarray, n: int) -> np.ndarray:
    """A transformers causal LM's greedy continuation of ``prompt [B, T]`` by ``n`` tokens (prompt included)."""
    import torch

    with torch.no_grad():
        return model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0).numpy()


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _step(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).step(tokens, cache)


def cached_logits(model, tokens: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    """Logits of ``tokens [B, T]`` fed to ``model.step`` over an empty cache in pieces of the ``chunks`` lengths."""
    graphdef, state = nnx.split(model)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1] + 3)
    out, start = [], 0
    for n in chunks:
        logits, cache = _step(graphdef, state, jnp.asarray(tokens[:, start:start + n]), cache)
        out.append(np.asarray(logits))
        start += n
    return np.concatenate(out, axis=1)


def decode_logits(model, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of ``tokens`` fed to ``model.step`` as one ``prefill`` chunk, then one token per call."""
    return cached_logits(model, tokens, (prefill,) + (1,) * (tokens.shape[1] - prefill))


class FamilySuite:
    """Base class of a family's suite; a subclass sets ``spec`` (see the module docstring)."""

    spec: ClassVar[FamilySpec]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = cls.spec
        has_cache = hasattr(spec.family.model_class, "init_cache")
        unsupported = {
            "test_reference_parity": not spec.cases,
            "test_greedy_generation": not spec.cases or spec.reference_generate is None or not has_cache,
            "test_hf_export_round_trip": not spec.cases or spec.family.to_hf is None or spec.reload_reference is None,
            "test_decode_consistency": not has_cache,
        }
        for name, drop in unsupported.items():
            if drop:
                setattr(cls, name, None)

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.spec.cases, scope="class")

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, case, tmp_path_factory) -> tuple[str, Any, Path]:
        """``(case, reference model, checkpoint folder)``, built once per class and case."""
        spec = cls.spec
        folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", f"{spec.family.name}-{case}"))
        return case, spec.build_reference(case, folder, spec.cases.index(case)), folder

    def test_reference_parity(self, reference):
        spec, (case, ref, folder) = self.spec, reference
        tokens = spec.tokens(1, spec.parity_shape)
        dtypes = {"float32": spec.float32_tolerance}
        if spec.float64_tolerance is not None:
            dtypes["float64"] = spec.float64_tolerance
        for dtype, tolerance in dtypes.items():
            previous = jax.config.jax_enable_x64
            jax.config.update("jax_enable_x64", dtype == "float64")
            try:
                model = spec.load_model(folder, dtype)
                expected = spec.reference_logits(ref, tokens, dtype)
                full = fast_logits(model, tokens)
                assert relative_error(full, expected) < tolerance, (case, dtype, "full sequence")
                if has_cache(model):
                    decoded = decode_logits(model, tokens, spec.decode_prefill)
                    assert relative_error(decoded, expected) < tolerance, (case, dtype, "decode")
            finally:
                jax.config.update("jax_enable_x64", previous)

    def test_greedy_generation(self, reference):
        from jquant.generate import generate
        from jquant.models import load

        spec, (case, ref, folder) = self.spec, reference
        prompt = spec.tokens(4, (2, 5))
        loaded = load(folder)  # through the registry: the family is found from the folder
        assert isinstance(loaded.model, spec.family.model_class), case
        np.testing.assert_array_equal(generate(loaded.model, prompt, 6), spec.reference_generate(ref, prompt, 6))

    def test_hf_export_round_trip(self, reference, tmp_path):
        from jquant.models import hf_io

        spec, (case, ref, folder) = self.spec, reference
        spec.family.to_hf(spec.load_model(folder, "float32"), tmp_path / "export", **spec.export_options)
        original, exported = hf_io.read_safetensors(folder), hf_io.read_safetensors(tmp_path / "export")
        assert sorted(exported) == sorted(original), case
        for name, value in original.items():
            np.testing.assert_array_equal(exported[name], value, err_msg=name)
        tokens = spec.tokens(5, spec.parity_shape)
        reloaded = spec.reload_reference(case, tmp_path / "export")
        np.testing.assert_array_equal(spec.reference_logits(reloaded, tokens, "float32"),
                                      spec.reference_logits(ref, tokens, "float32"))

    def test_checkpoint_round_trip(self, tmp_path):
        from jquant.checkpoint import load, save
        from jquant.quantization import quantize

        spec = self.spec
        model = spec.family.init_model(spec.tiny_config, jax.random.key(0))
        tokens = spec.tokens(0, spec.decode_shape)
        save(model, tmp_path / "float")
        restored = load(tmp_path / "float")
        assert type(restored) is type(model) and restored.config == model.config
        np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(model(tokens)))
        manifest = json.loads((tmp_path / "float" / "jquant.json").read_text(), parse_constant=_refuse_constant)
        assert set(manifest) == {"format_version", "family", "config", "dtype", "param_dtype"}
        assert manifest["family"] == spec.family.name and not (tmp_path / "float" / "recipe.json").exists()
        for i, recipe in enumerate(spec.save_recipes):
            qmodel = quantize(model, recipe, tokens, progress=False)
            assert qmodel.quantization.sites, recipe
            save(qmodel, tmp_path / f"q{i}")
            restored = load(tmp_path / f"q{i}")
            np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(qmodel(tokens)))
            assert restored.quantization.recipe == qmodel.quantization.recipe
            assert restored.quantization.sites == qmodel.quantization.sites

    def test_decode_consistency(self):
        spec = self.spec
        model = spec.family.init_model(spec.tiny_config, jax.random.key(1))
        tokens = spec.tokens(2, spec.decode_shape)
        full = fast_logits(model, tokens)
        for chunks in spec.decode_chunks:
            pieces = cached_logits(model, tokens, chunks)
            assert relative_error(pieces, full) < spec.float32_tolerance, chunks

    def test_keep_float_names_sites(self):
        from jquant.sites import find_sites

        paths = [s.path for s in find_sites(self.spec.family.abstract_model(self.spec.tiny_config))]
        for pattern in self.spec.family.keep_float:
            assert any(re.fullmatch(pattern, p) for p in paths), (pattern, paths)


def has_cache(model) -> bool:
    """Whether ``model`` decodes with a cache (``init_cache`` / ``step``)."""
    return hasattr(model, "init_cache")


def _refuse_constant(name: str):
    raise ValueError(f"jquant.json holds {name}, which is not strict JSON.")
