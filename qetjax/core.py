"""The core abstraction: quantizers as pure functions, quantized arrays as pytrees.

A :class:`Quantizer` is a NamedTuple of three pure functions, in the style of
optax's ``GradientTransformation``::

    fit(key, x) -> params        # shared state learned from data (codebooks, rotations)
    encode(params, x) -> codes   # per-data codes and side information
    decode(params, codes) -> x̂   # exact inverse of the stored representation

``params`` and ``codes`` are pytrees of arrays (frozen dataclasses registered with
JAX; configuration lives in static fields). :func:`quantize` runs fit and encode and
returns a :class:`QuantizedArray`; :func:`bits` counts the bits of every stored array
leaf, so the size that is reported is the size of what is stored.

Every quantizer built by a registered constructor carries a :class:`Spec` (its
name and arguments), from which the same quantizer can be rebuilt: this is how a
:class:`QuantizedArray` decodes itself and how saved files are read back.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (64, 32))
    >>> qa = qetjax.quantize(qetjax.rtn(4), jax.random.key(1), x)
    >>> qetjax.dequantize(qa).shape
    (64, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PRNGKey = jax.Array


# --------------------------------------------------------------------------- pytrees


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that JAX treats as static (configuration, not data)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def pytree_dataclass(cls: type) -> type:
    """Makes ``cls`` a frozen dataclass registered as a JAX pytree.

    Fields declared with :func:`static_field` are static (hashed into the jit
    cache); all other fields are pytree children (arrays, or nested pytrees).

    Example:
        >>> @pytree_dataclass
        ... class Codes:
        ...     codes: jax.Array
        ...     bits: int = static_field()
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls)


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Spec:
    """Name and canonical arguments of a registered quantizer constructor.

    ``args`` is a tuple of ``(parameter_name, value)`` pairs in signature order,
    with defaults filled in; values are JSON-able scalars, tuples, or nested
    :class:`Spec` objects (for combinators such as :func:`qetjax.residual`).
    """

    name: str
    args: tuple[tuple[str, Any], ...]

    def to_json(self) -> dict:
        """A JSON-serialisable form of the spec."""
        return {"name": self.name, "args": [[k, _to_json(v)] for k, v in self.args]}

    @staticmethod
    def from_json(obj: dict) -> "Spec":
        """Inverse of :meth:`to_json`."""
        return Spec(obj["name"], tuple((k, _from_json(v)) for k, v in obj["args"]))


def _to_json(v: Any) -> Any:
    if isinstance(v, Spec):
        return {"spec": v.to_json()}
    if isinstance(v, tuple):
        return {"tuple": [_to_json(e) for e in v]}
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, dict) and "spec" in v:
        return Spec.from_json(v["spec"])
    if isinstance(v, dict) and "tuple" in v:
        return tuple(_from_json(e) for e in v["tuple"])
    return v


class Quantizer(NamedTuple):
    """A quantization method: three pure functions and the spec that rebuilds them.

    Attributes:
      fit: ``(key, x) -> params``; learns shared state from a float32 matrix.
      encode: ``(params, x) -> codes``; per-data codes and side information.
      decode: ``(params, codes) -> x̂``; a float32 matrix of the encoded shape.
      spec: name and arguments of the constructor that built it (``None`` for an
        unregistered, ad-hoc quantizer, which cannot be saved or self-decoded).
      column_group: the width of the column groups whose encoding, given the fitted
        params, depends only on those columns (GPTQ's granularity: ``rtn`` with a
        ``group_size``, ``pvq``'s groups, PQ's and product LSQ's subvectors), or ``None``
        when encoding couples a whole row.
      column_params: ``(params, start, width) -> params``, for methods whose fitted params
        depend on the column position (one codebook per PQ subspace): the params that encode
        and decode columns ``[start, start + width)`` as a standalone matrix, ``start`` and
        ``width`` multiples of ``column_group`` (``start`` may be traced, ``width`` is static).
        ``None``: the params serve any group of columns as they are (RTN, PVQ, shared PQ).
      requantize: ``(params, start, x) -> codes``, for methods that round each element on its
        own once the side information is set: the codes of ``x`` on the grid (scales, zeros)
        that ``encode(params, start)`` would choose, ``start`` and ``x`` of one shape. GPTQ uses
        it to quantize a group's columns one at a time with the group's grid fixed at its start,
        as in the GPTQ paper; ``None`` (jointly coded groups: PVQ, the trellis, rotations) makes
        GPTQ compensate between whole groups only.
    """

    fit: Callable[[PRNGKey, Array], Any]
    encode: Callable[[Any, Array], Any]
    decode: Callable[[Any, Any], Array]
    spec: Spec | None = None
    column_group: int | None = None
    requantize: Callable[[Any, Array, Array], Any] | None = None
    column_params: Callable[[Any, Array, int], Any] | None = None


class Method(NamedTuple):
    """A registry entry: the constructor and, optionally, its budget solver."""

    constructor: Callable[..., Quantizer]
    budget: Callable[..., Quantizer] | None = None


METHODS: dict[str, Method] = {}


def _freeze(v: Any) -> Any:
    """Canonical, hashable, JSON-able form of a constructor argument."""
    if isinstance(v, Quantizer):
        if v.spec is None:
            raise TypeError("quantizer arguments must be built by registered constructors")
        return v.spec
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(e) for e in v)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, np.generic):
        return v.item()
    try:
        return np.dtype(v).name
    except TypeError:
        raise TypeError(f"unsupported constructor argument {v!r}") from None


def _thaw(v: Any) -> Any:
    if isinstance(v, Spec):
        return from_spec(v)
    if isinstance(v, tuple):
        return tuple(_thaw(e) for e in v)
    return v


INT32_MAX = 2**31 - 1
"""The largest integer argument a constructor accepts: JAX computes with 32-bit integers here."""


def _check_annotated(method: str, param: inspect.Parameter, value: Any) -> None:
    """Checks ``value`` against a ``bool``/``int``/``float`` annotation (optionally ``| None``) of ``param``.

    Raises:
      TypeError: a value of another type (``"no"`` or ``1`` for a bool, ``2.5`` or ``True`` for an int).
      ValueError: an int outside ``[-INT32_MAX - 1, INT32_MAX]``, a float that is NaN or infinite.
    """
    ann = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    kinds = {part.strip() for part in ann.split("|")}
    base = kinds - {"None"}
    if len(base) != 1 or not base <= {"bool", "int", "float"} or (value is None and "None" in kinds):
        return
    kind, where = base.pop(), f"{method}: {param.name}"
    is_bool = isinstance(value, (bool, np.bool_))
    if kind == "bool":
        if not is_bool:
            raise TypeError(f"{where} must be a bool (True or False), got {value!r}")
    elif is_bool or not isinstance(value, (int, np.integer) if kind == "int" else (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be {'an int' if kind == 'int' else 'a number'}, got {type(value).__name__} {value!r}")
    elif kind == "int" and not -INT32_MAX - 1 <= value <= INT32_MAX:
        raise ValueError(f"{where} must be at most {INT32_MAX} in magnitude (JAX computes with 32-bit integers), got {value}")
    elif kind == "float" and not np.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")


def register_method(name: str) -> Callable[[Callable[..., Quantizer]], Callable[..., Quantizer]]:
    """Registers a quantizer constructor under ``name``.

    The wrapped constructor returns a :class:`Quantizer` carrying its
    :class:`Spec`; equal arguments return the identical object, so jit caches
    keyed on the quantizer hit across calls. Arguments annotated ``bool``,
    ``int`` or ``float`` (optionally ``| None``) are checked for every method
    before it sees them: a bool must be a bool (not ``"no"`` or ``1``), an int an
    int within 32 bits (:data:`INT32_MAX`), a float a finite number.

    Example:
        >>> @register_method("identity")
        ... def identity() -> Quantizer: ...
    """

    def decorate(fn: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def constructor(*args: Any, **kwargs: Any) -> Quantizer:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            for key, value in bound.arguments.items():
                _check_annotated(name, sig.parameters[key], value)
            spec = Spec(name, tuple((k, _freeze(v)) for k, v in bound.arguments.items()))
            return from_spec(spec)

        constructor.__signature__ = sig
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = Method(constructor, None)
        constructor._build = fn  # the undecorated constructor, used by from_spec
        constructor._signature = sig
        return constructor

    return decorate


def register_budget(name: str) -> Callable[[Callable[..., Quantizer]], Callable[..., Quantizer]]:
    """Registers the budget solver of method ``name`` (see :func:`qetjax.for_budget`).

    A solver is ``(shape, bits_per_element, **options) -> Quantizer``.
    """

    def decorate(fn: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        if name not in METHODS:
            raise ValueError(f"register method {name!r} before its budget solver")
        METHODS[name] = METHODS[name]._replace(budget=fn)
        return fn

    return decorate


def from_spec(spec: Spec) -> Quantizer:
    """Rebuilds the quantizer described by ``spec`` (cached: same spec, same object)."""
    return _build(spec, _typed(spec))


def _typed(v: Any) -> Any:
    """``v`` with the type of every value, so ``2``, ``2.0`` and ``True`` are cached apart."""
    if isinstance(v, Spec):
        return v.name, _typed(v.args)
    if isinstance(v, tuple):
        return tuple(_typed(e) for e in v)
    return type(v).__name__, v


@functools.lru_cache(maxsize=None)
def _build(spec: Spec, typed: Any) -> Quantizer:
    """Cached construction; ``typed`` (from :func:`_typed`) keys the cache by type."""
    if spec.name not in METHODS:
        raise ValueError(f"unknown method {spec.name!r}; registered: {sorted(METHODS)}")
    constructor = METHODS[spec.name].constructor
    fn, sig = constructor._build, constructor._signature
    # By keyword where the signature allows, so a spec saved before a parameter existed (it lacks that
    # parameter) still binds each value to its own name; positionally only before a *args.
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    args, kwargs = [], {}
    for key, value in spec.args:
        value = _thaw(value)
        kind = sig.parameters[key].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(dict(value))
        elif kind is inspect.Parameter.POSITIONAL_ONLY or (kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and var_positional):
            args.append(value)
        else:
            kwargs[key] = value
    return fn(*args, **kwargs)._replace(spec=spec)


# --------------------------------------------------------------------------- validation


def check_matrix(x: Any, name: str = "x", ndim: int | None = 2) -> Array:
    """Validates a floating-point array and returns it as a float32 ``jax.Array``.

    Raises:
      TypeError: ``x`` is not an array of a floating dtype (ints and bools are
        rejected, not silently converted).
      ValueError: wrong rank, empty, or (for concrete arrays) NaN/Inf values.
    """
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a floating-point array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer) and not bool(np.isfinite(np.asarray(x, np.float32)).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return jnp.asarray(x, jnp.float32)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """Validates an integer argument in ``[low, high]`` and returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return int(value)


STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def check_storage_dtype(name: str, value: Any) -> str:
    """Validates a float storage dtype (for codebooks, scales, rotations) and returns its name."""
    try:
        dtype = jnp.dtype(value).name
    except TypeError:
        dtype = None
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"{name} must be one of {STORAGE_DTYPES}, got {value!r}")
    return dtype


def check_key(key: Any, name: str = "key") -> Array:
    """Validates a PRNG key: a typed key ``jax.random.key(seed)`` (shape ``()``) or a legacy
    ``uint32[2]`` key from ``jax.random.PRNGKey``; returns it.

    Raises:
      TypeError: anything else (an int seed, ``None``, a string, a float array, a batch of keys).
    """
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jnp.asarray(key)
        desc = f"{key.dtype}{list(key.shape)}"
    else:
        desc = type(key).__name__
    raise TypeError(f"{name} must be one PRNG key such as jax.random.key(0), got {desc}")


SAFE_MAGNITUDE = (2.0**-32, 2.0**32)
"""The largest magnitude of the data :func:`quantize` accepts lies in this range (or the data is
all zeros): far inside float32, so the methods' squares, sums and distances cannot overflow or
underflow. Scale data outside it by a power of two (exact) and scale the decoded result back."""

HALF_SAFE_MAGNITUDE = (2.0**-6, 2.0**14)
"""Data whose largest magnitude lies outside this range is quantized with every float16/bfloat16
storage argument of the quantizer (``*_dtype``) set to ``"float32"``: codebooks, scales and zeros
near or above 65504, or in float16's subnormal range, are kept exactly (and counted in the bits)."""


def _max_magnitude(x: Array) -> float:
    return float(jnp.max(jnp.abs(x))) if not isinstance(x, jax.core.Tracer) else 1.0


def _check_magnitude(x: Array, name: str) -> float:
    m = _max_magnitude(x)
    low, high = SAFE_MAGNITUDE
    if m > high or 0 < m < low:
        raise ValueError(
            f"{name} has largest magnitude {m:.3g}, outside [{low:.3g}, {high:.3g}] (2^-32 to 2^32) where quantizers "
            f"compute without overflow or underflow; multiply {name} by a power of two (exact) and divide the decoded "
            "result by it"
        )
    return m


def _widened_spec(spec: Spec) -> Spec:
    """``spec`` with every float16/bfloat16 storage argument (``*_dtype``) set to float32, recursively."""

    def widen(key: str, v: Any) -> Any:
        if isinstance(v, Spec):
            return _widened_spec(v)
        if isinstance(v, tuple):
            return tuple(widen(key, e) for e in v)
        return "float32" if key.endswith("_dtype") and v in ("float16", "bfloat16") else v

    return Spec(spec.name, tuple((k, widen(k, v)) for k, v in spec.args))


def _half_unsafe(m: float) -> bool:
    return m != 0 and not HALF_SAFE_MAGNITUDE[0] <= m <= HALF_SAFE_MAGNITUDE[1]


def _all_finite(tree: Any) -> bool:
    """Whether every float leaf of ``tree`` is finite (``True`` under tracing, where it cannot be known)."""
    leaves = [a for a in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        return True
    return not leaves or bool(jnp.all(jnp.stack([jnp.isfinite(a).all() for a in leaves])))


def _storage_for(q: Quantizer, m: float) -> Quantizer:
    """``q``, or ``q`` with float32 storage when data of largest magnitude ``m`` needs it."""
    return from_spec(_widened_spec(q.spec)) if _half_unsafe(m) else q


def _run_finite(q: Quantizer, m: float, run: Callable[[Quantizer], Any], name: str) -> tuple[Quantizer, Any]:
    """``run(q)``, redone with float32 storage if it stored a non-finite value; never returns NaN/Inf."""
    out = run(q)
    if _all_finite(out):
        return q, out
    wide = from_spec(_widened_spec(q.spec))
    if wide is not q:
        out = run(wide)
        if _all_finite(out):
            return wide, out
    raise ValueError(
        f"{q.spec.name} cannot hold {name} (largest magnitude {m:.3g}): a stored value is not finite even with float32 "
        f"storage (side information it keeps in float16 holds magnitudes up to 65504); scale {name} by a power of two "
        "towards 1 (exact) and divide the decoded result by it"
    )


# --------------------------------------------------------------------------- quantized arrays


@pytree_dataclass
class QuantizedArray:
    """A quantized matrix: everything needed to decode it, and nothing else.

    Attributes:
      params: shared state from ``fit`` (codebooks, rotations, ...).
      codes: per-data codes and side information from ``encode``.
      spec: the quantizer's spec (static), used to decode.
      shape: the original shape (static).
      dtype: the original dtype name (static); decoding returns this dtype.
      batch_shape: leading batch dimensions for :func:`quantize_batch` (static).
    """

    params: Any
    codes: Any
    spec: Spec = static_field()
    shape: tuple[int, ...] = static_field()
    dtype: str = static_field()
    batch_shape: tuple[int, ...] = static_field(default=())

    @property
    def quantizer(self) -> Quantizer:
        """The quantizer that produced this array."""
        return from_spec(self.spec)

    @property
    def numel(self) -> int:
        """Number of elements of the original array(s)."""
        return int(np.prod(self.batch_shape + self.shape))

    @property
    def bits_per_element(self) -> float:
        """Stored bits divided by the number of original elements."""
        return bits(self)["total"] / self.numel


def _check_quantizer(q: Any) -> None:
    if not isinstance(q, Quantizer):
        raise TypeError(f"q must be a Quantizer, got {type(q).__name__}")
    if q.spec is None:
        raise TypeError("q must be built by a registered constructor (it has no spec)")


def _prepare(q: Quantizer, x: Any) -> tuple[Array, str]:
    _check_quantizer(q)
    # Canonical dtype: float64 input with JAX's default 32-bit mode decodes to float32.
    dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(getattr(x, "dtype", "float32"))).name
    return check_matrix(x), dtype


def _fit_then_encode(q: Quantizer, key: PRNGKey, x: Array) -> tuple[Any, Any]:
    params = q.fit(key, x)
    return params, q.encode(params, x)


_fit_encode = jax.jit(_fit_then_encode, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _encode(q: Quantizer, params: Any, x: Array) -> Any:
    return q.encode(params, x)


@functools.partial(jax.jit, static_argnums=0)
def _decode(q: Quantizer, params: Any, codes: Any) -> Array:
    return q.decode(params, codes)


def quantize(q: Quantizer, key: PRNGKey, x: Any) -> QuantizedArray:
    """Fits ``q`` to the matrix ``x`` and encodes it (jit-compiled).

    Data whose largest magnitude float16 cannot represent with room to spare (outside
    :data:`HALF_SAFE_MAGNITUDE`) is quantized with float32 storage instead of float16/bfloat16
    (the result's spec says so, and the bits count it); a result that would store a NaN or Inf
    is redone that way too, or refused: the decoded array is never NaN for finite input.

    Args:
      q: a quantizer from a registered constructor, e.g. ``qetjax.pq(4, 256)``.
      key: a PRNG key (``jax.random.key``); results are deterministic given it.
      x: a 2-D floating-point array (fp16/bf16 are computed in float32), finite, with largest
        magnitude in :data:`SAFE_MAGNITUDE` (or all zeros).

    Returns:
      A :class:`QuantizedArray`.

    Raises:
      TypeError: ``q`` is not a registered quantizer, ``key`` not a PRNG key, ``x`` not a float array.
      ValueError: ``x`` is not 2-D, empty, holds NaN/Inf or values outside :data:`SAFE_MAGNITUDE`.

    Example:
        >>> qa = quantize(qetjax.pq(4, 16), jax.random.key(0), x)
    """
    x32, dtype = _prepare(q, x)
    key = check_key(key)
    m = _check_magnitude(x32, "x")
    q, (params, codes) = _run_finite(_storage_for(q, m), m, lambda qq: _fit_encode(qq, key, x32), "x")
    return QuantizedArray(params, codes, q.spec, tuple(x32.shape), dtype)


def fit(q: Quantizer, key: PRNGKey, x: Any) -> Any:
    """Fits shared state once (codebooks, rotations) on calibration data ``x``.

    Storage is chosen from ``x`` as in :func:`quantize`; :func:`encode_with` recognises params
    fitted with float32 storage.
    """
    x32, _ = _prepare(q, x)
    key = check_key(key)
    m = _check_magnitude(x32, "x")
    return _run_finite(_storage_for(q, m), m, lambda qq: jax.jit(qq.fit)(key, x32), "x")[1]


@functools.lru_cache(maxsize=256)
def _fit_structure(q: Quantizer, shape: tuple[int, ...]) -> tuple[Any, list]:
    """Treedef and leaves of ``q.fit`` on ``shape``; leaves whose shape depends on the rows have ``None``."""
    fit_on = lambda n: jax.eval_shape(q.fit, jax.random.key(0), jax.ShapeDtypeStruct((n,) + shape[1:], jnp.float32))  # noqa: E731
    want = fit_on(shape[0])
    leaves, treedef = jax.tree_util.tree_flatten(want)
    try:
        rows_free = [w.shape == o.shape for w, o in zip(leaves, jax.tree_util.tree_leaves(fit_on(shape[0] + 1)))]
    except ValueError:  # one more row is not a valid shape (rows are groups of a transposed quantizer)
        rows_free = [False] * len(leaves)
    return treedef, [(w.shape if free else None, w.dtype) for w, free in zip(leaves, rows_free)]


def _params_match(q: Quantizer, params: Any, shape: tuple[int, ...]) -> str | None:
    """``None`` if ``params`` have the structure ``q.fit`` gives on ``shape``, else what differs.

    Shapes that depend on the number of rows (per-row params) are left to the method's own check.
    """
    want_def, want = _fit_structure(q, shape)
    got_leaves, got_def = jax.tree_util.tree_flatten(params)
    if want_def != got_def:
        return f"q.fit gives {want_def}, params are {got_def}"
    for i, ((w_shape, w_dtype), g) in enumerate(zip(want, got_leaves)):
        if not hasattr(g, "shape") or jnp.dtype(g.dtype) != w_dtype or (w_shape is not None and tuple(g.shape) != w_shape):
            got = f"{g.dtype}{list(g.shape)}" if hasattr(g, "shape") else type(g).__name__
            return f"array {i}: q.fit gives {w_dtype}{list(w_shape) if w_shape is not None else ''}, params hold {got}"
    return None


def encode_with(q: Quantizer, params: Any, x: Any) -> QuantizedArray:
    """Encodes new data with already fitted ``params`` (fit once, encode many).

    Raises:
      ValueError: ``params`` do not come from ``q`` (another method or configuration) or were
        fitted on data of another width, or the usual checks of ``x``.

    Example:
        >>> params = fit(q, key, calibration)
        >>> qa = encode_with(q, params, new_rows)
    """
    x32, dtype = _prepare(q, x)
    m = _check_magnitude(x32, "x")
    candidates = [q] + [w for w in [from_spec(_widened_spec(q.spec))] if w is not q]
    mismatch = None
    for qq in candidates:
        mismatch = _params_match(qq, params, tuple(x32.shape))
        if mismatch is None:
            q = qq
            break
    if mismatch is not None:
        raise ValueError(
            f"params do not fit {q.spec.name} on x of shape {tuple(x32.shape)} ({mismatch}); pass the params that "
            "qetjax.fit(q, key, calibration) returned for this q and data of this width"
        )
    codes = _encode(q, params, x32)
    if not _all_finite(codes):
        raise ValueError(
            f"encoding x (largest magnitude {m:.3g}) with these params stores a non-finite value; fit the params on data "
            "of the same range (qetjax.fit chooses float32 storage for it)"
        )
    return QuantizedArray(params, codes, q.spec, tuple(x32.shape), dtype)


def quantize_batch(q: Quantizer, key: PRNGKey, xs: Any) -> QuantizedArray:
    """Quantizes a stack of matrices ``xs[b, n, d]`` in one vmapped call.

    Each matrix gets its own fitted params and the key ``fold_in(key, i)``; storage is chosen
    from the whole stack as in :func:`quantize`.
    """
    _check_quantizer(q)
    x32 = check_matrix(xs, "xs", ndim=3)
    key = check_key(key)
    m = _check_magnitude(x32, "xs")
    dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(xs.dtype)).name
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(xs.shape[0]))
    run = lambda qq: jax.vmap(lambda k, x: _fit_encode(qq, k, x))(keys, x32)  # noqa: E731
    q, (params, codes) = _run_finite(_storage_for(q, m), m, run, "xs")
    return QuantizedArray(params, codes, q.spec, tuple(x32.shape[1:]), dtype, (xs.shape[0],))


def dequantize(qa: QuantizedArray) -> Array:
    """Decodes a :class:`QuantizedArray` to its original shape and dtype.

    A reconstruction beyond the largest finite value of a half-precision original dtype (a
    float16 input near 65504 plus quantization error) saturates at it instead of becoming Inf.
    """
    if not isinstance(qa, QuantizedArray):
        raise TypeError(f"qa must be a QuantizedArray, got {type(qa).__name__}")
    q = qa.quantizer
    decode = functools.partial(_decode, q)
    for _ in qa.batch_shape:
        decode = jax.vmap(decode)
    y = decode(qa.params, qa.codes)
    if jnp.dtype(qa.dtype).itemsize < 4:
        top = float(jnp.finfo(qa.dtype).max)
        y = jnp.clip(y, -top, top)
    return y.astype(qa.dtype)


def _component(path: tuple) -> str:
    names = [p.name for p in path if isinstance(p, jax.tree_util.GetAttrKey)]
    return names[-1] if names else "other"


def bits(qa: QuantizedArray) -> dict[str, int]:
    """Stored bits of every component of ``qa``, and their ``"total"``.

    Counted from the array leaves actually held in ``qa.params`` and
    ``qa.codes`` (size times dtype width), grouped by the name of the field that
    holds them (``codes``, ``codebook``, ``indicators``, ``scales``, ...).
    Static configuration (shape, dtype, spec) is not counted.

    Raises:
      TypeError: ``qa`` is not a :class:`QuantizedArray` (for a tree, use :func:`qetjax.tree.tree_bits`).
    """
    if not isinstance(qa, QuantizedArray):
        raise TypeError(f"qa must be a QuantizedArray, got {type(qa).__name__} (for a tree use qetjax.tree.tree_bits)")
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path((qa.params, qa.codes)):
        name = _component(path)
        counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize * 8
    counts["total"] = sum(counts.values())
    return counts


def stored_bits(q: Quantizer, shape: tuple[int, int]) -> int:
    """Total stored bits of ``q`` on a float32 matrix of ``shape``, without running it.

    Uses ``jax.eval_shape``, so it is exact (the same arrays :func:`bits`
    counts) and cheap (nothing is computed); results are cached per
    ``(q, shape)``.
    """
    if not isinstance(q, Quantizer):
        raise TypeError(f"q must be a Quantizer, got {type(q).__name__}")
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
        raise ValueError(f"shape must be a 2-D shape such as (4096, 512), got {shape!r}")
    sizes = tuple(check_int(f"shape[{i}]", s, 1) for i, s in enumerate(shape))
    return _stored_bits(q, sizes)


@functools.lru_cache(maxsize=4096)
def _stored_bits(q: Quantizer, shape: tuple[int, ...]) -> int:
    """Cached :func:`stored_bits` (budget solvers measure the same candidates often)."""
    out = jax.eval_shape(functools.partial(_fit_then_encode, q), jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    return bits(QuantizedArray(*out, q.spec, shape, "float32"))["total"]
