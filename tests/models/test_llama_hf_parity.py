"""The Llama family through the shared family suite: parity with transformers' PyTorch models, through files.

Each case builds a tiny random transformers model with every tensor perturbed
(``jquant.testing.hf_reference``), writes it with ``save_pretrained`` and loads
it with ``llama.from_hf``: Llama 3 (GQA, llama3 RoPE, 40 kB shards for the
sharded-index loader), Llama 2 (MHA, tied, biases), Mistral (sliding window),
Qwen2 (qkv bias) and Qwen3 (qk-norm, GQA 4/1).
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jquant.models import llama  # noqa: E402
from jquant.testing.family_suite import FamilySpec, FamilySuite, torch_greedy_tokens, torch_reference_logits  # noqa: E402
from jquant.testing.hf_reference import LLAMA_BASE, LLAMA_FAMILY_CASES, build_llama_family  # noqa: E402

# transformers computes RMSNorm, RoPE angles and the attention softmax in float32 even in a float64
# model, so ~1e-7 is its own rounding floor there; jquant keeps float64 throughout except RoPE angles.
FLOAT64_TOLERANCE = 2e-6
FLOAT32_TOLERANCE = 1e-5


def _build(case: str, folder, seed: int):
    return build_llama_family(case, folder, seed=seed, max_shard_size="40KB" if case.startswith("llama3") else "1GB")


def _reload(case: str, folder):
    return getattr(transformers, LLAMA_FAMILY_CASES[case][0]).from_pretrained(folder, attn_implementation="eager").eval()


class TestLlamaFamily(FamilySuite):
    spec = FamilySpec(
        family=llama.FAMILY,
        tiny_config=llama.LlamaConfig(vocab_size=LLAMA_BASE["vocab_size"], hidden_size=32, intermediate_size=48,
                                      num_layers=2, num_heads=4, num_kv_heads=2, family="qwen3", qk_norm=True),
        vocab_size=LLAMA_BASE["vocab_size"],
        first_token=3,
        cases=tuple(sorted(LLAMA_FAMILY_CASES)),
        build_reference=_build,
        reference_logits=torch_reference_logits,
        reload_reference=_reload,
        reference_generate=torch_greedy_tokens,
        float32_tolerance=FLOAT32_TOLERANCE,
        float64_tolerance=FLOAT64_TOLERANCE,
        export_options={"max_shard_bytes": 30_000},
    )
