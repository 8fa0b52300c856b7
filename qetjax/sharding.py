"""Quantizing on a device mesh, and across processes with ``jax.distributed``.

One leaf is split over the devices of one mesh axis where its method allows it, so that
each device holds and works on a share of it; the result equals :func:`qetjax.quantize`
on one device (bit for bit) where the split work is done in the same order:

* **rows** (``encode``): every registered method of :data:`ROW_METHODS` encodes each row
  on its own given the fitted params (RTN per row or group, Lloyd-Max, PQ, PVQ, trellis),
  and stores its codes row-major; each device encodes ``n / devices`` consecutive rows
  inside ``jax.shard_map``, and the codes' leaves are the devices' leaves concatenated.
  Per-row params (PVQ's and trellis' row scales) are split with the rows; the other
  params are replicated. Whether a split is exact is checked from the shapes alone
  (``jax.eval_shape`` at ``n``, ``n / devices`` and ``32 n / devices`` rows): every code
  leaf must grow with the rows, and a device's share of a packed bit stream must fill
  whole ``uint32`` words (else the split is refused, see below).
* **fit over rows**: the params of a row method are fitted by ``jax.jit`` with the
  matrix split over rows (XLA partitions the work: PVQ's projection of every group, the
  row scales); global statistics (PVQ's Lloyd gain levels, trellis' RMS) are then
  reduced by XLA across devices.
* **subspaces** (``fit``): PQ with one codebook per column group fits ``S / devices``
  codebooks per device, with the subspace keys that one fit of all ``S`` would use
  (:func:`qetjax.kmeans.subspace_keys`), then encodes over rows.
* **points** (``fit``): PQ with one shared codebook runs k-means with the training
  points split over devices: each Lloyd step sums its points per cluster and the partial
  sums are reduced by ``psum`` (:func:`qetjax.kmeans.lloyd` with ``axis_name``). The
  k-means++ seeding and the subsample are computed once, replicated. Float sums taken in
  another order round differently, so the centroids are *not* bit-identical to one
  device's; the training error is (tested: within 1% relative).
* **GPTQ** (:func:`gptq_quantize`): the Hessian ``X^T X / N`` is accumulated from
  calibration inputs split over the data axis (samples padded with zero rows, which add
  nothing) and reduced by ``psum``; the column-sequential compensation then runs on
  rows split over the same axis (each row's updates use only that row). With the same
  Hessian the codes equal :func:`qetjax.gptq.quantize`'s exactly (tested on inputs whose
  products sum exactly); a ``psum`` in another order than one device's matrix product
  changes the Hessian by float rounding (tested as a bound on the layer-output error).

Shapes that do not split (rows not divisible by the devices, a share of a packed stream
that ends inside a word, a method that couples rows) are refused by
:func:`quantize_sharded` with a ``ValueError`` that says why and what would split;
:func:`quantize_leaf` (what ``quantize_tree(..., mesh=mesh)`` calls) then quantizes the
leaf whole on one device of the mesh instead, the devices taken in turn.

:func:`place` puts a (quantized) tree on the mesh: every array whose leading axis divides
by the devices is split along it (codes and per-row side information like the rows of
the weights they replace, PQ codebooks by subspace), the others are replicated; a jitted
forward pass on the placed tree (``dequantize_tree`` inside ``jit``) runs on all devices.

Several processes: after ``jax.distributed.initialize`` (on CPU with
``jax.config.update("jax_cpu_collectives_implementation", "gloo")``), build the mesh from
``jax.devices()`` (all processes' devices) and call the same functions in every process
with the same host data; arrays are assembled with ``jax.make_array_from_callback`` and
each process computes its own devices' share. ``scripts/distributed_quantize.py`` runs
two processes on localhost.

Example:
    >>> import jax, qetjax
    >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    >>> x = jax.random.normal(jax.random.key(0), (1024, 256))
    >>> q = qetjax.rtn(4, group_size=64)
    >>> qa = quantize_sharded(q, jax.random.key(1), x, mesh)
    >>> bool((qetjax.dequantize(qa) == qetjax.dequantize(qetjax.quantize(q, jax.random.key(1), x))).all())
    True
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qetjax import gptq, kmeans
from qetjax.codebooks import split, store_codebook
from qetjax.combinators import TransformedCodes, TransformedParams, transposed
from qetjax.core import PRNGKey, QuantizedArray, Quantizer, _prepare, check_int, check_matrix, from_spec, quantize

# Methods whose encode handles each row on its own, given the params, and stores row-major.
ROW_METHODS = frozenset({"rtn", "lloyd_max", "pq", "pvq", "trellis"})
_WORD = 32  # bits of a packed word: a device's share of a stream must fill whole words


class Plan(NamedTuple):
    """How :func:`quantize_sharded` splits a leaf.

    Attributes:
      fit: ``"rows"`` (``jit`` over the row-split matrix), ``"subspaces"`` (PQ codebooks
        per device) or ``"points"`` (k-means with ``psum``-reduced sums).
      encode: ``"rows"``.
      devices: size of the mesh axis split over.
    """

    fit: str
    encode: str
    devices: int


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``AxisType.Auto`` (XLA propagates the shardings).

    ``jax.make_mesh`` makes ``Explicit`` axes by default since JAX 0.7, under which an
    operation whose output sharding is ambiguous (a pad of a split bit stream) is an
    error; the functions of this module run on the ``Auto`` form of the mesh given.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('data',))), got {type(mesh).__name__}")
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _axis(mesh: Any, axis: str | None) -> tuple[str, int]:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('data',))), got {type(mesh).__name__}")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh has axes {mesh.axis_names}; pass axis= to say which one to split over")
        axis = mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return axis, int(mesh.shape[axis])


def _put(x: Any, mesh: Mesh, spec: P) -> jax.Array:
    """``x`` (the same host value in every process) as a global array on ``mesh`` with ``spec``."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _key_data(key: PRNGKey) -> tuple[np.ndarray, Any]:
    return np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)


# --------------------------------------------------------------------------- shape analysis


def _leaf_shapes(tree: Any) -> list[tuple[int, ...]]:
    return [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)]


@functools.lru_cache(maxsize=1024)
def _fit_encode_shapes(q: Quantizer, shape: tuple[int, int], whole: tuple[int, int]) -> tuple[list, list]:
    """Leaf shapes of ``q``'s params and codes on a float32 matrix of ``shape``.

    Where ``q`` cannot be fitted on so few rows (more centroids than points), the params
    are those of the ``whole`` matrix and the codes are encoded with them.
    """
    key, x = jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32)
    try:
        params = jax.eval_shape(q.fit, key, x)
    except ValueError:
        params = jax.eval_shape(q.fit, key, jax.ShapeDtypeStruct(whole, jnp.float32))
    return _leaf_shapes(params), _leaf_shapes(jax.eval_shape(q.encode, params, x))


def _splits(full: tuple, block: tuple, big: tuple, devices: int) -> bool:
    """Whether a leaf of these shapes (at ``n``, ``n / devices``, ``32 n / devices``) is the
    concatenation along axis 0 of its shares: it grows with ``n``, and a share of a packed
    stream (``ceil(n_share * bits_per_row / 32)`` words) fills whole words."""
    return (
        len(full) >= 1
        and full[1:] == block[1:] == big[1:]
        and full[0] == devices * block[0]
        and big[0] == _WORD * block[0]
    )


def _specs(full: list, block: list, big: list, devices: int, axis: str, what: str, replicable: bool) -> list[P]:
    """The spec of each leaf: split along axis 0, or (params only) replicated."""
    if devices == 1:
        return [P(axis) if len(f) else P() for f in full]
    specs = []
    for i, (f, b, g) in enumerate(zip(full, block, big)):
        if _splits(f, b, g, devices):
            specs.append(P(axis))
        elif replicable and f == b:
            specs.append(P())
        else:
            raise ValueError(
                f"leaf {i} of the {what} has shape {f} on the whole matrix and {b} on a 1/{devices} share: "
                + ("it is held once per matrix (e.g. granularity='tensor'), which couples the rows"
                   if f == b else
                   "it does not split into whole shares (a share of a packed stream must fill whole 32-bit words); "
                   f"use a row count whose 1/{devices} share times the bits per row is a multiple of 32")
            )
    return specs


def _row_specs(q: Quantizer, shape: tuple[int, int], devices: int, axis: str) -> tuple[list[P], list[P]]:
    n, w = shape
    if n % devices:
        raise ValueError(f"x has {n} rows, which do not divide over {devices} devices; pad the rows to a multiple of {devices}")
    b = n // devices
    full, block, big = (_fit_encode_shapes(q, (m, w), (n, w)) for m in (n, b, _WORD * b))
    params = _specs(full[0], block[0], big[0], devices, axis, "params", replicable=True)
    codes = _specs(full[1], block[1], big[1], devices, axis, "codes", replicable=False)
    return params, codes


@functools.lru_cache(maxsize=1024)
def _fit_shapes(q: Quantizer, shape: tuple[int, int]) -> list:
    return _leaf_shapes(jax.eval_shape(q.fit, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32)))


def _subspace_specs(q: Quantizer, shape: tuple[int, int], devices: int, axis: str) -> list[P]:
    n, w = shape
    d = _args(q)["subvector_dim"]
    s = w // d
    if w % d or s % devices:
        raise ValueError(f"PQ's {s} subspaces (width {w} / subvector_dim {d}) do not divide over {devices} devices")
    cw = w // devices
    full, block, big = (_fit_shapes(q, (n, m)) for m in (w, cw, _WORD * cw))
    return _specs(full, block, big, devices, axis, "PQ codebooks", replicable=False)


# --------------------------------------------------------------------------- plans


def _args(q: Quantizer) -> dict:
    return dict(q.spec.args)


def _unwrap(q: Quantizer) -> Quantizer | None:
    """The inner quantizer of ``transposed(inner)``, else ``None``."""
    if q.spec is not None and q.spec.name == "transposed":
        inner = from_spec(q.spec.args[0][1])
        return inner if transposed(inner) is q else None
    return None


def plan(q: Quantizer, shape: tuple[int, int], mesh: Mesh, axis: str | None = None) -> Plan:
    """How ``q`` on a matrix of ``shape`` splits over ``mesh`` (see the module docstring).

    Raises:
      ValueError: the method or the shape does not split (the message says why).

    Example:
        >>> plan(qetjax.pq(4, 256), (4096, 512), jax.make_mesh((8,), ("data",)))
        Plan(fit='subspaces', encode='rows', devices=8)
    """
    if not isinstance(q, Quantizer) or q.spec is None:
        raise TypeError(f"q must be a Quantizer built by a registered constructor, got {type(q).__name__}")
    axis, devices = _axis(mesh, axis)
    shape = tuple(int(s) for s in shape)
    inner = _unwrap(q)
    if inner is not None:
        return plan(inner, shape[::-1], mesh, axis)
    if q.spec.name not in ROW_METHODS:
        raise ValueError(
            f"method {q.spec.name!r} does not split over devices (its encoding couples rows); "
            f"splittable: {sorted(ROW_METHODS)}"
        )
    _row_specs(q, shape, devices, axis)
    fit = "rows"
    if q.spec.name == "pq":
        fit = "points" if _args(q)["shared_codebook"] else "subspaces"
        if fit == "subspaces":
            _subspace_specs(q, shape, devices, axis)
    return Plan(fit, "rows", devices)


# --------------------------------------------------------------------------- fit


def _fit_rows(q: Quantizer, key: PRNGKey, x: jax.Array, mesh: Mesh, axis: str, specs: list[P]) -> Any:
    """``q.fit`` under ``jit`` on the row-split ``x``; per-row params come out split."""
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.fit, key, jax.ShapeDtypeStruct(x.shape, jnp.float32)))
    out = jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
    data, impl = _key_data(key)
    fit = jax.jit(lambda kd, x: q.fit(jax.random.wrap_key_data(kd, impl=impl), x), out_shardings=out)
    return fit(_put(data, mesh, P()), x)


def _fit_subspaces(q: Quantizer, key: PRNGKey, x: jax.Array, mesh: Mesh, axis: str, devices: int) -> Any:
    """PQ's per-subspace codebooks, ``S / devices`` per device, with the keys of one fit of all."""
    specs = _subspace_specs(q, tuple(x.shape), devices, axis)
    s = x.shape[1] // _args(q)["subvector_dim"]
    keys = kmeans.subspace_keys(key, s)
    data, impl = _key_data(keys)
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.fit, key, jax.ShapeDtypeStruct(x.shape, jnp.float32)))

    def body(kd: jax.Array, xb: jax.Array) -> list:
        return jax.tree_util.tree_leaves(q.fit(jax.random.wrap_key_data(kd, impl=impl), xb))

    fit = jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(None, axis)), out_specs=specs, check_vma=False)
    return jax.tree_util.tree_unflatten(treedef, jax.jit(fit)(_put(data, mesh, P(axis)), x))


def _fit_points(q: Quantizer, key: PRNGKey, x: jax.Array, mesh: Mesh, axis: str, devices: int) -> Any:
    """Shared-codebook PQ: k-means with the training points split, sums reduced by ``psum``."""
    a = _args(q)
    d, k = a["subvector_dim"], a["num_centroids"]
    points = split(x, d).reshape(1, -1, d)
    if k > points.shape[1]:
        raise ValueError(f"num_centroids={k} exceeds the {points.shape[1]} training subvectors")
    data, impl = _key_data(key)
    seed = jax.jit(lambda kd, p: kmeans.seed(jax.random.wrap_key_data(kd, impl=impl), p, k, a["init"],
                                             a["max_points_per_centroid"]), out_shardings=NamedSharding(mesh, P()))
    train, c0 = seed(_put(data, mesh, P()), points)
    m = train.shape[1]
    pad = -m % devices
    weights = _put(np.concatenate([np.ones(m, np.float32), np.zeros(pad, np.float32)]), mesh, P(axis))
    train = jax.jit(lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0))), out_shardings=NamedSharding(mesh, P(None, axis)))(train)

    def body(t: jax.Array, c: jax.Array, wt: jax.Array) -> jax.Array:
        return kmeans.lloyd(t, c, a["iters"], weights=wt, axis_name=axis).centroids

    lloyd = jax.shard_map(body, mesh=mesh, in_specs=(P(None, axis), P(), P(axis)), out_specs=P(), check_vma=False)
    c = jax.jit(lloyd)(train, c0, weights)
    return jax.jit(lambda c: store_codebook(c, a["codebook_dtype"], a["codebook_bits"]))(c)


def _fit(q: Quantizer, p: Plan, key: PRNGKey, xs: jax.Array, mesh: Mesh, axis: str) -> Any:
    """``q``'s params fitted on the row-split ``xs`` as :func:`plan` says."""
    if p.fit == "subspaces":
        cols = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P(None, axis)))(xs)
        return _fit_subspaces(q, key, cols, mesh, axis, p.devices)
    if p.fit == "points":
        return _fit_points(q, key, xs, mesh, axis, p.devices)
    return _fit_rows(q, key, xs, mesh, axis, _row_specs(q, tuple(xs.shape), p.devices, axis)[0])


# --------------------------------------------------------------------------- encode


def _spec_tree(tree_like: Any, specs: list[P]) -> Any:
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree_like), specs)


def _encode_rows(q: Quantizer, params: Any, x: jax.Array, mesh: Mesh, axis: str, devices: int) -> Any:
    """``q.encode`` with ``n / devices`` rows per device; the codes' leaves concatenated."""
    pspecs, cspecs = _row_specs(q, tuple(x.shape), devices, axis)
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.encode, params, jax.ShapeDtypeStruct(x.shape, jnp.float32)))

    def body(p: Any, xb: jax.Array) -> list:
        return jax.tree_util.tree_leaves(q.encode(p, xb))

    encode = jax.shard_map(body, mesh=mesh, in_specs=(_spec_tree(params, pspecs), P(axis)), out_specs=cspecs,
                           check_vma=False)
    return jax.tree_util.tree_unflatten(treedef, jax.jit(encode)(params, x))


def _check_key(key: Any) -> None:
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
        raise TypeError(f"key must be one typed PRNG key (jax.random.key(seed)), got {getattr(key, 'dtype', type(key))}")


def quantize_sharded(q: Quantizer, key: PRNGKey, x: Any, mesh: Mesh, *, axis: str | None = None) -> QuantizedArray:
    """:func:`qetjax.quantize` with the work split over the devices of ``mesh``'s ``axis``.

    Args:
      q: a quantizer of :data:`ROW_METHODS`, or :func:`~qetjax.combinators.transposed` of one.
      key: a PRNG key (``jax.random.key``).
      x: a 2-D float matrix (in every process, the same host value).
      mesh: a ``jax.sharding.Mesh``.
      axis: the mesh axis to split over (default: the mesh's only axis).

    Returns:
      The :class:`~qetjax.core.QuantizedArray` of ``qetjax.quantize(q, key, x)``, its
      leaves split over the devices (codes and per-row params by rows, PQ codebooks by
      subspace; see the module docstring for which results are bit-identical).

    Raises:
      ValueError: the method or the shape does not split (see :func:`plan`).

    Example:
        >>> qa = quantize_sharded(qetjax.pvq(32, 30, 4), jax.random.key(0), w, mesh)
    """
    _check_key(key)
    mesh = auto_mesh(mesh)
    inner = _unwrap(q)
    if inner is not None:
        x32, dtype = _prepare(q, x)
        qa = quantize_sharded(inner, jax.random.split(key)[1], x32.T, mesh, axis=axis)
        return QuantizedArray(TransformedParams(None, qa.params), TransformedCodes(None, qa.codes), q.spec,
                              tuple(x32.shape), dtype)
    x32, dtype = _prepare(q, x)
    p = plan(q, x32.shape, mesh, axis)
    axis, devices = _axis(mesh, axis)
    xs = _put(x32, mesh, P(axis))
    params = _fit(q, p, key, xs, mesh, axis)
    codes = _encode_rows(q, params, xs, mesh, axis, devices)
    return QuantizedArray(params, codes, q.spec, tuple(x32.shape), dtype)


def splits(q: Quantizer, shape: tuple[int, int], mesh: Mesh, axis: str | None = None) -> bool:
    """Whether :func:`quantize_sharded` splits ``q`` on ``shape`` over ``mesh`` (no error)."""
    try:
        plan(q, shape, mesh, axis)
    except ValueError:
        return False
    return True


_turns: dict[int, Any] = {}


def quantize_leaf(q: Quantizer, key: PRNGKey, x: Any, mesh: Mesh, *, axis: str | None = None) -> QuantizedArray:
    """One leaf of ``quantize_tree(..., mesh=mesh)``: split over ``mesh`` where :func:`plan`
    allows, else quantized whole on one device of the mesh (the devices in turn, so that
    whole leaves spread over them; with several processes, a device of this process).

    Example:
        >>> qa = quantize_leaf(qetjax.rtn(4), jax.random.key(0), x, mesh)
    """
    if splits(q, np.shape(x), mesh, axis):
        return quantize_sharded(q, key, x, mesh, axis=axis)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    turn = _turns.setdefault(id(mesh), itertools.cycle(local))
    device = next(turn)
    return quantize(q, jax.device_put(key, device), jax.device_put(np.asarray(x) if jax.process_count() > 1 else x, device))


# --------------------------------------------------------------------------- GPTQ


def hessian(x: Any, mesh: Mesh, *, axis: str | None = None) -> jax.Array:
    """``X^T X / samples`` with the samples split over ``axis`` and the partial sums ``psum``-reduced.

    Samples are padded with zero rows to a multiple of the devices (they add nothing).
    Equal to :func:`qetjax.gptq.hessian` up to the order of the float sums.

    Example:
        >>> h = hessian(activations, mesh)   # activations[samples, in]
    """
    x = check_matrix(x, "x")
    mesh = auto_mesh(mesh)
    axis, devices = _axis(mesh, axis)
    n = x.shape[0]
    xs = _put(jnp.pad(x, ((0, -n % devices), (0, 0))), mesh, P(axis))
    body = lambda xb: lax.psum(xb.T @ xb, axis) / n
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis), out_specs=P()))(xs)


def gptq_quantize(
    q: Quantizer,
    key: PRNGKey,
    w: Any,
    x: Any,
    mesh: Mesh,
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    axis: str | None = None,
    h: jax.Array | None = None,
) -> QuantizedArray:
    """:func:`qetjax.gptq.quantize` on a mesh: Hessian from samples split over ``axis``, rows split.

    Args:
      q, key, w, x, group_size, damp: as :func:`qetjax.gptq.quantize` (``w[out, in]``,
        calibration inputs ``x[samples, in]``; ``group_size`` defaults to ``q.column_group``).
      mesh, axis: the mesh and its axis; ``out`` must divide over it (see :func:`plan`).
      h: optional precomputed Hessian ``[in, in]`` (e.g. :func:`hessian` accumulated over
        several batches); then ``x`` is not used.

    Returns:
      The :class:`~qetjax.core.QuantizedArray`, codes and per-row params split by rows.

    Example:
        >>> qa = gptq_quantize(qetjax.rtn(3, group_size=64), key, w, x, mesh)
    """
    if not isinstance(q, Quantizer) or q.spec is None:
        raise TypeError("q must be a Quantizer built by a registered constructor")
    _check_key(key)
    w = check_matrix(w, "w")
    if group_size is None:
        group_size = q.column_group
        if group_size is None:
            raise ValueError(f"{q.spec.name} has no column groups here (Quantizer.column_group is None); "
                             "pass group_size or use e.g. rtn with a group_size, or pvq")
    group_size = check_int("group_size", group_size, 1)
    if w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} must divide the input width {w.shape[1]}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp must be a number > 0, got {damp!r}")
    mesh = auto_mesh(mesh)
    axis, devices = _axis(mesh, axis)
    if h is None:
        x = check_matrix(x, "x")
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"x must have {w.shape[1]} columns (the inputs of w), got shape {tuple(x.shape)}")
        h = hessian(x, mesh, axis=axis)
    elif tuple(h.shape) != (w.shape[1],) * 2:
        raise ValueError(f"h must be [{w.shape[1]}, {w.shape[1]}], got shape {tuple(h.shape)}")
    p = plan(q, w.shape, mesh, axis)
    pspecs, _ = _row_specs(q, tuple(w.shape), devices, axis)
    u, live = jax.jit(gptq.inverse_cholesky, static_argnums=1, out_shardings=NamedSharding(mesh, P()))(h, float(damp))
    w = jax.jit(lambda w, live: jnp.where(live[None, :], w, 0.0), out_shardings=NamedSharding(mesh, P(axis)))(
        _put(w, mesh, P(axis)), live)
    params = _fit(q, p, key, w, mesh, axis)
    compensate = jax.shard_map(lambda p, wb, u: gptq._compensate(q, p, wb, u, group_size), mesh=mesh,
                               in_specs=(_spec_tree(params, pspecs), P(axis), P()), out_specs=P(axis), check_vma=False)
    frozen = jax.jit(compensate)(params, w, u)
    codes = _encode_rows(q, params, frozen, mesh, axis, devices)
    return QuantizedArray(params, codes, q.spec, tuple(w.shape), "float32")


def gptq_leaf(q: Quantizer, key: PRNGKey, w: Any, x: Any, mesh: Mesh, *, damp: float = 0.01,
              axis: str | None = None) -> QuantizedArray:
    """One leaf of ``calibration.gptq_tree(..., mesh=mesh)``: :func:`gptq_quantize` where ``q``
    splits over ``mesh`` on ``w``'s shape, else :func:`qetjax.gptq.quantize` on one device.

    Example:
        >>> qa = gptq_leaf(qetjax.rtn(4, group_size=64), key, w, x, mesh)
    """
    if splits(q, np.shape(w), mesh, axis):
        return gptq_quantize(q, key, w, x, mesh, damp=damp, axis=axis)
    return gptq.quantize(q, key, w, x, damp=damp)


# --------------------------------------------------------------------------- placement


def place(tree: Any, mesh: Mesh, *, axis: str | None = None) -> Any:
    """Puts every array leaf of ``tree`` on ``mesh``: split along axis 0 over ``axis`` where it
    divides by the devices, else replicated.

    For a quantized tree (quantized leaves are pytrees of arrays) this splits codes and
    per-row side information by rows, PQ codebooks by subspace, and replicates small side
    information (gain tables, seeds, scalars). A jitted function of the placed tree (e.g.
    the model's forward on ``dequantize_tree(qtree)``) then runs on all devices.

    Example:
        >>> placed = place(qtree, mesh)
        >>> jax.jit(lambda qt, ids: logits(qetjax.dequantize_tree(qt), ids))(placed, ids)
    """
    mesh = auto_mesh(mesh)
    axis, devices = _axis(mesh, axis)

    def put(leaf: Any) -> Any:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            return leaf
        spec = P(axis) if np.ndim(leaf) >= 1 and leaf.shape[0] % devices == 0 else P()
        return _put(leaf, mesh, spec)

    return jax.tree.map(put, tree)
