"""The quantized linear path: Flax models run on a quantized parameter tree.

A Flax ``nn.Dense`` whose ``kernel`` leaf is a :class:`~qetjax.core.QuantizedArray` (or an
:class:`OnCodes` wrapper of one) is computed here instead of by Flax: :func:`intercept` is a
``flax.linen.intercept_methods`` interceptor (the mechanism AQT and qwix use to swap a
layer's matmul without rewriting the model), so MiniLM and the Llama decoder run unchanged.
Three execution modes (:data:`MODES`):

1. ``"decode_once"``: ``qetjax.dequantize_tree`` up front; the model runs dense (no memory saved).
2. ``"per_layer"``: layers are stacked and run under ``lax.scan``; each layer's quantized
   leaves are decoded inside the loop body, so the resident weights are the compressed tree
   plus one layer's dense weights (:func:`qetjax.models.llama.run_layers` does this for the
   decoder; :func:`minilm_embed` for MiniLM).
3. ``"codes"``: no dense weight. :func:`on_codes` wraps every kernel whose method can be
   computed on its codes in :class:`OnCodes` (the layer loop leaves it alone) and
   :func:`matmul` then computes ``x @ W`` from the codes:

   - RTN (:func:`qetjax.rtn`, either layout): group-wise partial products of ``x`` with the
     integer codes, scaled after the dot (``y = sum_g s_g (x_g . q_g) + (s_g beta + z_g) sum x_g``);
   - PQ, OPQ (after rotating the input), RQ, LSQ in the ``out_in`` layout
     (``transposed(q)``: one code row per output channel): lookup-table matmul, i.e. per
     subspace (and stage) the table of input . codeword products, then a gather-sum over the
     codes (faiss's ADC, AQLM's CPU kernel).

   Other methods (PVQ, QET, trellis, Lloyd-Max, ...) fall back to mode 2 and
   :func:`on_codes` names them.

Dots run in float32 on the integer codes (no int8/int4 dots: XLA CPU has no fast mixed-integer
dot for float activations, and quantizing the activations would change the results).
Everything is static-shape ``jnp``: it runs as is on GPU/TPU.

Example:
    >>> qtree = qetjax.quantize_tree(key, params, [(r"kernel$", q)], layout="out_in")
    >>> coded, fallbacks = on_codes(qtree)
    >>> with intercept():
    ...     y = minilm_embed(coded, **batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qetjax.combinators import TransformedCodes, TransformedParams
from qetjax.core import QuantizedArray, dequantize
from qetjax.packing import unpack

MODES = ("decode_once", "per_layer", "codes")
CODEBOOK_METHODS = ("pq", "opq", "rq", "lsq")


@jax.tree_util.register_pytree_node_class
class OnCodes:
    """A quantized kernel to be multiplied on its codes, never decoded by the layer loop.

    Its pytree children are the quantized array's own leaves (no
    :class:`~qetjax.core.QuantizedArray` is visible inside it), so code that decodes every
    ``QuantizedArray`` it meets (e.g. :func:`qetjax.models.llama.decode_layer`) passes it
    through, and ``lax.scan`` slices a stacked one layer by layer.

    Attributes:
      qa: the quantized kernel (``[in, out]``).
    """

    def __init__(self, qa: QuantizedArray):
        self.qa = qa

    def tree_flatten(self) -> tuple[list, Any]:
        return jax.tree.flatten(self.qa)

    @classmethod
    def tree_unflatten(cls, treedef: Any, leaves: list) -> "OnCodes":
        return cls(jax.tree.unflatten(treedef, leaves))


def _unwrap(qa: QuantizedArray) -> tuple[str, Any, Any, Any, bool]:
    """``(method, params, codes, spec, transposed)`` of ``qa``, looking through ``transposed``."""
    if qa.spec.name == "transposed":
        p, c = qa.params, qa.codes
        assert isinstance(p, TransformedParams) and isinstance(c, TransformedCodes)
        inner = dict(qa.spec.args)["q"]
        return inner.name, p.inner, c.inner, inner, True
    return qa.spec.name, qa.params, qa.codes, qa.spec, False


def codes_support(qa: QuantizedArray) -> str | None:
    """``None`` if :func:`matmul` computes on ``qa``'s codes, else the reason it decodes instead.

    Example:
        >>> codes_support(qetjax.quantize(qetjax.rtn(4, 32), key, w))  # None: supported
    """
    if not isinstance(qa, QuantizedArray) or qa.batch_shape or len(qa.shape) != 2:
        return "not an unbatched 2-D QuantizedArray"
    name, _, _, _, transposed = _unwrap(qa)
    if name == "rtn":
        return None
    if name in CODEBOOK_METHODS:
        return None if transposed else f"{name} on codes needs the out_in layout (transposed)"
    return f"{name} has no compute-on-codes kernel (decoded per layer)"


# --------------------------------------------------------------------------- kernels


def _rtn_matmul(x: jax.Array, spec: Any, codes: Any, transposed: bool) -> jax.Array:
    """``x @ W`` for an RTN-coded ``W`` (``[in, out]``; coded as ``W.T`` when ``transposed``)."""
    args = dict(spec.args)
    bits, symmetric = args["bits"], args["symmetric"]
    rows, cols = codes.shape
    q = unpack(codes.codes, bits, rows * cols).astype(jnp.float32)
    scales = codes.scales.astype(jnp.float32)
    zeros = jnp.zeros_like(scales) if codes.zeros is None else codes.zeros.astype(jnp.float32)
    if symmetric:
        alpha, beta = (2.0, -1.0) if bits == 1 else (1.0, -float(2 ** (bits - 1) - 1))
    else:
        alpha, beta = 1.0, 0.0
    if scales.shape[0] != rows:  # one scale per tensor: a per-row view of it
        scales, zeros = jnp.broadcast_to(scales, (rows, 1)), jnp.broadcast_to(zeros, (rows, 1))
    groups = scales.shape[1]
    q = q.reshape(rows, groups, cols // groups)
    offset = scales * beta + zeros  # [rows, G]
    if transposed:  # rows = out channels, groups along the input
        xg = x.reshape(x.shape[0], groups, cols // groups)
        partial = jnp.einsum("bgi,ogi->bog", xg, q)
        return jnp.einsum("bog,og->bo", partial, alpha * scales) + xg.sum(-1) @ offset.T
    # rows = input features, groups along the output: scale the input per group instead
    xs = jnp.einsum("bi,ig->big", x, alpha * scales)
    return jnp.einsum("big,igj->bgj", xs, q).reshape(x.shape[0], cols) + jnp.repeat(
        x @ offset, cols // groups, axis=1)


def _lut_matmul(tables: jax.Array, codes: jax.Array) -> jax.Array:
    """``y[b, o] = sum_p tables[b, p, codes[o, p]]``: the gather-sum of lookup-table matmul."""
    b, parts, k = tables.shape
    flat = tables.reshape(b, parts * k)
    index = codes + k * jnp.arange(parts, dtype=jnp.int32)[None, :]
    return jnp.take(flat, index.reshape(-1), axis=1, mode="clip").reshape(b, *codes.shape).sum(-1)


def _codebook_matmul(x: jax.Array, name: str, params: Any, codes: Any, spec: Any) -> jax.Array:
    """``x @ W`` for ``W.T`` coded by PQ / OPQ / RQ / LSQ (one code row per output channel)."""
    if name == "opq":  # rows are coded in the rotated space: W.T = recon @ R.T, so rotate x
        x = x @ params.transform.values()
        params, codes, name = params.inner, codes.inner, "pq"
    b = x.shape[0]
    if name == "pq":
        c = params.values()  # [S or 1, k, d]
        idx = codes.unpacked()  # [out, S]
        d = c.shape[-1]
        xs = x.reshape(b, -1, d)  # [b, S, d]
        tables = jnp.einsum("bsd,skd->bsk", xs, jnp.broadcast_to(c, (xs.shape[1],) + c.shape[1:]))
        return _lut_matmul(tables, idx)
    if name == "rq":
        c = params.values()  # [M, S, k, d]
        idx = codes.unpacked()  # [out, S, M]
        m, s, k, d = c.shape
        tables = jnp.einsum("bsd,mskd->bsmk", x.reshape(b, s, d), c)
        return _lut_matmul(tables.reshape(b, s * m, k), idx.reshape(idx.shape[0], s * m))
    if name == "lsq":
        c = params.values()  # [S*M, k, d]: M additive codebooks in each of the S = in / d subspaces
        k, d = c.shape[1], c.shape[2]
        s = x.shape[1] // d
        tables = jnp.einsum("bsd,smkd->bsmk", x.reshape(b, s, d), c.reshape(s, -1, k, d))
        return _lut_matmul(tables.reshape(b, -1, k), codes.unpacked())
    raise ValueError(f"no lookup-table kernel for {name!r}")


def matmul(x: jax.Array, kernel: Any, mode: str = "codes") -> jax.Array:
    """``x @ kernel`` for a float, :class:`~qetjax.core.QuantizedArray` or :class:`OnCodes` kernel.

    Args:
      x: activations ``[..., in]``.
      kernel: ``[in, out]``: an array, a quantized array or an :class:`OnCodes`.
      mode: ``"codes"`` computes on the codes where :func:`codes_support` allows (else decodes);
        ``"decode"`` always decodes first.

    Returns:
      ``[..., out]`` float32 (the decoded-kernel product up to float rounding).

    Example:
        >>> y = matmul(x, qetjax.quantize(qetjax.transposed(qetjax.pq(4, 16)), key, w))
    """
    if mode not in ("codes", "decode"):
        raise ValueError(f"mode must be 'codes' or 'decode', got {mode!r}")
    qa = kernel.qa if isinstance(kernel, OnCodes) else kernel
    if not isinstance(qa, QuantizedArray):
        return x @ kernel
    if x.shape[-1] != qa.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features but the kernel is {qa.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if mode == "decode" or codes_support(qa) is not None:
        return (x2 @ dequantize(qa).astype(jnp.float32)).reshape(*lead, -1)
    name, params, codes, spec, transposed = _unwrap(qa)
    if name == "rtn":
        y = _rtn_matmul(x2, spec, codes, transposed)
    else:
        y = _codebook_matmul(x2, name, params, codes, spec)
    return y.reshape(*lead, -1)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def on_codes(tree: Any) -> tuple[Any, dict[str, str]]:
    """Wraps every kernel that :func:`matmul` can compute on its codes in :class:`OnCodes`.

    Returns:
      ``(tree, fallbacks)``: the tree, and for each quantized leaf left as it is (decoded per
      layer instead), its path and the reason.

    Example:
        >>> coded, fallbacks = on_codes(qtree)   # fallbacks: {"layers/q_proj/kernel": "pvq has ..."}
    """
    fallbacks: dict[str, str] = {}

    def wrap(path: tuple, leaf: Any) -> Any:
        if not isinstance(leaf, QuantizedArray):
            return leaf
        probe = leaf if not leaf.batch_shape else jax.tree.map(lambda a: a[0], leaf)
        if isinstance(probe, QuantizedArray) and probe.batch_shape:
            probe = QuantizedArray(probe.params, probe.codes, probe.spec, probe.shape, probe.dtype)
        reason = codes_support(probe)
        if reason is None:
            return OnCodes(leaf)
        fallbacks["/".join(str(getattr(p, "key", p)) for p in path)] = reason
        return leaf

    return jax.tree_util.tree_map_with_path(wrap, tree, is_leaf=_is_quantized), fallbacks


def _dense_interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
        return next_fun(*args, **kwargs)
    if not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    if not isinstance(kernel, (QuantizedArray, OnCodes)):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    y = matmul(x, kernel)
    if module.use_bias:
        y = y + module.get_variable("params", "bias")
    return y


@contextlib.contextmanager
def intercept() -> Iterator[None]:
    """Within this context, ``nn.Dense`` layers whose kernel is quantized use :func:`matmul`.

    Trace (``jax.jit``) the model inside the context. Dense layers with float kernels are
    untouched.

    Example:
        >>> with intercept():
        ...     hidden = jax.jit(llama.logits)(coded_params, ids)
    """
    with nn.intercept_methods(_dense_interceptor):
        yield


# --------------------------------------------------------------------------- MiniLM, stacked


def stack_minilm_layers(params: Any) -> Any:
    """MiniLM's ``encoder/layer_i`` trees stacked along a leading axis (quantized leaves too).

    Raises:
      ValueError: the layers' trees differ in structure (e.g. different quantizers per layer).
    """
    layers = params["encoder"]
    names = sorted(layers, key=lambda n: int(n.split("_")[1]))
    trees = [layers[n] for n in names]
    try:
        return jax.tree.map(lambda *a: jnp.stack(a), *trees)
    except ValueError as err:
        raise ValueError(f"the MiniLM layers' trees differ in structure ({err}); use decode_once") from None


def decode_quantized(tree: Any) -> Any:
    """``tree`` with its :class:`~qetjax.core.QuantizedArray` leaves decoded to float32 (``OnCodes`` kept)."""
    return jax.tree.map(lambda x: dequantize(x).astype(jnp.float32) if _is_quantized(x) else x, tree,
                        is_leaf=_is_quantized)


def minilm_embed(params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array, config: Any = None) -> jax.Array:
    """MiniLM sentence embeddings with the layers stacked under ``lax.scan``.

    Equal to :func:`qetjax.models.minilm.embed` (same modules, same parameters). Quantized
    leaves are decoded inside the loop body, one layer at a time (mode 2); :class:`OnCodes`
    kernels stay coded and need :func:`intercept` (mode 3). ``config`` is a
    :class:`~qetjax.models.minilm.MiniLMConfig` (default: all-MiniLM-L6-v2's).

    Example:
        >>> emb = jax.jit(minilm_embed)(qtree, **batch)   # per-layer decode
    """
    from qetjax.models import minilm  # noqa: PLC0415  (models sit beside integration)

    config = minilm.MiniLMConfig() if config is None else config
    x = minilm.Embeddings(config).apply({"params": decode_quantized(params["embeddings"])},
                                        input_ids, token_type_ids)
    layer_module = minilm.TransformerLayer(config)

    def body(h: jax.Array, layer: Any) -> tuple[jax.Array, None]:
        out, _ = layer_module.apply({"params": decode_quantized(layer)}, h, attention_mask, 0, None)
        return out, None

    hidden, _ = jax.lax.scan(body, x, stack_minilm_layers(params))
    return minilm.pool(hidden, attention_mask)
