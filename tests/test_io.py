"""Tests of qetjax.save / qetjax.load."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import io
from qetjax.tree import tree_bits


@pytest.fixture(scope="module")
def qtree():
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "dense": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros(32)},
        "layers": [jax.random.normal(k[1], (32, 16)).astype(jnp.float16), (jnp.arange(5),)],
        "table": jax.random.normal(k[2], (128, 8)),
        "empty": None,
    }
    rules = [(r"dense/kernel$", qetjax.rtn(4)), (r"layers/0", qetjax.rtn(3, group_size=8)), (r"table", qetjax.pq(2, 16, iters=3))]
    return qetjax.quantize_tree(jax.random.key(1), params, rules, progress=False)


def test_round_trip_bit_exact(qtree, tmp_path):
    path = tmp_path / "m.qet"
    size = qetjax.save(path, qtree)
    assert size == path.stat().st_size
    back = qetjax.load(path)
    assert jax.tree.structure(back) == jax.tree.structure(qtree)
    for a, b in zip(jax.tree_util.tree_leaves(qtree), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(back["layers"][1], tuple) and back["empty"] is None
    for a, b in zip(jax.tree_util.tree_leaves(qetjax.dequantize_tree(qtree)), jax.tree_util.tree_leaves(qetjax.dequantize_tree(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_size_matches_bits(qtree, tmp_path):
    size = qetjax.save(tmp_path / "m.qet", qtree)
    payload_bytes = tree_bits(qtree).total_bits / 8
    records = len(jax.tree_util.tree_leaves(qtree, is_leaf=lambda x: isinstance(x, qetjax.QuantizedArray)))
    # Metadata: the 52-byte header, the structure JSON, a JSON spec per quantized leaf, array headers.
    assert payload_bytes <= size <= payload_bytes + 128 + 400 * records


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


@pytest.mark.parametrize("where", [0, 10, 20, 60, -1, -200])
def test_corrupted_rejected(qtree, where):
    data = io.to_bytes(qtree)
    with pytest.raises(ValueError):
        io.from_bytes(_flip(data, where % len(data)))


@pytest.mark.parametrize("keep", [0, 30, 52, 100, -1])
def test_truncated_rejected(qtree, tmp_path, keep):
    data = io.to_bytes(qtree)
    path = tmp_path / "t.qet"
    path.write_bytes(data[: keep % len(data)])
    with pytest.raises(ValueError, match="truncated|magic"):
        qetjax.load(path)


def test_unknown_version_rejected(qtree):
    data = bytearray(io.to_bytes(qtree))
    struct.pack_into("<I", data, 8, 99)
    with pytest.raises(ValueError, match="version 99"):
        io.from_bytes(bytes(data))


def _rewrite(content):
    from flax import serialization
    import hashlib

    payload = serialization.msgpack_serialize(content)
    return io._HEADER.pack(io.MAGIC, io.FORMAT_VERSION, hashlib.sha256(payload).digest(), len(payload)) + payload


def test_mismatched_shape_and_unknown_method_rejected(qtree):
    from flax import serialization

    content = serialization.msgpack_restore(io._payload(io.to_bytes(qtree)))
    rec = next(r for r in content["leaves"] if "meta" in r and '"pq"' in r["meta"])
    rec["codes"][0] = rec["codes"][0][:-1]
    with pytest.raises(ValueError, match="expected uint32"):
        io.from_bytes(_rewrite(content))
    content = serialization.msgpack_restore(io._payload(io.to_bytes(qtree)))
    rec = next(r for r in content["leaves"] if "meta" in r and '"pq"' in r["meta"])
    rec["meta"] = rec["meta"].replace('"pq"', '"no_such_method"')
    with pytest.raises(ValueError, match="unknown method"):
        io.from_bytes(_rewrite(content))


def test_unsaveable_leaf_rejected(tmp_path):
    with pytest.raises(TypeError, match="keys must be strings"):
        qetjax.save(tmp_path / "x.qet", {1: jnp.ones(2)})
    with pytest.raises(TypeError, match="cannot save"):
        qetjax.save(tmp_path / "x.qet", {"a": object()})
