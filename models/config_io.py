"""What every model family does with its config dataclass: check dtypes against JAX's mode, and
write/read the config as strict JSON for ``jquant.checkpoint``'s manifest."""

from __future__ import annotations

import dataclasses
import math

import jax


def check_dtypes_available(cfg) -> None:
    """Raise if ``cfg`` asks for float64 while JAX's 64-bit mode is off."""
    if "float64" in (cfg.dtype, cfg.param_dtype) and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{type(cfg).__name__} asks for float64 but JAX's 64-bit mode is off; call "
            "jax.config.update('jax_enable_x64', True) first."
        )


def _json_value(value):
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": str(value).replace("inf", "Infinity").replace("nan", "NaN")}
    return value


def _from_json_value(value):
    if isinstance(value, list):
        return tuple(_from_json_value(v) for v in value)
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    return value


def dataclass_config_to_json(cfg) -> dict:
    """A config dataclass's fields as a strict-JSON dict (tuples as lists, infinities as ``{"__float__": ...}``)."""
    return {f.name: _json_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def dataclass_config_from_json(cls, data: dict, *, dtype: str, param_dtype: str | None):
    """The ``cls`` config ``dataclass_config_to_json`` wrote, with the given compute and storage dtypes."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"checkpoint config has fields {cls.__name__} does not know: {unknown}.")
    values = {k: _from_json_value(v) for k, v in data.items()}
    return cls(**{**values, "dtype": dtype, "param_dtype": param_dtype or dtype})
