"""Rate-distortion curves: hulls, readings at a budget, the reference lines, the plot and ``--curves``."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qetjax
from qetjax import cli
from qetjax.bench import curves
from qetjax.bench.curves import OperatingPoint


def _points(pairs):
    return [OperatingPoint("m", f"c{i}", float(b), float(m), -10 * math.log10(m)) for i, (b, m) in enumerate(pairs)]


def _envelope(hull, b):
    xs = [p.bits_per_element for p in hull]
    return float(np.interp(b, xs, [p.mse for p in hull]))


def test_hull_of_a_hand_example():
    pts = _points([(1, 0.5), (2, 0.2), (2, 0.3), (3, 0.15), (4, 0.02), (5, 0.03), (2.5, 0.4)])
    hull = curves.lower_convex_hull(pts)
    # (3, 0.15) lies above the chord from (2, 0.2) to (4, 0.02); (5, 0.03) is worse than (4, 0.02)
    assert [(p.bits_per_element, p.mse) for p in hull] == [(1, 0.5), (2, 0.2), (4, 0.02)]


@given(st.lists(st.tuples(st.floats(1, 5), st.floats(1e-4, 1)), min_size=1, max_size=25))
def test_hull_is_convex_decreasing_and_below_every_point(pairs):
    pts = _points(pairs)
    hull = curves.lower_convex_hull(pts)
    assert set(hull) <= set(pts)
    b = [p.bits_per_element for p in hull]
    m = [p.mse for p in hull]
    assert all(x < y for x, y in zip(b, b[1:])) and all(x > y for x, y in zip(m, m[1:]))
    slopes = [(m[i + 1] - m[i]) / (b[i + 1] - b[i]) for i in range(len(b) - 1)]
    assert all(s1 <= s2 + 1e-9 for s1, s2 in zip(slopes, slopes[1:]))  # convex
    for p in pts:  # nothing measured, nor any mix of two points, lies below the hull
        if p.bits_per_element >= b[0]:
            assert p.mse >= _envelope(hull, p.bits_per_element) - 1e-12
    for p, q in zip(pts, pts[::-1]):
        for w in (0.25, 0.5):
            bits = (1 - w) * p.bits_per_element + w * q.bits_per_element
            if bits >= b[0]:
                assert (1 - w) * p.mse + w * q.mse >= _envelope(hull, bits) - 1e-12
    assert hull[0].bits_per_element == min(x[0] for x in pairs)  # the cheapest point always starts it


def test_best_at_budget_interpolates_mse_between_hull_points():
    hull = curves.lower_convex_hull(_points([(2, 0.1), (4, 0.01)]))
    r = curves.best_at_budget(hull, 3.0)
    assert r.sqnr_db == pytest.approx(-10 * math.log10(0.055)) and r.best_point.bits_per_element == 2
    assert math.isnan(curves.best_at_budget(hull, 1.5).sqnr_db) and curves.best_at_budget(hull, 1.5).best_point is None
    assert curves.best_at_budget(hull, 9.0).sqnr_db == pytest.approx(20.0)
    with pytest.raises(ValueError, match="hull"):
        curves.best_at_budget([], 2.0)


def test_reference_lines():
    assert float(curves.shannon_sqnr_db(1.0)) == pytest.approx(6.0206, abs=1e-4)
    # entropy-coded uniform scalar quantization: pi e / 6 (1.533 dB) under the bound at high rate
    gap = curves.shannon_sqnr_db(np.array([4.0, 5.0])) - curves.ecsq_curve([4.0, 5.0])
    np.testing.assert_allclose(gap, 10 * math.log10(math.pi * math.e / 6), atol=0.01)
    assert 0 < float(curves.shannon_sqnr_db(1.0) - curves.ecsq_curve([1.0])[0]) < 1.53
    rate, mse = curves.ecsq_point(50.0)  # one cell: nothing coded, the variance remains
    assert rate == pytest.approx(0.0, abs=1e-9) and mse == pytest.approx(1.0)


def test_ecsq_point_matches_a_numerical_integral():
    step = 0.7
    x = np.linspace(-12, 12, 2_000_001)
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cell = np.round(x / step)
    mse, rate = 0.0, 0.0
    for c in np.unique(cell):
        sel = cell == c
        p = np.trapezoid(pdf[sel], x[sel])
        if p < 1e-15:
            continue
        mean = np.trapezoid(x[sel] * pdf[sel], x[sel]) / p
        mse += np.trapezoid((x[sel] - mean) ** 2 * pdf[sel], x[sel])
        rate -= p * math.log2(p)
    r, m = curves.ecsq_point(step)
    assert r == pytest.approx(rate, rel=1e-3) and m == pytest.approx(mse, rel=1e-3)


def test_operating_points_plot_and_cli(tmp_path, capsys):
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 64)))
    budgets = [0.01, 2.0, 3.0, 2.0, 4.0]
    pts = curves.operating_points(x, "rtn", budgets)
    specs = {qetjax.for_budget("rtn", x.shape, b).spec for b in budgets[1:]}  # 0.01 fits nothing
    assert len(pts) == len({p.config for p in pts}) == len(specs) == 3  # 2.0 asked twice, measured once
    assert [p.bits_per_element for p in pts] == sorted(p.bits_per_element for p in pts) and pts[-1].bits_per_element <= 4
    for p in pts:
        assert p.sqnr_db == pytest.approx(-10 * math.log10(p.mse / float(np.mean(x * x))), rel=1e-4)
    q = qetjax.for_budget("rtn", x.shape, 4.0)
    assert pts[-1].bits_per_element == qetjax.bits(qetjax.quantize(q, jax.random.key(0), x))["total"] / x.size
    path = curves.plot({"rtn": pts}, str(tmp_path / "rd.png"), title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cli.png"
    assert cli.main(["--quick", "--data", "gaussian", "--methods", "rtn", "lloyd_max", "--bits", "2", "3",
                     "--curves", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Best at budget" in text and "| lloyd_max | 3 |" in text and out.stat().st_size > 1000
