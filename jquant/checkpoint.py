"""``save(model, path)`` / ``load(path)``: quantized (or float) models as orbax checkpoints with their recipe.

A checkpoint folder holds:

  ``jquant.json``  family, config (``config_to_json`` of the family: Llama's is the Hugging Face
                   config.json dict, the others' the config dataclass's fields), compute/storage
                   dtypes, format version; for a quantized model, its report's time taken and
                   transform logs (so the loaded model's report equals the saved one's)
  ``recipe.json``  the recipe that produced the model (absent for float models)
  ``kv_cache.json`` how each attention layer caches keys/values (``jquant.kv.serialize``; absent when none
                   quantizes its cache)
  ``state/``       the orbax ``StandardCheckpointer`` checkpoint of the model's parameters
                   (QArray children are ordinary arrays: codes, scales, zeros, ...)
  ``tokenizer*``   the tokenizer, if one was given

Everything is written into a temporary sibling folder that is renamed into
place only when complete, so an interrupted save never leaves a folder that
loads (a partial folder lacks ``jquant.json`` and is rejected). ``load``
rebuilds the abstract model from the config, re-plans the recipe on it (the
recipe determines every site's format, hence every stored array's shape),
checks the stored arrays' shapes against that structure and only then restores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jquant.atomic import atomic_folder
from jquant.formats import ExpertPartition, QArray
from jquant.kv.serialize import configs_to_json, restore_configs
from jquant.quantization import QuantizationReport, attach_activation, describe, expert_activations, plan
from jquant.sharding import restore_uncommitted
from jquant.sites import find_sites
from jquant.transforms.pipeline import TransformLog, restore_structure
from jquant.recipes import Recipe

FORMAT_VERSION = 1
MANIFEST = "jquant.json"
RECIPE = "recipe.json"
KV_CACHE = "kv_cache.json"
STATE = "state"


def _families() -> dict:
    """Family name -> ``jquant.models.family.Family``, for every family in ``jquant.models.registry``.

    A family's ``config_to_json`` / ``config_from_json`` write and read the manifest's config and its
    ``abstract_model`` gives the structure to restore into; its models carry their config as
    ``model.config`` (with ``dtype`` and ``param_dtype``).
    """
    from jquant.models.registry import families

    return {family.name: family for family in families()}


def _family_of(model: nnx.Module) -> str:
    from jquant.models.registry import family_of

    return family_of(model, purpose="save").name


def save(model: nnx.Module, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
         extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (float, or quantized by ``jquant.quantize``) to ``path`` atomically.

    ``extra_files(folder)`` may add files before the folder is moved into place.
    ``path`` must be new or an empty folder; ``overwrite=True`` replaces a folder jquant
    wrote (never anything else), in one atomic exchange (``jquant.atomic``).
    """
    family = _family_of(model)
    quantized = any(isinstance(v.get_value(), (QArray, ExpertPartition))
                    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    report = getattr(model, "quantization", None)
    if quantized and report is None:
        raise ValueError("save: the model holds QArrays but no `quantization` report; quantize it with jquant.quantize.")
    recipe = report.recipe if report is not None else None
    cfg = model.config
    manifest = {"format_version": FORMAT_VERSION, "family": family, "config": _families()[family].config_to_json(cfg),
                "dtype": cfg.dtype, "param_dtype": cfg.param_dtype}
    if report is not None:
        manifest["quantization"] = {"seconds": report.seconds, "transforms": [dataclasses.asdict(t) for t in report.transforms]}
    with atomic_folder(path, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / STATE, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        checkpointer.close()
        if recipe is not None:
            (tmp / RECIPE).write_text(recipe.to_json() + "\n")
        kv = configs_to_json(model)
        if kv:
            (tmp / KV_CACHE).write_text(json.dumps(kv, indent=1, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Path(path).absolute()


def abstract_quantized(path: str | os.PathLike) -> tuple[nnx.Module, Recipe | None]:
    """The model structure a checkpoint holds (``ShapeDtypeStruct`` leaves, QArrays where quantized)."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a complete jquant checkpoint ({MANIFEST} is missing).")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: checkpoint format version {manifest.get('format_version')} is not {FORMAT_VERSION}.")
    families = _families()
    if manifest.get("family") not in families:
        raise ValueError(f"{folder}: checkpoint model family {manifest.get('family')!r} is not one jquant knows; "
                         f"known: {', '.join(sorted(families))}.")
    family = families[manifest["family"]]
    cfg = family.config_from_json(manifest["config"], dtype=manifest["dtype"], param_dtype=manifest["param_dtype"])
    abstract = family.abstract_model(cfg)
    recipe = Recipe.from_file(folder / RECIPE) if (folder / RECIPE).is_file() else None
    if (folder / KV_CACHE).is_file():
        restore_configs(abstract, json.loads((folder / KV_CACHE).read_text()))
    if recipe is not None:
        restore_structure(abstract, recipe)
        plans = plan(abstract, recipe)
        for p in plans:
            value = p.site.weight.get_value()
            axis = p.site.spec.contraction_axis % len(value.shape)
            if p.site.spec.kind == "experts":
                groups = p.expert_groups()
                parts = tuple(_abstract_weight(g.weight, (len(g.experts), *value.shape[1:]), value.dtype, axis)
                              for g in groups)
                p.site.weight.set_value(parts[0] if len(parts) == 1 else
                                        ExpertPartition(parts=parts, experts=tuple(g.experts for g in groups)))
                p.site.module.activation = expert_activations(groups)
            elif p.weight is not None:
                p.site.weight.set_value(_abstract_weight(p.weight, tuple(value.shape), value.dtype, axis))
            attach_activation(p, jax.ShapeDtypeStruct(p.scale_shape, jax.numpy.float32))
        timing = manifest.get("quantization", {})  # absent in checkpoints written before it was stored
        abstract.quantization = QuantizationReport(
            recipe=recipe, sites=tuple((p.site.path, describe(p)) for p in plans),
            unquantized=tuple(s.path for s in find_sites(abstract) if s.path not in {p.site.path for p in plans}),
            seconds=float(timing.get("seconds", 0.0)),
            transforms=tuple(TransformLog(t["kind"], t["seconds"], tuple(t["losses"])) for t in timing.get("transforms", ())))
    return abstract, recipe


def _abstract_weight(fmt, shape: tuple[int, ...], dtype, axis: int):
    """The ``ShapeDtypeStruct``-leaved QArray ``fmt`` stores for a weight of ``shape`` (float when ``fmt`` is None)."""
    if fmt is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    children = fmt.expected_children(shape, axis)
    return QArray(**{k: v for k, v in children.items() if v is not None}, format=fmt, shape=shape, dtype=str(dtype),
                  axis=axis)


def load(path: str | os.PathLike) -> nnx.Module:
    """Restore a model written by ``save`` (validating every stored array's shape first).

    A compressed-tensors or GPTQ checkpoint folder (no ``jquant.json``) loads as a quantized model through
    ``jquant.interop.load_quantized``.
    """
    folder = Path(path).absolute()
    if not (folder / MANIFEST).is_file():
        from jquant.interop import load_quantized, quantized_checkpoint_kind

        if quantized_checkpoint_kind(folder) is not None:
            return load_quantized(folder)
    abstract, recipe = abstract_quantized(folder)
    graphdef, target = nnx.split(abstract)
    if not (folder / STATE).is_dir():
        raise FileNotFoundError(f"{folder} is not a complete jquant checkpoint ({STATE}/ is missing); save the model again.")
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(folder / STATE)
    except Exception as err:  # orbax/TensorStore raise bare Exceptions with pages of detail for damaged chunks
        raise _damaged(folder, err) from None
    finally:
        checkpointer.close()
    _check_shapes(nnx.state(abstract, nnx.Param), getattr(stored, "item_metadata", stored), folder,
                  recipe_missing=recipe is None)
    try:
        params = _restore_uncommitted(folder / STATE, nnx.state(abstract, nnx.Param))
    except Exception as err:
        raise _damaged(folder, err) from None
    return nnx.merge(graphdef, params, nnx.state(abstract, nnx.Not(nnx.Param)))


def _damaged(folder: Path, err: Exception) -> ValueError:
    """The error for a state folder orbax could not read, with the first line of its (often pages long) detail."""
    detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return ValueError(f"{folder / STATE} could not be read ({detail}): the checkpoint is damaged or truncated; "
                      "save the model again (or copy the folder again from its source).")


def _restore_uncommitted(folder: Path, target: nnx.State) -> nnx.State:
    """The arrays stored in ``folder`` as ``target`` (``ShapeDtypeStruct`` leaves) describes them, placed
    uncommitted (``jquant.sharding.restore_uncommitted``: the loaded model reuses the saved one's programs)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return restore_uncommitted(lambda: checkpointer.restore(folder, target))


def _key(path) -> str:
    """A tree path as ``a/b/0/c``, whatever the key types (dict keys, attributes, indices)."""
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(p) for p in parts)


def _check_shapes(target, stored, folder: Path, *, recipe_missing: bool) -> None:
    want = {_key(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(target)}
    have = {_key(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored) if hasattr(v, "shape")}
    if not have:
        raise ValueError(f"{folder / STATE} holds no readable arrays: the checkpoint is damaged or truncated; "
                         "save the model again (or copy the folder again from its source).")
    for name, shape in want.items():
        if name not in have and recipe_missing and any(k.startswith(name + "/") for k in have):
            raise ValueError(f"{folder}: {RECIPE} is missing but the state holds quantized arrays "
                             f"(e.g. under {name}): the checkpoint is incomplete; copy {RECIPE} back from where the "
                             "checkpoint was saved, or save the quantized model again.")
        if name not in have:
            raise ValueError(f"{folder}: the checkpoint has no array for {name} (expected shape {shape}).")
        if have[name] != shape:
            raise ValueError(f"{folder}: array {name} has shape {have[name]} in the checkpoint but the model expects {shape}.")
