"""Quantizing on a device mesh, and across processes with ``jax.distributed``.

One leaf is split over the devices of one mesh axis where its method allows it, so that
each device holds and works on a share of it:

* **rows** (``encode``): every registered method of :data:`ROW_METHODS` encodes each row
  on its own given the fitted params (RTN per row or group, Lloyd-Max, PQ, PVQ, trellis),
  and stores its codes row-major; each device encodes ``n / devices`` consecutive rows
  inside ``jax.shard_map``, and the codes' leaves are the devices' leaves concatenated.
  Per-row params (PVQ's and trellis' row scales) are split with the rows; the other
  params are replicated. Whether a split is exact is checked from the shapes alone
  (``jax.eval_shape`` at ``n``, ``n / devices`` and ``32 n / devices`` rows): every code
  leaf must grow with the rows, and a device's share of a packed bit stream must fill
  whole ``uint32`` words (else the split is refused, see below).
* **fit**: PVQ's fit (the projection of every group, then Lloyd gain levels) runs under
  ``jax.jit`` on the row-split matrix, partitioned by XLA; the cheap fits of RTN,
  Lloyd-Max and trellis (global statistics such as trellis' RMS) run replicated, i.e.
  exactly as on one device.
* **subspaces** (``fit``): PQ with one codebook per column group fits ``S / devices``
  codebooks per device, with the subspace keys that one fit of all ``S`` would use
  (:func:`qetjax.kmeans.subspace_keys`), then encodes over rows.
* **points** (``fit``): PQ with one shared codebook runs k-means with the training
  points split over devices: each Lloyd step sums its points per cluster and the partial
  sums are reduced by ``psum`` (:func:`qetjax.kmeans.lloyd` with ``axis_name``). The
  k-means++ seeding and the subsample are computed once, replicated.
* **GPTQ** (:func:`gptq_quantize`): the Hessian ``X^T X / N`` is accumulated from
  calibration inputs split over the data axis (samples padded with zero rows, which add
  nothing) and reduced by ``psum``; the damped inverse Cholesky factor is computed once
  per process, on one device, and copied to the others; the column-sequential
  compensation then runs on rows split over the same axis (each row's updates use only
  that row; on CPU devices with one BLAS thread per device, see :func:`_one_blas_thread`),
  with the params that encode rows (PQ's codebooks, fitted by subspaces or points as
  above, replicated for it: each group takes its share by
  :attr:`~qetjax.core.Quantizer.column_params`).

What equals one device, bit for bit: RTN, Lloyd-Max and PQ by subspaces (only exact
integer and elementwise work depends on the share); GPTQ given the same Hessian (tested
on inputs whose products sum exactly, in any order). What does not, in general: XLA
compiles a share of rows as a different shape, and may vectorize a float reduction over
it in another order, so PVQ's and trellis' searches can resolve a near-tie differently
(measured: 1 group in 13,824 of a SmolLM2 ``k_proj`` at PVQ D=8, K=4; tested as a bound
on the fraction of differing groups); the ``psum`` of k-means' partial sums and of the
Hessian rounds in another order than one device's sums (tested: training error and
GPTQ's layer-output error within 1% of one device's).

Shapes that do not split (rows not divisible by the devices, a share of a packed stream
that ends inside a word, a method that couples rows) are refused by
:func:`quantize_sharded` with a ``ValueError`` that says why and what would split;
:func:`quantize_leaf` (what ``quantize_tree(..., mesh=mesh)`` calls) then quantizes the
leaf whole on one device of the mesh instead, the devices taken in turn.

:func:`place` puts a (quantized) tree on the mesh: every array whose leading axis divides
by the devices is split along it (codes and per-row side information like the rows of
the weights they replace, PQ codebooks by subspace), the others are replicated; a jitted
forward pass on the placed tree (``dequantize_tree`` inside ``jit``) runs on all devices.
Decoding a split array is partitioned by XLA too, so decoded floats may differ from one
device's in the last bit.

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

import contextlib
import dataclasses
import functools
import itertools
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qetjax import gptq, kmeans
from qetjax.codebooks import split, store_codebook
from qetjax.combinators import TransformedCodes, TransformedParams, transposed
from qetjax.core import PRNGKey, QuantizedArray, Quantizer, _prepare, check_matrix, from_spec, quantize

# Methods whose encode handles each row on its own, given the params, and stores row-major.
ROW_METHODS = frozenset({"rtn", "lloyd_max", "pq", "pvq", "trellis"})
# Row methods whose (expensive) fit runs partitioned over rows; the others fit replicated.
_ROW_FIT = frozenset({"pvq"})
_WORD = 32  # bits of a packed word: a device's share of a stream must fill whole words


class Plan(NamedTuple):
    """How :func:`quantize_sharded` splits a leaf.

    Attributes:
      fit: ``"rows"`` (``jit`` over the row-split matrix), ``"replicated"`` (every device
        fits the whole matrix, as one device would), ``"subspaces"`` (PQ codebooks per
        device) or ``"points"`` (k-means with ``psum``-reduced sums).
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
        raise ValueError(f"x has {n} rows, which do not divide over {devices} devices; use a mesh axis whose size "
                         f"divides {n}, or quantize the leaf whole (qetjax.quantize; quantize_tree(mesh=) does so)")
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
        >>> plan(qetjax.rtn(4), (4096, 512), jax.make_mesh((8,), ("data",)))
        Plan(fit='replicated', encode='rows', devices=8)
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
    fit = "rows" if q.spec.name in _ROW_FIT else "replicated"
    if q.spec.name == "pq":
        fit = "points" if _args(q)["shared_codebook"] else "subspaces"
        if fit == "subspaces":
            _subspace_specs(q, shape, devices, axis)
    return Plan(fit, "rows", devices)


# --------------------------------------------------------------------------- communication


@dataclasses.dataclass
class Communication:
    """Collectives run by this module's compiled programs while :func:`record_communication` is open.

    Counted from the optimized HLO of every program run (after XLA's SPMD partitioning),
    each collective times the trip counts of the loops around it.

    Attributes:
      payload: bytes of the collectives' results, by kind (``all-reduce``, ``all-gather``, ...).
      per_device: bytes each device sends (= receives) under ring algorithms:
        ``2 (n-1)/n`` of an all-reduce, ``(n-1)/n`` of an all-gather or all-to-all result,
        ``n-1`` times a reduce-scatter result, all of a collective-permute.
      steps: collectives executed (each one a latency-bound step).
      programs: programs counted.
    """

    payload: dict[str, int] = dataclasses.field(default_factory=dict)
    per_device: float = 0.0
    steps: int = 0
    programs: int = 0


_RECORDERS: list[Communication] = []
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")
_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")
_CALLEE = re.compile(r"(body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_GROUP = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
        total += size * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def count_collectives(hlo: str, devices: int) -> Communication:
    """The collectives of one optimized HLO module (``compiled.as_text()``), loops unrolled by count.

    Example:
        >>> count_collectives(jax.jit(f).lower(x).compile().as_text(), 8).per_device
    """
    body: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and line.rstrip().endswith("{"):
            name = m.group(1)
            body[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None:
            body[name].append(line)
    times: dict[str, int] = {entry: 1}
    order = [entry]
    for comp in order:  # callers before callees (HLO is a DAG of computations)
        for line in body.get(comp, ()):
            trip = _TRIP.search(line)
            callees = [(kind, c) for kind, c in _CALLEE.findall(line)]
            callees += [("branch", c.strip().lstrip("%")) for b in _BRANCHES.findall(line) for c in b.split(",")]
            for kind, callee in callees:
                n = int(trip.group(1)) if kind == "body" and trip else 1
                if callee not in times:
                    order.append(callee)
                times[callee] = times.get(callee, 0) + times[comp] * n
    log = Communication(programs=1)
    for comp, count in times.items():
        for line in body.get(comp, ()):
            m = _COLLECTIVE.search(line)
            if not m:
                continue
            size = _shape_bytes(m.group(1)) * count
            group = _GROUP.search(line)
            n = len(group.group(1).split(",")) if group and group.group(1) else devices
            kind = m.group(2)
            log.payload[kind] = log.payload.get(kind, 0) + size
            log.steps += count
            log.per_device += size * {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
                                      "all-to-all": (n - 1) / n, "reduce-scatter": n - 1}.get(kind, 1.0)
    return log


@contextlib.contextmanager
def record_communication() -> Iterator[Communication]:
    """Counts the collectives of every program this module runs inside the ``with`` block.

    Each program is lowered and compiled once more to read its HLO, so use it to measure,
    not in production.

    Example:
        >>> with record_communication() as comm:
        ...     quantize_sharded(q, key, x, mesh)
        >>> comm.per_device, comm.steps
    """
    log = Communication()
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def _run(fn: Any, mesh: Mesh, *args: Any) -> Any:
    """Calls the jitted ``fn``; counts its collectives for open :func:`record_communication` blocks."""
    out = fn(*args)
    if _RECORDERS:
        part = count_collectives(fn.lower(*args).compile().as_text(), mesh.size)
        for log in _RECORDERS:
            for kind, size in part.payload.items():
                log.payload[kind] = log.payload.get(kind, 0) + size
            log.per_device += part.per_device
            log.steps += part.steps
            log.programs += 1
    return out


# --------------------------------------------------------------------------- fit


def _shardings(mesh: Mesh, treedef: Any, specs: tuple) -> Any:
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


@functools.lru_cache(maxsize=256)
def _fit_rows_fn(q: Quantizer, mesh: Mesh, impl: Any, treedef: Any, specs: tuple, replicated: bool) -> Any:
    whole = NamedSharding(mesh, P())
    out = _shardings(mesh, treedef, specs)
    if not replicated:
        return jax.jit(lambda kd, x: q.fit(jax.random.wrap_key_data(kd, impl=impl), x), out_shardings=out), None

    # All of the fit replicated (a split output would propagate back into its reductions),
    # then the per-row params sliced to their devices.
    def fit(kd: jax.Array, x: jax.Array) -> Any:
        return q.fit(jax.random.wrap_key_data(kd, impl=impl), jax.lax.with_sharding_constraint(x, whole))

    fit_whole = jax.jit(fit, out_shardings=_shardings(mesh, treedef, (P(),) * len(specs)))
    return fit_whole, jax.jit(lambda params: params, out_shardings=out)


def _fit_rows(q: Quantizer, key: PRNGKey, x: jax.Array, mesh: Mesh, specs: list[P], replicated: bool) -> Any:
    """``q.fit`` under ``jit`` on the row-split ``x`` (or on all of it on every device,
    ``replicated``); per-row params come out split."""
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.fit, key, jax.ShapeDtypeStruct(x.shape, jnp.float32)))
    data, impl = _key_data(key)
    fit, split_rows = _fit_rows_fn(q, mesh, impl, treedef, tuple(specs), replicated)
    params = _run(fit, mesh, _put(data, mesh, P()), x)
    return params if split_rows is None else _run(split_rows, mesh, params)


@functools.lru_cache(maxsize=256)
def _fit_subspaces_fn(q: Quantizer, mesh: Mesh, axis: str, impl: Any, specs: tuple) -> Any:
    def body(kd: jax.Array, xb: jax.Array) -> list:
        return jax.tree_util.tree_leaves(q.fit(jax.random.wrap_key_data(kd, impl=impl), xb))

    cols = NamedSharding(mesh, P(None, axis))
    fit = jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(None, axis)), out_specs=list(specs), check_vma=False)
    return jax.jit(lambda kd, x: fit(kd, jax.lax.with_sharding_constraint(x, cols)))


def _fit_subspaces(q: Quantizer, key: PRNGKey, x: jax.Array, mesh: Mesh, axis: str, devices: int) -> Any:
    """PQ's per-subspace codebooks, ``S / devices`` per device, with the keys of one fit of all."""
    specs = _subspace_specs(q, tuple(x.shape), devices, axis)
    keys = kmeans.subspace_keys(key, x.shape[1] // _args(q)["subvector_dim"])
    data, impl = _key_data(keys)
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.fit, key, jax.ShapeDtypeStruct(x.shape, jnp.float32)))
    leaves = _run(_fit_subspaces_fn(q, mesh, axis, impl, tuple(specs)), mesh, _put(data, mesh, P(axis)), x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.lru_cache(maxsize=256)
def _fit_points_fns(q: Quantizer, mesh: Mesh, axis: str, impl: Any) -> tuple[Any, Any]:
    a = _args(q)
    d, k = a["subvector_dim"], a["num_centroids"]
    devices = int(mesh.shape[axis])

    def seed(kd: jax.Array, x: jax.Array) -> tuple:
        points = split(x, d).reshape(1, -1, d)
        train, c0 = kmeans.seed(jax.random.wrap_key_data(kd, impl=impl), points, k, a["init"], a["max_points_per_centroid"])
        m = train.shape[1]
        pad = -m % devices
        weights = jnp.concatenate([jnp.ones(m, jnp.float32), jnp.zeros(pad, jnp.float32)])
        return jnp.pad(train, ((0, 0), (0, pad), (0, 0))), c0, weights

    def body(t: jax.Array, c: jax.Array, wt: jax.Array) -> jax.Array:
        return kmeans.lloyd(t, c, a["iters"], weights=wt, axis_name=axis).centroids

    split_points = (NamedSharding(mesh, P(None, axis)), NamedSharding(mesh, P()), NamedSharding(mesh, P(axis)))
    lloyd = jax.shard_map(body, mesh=mesh, in_specs=(P(None, axis), P(), P(axis)), out_specs=P(), check_vma=False)
    store = lambda t, c, wt: store_codebook(lloyd(t, c, wt), a["codebook_dtype"], a["codebook_bits"])
    return jax.jit(seed, out_shardings=split_points), jax.jit(store)


def _fit_points(q: Quantizer, key: PRNGKey, x: jax.Array, mesh: Mesh, axis: str, devices: int) -> Any:
    """Shared-codebook PQ: k-means with the training points split, sums reduced by ``psum``.

    The subsample and the k-means++ seeding are computed once on all devices alike; the
    Lloyd steps run on ``1 / devices`` of the points each (padding points weigh 0).
    """
    a = _args(q)
    k, d = a["num_centroids"], a["subvector_dim"]
    if k > x.shape[0] * (x.shape[1] // d):
        raise ValueError(f"num_centroids={k} exceeds the {x.shape[0] * (x.shape[1] // d)} training subvectors")
    data, impl = _key_data(key)
    seed, store = _fit_points_fns(q, mesh, axis, impl)
    train, c0, weights = _run(seed, mesh, _put(data, mesh, P()), x)
    return _run(store, mesh, train, c0, weights)


def _fit(q: Quantizer, p: Plan, key: PRNGKey, xs: jax.Array, mesh: Mesh, axis: str) -> Any:
    """``q``'s params fitted on the row-split ``xs`` as :func:`plan` says."""
    if p.fit == "subspaces":
        return _fit_subspaces(q, key, xs, mesh, axis, p.devices)
    if p.fit == "points":
        return _fit_points(q, key, xs, mesh, axis, p.devices)
    return _fit_rows(q, key, xs, mesh, _row_specs(q, tuple(xs.shape), p.devices, axis)[0], p.fit == "replicated")


# --------------------------------------------------------------------------- encode


@functools.lru_cache(maxsize=256)
def _encode_fn(q: Quantizer, mesh: Mesh, axis: str, ptree: Any, pspecs: tuple, cspecs: tuple, fixed: bool) -> Any:
    def body(p: Any, xb: jax.Array, *start: jax.Array) -> list:
        return jax.tree_util.tree_leaves(q.requantize(p, start[0], xb) if fixed else q.encode(p, xb))

    in_specs = (jax.tree_util.tree_unflatten(ptree, list(pspecs)), P(axis)) + ((P(axis),) if fixed else ())
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=list(cspecs), check_vma=False))


def _encode_rows(q: Quantizer, params: Any, x: jax.Array, mesh: Mesh, axis: str, devices: int,
                 start: jax.Array | None = None) -> Any:
    """``q.encode`` with ``n / devices`` rows per device; the codes' leaves concatenated. With ``start``:
    ``q.requantize(params, start, x)`` (GPTQ's codes on the grids of the groups' starts)."""
    pspecs, cspecs = _row_specs(q, tuple(x.shape), devices, axis)
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.encode, params, jax.ShapeDtypeStruct(x.shape, jnp.float32)))
    fn = _encode_fn(q, mesh, axis, jax.tree_util.tree_structure(params), tuple(pspecs), tuple(cspecs), start is not None)
    return jax.tree_util.tree_unflatten(treedef, _run(fn, mesh, params, x, *(() if start is None else (start,))))


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
    return _run(_hessian_fn(mesh, axis, n), mesh, xs)


@functools.lru_cache(maxsize=64)
def _hessian_fn(mesh: Mesh, axis: str, n: int) -> Any:
    body = lambda xb: lax.psum(xb.T @ xb, axis) / n
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis), out_specs=P()))


@functools.lru_cache(maxsize=64)
def _factor_fn(damp: float, sharding: Any) -> Any:
    return jax.jit(functools.partial(gptq.inverse_cholesky, damp=damp), out_shardings=sharding)


def _shares_cores(mesh: Mesh) -> bool:
    """Whether ``mesh`` has several CPU devices (in one process or several): they share the host's cores."""
    return mesh.size > 1 and all(d.platform == "cpu" for d in mesh.devices.flat)


def _factor(h: jax.Array, mesh: Mesh, damp: float) -> tuple[jax.Array, jax.Array]:
    """:func:`qetjax.gptq.inverse_cholesky` of ``h``, replicated on ``mesh``.

    Accelerators each compute it (one replicated program: no transfer). CPU devices share
    the host's cores, so there it is computed once per process, on its first device of
    ``mesh`` (the program one device runs), and copied to the process's other devices:
    replicated, every device thread would run LAPACK (OpenBLAS, itself threaded) at once —
    measured on 8 simulated devices of a 2-core machine, 29 s against 1.0 s on one device
    for the factor of a ``[576, 576]`` Hessian.
    """
    replicated = NamedSharding(mesh, P())
    if not _shares_cores(mesh):
        return _factor_fn(damp, replicated)(h)
    if not h.sharding.is_fully_replicated:
        h = jax.jit(lambda a: a, out_shardings=replicated)(h)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    u, live = _factor_fn(damp, None)(jax.device_put(h.addressable_shards[0].data, local[0]))
    return tuple(jax.make_array_from_single_device_arrays(a.shape, replicated, [jax.device_put(a, d) for d in local])
                 for a in (u, live))


@contextlib.contextmanager
def _one_blas_thread(mesh: Mesh, pending: Any) -> Iterator[None]:
    """One BLAS thread per call (process-wide, inside the block) while the CPU devices of
    ``mesh`` run GPTQ's column loop, which calls LAPACK's triangular solve on every device.

    XLA's CPU devices call LAPACK through scipy's OpenBLAS; called from every device at once,
    on the cores that the devices already share, its own threads oversubscribe them and its
    callers wait on each other (measured on 8 simulated devices of a 2-core
    machine: the column loop of a ``[1536, 576]`` leaf took 2.5 s against 0.03 s with one
    BLAS thread). The triangular solve gives the same bits with one thread as with several
    (tested through GPTQ's codes); the Cholesky factors do not, so ``pending`` (the factor
    among them) is waited for before the limit is set, and the block waits for its work.
    """
    if not _shares_cores(mesh):
        yield
        return
    jax.block_until_ready(pending)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


@functools.lru_cache(maxsize=64)
def _gptq_fns(q: Quantizer, mesh: Mesh, axis: str, group_size: int, ptree: Any, pspecs: tuple) -> tuple:
    rows = NamedSharding(mesh, P(axis))
    mask = jax.jit(lambda w, live: jnp.where(live[None, :], w, 0.0), out_shardings=rows)
    in_specs = (jax.tree_util.tree_unflatten(ptree, list(pspecs)), P(axis), P())
    compensate = jax.shard_map(lambda p, wb, u: gptq._compensate(q, p, wb, u, group_size), mesh=mesh,
                               in_specs=in_specs, out_specs=(P(axis), P(axis)), check_vma=False)
    return mask, jax.jit(compensate)


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
    group_size = gptq.check_group_size(q, group_size, w.shape[1], damp)
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
    treedef = jax.tree_util.tree_structure(jax.eval_shape(q.fit, key, jax.ShapeDtypeStruct(w.shape, jnp.float32)))
    mask, compensate = _gptq_fns(q, mesh, axis, group_size, treedef, tuple(pspecs))
    u, live = _factor(h if isinstance(h, jax.Array) else _put(h, mesh, P()), mesh, float(damp))
    w = _run(mask, mesh, _put(w, mesh, P(axis)), live)
    params = _fit(q, p, key, w, mesh, axis)
    with _one_blas_thread(mesh, (params, w, u)):
        start, frozen = jax.block_until_ready(_run(compensate, mesh, params, w, u))
    codes = _encode_rows(q, params, frozen, mesh, axis, devices, start=None if q.requantize is None else start)
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
