"""Trellis-coded quantization on a bitshift trellis (the QTIP class of quantizers).

Each row of ``x[n, d]`` is cut into sequences of ``T = sequence_length``
consecutive weights (``T`` must divide ``d``). A sequence is stored as a
circular stream of ``T`` chunks of ``k = bits`` bits, ``c_0 .. c_{T-1}``. The
trellis state at step ``t`` is the window of the last ``L = state_bits`` stream
bits ending with chunk ``t``::

    s_t = (c_t | c_{t-1} << k | c_{t-2} << 2k | ...) mod 2**L     (indices mod T)

so consecutive states overlap in ``L - k`` bits (``s_t = (s_{t-1} << k | c_t)
mod 2**L``: the *bitshift trellis*), and weight ``t`` decodes to
``scale * codeword[s_t]``: a cheap function of the window, a few shifts and one
table read per weight. Encoding picks the stream minimising the squared error
by the Viterbi algorithm: a ``lax.scan`` over the ``T`` steps carrying the
``2**L`` path costs, with ``2**(L-k)`` backpointers of ``k`` bits per step,
``vmap``-ped over sequences and run in chunks of sequences (``lax.map``) so
that peak memory stays near ``_VITERBI_BYTES``.

Tail-biting: the stream is circular (the first window wraps around to the last
chunks), so no start state is stored and a sequence costs exactly ``k * T``
bits. The encoder makes the path consistent the way QTIP does: a first Viterbi
pass on the sequence rotated by ``T // 2`` (the wrap point then lies inside the
sequence) gives the ``L - k`` bits the path has there; a second pass on the
sequence itself starts from and ends in states that carry those bits. The second
pass is optimal among all circular streams with that overlap
(:func:`viterbi` with ``overlap``); the tail-biting optimum over all overlaps is
not searched (``2**(L-k)`` passes).

Codewords are computed from the state, not stored: ``codeword[s] =
Phi^{-1}((h(s) + 1/2) / 2**L)`` with ``h`` a fixed bijective integer hash of
the ``L`` state bits (multiply-xorshift), i.e. the ``2**L`` Gaussian quantiles
dealt pseudo-randomly to the states (:func:`codebook`); so the code is a
random-looking Gaussian code, as the bitshift trellis needs, at zero stored
bits. The table is a constant of the compiled encoder and decoder, computed once per
``L`` on the host.

Fractional rates: the first ``low_rows`` rows are coded at ``k - 1`` bits, the
rest at ``k``; the budget solver uses this to fit scales and seed into an
integer budget (at 2.0 bits per weight on 4096 rows, one row of 512 weights at 1
bit pays for the 96 bits of side information with ``scale="tensor"``).

Stored (counted by :func:`qetjax.bits`):

- ``codes``: ``k (n - low_rows) d`` bits, packed row-major into ``uint32``;
- ``codes_low``: ``(k - 1) low_rows d`` bits (absent when ``low_rows = 0``);
- ``scale``: the float32 RMS of the (rotated) matrix;
- ``scales`` (``scale="row"``): each row's RMS divided by ``scale``, float16
  (the ratio is at most ``sqrt(n)``, so it never overflows float16);
- ``seed``: 64 bits of the randomized Hadamard rotation (``rotate=True``), in
  blocks of ``hadamard_block(T)`` inside every sequence, so the encoding of a
  sequence depends only on its own columns (``column_group = T``: GPTQ's
  granularity, :mod:`qetjax.gptq`).

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (64, 256))
    >>> q = qetjax.trellis(2, state_bits=8, sequence_length=128)
    >>> qa = qetjax.quantize(q, jax.random.key(1), x)
    >>> qetjax.bits(qa)["codes"] == 2 * 64 * 256
    True
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import packing
from qetjax.budget import budget_bits
from qetjax.combinators import transformed
from qetjax.core import (
    Quantizer,
    check_int,
    check_storage_dtype,
    pytree_dataclass,
    register_budget,
    register_method,
    static_field,
    stored_bits,
)
from qetjax.rotations import hadamard_block, hadamard_transform

SCALES = ("row", "tensor")
MAX_BITS = 8
MAX_STATE_BITS = 20
MIN_TAIL_BITS = 13  # the budget solver's default state_bits keeps L - k >= 13 (2**13 predecessor windows)
SEQUENCE_LENGTHS = (256, 128, 64, 32, 16)  # tried by the budget solver, the longest dividing the width first
_VITERBI_BYTES = 1 << 24  # about the memory of one chunk of sequences in the Viterbi passes


# --------------------------------------------------------------------------- the code


_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA6B)  # odd: multiplication mod 2**L is invertible


def _hash(s: np.ndarray, state_bits: int) -> np.ndarray:
    """A fixed bijection of ``[0, 2**state_bits)``: xorshifts and odd multiplications mod ``2**L``."""
    mask = (1 << state_bits) - 1
    shift = max(1, state_bits // 2)
    s = np.asarray(s, np.uint64) & mask
    for mult in _HASH_MULTIPLIERS:
        s = (s ^ (s >> shift)) & mask
        s = (s * mult) & mask  # exact: both factors are below 2**32
    return (s ^ (s >> shift)) & mask


@functools.lru_cache(maxsize=None)
def _codebook(state_bits: int) -> np.ndarray:
    quantile = np.vectorize(statistics.NormalDist().inv_cdf, otypes=[np.float64])
    size = 1 << state_bits
    values = quantile((np.arange(size, dtype=np.float64) + 0.5) / size)  # ascending quantiles
    table = values[_hash(np.arange(size), state_bits)].astype(np.float32)
    table.setflags(write=False)
    return table


def codebook(state_bits: int) -> jax.Array:
    """The computed codewords of all ``2**state_bits`` states: unit-variance Gaussian quantiles.

    ``codebook(L)[s] = Phi^{-1}((h(s) + 1/2) / 2**L)`` with ``h`` a fixed bijection
    (computed in float64, rounded to float32), so the values are exactly the ``2**L``
    midpoint quantiles of the standard normal, dealt to the states in a pseudo-random order.
    Nothing is stored: the table is a constant of the compiled encoder and decoder (built
    once per ``L`` on the host).

    Example:
        >>> c = codebook(8)
        >>> c.shape, round(float(jnp.sort(c)[128]), 4)  # the quantile at (128 + 1/2) / 256
        ((256,), 0.0049)
    """
    state_bits = check_int("state_bits", state_bits, 2, MAX_STATE_BITS)
    return jnp.asarray(_codebook(state_bits))


# --------------------------------------------------------------------------- Viterbi


def _lowest_min(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Minimum over the leading axis of ``c[m, ...]`` and its lowest index (uint8), by ``m`` selects."""
    best, index = c[0], jnp.zeros(c.shape[1:], jnp.uint8)
    for p in range(1, c.shape[0]):
        better = c[p] < best
        best = jnp.where(better, c[p], best)
        index = jnp.where(better, jnp.uint8(p), index)
    return best, index


def viterbi(x: jax.Array, table: jax.Array, bits: int, overlap: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The minimum squared-error path of one sequence through the bitshift trellis.

    States are ``L``-bit integers (``2**L = len(table)``); the step into state
    ``s`` appends the chunk ``s mod 2**k`` (``k = bits``) to the previous state
    shifted by ``k``, and costs ``(x_t - table[s])**2``.

    Args:
      x: ``float32[T]``, the sequence.
      table: ``float32[2**L]``, the codeword of every state (``L > k``).
      bits: ``k``, bits per step.
      overlap: ``None`` for a free start and end (every state before step 0
        allowed); else an integer in ``[0, 2**(L-k))``: the state before step 0
        and the last state must both end with these ``L - k`` bits, i.e. the
        chunks form a circular stream whose last ``L - k`` bits are ``overlap``.

    Returns:
      ``(states, cost)``: ``int32[T]`` states of an optimal path (ties to the
      lowest predecessor) and its total squared error.

    Example:
        >>> states, cost = viterbi(x, codebook(8), 2)
        >>> chunks = states & 3
    """
    size = table.shape[0]
    state_bits = size.bit_length() - 1
    if size != 1 << state_bits or state_bits <= bits:
        raise ValueError(f"table must have 2**L entries with L > bits={bits}, got {size}")
    branches, tails = 1 << bits, size >> bits
    tail_mask = tails - 1
    states = jnp.arange(size, dtype=jnp.int32)
    if overlap is None:
        start = jnp.zeros(size, jnp.float32)
    else:
        start = jnp.where((states & tail_mask) == overlap, 0.0, jnp.inf).astype(jnp.float32)

    def step(cost: jax.Array, xt: jax.Array) -> tuple[jax.Array, jax.Array]:
        # predecessor of s is (p << (L-k)) | (s >> k): cost viewed as [p, r], minimised over p
        best, back = _lowest_min(cost.reshape(branches, tails))
        new = best[:, None] + jnp.square(xt - table).reshape(tails, branches)
        return new.reshape(size), back

    cost, backs = jax.lax.scan(step, start, x)
    if overlap is not None:
        cost = jnp.where((states & tail_mask) == overlap, cost, jnp.inf)
    last = jnp.argmin(cost).astype(jnp.int32)

    def back_step(s: jax.Array, back: jax.Array) -> tuple[jax.Array, jax.Array]:
        r = s >> bits
        return (back[r].astype(jnp.int32) << (state_bits - bits)) | r, s

    _, path = jax.lax.scan(back_step, last, backs, reverse=True)
    return path, cost[last]


def tail_biting_chunks(x: jax.Array, table: jax.Array, bits: int) -> jax.Array:
    """The ``k``-bit chunks of a tail-biting path of every sequence ``x[B, T]`` (two Viterbi passes).

    Sequences are processed in chunks (``lax.map``) sized so the backpointers of
    one chunk take about ``_VITERBI_BYTES``.

    Returns:
      ``uint32[B, T]`` chunks; :func:`states` of them is the path found.
    """
    count, length = x.shape
    size = table.shape[0]
    tail_mask = (size >> bits) - 1
    half = length // 2

    def one(xs: jax.Array) -> jax.Array:
        rotated, _ = viterbi(jnp.roll(xs, -half), table, bits)
        overlap = rotated[length - 1 - half] & tail_mask  # the state at the original end
        path, _ = viterbi(xs, table, bits, overlap)
        return (path & ((1 << bits) - 1)).astype(jnp.uint32)

    per_sequence = length * (size >> bits) + 16 * size  # uint8 backpointers and a few float32 cost vectors
    batch = max(1, min(count, _VITERBI_BYTES // per_sequence))
    return jax.lax.map(one, x, batch_size=batch)


def states(chunks: jax.Array, bits: int, state_bits: int) -> jax.Array:
    """The trellis states of circular chunk streams ``chunks[..., T]`` (the window of the last ``L`` bits)."""
    window = -(-state_bits // bits)
    s = jnp.zeros(chunks.shape, jnp.uint32)
    for j in range(window):
        s = s | (jnp.roll(chunks.astype(jnp.uint32), j, axis=-1) << jnp.uint32(j * bits))
    return (s & jnp.uint32((1 << state_bits) - 1)).astype(jnp.int32)


# --------------------------------------------------------------------------- the quantizer


@pytree_dataclass
class TrellisParams:
    """Fitted state: the float32 RMS of the matrix and, per row, float16 RMS ratios (``None`` per tensor)."""

    scale: jax.Array
    scales: jax.Array | None


@pytree_dataclass
class TrellisCodes:
    """Packed chunk streams: rows ``low_rows..n`` at ``k`` bits, the first ``low_rows`` at ``k - 1``."""

    codes: jax.Array
    codes_low: jax.Array | None
    shape: tuple[int, int] = static_field()


def _check_width(d: int, sequence_length: int) -> None:
    if d % sequence_length:
        raise ValueError(
            f"the width {d} of x must be a multiple of sequence_length={sequence_length} "
            "(sequences run along rows; choose a divisor)"
        )


def _rms(x: jax.Array, axis: int | None = None) -> jax.Array:
    """Root mean square, scaled by the absolute maximum first so that squares of large values cannot overflow."""
    top = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    safe = jnp.where(top > 0, top, 1.0)
    rms = safe * jnp.sqrt(jnp.mean(jnp.square(x / safe), axis=axis, keepdims=True))
    return jnp.squeeze(jnp.where(top > 0, rms, 0.0), axis)


def _row_scales(params: TrellisParams, n: int) -> jax.Array:
    s = params.scale.astype(jnp.float32)
    if params.scales is None:
        return jnp.full((n,), s)
    if params.scales.shape[0] != n:
        raise ValueError(
            f"x has {n} rows but the params were fitted on {params.scales.shape[0]}; "
            'use scale="tensor" to encode other rows'
        )
    return params.scales.astype(jnp.float32) * s


def _trellis(bits: int, state_bits: int, sequence_length: int, low_rows: int, scale: str, scale_dtype: str) -> Quantizer:
    def fit(key: jax.Array, x: jax.Array) -> TrellisParams:
        del key
        n, d = x.shape
        _check_width(d, sequence_length)
        if low_rows > n:
            raise ValueError(f"low_rows={low_rows} must be at most the {n} rows of x")
        rms = _rms(x)
        if scale == "tensor":
            return TrellisParams(rms, None)
        rows = _rms(x, axis=1)
        return TrellisParams(rms, jnp.where(rms > 0, rows / jnp.where(rms > 0, rms, 1.0), 0.0).astype(scale_dtype))

    def code(x: jax.Array, s: jax.Array, k: int) -> jax.Array:
        unit = jnp.where(s[:, None] > 0, x / jnp.where(s[:, None] > 0, s[:, None], 1.0), 0.0)
        chunks = tail_biting_chunks(unit.reshape(-1, sequence_length), codebook(state_bits), k)
        return packing.pack(chunks.reshape(-1), k)

    def encode(params: TrellisParams, x: jax.Array) -> TrellisCodes:
        n, d = x.shape
        _check_width(d, sequence_length)
        if low_rows > n:
            raise ValueError(f"low_rows={low_rows} must be at most the {n} rows of x")
        s = _row_scales(params, n)
        low = code(x[:low_rows], s[:low_rows], bits - 1) if low_rows else None
        return TrellisCodes(code(x[low_rows:], s[low_rows:], bits), low, (n, d))

    def values(words: jax.Array, rows: int, d: int, k: int) -> jax.Array:
        chunks = packing.unpack(words, k, rows * d).reshape(-1, sequence_length)
        return (codebook(state_bits)[states(chunks, k, state_bits)]).reshape(rows, d)

    def decode(params: TrellisParams, c: TrellisCodes) -> jax.Array:
        n, d = c.shape
        s = _row_scales(params, n)
        y = values(c.codes, n - low_rows, d, bits)
        if low_rows:
            y = jnp.concatenate([values(c.codes_low, low_rows, d, bits - 1), y])
        return y * s[:, None]

    return Quantizer(fit, encode, decode)


@register_method("trellis")
def trellis(
    bits: int,
    state_bits: int = 16,
    sequence_length: int = 256,
    low_rows: int = 0,
    rotate: bool = True,
    scale: str = "row",
    scale_dtype: str = "float16",
) -> Quantizer:
    """Trellis-coded quantization: ``bits`` per weight on a bitshift trellis of ``2**state_bits`` states.

    Args:
      bits: ``k``, bits per weight, 1..8.
      state_bits: ``L``, trellis state bits, ``bits < L <= 20`` (encoding costs
        ``O(2**L)`` per weight; QTIP uses 16).
      sequence_length: ``T``, weights per tail-biting sequence along a row; must
        divide the width, and ``T * bits >= L``.
      low_rows: the first ``low_rows`` rows are coded at ``bits - 1`` bits
        (fractional rates; needs ``bits >= 2``).
      rotate: a randomized Hadamard rotation inside each sequence in front (64
        stored bits).
      scale: ``"row"`` (a float16 RMS ratio per row) or ``"tensor"``.
      scale_dtype: stored dtype of the per-row ratios.

    Returns:
      A :class:`~qetjax.core.Quantizer` with ``column_group = sequence_length``.
      Stored bits: ``bits * n * d - low_rows * d`` (rounded up to words) plus
      32 (tensor scale), ``16 n`` (row scales) and 64 (seed).

    Example:
        >>> q = trellis(2, state_bits=16, sequence_length=256)
    """
    bits = check_int("bits", bits, 1, MAX_BITS)
    state_bits = check_int("state_bits", state_bits, bits + 1, MAX_STATE_BITS)
    sequence_length = check_int("sequence_length", sequence_length, 2)
    if sequence_length * bits < state_bits:
        raise ValueError(
            f"sequence_length={sequence_length} is too short for state_bits={state_bits} at bits={bits}: "
            f"a sequence must hold at least one state window (sequence_length * bits >= state_bits)"
        )
    low_rows = check_int("low_rows", low_rows, 0)
    if low_rows and (bits < 2 or sequence_length * (bits - 1) < state_bits):
        raise ValueError(f"low_rows={low_rows} needs bits >= 2 and sequence_length * (bits - 1) >= state_bits")
    if not isinstance(rotate, bool):
        raise TypeError(f"rotate must be a bool, got {type(rotate).__name__}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    scale_dtype = check_storage_dtype("scale_dtype", scale_dtype)
    inner = _trellis(bits, state_bits, sequence_length, low_rows, scale, scale_dtype)
    if not rotate:
        return inner._replace(column_group=sequence_length)
    q = transformed(hadamard_transform(hadamard_block(sequence_length)), inner)

    def fit(key: jax.Array, x: jax.Array) -> object:
        _check_width(x.shape[1], sequence_length)  # before the rotation, which needs whole sequences
        return q.fit(key, x)

    def encode(params: object, x: jax.Array) -> object:
        _check_width(x.shape[1], sequence_length)
        return q.encode(params, x)

    # rotation blocks and Viterbi stay inside each sequence: GPTQ may encode one sequence of columns at a time
    return Quantizer(fit, encode, q.decode, column_group=sequence_length)


# --------------------------------------------------------------------------- budget


def stored_size(shape: tuple[int, int], bits: int, low_rows: int, rotate: bool, scale: str) -> int:
    """Stored bits of ``trellis(bits, ..., low_rows, rotate, scale)`` on ``shape`` (tested equal to ``qetjax.bits``)."""
    n, d = shape
    words = lambda count: -(-count // 32) * 32
    codes = words(bits * (n - low_rows) * d) + (words((bits - 1) * low_rows * d) if low_rows else 0)
    return codes + 32 + (16 * n if scale == "row" else 0) + 64 * rotate


def default_state_bits(bits: int) -> int:
    """The budget solver's state bits at ``bits`` per weight: ``max(16, bits + 13)``, at most 20.

    A step of the bitshift trellis chooses among ``2**(L - k)`` predecessor windows; QTIP's
    ``L = 16`` keeps ``2**14`` / ``2**13`` of them at ``k = 2 / 3``, only ``2**12`` at ``k = 4``,
    where it stays 0.6 dB from the Shannon bound. Holding ``L - k >= 13`` (:data:`MIN_TAIL_BITS`)
    gives ``L = 16`` for ``k <= 3`` and ``L = k + 13`` above (17 at 4 bits: +0.09 dB on iid
    Gaussian data, at twice the encode time, which scales as ``2**L``).

    Example:
        >>> [default_state_bits(k) for k in (1, 2, 3, 4, 5)]
        [16, 16, 16, 17, 18]
    """
    return min(MAX_STATE_BITS, max(16, bits + MIN_TAIL_BITS))


def sequence_length_for(width: int, bits: int, state_bits: int) -> int:
    """The longest of :data:`SEQUENCE_LENGTHS` dividing ``width`` whose sequences hold a state window at ``bits - 1``."""
    for t in SEQUENCE_LENGTHS:
        if width % t == 0 and t * max(1, bits - 1) >= state_bits:
            return t
    raise ValueError(
        f"no sequence length in {SEQUENCE_LENGTHS} divides the width {width}; pass sequence_length="
    )


@register_budget("trellis")
def trellis_for_budget(
    shape: tuple[int, int],
    bits_per_element: float,
    state_bits: int | None = None,
    sequence_length: int | None = None,
    rotate: bool = True,
    scale: str = "row",
    scale_dtype: str = "float16",
) -> Quantizer:
    """The trellis quantizer of the highest rate that fits the budget.

    The rate is ``bits`` per weight on all rows but the first ``low_rows``, which
    get ``bits - 1``: the largest ``bits`` (1..8) for which some ``low_rows <
    n`` fits, with the fewest ``low_rows`` (binary search on the exact size).
    ``state_bits`` defaults to :func:`default_state_bits` of that ``bits`` (16 up to 3
    bits, 17 at 4: twice the encode time there), ``sequence_length`` to the longest of
    :data:`SEQUENCE_LENGTHS` dividing the width.

    Raises:
      ValueError: even 1 bit per weight does not fit, or no sequence length fits the width.

    Example:
        >>> q = qetjax.for_budget("trellis", (4096, 512), 2.0, scale="tensor")  # 1 row at 1 bit
    """
    n, d = shape
    limit = budget_bits(shape, bits_per_element)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    for k in range(MAX_BITS, 0, -1):
        state_k = default_state_bits(k) if state_bits is None else state_bits
        if k >= state_k:
            continue
        t = sequence_length if sequence_length is not None else sequence_length_for(d, k, state_k)
        size = lambda low: stored_size(shape, k, low, rotate, scale)
        if size(0) <= limit:
            low = 0
        elif k >= 2 and t * (k - 1) >= state_k and size(n - 1) <= limit:
            lo, hi = 1, n - 1  # smallest low_rows that fits
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if size(mid) <= limit else (mid + 1, hi)
            low = lo
        else:
            continue
        q = trellis(k, state_k, t, low, rotate, scale, scale_dtype)
        assert stored_bits(q, shape) == size(low) <= limit
        return q
    need = stored_size(shape, 1, 0, rotate, scale) / (n * d)
    raise ValueError(
        f"bits_per_element={bits_per_element} is too small for trellis on shape {tuple(shape)}: "
        f"1 bit per weight needs {need:.4f}"
    )
