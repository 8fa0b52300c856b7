"""qetjax.nn: compute-on-codes matmuls equal the decoded product; the three execution modes of a
Flax model give the decode-once outputs (tiny shapes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import nn as qnn
from qetjax.combinators import transposed
from qetjax.models import minilm

W_SHAPE = (48, 40)  # Flax kernel [in, out]: odd-ish sizes, groups of 8/16 along either axis

ON_CODES = {
    "rtn": qetjax.rtn(4, group_size=8),
    "rtn-sym": qetjax.rtn(3, group_size=8, symmetric=True),
    "rtn-sign": qetjax.rtn(1, group_size=8, symmetric=True),
    "rtn-row": qetjax.rtn(2),
    "rtn-tensor": qetjax.rtn(4, granularity="tensor"),
    "pq": qetjax.pq(4, 16),
    "pq-shared": qetjax.pq(4, 16, shared_codebook=True),
    "pq-cqo": qetjax.pq(2, 8, codebook_bits=6),
    "opq": qetjax.opq(4, 16, iters=3),
    "rq": qetjax.rq(2, 8, subvector_dim=8),
    "rq-rows": qetjax.rq(2, 8),
    "lsq": qetjax.lsq(2, 8, train_iters=2),
    "lsq-product": qetjax.lsq(2, 8, train_iters=2, subvector_dim=8),
}


@pytest.fixture(scope="module")
def w():
    return jax.random.normal(jax.random.key(0), W_SHAPE) * 0.1


@pytest.mark.parametrize("name", sorted(ON_CODES))
def test_matmul_on_codes_equals_the_decoded_product(name, w):
    q = ON_CODES[name]
    x = jax.random.normal(jax.random.key(1), (3, 5, W_SHAPE[0]))  # leading axes kept
    layouts = [True] + ([False] if name.startswith("rtn") else [])
    for transpose in layouts:
        qa = qetjax.quantize(transposed(q) if transpose else q, jax.random.key(2), w)
        assert qnn.codes_support(qa) is None
        ref = np.asarray(x @ qetjax.dequantize(qa))
        for fn in (qnn.matmul, jax.jit(qnn.matmul)):
            y = np.asarray(fn(x, qa))
            assert y.shape == (3, 5, W_SHAPE[1])
            np.testing.assert_allclose(y, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
            np.testing.assert_allclose(np.asarray(fn(x, qnn.OnCodes(qa))), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_unsupported_methods_decode_and_say_why(w):
    pvq = qetjax.quantize(transposed(qetjax.pvq(16, 12, 3)), jax.random.key(0), w)
    assert "pvq" in qnn.codes_support(pvq)
    pq_in_out = qetjax.quantize(qetjax.pq(4, 16), jax.random.key(0), w)
    assert "out_in" in qnn.codes_support(pq_in_out)
    x = jnp.ones((2, W_SHAPE[0]))
    for qa in (pvq, pq_in_out):
        np.testing.assert_allclose(np.asarray(qnn.matmul(x, qa)), np.asarray(x @ qetjax.dequantize(qa)), atol=1e-5)
    tree, fallbacks = qnn.on_codes({"a": {"kernel": pvq}, "b": {"kernel": pq_in_out}, "c": {"kernel": w}})
    assert set(fallbacks) == {"a/kernel", "b/kernel"}
    assert tree["c"]["kernel"] is w


def test_bad_input(w):
    qa = qetjax.quantize(transposed(qetjax.rtn(4, group_size=8)), jax.random.key(0), w)
    with pytest.raises(ValueError, match="features"):
        qnn.matmul(jnp.ones((2, W_SHAPE[0] + 1)), qa)
    with pytest.raises(ValueError, match="mode"):
        qnn.matmul(jnp.ones((2, W_SHAPE[0])), qa, mode="fast")


TINY = minilm.MiniLMConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny_minilm():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (3, 7)), jnp.int32)
    mask = jnp.ones((3, 7), jnp.int32).at[2, 4:].set(0)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": jnp.zeros_like(ids)}
    params = minilm.MiniLM(TINY).init(jax.random.key(0), ids, mask, batch["token_type_ids"])["params"]
    return params, batch


def _embed_dense(params, batch):
    hidden, _ = minilm.MiniLM(TINY).apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                          batch["token_type_ids"])
    return minilm.pool(hidden, batch["attention_mask"])


@pytest.mark.parametrize("q", [qetjax.rtn(4, group_size=16), qetjax.pq(2, 16),
                               pytest.param(qetjax.rq(2, 8, subvector_dim=4), marks=pytest.mark.slow),
                               qetjax.pvq(16, 12, 3)], ids=["rtn", "pq", "rq", "pvq"])
def test_minilm_modes_equal_decode_once(tiny_minilm, q):
    params, batch = tiny_minilm
    qtree = qetjax.quantize_tree(jax.random.key(1), params, [(r"encoder/.*kernel$", q)], layout="out_in", progress=False)
    once = _embed_dense(qetjax.dequantize_tree(qtree), batch)
    embed = functools.partial(qnn.minilm_embed, config=TINY)
    np.testing.assert_allclose(np.asarray(embed(params, **batch)), np.asarray(_embed_dense(params, batch)), atol=1e-6)
    per_layer = jax.jit(embed)(qtree, **batch)
    np.testing.assert_allclose(np.asarray(per_layer), np.asarray(once), atol=1e-5)
    coded, fallbacks = qnn.on_codes(qtree)
    assert bool(fallbacks) == (q.spec.name == "pvq")  # PVQ falls back to per-layer decode
    with qnn.intercept():
        on_codes = jax.jit(embed)(coded, **batch)
    np.testing.assert_allclose(np.asarray(on_codes), np.asarray(once), atol=1e-5)
    with pytest.raises(ValueError, match="differ in structure"):
        qnn.stack_minilm_layers({"encoder": {"layer_0": qtree["encoder"]["layer_0"], "layer_1": params["encoder"]["layer_1"]}})


def test_llama_codes_mode_equals_decode_once():
    llama = pytest.importorskip("qetjax.models.llama")
    try:
        _, full, _ = llama.load_pretrained()
    except ImportError as err:
        pytest.skip(str(err))
    small = llama.first_layers(full, 1)
    flat = llama.unstack_layers(small)
    q = qetjax.rtn(4, group_size=64)
    qtree = llama.stack_layers(qetjax.quantize_tree(jax.random.key(0), flat, [(r"layer_\d+/.*/kernel$", q)],
                                                    layout="out_in", progress=False))
    ids = jnp.asarray([[1, 20, 300, 4000, 5, 60]], jnp.int32)
    once = llama.logits(llama.stack_layers(qetjax.dequantize_tree(llama.unstack_layers(qtree))), ids)
    coded, fallbacks = qnn.on_codes(qtree)
    assert not fallbacks and isinstance(coded["layers"]["q_proj"]["kernel"], qnn.OnCodes)
    with qnn.intercept():
        out = jax.jit(llama.logits)(coded, ids)
        tokens = llama.generate(coded, ids, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(once), atol=1e-3 * float(jnp.abs(once).max()))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(llama.generate(qtree, ids, 3)))
