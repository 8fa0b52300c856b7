"""Tests of qetjax.save / qetjax.load."""

import json
import os
import stat
import struct

import chex
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
    chex.assert_trees_all_equal(qetjax.dequantize_tree(qtree), qetjax.dequantize_tree(back))


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
    import hashlib

    from flax import serialization

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


@pytest.mark.parametrize(
    "leaf",
    [np.float32(3), jnp.float32(2.0), np.int64(-7), jnp.ones((), jnp.bfloat16), np.zeros((0, 3), np.int8),
     np.arange(6, dtype=np.uint16).reshape(2, 3), jnp.asarray([1 + 2j], jnp.complex64)],
    ids=["np-f32-scalar", "jnp-scalar", "np-i64-scalar", "bf16-scalar", "empty", "u16", "c64"],
)
def test_plain_arrays_keep_shape_dtype_and_values(leaf):
    back = io.from_bytes(io.to_bytes({"a": leaf}))["a"]
    assert back.shape == np.shape(leaf) and back.dtype == np.asarray(leaf).dtype
    np.testing.assert_array_equal(np.asarray(back), np.asarray(leaf))


def test_python_scalars_and_strings_come_back_as_themselves():
    tree = {"name": "layer0", "raw": b"\x00\xff", "n": 3, "big": 2**63, "neg": -(2**63), "x": 0.1, "z": 1j,
            "flag": False, "nested": [("a", 1.5), None]}
    back = io.from_bytes(io.to_bytes(tree))
    assert back == tree
    assert all(type(back[k]) is type(tree[k]) for k in tree)


@pytest.mark.parametrize(
    "leaf, match",
    [(np.array(["a", "b"]), "dtype <U1"), (np.array([1], "datetime64[D]"), "datetime64"),
     (np.zeros(2, [("a", "i4")]), "dtype"), (np.array([None]), "dtype object"), (object(), "type object"),
     (2**64, "64 bits"), (jax.random.key(0), "PRNG key")],
)
def test_unsaveable_leaves_refused_at_save_and_nothing_written(tmp_path, leaf, match):
    path = tmp_path / "x.qet"
    with pytest.raises(TypeError, match=match) as info:
        qetjax.save(path, {"layer": {"w": leaf}})
    assert "/layer/w" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_new_file_mode_follows_umask_and_overwrite_keeps_mode(qtree, tmp_path):
    old = os.umask(0o027)
    try:
        qetjax.save(tmp_path / "a.qet", qtree)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.qet").stat().st_mode) == 0o640
    path = tmp_path / "b.qet"
    path.write_bytes(b"old")
    path.chmod(0o644)
    qetjax.save(path, qtree)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert qetjax.load(path)["empty"] is None


def test_save_through_symlink_replaces_the_target(qtree, tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "m.qet"
    target.write_bytes(b"old")
    link = tmp_path / "link.qet"
    link.symlink_to(target)
    qetjax.save(link, qtree)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == io.to_bytes(qtree)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["m.qet"]


def test_fsync_before_rename_and_no_temp_file_after_a_failed_save(qtree, tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    qetjax.save(tmp_path / "ok.qet", qtree)
    assert calls[:2] == ["fsync", "replace"]

    def fail(fd):
        raise OSError(28, "No space left on device")

    (tmp_path / "old.qet").write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        qetjax.save(tmp_path / "old.qet", qtree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.qet", "old.qet"]
    assert (tmp_path / "old.qet").read_bytes() == b"previous"
    with pytest.raises(IsADirectoryError):
        qetjax.save(tmp_path, qtree)
    with pytest.raises(FileNotFoundError, match=r"directory does not exist; create it first"):
        qetjax.save(tmp_path / "missing" / "new.qet", qtree)
    assert not (tmp_path / "missing").exists()


def _quantized_content(q, shape=(64, 32)):
    from flax import serialization

    qa = qetjax.quantize(q, jax.random.key(0), jax.random.normal(jax.random.key(1), shape))
    return serialization.msgpack_restore(io._payload(io.to_bytes({"w": qa})))


def _forge(content, **meta):
    rec = content["leaves"][0]
    m = json.loads(rec["meta"])
    m.update(meta)
    rec["meta"] = json.dumps(m)
    return _rewrite(content)


@pytest.mark.parametrize(
    "meta, match",
    [({"shape": [2**20, 2**20]}, "at most 2147483647"), ({"shape": [2**14, 2**14]}, "per stored bit"),
     ({"batch_shape": [2**16]}, "per stored bit"), ({"shape": [64, -32]}, "sizes in"), ({"shape": [64.5, 32]}, "sizes in"),
     ({"shape": [1] * 9}, "1..8 sizes"), ({"shape": "64x32"}, "list"), ({"dtype": "int8"}, "dtype must be"),
     ({"spec": {"name": "rtn", "args": [["bits", 2**40]]}}, "int32")],
)
def test_forged_sizes_rejected_before_anything_is_built(meta, match, monkeypatch):
    content = _quantized_content(qetjax.rtn(4))
    monkeypatch.setattr(io, "from_spec", lambda spec: pytest.fail("a quantizer was built"))
    io._expected.cache_clear()
    with pytest.raises(ValueError, match=match):
        io.from_bytes(_forge(content, **meta))


def test_forged_dtypes_and_indices_rejected():
    content = _quantized_content(qetjax.rtn(4))
    content["leaves"][0]["codes"][0] = np.zeros(3, "datetime64[D]")
    with pytest.raises(ValueError, match="not one of"):
        io.from_bytes(_rewrite(content))
    content = _quantized_content(qetjax.rtn(4))
    content["structure"] = json.dumps({"dict": {"w": {"leaf": -1}}})
    with pytest.raises(ValueError, match="leaf index -1"):
        io.from_bytes(_rewrite(content))
    content = _quantized_content(qetjax.rtn(4))
    content["leaves"][0]["params"] = "x"
    with pytest.raises(ValueError, match="not lists"):
        io.from_bytes(_rewrite(content))


def test_flax_serialization_round_trip_and_wrong_target():
    from flax import serialization

    x = jax.random.normal(jax.random.key(0), (32, 16))
    q = qetjax.rtn(3, group_size=8)
    qa = qetjax.quantize(q, jax.random.key(1), x)
    data = serialization.to_bytes({"w": qa, "b": jnp.ones(3)})
    template = {"w": qetjax.quantize(q, jax.random.key(2), jnp.zeros_like(x)), "b": jnp.zeros(3)}
    back = serialization.from_bytes(template, data)
    chex.assert_trees_all_equal(back, {"w": qa, "b": jnp.ones(3)})
    wrong = {"w": qetjax.quantize(qetjax.rtn(4), jax.random.key(2), jnp.zeros_like(x)), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match="quantizer"):
        serialization.from_bytes(wrong, data)


@pytest.mark.parametrize("group, pulses, match", [(4096, 16384, "MAX_TABLE_BYTES"), (1024, 16384, "MAX_TABLE_BYTES"),
                                                  (2**20, 1, "group_size must be in")])
def test_forged_pvq_spec_refused_before_building_tables(group, pulses, match):
    content = _quantized_content(qetjax.rtn(4))
    spec = {"name": "pvq", "args": [["group_size", group], ["pulses", pulses], ["gain_bits", 4]]}
    with pytest.raises(ValueError, match=match):
        io.from_bytes(_forge(content, spec=spec, shape=[1, group]))
