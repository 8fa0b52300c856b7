"""Rate-distortion curves: operating points, lower convex hulls, best at a budget, reference lines.

A single exact-budget table can mislead: a method whose side information overflows an integer
budget by a few hundred bits drops a whole code bit there. This module measures each method at
many configurations instead (:func:`operating_points`: the method's budget solver asked at a
dense grid of budgets, duplicates removed), keeps each method's lower convex hull in the
(stored bits per element, MSE) plane (:func:`lower_convex_hull`: the points reachable by
splitting a matrix between two configurations, time sharing), and reads the best SQNR at a
budget off the hull (:func:`best_at_budget`). Reference lines for a unit-variance iid Gaussian
source: the Shannon bound ``D(R) = 2**(-2R)`` (:func:`shannon_sqnr_db`) and the
entropy-coded uniform scalar quantizer with centroid reconstruction (:func:`ecsq_curve`,
computed by exact Gaussian cell integrals, not a method: its rate is the entropy of its index,
which only an ideal entropy coder attains). :func:`plot` draws them with matplotlib.

Example:
    >>> import jax, numpy as np
    >>> x = np.asarray(jax.random.normal(jax.random.key(0), (256, 128)))
    >>> pts = operating_points(x, "rtn", np.arange(1.5, 4.6, 0.5))
    >>> hull = lower_convex_hull(pts)
    >>> best_at_budget(hull, 3.0).sqnr_db > 0
    True
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import numpy as np

from qetjax import metrics
from qetjax.budget import for_budget
from qetjax.core import bits, dequantize, quantize


class OperatingPoint(NamedTuple):
    """One measured configuration of a method.

    Attributes:
      method: the method's label (e.g. ``"trellis"`` or ``"trellis:scale=\\"tensor\\""``).
      config: the constructor arguments, ``name=value`` joined by commas.
      bits_per_element: stored bits divided by the number of elements.
      mse: mean squared error.
      sqnr_db: signal-to-quantization-noise ratio in dB.
      seconds: fit + encode + decode wall time (including compilation).
    """

    method: str
    config: str
    bits_per_element: float
    mse: float
    sqnr_db: float
    seconds: float = 0.0


def _config_text(q: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in q.spec.args if not hasattr(v, "args"))


def operating_points(
    x: np.ndarray, method: str, budgets: Iterable[float], label: str | None = None, key: jax.Array | None = None,
    **options: Any,
) -> list[OperatingPoint]:
    """Measures ``method`` at the configurations its budget solver picks for each of ``budgets``.

    Budgets no configuration fits are skipped; a configuration chosen for several budgets is
    measured once. Points are sorted by bits per element.

    Args:
      x: the matrix (2-D float array).
      method: a registered method with a budget solver.
      budgets: bits per element to ask the solver for.
      label: the method's name in the points (default ``method``).
      key: PRNG key (default ``jax.random.key(0)``).
      **options: passed to the solver (``qetjax.for_budget``).

    Example:
        >>> pts = operating_points(x, "pvq", [2.0, 2.5, 3.0], group_size=32)
    """
    key = jax.random.key(0) if key is None else key
    seen, points = set(), []
    for b in budgets:
        try:
            q = for_budget(method, x.shape, float(b), **options)
        except ValueError:  # nothing of this method fits this budget on this shape
            continue
        if q.spec in seen:
            continue
        seen.add(q.spec)
        t0 = time.perf_counter()
        qa = quantize(q, key, x)
        y = np.asarray(dequantize(qa), np.float32)
        seconds = time.perf_counter() - t0
        points.append(OperatingPoint(label or method, _config_text(q), bits(qa)["total"] / x.size,
                                     metrics.mse(x, y), metrics.sqnr_db(x, y), seconds))
    return sorted(points, key=lambda p: (p.bits_per_element, p.mse))


def lower_convex_hull(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """The points on the lower convex hull of (bits per element, MSE), by increasing bits.

    A point is kept when no other point (or mix of two, splitting the matrix between
    them) reaches a lower MSE at no more bits: the hull is monotone decreasing in MSE and
    convex. Andrew's monotone chain on the points sorted by bits.

    Example:
        >>> [p.bits_per_element for p in lower_convex_hull(points)]
    """
    pts = sorted(points, key=lambda p: (p.bits_per_element, p.mse))
    frontier: list[OperatingPoint] = []
    for p in pts:  # Pareto front first: strictly lower MSE for more bits
        if not frontier or p.mse < frontier[-1].mse:
            if frontier and p.bits_per_element == frontier[-1].bits_per_element:
                frontier.pop()
            frontier.append(p)
    hull: list[OperatingPoint] = []
    for p in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (b.bits_per_element - a.bits_per_element) * (p.mse - a.mse) - (b.mse - a.mse) * (
                p.bits_per_element - a.bits_per_element
            )
            if cross <= 0:  # b lies on or above the chord a-p
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


class HullReading(NamedTuple):
    """The hull of one method read at a budget.

    Attributes:
      method: the method's label.
      budget: bits per element.
      sqnr_db: SQNR of the hull at the budget (MSE interpolated linearly between the two hull
        points around it: a time-sharing mix), ``nan`` below the hull's first point.
      best_point: the measured hull point of most bits that fits the budget (``None`` if none).
    """

    method: str
    budget: float
    sqnr_db: float
    best_point: OperatingPoint | None


def best_at_budget(hull: Sequence[OperatingPoint], budget: float) -> HullReading:
    """Reads ``hull`` (from :func:`lower_convex_hull`) at ``budget`` bits per element.

    Above the hull's last point the last point's MSE is kept (no extrapolation).
    """
    if not hull:
        raise ValueError("hull must hold at least one point")
    name = hull[0].method
    fitting = [p for p in hull if p.bits_per_element <= budget]
    if not fitting:
        return HullReading(name, budget, float("nan"), None)
    lo = fitting[-1]
    above = [p for p in hull if p.bits_per_element > budget]
    if not above:
        return HullReading(name, budget, lo.sqnr_db, lo)
    hi = above[0]
    w = (budget - lo.bits_per_element) / (hi.bits_per_element - lo.bits_per_element)
    mse = (1 - w) * lo.mse + w * hi.mse
    power = lo.mse * 10 ** (lo.sqnr_db / 10)  # the signal's mean square (lo.mse > 0: a point lies below it)
    return HullReading(name, budget, 10 * math.log10(power / mse), lo)


# --------------------------------------------------------------------------- reference lines


def shannon_sqnr_db(rate: float | np.ndarray) -> float | np.ndarray:
    """The rate-distortion bound of a unit-variance iid Gaussian: ``10 log10(2**(2R))`` = 6.02 dB per bit."""
    return 20 * np.log10(2.0) * np.asarray(rate, np.float64)


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def ecsq_point(step: float) -> tuple[float, float]:
    """Rate (index entropy, bits) and MSE of the uniform scalar quantizer of ``step`` on N(0, 1).

    Midtread cells ``[(i - 1/2) step, (i + 1/2) step)`` (the outermost open to infinity, at
    12 standard deviations) reconstructed at their Gaussian centroids, from exact cell
    integrals: probability ``p = Phi(b) - Phi(a)``, centroid ``(phi(a) - phi(b)) / p``,
    second moment ``p + a phi(a) - b phi(b)``.
    """
    half = int(math.ceil(12.0 / step))
    inner = (np.arange(-half, half) + 0.5) * step
    a = np.concatenate([[-np.inf], inner])
    b = np.concatenate([inner, [np.inf]])
    p = _cdf(b) - _cdf(a)
    fa, fb = _phi(a), _phi(b)  # 0 at the infinite ends
    afa = np.where(np.isfinite(a), a, 0.0) * fa
    bfb = np.where(np.isfinite(b), b, 0.0) * fb
    ok = p > 0
    centroid = np.where(ok, (fa - fb) / np.where(ok, p, 1.0), 0.0)
    mse = float(np.sum(p + afa - bfb - p * centroid**2))
    rate = float(-np.sum(p[ok] * np.log2(p[ok])))
    return rate, mse


def ecsq_curve(rates: Sequence[float] | np.ndarray) -> np.ndarray:
    """SQNR (dB) of the entropy-coded uniform scalar quantizer of N(0, 1) at each rate (bits).

    The steps are swept on a log grid, and the (entropy, MSE) points' lower convex hull is
    interpolated at ``rates`` (linearly in MSE). About 1.53 dB under the Shannon bound at high
    rates (the ``pi e / 6`` space-filling loss).

    Example:
        >>> float(shannon_sqnr_db(4.0) - ecsq_curve([4.0])[0])  # about 1.5 dB
    """
    steps = np.exp(np.linspace(math.log(0.02), math.log(8.0), 240))
    pts = [OperatingPoint("ecsq", f"step={s:.4g}", *ecsq_point(float(s)), 0.0) for s in steps]
    hull = lower_convex_hull([p._replace(sqnr_db=-10 * math.log10(p.mse)) for p in pts])
    r = np.array([p.bits_per_element for p in hull])
    m = np.array([p.mse for p in hull])
    return -10 * np.log10(np.interp(np.asarray(rates, np.float64), r, m))


# --------------------------------------------------------------------------- reports


def markdown_readings(readings: Sequence[HullReading]) -> str:
    """Hull readings as a markdown table: method, budget, SQNR on the hull, the hull point that fits."""
    lines = ["| method | budget | hull SQNR dB | hull point fitting the budget (bits/elem, SQNR dB, config) |",
             "|---|---|---|---|"]
    for r in readings:
        p = r.best_point
        point = "n/a" if p is None else f"{p.bits_per_element:.4f}, {p.sqnr_db:.2f}, {p.config}"
        lines.append(f"| {r.method} | {r.budget:g} | {r.sqnr_db:.2f} | {point} |")
    return "\n".join(lines)


def plot(points: dict[str, Sequence[OperatingPoint]], path: str, title: str = "", gaussian_reference: bool = True,
         rate_range: tuple[float, float] = (1.0, 4.6)) -> str:
    """Writes SQNR against stored bits per element, one colour per method, hulls as lines.

    Args:
      points: operating points by method label.
      path: the image file to write (format from its suffix, e.g. ``.png``).
      title: the figure's title.
      gaussian_reference: also draw the Shannon bound and the entropy-coded scalar line (the
        references of a unit-variance iid Gaussian matrix).
      rate_range: the x range of the reference lines.

    Returns:
      ``path``.

    Example:
        >>> plot({"rtn": operating_points(x, "rtn", [2, 3, 4])}, "rd.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=110)
    if gaussian_reference:
        r = np.linspace(*rate_range, 200)
        ax.plot(r, shannon_sqnr_db(r), "k-", lw=1.2, label="Shannon bound D(R)")
        ax.plot(r, ecsq_curve(r), "k--", lw=1.0, label="entropy-coded scalar (computed)")
    for i, (name, pts) in enumerate(points.items()):
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.scatter([p.bits_per_element for p in pts], [p.sqnr_db for p in pts], s=12, color=color, alpha=0.6)
        hull = lower_convex_hull(pts)
        ax.plot([p.bits_per_element for p in hull], [p.sqnr_db for p in hull], "-", color=color, lw=1.4, label=name)
    ax.set_xlabel("stored bits per element (all side information counted)")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(matrices: dict[str, np.ndarray], methods: Sequence[str], budgets: Sequence[float], path: str,
        grid: Sequence[float] = tuple(np.arange(1.5, 4.5 + 1e-9, 0.25)),
        on_method: Any = None) -> tuple[str, list[str]]:
    """Operating points of ``methods`` on each matrix, the best at ``budgets`` off their hulls, and plots.

    Args:
      matrices: matrices by name; names starting with ``gaussian`` get the Shannon and
        entropy-coded scalar reference lines (they are unit-variance iid Gaussian).
      methods: registered methods with budget solvers.
      budgets: where to read the hulls.
      path: the plot file; with several matrices each gets ``stem_<name>.suffix``.
      grid: the budgets each method's solver is asked at.
      on_method: optional callback ``(matrix_name, method, points)`` after each method (progress).

    Returns:
      ``(markdown, paths)``: one best-at-budget table per matrix, and the plots written.

    Example:
        >>> text, paths = run({"gaussian": x}, ["rtn", "pq"], [2, 3, 4], "rd.png")
    """
    stem, suffix = os.path.splitext(path)
    sections, paths = [], []
    for name, x in matrices.items():
        points = {}
        for m in methods:
            points[m] = operating_points(x, m, grid)
            if on_method is not None:
                on_method(name, m, points[m])
        readings = [best_at_budget(lower_convex_hull(pts), float(b)) for b in budgets for pts in points.values() if pts]
        out = path if len(matrices) == 1 else f"{stem}_{name.replace(':', '_').replace('/', '_')}{suffix}"
        plot(points, out, title=f"{name} {x.shape[0]}x{x.shape[1]}", gaussian_reference=name.startswith("gaussian"))
        paths.append(out)
        sections.append(f"Best at budget off the lower convex hulls, {name} {x.shape[0]}x{x.shape[1]} "
                        f"(plot: {out})\n\n{markdown_readings(readings)}")
    return "\n\n".join(sections), paths
