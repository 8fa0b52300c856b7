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

The end-to-end run (:func:`run`, used by ``qetjax-bench --model minilm`` and
``scripts/eval_minilm.py``) quantizes the 36 linear kernels (rows = output channels by
default: ``layout="out_in"``), and separately the word-embedding table (rows = tokens), with
each configuration's budget solver at each budget, optionally with GPTQ on calibration inputs
captured from the model (:mod:`qetjax.calibration`, in the stages of :func:`gptq_stages`); it
then fits KV-cache quantizers per layer and measures the peak memory of quantizing the model
in a fresh process (:mod:`qetjax.bench.memory`). Configurations are strings
``method[:option=value...][+gptq][+mixed]``, e.g. ``rtn``, ``rtn:group_size=128``,
``pvq:group_size=64+gptq+mixed`` (:func:`qetjax.bench.config.parse_config`); rows print with
:func:`qetjax.bench.report.markdown_by_part`.

Example:
    >>> batches = make_batches(tokenizer, sentences)
    >>> reference = embed_corpus(params, batches)
    >>> evaluate(qtree, batches, reference)
    {'cos_mean': 0.998, 'cos_min': 0.991, 'top1': 0.98, 'top5': 0.95}
    >>> from qetjax.bench.report import markdown_by_part
    >>> print(markdown_by_part(run(["rtn:group_size=128"], [4.25], sentences=128, max_length=64)))
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import calibration
from qetjax import kv as kvq
from qetjax.bench import memory
from qetjax.bench.config import Config, parse_config
from qetjax.bench.corpus import stdlib_sentences
from qetjax.budget import allocate, for_budget
from qetjax.io import save
from qetjax.models import minilm
from qetjax.models.minilm import attention
from qetjax.tree import dequantize_tree, path_str, quantize_tree, tree_bits


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



# --------------------------------------------------------------------------- end-to-end run

REFERENCE_ENV = "QETJAX_MINILM_REFERENCE"
"""Environment variable naming a ``.npz`` file whose ``sentences`` open the evaluation corpus
(e.g. the reference fixture ``minilm_reference.npz``: its 32 sentences, as in the tables of
BENCHMARKS.md); without it (and without ``reference=``) the corpus is frozen stdlib sentences only."""

TARGETS = {"linear": r"^encoder/layer_\d+/.*/kernel$", "embedding": r"^embeddings/word_embeddings/embedding$"}
"""Leaves quantized together: the 36 linear kernels, or the word-embedding table."""

LAYOUT = {"linear": "out_in", "embedding": "in_out"}
"""Default layout per target: kernels as ``[out, in]`` (rows = output channels), the table as is (rows = tokens)."""

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")

SIZES = {"quick": dict(sentences=128, max_length=64, calib_sentences=1024),
         "full": dict(sentences=512, max_length=128, calib_sentences=1024)}
"""Corpus and calibration sizes of a ``--quick`` and a full run. GPTQ's Hessians of the 1536-wide
MLP inputs need well over 1536 samples: 64 calibration sentences (1.4k tokens) gave cosine 0.987
at 4 bits where 512 (9.9k tokens) gave 0.991, and 1024 lifted 3 bits from 0.968 to 0.972. The
frozen corpus holds 2105 sentences, so a full run gets all 1024 after its 512."""


class Setup(NamedTuple):
    """Model, corpus and calibration data of a run (see :func:`setup`)."""

    params: Any
    batches: Batches
    reference: jax.Array
    held_out: dict
    calib: dict
    calib_kv: list
    calib_batches: Batches


def reference_sentences(path: str | os.PathLike | None = None) -> list[str]:
    """The ``sentences`` of the ``.npz`` file ``path``, or of :data:`REFERENCE_ENV`'s file; ``[]`` if neither.

    Raises:
      FileNotFoundError: the file named does not exist.
      KeyError: it has no ``sentences`` array.
    """
    path = os.environ.get(REFERENCE_ENV) if path is None else path
    if not path:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference sentences file {str(path)!r} (argument or ${REFERENCE_ENV}) does not exist")
    with np.load(path) as d:
        return [str(t) for t in d["sentences"]]


def setup(sentences: int = 128, max_length: int = 64, calib_sentences: int = 1024,
          reference: str | os.PathLike | None = None) -> Setup:
    """Loads MiniLM; tokenizes the evaluation corpus and a disjoint calibration set; embeds the corpus with fp32.

    The corpus is the :func:`reference_sentences` of ``reference`` (or :data:`REFERENCE_ENV`),
    if any, then frozen stdlib docstring sentences. The first 32 corpus sentences are the
    held-out batch of the KV-cache measurements; the first 128 calibration sentences, as
    batches, measure sensitivities (:func:`mixed_budgets`).
    """
    _, params, tokenizer = minilm.load_pretrained()
    first = reference_sentences(reference)[:sentences]
    corpus = first + (stdlib_sentences(sentences - len(first), exclude=first) if sentences > len(first) else [])
    batches = make_batches(tokenizer, corpus, 32, max_length)
    calib_text = stdlib_sentences(calib_sentences, exclude=corpus)
    calib = minilm.tokenize(tokenizer, calib_text, max_length)
    held_out = minilm.tokenize(tokenizer, corpus[:32], max_length)
    calib_kv = minilm.encode(params, **calib, return_kv=True)[1]
    return Setup(params, batches, embed_corpus(params, batches), held_out, calib, calib_kv,
                 make_batches(tokenizer, calib_text[:128], 32, max_length))


def _encode(params: Any, batch: Mapping[str, Any]) -> jax.Array:
    """The encoder on a tokenized batch (the model :mod:`qetjax.calibration` captures inputs from)."""
    return minilm.encode(params, *(jnp.asarray(batch[k]) for k in BATCH_KEYS))


def dense_inputs(params: Any, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs ``[real tokens, in]`` of every linear layer of MiniLM ``params`` on ``batch``, by kernel path
    (:func:`qetjax.calibration.dense_inputs`, padding dropped by the attention mask)."""
    return calibration.dense_inputs(_encode, params, batch, mask=batch["attention_mask"])


def _selected(params: Any, target: str) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if re.search(TARGETS[target], path_str(p))}


def quantize_model(params: Any, config: Config, target: str, bits_per_weight: float | Mapping[str, float], *,
                   layout: str | None = None, calib: dict | None = None, key: jax.Array | None = None,
                   sequential: bool = True, inputs: dict[str, np.ndarray] | None = None) -> Any:
    """Quantizes the ``target`` leaves of ``params`` with ``config`` at ``bits_per_weight`` per leaf.

    Args:
      params: the MiniLM parameter tree.
      config: method, budget-solver options and whether to use GPTQ.
      target: a key of :data:`TARGETS`.
      bits_per_weight: the budget each leaf must fit (``qetjax.for_budget``), or a budget for each
        leaf by path (these leaves are quantized; e.g. :func:`mixed_budgets`).
      layout: ``"out_in"`` or ``"in_out"`` (default :data:`LAYOUT` ``[target]``).
      calib: tokenized calibration batch, needed for GPTQ (whose inputs :func:`dense_inputs` captures).
      key: PRNG key (default ``jax.random.key(0)``).
      sequential: GPTQ's calibration inputs of each stage of kernels (:func:`gptq_stages`) come from
        the model whose earlier stages are already quantized (GPTQ's procedure); ``False`` takes
        all inputs from the fp32 model.
      inputs: the fp32 model's :func:`dense_inputs` on ``calib``, when already captured (used
        only when GPTQ is not sequential).

    GPTQ runs in :func:`qetjax.calibration.gptq_tree` (group width: each quantizer's
    ``column_group``), sequentially in the stages of :func:`gptq_stages`.

    Returns:
      The quantized tree (other leaves kept).

    Raises:
      ValueError: the budget cannot be met, or GPTQ without ``calib``, with ``layout="in_out"``
        or with a method without column groups.
    """
    key = jax.random.key(0) if key is None else key
    layout = LAYOUT[target] if layout is None else layout
    leaves = _selected(params, target)
    budgets = bits_per_weight if isinstance(bits_per_weight, Mapping) else dict.fromkeys(leaves, bits_per_weight)
    if not set(budgets) <= set(leaves):
        raise ValueError(f"budgets name leaves outside target {target!r}: {sorted(set(budgets) - set(leaves))[:3]}")
    shape = (lambda x: x.shape[::-1]) if layout == "out_in" else (lambda x: x.shape)
    policy = {p: for_budget(config.method, shape(leaves[p]), b, **dict(config.options)) for p, b in budgets.items()}
    if not config.gptq:
        return quantize_tree(key, params, lambda p, x: policy.get(p), layout=layout, progress=False)
    if layout != "out_in" or calib is None:
        raise ValueError("GPTQ quantizes [out, in] kernels on calibration inputs: needs layout='out_in' and calib")
    stages = gptq_stages(policy) if sequential else None
    return calibration.gptq_tree(key, params, policy, _encode, calib, stages=stages, mask=calib["attention_mask"],
                                 inputs=None if sequential else inputs)


def mixed_budgets(s: Setup, config: Config, target: str, bits_per_weight: float, layout: str | None = None,
                  spread: tuple[float, float] = (1.5, 2.0)) -> dict[str, float]:
    """Per-leaf budgets of mean ``bits_per_weight`` from each leaf's measured sensitivity.

    Each ``target`` leaf alone is quantized with ``config`` (GPTQ on the fp32 model's inputs)
    at ``bits_per_weight``; its sensitivity is ``1 - mean cosine`` of the calibration batches'
    embeddings (:attr:`Setup.calib_batches`, never the evaluation corpus) to the fp32 model's.
    :func:`qetjax.budget.allocate` then spreads the budget (6 dB per bit model) within
    ``[bits - spread[0], bits + spread[1]]``; every leaf stores at most its budget, so the whole
    stores at most ``bits_per_weight`` per weight.

    Example:
        >>> config = parse_config("pvq:group_size=64+gptq+mixed")
        >>> budgets = mixed_budgets(s, config, "linear", 3.0)
        >>> qtree = quantize_model(s.params, config, "linear", budgets, calib=s.calib)
    """
    leaves = _selected(s.params, target)
    reference = embed_corpus(s.params, s.calib_batches)
    inputs = dense_inputs(s.params, s.calib) if config.gptq else None
    sens = {}
    for p in leaves:
        qtree = quantize_model(s.params, config, target, {p: bits_per_weight}, layout=layout, calib=s.calib,
                               sequential=False, inputs=inputs)
        tree = dequantize_tree(qtree)  # the fp32 tree's structure: one compilation of the embedding for all leaves
        sens[p] = max(0.0, 1.0 - compare(reference, embed_corpus(tree, s.calib_batches))["cos_mean"])
    sizes = {p: int(np.size(x)) for p, x in leaves.items()}
    low, high = spread
    return allocate(sens, sizes, bits_per_weight, bits_per_weight, max(bits_per_weight - low, 0.5), bits_per_weight + high)


def gptq_stages(paths: Sequence[str]) -> list[list[str]]:
    """``paths`` of linear kernels grouped in the order their inputs are computed by the encoder.

    Kernels reading the same input form one stage (a layer's query, key and value); stages are
    ordered by layer, then attention projections, attention output, MLP intermediate, MLP output.

    Example:
        >>> gptq_stages(["encoder/layer_0/mlp/output/kernel", "encoder/layer_0/attention/key/kernel"])
        [['encoder/layer_0/attention/key/kernel'], ['encoder/layer_0/mlp/output/kernel']]
    """
    order = ("attention/(query|key|value)", "attention/output", "mlp/intermediate", "mlp/output")

    def rank(p: str) -> tuple[int, int]:
        layer = re.search(r"layer_(\d+)/", p)
        sub = [i for i, pattern in enumerate(order) if re.search(f"/{pattern}/kernel$", p)]
        if layer is None or not sub:
            raise ValueError(f"not a MiniLM linear kernel: {p}")
        return int(layer.group(1)), sub[0]

    return calibration.group_stages(paths, rank)


def weight_rows(s: Setup, configs: Sequence[Config], budgets: Sequence[float], targets: Sequence[str] = tuple(TARGETS),
                layout: str | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (target, config, budget): bits/weight, end metrics, quantize seconds, file size.

    ``on_row(row)`` is called after each measured row (e.g. to show progress).
    """
    rows = []
    for target in targets:
        for config in configs:
            for budget in budgets:
                row = {"part": "weights", "target": target, "config": config.label, "budget": budget}
                t0 = time.perf_counter()
                lay = layout if target == "linear" else None
                try:
                    bits = mixed_budgets(s, config, target, budget, lay) if config.mixed else budget
                    qtree = jax.block_until_ready(quantize_model(s.params, config, target, bits, calib=s.calib, layout=lay))
                except ValueError as err:
                    rows.append({**row, "status": f"n/a ({str(err)[:80]})"})
                    continue
                seconds = time.perf_counter() - t0
                tb = tree_bits(qtree)
                with tempfile.TemporaryDirectory() as tmp:
                    size = save(os.path.join(tmp, "m.qet"), qtree)
                rows.append({**row, "status": "ok", "bpw_quantized": tb.quantized_bits_per_weight,
                             "bpw_model": tb.bits_per_weight, **evaluate(qtree, s.batches, s.reference),
                             "quantize_s": seconds, "file_MiB": size / 2**20})
                if on_row is not None:
                    on_row(rows[-1])
    return rows


def kv_rows(s: Setup, configs: Sequence[Config], budgets: Sequence[float],
            on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (config, budget, per-head or shared fit): attention error per layer, embedding cosine.

    ``on_row(row)`` is called after each measured row.
    """
    rows = []
    mask = s.calib["attention_mask"]
    tokens, heads, head_dim = int(np.sum(mask)), s.calib_kv[0][0].shape[1], s.calib_kv[0][0].shape[3]
    reference = minilm.embed(s.params, **s.held_out)
    embed = jax.jit(lambda p, c, b: minilm.embed(p, **b, kv_transform=kvq.transform(c)))
    for config in configs:
        for budget in budgets:
            for per_head in (True, False):
                row = {"part": "kv", "config": config.label, "budget": budget, "fit": "per head" if per_head else "shared"}
                shape = (tokens if per_head else tokens * heads, head_dim)  # params amortised over the calibration cache
                try:
                    if config.gptq or config.mixed:
                        raise ValueError("GPTQ and mixed budgets are for weights")
                    q = for_budget(config.method, shape, budget, **dict(config.options))
                except ValueError as err:
                    rows.append({**row, "status": f"n/a ({str(err)[:80]})"})
                    continue
                t0 = time.perf_counter()
                codec = jax.block_until_ready(kvq.fit_kv(jax.random.key(0), q, s.calib_kv, mask, per_head=per_head))
                seconds = time.perf_counter() - t0
                errors = attention_errors(s.params, s.held_out, codec)
                cos = np.sum(np.asarray(reference) * np.asarray(embed(s.params, codec, s.held_out)), 1)
                rows.append({**row, "status": "ok", "code_bpe": kvq.code_bits_per_element(codec, 1024, head_dim),
                             "params_KiB": kvq.params_bits(codec) / 8 / 1024, "attn_err_mean": float(errors.mean()),
                             "attn_err_per_layer": " ".join(f"{e:.3f}" for e in errors), "cos_mean": float(cos.mean()),
                             "cos_min": float(cos.min()), "fit_s": seconds})
                if on_row is not None:
                    on_row(rows[-1])
    return rows


def peak_memory(config: Config, budget: float) -> dict:
    """Peak host RSS of quantizing all linear kernels, measured in a fresh Python process.

    :func:`memory_row` runs in the new process (:func:`qetjax.bench.memory.fresh_process`), so
    nothing this process holds or has compiled counts.
    """
    row = memory.fresh_process(f"{__name__}:memory_row", config.label, str(budget))
    return {"part": "memory", "config": config.label, "budget": budget, **row}


def memory_row(label: str, budget: str | float) -> dict:
    """Sizes (MiB) and peak RSS of quantizing MiniLM's linear kernels with config ``label`` at ``budget``.

    After loading the model, RSS is polled every 10 ms (:func:`qetjax.bench.memory.peak_rss`)
    while :func:`quantize_model` runs, twice: the first call includes JAX compilation, the second
    (the first result freed) reuses the compiled code. Reported beside the model's fp32 size,
    the quantized leaves' fp32 size and the largest quantized leaf's fp32 size.
    """
    params = minilm.load_params()
    config = parse_config(label)
    leaves = _selected(params, "linear")
    mib = lambda n: n / memory.MiB
    row = {"model_fp32_MiB": mib(sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))),
           "linear_fp32_MiB": mib(sum(x.size * 4 for x in leaves.values())),
           "largest_leaf_MiB": mib(max(x.size * 4 for x in leaves.values()))}
    return row | memory.peak_rss(lambda: quantize_model(params, config, "linear", float(budget)), label="quantize")


def run(configs: Sequence[str], budgets: Sequence[float], *, sentences: int = 128, max_length: int = 64,
        calib_sentences: int = 1024, parts: Sequence[str] = ("weights", "kv", "memory"),
        targets: Sequence[str] = tuple(TARGETS), layout: str | None = None, kv_configs: Sequence[str] | None = None,
        memory_configs: Sequence[str] = ("rtn",), reference: str | os.PathLike | None = None,
        on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """All measurements as row dicts (``part`` is ``weights``, ``kv`` or ``memory``); see
    :func:`qetjax.bench.report.markdown_by_part`.

    Args:
      configs: weight configurations (:func:`parse_config` strings).
      budgets: stored bits per weight (and per cached KV element).
      sentences, max_length, calib_sentences: corpus and calibration sizes.
      parts: which measurements to make.
      targets: keys of :data:`TARGETS`.
      layout: the linear kernels' layout (default :data:`LAYOUT`; the embedding table is always ``in_out``).
      kv_configs: KV-cache configurations (default: ``configs`` without GPTQ).
      memory_configs: configurations whose peak memory is measured at the largest budget.
      reference: a ``.npz`` file whose ``sentences`` open the corpus (see :func:`setup`).
      on_row: called with each weights and KV row as it is measured. Each configuration compiles
        anew; a long run can call ``jax.clear_caches()`` here to keep its memory bounded.
    """
    weights = [parse_config(c) for c in configs]
    s = setup(sentences, max_length, calib_sentences, reference)
    rows = []
    if "weights" in parts:
        rows += weight_rows(s, weights, budgets, targets, layout, on_row)
    if "kv" in parts:
        if kv_configs is not None:
            kv = [parse_config(c) for c in kv_configs]
        else:
            kv = list(dict.fromkeys(c._replace(gptq=False, mixed=False) for c in weights))
        rows += kv_rows(s, kv, budgets, on_row)
    if "memory" in parts:
        rows += [peak_memory(parse_config(c), max(budgets)) for c in memory_configs]
    return rows
