"""Tests of qetjax.rq: stages and beam search never worse, bits formula, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax.core import stored_bits
from qetjax.methods.rq import rq
from qetjax.packing import code_width

KEY = jax.random.key(0)
N, W, K = 512, 8, 16
X = jax.random.normal(jax.random.key(3), (N, W))


def run(q, x=X, key=KEY):
    qa = qetjax.quantize(q, key, x)
    return qa, jnp.sum((qetjax.dequantize(qa) - x) ** 2, axis=1)


@pytest.mark.parametrize("train, stages", [("progressive", (1, 2, 3)), ("kmeans", (1, 3))])
def test_more_stages_never_worse_on_training_data(train, stages):
    errors = [float(run(rq(m, K, codebook_dtype="float32", train=train))[1].mean()) for m in stages]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] < float(jnp.mean(jnp.sum(X**2, axis=1)))


def test_beam_never_worse_than_greedy_per_row_two_stages():
    # With two stages the greedy path stays in the beam, so every row is at least as good.
    q1, q4 = rq(2, K, beam_size=1), rq(2, K, beam_size=4)
    qa = qetjax.quantize(q1, KEY, X)
    greedy = jnp.sum((q1.decode(qa.params, q1.encode(qa.params, X)) - X) ** 2, axis=1)
    beam = jnp.sum((q4.decode(qa.params, q4.encode(qa.params, X)) - X) ** 2, axis=1)
    assert bool(jnp.all(beam <= greedy + 1e-5))


def test_beam_encoding_not_worse_on_average_more_stages():
    # Same codebooks. (Codebooks *trained* with a beam, as faiss does, need not
    # beat greedy-trained ones on the training data; faiss's do not either.)
    q1, q8 = rq(4, K, beam_size=1), rq(4, K, beam_size=8)
    params = q1.fit(KEY, X)
    greedy = jnp.sum((q1.decode(params, q1.encode(params, X)) - X) ** 2, axis=1)
    beam = jnp.sum((q8.decode(params, q8.encode(params, X)) - X) ** 2, axis=1)
    assert float(beam.mean()) <= float(greedy.mean())


def test_beam_matches_exhaustive_search_when_beam_covers_all():
    # beam_size = K with two stages keeps every first-stage choice: exact optimum.
    q = rq(2, 4, beam_size=4)
    x = X[:64]
    qa = qetjax.quantize(q, KEY, x)
    cb = qa.params.values()[:, 0]  # [2, 4, W]
    sums = cb[0][:, None, :] + cb[1][None, :, :]  # [4, 4, W]
    best = jnp.min(jnp.sum((x[:, None, None, :] - sums[None]) ** 2, -1).reshape(64, -1), axis=1)
    got = jnp.sum((qetjax.dequantize(qa) - x) ** 2, axis=1)
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-5)


def test_refinement_never_worse_on_training_data():
    x = X[:256]
    plain = float(run(rq(3, K, 2, iters=3), x)[1].mean())
    refined = float(run(rq(3, K, 2, iters=3, refine_iters=3), x)[1].mean())
    assert refined <= plain
    assert refined < 0.99 * plain  # on Gaussian data it helps


def test_refinement_solves_the_rank_deficient_least_squares_like_numpy():
    # Each stage's one-hot columns sum to ones, so B is rank deficient; the refinement
    # takes the minimum-norm solution, as numpy's float64 lstsq does.
    from qetjax.methods.rq import _least_squares

    codes = jax.random.randint(jax.random.key(1), (300, 3), 0, 5)
    x = jax.random.normal(jax.random.key(2), (300, 4))
    b = np.zeros((300, 15))
    for m in range(3):
        b[np.arange(300), m * 5 + np.asarray(codes[:, m])] = 1.0
    expect = np.linalg.lstsq(b, np.asarray(x, np.float64), rcond=None)[0].reshape(3, 5, 4)
    np.testing.assert_allclose(_least_squares(x, codes, 5), expect, atol=1e-4)


@pytest.mark.parametrize("d, same_as", [(2, "kmeans"), (4, "progressive")])
def test_auto_training_by_subvector_width(d, same_as):
    x = X[:128]
    auto = rq(1, 4, subvector_dim=d).fit(KEY, x)
    np.testing.assert_array_equal(auto.codebook, rq(1, 4, subvector_dim=d, train=same_as).fit(KEY, x).codebook)


def test_greedy_training_is_the_same_on_all_or_top_beam_entries():
    a = rq(2, K, train_beam="all", iters=2).fit(KEY, X)
    b = rq(2, K, train_beam="top", iters=2).fit(KEY, X)
    np.testing.assert_array_equal(a.codebook, b.codebook)


@pytest.mark.parametrize("beam", [1, 3])
def test_mse_matches_faiss(beam):
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)  # its OpenMP threads spin on a loaded machine
    x = np.asarray(jax.random.normal(jax.random.key(3), (1024, 32))) * np.linspace(0.3, 2, 32, dtype=np.float32)
    ref = faiss.ResidualQuantizer(32, 3, 5)
    ref.max_beam_size = beam
    ref.train(x)
    ref_mse = float(np.mean((ref.decode(ref.compute_codes(x)) - x) ** 2))
    qa = qetjax.quantize(rq(3, 32, beam, codebook_dtype="float32"), KEY, x)
    assert float(jnp.mean((qetjax.dequantize(qa) - x) ** 2)) < 1.02 * ref_mse


@pytest.mark.parametrize("m, k, d, dtype", [(3, 16, None, "float16"), (2, 5, 4, "float32")])
def test_bits_equal_formula(m, k, d, dtype):
    qa, _ = run(rq(m, k, subvector_dim=d, codebook_dtype=dtype))
    s = W // d if d else 1
    cbits = 16 if dtype == "float16" else 32
    codes = -(-N * s * m * code_width(k) // 32) * 32
    assert qetjax.bits(qa)["codes"] == codes
    assert qetjax.bits(qa)["total"] == codes + m * k * W * cbits == stored_bits(qa.quantizer, (N, W))


def test_deterministic_and_jit_matches_eager():
    x = X[:128]
    q = rq(2, 8, beam_size=2, subvector_dim=4, iters=3)
    qa = qetjax.quantize(q, KEY, x)
    a = qetjax.dequantize(qa)
    np.testing.assert_array_equal(a, qetjax.dequantize(qetjax.quantize(q, KEY, x)))
    eager = q.decode(qa.params, q.encode(qa.params, x))  # op-by-op, same params
    np.testing.assert_allclose(a, eager, atol=1e-4)
    params = q.fit(KEY, x)  # eager fit: same objective up to float reassociation
    e_eager = float(jnp.mean((q.decode(params, q.encode(params, x)) - x) ** 2))
    np.testing.assert_allclose(e_eager, float(jnp.mean((a - x) ** 2)), rtol=1e-2)


@pytest.mark.parametrize("shape, budget", [((1536, 384), 3.0), ((384, 384), 2.0), ((256, 96), 4.0)])
def test_budget_picks_the_most_code_bits_that_fit(shape, budget):
    n, w = shape
    limit = budget * n * w
    q = qetjax.for_budget("rq", shape, budget, beam_size=2)
    args = dict(q.spec.args)
    m, k, d = args["num_stages"], args["num_centroids"], args["subvector_dim"] or w
    assert args["beam_size"] == 2
    assert stored_bits(q, shape) <= limit
    assert stored_bits(rq(m + 1, k, subvector_dim=args["subvector_dim"]), shape) > limit

    def size(m, k, d):  # packed codes + float16 codebooks
        return -(-n * (w // d) * m * code_width(k) // 32) * 32 + m * k * w * 16

    fitting = [
        (mm * code_width(kk) / dd, kk)  # code bits per element, then more centroids
        for dd in [2, 4, 8, 16, 32, 64, w]
        if w % dd == 0
        for kk in [16, 32, 64, 128, 256]
        for mm in range(1, 65)
        if size(mm, kk, dd) <= limit
    ]
    assert (m * code_width(k) / d, k) == max(fitting)


def test_budget_keeps_given_options():
    q = qetjax.for_budget("rq", (4096, 64), 2.0, num_centroids=256, subvector_dim=None)
    args = dict(q.spec.args)
    assert (args["num_centroids"], args["subvector_dim"]) == (256, None)
    assert stored_bits(q, (4096, 64)) <= 2 * 4096 * 64
    assert stored_bits(rq(args["num_stages"] + 1, 256), (4096, 64)) > 2 * 4096 * 64
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("rq", (16, 16), 0.5)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(num_stages=0, num_centroids=4), ValueError),
        (dict(num_stages=2, num_centroids=0), ValueError),
        (dict(num_stages=2, num_centroids=4, beam_size=0), ValueError),
        (dict(num_stages=2, num_centroids=4, subvector_dim=0), ValueError),
        (dict(num_stages=2, num_centroids=4, codebook_dtype="int8"), ValueError),
        (dict(num_stages=2.5, num_centroids=4), TypeError),
        (dict(num_stages=2, num_centroids=4, train="lloyd"), ValueError),
        (dict(num_stages=2, num_centroids=4, iters=2.5), TypeError),
        (dict(num_stages=2, num_centroids=4, train_beam="best"), ValueError),
        (dict(num_stages=2, num_centroids=4, progressive_steps=0), ValueError),
        (dict(num_stages=2, num_centroids=4, iters=-1), ValueError),
        (dict(num_stages=2, num_centroids=4, refine_iters=-1), ValueError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        rq(**kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="divide"):
        qetjax.quantize(rq(1, 4, subvector_dim=3), KEY, X)
    with pytest.raises(ValueError, match="num_centroids"):
        qetjax.quantize(rq(1, 1024), KEY, X)
