"""Choosing a method's parameters to fit a bits-per-element budget.

Each method registers its own solver (``register_budget`` in its module); this
module holds the lookup and the shared search. Sizes are measured, not
estimated: :func:`qetjax.core.stored_bits` traces the quantizer with
``jax.eval_shape`` and counts the arrays it would store.

Example:
    >>> q = for_budget("pq", (4096, 512), 2.0, subvector_dim=4)
    >>> stored_bits(q, (4096, 512)) <= 2.0 * 4096 * 512
    True
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qetjax.core import METHODS, Quantizer, stored_bits

MAX_BITS_PER_ELEMENT = 1024.0
"""The largest budget :func:`for_budget` accepts (far above any float storage: a guard against typos)."""


def _check_number(name: str, value: Any) -> float:
    """A finite real number (Python or numpy scalar, or a 0-d int/float array; not a bool) as a float."""
    dtype = getattr(value, "dtype", None)
    scalar_array = getattr(value, "shape", None) == () and dtype is not None and np.dtype(dtype).kind in "iuf"
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, (int, float)) or scalar_array):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_shape(shape: Any) -> tuple[int, int]:
    """Validates a 2-D matrix shape of positive integers and returns it as a tuple of ints.

    Raises:
      TypeError: ``shape`` is not a sequence of integers (floats such as ``3.5`` are refused,
        not truncated).
      ValueError: not 2-D, or a size below 1.

    Example:
        >>> check_shape(np.array([4096, 512]))
        (4096, 512)
    """
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
        raise TypeError(f"shape must be a sequence of two ints, got {type(shape).__name__}")
    sizes = tuple(shape)
    for s in sizes:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"shape must hold ints, got {sizes!r}")
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"shape must be 2-D with positive sizes, got {sizes}")
    return int(sizes[0]), int(sizes[1])


def _check_budget(shape: Sequence[int], bits_per_element: float) -> tuple[tuple[int, int], float]:
    shape = check_shape(shape)
    bits_per_element = _check_number("bits_per_element", bits_per_element)
    if not 0 < bits_per_element <= MAX_BITS_PER_ELEMENT:
        raise ValueError(f"bits_per_element must be in (0, {MAX_BITS_PER_ELEMENT:g}], got {bits_per_element}")
    return shape, bits_per_element


def for_budget(method: str, shape: Sequence[int], bits_per_element: float, **options: Any) -> Quantizer:
    """The best-fitting quantizer of ``method`` whose stored size fits the budget.

    Args:
      method: a registered method name (``qetjax.core.METHODS``), e.g. ``"pq"``.
      shape: the 2-D shape of the matrix to quantize.
      bits_per_element: the budget; every stored bit (codes, codebooks, scales,
        indicator maps, rotations) counts against it.
      **options: structural options of the method (e.g. ``subvector_dim``).

    Returns:
      A :class:`~qetjax.core.Quantizer` with ``stored_bits(q, shape) <=
      bits_per_element * shape[0] * shape[1]``.

    Raises:
      TypeError: a shape that is not a sequence of ints, a budget that is not a number.
      ValueError: unknown method, a shape that is not 2-D and positive, a budget that is
        not finite or not in ``(0, MAX_BITS_PER_ELEMENT]``, or no configuration fits the
        budget (the message says what the smallest one needs).
    """
    if not isinstance(method, str) or method not in METHODS or METHODS[method].budget is None:
        known = sorted(n for n, m in METHODS.items() if m.budget is not None)
        raise ValueError(f"method must be one of {known}, got {method!r}")
    shape, bits_per_element = _check_budget(shape, bits_per_element)
    return METHODS[method].budget(shape, bits_per_element, **options)


def budget_bits(shape: Sequence[int], bits_per_element: float) -> float:
    """The total bits a budget allows for a matrix of ``shape``."""
    return bits_per_element * shape[0] * shape[1]


def largest_fitting(
    make: Callable[[int], Quantizer], values: Sequence[int], shape: Sequence[int], bits_per_element: float
) -> Quantizer:
    """The quantizer ``make(v)`` of the largest ``v`` in ``values`` that fits the budget.

    ``values`` must be sorted so that the stored size grows with ``v``; the
    search is binary, so only ``O(log len(values))`` sizes are measured.

    Raises:
      ValueError: ``values`` is empty, or even ``make(values[0])`` exceeds the budget.
    """
    if len(values) == 0:
        raise ValueError("values must not be empty (no configuration to choose from)")
    limit = budget_bits(shape, bits_per_element)
    lo, hi = 0, len(values) - 1
    smallest = stored_bits(make(values[0]), shape)
    if smallest > limit:
        raise ValueError(
            f"bits_per_element={bits_per_element} is too small for shape {tuple(shape)}: "
            f"the smallest configuration needs {smallest / (shape[0] * shape[1]):.4f}"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stored_bits(make(values[mid]), shape) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return make(values[lo])


def _check_leaves(sensitivity: Mapping[str, float], sizes: Mapping[str, int]) -> int:
    """Checks the leaves' sensitivities (finite, ``>= 0``) and sizes (ints ``>= 1``); returns the total size."""
    for k, s in sensitivity.items():
        _check_number(f"sensitivity[{k!r}]", s)
    for k, n in sizes.items():
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"sizes[{k!r}] must be an int, got {type(n).__name__}")
    if any(not s >= 0 for s in sensitivity.values()) or any(int(n) < 1 for n in sizes.values()):
        raise ValueError("sensitivities must be >= 0 and sizes >= 1")
    return sum(int(n) for n in sizes.values())


def allocate(
    sensitivity: Mapping[str, float],
    sizes: Mapping[str, int],
    bits_per_element: float,
    reference_bits: float,
    min_bits: float = 2.0,
    max_bits: float = 8.0,
    step: float | None = None,
) -> dict[str, float]:
    """Per-leaf budgets of mean ``bits_per_element`` that minimise the modelled total loss.

    Each leaf's loss is modelled as ``sensitivity * 4 ** (reference_bits - b)``
    (6.02 dB per bit, the high-rate law), where ``sensitivity`` is the loss
    measured with the leaf alone quantized at ``reference_bits``. Minimising the
    sum subject to ``sum(sizes * b) = bits_per_element * sum(sizes)`` is reverse
    water-filling: ``b = c + log4(sensitivity / size)`` clipped to
    ``[min_bits, max_bits]``, with the constant ``c`` found by bisection.

    Args:
      sensitivity: loss of each leaf at ``reference_bits`` (``>= 0``), by name.
      sizes: elements of each leaf, by the same names.
      bits_per_element: the mean budget, between ``min_bits`` and ``max_bits``.
      reference_bits: the budget at which ``sensitivity`` was measured.
      min_bits, max_bits: bounds of any leaf's budget.
      step: if given, every budget is ``min_bits + k * step`` (fewer distinct configurations,
        hence fewer compilations): each is rounded down to the grid, then the bits this frees
        go back, one step at a time, to the leaves that lost the largest fraction of a step
        while the mean stays within ``bits_per_element``.

    Returns:
      Budgets by name whose size-weighted mean is at most ``bits_per_element``;
      each leaf is then quantized with ``for_budget(..., budgets[name])``, which
      stores at most that many bits, so the whole fits the mean budget.

    Example:
        >>> b = allocate({"a": 1e-3, "b": 1e-5}, {"a": 100, "b": 100}, 3.0, 3.0, min_bits=1.0)
        >>> round(b["a"], 2), round(b["b"], 2)  # 100x the loss: log4(100) = 3.32 bits more
        (4.66, 1.34)
    """
    if set(sensitivity) != set(sizes) or not sizes:
        raise ValueError("sensitivity and sizes must name the same, non-empty set of leaves")
    bits_per_element, reference_bits = (_check_number(n, v) for n, v in
                                        (("bits_per_element", bits_per_element), ("reference_bits", reference_bits)))
    min_bits, max_bits = _check_number("min_bits", min_bits), _check_number("max_bits", max_bits)
    if not min_bits <= bits_per_element <= max_bits:
        raise ValueError(f"bits_per_element={bits_per_element} must lie in [min_bits={min_bits}, max_bits={max_bits}]")
    total = _check_leaves(sensitivity, sizes)
    density = {k: math.log(max(sensitivity[k], 1e-300) / int(sizes[k]), 4) for k in sizes}  # 0 -> very low

    def budgets(c: float) -> dict[str, float]:
        return {k: min(max_bits, max(min_bits, reference_bits + c + d)) for k, d in density.items()}

    def mean(c: float) -> float:
        return sum(b * int(sizes[k]) for k, b in budgets(c).items()) / total

    lo, hi = min_bits - reference_bits - max(density.values()), max_bits - reference_bits - min(density.values())
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) <= bits_per_element else (lo, mid)
    if step is None:
        return budgets(lo)
    if not _check_number("step", step) > 0:
        raise ValueError(f"step must be > 0, got {step}")
    exact = budgets(lo)
    steps = {k: math.floor((b - min_bits) / step + 1e-9) for k, b in exact.items()}
    snapped = {k: min_bits + n * step for k, n in steps.items()}
    spare = bits_per_element * total - sum(b * int(sizes[k]) for k, b in snapped.items())
    for k in sorted(exact, key=lambda k: (snapped[k] - exact[k], k)):  # largest lost fraction first
        if snapped[k] + step <= max_bits + 1e-9 and step * int(sizes[k]) <= spare + 1e-9:
            snapped[k] += step
            spare -= step * int(sizes[k])
    return snapped


def _lower_hull(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The points ``(cost, loss, label)`` on the lower convex hull of loss against cost, cost ascending.

    Points that cost more without lowering the loss are dropped first: what is left is what a
    greedy allocation by loss decrease per bit can reach optimally.
    """
    hull: list[tuple[float, float, float]] = []
    for p in sorted(points):
        if hull and p[1] >= hull[-1][1]:
            continue  # dominated: more bits, no less loss
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_configs(
    sensitivity: Mapping[str, float],
    stored: Mapping[str, Mapping[float, float]],
    sizes: Mapping[str, int],
    bits_per_element: float,
    reference_bits: float,
) -> dict[str, float]:
    """Per-leaf budgets chosen among each leaf's own configurations, storing at most the mean budget.

    :func:`allocate` assumes any budget can be spent exactly; a solver with a coarse set of
    configurations (RTN's bits and group sizes, PQ's codebook sizes) stores less than most
    budgets, and nothing below its smallest one. Here ``stored[k]`` maps each candidate budget
    of leaf ``k`` to the bits/element its solver's configuration at that budget actually stores,
    and the loss model is :func:`allocate`'s on those stored bits: ``sensitivity[k] * 4 **
    (stored[k][reference_bits] - s)``. Every leaf starts at its cheapest configuration; the
    upgrades with the largest modelled loss decrease per stored bit (along each leaf's lower
    convex hull) are taken while the total fits; the uniform choice (every leaf at the budget
    ``bits_per_element``, where each leaf has it) is returned instead if it models a lower loss.

    Args:
      sensitivity: loss of each leaf quantized alone at ``reference_bits`` (``>= 0``).
      stored: for each leaf, ``{budget: stored bits/element}``, including ``reference_bits``.
      sizes: elements of each leaf.
      bits_per_element: the mean budget of stored bits.
      reference_bits: the budget at which ``sensitivity`` was measured.

    Returns:
      A budget (a key of ``stored[k]``) for each leaf; the size-weighted mean of the stored bits
      is at most ``bits_per_element``.

    Raises:
      ValueError: the leaves do not match, a leaf has no configuration at ``reference_bits``, or
        even the cheapest configurations exceed the mean budget.

    Example:
        >>> stored = {"a": {2.0: 1.5, 3.0: 2.5, 4.0: 3.5}, "b": {2.0: 1.5, 3.0: 2.5, 4.0: 3.5}}
        >>> allocate_configs({"a": 1.0, "b": 1e-4}, stored, {"a": 10, "b": 10}, 3.0, 3.0)  # 3.5 + 2.5 stored
        {'a': 4.0, 'b': 3.0}
    """
    if not sizes or set(sensitivity) != set(sizes) or set(stored) != set(sizes):
        raise ValueError("sensitivity, stored and sizes must name the same, non-empty set of leaves")
    bits_per_element = _check_number("bits_per_element", bits_per_element)
    reference_bits = _check_number("reference_bits", reference_bits)
    total = _check_leaves(sensitivity, sizes)
    for k in sizes:
        if reference_bits not in stored[k]:
            raise ValueError(f"stored[{k!r}] has no configuration at reference_bits={reference_bits}")
    limit = bits_per_element * total * (1 + 1e-12)

    def loss(k: str, s: float) -> float:
        return float(sensitivity[k]) * 4.0 ** (stored[k][reference_bits] - s)

    hulls = {k: _lower_hull([(s * int(sizes[k]), loss(k, s), b) for b, s in stored[k].items()]) for k in sizes}
    at = dict.fromkeys(sizes, 0)
    spent = sum(h[0][0] for h in hulls.values())
    if spent > limit:
        raise ValueError(f"bits_per_element={bits_per_element} is below the mean of the leaves' cheapest "
                         f"configurations, {spent / total:.4f}")

    def upgrade(k: str) -> tuple[float, float, str] | None:
        h, i = hulls[k], at[k]
        if i + 1 == len(h):
            return None
        cost = h[i + 1][0] - h[i][0]
        return (-(h[i][1] - h[i + 1][1]) / cost, cost, k)

    heap = [u for u in map(upgrade, sorted(sizes)) if u is not None]
    heapq.heapify(heap)
    while heap:
        _, cost, k = heapq.heappop(heap)
        if spent + cost <= limit:
            spent += cost
            at[k] += 1
            if (u := upgrade(k)) is not None:
                heapq.heappush(heap, u)
    chosen = {k: hulls[k][at[k]][2] for k in sizes}
    if all(bits_per_element in stored[k] for k in sizes):
        uniform = dict.fromkeys(sizes, bits_per_element)
        model = lambda c: sum(loss(k, stored[k][b]) for k, b in c.items())
        if (sum(stored[k][bits_per_element] * int(sizes[k]) for k in sizes) <= limit
                and model(uniform) < model(chosen)):
            return uniform
    return chosen
