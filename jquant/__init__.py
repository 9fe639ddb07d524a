"""jquant: make generative models cheap to run, in JAX.

Public API::

    qmodel = jq.quantize(model, "gptq-w4g128", calib)   # pure; qmodel.quantization reports what was done
    jq.save(qmodel, "runs/x"); qmodel = jq.load("runs/x")
    jq.size_report(qmodel).bits_per_parameter

plus ``jquant.ops`` (the compute boundary), ``jquant.formats`` (QArray and
formats), ``jquant.recipes``, ``jquant.transforms`` (rotations, SmoothQuant, QuaRot, OSTQuant), ``jquant.calib``, ``jquant.generate`` /
``jquant.SamplingConfig`` and ``jquant.sharding``. The subpackages
``jquant.models``, ``jquant.data``, ``jquant.eval``, ``jquant.finetune`` (integer LoRA
fine-tuning), ``jquant.kv``, ``jquant.sampling`` (flow-matching sampling of diffusion models), ``jquant.ditfastattn``
(attention plans), ``jquant.frame_rate`` (DLFR-VAE, VGDFR), ``jquant.video_mixed`` (6Bit-Diffusion), ``jquant.ecar``
(ECAR's stages and multistage flow), ``jquant.methods`` (RWKVQuant, WKVQuant, MQuant) and ``jquant.train`` are
imported on first attribute access (``jq.eval``).
"""

import importlib
import os

# transformers (imported below for tokenizers and configs only) prints a "PyTorch was not found" advisory on
# import when torch is absent, which jquant never needs; advisories only, its warnings and errors still show.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jquant import calib as calib  # noqa: E402
from jquant import formats as formats
from jquant import ops as ops
from jquant import recipes as recipes
from jquant import sharding as sharding
from jquant import transforms as transforms
from jquant.checkpoint import load as load
from jquant.checkpoint import save as save
from jquant.compile_cache import use_compile_cache as use_compile_cache
from jquant.eval.size import size_report as size_report
from jquant.generate import SamplingConfig as SamplingConfig
from jquant.generate import generate as generate
from jquant.quantization import needs_calibration as needs_calibration
from jquant.quantization import quantize as quantize

__version__ = "0.1.0"
_LAZY_SUBPACKAGES = ("data", "ditfastattn", "ecar", "eval", "finetune", "frame_rate", "kv", "methods", "models",
                     "sampling", "train", "video_mixed")
__all__ = ["SamplingConfig", "calib", "formats", "generate", "load", "needs_calibration", "ops", "quantize", "recipes",
           "save", "sharding", "size_report", "transforms", *_LAZY_SUBPACKAGES]


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"jquant.{name}")
    raise AttributeError(f"module 'jquant' has no attribute {name!r}")
