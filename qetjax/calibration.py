"""Calibration of any Flax model: the inputs of its Dense layers, and GPTQ over its parameter tree.

:func:`dense_inputs` runs the model once (jit-compiled) with ``flax.linen.intercept_methods``
and returns, for each chosen ``nn.Dense`` layer, the rows it was called on, keyed by the path
of its kernel in the parameter tree (``"encoder/layer_0/attention/query/kernel"``), with
padding rows dropped by a mask. :func:`dense_stages` lists the Dense layers in the order the
model calls them, layers called on the same input grouped together (a layer's query, key and
value), without computing anything (``jax.eval_shape``).

:func:`gptq_tree` quantizes chosen kernels of a parameter tree with
:func:`qetjax.gptq.quantize`, stage by stage: the inputs of stage ``i`` are captured on the
model whose kernels of stages ``< i`` are already quantized (sequential GPTQ: each layer
compensates the error of the layers before it). The GPTQ group width is the quantizer's own
:attr:`~qetjax.core.Quantizer.column_group` (PQ's and product LSQ's subvectors included, each
group encoded with its own codebooks: :attr:`~qetjax.core.Quantizer.column_params`).
:func:`gptq_blocks` does the same for a chain of
blocks (a decoder's layers) one block at a time: block ``i`` is calibrated on the outputs of
blocks ``< i`` already quantized, so a model of ``n`` equal layers compiles one block's capture
instead of ``n`` captures of the whole model.

The model is given as a function ``apply(params, batch)`` (or a Flax module, applied as
``module.apply({"params": params}, **batch)``); ``batch`` is any pytree of arrays. Dense layers
must be called outside ``lax.scan``/``vmap`` (a model that scans its layers needs an unrolled
forward for calibration). The function is a static argument of the compiled capture: pass the
same function object each call (not a fresh ``lambda``) to compile once.

Example:
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> apply = lambda p, x: model.apply({"params": p}, x)
    >>> x = jax.random.normal(jax.random.key(1), (256, 8))
    >>> {k: v.shape for k, v in dense_inputs(apply, params, x).items()}
    {'layers_0/kernel': (256, 8), 'layers_2/kernel': (256, 16)}
    >>> policy = {"layers_0/kernel": qetjax.rtn(4, group_size=8), "layers_2/kernel": qetjax.rtn(4, group_size=16)}
    >>> qtree = gptq_tree(jax.random.key(2), params, policy, apply, x, stages=dense_stages(apply, params, x))
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qetjax import gptq, sharding
from qetjax.core import Quantizer, dequantize, from_spec
from qetjax.tree import LAYOUTS, as_transposed, dequantize_tree, leaf_key, path_str

logger = logging.getLogger(__name__)

Apply = Callable[[Any, Any], Any]
Select = str | Callable[[str], bool] | Collection[str] | None


def _as_apply(model: Apply | nn.Module) -> Apply:
    """The function ``(params, batch) -> outputs`` of ``model`` (a module is applied to ``**batch``)."""
    if isinstance(model, nn.Module):
        return _ModuleApply(model)
    if not callable(model):
        raise TypeError(f"apply must be a function (params, batch) -> outputs or a flax Module, got {type(model).__name__}")
    return model


class _ModuleApply:
    """``module.apply({"params": params}, **batch)`` (or ``(batch)`` for an array), hashed by the module's identity
    (modules with list attributes are not hashable)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, params: Any, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return self.module.apply({"params": params}, **batch)
        return self.module.apply({"params": params}, batch)

    def __hash__(self) -> int:
        return id(self.module)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ModuleApply) and other.module is self.module


def _as_select(select: Select) -> Callable[[str], bool]:
    """The path filter: all paths, a regex (``re.search``), a predicate, or a collection of paths."""
    if select is None:
        return _every_path
    if isinstance(select, str):
        try:
            return _Regex(re.compile(select))
        except re.error as err:
            raise ValueError(f"select is not a valid regex {select!r}: {err}") from None
    if callable(select):
        return select
    if isinstance(select, Collection):
        paths = frozenset(select)
        if not all(isinstance(p, str) for p in paths):
            raise TypeError("select as a collection must hold kernel paths (str)")
        return _Paths(paths)
    raise TypeError("select must be None, a regex, a predicate (path) -> bool or a collection of paths, "
                    f"got {type(select).__name__}")


def _every_path(path: str) -> bool:
    return True


class _Paths:
    """Membership in a set of paths, equal by the set's value (one compilation per set, not per object)."""

    def __init__(self, paths: frozenset[str]):
        self.paths = paths

    def __call__(self, path: str) -> bool:
        return path in self.paths

    def __hash__(self) -> int:
        return hash(self.paths)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Paths) and other.paths == self.paths


class _Regex:
    """``re.search(pattern, path)``, hashable by the pattern (one compilation per pattern)."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern

    def __call__(self, path: str) -> bool:
        return self.pattern.search(path) is not None

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Regex) and other.pattern == self.pattern


def _kernel_path(context: Any) -> str:
    return "/".join(context.module.path) + "/kernel"


def _dense_calls(apply: Apply, select: Callable[[str], bool], params: Any, batch: Any) -> list[tuple[str, Any]]:
    """``(kernel path, input)`` of every call of a selected ``nn.Dense`` while ``apply`` runs, in call order."""
    calls = []

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            path = _kernel_path(context)
            if select(path):
                calls.append((path, args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply(params, batch)
    return calls


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(apply: Apply, select: Callable[[str], bool], params: Any, batch: Any) -> dict[str, list[jax.Array]]:
    captured: dict[str, list[jax.Array]] = {}
    for path, x in _dense_calls(apply, select, params, batch):
        captured.setdefault(path, []).append(x)
    return captured


def dense_inputs(apply: Apply | nn.Module, params: Any, batch: Any, *, select: Select = None, mask: Any = None,
                 calls: str = "concat") -> dict[str, np.ndarray]:
    """The inputs of the chosen Dense layers of a model on ``batch``, as ``[rows, in]`` matrices.

    One jit-compiled forward pass (compiled once per ``apply``, ``select`` and input
    structure) records what each ``flax.linen.Dense`` layer is called on.

    Args:
      apply: the model, ``(params, batch) -> outputs``, or a Flax module (applied as
        ``module.apply({"params": params}, **batch)``, or to ``batch`` itself when it is an array).
      params: the parameter tree ``apply`` takes.
      batch: the model's input (any pytree of arrays).
      select: which layers, by kernel path: ``None`` (all), a regex (``re.search``), a predicate
        ``path -> bool`` or a collection of paths.
      mask: optional array of the inputs' leading shape (e.g. ``[batch, seq]`` attention mask):
        rows where it is zero (padding) are dropped.
      calls: for a layer called more than once: ``"concat"`` puts the rows of all calls
        together (one weight, one Hessian); ``"stack"`` returns ``[calls, rows, in]``, one entry
        per call (one function applied to several slices of stacked parameters).

    Returns:
      A dict from kernel path (the module path plus ``"/kernel"``, as in
      :func:`qetjax.tree.path_str` of ``params``) to float32 numpy arrays ``[rows, in]``.

    Raises:
      ValueError: ``mask`` does not match the inputs' leading shape, a bad ``calls``, no layer
        selected, or a Dense layer called inside ``lax.scan``/``vmap``.

    Example:
        >>> inputs = dense_inputs(apply, params, batch, select=r"/mlp/", mask=batch["attention_mask"])
    """
    if calls not in ("concat", "stack"):
        raise ValueError(f"calls must be 'concat' or 'stack', got {calls!r}")
    fn, sel = _as_apply(apply), _as_select(select)
    try:
        captured = _capture(fn, sel, params, batch)
    except jax.errors.UnexpectedTracerError as err:
        raise ValueError("a selected Dense layer is called inside lax.scan, vmap or another transform; "
                         "capture needs a forward pass that calls it directly (unroll the loop)") from err
    if not captured:
        raise ValueError("no selected nn.Dense layer was called (check select and the model)")
    real = None
    if mask is not None:
        real = np.asarray(mask) != 0
    out = {}
    for path in list(captured):
        rows = []
        for x in captured.pop(path):  # each padded capture is freed once its real rows are copied out
            x = np.asarray(x, np.float32)
            if real is not None:
                if x.shape[:-1] != real.shape:
                    raise ValueError(f"mask has shape {real.shape}, but {path} is called on inputs of shape "
                                     f"{x.shape}: the mask must have the inputs' leading shape")
                x = x[real]
            rows.append(x.reshape(-1, x.shape[-1]))
        if len(rows) == 1:
            out[path] = rows[0] if calls == "concat" else rows[0][None]
        else:
            out[path] = np.concatenate(rows) if calls == "concat" else np.stack(rows)
    return out


def dense_stages(apply: Apply | nn.Module, params: Any, batch: Any, *, select: Select = None) -> list[list[str]]:
    """The chosen Dense layers' kernel paths in call order, layers called on the same input in one stage.

    Only traces the model (``jax.eval_shape``); nothing is computed. A layer called more than
    once is placed at its first call. These are the stages of sequential GPTQ
    (:func:`gptq_tree`): each stage's inputs depend only on earlier stages.

    Example:
        >>> dense_stages(apply, params, batch)[:2]
        [['layer_0/query/kernel', 'layer_0/key/kernel', 'layer_0/value/kernel'], ['layer_0/output/kernel']]
    """
    fn, sel = _as_apply(apply), _as_select(select)
    stages: list[list[str]] = []
    seen: set[str] = set()

    def trace(params: Any, batch: Any) -> None:
        last = None
        for path, x in _dense_calls(fn, sel, params, batch):
            if path in seen:
                continue
            seen.add(path)
            if x is last:
                stages[-1].append(path)
            else:
                stages.append([path])
            last = x

    jax.eval_shape(trace, params, batch)
    if not stages:
        raise ValueError("no selected nn.Dense layer was called (check select and the model)")
    return stages


def group_stages(paths: Collection[str], rank: Callable[[str], Hashable]) -> list[list[str]]:
    """``paths`` grouped by ``rank(path)`` (equal ranks share a stage), stages ordered by rank.

    For a model whose stage order is known by name rather than traced (:func:`dense_stages`).
    ``rank`` returns a sortable key, or raises ``ValueError`` for a path it does not know.

    Example:
        >>> group_stages(["b/kernel", "a/kernel", "c/kernel"], {"a/kernel": 0, "b/kernel": 0, "c/kernel": 1}.get)
        [['a/kernel', 'b/kernel'], ['c/kernel']]
    """
    ranks = {p: rank(p) for p in paths}
    missing = sorted(p for p, r in ranks.items() if r is None)
    if missing:
        raise ValueError(f"rank gives no stage for {missing[:3]}")
    stages: dict[Hashable, list[str]] = {}
    for p in sorted(paths, key=lambda p: (ranks[p], p)):
        stages.setdefault(ranks[p], []).append(p)
    return list(stages.values())


def _gptq_quantizer(path: str, q: Any, layout: str) -> tuple[Quantizer, bool]:
    """The column-group quantizer GPTQ runs for the policy's ``q``, and whether it sees the leaf transposed.

    With ``layout="in_out"``, a :func:`~qetjax.combinators.transposed` quantizer is unwrapped:
    GPTQ runs its inner quantizer on the transposed leaf.
    """
    if not isinstance(q, Quantizer) or q.spec is None:
        raise TypeError(f"{path}: the policy must give a Quantizer built by a registered constructor, got {type(q).__name__}")
    flipped = layout == "out_in" or q.spec.name == "transposed"
    inner = from_spec(dict(q.spec.args)["q"]) if layout == "in_out" and flipped else q
    if inner.column_group is None:
        raise ValueError(
            f"{path}: GPTQ needs a quantizer with column groups (Quantizer.column_group: encoding a group of columns "
            f"depends only on those columns, e.g. rtn with a group_size, pvq, pq, product lsq: lsq with a subvector_dim); "
            f"{inner.spec.name} has none here (the budget solvers of rtn, nf and rotated_rtn search only group "
            f"sizes with granularity='group')")
    return inner, flipped


def gptq_tree(key: jax.Array, params: Any, policy: Mapping[str, Quantizer], apply: Apply | nn.Module | None = None,
              batch: Any = None, *, stages: Sequence[Sequence[str]] | None = None, mask: Any = None,
              inputs: Mapping[str, Any] | None = None, layout: str = "out_in", damp: float = 0.01,
              callback: Callable[[int, list[str]], None] | None = None, mesh: Any = None) -> Any:
    """Quantizes the leaves named by ``policy`` with GPTQ, stage by stage, on calibration inputs.

    Stage ``i``'s inputs are captured (:func:`dense_inputs`) on the model whose leaves of stages
    ``< i`` are replaced by their quantized values, so each layer compensates the error of those
    before it. Only the stage's own layers are captured, so the inputs held at once are one
    stage's (the forward pass is compiled once per stage, then cached). Each leaf uses
    ``gptq.quantize(q, leaf_key(key, path), w, x)`` with ``q``'s
    :attr:`~qetjax.core.Quantizer.column_group`; the result is the tree of
    :func:`qetjax.quantize_tree` with the same policy and layout (same leaf structure and
    stored bits), compensated weights encoded instead of the originals.

    Args:
      key: PRNG key; leaf ``p`` uses :func:`qetjax.tree.leaf_key` ``(key, p)``.
      params: the parameter tree.
      policy: kernel path -> quantizer (the paths quantized). With ``layout="out_in"`` (the
        default: GPTQ groups along a layer's inputs) each quantizer sees the Flax kernel
        ``[in, out]`` transposed, as in :func:`qetjax.quantize_tree`; with ``"in_out"`` it sees
        the leaf as stored, so a Flax kernel needs a :func:`~qetjax.combinators.transposed`
        quantizer, and a leaf stored ``[out, in]`` a plain one.
      apply, batch: the model and its calibration input (see :func:`dense_inputs`); needed
        unless ``inputs`` serves a single stage.
      stages: the order, e.g. :func:`dense_stages` or :func:`group_stages`; each policy path in
        exactly one stage. ``None``: one stage, every input from the unquantized model.
      mask: rows to keep (see :func:`dense_inputs`).
      inputs: the unquantized model's inputs by path, when already captured: used for the
        first stage instead of capturing them.
      layout: ``"out_in"`` or ``"in_out"`` (see ``policy``).
      damp: GPTQ's relative Hessian damping.
      callback: called as ``callback(i, stage)`` after each stage is quantized.
      mesh: a ``jax.sharding.Mesh`` (one axis): each leaf's Hessian is accumulated from its
        inputs split over the devices and its rows are compensated and encoded split
        (:func:`qetjax.sharding.gptq_leaf`; a leaf that does not split runs on one device).

    Returns:
      ``params`` with the policy's leaves replaced by :class:`~qetjax.core.QuantizedArray`.

    Raises:
      ValueError: stages that do not partition the policy's paths, a quantizer without column
        groups, inputs whose width does not match, or no way to capture inputs.
      TypeError: a policy value that is not a registered quantizer.

    Example:
        >>> q = qetjax.rtn(4, group_size=128)
        >>> qtree = gptq_tree(key, params, {p: q for p in kernels}, apply, batch, stages=dense_stages(apply, params, batch))
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    unknown = sorted(set(policy) - set(leaves))
    if unknown:
        raise ValueError(f"policy names paths that are not leaves of params: {unknown[:3]}")
    plan = {p: _gptq_quantizer(p, q, layout) for p, q in policy.items()}
    stages = [list(policy)] if stages is None else [list(s) for s in stages]
    flat = [p for s in stages for p in s]
    if len(flat) != len(set(flat)) or set(flat) != set(policy):
        raise ValueError(f"stages must hold each policy path exactly once: repeated "
                         f"{sorted({p for p in flat if flat.count(p) > 1})[:3]}, missing {sorted(set(policy) - set(flat))[:3]}, "
                         f"outside the policy {sorted(set(flat) - set(policy))[:3]}")
    if (len(stages) > 1 or inputs is None) and (apply is None or batch is None):
        raise ValueError("gptq_tree needs apply and batch to capture inputs (or inputs and a single stage)")
    done: dict[str, Any] = {}
    current = params  # the model with the stages done so far decoded
    for i, stage in enumerate(stages):
        if i > 0 or inputs is None:  # this stage's layers only: memory for one stage's inputs, one compilation per stage
            stage_inputs = dense_inputs(apply, current, batch, select=frozenset(stage), mask=mask)
        else:
            stage_inputs = inputs
        for p in stage:
            q, flipped = plan[p]
            w = jnp.asarray(leaves[p])
            w = w.T if flipped else w
            if p not in stage_inputs:
                raise ValueError(f"{p}: no calibration inputs (is it the kernel of an nn.Dense the model calls?)")
            x = stage_inputs[p]
            if np.shape(x)[-1] != w.shape[1]:
                raise ValueError(f"{p}: inputs have {np.shape(x)[-1]} columns, the quantizer sees {tuple(w.shape)} "
                                 "(a Flax kernel [in, out] is quantized as [out, in]: layout='out_in' or transposed(q))")
            if mesh is None:
                qa = gptq.quantize(q, leaf_key(key, p), w, x, damp=damp)
            else:
                qa = sharding.gptq_leaf(q, leaf_key(key, p), w, x, mesh, damp=damp)
            done[p] = as_transposed(qa) if flipped else qa
        logger.info("gptq stage %d/%d done: %s", i + 1, len(stages), stage)
        if callback is not None:
            callback(i, stage)
        if i + 1 < len(stages):
            current = jax.tree_util.tree_map_with_path(
                lambda path, x, stage=frozenset(stage): dequantize(done[path_str(path)]) if path_str(path) in stage else x,
                current)
    return jax.tree_util.tree_map_with_path(lambda path, x: done.get(path_str(path), x), params)


def gptq_blocks(key: jax.Array, params: Mapping[str, Any], policy: Mapping[str, Quantizer], block_apply: Apply,
                x: Any, blocks: Sequence[str], *, mask: Any = None, layout: str = "out_in", damp: float = 0.01,
                callback: Callable[[int, str], None] | None = None, mesh: Any = None) -> dict[str, Any]:
    """Sequential GPTQ over a chain of blocks, one block at a time (GPTQ's layer-by-layer procedure).

    ``x`` is the input of the first block (e.g. a decoder's embedded calibration tokens). Block
    ``blocks[i]`` is quantized by :func:`gptq_tree` on its own inputs, in the stages of
    :func:`dense_stages` (so within a block, too, each stage sees the earlier stages quantized);
    then ``x = block_apply(decoded block, x)`` feeds the next block. Blocks of one structure
    share one compilation of each stage's capture, whatever their number.

    Args:
      key: PRNG key; block ``b`` uses :func:`qetjax.tree.leaf_key` ``(key, b)`` as
        :func:`gptq_tree`'s key.
      params: a mapping holding each block's parameter tree under its name (other entries are
        returned unchanged).
      policy: full path (``"layer_3/q_proj/kernel"``) -> quantizer; every path lies in a block.
      block_apply: ``(block params, x) -> x`` of one block (its Dense layers are captured,
        see :func:`dense_inputs`); pass the same function object each call.
      x: the first block's input (array or pytree); rows where ``mask`` is zero are dropped
        from the captured inputs.
      blocks: the block names in call order.
      mask, layout, damp, mesh: as in :func:`gptq_tree`.
      callback: called as ``callback(i, block)`` after each block is quantized.

    Returns:
      ``params`` (a dict) with the policy's leaves replaced by their
      :class:`~qetjax.core.QuantizedArray`.

    Raises:
      ValueError: a block that is not in ``params``, or a policy path outside every block.

    Example:
        >>> blocks = [f"layer_{i}" for i in range(n)]
        >>> qtree = gptq_blocks(key, flat, policy, llama.LayerApply(config), embedded, blocks)
    """
    missing = [b for b in blocks if b not in params]
    if missing:
        raise ValueError(f"blocks {missing[:3]} are not entries of params (its keys: {sorted(params)[:6]})")
    names = set(blocks)
    outside = sorted(p for p in policy if "/" not in p or p.split("/", 1)[0] not in names)
    if outside:
        raise ValueError(f"policy paths {outside[:3]} lie in no block of {list(blocks)[:3]}...: "
                         "gptq_blocks quantizes only the blocks' leaves (use gptq_tree for the others)")
    step = jax.jit(block_apply)
    out = dict(params)
    for i, block in enumerate(blocks):
        prefix = block + "/"
        sub = {p[len(prefix):]: q for p, q in policy.items() if p.startswith(prefix)}
        if sub:
            stages = dense_stages(block_apply, params[block], x, select=frozenset(sub))
            out[block] = gptq_tree(leaf_key(key, block), params[block], sub, block_apply, x, stages=stages,
                                   mask=mask, layout=layout, damp=damp, mesh=mesh)
        if i + 1 < len(blocks):
            x = step(dequantize_tree(out[block]), x)
        logger.info("gptq block %d/%d done: %s", i + 1, len(blocks), block)
        if callback is not None:
            callback(i, block)
    return out
