"""End-metric evaluation of quantized MiniLM: embedding cosine, retrieval agreement, attention error.

A corpus of sentences is tokenized once into fixed-shape batches ``[num_batches, batch, seq]``;
:func:`embed_corpus` embeds them all in one jit-compiled ``lax.map`` (one compilation per
tree structure), decoding a quantized tree inside the jitted function, and optionally
quantizing the KV cache with a :class:`~qetjax.kv.KVCodec` passed as data. Metrics compare
with the fp32 model's embeddings of the same corpus:

* embedding cosine, mean and worst over the corpus;
* retrieval agreement: each sentence queries the rest of the corpus; top-1 agreement is the
  fraction of queries whose nearest neighbour is the same under both models, top-5 overlap
  the mean fraction of shared top-5 neighbours (both sides embedded by the model evaluated);
* for KV quantization, the attention output's relative error per layer, with the fp32
  model's queries, keys and values, the keys and values quantized.

Example:
    >>> batches = make_batches(tokenizer, sentences)
    >>> reference = embed_corpus(params, batches)
    >>> evaluate(qtree, batches, reference)
    {'cos_mean': 0.998, 'cos_min': 0.991, 'top1': 0.98, 'top5': 0.95}
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import kv as kvq
from qetjax.models import minilm
from qetjax.models.minilm import attention
from qetjax.tree import dequantize_tree


class Batches(NamedTuple):
    """A tokenized corpus: int32 ``[num_batches, batch, seq]`` arrays and the sentence count."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    count: int


def make_batches(tokenizer: Any, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128) -> Batches:
    """Tokenizes ``sentences`` into equal batches (padded with empty rows and pad tokens)."""
    if not sentences:
        raise ValueError("sentences must not be empty")
    tokens = minilm.tokenize(tokenizer, list(sentences), max_length)
    n = len(sentences)
    rows = -(-n // batch_size) * batch_size
    out = [np.pad(tokens[k], ((0, rows - n), (0, 0))).reshape(-1, batch_size, tokens[k].shape[1])
           for k in ("input_ids", "attention_mask", "token_type_ids")]
    return Batches(*out, n)


@functools.partial(jax.jit, static_argnames="count")
def _embed(tree: Any, ids: jax.Array, mask: jax.Array, types: jax.Array, codec: Any, count: int) -> jax.Array:
    params = dequantize_tree(tree)
    hook = None if codec is None else kvq.transform(codec)

    def one(batch: tuple) -> jax.Array:
        return minilm.embed(params, *batch, kv_transform=hook)

    return jax.lax.map(one, (ids, mask, types)).reshape(-1, minilm.MiniLMConfig().hidden_size)[:count]


def embed_corpus(tree: Any, batches: Batches, codec: kvq.KVCodec | None = None) -> jax.Array:
    """Embeddings ``[count, 384]`` of the corpus with params (or a quantized tree) ``tree``."""
    return _embed(tree, batches.input_ids, batches.attention_mask, batches.token_type_ids, codec, batches.count)


@jax.jit
def _metrics(reference: jax.Array, emb: jax.Array) -> dict:
    cos = jnp.sum(reference * emb, 1) / (jnp.linalg.norm(reference, axis=1) * jnp.linalg.norm(emb, axis=1))
    eye = jnp.eye(reference.shape[0], dtype=bool)

    def neighbours(e: jax.Array) -> jax.Array:
        sim = jnp.where(eye, -jnp.inf, e @ e.T)
        return jax.lax.top_k(sim, 5)[1]

    ref_nn, nn = neighbours(reference), neighbours(emb)
    overlap = (ref_nn[:, :, None] == nn[:, None, :]).any(-1).mean(-1)
    return {"cos_mean": cos.mean(), "cos_min": cos.min(), "top1": (ref_nn[:, 0] == nn[:, 0]).mean(), "top5": overlap.mean()}


def compare(reference: Any, emb: Any) -> dict[str, float]:
    """Cosine (mean, worst) and retrieval agreement (top-1, top-5) of ``emb`` against ``reference``."""
    reference, emb = jnp.asarray(reference, jnp.float32), jnp.asarray(emb, jnp.float32)
    if reference.shape != emb.shape or reference.ndim != 2 or reference.shape[0] < 6:
        raise ValueError(f"reference and emb must be the same [n >= 6, dim] shape, got {reference.shape} and {emb.shape}")
    return {k: float(v) for k, v in _metrics(reference, emb).items()}


def evaluate(tree: Any, batches: Batches, reference: Any, codec: kvq.KVCodec | None = None) -> dict[str, float]:
    """:func:`compare` of the corpus embeddings of ``tree`` (and ``codec``) with ``reference``."""
    return compare(reference, embed_corpus(tree, batches, codec))


def _queries(params: Any, batch: dict) -> tuple[list, list]:
    (_, kv), state = minilm.MiniLM().apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], None,
        capture_intermediates=lambda module, _: module.name == "query", mutable=["intermediates"],
    )
    inter = state["intermediates"]["encoder"]
    queries = []
    for i in range(len(kv)):
        q = inter[f"layer_{i}"]["attention"]["query"]["__call__"][0]
        b, s, _ = q.shape
        queries.append(q.reshape(b, s, kv[i][0].shape[1], -1).transpose(0, 2, 1, 3))
    return queries, kv


@jax.jit
def _attention_errors(params: Any, batch: dict, codec: kvq.KVCodec) -> jax.Array:
    queries, kv = _queries(params, batch)
    mask = batch["attention_mask"]
    real = (mask != 0)[:, None, :, None].astype(jnp.float32)
    errors = []
    for layer, (q, (k, v)) in enumerate(zip(queries, kv)):
        exact = attention(q, k, v, mask) * real
        approx = kvq.quantized_attention(codec, layer, q, k, v, mask) * real
        errors.append(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    return jnp.stack(errors)


def attention_errors(params: Any, batch: dict, codec: kvq.KVCodec) -> np.ndarray:
    """Relative error ``||A(q, k̂, v̂) - A(q, k, v)|| / ||A(q, k, v)||`` per layer, over real query tokens.

    ``q, k, v`` are each layer's fp32 queries, keys and values on ``batch`` (a dict of
    ``input_ids``, ``attention_mask``, ``token_type_ids``); only that layer's keys and values
    are quantized, so the errors of different layers do not compound.
    """
    batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    return np.asarray(_attention_errors(params, batch, codec))

