"""Fine-tuning the float side information of a quantized tree with optax, codes fixed.

After the integer codes of a quantized tree are chosen, its continuous parts can still move:
codebooks, scales and zeros, PVQ gain levels and row scales, trellis scales, OPQ/LOPQ rotations
and, optionally, the model's unquantized float leaves (norms, biases). :func:`finetune` trains
them on a loss of the dequantized parameters with an optax optimizer under ``jit`` (AQLM's
global fine-tuning, PV-tuning's continuous step), keeping every integer leaf (packed codes,
indicator maps, rotation seeds) bit-identical:

* the tree is partitioned by hand into trainable float leaves and the frozen rest;
* each trainable leaf is trained as a float32 master copy; the forward pass sees the copy
  rounded to the leaf's stored dtype (a straight-through estimator), so the loss is the loss
  of what will be stored;
* the result holds the trained leaves re-stored at their stored dtypes, so
  :func:`qetjax.bits` is unchanged, and the tree has the structure of the input;
* early stopping: every ``eval_every`` steps the loss is measured on a held-out slice of
  the batches (never trained on); the best state seen, the untuned one included, is returned,
  so the held-out loss never rises.

Ready losses (each a :class:`jax.tree_util.Partial`, so reference arrays travel into ``jit``
as arguments rather than as compiled-in constants):

* :func:`layer_output_loss`: per-layer relative output MSE of linear kernels on captured
  calibration inputs (local; the inputs come from e.g. :func:`qetjax.calibration.dense_inputs`);
* :func:`cosine_loss`: ``1 - cosine`` of sentence embeddings to the reference model's
  (end to end, e.g. MiniLM);
* :func:`kl_loss`: KL divergence of the quantized model's next-token distribution from the
  reference model's (end to end, a causal LLM).

Decoding the tuned tree is what the codes mean under the tuned side information; re-encoding
new data with tuned params (fit once, encode many) is not what they were tuned for (e.g.
Lloyd-Max or PVQ gain levels need not stay sorted).

Example:
    >>> import jax, jax.numpy as jnp, qetjax
    >>> w = jax.random.normal(jax.random.key(0), (256, 16))
    >>> qtree = {"w": qetjax.quantize(qetjax.pq(4, 16), jax.random.key(1), w)}
    >>> x = jax.random.normal(jax.random.key(2), (8, 32, 256))      # 8 batches of inputs
    >>> loss = lambda p, batch: jnp.mean((batch @ p["w"] - batch @ w) ** 2)
    >>> tuned = qetjax.finetune(qtree, loss, x, steps=50, progress=False)
    >>> qetjax.bits(tuned["w"]) == qetjax.bits(qtree["w"])
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from qetjax.core import QuantizedArray, dequantize
from qetjax.tree import path_str

Loss = Callable[[Any, Any], jax.Array]

__all__ = ["cosine_loss", "default_optimizer", "embedding_batches", "finetune", "kl_loss", "layer_batches",
           "layer_output_loss", "stack_batches", "trainable_mask"]


# --------------------------------------------------------------------------- partition


def _is_qa(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _floating(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _wanted(train_unquantized: bool | Callable[[str], bool], path: str) -> bool:
    """Whether the plain (unquantized) leaf at ``path`` is trained."""
    return bool(train_unquantized(path)) if callable(train_unquantized) else bool(train_unquantized)


def trainable_mask(qtree: Any, train_unquantized: bool | Callable[[str], bool] = False) -> Any:
    """A tree of bools of ``qtree``'s structure: ``True`` for the leaves :func:`finetune` trains.

    The floating leaves inside every :class:`~qetjax.core.QuantizedArray` (params and codes),
    and those outside them that ``train_unquantized`` selects (``True``: all; a function of the
    ``/``-joined path: those it accepts); integer leaves never.

    Example:
        >>> trainable_mask({"w": qa, "bias": b})   # {"w": QuantizedArray(mask...), "bias": False}
        >>> trainable_mask({"w": qa, "bias": b}, lambda path: path.endswith("bias"))  # "bias": True
    """

    def one(path: tuple, x: Any) -> Any:
        if _is_qa(x):
            return jax.tree.map(_floating, x)
        return _floating(x) and _wanted(train_unquantized, path_str(path))

    return jax.tree_util.tree_map_with_path(one, qtree, is_leaf=_is_qa)


def default_optimizer(learning_rate: float | optax.Schedule = 1e-3) -> optax.GradientTransformation:
    """Adam with updates relative to each leaf's size: ``optax.chain(scale_by_adam,
    scale_by_param_block_rms, scale_by_learning_rate(learning_rate))``.

    Side information comes at very different scales (PVQ gain levels in ``[0, 1]``, fp16 row
    scales of 1e-2, codebook entries of 1e-1), so each leaf's Adam step is multiplied by the
    RMS of the leaf: ``learning_rate`` is a relative change per step. It may be an optax
    schedule (a function of the step count), e.g. ``optax.cosine_decay_schedule(3e-3, 300)``.

    Raises:
      ValueError: a learning rate that is not a positive finite number or a schedule (callable).

    Example:
        >>> tuned = finetune(qtree, loss, batches, optimizer=default_optimizer(3e-4))
        >>> opt = default_optimizer(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 300))
    """
    if not callable(learning_rate) and not (
            isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
            and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive finite number or an optax schedule, got {learning_rate!r}")
    rate = learning_rate if callable(learning_rate) else float(learning_rate)
    return optax.chain(optax.scale_by_adam(), optax.scale_by_param_block_rms(min_scale=1e-6),
                       optax.scale_by_learning_rate(rate))


# --------------------------------------------------------------------------- batches


def stack_batches(batches: Any) -> Any:
    """Batches as one pytree of numpy arrays with a leading batch axis.

    Accepts a sequence (list or tuple) of batch pytrees of one structure and shape, which are
    stacked, or an already stacked pytree of arrays (returned as numpy arrays).

    Raises:
      ValueError: no batches, leaves without a leading batch axis, batch counts that differ
        between leaves, or batches of different structures or shapes.
    """
    if isinstance(batches, (list, tuple)) and not hasattr(batches, "_fields"):
        if not batches:
            raise ValueError("batches must not be empty")
        first = jax.tree.structure(batches[0])
        for i, b in enumerate(batches):
            if jax.tree.structure(b) != first:
                raise ValueError(f"batches[{i}] has structure {jax.tree.structure(b)}, batches[0] has {first}")
        try:
            return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)
        except ValueError as err:
            raise ValueError(f"batches must have equal shapes leaf by leaf to be stacked: {err}") from None
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("batches must hold at least one array")
    counts = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in counts or len(counts) != 1 or 0 in counts:
        raise ValueError(f"stacked batches need one leading batch axis of equal non-zero length on every leaf, "
                         f"got leading sizes {sorted(counts, key=str)}")
    return jax.tree.map(np.asarray, batches)


def _num_batches(stacked: Any) -> int:
    return int(np.shape(jax.tree.leaves(stacked)[0])[0])


def _take(stacked: Any, index: Any) -> Any:
    return jax.tree.map(lambda x: x[index], stacked)


# --------------------------------------------------------------------------- training


def _restore(master: list, dtypes: list) -> list:
    """The master copies rounded to their stored dtypes (back as float32: exact)."""
    return [m.astype(d).astype(jnp.float32) for m, d in zip(master, dtypes)]


def _straight_through(master: list, dtypes: list) -> list:
    """Forward: the stored (rounded) values; backward: identity to the float32 masters."""
    return [m + jax.lax.stop_gradient(r - m) for m, r in zip(master, _restore(master, dtypes))]


def _merge(treedef: Any, leaves: list, index: tuple, values: list) -> Any:
    out = list(leaves)
    for i, v in zip(index, values):
        out[i] = v
    return jax.tree_util.tree_unflatten(treedef, out)


class _Entry(NamedTuple):
    """One top-level leaf of the tree (a quantized array or a plain leaf) and what of it is trained."""

    treedef: Any  # of the entry's own leaves (a QuantizedArray's spec and shapes are in it)
    leaves: list  # the entry's leaves, trained ones replaced by None
    index: tuple  # positions of the trained leaves
    dtypes: tuple  # their stored dtypes
    quantized: bool


def _decode(master: list, leaves: list, *, treedef: Any, index: tuple, dtypes: tuple) -> jax.Array:
    """The decoded array of a quantized entry, its trained leaves at their stored values (straight through)."""
    return dequantize(_merge(treedef, leaves, index, _straight_through(master, list(dtypes))))


# Each quantized leaf is decoded by its own program, compiled once per quantizer and shape (the
# leaves of a model share a few), rather than all decodes inlined into one training program
# (36 PVQ decodes of MiniLM in one program compile for many minutes).
_decode_jit = jax.jit(_decode, static_argnames=("treedef", "index", "dtypes"))


@functools.partial(jax.jit, static_argnames=("treedef", "index", "dtypes"))
def _decode_vjp(master: list, leaves: list, cotangent: jax.Array, *, treedef: Any, index: tuple,
                dtypes: tuple) -> list:
    fn = functools.partial(_decode, leaves=leaves, treedef=treedef, index=index, dtypes=dtypes)
    return jax.vjp(fn, master)[1](cotangent)[0]


class _Parts(NamedTuple):
    """A quantized entry's decode split in two by partial evaluation, the codes known, the trained floats not.

    ``residuals(fixed)`` runs, once, every step of the decode that depends on the fixed leaves alone
    (unpacking codes, PVQ's big-integer enumeration, rotation signs) and returns its results;
    ``decode(master, residuals)`` and ``vjp(master, residuals, cotangent)`` run the rest, at every step.
    """

    residuals: Callable[[list], list]
    decode: Callable[[list, list], jax.Array]
    vjp: Callable[[list, list, jax.Array], list]


@functools.lru_cache(maxsize=None)
def _parts(treedef: Any, index: tuple, dtypes: tuple, masters: tuple, fixed_def: Any, fixed: tuple) -> _Parts:
    """The :class:`_Parts` of a quantized entry, built once per quantizer, shapes and dtypes (``masters``
    and ``fixed``: ``(shape, dtype)`` of the trained and the fixed leaves; ``fixed_def`` their structure)."""
    from jax._src.interpreters.partial_eval import partial_eval_jaxpr_nounits  # no public equivalent (jax 0.10)
    from jax.extend.core import jaxpr_as_fun

    def fn(master: list, flat: list) -> jax.Array:
        return _decode(master, jax.tree_util.tree_unflatten(fixed_def, flat), treedef=treedef, index=index, dtypes=dtypes)

    shapes = lambda avals: [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]  # noqa: E731
    closed = jax.make_jaxpr(fn)(shapes(masters), shapes(fixed))
    known, unknown, _, _ = partial_eval_jaxpr_nounits(closed, [True] * len(masters) + [False] * len(fixed),
                                                      instantiate=True)
    run_known, run_unknown = jaxpr_as_fun(known), jaxpr_as_fun(unknown)
    rest = lambda master, residuals: run_unknown(*residuals, *master)[0]  # noqa: E731
    return _Parts(jax.jit(lambda flat: run_known(*flat)), jax.jit(rest),
                  jax.jit(lambda master, residuals, g: jax.vjp(lambda m: rest(m, residuals), master)[1](g)[0]))


def _avals(arrays: list) -> tuple:
    return tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in arrays)


class _Decoder(NamedTuple):
    """How one quantized entry is decoded and differentiated during training (cached or not)."""

    entry: _Entry
    parts: _Parts | None = None
    residuals: list | None = None

    @classmethod
    def of(cls, entry: _Entry, master: list, cache: bool) -> "_Decoder":
        if not cache:
            return cls(entry)
        flat, fixed_def = jax.tree_util.tree_flatten(entry.leaves)
        parts = _parts(entry.treedef, entry.index, entry.dtypes, _avals(master), fixed_def, _avals(flat))
        return cls(entry, parts, parts.residuals(flat))

    def value(self, master: list) -> jax.Array:
        e = self.entry
        if self.parts is None:
            return _decode_jit(master, e.leaves, treedef=e.treedef, index=e.index, dtypes=e.dtypes)
        return self.parts.decode(master, self.residuals)

    def grad(self, master: list, cotangent: jax.Array) -> list:
        e = self.entry
        if self.parts is None:
            return _decode_vjp(master, e.leaves, cotangent, treedef=e.treedef, index=e.index, dtypes=e.dtypes)
        return self.parts.vjp(master, self.residuals, cotangent)


@functools.partial(jax.jit, static_argnames="treedef")
def _loss_and_grad(trained: list, fixed: list, loss: Partial, batch: Any, *, treedef: Any) -> tuple:
    def objective(values: list) -> jax.Array:
        return loss(jax.tree_util.tree_unflatten(treedef, [f if v is None else v for v, f in zip(values, fixed)]), batch)

    return jax.value_and_grad(objective)(trained)


@functools.partial(jax.jit, static_argnames="treedef")
def _mean_loss(params: list, loss: Partial, batches: Any, *, treedef: Any) -> jax.Array:
    tree = jax.tree_util.tree_unflatten(treedef, params)
    return jnp.mean(jax.lax.map(lambda b: loss(tree, b), batches))


@functools.partial(jax.jit, static_argnames="optimizer")
def _update(master: list, grads: list, opt_state: Any, *, optimizer: optax.GradientTransformation) -> tuple:
    updates, opt_state = optimizer.update(grads, opt_state, master)
    return optax.apply_updates(master, updates), opt_state


def _entries(qtree: Any, train_unquantized: bool | Callable[[str], bool]
             ) -> tuple[Any, list, list[_Entry], list[list]]:
    """The tree's top-level leaves (quantized arrays whole), their entries and float32 masters."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(qtree, is_leaf=_is_qa)
    tops = [top for _, top in with_paths]
    entries, masters = [], []
    for path, top in with_paths:
        quantized = _is_qa(top)
        leaves, sub = jax.tree_util.tree_flatten(top)
        trained = [_floating(x) and (quantized or _wanted(train_unquantized, path_str(path))) for x in leaves]
        index = tuple(i for i, t in enumerate(trained) if t)
        entries.append(_Entry(sub, [None if t else x for x, t in zip(leaves, trained)], index,
                              tuple(jnp.dtype(leaves[i].dtype).name for i in index), quantized))
        masters.append([jnp.asarray(leaves[i], jnp.float32) for i in index])
    return treedef, tops, entries, masters


def _values(entries: list[_Entry], decoders: list, masters: list[list], fixed: list) -> list:
    """What the model sees of every top-level leaf: trained quantized arrays decoded, trained plain leaves
    rounded to their dtypes, the others from ``fixed`` (decoded once)."""
    out = []
    for e, d, m, top in zip(entries, decoders, masters, fixed):
        if d is not None:
            out.append(d.value(m))
        elif e.index:
            out.append(_restore(m, list(e.dtypes))[0])
        else:
            out.append(top)
    return out


def _grads(entries: list[_Entry], decoders: list, masters: list[list], grads: list) -> list[list]:
    """The gradients of the masters from those of the values the model saw (chain rule through decode)."""
    out = []
    for e, d, m, g in zip(entries, decoders, masters, grads):
        if not e.index:
            out.append([])
        elif d is not None:
            out.append(d.grad(m, g))
        else:
            out.append([g.astype(jnp.float32)])
    return out


def finetune(
    qtree: Any,
    loss: Loss,
    batches: Any,
    optimizer: optax.GradientTransformation | None = None,
    *,
    steps: int = 200,
    held_out: int | None = None,
    eval_every: int = 10,
    patience: int = 5,
    train_unquantized: bool | Callable[[str], bool] = False,
    progress: bool = True,
    callback: Callable[[int, float, float | None], None] | None = None,
    cache_decode: bool = True,
) -> Any:
    """Trains the float side information of ``qtree`` on ``loss``; integer codes stay fixed.

    Args:
      qtree: a pytree holding :class:`~qetjax.core.QuantizedArray` leaves (e.g. from
        :func:`qetjax.quantize_tree`).
      loss: ``loss(params, batch) -> scalar``, the loss of the *dequantized* tree ``params``
        (same structure as :func:`qetjax.dequantize_tree` ``(qtree)``) on one batch; pure and
        jit-able. A :class:`jax.tree_util.Partial` passes its arrays into ``jit`` as arguments
        (the ready losses of this module are such).
      batches: a sequence of batch pytrees of one structure, or one pytree whose leaves stack
        them along a leading axis. The last ``held_out`` batches are never trained on; step
        ``t`` trains on training batch ``t mod count`` (a fixed order: results are
        deterministic).
      optimizer: an optax ``GradientTransformation``; default :func:`default_optimizer` ``()``.
      steps: optimizer steps, >= 0 (fewer when early stopping ends the run).
      held_out: batches set aside for early stopping; default ``count // 8`` (at least one when
        there are two or more batches). ``0`` trains on all batches and returns the last state.
      eval_every: steps between held-out evaluations, >= 1.
      patience: evaluations without a held-out improvement before stopping, >= 1.
      train_unquantized: also train floating leaves outside the quantized arrays, re-stored at
        their dtypes too: ``True`` all of them (norms, biases, unquantized embeddings), or a
        function of a leaf's ``/``-joined path that selects some (e.g. norms and biases only).
      progress: show a tqdm progress bar with the training and held-out losses.
      callback: called as ``callback(step, train_loss, held_out_loss_or_None)`` after every step;
        a true return value stops the run there (e.g. a wall-clock budget), after a last
        held-out evaluation of the current state.
      cache_decode: run the part of each quantized leaf's decode that depends on its integer
        codes alone once, before training, and keep its results (found by partial evaluation
        of the decode, the codes known: unpacked codes, PVQ's enumerated shapes, rotation signs),
        so that each step only recomputes what the trained floats enter. About 4 bytes per
        weight held for the whole run; ``False`` recomputes the whole decode at every step.

    Returns:
      A tree of ``qtree``'s structure: the trained float leaves (of the best held-out
      evaluation, the untuned state included) at their stored dtypes, every other leaf as given;
      stored bits are unchanged.

    Raises:
      TypeError: ``loss`` not callable, ``optimizer`` not an optax transformation.
      ValueError: nothing to train, bad ``steps``/``held_out``/``eval_every``/``patience``,
        malformed batches, a non-finite loss (lower the learning rate), or trained values the
        stored dtype cannot hold (float16 beyond 65504).

    Example:
        >>> from qetjax.finetune import cosine_loss
        >>> tuned = qetjax.finetune(qtree, cosine_loss(embed), batches, steps=300, held_out=4)
    """
    if not callable(loss):
        raise TypeError(f"loss must be a function (params, batch) -> scalar, got {type(loss).__name__}")
    optimizer = default_optimizer() if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    steps = _check_count("steps", steps, 0)
    eval_every = _check_count("eval_every", eval_every, 1)
    patience = _check_count("patience", patience, 1)
    stacked = stack_batches(batches)
    count = _num_batches(stacked)
    held_out = (count // 8 or (1 if count >= 2 else 0)) if held_out is None else _check_count("held_out", held_out, 0)
    if held_out >= count and held_out:
        raise ValueError(f"held_out={held_out} must leave at least one of the {count} batches for training")
    train_count = count - held_out
    held = _take(stacked, slice(train_count, count)) if held_out else None

    treedef, tops, entries, masters = _entries(qtree, train_unquantized)
    if not any(e.index for e in entries):
        raise ValueError("qtree has no float leaf to train (no QuantizedArray with float side information"
                         + ("" if train_unquantized else "; pass train_unquantized=True to train plain leaves") + ")")
    loss = loss if isinstance(loss, Partial) else Partial(loss)
    trained_at = [bool(e.index) for e in entries]
    decoders = [_Decoder.of(e, m, bool(cache_decode)) if e.quantized and e.index else None
                for e, m in zip(entries, masters)]
    constant = [dequantize(top) if e.quantized and not e.index else top for e, top in zip(entries, tops)]

    def held_loss(m: list[list]) -> float:
        value = float(_mean_loss(_values(entries, decoders, m, constant), loss, held, treedef=treedef))
        if not math.isfinite(value):
            raise ValueError(f"the held-out loss is {value}; check the loss and the batches")
        return value

    best = held_loss(masters) if held_out else None
    best_masters, waited = masters, 0
    opt_state = optimizer.init(masters)
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress)
    for step in bar:
        values = _values(entries, decoders, masters, constant)
        trained = [v if t else None for v, t in zip(values, trained_at)]
        fixed = [None if t else v for v, t in zip(values, trained_at)]
        value, grads = _loss_and_grad(trained, fixed, loss, _take(stacked, step % train_count), treedef=treedef)
        del values, trained, fixed  # the decoded arrays (a model's size): free them before the next ones
        masters, opt_state = _update(masters, _grads(entries, decoders, masters, grads), opt_state, optimizer=optimizer)
        del grads
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"the training loss became {value} at step {step}; lower the learning rate")
        current = None
        if held_out and ((step + 1) % eval_every == 0 or step + 1 == steps):
            current = held_loss(masters)
            if current < best:
                best, best_masters, waited = current, masters, 0
            else:
                waited += 1
        bar.set_postfix(loss=f"{value:.4g}", **({} if best is None else {"held_out": f"{best:.4g}"}))
        stop = bool(callback(step, value, current)) if callback is not None else False
        if stop and held_out and current is None:  # the steps since the last evaluation count too
            current = held_loss(masters)
            if current < best:
                best, best_masters = current, masters
        if stop or (held_out and waited >= patience):
            break
    bar.close()
    final = best_masters if held_out else masters
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(qtree, is_leaf=_is_qa)[0]]
    out = []
    for path, e, m, top in zip(paths, entries, final, tops):
        if not e.index:
            out.append(top)
            continue
        stored = [x.astype(d) for x, d in zip(m, e.dtypes)]
        if not all(bool(jnp.all(jnp.isfinite(x))) for x in stored):
            raise ValueError(f"{path}: trained values overflow their stored dtype {e.dtypes} "
                             "(lower the learning rate, or store that leaf at a wider dtype)")
        out.append(_merge(e.treedef, e.leaves, e.index, stored))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- ready losses


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layer_output(reference: Mapping[str, jax.Array], params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    current = _leaves_by_path(params)
    errors = []
    for path, x in batch.items():
        w, ref = current[path], reference[path]
        target = x @ ref
        errors.append(jnp.sum(jnp.square(x @ w - target)) / jnp.maximum(jnp.sum(jnp.square(target)), 1e-30))
    return jnp.mean(jnp.stack(errors))


def layer_output_loss(reference_params: Any, paths: Sequence[str]) -> Partial:
    """Per-layer output MSE of linear kernels on captured inputs, relative to each layer's output energy.

    ``loss(params, batch) = mean_p ||X_p W_p - X_p W*_p||^2 / ||X_p W*_p||^2`` over the kernel
    paths ``p`` of ``batch`` (a dict ``path -> X_p[rows, in]``, see :func:`layer_batches`),
    ``W_p`` the dequantized kernel ``[in, out]`` and ``W*_p`` the reference's. A local loss:
    each layer sees the reference model's inputs.

    Args:
      reference_params: the unquantized parameter tree.
      paths: the ``"/"``-joined paths of the kernels (2-D ``[in, out]`` leaves).

    Raises:
      ValueError: a path that is not a 2-D leaf of ``reference_params``.

    Example:
        >>> inputs = qetjax.calibration.dense_inputs(model, params, calib, mask=calib["attention_mask"])
        >>> loss = layer_output_loss(params, list(inputs))
        >>> tuned = finetune(qtree, loss, layer_batches(inputs, 256))
    """
    leaves = _leaves_by_path(reference_params)
    reference = {}
    for p in paths:
        if p not in leaves or np.ndim(leaves[p]) != 2:
            raise ValueError(f"paths: {p!r} is not a 2-D leaf of reference_params")
        reference[p] = jnp.asarray(leaves[p], jnp.float32)
    return Partial(_layer_output, reference)


def layer_batches(inputs: Mapping[str, Any], batch_rows: int) -> dict[str, np.ndarray]:
    """Captured inputs ``{path: X[rows, in]}`` as stacked batches ``{path: [count, batch_rows, in]}``.

    Every path is cut into the same number of batches, ``min_p rows_p // batch_rows``; the
    rows beyond (fewer than ``batch_rows`` per path, or a longer path's extra rows) are dropped.

    Raises:
      ValueError: no inputs, a non-2-D input, or fewer rows than ``batch_rows``.
    """
    batch_rows = _check_count("batch_rows", batch_rows, 1)
    if not inputs:
        raise ValueError("inputs must not be empty")
    for p, x in inputs.items():
        if np.ndim(x) != 2:
            raise ValueError(f"inputs[{p!r}] must be 2-D [rows, in], got shape {np.shape(x)}")
    count = min(np.shape(x)[0] for x in inputs.values()) // batch_rows
    if count == 0:
        raise ValueError(f"batch_rows={batch_rows} exceeds the rows of some input")
    return {p: np.asarray(x, np.float32)[: count * batch_rows].reshape(count, batch_rows, -1) for p, x in inputs.items()}


def _cosine(embed: Callable, params: Any, batch: Mapping[str, Any]) -> jax.Array:
    emb, ref = embed(params, batch["inputs"]), batch["reference"]
    weight = batch["weight"].astype(jnp.float32)
    num = jnp.sum(emb * ref, -1)
    den = jnp.linalg.norm(emb, axis=-1) * jnp.linalg.norm(ref, axis=-1)
    cos = num / jnp.where(den > 0, den, 1.0)
    return jnp.sum(weight * (1.0 - cos)) / jnp.maximum(jnp.sum(weight), 1.0)


def cosine_loss(embed: Callable[[Any, Any], jax.Array]) -> Partial:
    """``1 - cosine`` of embeddings to reference embeddings, averaged over the real rows of a batch.

    ``embed(params, inputs) -> [rows, dim]`` embeds a batch's ``inputs`` (e.g. MiniLM token
    ids and masks); a batch is ``{"inputs": ..., "reference": [rows, dim], "weight": [rows]}``
    (``weight`` 0 for padding rows), e.g. from :func:`embedding_batches`.

    Example:
        >>> embed = lambda p, b: minilm.embed(p, **b)
        >>> tuned = finetune(qtree, cosine_loss(embed), embedding_batches(embed, params, tokens))
    """
    if not callable(embed):
        raise TypeError(f"embed must be a function (params, inputs) -> [rows, dim], got {type(embed).__name__}")
    return Partial(functools.partial(_cosine, embed))


def embedding_batches(embed: Callable[[Any, Any], jax.Array], reference_params: Any, inputs: Any,
                      weight: Any = None) -> dict[str, Any]:
    """Stacked batches for :func:`cosine_loss`: ``inputs`` (leaves ``[count, rows, ...]``) with the
    reference model's embeddings of each batch, and row weights (default: all ones).

    Raises:
      ValueError: malformed stacked ``inputs`` or a ``weight`` that is not ``[count, rows]``.
    """
    inputs = stack_batches(inputs)
    reference = jax.jit(lambda p, xs: jax.lax.map(lambda b: embed(p, b), xs))(reference_params, inputs)
    if weight is None:
        weight = np.ones(reference.shape[:2], np.float32)
    if np.shape(weight) != reference.shape[:2]:
        raise ValueError(f"weight must be [count, rows] = {reference.shape[:2]}, got {np.shape(weight)}")
    return {"inputs": inputs, "reference": np.asarray(reference), "weight": np.asarray(weight, np.float32)}


def _kl(logits: Callable, reference_params: Any, params: Any, batch: Mapping[str, Any]) -> jax.Array:
    ref = jax.nn.log_softmax(jax.lax.stop_gradient(logits(reference_params, batch["inputs"])).astype(jnp.float32))
    cur = jax.nn.log_softmax(logits(params, batch["inputs"]).astype(jnp.float32))
    prob = jnp.exp(ref)
    per_token = jnp.sum(jnp.where(prob > 0, prob * (ref - cur), 0.0), -1)
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(mask * per_token) / jnp.maximum(jnp.sum(mask), 1.0)


def kl_loss(logits: Callable[[Any, Any], jax.Array], reference_params: Any) -> Partial:
    """``KL(p_ref || p)`` of next-token distributions, averaged over the real tokens of a batch.

    ``logits(params, inputs) -> [rows, tokens, vocab]``; a batch is ``{"inputs": ...,
    "mask": [rows, tokens]}`` (1 for the positions whose next-token distribution counts). The
    reference model's logits are computed in the loss from ``reference_params`` (a ``Partial``
    argument, not a compiled-in constant), so nothing of vocabulary size is stored per batch.

    Example:
        >>> logits = lambda p, b: llama.logits(p, b["input_ids"], b["attention_mask"])
        >>> loss = kl_loss(logits, params)
        >>> tuned = finetune(qtree, loss, {"inputs": tokens, "mask": tokens["attention_mask"]})
    """
    if not callable(logits):
        raise TypeError(f"logits must be a function (params, inputs) -> [rows, tokens, vocab], got {type(logits).__name__}")
    return Partial(functools.partial(_kl, logits), reference_params)
