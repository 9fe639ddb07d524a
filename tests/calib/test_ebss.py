"""Expert-Balanced Self-Sampling (MoEQuant EBSS) on a toy bigram "MoE" (no jquant model)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.calib.ebss import EBSSConfig, candidate_scores, ebss_generate, expert_balance

V, L, E = 32, 2, 8  # vocabulary, MoE layers, experts (top-2 routing)
HOT_TOKENS, HOT_EXPERTS = 24, 3  # 3/4 of the vocabulary is routed to 3 of the 8 experts


@dataclasses.dataclass(eq=False)  # hashed by identity: its methods are static jit arguments
class ToyMoE:
    """Bigram language model with a repetition penalty, routed by token.

    logits(next | prefix) = table[last] − penalty · (occurrences of each token in the prefix),
    so the cache (``seen [B, V]``) matters and a wrong beam reorder changes the text. Tokens
    ``< HOT_TOKENS`` use experts ``< HOT_EXPERTS``, the rest the other experts, so text that
    follows the model's probabilities overuses the hot experts.
    """

    table: np.ndarray  # [V, V]
    routing: np.ndarray  # [V, L, E] top-2 assignment counts of each token
    penalty: float
    traces: int = 0

    def init_cache(self, batch: int) -> dict:
        return {"seen": jnp.zeros((batch, V), jnp.float32)}

    def step(self, tokens: jax.Array, cache: dict):
        self.traces += 1  # Python side effect: counts traces, not executions
        seen = cache["seen"] + jax.nn.one_hot(tokens, V)
        return jnp.asarray(self.table)[tokens] - self.penalty * seen, {"seen": seen}, jnp.asarray(self.routing)[tokens]

    @staticmethod
    def reorder_cache(cache: dict, index: jax.Array) -> dict:
        return jax.tree.map(lambda x: x[index], cache)

    def logprobs(self, prefix: list[int]) -> np.ndarray:
        """log P(· | prefix) in float64 -> [V]."""
        logits = self.table[prefix[-1]] - self.penalty * np.bincount(prefix, minlength=V)
        return logits - np.logaddexp.reduce(logits)

    def generate(self, config: EBSSConfig, key: int = 0):
        return ebss_generate(self.step, self.init_cache, self.reorder_cache, vocab_size=V, config=config,
                             key=jax.random.key(key))


def toy_moe(seed: int, *, scale: float, penalty: float) -> ToyMoE:
    rng = np.random.default_rng(seed)
    table = (scale * rng.normal(size=(V, V))).astype(np.float32)
    routing = np.zeros((V, L, E), np.int32)
    for token in range(V):
        for layer in range(L):
            if token < HOT_TOKENS:
                experts = [(token + layer) % HOT_EXPERTS, (token + layer + 1) % HOT_EXPERTS]
            else:
                cold = E - HOT_EXPERTS
                experts = [HOT_EXPERTS + (token + 2 * layer) % cold, HOT_EXPERTS + (token + 2 * layer + 1) % cold]
            routing[token, layer, experts] = 1
    return ToyMoE(table, routing, penalty)


def numpy_sigma(counts: np.ndarray) -> np.ndarray:
    """Eq. 4 with numpy: the ddof=1 standard deviation of the usage fractions, averaged over layers."""
    total = counts.sum(-1, keepdims=True)
    usage = np.divide(counts, total, out=np.zeros(counts.shape), where=total > 0)
    return usage.std(-1, ddof=1).mean(-1)


def reference_ebss(model: ToyMoE, first: int, length: int, width: int, tau: float):
    """Spec 3.2 transcribed literally: all w·|V| candidates, deferred σ, w lowest scores kept.

    Returns (tokens, R, σ) of the best final beam."""
    beams = [([first], 0.0, model.routing[first].astype(np.float64))]
    for position in range(1, length):
        candidates = []
        for prefix, logprob_sum, counts in beams:
            balance = numpy_sigma(counts) / tau
            for token, logprob in enumerate(model.logprobs(prefix)):
                score = -(logprob_sum + logprob) / (position + 1) + balance
                extended = (prefix + [token], logprob_sum + logprob, counts + model.routing[token])
                candidates.append((score, -logprob, *extended))
        candidates.sort(key=lambda c: (c[0], c[1]))
        beams = [c[2:] for c in candidates[:width]]
    prefix, logprob_sum, counts = min(beams, key=lambda b: -b[1] / length + numpy_sigma(b[2]) / tau)
    return np.array(prefix), logprob_sum, numpy_sigma(counts)


def set_sigma(model: ToyMoE, tokens: np.ndarray) -> float:
    """σ of a whole calibration set: from its total expert counts."""
    return float(numpy_sigma(model.routing[tokens].sum((0, 1))))


def sample_text(model: ToyMoE, first: np.ndarray, length: int, seed: int) -> np.ndarray:
    """Ancestral samples from the model (random text) -> [N, length]."""
    rng = np.random.default_rng(seed)
    texts = []
    for token in first:
        text = [int(token)]
        while len(text) < length:
            text.append(int(rng.choice(V, p=np.exp(model.logprobs(text)))))
        texts.append(text)
    return np.array(texts)


def test_expert_balance_matches_numpy():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(3, L, E))
    counts[1, 0] = 0  # a layer without assignments: σ_ℓ = 0
    np.testing.assert_allclose(np.asarray(expert_balance(counts)), numpy_sigma(counts), rtol=1e-6)
    layer_1 = counts[1, 1] / counts[1, 1].sum()
    np.testing.assert_allclose(float(expert_balance(counts[1])), layer_1.std(ddof=1) / 2, rtol=1e-6)
    # 1/(E-1) factor: everything on one expert gives sqrt(((7/8)² + 7·(1/8)²) / 7) = sqrt(1/8), the same at any count
    one_expert = np.zeros((2, E))
    one_expert[:, 3] = [1, 50]
    np.testing.assert_allclose(float(expert_balance(one_expert)), math.sqrt(1 / 8), rtol=1e-6)
    assert float(expert_balance(np.full((L, E), 7))) == 0.0
    with pytest.raises(ValueError, match="E >= 2"):
        expert_balance(np.ones((L, 1)))


def test_candidate_scores_defer_sigma_to_the_prefix():
    rng = np.random.default_rng(1)
    logprobs = np.log(rng.dirichlet(np.ones(V), size=3)).astype(np.float32)  # [B, V]
    logprob_sum = rng.normal(size=3).astype(np.float32) - 5
    counts = rng.integers(0, 9, size=(3, L, E))
    length, tau = 7, 1.2
    scores = np.asarray(candidate_scores(logprobs, logprob_sum, counts, length, tau))
    # within a beam, scores differ only through log P(v|S); the shared part is −R/(l+1) + σ(S)/τ
    shared = scores + logprobs / (length + 1)
    np.testing.assert_allclose(shared, np.broadcast_to(shared[:, :1], shared.shape), atol=1e-6)
    np.testing.assert_allclose(shared[:, 0], -logprob_sum / (length + 1) + numpy_sigma(counts) / tau, rtol=1e-5)
    # τ = ∞: plain length-normalized log-likelihood
    plain = np.asarray(candidate_scores(logprobs, logprob_sum, counts, length, math.inf))
    np.testing.assert_allclose(plain, -(logprob_sum[:, None] + logprobs) / (length + 1), rtol=1e-6)


@pytest.mark.parametrize("tau", [math.inf, 1.2, 0.3])
def test_matches_literal_search_over_the_whole_vocabulary(tau):
    """τ = ∞ is length-normalized beam search; finite τ adds the deferred balance term. Top-w pruning
    is exact, and the cache (repetition penalty) is reordered with the beams."""
    model = toy_moe(0, scale=1.0, penalty=0.7)
    config = EBSSConfig(num_sequences=3, length=16, width=3, tau=tau, batch_sequences=3)
    result = model.generate(config, key=1)
    for row in range(config.num_sequences):
        tokens, logprob_sum, sigma = reference_ebss(model, int(result.tokens[row, 0]), config.length, config.width, tau)
        np.testing.assert_array_equal(result.tokens[row], tokens)
        np.testing.assert_allclose(result.sigma[row], sigma, rtol=1e-5)
        np.testing.assert_allclose(result.scores[row], -logprob_sum / config.length + sigma / tau, rtol=1e-5)


def test_balances_experts():
    """Paper defaults (w = 4, τ = 1.2) on a flat model: σ of the set falls ≥ 2× below random text and
    plain beam search, and every expert of every layer receives tokens."""
    model = toy_moe(4, scale=0.05, penalty=0.0)
    config = EBSSConfig(num_sequences=8, length=24, width=4, tau=1.2, batch_sequences=8)
    ebss = model.generate(config)
    beam = model.generate(dataclasses.replace(config, tau=math.inf))
    random_text = sample_text(model, ebss.tokens[:, 0], config.length, seed=1)
    np.testing.assert_array_equal(ebss.expert_counts, model.routing[ebss.tokens].sum((0, 1)))
    sigma = float(expert_balance(ebss.expert_counts))
    assert sigma * 2 <= set_sigma(model, random_text), (sigma, set_sigma(model, random_text))
    assert sigma * 2 <= set_sigma(model, beam.tokens), (sigma, set_sigma(model, beam.tokens))
    assert (ebss.expert_counts > 0).all()
    assert ebss.sigma.mean() < beam.sigma.mean()


def test_deterministic_batch_independent_and_compiled_once():
    model = toy_moe(2, scale=1.0, penalty=0.5)
    config = EBSSConfig(num_sequences=7, length=12, width=2, tau=1.2, batch_sequences=3)
    first = model.generate(config, key=0)
    assert model.traces == 2  # one trace (before the loop + loop body) for all 3 batches (the last one padded)
    again = model.generate(config, key=0)
    assert model.traces == 2  # cached across calls with the same functions and config
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert first.tokens.shape == (7, 12) and first.tokens.dtype == np.int32
    assert first.scores.shape == first.sigma.shape == (7,) and first.expert_counts.shape == (L, E)
    assert first.expert_counts.sum() == 7 * 12 * 2 * L  # top-2 in every layer for every token
    whole = model.generate(dataclasses.replace(config, batch_sequences=7), key=0)
    np.testing.assert_array_equal(whole.tokens, first.tokens)
    other = model.generate(config, key=1)
    assert not np.array_equal(other.tokens[:, 0], first.tokens[:, 0])


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_sequences", 0), ("length", 1), ("width", 0), ("batch_sequences", 0), ("width", 2.0), ("tau", 0.0),
     ("tau", -1.0), ("tau", math.nan)],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"EBSSConfig.{field}"):
        EBSSConfig(**{field: value})


def test_call_validation():
    model = toy_moe(0, scale=1.0, penalty=0.0)
    config = EBSSConfig(num_sequences=2, length=4, width=4, batch_sequences=2)
    with pytest.raises(ValueError, match="vocab_size"):
        ebss_generate(model.step, model.init_cache, model.reorder_cache, vocab_size=3, config=config,
                      key=jax.random.key(0))
    with pytest.raises(ValueError, match="logits of shape"):
        ebss_generate(model.step, model.init_cache, model.reorder_cache, vocab_size=V + 1, config=config,
                      key=jax.random.key(0))
