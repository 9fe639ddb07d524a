"""The retrieval protocol (chunked prefill, question decoded token by token) continues prompts as greedy generation."""

import jax
import numpy as np

import jquant as jq
from jquant.eval.retrieval import answer
from jquant.models import llama


def test_answer_equals_greedy_generation():
    cfg = llama.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                            num_kv_heads=2)
    model = llama.init_model(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, 97, (3, 40))
    want = jq.generate(model, prompts, 5)[:, 40:]
    np.testing.assert_array_equal(answer(model, prompts, 5, prefill_chunk=16, decode_tail=6), want)
