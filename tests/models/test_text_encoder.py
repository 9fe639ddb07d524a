"""The text encoder: hidden states of the bundled jq-llama-tiny against transformers' LlamaForCausalLM on the same
tokens, against the jquant model's own logits, padding independence, the unconditional input and refusals."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import jquant.models as jm
from jquant.models.text_encoder import TextEncoder

WORDS = ("red", "apple", "dog", "face", "rocket", "tree", "sun", "with", "smiling", "blue", "heart", "the", "a")


@pytest.fixture(scope="module")
def loaded():
    return jm.load("jq-llama-tiny")


@pytest.fixture(scope="module")
def reference(loaded):
    return LlamaForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()


def _prompts(n: int) -> list[str]:
    rng = np.random.default_rng()
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 7))) for _ in range(n)]


def _ids(tokenizer, prompt: str) -> list[int]:
    return [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("layer", [-1, -2, 0, 2])
def test_states_mask_and_pooled_match_transformers(loaded, reference, layer):
    encoder = TextEncoder(loaded.model, loaded.tokenizer, layer=layer)
    prompts = _prompts(3)
    out = encoder.encode(prompts, max_length=24)
    assert out.states.shape == (3, 24, 192) and out.mask.shape == (3, 24) and out.pooled.shape == (3, 192)
    for i, prompt in enumerate(prompts):
        ids = _ids(loaded.tokenizer, prompt)
        n = len(ids)
        with torch.no_grad():
            hidden = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states
        np.testing.assert_array_equal(np.asarray(out.mask[i]), np.arange(24) < n)
        np.testing.assert_allclose(np.asarray(out.states[i, :n]), hidden[layer][0].numpy(), rtol=1e-4, atol=1e-4)
        assert not np.any(np.asarray(out.states[i, n:]))
        np.testing.assert_allclose(np.asarray(out.pooled[i]), hidden[-1][0].numpy().mean(0), rtol=1e-4, atol=1e-4)


def test_final_states_give_the_models_logits(loaded):
    encoder = TextEncoder(loaded.model, loaded.tokenizer)
    prompt = _prompts(1)[0]
    ids = np.array([_ids(loaded.tokenizer, prompt)], np.int32)
    out = encoder.encode([prompt], max_length=ids.shape[1] + 5)
    logits = loaded.model.lm_head(out.states[:, : ids.shape[1]])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(loaded.model(ids)), rtol=1e-4, atol=1e-4)


def test_padding_and_batch_do_not_change_real_tokens(loaded):
    encoder = TextEncoder(loaded.model, loaded.tokenizer, layer=-2)
    prompts = _prompts(4)
    longest = max(len(_ids(loaded.tokenizer, p)) for p in prompts)
    tight, loose = encoder.encode(prompts, max_length=longest), encoder.encode(prompts, max_length=longest + 9)
    alone = encoder.encode(prompts[1:2], max_length=longest + 9)
    mask = np.asarray(tight.mask)
    np.testing.assert_allclose(np.asarray(loose.states[:, :longest])[mask], np.asarray(tight.states)[mask],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loose.pooled), np.asarray(tight.pooled), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(alone.states[0]), np.asarray(loose.states[1]), rtol=1e-5, atol=1e-5)


def test_unconditional_is_the_start_token_alone(loaded, reference):
    encoder = TextEncoder(loaded.model, loaded.tokenizer)
    out = encoder.unconditional(3, max_length=16)
    with torch.no_grad():
        final = reference(torch.tensor([[loaded.tokenizer.eos_token_id]]), output_hidden_states=True).hidden_states[-1]
    assert out.states.shape == (3, 16, 192) and out.pooled.shape == (3, 192)
    np.testing.assert_array_equal(np.asarray(out.mask), np.broadcast_to(np.arange(16) == 0, (3, 16)))
    for i in range(3):
        np.testing.assert_allclose(np.asarray(out.states[i, 0]), final[0, 0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.pooled[i]), final[0, 0].numpy(), rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(out.states[:, 1:]))


def test_refusals(loaded):
    encoder = TextEncoder(loaded.model, loaded.tokenizer)
    with pytest.raises(ValueError, match=r"prompt 1 is empty.*unconditional\(batch, max_length\)"):
        encoder.encode(["a red apple", ""], max_length=8)
    long_prompt = " ".join(["rocket"] * 20)
    with pytest.raises(ValueError, match=r"prompt 0 'rocket rocket.*' is \d+ tokens .* over max_length=8"):
        encoder.encode([long_prompt], max_length=8)
    with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
        encoder.encode(["sun"], max_length=2048)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encoder.encode("sun", max_length=8)
    with pytest.raises(ValueError, match="prompt 0 is a int"):
        encoder.encode([3], max_length=8)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        encoder.unconditional(2, max_length=0)
    with pytest.raises(ValueError, match="layer must be an integer in"):
        TextEncoder(loaded.model, loaded.tokenizer, layer=5)
    with pytest.raises(TypeError, match="decoder LM"):
        TextEncoder(object(), loaded.tokenizer)
