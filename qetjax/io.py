"""Saving and loading (quantized) parameter trees as one checksummed msgpack file.

File layout (all integers little-endian)::

    magic    8 bytes   b"\\x89QETJAX\\n"
    version  uint32    FORMAT_VERSION
    sha256   32 bytes  of the payload
    length   uint64    payload size in bytes
    payload  msgpack   {"structure": JSON, "leaves": [record, ...]}

The payload is written with ``flax.serialization.msgpack_serialize``: msgpack is the format of
Flax checkpoints (``flax.serialization.to_bytes``), so the file is readable by any msgpack
library; arrays are stored as raw bytes at their own dtype (packed ``uint32`` codes stay
``uint32``, float16 codebooks stay float16) with only a few bytes of shape/dtype each; and
unlike pickle, loading executes no code from the file. (safetensors would also fit, but holds
only a flat name -> array map; the nested records here map onto msgpack directly.)

What is stored is only the compressed representation: for each
:class:`~qetjax.core.QuantizedArray`, the array leaves of its ``params`` and ``codes`` in
flattening order plus a JSON record of its spec (``Spec.to_json``), shape, dtype and batch
shape; plain leaves as arrays of a dtype in :data:`ARRAY_DTYPES` (shape ``()`` included) or as
Python scalars (``bool``, ``int`` of at most 64 bits, ``float``, ``complex``, ``str``,
``bytes``), which come back as the same Python value; the tree's containers (dicts with string
keys, lists, tuples, ``None``) as JSON. Anything else (numpy string, structured, datetime or
object arrays, arbitrary objects) is refused by :func:`save` with a ``TypeError`` naming its
path, so every file that is written can be read back. The file size is ``bits / 8`` plus a
small metadata overhead.

On load, each quantized leaf's ``params``/``codes`` pytree structure (the dataclasses and their
static fields) is not read from the file but rebuilt from the spec: the quantizer is rebuilt
with :func:`qetjax.core.from_spec`, its output structure obtained with ``jax.eval_shape`` of
fit + encode on the stored shape, and the stored arrays are unflattened into it after every
leaf's shape and dtype have been checked. A truncated or corrupted file (checksum), an unknown
magic or format version, an unknown method, or arrays that do not match the spec all raise a
``ValueError``; a wrong model is never returned.

A checksum proves integrity, not good intent, so before anything is built from a record its
sizes are bounded: every integer of a spec within ``int32``, at most
:data:`MAX_ELEMENTS` original elements per quantized leaf and at most
:data:`MAX_ELEMENTS_PER_STORED_BIT` per bit of the arrays the record actually holds (a 2 KB
record cannot claim a matrix whose decode needs gigabytes), stored dtypes from
:data:`ARRAY_DTYPES`; constructors bound their own tables (e.g. PVQ's enumeration tables).

:func:`save` writes atomically (a temporary file in the destination's directory, flushed with
``fsync``, renamed over the destination): the mode of a new file follows the umask, an
overwritten file keeps its mode, a symlink is followed (its target is replaced, the link stays)
and no temporary file is left behind when saving fails.

A :class:`~qetjax.core.QuantizedArray` also goes through Flax's own serialization
(``flax.serialization.to_bytes`` / ``from_bytes`` with a target of the same quantizer and
shape, e.g. from :func:`qetjax.quantize` on zeros): its state dict is its spec and its params
and codes arrays.

Example:
    >>> qetjax.save("model.qet", qtree)
    >>> qtree2 = qetjax.load("model.qet")
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from qetjax.core import QuantizedArray, Spec, from_spec

MAGIC = b"\x89QETJAX\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sI32sQ")

ARRAY_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "bfloat16",
     "float32", "float64", "complex64", "complex128"]
)
"""Dtypes of the arrays a file may hold (plain leaves, params and codes)."""

FLOAT_DTYPES = frozenset(["float16", "bfloat16", "float32", "float64"])
"""Original dtypes a quantized leaf may decode to."""

MAX_ELEMENTS = 2**31 - 1
"""Most original elements (batch included) one quantized leaf of a file may claim."""

MAX_ELEMENTS_PER_STORED_BIT = 4096
"""Most original elements a quantized leaf may claim per bit of the arrays its record holds
(so at least 1/4096 stored bit per element; every method stores far more)."""

_MAX_RANK = 8
_INT32 = 2**31 - 1
_SCALARS = (bool, int, float, complex, str, bytes)


# --------------------------------------------------------------------------- encoding


def _host(x: Any, where: str) -> np.ndarray:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        raise TypeError(f"{where}: typed PRNG key arrays cannot be saved; store jax.random.key_data")
    if not isinstance(x, (np.ndarray, np.generic, jax.Array)):
        raise TypeError(
            f"{where}: cannot save a leaf of type {type(x).__name__}; leaves must be arrays, QuantizedArrays or "
            "Python bool/int/float/complex/str/bytes"
        )
    a = np.asarray(x)
    if a.dtype.name not in ARRAY_DTYPES:
        raise TypeError(f"{where}: cannot save an array of dtype {a.dtype}; saveable dtypes: {sorted(ARRAY_DTYPES)}")
    return np.require(a, requirements="C")  # keeps shape () (np.ascontiguousarray makes it (1,))


def _record(leaf: Any, where: str) -> dict:
    if isinstance(leaf, _SCALARS):
        if isinstance(leaf, int) and not isinstance(leaf, bool) and not -(2**63) <= leaf < 2**64:
            raise TypeError(f"{where}: cannot save the int {leaf}: Python ints are saved in at most 64 bits")
        return {"value": leaf}
    if not isinstance(leaf, QuantizedArray):
        return {"array": _host(leaf, where)}
    meta = {
        "spec": leaf.spec.to_json(),
        "shape": list(leaf.shape),
        "dtype": leaf.dtype,
        "batch_shape": list(leaf.batch_shape),
    }
    return {
        "meta": json.dumps(meta, sort_keys=True),
        "params": [_host(a, f"{where}.params") for a in jax.tree_util.tree_leaves(leaf.params)],
        "codes": [_host(a, f"{where}.codes") for a in jax.tree_util.tree_leaves(leaf.codes)],
    }


def _encode_tree(tree: Any, records: list, where: str) -> Any:
    """JSON description of ``tree``'s containers; appends one record per leaf to ``records``."""
    if isinstance(tree, Mapping):
        for k in tree:
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be strings to be saved, got {k!r}")
        return {"dict": {k: _encode_tree(v, records, f"{where}/{k}") for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)) and not isinstance(tree, QuantizedArray):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_encode_tree(v, records, f"{where}/{i}") for i, v in enumerate(tree)]}
    if tree is None:
        return {"none": None}
    records.append(_record(tree, where or "/"))
    return {"leaf": len(records) - 1}


def to_bytes(tree: Any) -> bytes:
    """The file contents :func:`save` writes for ``tree`` (header and payload).

    Raises:
      TypeError: a leaf that cannot be saved (see the module docstring), or a non-string dict key.
    """
    records: list = []
    structure = _encode_tree(tree, records, "")
    payload = serialization.msgpack_serialize({"structure": json.dumps(structure), "leaves": records})
    return _HEADER.pack(MAGIC, FORMAT_VERSION, hashlib.sha256(payload).digest(), len(payload)) + payload


def _new_file_mode(path: str) -> int:
    """Permission bits ``open(path, "w")`` would leave: the existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def save(path: str | os.PathLike, tree: Any) -> int:
    """Writes ``tree`` (quantized or not) to ``path`` atomically; returns the file size in bytes.

    The data is written to a temporary file beside the destination, ``fsync``-ed and renamed
    over it, so a reader sees the old file or the new one, never a part. A new file's mode
    follows the umask, an overwritten one keeps its mode, a symlink's target is replaced; if
    anything fails, the temporary file is removed and the destination is untouched.

    Args:
      path: destination file.
      tree: nested dicts (string keys), lists and tuples of arrays,
        :class:`~qetjax.core.QuantizedArray` (e.g. from :func:`qetjax.quantize_tree`) and
        Python scalars or strings.

    Raises:
      TypeError: a leaf that cannot be saved (numpy string/structured/datetime arrays, objects),
        or a non-string dict key; nothing is written.
      FileNotFoundError: the destination's directory does not exist.

    Example:
        >>> save("minilm-4bit.qet", qtree)
    """
    path = os.path.realpath(os.fspath(path))  # through symlinks: replace the target, keep the link
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory; give a file name")
    if not os.path.isdir(os.path.dirname(path)):
        raise FileNotFoundError(f"path {path!r}: its directory does not exist; create it first "
                                f"(os.makedirs({os.path.dirname(path)!r}))")
    data = to_bytes(tree)  # after the path checks: a bad path fails before the tree is serialised
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".qetjax-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))
    return len(data)


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=256)
def _expected(spec: Spec, shape: tuple[int, ...], batch_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """Abstract ``(params, codes)`` the spec's quantizer produces on a float32 ``shape`` matrix."""
    q = from_spec(spec)

    def fit_encode(key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
        params = q.fit(key, x)
        return params, q.encode(params, x)

    for _ in batch_shape:
        fit_encode = jax.vmap(fit_encode)
    keys = jax.ShapeDtypeStruct(batch_shape, jax.random.key(0).dtype)
    return jax.eval_shape(fit_encode, keys, jax.ShapeDtypeStruct(batch_shape + shape, jnp.float32))


def _stored_array(a: Any, where: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{where}: expected an array, the file holds {type(a).__name__}")
    if a.dtype.name not in ARRAY_DTYPES:
        raise ValueError(f"{where}: the file holds an array of dtype {a.dtype}, not one of {sorted(ARRAY_DTYPES)}")
    return a


def _device(a: np.ndarray) -> Any:
    """``a`` as a jax array when jax holds its dtype exactly (no x64 downcast), else as is."""
    return jnp.asarray(a) if jax.dtypes.canonicalize_dtype(a.dtype) == a.dtype else a


def _unflatten(expected: Any, arrays: list, where: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(expected)
    if len(arrays) != len(leaves):
        raise ValueError(f"{where}: the spec expects {len(leaves)} arrays, the file holds {len(arrays)}")
    for i, (want, got) in enumerate(zip(leaves, arrays)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{where}[{i}]: expected {want.dtype}{list(want.shape)} from the spec, got {got.dtype}{list(got.shape)}"
            )
    return jax.tree_util.tree_unflatten(treedef, [_device(a) for a in arrays])


def _sizes(value: Any, name: str, rank: tuple[int, int]) -> tuple[int, ...]:
    if not isinstance(value, list) or not rank[0] <= len(value) <= rank[1]:
        raise ValueError(f"{name} must be a list of {rank[0]}..{rank[1]} sizes, the file holds {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_ELEMENTS for s in value):
        raise ValueError(f"{name} must hold sizes in [1, {MAX_ELEMENTS}], the file holds {value!r}")
    return tuple(value)


def _check_spec_ints(value: Any, where: str) -> None:
    """Every integer of a spec's JSON within int32, before any constructor sees it."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -_INT32 <= value <= _INT32:
        raise ValueError(f"{where}: spec argument {value} is outside the int32 range")
    if isinstance(value, dict):
        for v in value.values():
            _check_spec_ints(v, where)
    if isinstance(value, list):
        for v in value:
            _check_spec_ints(v, where)


def _meta(record: dict, where: str) -> tuple[Spec, tuple[int, ...], str, tuple[int, ...], list, list]:
    """The checked metadata and arrays of a quantized leaf's record, before anything is built."""
    params, codes = record.get("params"), record.get("codes")
    if not isinstance(params, list) or not isinstance(codes, list):
        raise ValueError(f"{where}: malformed quantized leaf record (params/codes are not lists)")
    params = [_stored_array(a, f"{where}.params[{i}]") for i, a in enumerate(params)]
    codes = [_stored_array(a, f"{where}.codes[{i}]") for i, a in enumerate(codes)]
    meta = json.loads(record["meta"])
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: malformed quantized leaf metadata")
    shape = _sizes(meta["shape"], f"{where}: shape", (1, _MAX_RANK))
    batch_shape = _sizes(meta["batch_shape"], f"{where}: batch_shape", (0, _MAX_RANK))
    if meta["dtype"] not in FLOAT_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(FLOAT_DTYPES)}, the file holds {meta['dtype']!r}")
    numel = int(np.prod(batch_shape + shape, dtype=object))
    held = 8 * sum(a.nbytes for a in params + codes)
    if numel > MAX_ELEMENTS or numel > MAX_ELEMENTS_PER_STORED_BIT * held:
        raise ValueError(
            f"{where}: the record claims {numel} elements (shape {list(shape)}, batch {list(batch_shape)}) from "
            f"{held} stored bits; a file may claim at most {MAX_ELEMENTS} elements and "
            f"{MAX_ELEMENTS_PER_STORED_BIT} per stored bit"
        )
    _check_spec_ints(meta["spec"], where)
    return Spec.from_json(meta["spec"]), shape, meta["dtype"], batch_shape, params, codes


def _leaf(record: Any, where: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: malformed leaf record")
    if "value" in record:
        if not isinstance(record["value"], _SCALARS):
            raise ValueError(f"{where}: malformed scalar record")
        return record["value"]
    if "array" in record:
        return _device(_stored_array(record["array"], where))
    spec, shape, dtype, batch_shape, params, codes = _meta(record, where)
    try:
        expected = _expected(spec, shape, batch_shape)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    except Exception as err:  # a spec this version cannot rebuild (changed arguments, ...)
        raise ValueError(f"{where}: cannot rebuild the quantizer from the stored spec: {err!r}") from err
    params = _unflatten(expected[0], params, f"{where}.params")
    codes = _unflatten(expected[1], codes, f"{where}.codes")
    return QuantizedArray(params, codes, spec, shape, dtype, batch_shape)


def _decode_tree(structure: Any, records: list, where: str) -> Any:
    (kind, value), = structure.items()
    if kind == "dict":
        return {k: _decode_tree(v, records, f"{where}/{k}") for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [_decode_tree(v, records, f"{where}/{i}") for i, v in enumerate(value)]
        return items if kind == "list" else tuple(items)
    if kind == "none":
        return None
    if kind == "leaf":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(records):
            raise ValueError(f"{where}: leaf index {value!r} is not one of the file's {len(records)} records")
        return _leaf(records[value], where or "/")
    raise ValueError(f"{where}: unknown container kind {kind!r}")


def _payload(data: bytes) -> bytes:
    if len(data) < _HEADER.size:
        raise ValueError(f"file is truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a qetjax file (bad magic)")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported qetjax file format version {version}; this qetjax reads version {FORMAT_VERSION}")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise ValueError(f"file is truncated or has trailing data: payload is {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("file is corrupted: sha256 checksum of the payload does not match")
    return payload


def from_bytes(data: bytes) -> Any:
    """Inverse of :func:`to_bytes`."""
    try:
        content = serialization.msgpack_restore(_payload(data))
        structure, records = json.loads(content["structure"]), content["leaves"]
        if not isinstance(records, list):
            raise ValueError("file payload is malformed: leaves is not a list")
    except ValueError:
        raise
    except Exception as err:  # msgpack/json/numpy errors on a forged payload with a valid checksum
        raise ValueError(f"file payload is malformed: {err!r}") from err
    try:
        return _decode_tree(structure, records, "")
    except (KeyError, IndexError, TypeError, AttributeError, RecursionError) as err:
        raise ValueError(f"file payload is malformed: {err!r}") from err


def load(path: str | os.PathLike) -> Any:
    """Reads a tree written by :func:`save`.

    Quantized leaves come back as :class:`~qetjax.core.QuantizedArray` with bit-identical
    params and codes; plain array leaves as arrays of their saved dtype and shape (``()``
    included); Python scalars and strings as themselves; dicts, lists and tuples as such
    (Mappings such as ``FrozenDict`` come back as ``dict``).

    Raises:
      ValueError: truncated or corrupted file, bad magic, unknown format version, unknown
        method, stored arrays that do not match their spec, or sizes beyond the limits in the
        module docstring.

    Example:
        >>> qtree = load("minilm-4bit.qet")
    """
    with open(path, "rb") as f:
        return from_bytes(f.read())


# --------------------------------------------------------------------------- flax serialization


def _qa_state_dict(qa: QuantizedArray) -> dict:
    leaves = jax.tree_util.tree_leaves((qa.params, qa.codes))
    return {"spec": json.dumps(qa.spec.to_json(), sort_keys=True),
            "arrays": {str(i): np.asarray(a) for i, a in enumerate(leaves)}}


def _qa_from_state_dict(target: QuantizedArray, state: dict) -> QuantizedArray:
    spec = json.dumps(target.spec.to_json(), sort_keys=True)
    if state.get("spec") != spec:
        raise ValueError(f"the state was saved from the quantizer {state.get('spec')}, the target is {spec}")
    leaves, treedef = jax.tree_util.tree_flatten((target.params, target.codes))
    arrays = state.get("arrays", {})
    if len(arrays) != len(leaves):
        raise ValueError(f"the target holds {len(leaves)} arrays, the state {len(arrays)}")
    restored = []
    for i, want in enumerate(leaves):
        got = np.asarray(arrays[str(i)])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"array {i}: the target is {want.dtype}{list(want.shape)}, the state {got.dtype}{list(got.shape)}")
        restored.append(_device(got))
    params, codes = jax.tree_util.tree_unflatten(treedef, restored)
    return QuantizedArray(params, codes, target.spec, target.shape, target.dtype, target.batch_shape)


serialization.register_serialization_state(QuantizedArray, _qa_state_dict, _qa_from_state_dict)
