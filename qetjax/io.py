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
shape; plain leaves as arrays; the tree's containers (dicts with string keys, lists, tuples,
``None``) as JSON. The file size is therefore ``bits / 8`` plus a small metadata overhead.

On load, each quantized leaf's ``params``/``codes`` pytree structure (the dataclasses and their
static fields) is not read from the file but rebuilt from the spec: the quantizer is rebuilt
with :func:`qetjax.core.from_spec`, its output structure obtained with ``jax.eval_shape`` of
fit + encode on the stored shape, and the stored arrays are unflattened into it after every
leaf's shape and dtype have been checked. A truncated or corrupted file (checksum), an unknown
magic or format version, an unknown method, or arrays that do not match the spec all raise a
``ValueError``; a wrong model is never returned.

Example:
    >>> qetjax.save("model.qet", qtree)
    >>> qtree2 = qetjax.load("model.qet")
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
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


# --------------------------------------------------------------------------- encoding


def _host(x: Any, where: str) -> np.ndarray:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        raise TypeError(f"{where}: typed PRNG key arrays cannot be saved; store jax.random.key_data")
    a = np.asarray(x)
    if a.dtype.hasobject:
        raise TypeError(f"{where}: cannot save a leaf of type {type(x).__name__}")
    return np.ascontiguousarray(a)


def _record(leaf: Any, where: str) -> dict:
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
    """The file contents :func:`save` writes for ``tree`` (header and payload)."""
    records: list = []
    structure = _encode_tree(tree, records, "")
    payload = serialization.msgpack_serialize({"structure": json.dumps(structure), "leaves": records})
    return _HEADER.pack(MAGIC, FORMAT_VERSION, hashlib.sha256(payload).digest(), len(payload)) + payload


def save(path: str | os.PathLike, tree: Any) -> int:
    """Writes ``tree`` (quantized or not) to ``path`` atomically; returns the file size in bytes.

    Args:
      path: destination file.
      tree: nested dicts (string keys), lists and tuples of arrays and
        :class:`~qetjax.core.QuantizedArray` (e.g. from :func:`qetjax.quantize_tree`).

    Raises:
      TypeError: a leaf that is not an array, or a non-string dict key.

    Example:
        >>> save("minilm-4bit.qet", qtree)
    """
    data = to_bytes(tree)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".qetjax-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(data)


# --------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=None)
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


def _device(a: np.ndarray) -> Any:
    """``a`` as a jax array when jax holds its dtype exactly (no x64 downcast), else as is."""
    return jnp.asarray(a) if jax.dtypes.canonicalize_dtype(a.dtype) == a.dtype else a


def _unflatten(expected: Any, arrays: list, where: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(expected)
    if not isinstance(arrays, list) or len(arrays) != len(leaves):
        got = len(arrays) if isinstance(arrays, list) else type(arrays).__name__
        raise ValueError(f"{where}: the spec expects {len(leaves)} arrays, the file holds {got}")
    for i, (want, got) in enumerate(zip(leaves, arrays)):
        if not isinstance(got, np.ndarray) or got.shape != want.shape or got.dtype != want.dtype:
            desc = f"{got.dtype}{list(got.shape)}" if isinstance(got, np.ndarray) else type(got).__name__
            raise ValueError(f"{where}[{i}]: expected {want.dtype}{list(want.shape)} from the spec, got {desc}")
    return jax.tree_util.tree_unflatten(treedef, [_device(a) for a in arrays])


def _leaf(record: Any, where: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: malformed leaf record")
    if "array" in record:
        return _device(record["array"])
    try:
        meta = json.loads(record["meta"])
        spec = Spec.from_json(meta["spec"])
        shape, batch_shape = tuple(meta["shape"]), tuple(meta["batch_shape"])
        expected = _expected(spec, shape, batch_shape)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    except Exception as err:  # a spec this version cannot rebuild (changed arguments, ...)
        raise ValueError(f"{where}: cannot rebuild the quantizer from the stored spec: {err!r}") from err
    params = _unflatten(expected[0], record.get("params"), f"{where}.params")
    codes = _unflatten(expected[1], record.get("codes"), f"{where}.codes")
    return QuantizedArray(params, codes, spec, shape, meta["dtype"], batch_shape)


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
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"file payload is malformed: {err!r}") from err
    try:
        return _decode_tree(structure, records, "")
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(f"file payload is malformed: {err!r}") from err


def load(path: str | os.PathLike) -> Any:
    """Reads a tree written by :func:`save`.

    Quantized leaves come back as :class:`~qetjax.core.QuantizedArray` with bit-identical
    params and codes; plain leaves as arrays of their saved dtype; dicts, lists and tuples as
    such (Mappings such as ``FrozenDict`` come back as ``dict``).

    Raises:
      ValueError: truncated or corrupted file, bad magic, unknown format version, unknown
        method, or stored arrays that do not match their spec.

    Example:
        >>> qtree = load("minilm-4bit.qet")
    """
    with open(path, "rb") as f:
        return from_bytes(f.read())
