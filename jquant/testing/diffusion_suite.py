"""The checks every diffusers-imported family passes, written once: a family's test file subclasses ``DiffusersSuite``.

The diffusers counterpart of ``jquant.testing.family_suite`` (image VAEs, MMDiT / Flux transformers and the
video families that follow). Models are driven through the spec's ``forward`` on a pytree of inputs from
``make_inputs``, so the suite does not assume tokens, logits or a cache::

    class TestVAEFamily(DiffusersSuite):
        spec = DiffusersSpec(family=vae.FAMILY, tiny_config=..., cases=("sd3-style", "sd-style"),
                             build_reference=..., make_inputs=..., reference_forward=..., forward=...,
                             reload_reference=...)

The checks (each on fresh random inputs):

(a) ``test_reference_parity``: for every case, a perturbed-every-tensor folder written by diffusers'
    ``save_pretrained`` (``build_reference``) is read with ``family.from_diffusers`` and its output matches
    the diffusers module's in float32 and, where ``float64_tolerance`` is set, in float64;
(b) ``test_diffusers_export_round_trip``: ``family.to_diffusers`` of an imported folder writes the same
    tensors bit for bit, and diffusers reads the export back to identical outputs;
(c) ``test_checkpoint_round_trip``: ``jquant.save`` / ``jquant.load`` of a random ``tiny_config`` model,
    float and quantized with each of ``save_recipes`` (calibrated on ``make_inputs``), gives bit-identical
    outputs and the same config and quantization report;
(d) ``test_loads_by_class_name``: ``jquant.models.load(folder)`` finds the family from ``_class_name``;
(e) ``test_other_class_refused``: ``from_diffusers`` of a folder whose ``_class_name`` is another class
    raises a ValueError naming that class, and writes nothing;
(f) ``test_keep_float_names_sites``: each of the family's ``keep_float`` patterns names a site.

Checks a family does not support (no ``to_diffusers``, no cases) are removed from its class, not skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import pytest

from jquant.models.family import Family
from jquant.testing.hf_reference import relative_error

Inputs = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusersSpec:
    """What the suite needs to know about one diffusers-imported family.

    ``build_reference(case, folder, seed)`` builds a tiny diffusers module of ``case`` with every tensor
    perturbed, writes it with ``save_pretrained(folder)`` and returns it in eval mode;
    ``make_inputs(config, seed)`` draws the model's inputs (a dict of float/int numpy arrays in jquant's
    layout, leading axis the batch) for a jquant ``config``; ``reference_forward(ref, inputs, dtype)`` runs
    the diffusers module (``dtype``: "float32" or "float64") and returns its output in jquant's layout;
    ``forward(model, inputs)`` is jquant's forward on the same inputs; ``reload_reference(case, folder)``
    is diffusers' ``from_pretrained`` of a folder. Tolerances are relative errors
    (``max |got - ref| / max |ref|``).
    """

    family: Family
    tiny_config: Any
    cases: tuple[str, ...] = ()
    build_reference: Callable[[str, Path, int], Any] | None = None
    make_inputs: Callable[[Any, int], Inputs]
    reference_forward: Callable[[Any, Inputs, str], np.ndarray] | None = None
    forward: Callable[[Any, Inputs], Any]
    reload_reference: Callable[[str, Path], Any] | None = None
    float32_tolerance: float = 1e-5
    float64_tolerance: float | None = None
    save_recipes: tuple = ()

    def __post_init__(self):
        name = self.family.name
        if self.cases and (self.build_reference is None or self.reference_forward is None):
            raise ValueError(f"DiffusersSpec of {name!r}: reference cases need build_reference and reference_forward.")
        if self.cases and self.family.from_diffusers is None:
            raise ValueError(f"DiffusersSpec of {name!r}: the family has no from_diffusers to read its cases.")


def _outputs(spec: DiffusersSpec, model, inputs: Inputs) -> np.ndarray:
    """jquant's output as float64 numpy (a tuple of outputs is stacked flat, so every part is compared)."""
    leaves = jax.tree.leaves(spec.forward(model, inputs))
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in leaves])


class DiffusersSuite:
    """Base class of a diffusers family's suite; a subclass sets ``spec`` (see the module docstring)."""

    spec: ClassVar[DiffusersSpec]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = cls.spec
        unsupported = {
            "test_reference_parity": not spec.cases,
            "test_diffusers_export_round_trip": (not spec.cases or spec.family.to_diffusers is None
                                                 or spec.reload_reference is None),
            "test_loads_by_class_name": not spec.cases,
            "test_other_class_refused": spec.family.from_diffusers is None,
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
        """``(case, diffusers module, folder it was saved to)``, built once per class and case."""
        spec = cls.spec
        folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", f"{spec.family.name}-{case}"))
        return case, spec.build_reference(case, folder, spec.cases.index(case)), folder

    def test_reference_parity(self, reference):
        spec, (case, ref, folder) = self.spec, reference
        dtypes = {"float32": spec.float32_tolerance}
        if spec.float64_tolerance is not None:
            dtypes["float64"] = spec.float64_tolerance
        for dtype, tolerance in dtypes.items():
            previous = jax.config.jax_enable_x64
            jax.config.update("jax_enable_x64", dtype == "float64")
            try:
                model = spec.family.from_diffusers(folder, dtype=dtype)
                inputs = spec.make_inputs(model.config, 1)
                expected = np.asarray(spec.reference_forward(ref, inputs, dtype), np.float64).ravel()
                got = _outputs(spec, model, inputs)
                assert got.shape == expected.shape, (case, dtype, got.shape, expected.shape)
                error = relative_error(got, expected)
                assert error < tolerance, (case, dtype, error)
            finally:
                jax.config.update("jax_enable_x64", previous)

    def test_diffusers_export_round_trip(self, reference, tmp_path):
        from jquant.models import hf_io

        spec, (case, ref, folder) = self.spec, reference
        model = spec.family.from_diffusers(folder, dtype="float32")
        spec.family.to_diffusers(model, tmp_path / "export")
        original = hf_io.read_safetensors(folder, weights_name=hf_io.DIFFUSERS_FILE)
        exported = hf_io.read_safetensors(tmp_path / "export", weights_name=hf_io.DIFFUSERS_FILE)
        assert sorted(exported) == sorted(original), case
        for name, value in original.items():
            assert exported[name].dtype == value.dtype, name
            np.testing.assert_array_equal(exported[name], value, err_msg=name)
        inputs = spec.make_inputs(model.config, 5)
        reloaded = spec.reload_reference(case, tmp_path / "export")
        np.testing.assert_array_equal(spec.reference_forward(reloaded, inputs, "float32"),
                                      spec.reference_forward(ref, inputs, "float32"))

    def test_checkpoint_round_trip(self, tmp_path):
        from jquant.checkpoint import load, save
        from jquant.quantization import quantize

        spec = self.spec
        model = spec.family.init_model(spec.tiny_config, jax.random.key(0))
        inputs = spec.make_inputs(spec.tiny_config, 0)
        save(model, tmp_path / "float")
        restored = load(tmp_path / "float")
        assert type(restored) is type(model) and restored.config == model.config
        np.testing.assert_array_equal(_outputs(spec, restored, inputs), _outputs(spec, model, inputs))
        manifest = json.loads((tmp_path / "float" / "jquant.json").read_text())
        assert manifest["family"] == spec.family.name
        for i, recipe in enumerate(spec.save_recipes):
            qmodel = quantize(model, recipe, inputs, progress=False)
            assert qmodel.quantization.sites, recipe
            save(qmodel, tmp_path / f"q{i}")
            restored = load(tmp_path / f"q{i}")
            np.testing.assert_array_equal(_outputs(spec, restored, inputs), _outputs(spec, qmodel, inputs))
            assert restored.quantization.recipe == qmodel.quantization.recipe
            assert restored.quantization.sites == qmodel.quantization.sites

    def test_loads_by_class_name(self, reference):
        from jquant.models import load

        spec, (case, _, folder) = self.spec, reference
        loaded = load(folder)
        assert isinstance(loaded.model, spec.family.model_class), case

    def test_other_class_refused(self, tmp_path):
        from jquant.models import hf_io

        spec = self.spec
        other = "SomeOtherDiffusersModel"
        folder = hf_io.write_checkpoint(tmp_path / "other", {"_class_name": other},
                                        {"weight": np.zeros((2, 2), np.float32)}, weights_name=hf_io.DIFFUSERS_FILE)
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(ValueError, match=other):
            spec.family.from_diffusers(folder, dtype="float32")
        assert sorted(p.name for p in tmp_path.iterdir()) == before

    def test_keep_float_names_sites(self):
        from jquant.sites import find_sites

        paths = [s.path for s in find_sites(self.spec.family.abstract_model(self.spec.tiny_config))]
        for pattern in self.spec.family.keep_float:
            assert any(re.fullmatch(pattern, p) for p in paths), (pattern, paths)
