"""Error metrics and timing helpers.

All error metrics compare a reference ``x`` with an approximation ``y`` of the
same shape, in float32, and return a Python float.

Example:
    >>> import jax.numpy as jnp
    >>> mse(jnp.ones(4), jnp.zeros(4))
    1.0
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _pair(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("x and y must not be empty")
    return x, y


def mse(x: Any, y: Any) -> float:
    """Mean squared error."""
    x, y = _pair(x, y)
    return float(jnp.mean(jnp.square(x - y)))


def mae(x: Any, y: Any) -> float:
    """Mean absolute error."""
    x, y = _pair(x, y)
    return float(jnp.mean(jnp.abs(x - y)))


def mre(x: Any, y: Any, eps: float = 1e-8) -> float:
    """Mean relative error ``mean(|x - y| / max(|x|, eps))``.

    Zeros: elements with ``|x| < eps`` are divided by ``eps`` rather than
    dropped, so an error on an exact zero is counted (and large); pass a larger
    ``eps`` to damp that.
    """
    x, y = _pair(x, y)
    return float(jnp.mean(jnp.abs(x - y) / jnp.maximum(jnp.abs(x), eps)))


def sqnr_db(x: Any, y: Any) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x-y)^2)`` in dB.

    Returns ``inf`` for an exact reconstruction.
    """
    x, y = _pair(x, y)
    noise = float(jnp.sum(jnp.square(x - y)))
    signal = float(jnp.sum(jnp.square(x)))
    return float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))


def relative_error(x: Any, y: Any) -> float:
    """Relative Frobenius error ``||x - y|| / ||x||``."""
    x, y = _pair(x, y)
    return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x))


class Timing(NamedTuple):
    """Seconds for the first call (compile + run) and the median of later runs."""

    compile_s: float
    run_s: float


def _block(out: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 3) -> tuple[Any, Timing]:
    """Times ``fn(*args)``: compile time separately from run time.

    ``compile_s`` is the first call's time minus the median run time (tracing,
    compilation and first-touch costs); ``run_s`` is the median of ``repeats``
    further calls, each waited on with ``block_until_ready``.

    Returns:
      ``(output of the last call, Timing)``.

    Example:
        >>> out, t = time_fn(jax.jit(jnp.sin), jnp.ones(1000))
    """
    t0 = time.perf_counter()
    out = _block(fn(*args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = _block(fn(*args))
        runs.append(time.perf_counter() - t0)
    run = float(np.median(runs))
    return out, Timing(max(0.0, first - run), run)


def time_ratio(seconds: float, baseline_seconds: float) -> float:
    """QTR/DTR: a method's time divided by the baseline's (PQ's, faiss's)."""
    if baseline_seconds <= 0:
        raise ValueError(f"baseline_seconds must be > 0, got {baseline_seconds}")
    return seconds / baseline_seconds
