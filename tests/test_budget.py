"""Tests of qetjax.budget: for_budget's checks and largest_fitting's binary search."""

import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize(
    "bpe, match",
    [(0, "in \\(0, 1024\\]"), (-1.0, "in \\(0, 1024\\]"), (1e30, "in \\(0, 1024\\]"), (float("nan"), "finite"),
     (float("inf"), "finite"), (np.float32("nan"), "finite")],
)
def test_for_budget_bad_budget_value(bpe, match):
    with pytest.raises(ValueError, match="bits_per_element must be " + match):
        qetjax.for_budget("pq", (8, 4), bpe)


@pytest.mark.parametrize("bpe", ["2", None, True, np.bool_(True), [2.0], np.array([3.0])])
def test_for_budget_bad_budget_type(bpe):
    with pytest.raises(TypeError, match="bits_per_element must be a number"):
        qetjax.for_budget("pq", (8, 4), bpe)


@pytest.mark.parametrize("bpe", [np.float32(3), np.float64(3), np.int64(3), jnp.float32(3), 3])
def test_for_budget_accepts_numpy_and_jax_scalars(bpe):
    assert qetjax.for_budget("rtn", (8, 32), bpe) is qetjax.for_budget("rtn", (8, 32), 3.0)


@pytest.mark.parametrize("shape", [(8,), (8, 4, 2), (0, 4), (8, 0), (-1, 4), ()])
def test_for_budget_bad_shape(shape):
    with pytest.raises(ValueError, match="shape must be 2-D with positive sizes"):
        qetjax.for_budget("pq", shape, 2.0)


@pytest.mark.parametrize("shape", [(8.5, 4), (8.0, 4), ("8", 4), (True, 4), "84", 8, None])
def test_for_budget_non_integer_shape(shape):
    with pytest.raises(TypeError, match="shape must"):
        qetjax.for_budget("pq", shape, 2.0)
    assert budget.check_shape(np.array([8, 4])) == (8, 4) and budget.check_shape([np.int32(8), 4]) == (8, 4)


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 10**6)), min_size=1, max_size=12),
       st.floats(2.0, 8.0), st.floats(1.0, 9.0))
def test_allocate_meets_the_mean_budget_and_beats_uniform(leaves, mean_bits, reference):
    sens = {f"l{i}": s for i, (s, _) in enumerate(leaves)}
    sizes = {f"l{i}": n for i, (_, n) in enumerate(leaves)}
    b = budget.allocate(sens, sizes, mean_bits, reference)
    total = sum(sizes.values())
    assert set(b) == set(sens) and all(2.0 <= v <= 8.0 for v in b.values())
    assert sum(b[k] * sizes[k] for k in b) <= mean_bits * total * (1 + 1e-9)
    assert sum(b[k] * sizes[k] for k in b) >= mean_bits * total * (1 - 1e-6)  # nothing left unspent
    loss = lambda bits: sum(sens[k] * 4.0 ** (reference - bits[k]) for k in sens)
    assert loss(b) <= loss(dict.fromkeys(sens, mean_bits)) * (1 + 1e-6)


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 10**6)), min_size=1, max_size=12),
       st.floats(2.0, 8.0), st.sampled_from([0.125, 0.25, 0.5, 1.0]))
def test_allocate_on_a_grid_stays_within_the_mean_and_near_the_exact_budgets(leaves, mean_bits, step):
    sens = {f"l{i}": s for i, (s, _) in enumerate(leaves)}
    sizes = {f"l{i}": n for i, (_, n) in enumerate(leaves)}
    exact = budget.allocate(sens, sizes, mean_bits, 3.0)
    b = budget.allocate(sens, sizes, mean_bits, 3.0, step=step)
    total = sum(sizes.values())
    assert all(2.0 <= v <= 8.0 for v in b.values())
    assert all(abs((v - 2.0) / step - round((v - 2.0) / step)) < 1e-6 for v in b.values())  # on the grid
    assert sum(b[k] * sizes[k] for k in b) <= mean_bits * total * (1 + 1e-9)
    assert all(abs(b[k] - exact[k]) <= step + 1e-9 for k in b)  # rounded down, or up by at most one step
    assert sum(b[k] * sizes[k] for k in b) > (mean_bits - step) * total - 1e-6 * total  # at most one step unspent


def test_allocate_follows_the_loss_density_and_checks_input():
    b = budget.allocate({"a": 1e-3, "b": 1e-5}, {"a": 100, "b": 100}, 3.0, 3.0, min_bits=1.0)
    assert b["a"] == pytest.approx(3.0 + np.log(100) / np.log(4) / 2) and b["b"] == pytest.approx(6.0 - b["a"])
    same = budget.allocate({"a": 2e-3, "b": 1e-3}, {"a": 200, "b": 100}, 3.5, 3.0)  # equal loss per element
    assert same == pytest.approx({"a": 3.5, "b": 3.5})
    with pytest.raises(ValueError, match="same"):
        budget.allocate({"a": 1.0}, {"b": 1}, 3.0, 3.0)
    with pytest.raises(ValueError, match="min_bits"):
        budget.allocate({"a": 1.0}, {"a": 1}, 1.0, 3.0)
    with pytest.raises(ValueError, match=">= 0"):
        budget.allocate({"a": -1.0}, {"a": 1}, 3.0, 3.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            budget.allocate({"a": bad}, {"a": 1}, 3.0, 3.0)
        with pytest.raises(ValueError, match="finite"):
            budget.allocate({"a": 1.0}, {"a": 1}, 3.0, bad)
    with pytest.raises(TypeError, match="sizes\\['a'\\] must be an int"):
        budget.allocate({"a": 1.0}, {"a": 1.5}, 3.0, 3.0)
    assert budget.allocate({"a": jnp.float32(1.0)}, {"a": np.int64(4)}, np.float32(3.0), 3) == {"a": 3.0}
    with pytest.raises(ValueError, match="step"):
        budget.allocate({"a": 1.0}, {"a": 1}, 3.0, 3.0, step=0.0)


def _model(sens, stored, choice, reference):
    return sum(sens[k] * 4.0 ** (stored[k][reference] - stored[k][b]) for k, b in choice.items())


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 50),
                          st.lists(st.floats(0.5, 6.0), min_size=1, max_size=5)), min_size=1, max_size=4),
       st.one_of(st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]), st.floats(1.0, 5.0)))
def test_allocate_configs_fits_and_is_no_worse_than_uniform(leaves, mean_bits):
    """Every budget is one of the leaf's own, the stored mean fits, and the modelled loss is at most uniform's."""
    sens = {f"l{i}": s for i, (s, _, _) in enumerate(leaves)}
    sizes = {f"l{i}": n for i, (_, n, _) in enumerate(leaves)}
    # candidate budgets 1..5; stored bits grow with the budget and never exceed it
    stored = {f"l{i}": {float(b): min(float(b), v) for b, v in zip(range(1, 6), sorted(extra + [1.0]))}
              for i, (_, _, extra) in enumerate(leaves)}
    reference = 1.0
    total = sum(sizes.values())
    if sum(min(s.values()) * sizes[k] for k, s in stored.items()) > mean_bits * total:
        with pytest.raises(ValueError, match="cheapest"):
            budget.allocate_configs(sens, stored, sizes, mean_bits, reference)
        return
    b = budget.allocate_configs(sens, stored, sizes, mean_bits, reference)
    assert set(b) == set(sens) and all(b[k] in stored[k] for k in b)
    assert sum(stored[k][b[k]] * sizes[k] for k in b) <= mean_bits * total * (1 + 1e-9)
    if all(mean_bits in s for s in stored.values()):
        uniform = dict.fromkeys(sens, mean_bits)
        if sum(stored[k][mean_bits] * sizes[k] for k in sizes) <= mean_bits * total:
            assert _model(sens, stored, b, reference) <= _model(sens, stored, uniform, reference) * (1 + 1e-9)


def test_allocate_configs_is_exact_on_a_regular_grid_of_equal_leaves():
    """Equal sizes, every leaf's configurations a quarter-bit grid: each upgrade costs the same, the loss is
    convex in the bits, so the greedy choice is optimal: the most sensitive leaves get the most bits."""
    grid = {2.0 + 0.25 * j: 2.0 + 0.25 * j for j in range(9)}
    sens = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125}
    b = budget.allocate_configs(sens, dict.fromkeys(sens, grid), dict.fromkeys(sens, 7), 3.0, 3.0)
    # reverse water-filling: half the sensitivity, half a bit less (log4 2 = 0.5), mean 3.0
    assert b == {"a": 3.75, "b": 3.25, "c": 2.75, "d": 2.25}


def test_allocate_configs_checks_input():
    stored = {"a": {2.0: 1.5, 3.0: 2.5}}
    with pytest.raises(ValueError, match="same"):
        budget.allocate_configs({"a": 1.0}, stored, {"b": 1}, 3.0, 3.0)
    with pytest.raises(ValueError, match="reference_bits=4.0"):
        budget.allocate_configs({"a": 1.0}, stored, {"a": 1}, 3.0, 4.0)
    with pytest.raises(ValueError, match="cheapest.*1.5"):
        budget.allocate_configs({"a": 1.0}, stored, {"a": 1}, 1.0, 3.0)
    with pytest.raises(ValueError, match=">= 0"):
        budget.allocate_configs({"a": -1.0}, stored, {"a": 1}, 3.0, 3.0)
    with pytest.raises(ValueError, match="finite"):
        budget.allocate_configs({"a": float("nan")}, stored, {"a": 1}, 3.0, 3.0)
