"""Tests of qetjax.budget: for_budget's checks and largest_fitting's binary search."""

import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qetjax
from qetjax import budget, core


def sized(num_bits: int) -> core.Quantizer:
    """An ad-hoc quantizer storing exactly ``num_bits`` bits (whole bytes) whatever the shape."""
    assert num_bits % 8 == 0
    fit = lambda key, x: jnp.zeros(num_bits // 8, jnp.uint8)  # noqa: E731
    return core.Quantizer(fit, lambda params, x: (), lambda params, codes: None)


def linear_scan(size, values, limit):
    fitting = [v for v in values if size(v) <= limit]
    return max(fitting) if fitting else None


@given(
    values=st.lists(st.integers(1, 500), min_size=1, max_size=40, unique=True).map(sorted),
    slope=st.integers(1, 5),
    budget_bits=st.integers(1, 4000),
)
def test_largest_fitting_equals_linear_scan(values, slope, budget_bits):
    shape = (4, 8)  # 32 elements
    size = lambda v: 8 * (slope * v + 3)  # noqa: E731  (increasing in v)
    limit = budget_bits / 32
    best = linear_scan(size, values, budget_bits)
    made = []

    def make(v):
        made.append(v)
        return sized(size(v))

    if best is None:
        with pytest.raises(ValueError, match="too small"):
            budget.largest_fitting(make, values, shape, limit)
        return
    q = budget.largest_fitting(make, values, shape, limit)
    assert core.stored_bits(q, shape) == size(best) <= budget_bits
    # Binary search: O(log n) sizes measured, not a scan.
    assert len(made) <= 3 + len(values).bit_length()


def test_largest_fitting_exact_boundary_and_top():
    shape = (2, 4)
    values = list(range(1, 101))
    make = lambda v: sized(8 * v)  # noqa: E731
    assert core.stored_bits(budget.largest_fitting(make, values, shape, 8 * 37 / 8), shape) == 8 * 37
    assert core.stored_bits(budget.largest_fitting(make, values, shape, (8 * 37 - 1) / 8), shape) == 8 * 36
    assert core.stored_bits(budget.largest_fitting(make, values, shape, 1e9), shape) == 8 * 100
    assert core.stored_bits(budget.largest_fitting(make, values, shape, 1.0), shape) == 8
    with pytest.raises(ValueError, match="too small"):
        budget.largest_fitting(make, values, shape, 0.99)
    with pytest.raises(ValueError, match="values must not be empty"):
        budget.largest_fitting(make, [], shape, 1.0)


def test_for_budget_pq_is_the_largest_fitting():
    shape, bpe = (32, 8), 3.0
    q = qetjax.for_budget("pq", shape, bpe, subvector_dim=2, iters=3)
    args = dict(q.spec.args)
    assert q.spec.name == "pq" and args["subvector_dim"] == 2 and args["iters"] == 3
    k = args["num_centroids"]
    limit = bpe * shape[0] * shape[1]
    assert qetjax.stored_bits(q, shape) <= limit
    assert qetjax.stored_bits(qetjax.pq(2, k + 1, iters=3), shape) > limit
    assert budget.budget_bits(shape, bpe) == limit


def test_for_budget_too_small():
    with pytest.raises(ValueError, match="too small"):
        qetjax.for_budget("pq", (8, 4), 0.01, subvector_dim=2)


def test_for_budget_unknown_method():
    with pytest.raises(ValueError, match="method must be one of .*'pq'.*got 'nope'"):
        qetjax.for_budget("nope", (8, 4), 2.0)
    # A registered method without a budget solver is not offered either.
    assert core.METHODS["residual"].budget is None
    with pytest.raises(ValueError, match="got 'residual'"):
        qetjax.for_budget("residual", (8, 4), 2.0)


@pytest.mark.parametrize("bpe", [0, -1.0, float("nan")])
def test_for_budget_bad_budget_value(bpe):
    with pytest.raises(ValueError, match="bits_per_element must be > 0"):
        qetjax.for_budget("pq", (8, 4), bpe)


@pytest.mark.parametrize("bpe", ["2", None, True, [2.0]])
def test_for_budget_bad_budget_type(bpe):
    with pytest.raises(TypeError, match="bits_per_element must be a number"):
        qetjax.for_budget("pq", (8, 4), bpe)


@pytest.mark.parametrize("shape", [(8,), (8, 4, 2), (0, 4), (8, 0), (-1, 4), ()])
def test_for_budget_bad_shape(shape):
    with pytest.raises(ValueError, match="shape must be 2-D with positive sizes"):
        qetjax.for_budget("pq", shape, 2.0)
