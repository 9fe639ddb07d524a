"""Text conditioning for image models from the project's own decoder LM (offline: no hub text encoder).

``TextEncoder(model, tokenizer).encode(prompts, max_length)`` returns a ``TextEncoding`` (a pytree, so it is a
sampler's ``cond`` as is)::

    states [B, S, D]   hidden states of one layer (``layer``, Hugging Face ``hidden_states`` numbering:
                       0 = embeddings, i = after block i, -1 = after the last block and the final norm),
                       zero at padding
    mask   [B, S]      True on real tokens
    pooled [B, D]      masked mean of the final (normed) hidden states over the real tokens

Each prompt is ``<start> + tokens`` right-padded to ``max_length``; ``<start>`` is the tokenizer's eos token,
which is how the LM saw the start of every passage in training (the corpus stream is ``p0 <eos> p1 <eos>``,
without BOS). The LM is causal, so right padding cannot change the states of real tokens.

Pooling is the masked mean rather than the last token's state. In a causal LM only the last token has seen the
whole prompt, but its final state is trained to predict the next token, not to summarise; CLIP (the pooled
input of SD3 and Flux) can pool its end token because contrastive training makes that token the summary, which
this LM never had. The mean keeps every token's content and weighs the prompt's words alike.

The unconditional input of classifier-free guidance is ``unconditional(batch, max_length)``: the start token
alone. ``encode`` refuses an empty prompt, so an empty caption in a data set cannot silently become the
unconditional prompt.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class TextEncoding(NamedTuple):
    """A batch of encoded prompts: ``states [B, S, D]`` (float32), ``mask [B, S]`` (bool), ``pooled [B, D]``."""

    states: jax.Array
    mask: jax.Array
    pooled: jax.Array


def hidden_states(model: nnx.Module, tokens: jax.Array, layer: int) -> tuple[jax.Array, jax.Array]:
    """``tokens [B, T]`` -> (the states of ``layer`` ``[B, T, D]``, the final normed states ``[B, T, D]``).

    Uses the decoder's public parts (``block_inputs``, ``blocks()``, ``norm``), so any ``DecoderLM``
    (Llama, MoE) works; ``layer`` indexes ``[embeddings, block 1, ..., block L-1, norm(block L)]``.
    """
    x, positions = model.block_inputs(tokens)
    blocks = model.blocks()
    index = layer % (len(blocks) + 1)
    chosen = x
    for i, block in enumerate(blocks, start=1):
        x = block.calibration_forward(x, positions)
        if i == index:
            chosen = x
    final = model.norm(x)
    return (final if index == len(blocks) else chosen), final


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _encode(graphdef, state, tokens, mask, *, layer):
    states, final = hidden_states(nnx.merge(graphdef, state), tokens, layer)
    m = mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(final.astype(jnp.float32) * m, axis=1) / jnp.sum(m, axis=1)
    return TextEncoding(states=states.astype(jnp.float32) * m, mask=mask, pooled=pooled)


class TextEncoder:
    """Prompts -> ``TextEncoding`` with a decoder LM and its tokenizer (see the module docstring).

    ``model`` is any ``DecoderLM`` (``block_inputs``, ``blocks()``, ``norm``), float or quantized;
    ``tokenizer`` a Hugging Face tokenizer with ``eos_token_id`` and ``pad_token_id``.
    """

    def __init__(self, model: nnx.Module, tokenizer, *, layer: int = -1):
        missing = [name for name in ("block_inputs", "blocks", "norm") if not hasattr(model, name)]
        if missing:
            raise TypeError(f"TextEncoder: model must be a decoder LM with block_inputs, blocks() and norm (e.g. "
                            f"jquant.models.load('jq-llama-tiny').model); {type(model).__name__} lacks {missing}.")
        num_layers = len(model.blocks())
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(f"TextEncoder: layer must be an integer in [{-(num_layers + 1)}, {num_layers}] (0 = "
                             f"embeddings, -1 = final normed states) for this {num_layers}-block model, got {layer!r}.")
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"TextEncoder: the tokenizer has no {name}; the encoder starts prompts with eos and "
                                 "pads with pad.")
        self.model, self.tokenizer, self.layer = model, tokenizer, layer
        self.hidden_size = int(model.config.hidden_size)
        self.max_context = getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def load(cls, name_or_path: str = "jq-llama-tiny", *, layer: int = -1) -> TextEncoder:
        """The encoder of a bundled model (or a model folder with a tokenizer), float32 compute."""
        from jquant.models.loading import load

        loaded = load(name_or_path)
        if loaded.tokenizer is None:
            raise ValueError(f"TextEncoder.load: {loaded.path} has no tokenizer.json; pass a model with a tokenizer.")
        return cls(loaded.model, loaded.tokenizer, layer=layer)

    def fits(self, prompt: str, max_length: int) -> bool:
        """Whether ``prompt`` with the start token takes at most ``max_length`` tokens (what ``encode`` accepts)."""
        return 1 + len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= max_length

    def _check_length(self, max_length: int, fn: str) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"TextEncoder.{fn}: max_length must be a positive integer, got {max_length!r}.")
        if self.max_context is not None and max_length > self.max_context:
            raise ValueError(f"TextEncoder.{fn}: max_length={max_length} exceeds the model's context of "
                             f"{self.max_context} tokens; pass max_length <= {self.max_context}.")

    def tokenize(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[B, max_length]`` (int32: eos, the prompt, pad...) and the mask of real tokens ``[B, S]``."""
        self._check_length(max_length, "encode")
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"TextEncoder.encode: prompts must be a non-empty list of strings, got {prompts!r}.")
        tokens = np.full((len(prompts), max_length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(prompts), max_length), bool)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"TextEncoder.encode: prompt {i} is a {type(prompt).__name__}, not a string.")
            if prompt == "":
                raise ValueError(f"TextEncoder.encode: prompt {i} is empty; the empty prompt is the unconditional "
                                 "input of classifier-free guidance: use TextEncoder.unconditional(batch, max_length).")
            ids = [self.tokenizer.eos_token_id, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            if len(ids) > max_length:
                shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
                raise ValueError(f"TextEncoder.encode: prompt {i} {shown!r} is {len(ids)} tokens with the start token, "
                                 f"over max_length={max_length}; shorten it or raise max_length.")
            tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
        return tokens, mask

    def _run(self, tokens: np.ndarray, mask: np.ndarray) -> TextEncoding:
        graphdef, state = nnx.split(self.model)
        return _encode(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), layer=self.layer)

    def encode(self, prompts: list[str], max_length: int) -> TextEncoding:
        """Encode non-empty ``prompts`` padded to ``max_length`` tokens (see the module docstring)."""
        return self._run(*self.tokenize(prompts, max_length))

    def unconditional(self, batch: int, max_length: int) -> TextEncoding:
        """``batch`` copies of the unconditional input (the start token alone), shaped like ``encode``'s."""
        self._check_length(max_length, "unconditional")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"TextEncoder.unconditional: batch must be a positive integer, got {batch!r}.")
        tokens = np.full((1, max_length), self.tokenizer.pad_token_id, np.int32)
        tokens[0, 0] = self.tokenizer.eos_token_id
        mask = np.arange(max_length)[None] == 0
        one = self._run(tokens, mask)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])), one)
