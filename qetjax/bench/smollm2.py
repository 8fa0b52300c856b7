"""End-to-end benchmark of SmolLM2-135M (a real causal LLM): perplexity with quantized weights and KV caches.

Text: the frozen standard-library corpora (:func:`qetjax.bench.corpus.llm_text`), tokenized
once without BOS and cut into consecutive fixed-length windows; perplexity
(:func:`qetjax.models.llama.perplexity`) scores every token of a window but its first, from the
window's own preceding tokens. Calibration windows come from the disjoint ``"calib"`` text.

Parts (each a list of result rows, printed with :func:`qetjax.bench.report.markdown_by_part`):

* ``weights``: the 210 linear kernels (all 30 layers' q/k/v/o and gate/up/down projections,
  quantized as ``[out, in]``: rows are output channels, groups run along the inputs; the tied
  embedding is kept in float32) with each configuration's budget solver at each budget;
  ``+gptq`` compensates on calibration inputs captured with :mod:`qetjax.calibration` from the
  model's unrolled layers (all inputs from the fp32 model, captured 4 windows at a time and reduced
  to each kernel's Hessian: :func:`hessian_inputs`), ``+gptq+seq`` layer by layer on the partly
  quantized model; ``+mixed`` spreads the budget over the kernels by their Fisher-weighted
  error (:func:`mixed_budgets`). Rows: stored
  bits/weight of the quantized kernels, perplexity, its ratio to fp32, quantize seconds and the
  peak RSS above the process's before quantizing.
* ``kv``: the KV cache quantized with fp32 weights: KIVI (per-channel keys in chunks of 32
  tokens, per-token values, a window of recent tokens in fp16), KVQuant-style (the same with keys
  quantized before RoPE) and registered quantizers fitted once on calibration keys/values
  (every token encoded as written). Rows: stored bits per cached element of what grows with the
  cache (codes and side information such as scales), of the fixed full-precision ring at the
  window length, bytes per token of both at that length, the fitted codebooks (fixed), perplexity
  and ratio, attention-output error per layer (each layer alone quantized, fp32 queries).
* ``speed``: greedy generation through the jit-compiled cache loop: prefill and per-token decode
  seconds (compile time apart) with fp32 weights, with quantized weights decoded inside the loop,
  and with a quantized KV cache, side by side.

The file's linear weights lie on a Q4_1 grid (blocks of 32 along the inputs, fp16 scale and
minimum: 5 stored bits/weight), so asymmetric 4-bit RTN in groups of 32 reproduces them (to
float32 rounding with float32 side information: the ``q4_1 grid`` row); the comparison is at 2, 3
and 4 stored bits/weight, where no method can copy that grid.

Example:
    >>> s = setup(**SIZES["quick"])
    >>> rows = weight_rows(s, ["rtn", "pvq:group_size=64"], [3.0, 4.0])
    >>> print(report.markdown_by_part(rows))
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import calibration
from qetjax import kv as kvq
from qetjax.bench.config import Config, parse_config
from qetjax.bench.corpus import llm_text
from qetjax.bench.memory import MiB, RssPeak
from qetjax.budget import allocate_configs, for_budget
from qetjax.core import METHODS, QuantizedArray, check_int, dequantize, stored_bits
from qetjax.methods.scalar import rtn
from qetjax.models import llama
from qetjax.tree import dequantize_tree, path_str, quantize_tree, tree_bits

LINEAR = r"^layer_\d+/[a-z_]+_proj/kernel$"
"""The quantized leaves (paths of :func:`qetjax.models.llama.unstack_layers`): every linear kernel."""

SIZES = {
    "quick": dict(windows=8, window=256, calib_windows=8, kv_calib_windows=2, prompt=64, new_tokens=32),
    "full": dict(windows=32, window=512, calib_windows=16, kv_calib_windows=4, prompt=128, new_tokens=64),
}
"""Corpus sizes: ``windows`` x ``window`` evaluation tokens (full: 32 x 512 = 16,384 tokens), calibration
windows of the same length for GPTQ and mixed budgets, fewer for fitting KV quantizers; the generation
prompt and the tokens generated."""

KV_DEFAULTS = dict(group=32, value_group=32, window=0)
"""KIVI/KVQuant settings of the KV table: chunks of 32 tokens for the per-channel keys, 32-channel
value groups, no extra full-precision window (the incomplete chunk, up to 31 tokens, stays in fp16:
a ring of 32 tokens, counted). At a 512-token context every 32 fp16 tokens cost 1 bit/element."""


WEIGHT_CONFIGS = ("rtn", "rtn:group_size=64", "pq", "pvq:group_size=64", "pvq:group_size=64+gptq")
"""Default weight configurations of the benchmark (``qetjax.bench.config`` strings)."""

KV_SINK = 4
"""First tokens the sink-aware KVQuant-style rows keep in fp16 (:func:`baseline_schemes`)."""

KEY_CLIP_SEARCH = 16
"""Shrunk ranges per end searched for each key grid of the clip-searched row (``kvq.kivi(key_clip_search=...)``)."""

KV_CONFIGS = ("rtn:granularity=row", "lloyd_max", "nf", "rotated_rtn", "pq", "rq", "qet", "pvq:gain_scale=tensor",
              "opq", "lopq")
"""Registered methods of the KV table (besides KIVI and KVQuant-style), fitted on calibration keys/values.

Not by default (pass them explicitly): the trellis, whose Viterbi encoder (about 0.012M
weights/s on 2 CPU cores) would take about half an hour per budget for the 23.6M cached elements
of the quick evaluation, while a cache encodes every token as it is written; and LSQ, whose 180
per-head fits (30 layers, keys and values, 3 heads) had not finished after 15 minutes at 4 bits."""


class Setup(NamedTuple):
    """Model, tokenized evaluation and calibration windows, and the fp32 perplexity."""

    params: Any
    tokenizer: Any
    windows: np.ndarray
    calib: dict
    reference_ppl: float


@functools.lru_cache(maxsize=4)
def corpus_tokens(split: str) -> np.ndarray:
    """The whole frozen ``split`` text as SmolLM2 token ids (no BOS), int32."""
    _, _, tokenizer = llama.load_pretrained()
    return np.asarray(tokenizer.encode(llm_text(split), add_special_tokens=False).ids, np.int32)


def token_windows(split: str, count: int, length: int) -> np.ndarray:
    """The first ``count`` consecutive ``length``-token windows of the ``split`` text, ``[count, length]``."""
    ids = corpus_tokens(split)
    if count < 1 or length < 2 or count * length > ids.size:
        raise ValueError(f"{count} windows of {length} tokens need {count * length} tokens; the {split!r} corpus "
                         f"has {ids.size} (count >= 1, length >= 2)")
    return ids[: count * length].reshape(count, length)


def setup(windows: int = 8, window: int = 256, calib_windows: int = 8, **_: Any) -> Setup:
    """Loads SmolLM2, cuts the evaluation and calibration windows, and measures the fp32 perplexity."""
    _, params, tokenizer = llama.load_pretrained()
    evaluation = token_windows("eval", windows, window)
    ids = token_windows("calib", calib_windows, window)
    calib = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return Setup(params, tokenizer, evaluation, calib, perplexity(params, evaluation))


def perplexity(params: Any, windows: np.ndarray, kv: Any = None) -> float:
    """Perplexity over ``windows`` (one window per forward pass)."""
    return llama.perplexity(params, windows, kv=kv, batch_size=1)


# --------------------------------------------------------------------------- weights


def _kernels(flat: Any) -> dict[str, Any]:
    """The linear kernels of an unstacked tree by path (quantized ones as :class:`~qetjax.core.QuantizedArray`)."""
    leaves = jax.tree_util.tree_flatten_with_path(flat, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]
    return {path_str(p): x for p, x in leaves if re.search(LINEAR, path_str(p))}


def calibration_inputs(params: Any, calib: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs ``[tokens, in]`` of every linear kernel on the calibration windows (fp32 model)."""
    flat = llama.unstack_layers(params)
    apply = llama.CalibrationApply(llama.config_of(params))
    return calibration.dense_inputs(apply, flat, calib, select=LINEAR, mask=calib["attention_mask"])


def hessian_inputs(params: Any, calib: Mapping[str, Any], batch_windows: int = 4) -> dict[str, np.ndarray]:
    """Per linear kernel, a square ``R[in, in]`` with the Hessian of all its calibration inputs.

    The inputs ``X`` of every kernel (:func:`calibration_inputs`) are captured ``batch_windows``
    windows at a time and reduced to ``H = X^T X / tokens`` (float64 sums); ``R = sqrt(in) *
    diag(sqrt(λ)) V^T`` from ``H = V diag(λ) V^T`` then has ``R^T R / in = H``. Passed as the
    inputs of :func:`qetjax.gptq.quantize` (whose Hessian is ``x^T x / rows``) or of
    :func:`mixed_budgets` (whose error ``||x Δ^T||² / rows`` is ``tr(Δ H Δ^T)`` either way), it
    gives the same result as the raw inputs, while memory and time no longer grow with the
    calibration size (GPTQ uses far more calibration tokens than one capture holds).

    Example:
        >>> h = hessian_inputs(params, s.calib)  # h["layer_0/q_proj/kernel"].shape == (576, 576)
    """
    ids, mask = np.asarray(calib["input_ids"]), np.asarray(calib["attention_mask"])
    owner: dict[str, str] = {}  # kernels called on one input (q/k/v, gate/up) share its Hessian
    sums: dict[str, np.ndarray] = {}
    tokens: dict[str, int] = {}
    for start in range(0, len(ids), batch_windows):
        part = {"input_ids": ids[start:start + batch_windows], "attention_mask": mask[start:start + batch_windows]}
        captured = calibration_inputs(params, part)
        for p, x in captured.items():
            if p not in owner:  # the first kernel of its layer called on an equal input, else itself
                layer = p.split("/")[0]
                owner[p] = next((o for o in sums if o.split("/")[0] == layer and captured[o].shape == x.shape
                                 and np.array_equal(captured[o], x)), p)
            if owner[p] == p:
                gram = (x.T @ x).astype(np.float64)
                sums[p] = sums[p] + gram if p in sums else gram
                tokens[p] = tokens.get(p, 0) + x.shape[0]
    roots = {}
    for p, total in sums.items():
        lam, v = np.linalg.eigh(total / tokens[p])
        roots[p] = (np.sqrt(v.shape[0] * np.maximum(lam, 0.0))[:, None] * v.T).astype(np.float32)
    return {p: roots[o] for p, o in owner.items()}


def quantize_weights(params: Any, config: Config, bits_per_weight: float | Mapping[str, float], *,
                     inputs: Mapping[str, np.ndarray] | None = None, calib: Mapping[str, Any] | None = None,
                     key: jax.Array | None = None) -> Any:
    """The unstacked tree (:func:`~qetjax.models.llama.unstack_layers`) with every linear kernel quantized.

    GPTQ is one-shot (every kernel's inputs from the fp32 model: ``inputs``) or, with
    ``config.sequential``, layer by layer (:func:`qetjax.calibration.gptq_blocks` over the 30
    decoder layers on the embedded ``calib`` windows: each layer, and within it each of q/k/v, o,
    gate/up and down, calibrated on the model whose earlier kernels are already quantized).

    Args:
      params: SmolLM2 parameter tree.
      config: method, solver options, ``gptq``, ``sequential``.
      bits_per_weight: one budget for all kernels, or one per kernel path.
      inputs: the fp32 model's :func:`calibration_inputs` (or :func:`hessian_inputs`), needed for
        one-shot GPTQ.
      calib: the calibration batch (``{"input_ids": [windows, length], ...}``, whole windows),
        needed for sequential GPTQ.
      key: PRNG key (default ``jax.random.key(0)``).

    Returns:
      The quantized unstacked tree (``qetjax.dequantize_tree`` then
      :func:`~qetjax.models.llama.stack_layers` gives a model; or stack the quantized tree itself
      when every layer has the same configuration, to decode inside the layer loop).
    """
    key = jax.random.key(0) if key is None else key
    flat = llama.unstack_layers(params)
    kernels = _kernels(flat)
    budgets = bits_per_weight if isinstance(bits_per_weight, Mapping) else dict.fromkeys(kernels, bits_per_weight)
    policy = {p: for_budget(config.method, kernels[p].shape[::-1], b, **dict(config.options)) for p, b in budgets.items()}
    if not config.gptq:
        return quantize_tree(key, flat, lambda p, x: policy.get(p), layout="out_in", progress=False)
    if config.sequential:
        if calib is None:
            raise ValueError("sequential GPTQ needs the calibration windows (calib={'input_ids': ...})")
        cfg = llama.config_of(params)
        x = jnp.take(params["embed"]["embedding"], jnp.asarray(calib["input_ids"]), axis=0)
        blocks = [f"layer_{i}" for i in range(cfg.num_layers)]
        return calibration.gptq_blocks(key, flat, policy, llama.LayerApply(cfg), x, blocks)
    if inputs is None:
        raise ValueError("GPTQ needs the calibration inputs (calibration_inputs(params, calib))")
    return calibration.gptq_tree(key, flat, policy, inputs=inputs)


def fisher_diagonal(params: Any, calib: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per linear kernel, the empirical Fisher diagonal ``Σ_windows (∂ NLL / ∂W)²`` on calibration windows.

    One gradient of the window's summed next-token NLL per window (the fp32 model); arrays in
    each kernel's Flax layout ``[in, out]``. ``½ Σ F (W - Ŵ)²`` is then the second-order estimate
    of the NLL a kernel's quantization error ``W - Ŵ`` adds (the sensitivity of
    :func:`mixed_budgets`).
    """
    rest = {k: v for k, v in params.items() if k != "layers"}  # an argument, not a constant folded by XLA
    grad = jax.jit(jax.grad(lambda layers, rest, ids: jnp.sum(llama.token_nll({**rest, "layers": layers}, ids))))
    total = None
    for ids in np.asarray(calib["input_ids"]):
        g = grad(params["layers"], rest, jnp.asarray(ids[None]))
        sq = jax.tree.map(jnp.square, g)
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
    flat = llama.unstack_layers({**params, "layers": total})
    return {p: np.asarray(f) for p, f in _kernels(flat).items()}


def mixed_budgets(params: Any, config: Config, bits_per_weight: float, fisher: Mapping[str, np.ndarray],
                  spread: tuple[float, float] = (1.0, 1.0), step: float = 0.25) -> dict[str, float]:
    """Per-kernel budgets of mean ``bits_per_weight``, spread by each kernel's estimated loss increase.

    A kernel's sensitivity is ``½ Σ F (W - Ŵ)²``, the second-order estimate of the calibration
    NLL its quantization adds (``F``: :func:`fisher_diagonal`; ``Ŵ``: the kernel quantized alone at
    ``bits_per_weight`` with ``config``'s method, without GPTQ), so a kernel whose error the rest
    of the model amplifies counts more than its output error alone says. Each kernel's candidate
    budgets are a grid of ``step`` bits in ``[bits - spread[0], bits + spread[1]]`` (few distinct
    configurations to compile: with a budget per kernel, hundreds of compilations exhausted this
    machine's memory maps), each counted at the bits its solver's configuration actually stores;
    :func:`qetjax.budget.allocate_configs` picks one per kernel (6 dB per bit model) so that the
    stored mean stays within ``bits_per_weight``. Solvers with a coarse set of configurations (RTN's
    bits and group sizes) are thus neither asked for budgets below their smallest one nor left with
    bits they cannot use.
    """
    flat = llama.unstack_layers(params)
    kernels = _kernels(flat)
    qtree = quantize_weights(params, config._replace(gptq=False, sequential=False), bits_per_weight)
    done = _kernels(qtree)
    sens = {p: 0.5 * float(jnp.sum(jnp.asarray(fisher[p]) * jnp.square(dequantize(done[p]) - w)))
            for p, w in kernels.items()}
    low, high = spread
    grid = [bits_per_weight + step * j for j in range(-round(low / step), round(high / step) + 1)]
    stored_at: dict[tuple[int, int], dict[float, float]] = {}
    for shape in {w.shape[::-1] for w in kernels.values()}:  # solver shape [out, in]
        stored_at[shape] = {}
        for b in (b for b in grid if b > 0):
            try:
                q = for_budget(config.method, shape, b, **dict(config.options))
            except ValueError:  # below the solver's smallest configuration
                continue
            stored_at[shape][b] = stored_bits(q, shape) / (shape[0] * shape[1])
    return allocate_configs(sens, {p: stored_at[w.shape[::-1]] for p, w in kernels.items()},
                            {p: int(np.size(w)) for p, w in kernels.items()}, bits_per_weight, bits_per_weight)


def quantize_config(params: Any, config: Config, bits_per_weight: float, calib: Mapping[str, Any], *,
                    inputs: Mapping[str, np.ndarray] | None = None,
                    fisher: Mapping[str, np.ndarray] | None = None) -> Any:
    """The linear kernels quantized as ``config`` asks at ``bits_per_weight``: mixed budgets and GPTQ on ``calib``.

    Args:
      params: the stacked parameter tree.
      config: a parsed weight configuration (``+gptq``, ``+seq``, ``+mixed`` honoured).
      bits_per_weight: the mean budget.
      calib: calibration windows (``input_ids``, ``attention_mask``).
      inputs: :func:`hessian_inputs` on ``calib``, to reuse across configurations (computed here
        when one-shot GPTQ needs them and none are given).
      fisher: :func:`fisher_diagonal` on ``calib``, likewise for ``+mixed``.

    Returns:
      The unstacked tree of :func:`quantize_weights`.

    Example:
        >>> qtree = quantize_config(s.params, parse_config("pvq:group_size=64+gptq+seq+mixed"), 3.0, s.calib)
    """
    if config.gptq and not config.sequential and inputs is None:
        inputs = hessian_inputs(params, calib)
    budget = bits_per_weight
    if config.mixed:
        budget = mixed_budgets(params, config, bits_per_weight, fisher_diagonal(params, calib) if fisher is None else fisher)
    return quantize_weights(params, config, budget, inputs=inputs, calib=calib)


def weight_rows(s: Setup, configs: Sequence[str], budgets: Sequence[float], *,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (configuration, budget): stored bits/weight, perplexity, ratio, quantize seconds, peak RSS."""
    rows = []
    inputs = fisher = None
    for text in configs:
        config = parse_config(text)
        if config.gptq and not config.sequential and inputs is None:
            inputs = hessian_inputs(s.params, s.calib)
        if config.mixed and fisher is None:
            fisher = fisher_diagonal(s.params, s.calib)
        for budget in budgets:
            row = {"part": "weights", "config": text, "budget": budget}
            t0 = time.perf_counter()
            try:
                with RssPeak() as mem:
                    qtree = jax.block_until_ready(quantize_config(s.params, config, budget, s.calib, inputs=inputs,
                                                                  fisher=fisher))
            except ValueError as err:
                rows.append({**row, "status": f"n/a ({str(err)[:80]})"})
            else:
                seconds = time.perf_counter() - t0
                ppl = perplexity(llama.stack_layers(dequantize_tree(qtree)), s.windows)
                rows.append({**row, "status": "ok", "bpw_linear": tree_bits(qtree).quantized_bits_per_weight,
                             "ppl": ppl, "ppl_ratio": ppl / s.reference_ppl, "quantize_s": seconds,
                             "peak_MiB": mem.delta / MiB})
            if on_row is not None:  # n/a rows too: a long run stopped early keeps every row it reached
                on_row(rows[-1])
    return rows


def q4_1_grid_row(s: Setup) -> dict:
    """The sanity row: asymmetric 4-bit RTN in groups of 32 with float32 side information on the Q4_1 grid."""
    q = rtn(4, group_size=32, scale_dtype="float32")
    flat = llama.unstack_layers(s.params)
    t0 = time.perf_counter()
    qtree = quantize_tree(jax.random.key(0), flat, lambda p, x: q if re.search(LINEAR, p) else None, layout="out_in",
                          progress=False)
    seconds = time.perf_counter() - t0
    deq = dequantize_tree(qtree)
    err = max(float(jnp.max(jnp.abs(deq_k - k))) for deq_k, k in zip(_kernels(deq).values(), _kernels(flat).values()))
    ppl = perplexity(llama.stack_layers(deq), s.windows)
    return {"part": "weights", "config": "q4_1 grid: rtn 4-bit g32, fp32 scale/min", "budget": "-",
            "status": f"ok (max |w - ŵ| = {err:.1e})", "bpw_linear": tree_bits(qtree).quantized_bits_per_weight,
            "ppl": ppl, "ppl_ratio": ppl / s.reference_ppl, "quantize_s": seconds}


# --------------------------------------------------------------------------- KV cache


def attention_errors(params: Any, windows: np.ndarray, scheme: Any) -> np.ndarray:
    """Relative attention-output error per layer, ``||A(q, k̂, v̂) - A(q, k, v)|| / ||A(q, k, v)||``.

    Each layer's fp32 queries attend over its keys and values as the quantized cache holds them
    (:meth:`~qetjax.kv.QuantizedKV.attend_full`); the exact output is passed on, so layers do not
    compound. Summed over ``windows``.
    """
    return np.asarray(_attention_errors(params, jnp.asarray(windows), scheme))


@jax.jit
def _attention_errors(params: Any, windows: jax.Array, scheme: Any) -> jax.Array:
    config = llama.config_of(params)
    s = windows.shape[1]
    positions = jnp.broadcast_to(jnp.arange(s), windows.shape)
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool))[None], (windows.shape[0], s, s))
    rope = functools.partial(llama.apply_rope, theta=config.rope_theta)

    def attend(data: Any, q: jax.Array, k: jax.Array, v: jax.Array, k_pre: jax.Array) -> tuple[jax.Array, Any]:
        exact = llama.grouped_attention(q, k, v, visible)
        approx = scheme.attend_full(data, q, k, v, k_pre, visible, rope)
        return exact, (jnp.sum(jnp.square(approx - exact)), jnp.sum(jnp.square(exact)))

    x = jnp.take(params["embed"]["embedding"], windows, axis=0)
    _, (num, den) = llama.run_layers(params, x, positions, attend, scheme.layer_data)
    return jnp.sqrt(num / den)


def kv_schemes(s: Setup, configs: Sequence[str], budget: float, kv_calib_windows: int = 2) -> list[tuple[str, Any]]:
    """``(label, scheme)`` for each KV configuration at ``budget`` bits/element.

    ``kivi`` and ``kvquant`` use ``budget - 1`` code bits (their side information adds about one
    bit per element with chunks and value groups of 32); a registered method's budget solver is
    run on a tall ``[65536, head_dim]`` matrix (its codebooks are a fixed cost, counted apart). The
    trellis's fractional rate (its first ``low_rows`` rows one bit lower, paying for its scale and
    seed) means nothing to a cache that encodes each token as it is written: it runs at its
    whole rate, ``low_rows=0``, its scale and seed fixed parameters counted apart like codebooks.
    """
    config = llama.config_of(s.params)
    calib = s.calib["input_ids"][:kv_calib_windows]
    out = []
    for text in configs:
        c = parse_config(text)
        options = dict(c.options)
        pre_rope = bool(options.pop("pre_rope", False))
        q = for_budget(c.method, (65536, config.head_dim), budget, **options)
        if dict(q.spec.args).get("low_rows"):
            q = METHODS[q.spec.name].constructor(**{**dict(q.spec.args), "low_rows": 0})
        scheme = kvq.fit_scheme(jax.random.key(0), q, s.params, calib, pre_rope=pre_rope)
        out.append((text + (" (pre-RoPE keys)" if pre_rope else ""), scheme))
    return out


def baseline_schemes(config: Any, budget: float) -> list[tuple[str, Any]]:
    """KIVI and KVQuant-style schemes whose codes and side information store ``budget`` bits/element.

    KIVI and KVQuant-style (pre-RoPE keys) with ``budget - 1`` code bits (fp16 scale and minimum
    per channel per 32 tokens for keys and per 32 channels per token for values: 1 bit/element;
    :data:`KV_DEFAULTS`); KVQuant-style with the first :data:`KV_SINK` tokens in fp16 (the
    attention sink; a fixed cost, counted with the window); and KVQuant-style with the bits moved
    to the keys: ``budget`` code bits per key in chunks of 64 tokens, ``budget - 1`` per value in
    groups of 64 channels (0.5 bit/element of side information each), with the sink. That one
    holds up to 64 recent tokens in fp16 instead of 32 (its window bits say so); the last keeps
    chunks of 32 tokens (the 32-token ring) and pays for the key bit with symmetric keys, an fp16
    scale per channel per chunk and no minimum (0.5 bit/element). From 2 code bits, the sink row
    once more with each key channel's grid per chunk searched for least squared error
    (:data:`KEY_CLIP_SEARCH` shrunk ranges per end; same stored bits).
    """
    bits = int(round(budget)) - 1
    if bits < 1:
        return []
    g = KV_DEFAULTS
    label = f"g{g['group']} w{g['window']}"
    return [(f"kivi {bits}-bit {label}", kvq.kivi(config, bits, **g)),
            (f"kvquant-style {bits}-bit (pre-RoPE keys) {label}", kvq.kvquant(config, bits, **g)),
            (f"kvquant-style {bits}-bit {label} sink {KV_SINK}", kvq.kvquant(config, bits, **g, sink=KV_SINK)),
            (f"kvquant-style keys {bits + 1}-bit g64 / values {bits}-bit vg64 w0 sink {KV_SINK}",
             kvq.kvquant(config, bits + 1, value_bits=bits, group=64, value_group=64, window=0, sink=KV_SINK)),
            (f"kvquant-style keys {bits + 1}-bit symmetric g32 / values {bits}-bit vg64 w0 sink {KV_SINK}",
             kvq.kvquant(config, bits + 1, value_bits=bits, value_group=64, window=0, sink=KV_SINK, key_symmetric=True))
            ] + ([(f"kvquant-style {bits}-bit {label} sink {KV_SINK}, keys clip-searched ({KEY_CLIP_SEARCH})",
                   kvq.kvquant(config, bits, **g, sink=KV_SINK, key_clip_search=KEY_CLIP_SEARCH))] if bits >= 2 else [])


def kv_rows(s: Setup, configs: Sequence[str], budgets: Sequence[float], *, kv_calib_windows: int = 2,
            on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (KV configuration, budget) with fp32 weights; see the module docstring."""
    config = llama.config_of(s.params)
    length = s.windows.shape[1]
    elements = 2 * config.num_layers * config.num_kv_heads * length * config.head_dim
    rows = []
    for budget in budgets:
        schemes = baseline_schemes(config, budget)
        for text in configs:
            try:
                schemes += kv_schemes(s, [text], budget, kv_calib_windows)
            except ValueError as err:
                rows.append({"part": "kv", "config": text, "budget": budget, "status": f"n/a ({str(err)[:80]})"})
                if on_row is not None:
                    on_row(rows[-1])
        for label, scheme in schemes:
            counted = kvq.cache_bits(scheme, config, 1, length)
            try:  # a fitted method may refuse rows it was not fitted on (e.g. PVQ's per-row gain scales)
                ppl = perplexity(s.params, s.windows, kv=scheme)
            except ValueError as err:
                rows.append({"part": "kv", "config": label, "budget": budget, "status": f"n/a ({str(err)[:80]})"})
            else:
                errors = attention_errors(s.params, s.windows[:2], scheme)
                rows.append({"part": "kv", "config": label, "budget": budget, "status": "ok",
                             "code_bits_per_element": counted["codes"] / elements,
                             "window_bits_per_element": counted["window"] / elements,
                             "cache_bytes_per_token": (counted["codes"] + counted["window"]) / 8 / length,
                             "params_KiB": counted["params"] / 8 / 1024, "ppl": ppl,
                             "ppl_ratio": ppl / s.reference_ppl, "attn_err_mean": float(errors.mean()),
                             "attn_err_per_layer": " ".join(f"{e:.3f}" for e in errors)})
            if on_row is not None:  # n/a rows too, as in weight_rows
                on_row(rows[-1])
    return rows


# --------------------------------------------------------------------------- generation speed


@functools.partial(jax.jit, static_argnames="max_len")
def _prefill(params: Any, ids: jax.Array, kv: Any, max_len: int) -> tuple[jax.Array, Any]:
    return llama.prefill_tokens(params, ids, jnp.ones_like(ids), max_len, kv)


@functools.partial(jax.jit, static_argnames="new_tokens")
def _decode(params: Any, first: jax.Array, cache: Any, kv: Any, new_tokens: int) -> jax.Array:
    return llama.decode_tokens(params, first, cache, new_tokens, kv)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()`` twice: (result, first call seconds (compile + run), second call seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, first, time.perf_counter() - t0


def speed_rows(s: Setup, prompt: int = 64, new_tokens: int = 32, weights: str = "rtn:bits=4:group_size=32",
               kv_bits: int = 4, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Greedy generation speed: fp32, quantized weights decoded inside the loop, a quantized KV cache.

    The quantized weights are one configuration for every layer (``weights``, at its own bits),
    stacked so that each layer's kernels are decoded inside the ``lax.scan`` at every step.
    """
    config = llama.config_of(s.params)
    ids = jnp.asarray(token_windows("eval", 1, prompt))
    max_len = prompt + new_tokens
    q = _fixed_quantizer(weights)
    flat = llama.unstack_layers(s.params)
    qtree = quantize_tree(jax.random.key(0), flat, lambda p, x: q if re.search(LINEAR, p) else None, layout="out_in",
                          progress=False)
    cases = [("fp32 weights, fp32 cache", s.params, None),
             (f"{weights} weights (decoded in the loop), fp32 cache", llama.stack_layers(qtree), None),
             (f"fp32 weights, kivi {kv_bits}-bit cache", s.params, kvq.kivi(config, kv_bits, **KV_DEFAULTS))]
    rows = []
    reference = None
    for label, params, scheme in cases:
        (first, cache), pre_first, pre_s = _timed(lambda p=params, k=scheme: _prefill(p, ids, k, max_len))
        out, dec_first, dec_s = _timed(lambda p=params, k=scheme, f=first, c=cache: _decode(p, f, c, k, new_tokens))
        out = np.asarray(out)
        reference = out if reference is None else reference
        rows.append({"part": "speed", "config": label, "prompt_tokens": prompt, "new_tokens": new_tokens,
                     "prefill_compile_s": pre_first - pre_s, "prefill_s": pre_s, "prefill_tok_per_s": prompt / pre_s,
                     "decode_compile_s": dec_first - dec_s, "decode_s_per_token": dec_s / (new_tokens - 1),
                     "decode_tok_per_s": (new_tokens - 1) / dec_s,
                     "same_tokens_as_fp32": f"{int(np.sum(out == reference))}/{out.size}"})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _fixed_quantizer(text: str) -> Any:
    """A quantizer from a constructor config ``method:option=value...`` (not a budget)."""
    c = parse_config(text)
    return METHODS[c.method].constructor(**dict(c.options))


def run(configs: Sequence[str], budgets: Sequence[float], *, parts: Sequence[str] = ("reference", "weights", "kv", "speed"),
        kv_configs: Sequence[str] = KV_CONFIGS, windows: int = 8, window: int = 256, calib_windows: int = 8,
        kv_calib_windows: int = 2, prompt: int = 64, new_tokens: int = 32,
        on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """The benchmark: the fp32 reference row, then the requested parts' rows (see the module docstring)."""
    s = setup(windows, window, calib_windows)
    rows = [{"part": "reference", "config": "fp32", "windows": f"{windows} x {window} tokens",
             "scored_tokens": windows * (window - 1), "ppl": s.reference_ppl}]
    if on_row is not None:
        on_row(rows[-1])
    if "weights" in parts:
        rows.append(q4_1_grid_row(s))
        if on_row is not None:
            on_row(rows[-1])
        rows += weight_rows(s, configs, budgets, on_row=on_row)
    if "kv" in parts:
        rows += kv_rows(s, kv_configs, budgets, kv_calib_windows=kv_calib_windows, on_row=on_row)
    if "speed" in parts:
        rows += speed_rows(s, prompt, new_tokens, on_row=on_row)
    return rows


def report_rows(quick: bool, bits: Sequence[float], methods: Sequence[str] = WEIGHT_CONFIGS,
                kv_methods: Sequence[str] = KV_CONFIGS, parts: Sequence[str] = ("weights", "kv", "speed"),
                progress: bool = True, on_row: Callable[[dict], None] | None = None,
                calib_windows: int | None = None, kv_calib_windows: int | None = None) -> list[dict]:
    """:func:`run` at the ``--quick`` or full :data:`SIZES` with a tqdm progress bar (the command-line runs).

    ``calib_windows`` overrides the size's number of calibration windows (GPTQ, mixed budgets),
    ``kv_calib_windows`` the number the KV methods are fitted on (at most the calibration windows
    loaded: more are loaded if needed).

    ``on_row(row)`` is called after each row (e.g. to print or log it, or to drop compiled code
    with ``jax.clear_caches()``: each configuration compiles anew, so a long run's memory grows).
    """
    from tqdm import tqdm

    baselines = sum(len(baseline_schemes(llama.LlamaConfig(), b)) for b in bits)  # rows per budget, no model needed
    total = 1 + ("weights" in parts) * (1 + len(methods) * len(bits)) + ("kv" in parts) * (
        baselines + len(kv_methods) * len(bits)) + ("speed" in parts) * 3
    with tqdm(total=total, disable=not progress, desc="smollm2", file=sys.stderr) as bar:
        def step(row: dict) -> None:
            bar.update(1)
            if on_row is not None:
                on_row(row)

        size = dict(SIZES["quick" if quick else "full"])
        if calib_windows is not None:
            size["calib_windows"] = calib_windows
        if kv_calib_windows is not None:
            size["kv_calib_windows"] = check_int("kv_calib_windows", kv_calib_windows, 1)
            size["calib_windows"] = max(size["calib_windows"], kv_calib_windows)
        return run(methods, bits, parts=["reference", *parts], kv_configs=kv_methods, on_row=step, **size)


__all__ = ["SIZES", "Setup", "attention_errors", "calibration_inputs", "corpus_tokens", "fisher_diagonal",
           "hessian_inputs", "kv_rows", "mixed_budgets", "perplexity", "quantize_weights", "report_rows", "run",
           "setup", "speed_rows", "token_windows", "weight_rows"]
