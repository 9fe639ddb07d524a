"""jquant.train.vl: the vision tokens, the VL model grown from an LM, prompts, the answer-only loss against the
full forward, greedy exact match against real greedy decoding, batches, image checks and the export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.data import load_tokenizer
from jquant.data.vqa_scenes import format_prompt, vqa_scenes
from jquant.models import llama, load
from jquant.models.qwen2_vl import generate, images_to_patches, init_model
from jquant.testing.qwen2_vl_reference import tiny_vqa_config
from jquant.train import vl

V = 4096  # the bundled tokenizer's vocabulary
RES = 16  # 16 px images: 4x4 patches of 4 px -> 4 merged image tokens


@pytest.fixture(scope="module")
def tokenizer():
    return vl.extend_tokenizer(load_tokenizer(), tiny_vqa_config(V))


@pytest.fixture(scope="module")
def vqa():
    s = vqa_scenes("validation", 12, 48, seed=3)  # strided to RES px: the plumbing, not the content, is tested
    return s._replace(images=np.ascontiguousarray(s.images[:, ::3, ::3]))


@pytest.fixture(scope="module")
def model():
    return init_model(tiny_vqa_config(V), jax.random.key(1))


def test_extend_tokenizer_adds_the_vision_tokens_at_the_model_ids(tokenizer):
    base = load_tokenizer()
    assert len(base) == V  # the original is not modified
    cfg = tiny_vqa_config(V)
    ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    assert tuple(tokenizer.convert_tokens_to_ids(t) for t in vl.VISION_TOKENS) == ids
    text = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|> question: hi"
    got = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got[:4] == [V + 2, V, V, V + 3] and got[4:] == base(" question: hi", add_special_tokens=False)["input_ids"]
    vl.check_tokenizer(tokenizer, cfg)
    with pytest.raises(ValueError, match="tokenizer saved with the model"):
        vl.check_tokenizer(base, cfg)
    with pytest.raises(ValueError, match="four ids after"):
        vl.extend_tokenizer(base, cfg.replace(image_token_id=5))


def test_vl_from_lm_keeps_the_lm_and_adds_small_rows():
    lm = llama.init_model(llama.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1,
                                            num_heads=2, num_kv_heads=1, max_position_embeddings=256),
                          jax.random.key(2))
    model = vl.vl_from_lm(lm, tiny_vqa_config(V), jax.random.key(3))
    tokens = np.random.default_rng(0).integers(3, V, (2, 9)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model(tokens))[..., :V], np.asarray(lm(jnp.asarray(tokens))), atol=2e-5)
    new = np.asarray(model.embed_tokens.embedding[...])[V:]
    assert new.shape == (4, 32) and 0.01 < new.std() < 0.04
    with pytest.raises(ValueError, match="4 more vocabulary rows"):
        wider = tiny_vqa_config(V).text.replace(vocab_size=V + 8)
        vl.vl_from_lm(lm, tiny_vqa_config(V).replace(text=wider), jax.random.key(3))


def test_encode_prompt_expands_each_image_and_refuses_a_mismatch(tokenizer):
    cfg = tiny_vqa_config(V)
    ids = vl.encode_prompt(tokenizer, cfg, format_prompt("what?", vl.IMAGE_MARK), 1, 4)
    assert ids[:7] == [tokenizer.eos_token_id, V + 2, V, V, V, V, V + 3]
    assert tokenizer.decode(ids[7:]) == " question: what? answer:"
    with pytest.raises(ValueError, match="1 <image> placeholder.*2 image"):
        vl.encode_prompt(tokenizer, cfg, "<image> a", 2, 4)
    with pytest.raises(ValueError, match="0 <image> placeholder.*1 image"):
        vl.encode_prompt(tokenizer, cfg, "what?", 1, 4)


@pytest.mark.parametrize("image", [True, False], ids=["image", "text-only"])
def test_encoded_targets_are_the_answer_and_eos(tokenizer, vqa, image):
    cfg = tiny_vqa_config(V)
    length = vl.required_length(vqa, tokenizer, cfg, image=image)
    data = vl.encode_set(vqa, tokenizer, cfg, length + 3, image=image)
    for i, answer in enumerate(vqa.answers):
        targets = data.tokens[i, np.unique(data.at[i]) + 1].tolist()
        assert targets[-1] == tokenizer.eos_token_id and tokenizer.decode(targets[:-1]) == " " + answer
        assert np.sum(data.tokens[i] == V) == (4 if image else 0)
    assert data.num_targets == sum(len(vl.answer_ids(tokenizer, a)) for a in vqa.answers)
    with pytest.raises(ValueError, match="raise the length"):
        vl.encode_set(vqa, tokenizer, cfg, length - 1, image=image)


def test_answer_loss_and_scores_match_the_full_forward(model, tokenizer, vqa):
    """The head on the target positions only equals cross-entropy of the public forward's logits (float64 numpy)."""
    cfg = model.config
    data = vl.encode_set(vqa, tokenizer, cfg, vl.required_length(vqa, tokenizer, cfg))
    rows = np.arange(5)
    batch = vl.make_batch(data, rows, cfg)
    loss = float(vl.answer_loss(model, batch, vl.vision_context(model, (RES, RES))))
    nll, hits = [], []
    for i in rows:
        pixels, grid = images_to_patches(vqa.images[i:i + 1] / 255.0, cfg.vision)
        logits = np.asarray(model(data.tokens[i:i + 1], pixels, grid), np.float64)[0]
        at = np.unique(data.at[i])
        logp = logits[at] - np.log(np.exp(logits[at] - logits[at].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits[at].max(-1, keepdims=True)
        nll.append(-logp[np.arange(len(at)), data.tokens[i, at + 1]])
        hits.append(np.all(logits[at].argmax(-1) == data.tokens[i, at + 1]))
    assert abs(loss - np.concatenate(nll).mean()) < 1e-4
    scores = vl.score(model, vl.encode_set(vqa._replace(questions=vqa.questions[:5], answers=vqa.answers[:5],
                                                        kinds=vqa.kinds[:5], images=vqa.images[:5]),
                                           tokenizer, cfg, data.tokens.shape[1]), batch_size=4)
    assert abs(scores["target_loss"] - np.concatenate(nll).mean()) < 1e-4
    assert scores["accuracy"] == np.mean(hits)


def test_exact_match_equals_greedy_decoding(model, tokenizer, vqa):
    """Targets set to the model's own greedy continuation score 1; one changed target token scores 0."""
    cfg = model.config
    data = vl.encode_set(vqa, tokenizer, cfg, vl.required_length(vqa, tokenizer, cfg) + 2)
    rows, n_new = [0, 4, 7], 3
    tokens, at = data.tokens[rows].copy(), np.zeros((len(rows), n_new), np.int32)
    for r, i in enumerate(rows):
        start = int(data.at[i, 0]) + 1  # the prompt's length
        pixels, grid = images_to_patches(vqa.images[i:i + 1] / 255.0, cfg.vision)
        greedy = generate(model, data.tokens[i:i + 1, :start], n_new, pixels, grid)[0, start:]
        tokens[r, start:start + n_new] = greedy
        at[r] = np.arange(start - 1, start - 1 + n_new)
    own = vl.EncodedSet(tokens, at, data.positions[rows], vqa.images[rows], [vqa.kinds[i] for i in rows])
    assert vl.score(model, own, batch_size=4)["accuracy"] == 1.0
    tokens[:, at[:, -1] + 1] = (tokens[:, at[:, -1] + 1] + 1) % V
    wrong = vl.EncodedSet(tokens, at, data.positions[rows], vqa.images[rows], own.kinds)
    assert vl.score(model, wrong, batch_size=4)["accuracy"] == 0.0


def test_batches_are_deterministic_and_hold_the_patches(tokenizer, vqa):
    cfg = tiny_vqa_config(V)
    data = vl.encode_set(vqa, tokenizer, cfg, vl.required_length(vqa, tokenizer, cfg))
    sample = vl.batch_sampler(data, cfg, 4, seed=5)
    a, b, c = sample(7), sample(7), sample(8)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["pixel_values"], c["pixel_values"])
    rows = np.random.default_rng([5, 7]).integers(len(data.tokens), size=4)
    pixels, _ = images_to_patches(vqa.images[rows] / 255.0, cfg.vision)
    np.testing.assert_allclose(np.asarray(a["pixel_values"]).reshape(pixels.shape), pixels, rtol=1e-6)
    text = vl.batch_sampler(vl.encode_set(vqa, tokenizer, cfg, 40, image=False), cfg, 4, seed=5)(7)
    assert "pixel_values" not in text and not np.any(np.asarray(text["tokens"]) >= V)


@pytest.mark.parametrize("shape, expected, match", [
    ((16, 16, 4), None, "3-channel .*got 4"), ((16, 16), None, "got 1 channel"),
    ((24, 24, 3), (16, 16), "trained on 16x16 images, got 24x24"), ((12, 16, 3), None, "multiples of .* 8 px"),
])
def test_check_image_refusals(shape, expected, match):
    with pytest.raises(ValueError, match=match):
        vl.check_image(np.zeros(shape, np.uint8), tiny_vqa_config(V), expected, argument="--image x.png")


def test_export_loads_back_with_its_tokenizer(model, tokenizer, vqa, tmp_path):
    info = {"name": "tiny", "image_size": [RES, RES]}
    vl.export(model, tokenizer, tmp_path / "vl", info, history=[{"step": 1, "loss": 2.0, "val_loss": 0.5}])
    loaded = load(tmp_path / "vl")
    vl.check_tokenizer(loaded.tokenizer, loaded.model.config)
    assert (tmp_path / "vl" / "loss_curve.png").is_file()
    pixels, grid = images_to_patches(vqa.images[:1] / 255.0, model.config.vision)
    tokens = np.array([vl.encode_prompt(tokenizer, model.config, "<image> hi", 1, 4)])
    np.testing.assert_allclose(np.asarray(loaded.model(tokens, pixels, grid)), np.asarray(model(tokens, pixels, grid)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="tokenizer saved with the model"):
        vl.export(model, load_tokenizer(), tmp_path / "other", info)
