"""Sweep of bad and unusual inputs, tried as a new user would, counted by area.

Every case is run and classified:

* **handled well**: it returns a good result (finite, the right shape and dtype, a reconstruction
  whose SQNR is not worse than on ordinary data by more than the case allows, a faithful file
  round trip), or it raises ``ValueError``/``TypeError`` (``OSError`` for file-system cases)
  whose message is not a JAX/Python internal (``scan got values``, ``has no attribute``,
  ``Incompatible shapes``, ...);
* **handled badly**: a silent NaN/Inf, wrong shape or dtype, a bad input accepted, another
  exception type, an internal error message, a crash, a timeout, or more than ``--max-rss-gb``
  of memory.

Areas: ``data:<method>`` (quantize/encode_with/keys/large and tiny values, for every registered
method: the configurations of ``tests/test_contract.py``, its budget solver's choice on the first
of the contract's ``CONFIGS`` it fits or its ``EXAMPLES`` entry, so new methods are swept
automatically and the sweep and the contract test try the same quantizers), ``budget``,
``constructors`` (every argument of every registered constructor, from its signature),
``tree``, ``files``, ``forged`` (files with a valid checksum and a hostile spec), ``kv`` and
``core``. Each area runs in its own subprocess, watched for time and memory.

Usage::

    JAX_PLATFORMS=cpu nice -n 5 python scripts/reliability_sweep.py            # all areas
    python scripts/reliability_sweep.py --areas data:pq files --verbose        # some, listing failures
    python scripts/reliability_sweep.py --json sweep.json                      # every case's outcome

Prints a markdown table: area, tried, handled well, handled badly.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

INTERNAL = re.compile(
    r"scan got|Incompatible shapes|XlaRuntimeError|TracerArrayConversion|TracerBool|ConcretizationTypeError|jaxlib|"
    r"has no attribute|not subscriptable|unhashable|object is not callable|'NoneType' object|out of bounds|"
    r"reshape new_sizes|cannot reshape array|dot_general requires|missing \d+ required|"
    r"takes \d+ positional|invalid literal|division by zero|cannot unpack|object is not iterable|unsupported operand|"
    r"Gather|dynamic_slice|must be a valid JAX type|not a valid JAX type|Error interpreting argument"
)
GOOD_ERRORS = (ValueError, TypeError)
Case = tuple[str, Callable[[], Any], "Callable[[Any], str | None] | None"]


# --------------------------------------------------------------------------- classification


class Must:
    """A check of a case that must succeed (documented behaviour): raising is handled badly."""

    def __init__(self, check: Callable[[Any], str | None]):
        self.check = check

    def __call__(self, result: Any) -> str | None:
        return self.check(result)


def classify(
    thunk: Callable[[], Any], check: Callable[[Any], str | None] | None, errors: tuple = GOOD_ERRORS
) -> tuple[bool, str]:
    """``(handled_well, detail)`` of running ``thunk``; ``check=None`` means it must raise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = thunk()
    except errors as err:
        msg = str(err)
        if isinstance(check, Must):
            return False, f"raised on valid input: {type(err).__name__}: {msg[:200]}"
        if INTERNAL.search(msg) or not msg:
            return False, f"{type(err).__name__} with an internal message: {msg[:200]}"
        return True, f"{type(err).__name__}: {msg[:200]}"
    except Exception as err:  # the sweep's purpose: any other exception is a finding
        return False, f"{type(err).__name__}: {str(err)[:200]}"
    if check is None:
        return False, "accepted silently"
    try:
        problem = check(result)
    except Exception as err:  # checking the result failed (e.g. decoding it)
        problem = f"checking the result raised {type(err).__name__}: {str(err)[:200]}"
    return (problem is None), (problem or "ok")


# --------------------------------------------------------------------------- data and checks


def _np():
    import numpy as np

    return np


def sqnr(x: Any, y: Any) -> float:
    np = _np()
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.abs(x).max() or 1.0
    x, y = x / scale, y / scale
    err = ((x - y) ** 2).sum()
    return float("inf") if err == 0 else float(10 * np.log10((x * x).sum() / err))


def check_decode(x: Any, min_snr: float | None) -> Callable[[Any], str | None]:
    """A check of a QuantizedArray of ``x``: finite, shape, dtype, SQNR >= ``min_snr``."""
    import jax

    import qetjax

    np = _np()

    def check(qa: Any) -> str | None:
        y = qetjax.dequantize(qa)
        want = np.dtype(jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
        if y.shape != np.shape(x):
            return f"decoded shape {y.shape}, expected {np.shape(x)}"
        if y.dtype != want:
            return f"decoded dtype {y.dtype}, expected {want}"
        y32 = np.asarray(y, np.float32)
        if not np.isfinite(y32).all():
            return f"silent NaN/Inf: {int((~np.isfinite(y32)).sum())} of {y32.size} decoded values"
        if min_snr is not None:
            s = sqnr(x, y32)
            if not s >= min_snr:
                return f"SQNR {s:.2f} dB < {min_snr:.2f} dB"
        return None

    return check


def contract() -> Any:
    """``tests/test_contract.py``: its per-method examples (``CONFIGS``, ``FAST``, ``EXAMPLES``,
    ``NAMES``) are the sweep's, so the contract test and the sweep try the same configurations."""
    import importlib

    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("test_contract")


def fast_budget(method: str, shape: Any, bpe: Any) -> Any:
    """``qetjax.for_budget`` with the contract's fast options (``FAST``) of ``method``."""
    import qetjax

    return qetjax.for_budget(method, shape, bpe, **contract().FAST.get(method, {}))


def base_config(method: str) -> tuple[tuple[int, int], float]:
    """The first ordinary (shape, budget) of the contract's ``CONFIGS`` the method's solver fits."""
    for shape, bpe in contract().CONFIGS:
        try:
            fast_budget(method, shape, bpe)
        except ValueError:
            continue
        return shape, bpe
    raise ValueError(f"{method} fits none of {contract().CONFIGS}")


def example(method: str) -> tuple[Any, tuple[int, int], float | None]:
    """``(q, shape, budget)`` of ``method`` as the contract test builds it: the budget solver's choice
    on the first configuration it fits, or the contract's ``EXAMPLES`` entry (budget ``None``)."""
    c = contract()
    if method in c.EXAMPLES:
        return c.EXAMPLES[method](), c.CONFIGS[0][0], None
    shape, budget = base_config(method)
    return fast_budget(method, shape, budget), shape, budget


def versus_rtn(x: Any, budget: float | None, q: Any, min_snr: float) -> Callable[[Any], str | None]:
    """:func:`check_decode` with ``min_snr``; a reconstruction below it is reported beside plain RTN's
    SQNR at the same bits per element and the configuration, so the table says where a method loses
    to the simplest baseline on this data (a quality limit of the method, not a crash)."""
    import jax

    import qetjax

    base = check_decode(x, min_snr)

    def check(qa: Any) -> str | None:
        problem = base(qa)
        if problem is None or not problem.startswith("SQNR"):
            return problem
        bpe = budget if budget is not None else qa.bits_per_element
        r = qetjax.quantize(qetjax.for_budget("rtn", x.shape, bpe), jax.random.key(1), x)
        args = {k: v for k, v in qa.spec.args if not isinstance(v, qetjax.core.Spec)}
        return f"{problem}; plain RTN at {bpe:g} bits/element: {sqnr(x, qetjax.dequantize(r)):.2f} dB ({qa.spec.name} {args})"

    return check


def data_cases(method: str) -> Iterator[Case]:
    import jax
    import jax.numpy as jnp

    import qetjax

    np = _np()
    q, shape, budget = example(method)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    key = jax.random.key(1)
    base = sqnr(x, qetjax.dequantize(qetjax.quantize(q, key, x)))
    same = base - 1.0  # scaling the data must not cost more than 1 dB

    def quant(data: Any, k: Any = key, qq: Any = q) -> Callable[[], Any]:
        return lambda: qetjax.quantize(qq, k, data)

    yield "ordinary float32", quant(x), Must(check_decode(x, 0.0))
    for dt in ("float16", "bfloat16", "float64"):
        xd = np.asarray(jnp.asarray(x, dt)) if dt != "float64" else x.astype(np.float64)
        yield f"{dt} input", quant(xd), Must(check_decode(xd, same - 1.0))
    yield "jax array input", quant(jnp.asarray(x)), Must(check_decode(x, same))
    yield "Fortran-ordered array", quant(np.asfortranarray(x)), Must(check_decode(x, same))
    yield "python list", quant(x.tolist()), None
    for name, bad in [("NaN", np.nan), ("+Inf", np.inf), ("-Inf", -np.inf)]:
        xb = x.copy()
        xb[3, 5] = bad
        yield f"one {name}", quant(xb), None
    yield "all NaN", quant(np.full(shape, np.nan, np.float32)), None
    yield "int32 matrix", quant(np.ones(shape, np.int32)), None
    yield "bool matrix", quant(np.ones(shape, bool)), None
    yield "complex matrix", quant(x.astype(np.complex64)), None
    yield "1-D", quant(x.reshape(-1)), None
    yield "3-D", quant(x.reshape(2, shape[0] // 2, shape[1])), None
    yield "0-D", quant(np.float32(1.0)), None
    yield "empty rows", quant(np.zeros((0, shape[1]), np.float32)), None
    yield "empty width", quant(np.zeros((shape[0], 0), np.float32)), None
    # Values at the edges of the stored dtypes.
    for scale, label in [
        (1e5, "scaled 1e5 (above float16 max)"),
        (1e30, "scaled 1e30"),
        (3e37, "scaled 3e37 (near float32 max)"),
        (1e-6, "scaled 1e-6 (float16 subnormal)"),
        (1e-30, "scaled 1e-30"),
        (1e-40, "scaled 1e-40 (float32 subnormal)"),
    ]:
        xs = (x.astype(np.float64) * scale).astype(np.float32)
        yield label, quant(xs), check_decode(xs, same if scale >= 1e-38 else 0.0)
    xo = x.copy()
    xo[7, 11] = 7e4
    yield "one entry 7e4", quant(xo), versus_rtn(xo, budget, q, 0.0)
    xo = x.copy()
    xo[7, 11] = 3e38
    yield "one entry 3e38", quant(xo), check_decode(xo, 0.0)
    xh = np.asarray(jnp.asarray(x / np.abs(x).max() * 2e4, jnp.float16))
    yield "float16 input near 2e4", quant(xh), check_decode(xh, same - 1.0)
    xh = np.asarray(jnp.asarray(x / np.abs(x).max() * 6.5e4, jnp.float16))
    yield "float16 input near its max", quant(xh), check_decode(xh, same - 1.0)
    yield "all zeros", quant(np.zeros(shape, np.float32)), check_decode(np.zeros(shape, np.float32), None)
    yield "constant 3.5", quant(np.full(shape, 3.5, np.float32)), check_decode(np.full(shape, 3.5, np.float32), 0.0)
    yield "one row", quant(x[:1]), check_decode(x[:1], None)
    yield (
        "odd width",
        quant(rng.standard_normal((shape[0], shape[1] + 1)).astype(np.float32)),
        check_decode(np.zeros((shape[0], shape[1] + 1)), None),
    )
    rank1 = np.outer(x[:, 0], x[0])
    yield "rank-1 matrix", quant(rank1), Must(versus_rtn(rank1, budget, q, 0.0))
    # Keys.
    yield "legacy uint32 key", quant(x, jax.random.PRNGKey(0)), check_decode(x, 0.0)
    for label, bad_key in [
        ("int key", 0),
        ("None key", None),
        ("string key", "seed"),
        ("float array key", np.zeros(2, np.float32)),
        ("batch of keys", jax.random.split(key, 2)),
        ("int32 array key", np.zeros(3, np.int32)),
    ]:
        yield label, quant(x, bad_key), None

    def deterministic() -> Any:
        a, b = qetjax.quantize(q, key, x), qetjax.quantize(q, key, x)
        same_leaves = all(
            np.array_equal(np.asarray(u), np.asarray(v))
            for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        )
        return same_leaves

    yield "deterministic for a key", deterministic, Must(lambda ok: None if ok else "two runs with one key differ")

    def bits_honest() -> Any:
        return qetjax.bits(qetjax.quantize(q, key, x))["total"], qetjax.stored_bits(q, shape)

    yield (
        "bits == stored_bits <= budget",
        bits_honest,
        Must(
            lambda r: None
            if r[0] == r[1] <= (budget * x.size if budget is not None else r[1])
            else f"bits {r[0]}, stored_bits {r[1]}, budget {budget and budget * x.size}"
        ),
    )
    # Fit once, encode many.
    params = qetjax.fit(q, key, x)
    x2 = rng.standard_normal(shape).astype(np.float32)
    yield "encode_with new rows", lambda: qetjax.encode_with(q, params, x2), Must(check_decode(x2, 0.0))
    wider = rng.standard_normal((shape[0], shape[1] + shape[1] // 2)).astype(np.float32)
    stateless = not jax.tree_util.tree_leaves(params)  # nothing fitted (e.g. RTN)
    try:  # params that do not depend on the width (Lloyd-Max's level table) may encode any width
        width_free = qetjax.core._params_match(q, params, wider.shape) is None
    except ValueError:  # the wider shape is not one the method takes at all
        width_free = False
    yield (
        "encode_with other width",
        lambda: qetjax.encode_with(q, params, wider),
        check_decode(wider, 0.0) if width_free else None,
    )
    half = x2[: shape[0] // 2]
    yield "encode_with half the rows", lambda: qetjax.encode_with(q, params, half), check_decode(half, 0.0)
    other = "rtn" if method != "rtn" else "pq"
    p_other = qetjax.fit(qetjax.for_budget(other, shape, budget or 3.0), key, x)
    same_state = stateless and not jax.tree_util.tree_leaves(p_other)  # both fit nothing: the "other" params are ours
    yield (
        f"encode_with {other}'s params",
        lambda: qetjax.encode_with(q, p_other, x2),
        check_decode(x2, 0.0) if same_state else None,
    )
    yield "encode_with params None", lambda: qetjax.encode_with(q, None, x2), check_decode(x2, 0.0) if stateless else None
    yield "encode_with NaN data", lambda: qetjax.encode_with(q, params, np.full(shape, np.nan, np.float32)), None
    yield "fit with NaN", lambda: qetjax.fit(q, key, np.full(shape, np.nan, np.float32)), None

    def batch() -> Any:
        xs = np.stack([x, x2])
        return qetjax.quantize_batch(q, key, xs), xs

    def check_batch(r: Any) -> str | None:
        qa, xs = r
        y = np.asarray(qetjax.dequantize(qa))
        return None if y.shape == xs.shape and np.isfinite(y).all() else f"batch decode {y.shape}, finite {np.isfinite(y).all()}"

    yield "quantize_batch", batch, Must(check_batch)

    def saved() -> Any:
        qa = qetjax.quantize(q, key, x)
        back = qetjax.io.from_bytes(qetjax.io.to_bytes({"w": qa}))["w"]
        return all(
            np.array_equal(np.asarray(u), np.asarray(v)) and u.dtype == v.dtype
            for u, v in zip(jax.tree_util.tree_leaves(qa), jax.tree_util.tree_leaves(back))
        )

    yield "save/load bit-exact", saved, Must(lambda ok: None if ok else "a leaf changed")


def budget_cases() -> Iterator[Case]:
    import jax.numpy as jnp

    import qetjax
    from qetjax.core import METHODS, stored_bits

    np = _np()
    for method in sorted(n for n, m in METHODS.items() if m.budget is not None):

        def fits(shape: tuple, bpe: float) -> Callable[[Any], str | None]:
            return lambda q: None if stored_bits(q, shape) <= bpe * shape[0] * shape[1] else "configuration exceeds the budget"

        (n, d), base = base_config(method)
        for label, bpe in [
            ("NaN", float("nan")),
            ("+inf", float("inf")),
            ("1e30", 1e30),
            ("-1", -1.0),
            ("0", 0.0),
            ("'3'", "3"),
            ("True", True),
            ("None", None),
            ("[3.0]", [3.0]),
        ]:
            yield f"{method}: budget {label}", (lambda b=bpe, n=n, d=d: qetjax.for_budget(method, (n, d), b)), None
        for label, bpe in [
            ("np.float32", np.float32(base)),
            ("np.int64", np.int64(base)),
            ("jnp.float32", jnp.float32(base)),
            ("int", int(base)),
        ]:
            yield (
                f"{method}: budget {label}",
                (lambda b=bpe, n=n, d=d: qetjax.for_budget(method, (n, d), b)),
                Must(fits((n, d), base)),
            )
        for label, shape in [
            ("(n + 0.5, d)", (n + 0.5, d)),
            ("(n,)", (n,)),
            ("(0, d)", (0, d)),
            ("(n, d, 2)", (n, d, 2)),
            ("'64x32'", "64x32"),
            ("None", None),
        ]:
            yield f"{method}: shape {label}", (lambda s=shape: qetjax.for_budget(method, s, base)), None
        yield (
            f"{method}: shape np.array",
            (lambda n=n, d=d: qetjax.for_budget(method, np.array([n, d]), base)),
            Must(fits((n, d), base)),
        )
        yield f"{method}: budget 0.01 (too small)", (lambda n=n, d=d: qetjax.for_budget(method, (n, d), 0.01)), None
        for shape, bpe in [((1, 32), 16.0), ((2, 2), 8.0), ((4096, 1), 3.0), ((1, 1), 32.0)]:
            yield (
                f"{method}: tiny shape {shape} at {bpe}",
                (lambda s=shape, b=bpe: qetjax.for_budget(method, s, b)),
                fits(shape, bpe),
            )
        yield f"{method}: unknown option", (lambda n=n, d=d: qetjax.for_budget(method, (n, d), base, no_such_option=1)), None
    yield "unknown method", lambda: qetjax.for_budget("nope", (64, 32), 3.0), None
    yield "method None", lambda: qetjax.for_budget(None, (64, 32), 3.0), None


def _annotation(p: inspect.Parameter) -> str:
    a = p.annotation
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def constructor_cases() -> Iterator[Case]:
    import jax

    import qetjax
    from qetjax.core import METHODS

    np = _np()

    for method in sorted(n for n, m in METHODS.items() if m.budget is not None):
        base, shape, _ = example(method)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

        def builds_and_works(make: Callable[[], Any], x: Any = x) -> Callable[[], Any]:
            return lambda: qetjax.quantize(make(), jax.random.key(0), x)

        args = dict(base.spec.args)
        sig = METHODS[method].constructor._signature
        ctor = METHODS[method].constructor
        for name, param in sig.parameters.items():
            ann = _annotation(param)
            if "Quantizer" in ann:
                bad = ["pq", 3]
            elif ann.startswith("bool"):
                bad = ["no", 1, None]
            elif ann.startswith("int"):
                bad = [-1, 2.5, "4", True, 10**12] + ([] if "None" in ann else [None])
            elif ann.startswith("float"):
                bad = [float("nan"), float("inf"), -1.0, "x"]
            elif ann.startswith("str"):
                bad = ["bogus", 3] + ([] if "None" in ann else [None])
            else:
                continue
            for value in bad:
                kwargs = dict(args, **{name: value})
                yield f"{method}({name}={value!r})", builds_and_works(lambda kw=kwargs: ctor(**kw)), None
        yield f"{method}: unknown keyword", lambda a=args: ctor(**a, no_such_argument=1), None


def tree_cases() -> Iterator[Case]:
    import jax
    import jax.numpy as jnp

    import qetjax

    np = _np()
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    q = qetjax.rtn(4)
    w = rng.standard_normal((64, 32)).astype(np.float32)

    def kept(tree: dict, quantized: tuple, kept_names: tuple) -> Callable[[Any], str | None]:
        def check(out: Any) -> str | None:
            for n in quantized:
                if not isinstance(out[n], qetjax.QuantizedArray):
                    return f"{n} not quantized"
            for n in kept_names:
                if out[n] is not tree[n] and not np.array_equal(np.asarray(out[n]), np.asarray(tree[n])):
                    return f"{n} changed"
            deq = qetjax.dequantize_tree(out)
            return None if all(np.isfinite(np.asarray(v, np.float32)).all() for v in jax.tree_util.tree_leaves(deq)) else "NaN"

        return check

    for rank in (3, 4):
        tree = {"w": w, "conv": rng.standard_normal((3,) * (rank - 2) + (8, 16)).astype(np.float32)}
        yield (
            f"single quantizer, {rank}-D leaf",
            lambda t=tree: qetjax.quantize_tree(key, t, q, progress=False),
            Must(kept(tree, ("w",), ("conv",))),
        )
        yield f"rule matching a {rank}-D leaf", lambda t=tree: qetjax.quantize_tree(key, t, [("conv", q)], progress=False), None
        yield (
            f"function giving a {rank}-D leaf a quantizer",
            lambda t=tree: qetjax.quantize_tree(key, t, lambda p, x: q, progress=False),
            None,
        )
    tree = {
        "w": w,
        "b": np.zeros(32, np.float32),
        "s": np.float32(1.0),
        "i": np.ones((4, 4), np.int32),
        "h": w.astype(jnp.bfloat16),
    }
    yield (
        "single quantizer, mixed leaves",
        lambda: qetjax.quantize_tree(key, tree, q, progress=False),
        Must(kept(tree, ("w", "h"), ("b", "s", "i"))),
    )
    yield (
        "rule on an int leaf (kept, as documented)",
        lambda: qetjax.quantize_tree(key, tree, [("^i$", q)], progress=False),
        Must(kept(tree, (), ("i",))),
    )
    yield "policy returns a string", lambda: qetjax.quantize_tree(key, {"w": w}, lambda p, x: "rtn", progress=False), None
    yield "policy is a string", lambda: qetjax.quantize_tree(key, {"w": w}, "rtn", progress=False), None
    yield "bad regex", lambda: qetjax.quantize_tree(key, {"w": w}, [("(", q)], progress=False), None
    yield "rule not a pair", lambda: qetjax.quantize_tree(key, {"w": w}, [q], progress=False), None
    yield "layout bogus", lambda: qetjax.quantize_tree(key, {"w": w}, q, layout="bogus", progress=False), None
    yield (
        "empty tree",
        lambda: qetjax.quantize_tree(key, {}, q, progress=False),
        Must(lambda out: None if out == {} else "changed"),
    )
    yield "NaN leaf", lambda: qetjax.quantize_tree(key, {"w": np.full((8, 8), np.nan, np.float32)}, q, progress=False), None
    yield "int key", lambda: qetjax.quantize_tree(0, {"w": w}, q, progress=False), None
    yield (
        "dequantize_tree of plain tree",
        lambda: qetjax.dequantize_tree({"w": w}),
        Must(lambda out: None if out["w"] is w else "changed"),
    )


def file_cases() -> Iterator[Case]:
    import stat

    import jax
    import jax.numpy as jnp

    import qetjax
    from qetjax import io

    np = _np()
    tmp = tempfile.mkdtemp(prefix="qetjax-sweep-")
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    qa = qetjax.quantize(qetjax.rtn(4), jax.random.key(0), x)

    def round_trip(tree: Any) -> Callable[[], Any]:
        return lambda: (tree, io.from_bytes(io.to_bytes(tree)))

    def faithful(r: Any) -> str | None:
        a, b = r
        la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
            return f"structure {jax.tree_util.tree_structure(b)}"
        for u, v in zip(la, lb):
            if type(u) in (str, bytes, int, float, bool, complex):
                if type(u) is not type(v) or u != v:
                    return f"{u!r} came back as {v!r}"
            elif (
                np.shape(u) != np.shape(v)
                or np.asarray(u).dtype != np.asarray(v).dtype
                or not np.array_equal(np.asarray(u), np.asarray(v))
            ):
                return f"{np.asarray(u).dtype}{np.shape(u)} came back as {np.asarray(v).dtype}{np.shape(v)}"
        return None

    for label, leaf in [
        ("str", "layer0"),
        ("bytes", b"\x00\x01"),
        ("int", 7),
        ("float", 0.25),
        ("bool", True),
        ("complex", 1 + 2j),
        ("np.float32 scalar", np.float32(3)),
        ("0-d jax array", jnp.float32(2)),
        ("bf16 array", jnp.ones(3, jnp.bfloat16)),
        ("int64 array", np.arange(3, dtype=np.int64)),
        ("empty array", np.zeros((0, 4), np.float32)),
        ("uint8 array", np.arange(4, dtype=np.uint8)),
        ("quantized", qa),
        ("nested", {"a": [("x", None), {"b": qa}]}),
    ]:
        yield f"round trip {label}", round_trip({"leaf": leaf}), Must(faithful)
    for label, leaf in [
        ("numpy str array", np.array(["a"])),
        ("datetime array", np.array([1], "datetime64[D]")),
        ("structured array", np.zeros(2, [("a", "i4")])),
        ("object array", np.array([None])),
        ("object", object()),
        ("int 2**70", 2**70),
        ("PRNG key", jax.random.key(0)),
        ("set", {1, 2}),
    ]:
        yield f"save {label}", (lambda lf=leaf: qetjax.save(os.path.join(tmp, "x.qet"), {"leaf": lf})), None
    yield "dict with int keys", lambda: qetjax.save(os.path.join(tmp, "x.qet"), {1: x}), None
    yield (
        "no temp file left after refused saves",
        lambda: sorted(os.listdir(tmp)),
        Must(lambda names: None if not names else f"left {names}"),
    )
    data = io.to_bytes({"w": qa, "name": "x"})
    for keep in np.linspace(0, len(data) - 1, 16).astype(int):
        yield f"truncated at {keep}", (lambda k=keep: io.from_bytes(data[:k])), None
    for pos in np.linspace(0, len(data) - 1, 48).astype(int):
        for bit in (0, 3, 7):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            yield f"bit {bit} of byte {pos} flipped", (lambda d=bytes(flipped): io.from_bytes(d)), None
    yield "trailing garbage", lambda: io.from_bytes(data + b"x"), None
    yield "empty file", lambda: io.from_bytes(b""), None
    yield "not a qetjax file", lambda: io.from_bytes(b"PK\x03\x04" + b"\x00" * 100), None

    path = os.path.join(tmp, "m.qet")

    def mode_new() -> Any:
        old = os.umask(0o022)
        try:
            qetjax.save(path + ".new", {"w": qa})
        finally:
            os.umask(old)
        return stat.S_IMODE(os.stat(path + ".new").st_mode)

    yield "new file mode follows umask 022", mode_new, Must(lambda m: None if m == 0o644 else f"mode {oct(m)}")

    def mode_kept() -> Any:
        with open(path, "wb") as f:
            f.write(b"old")
        os.chmod(path, 0o664)
        qetjax.save(path, {"w": qa})
        return stat.S_IMODE(os.stat(path).st_mode)

    yield "overwrite keeps mode 0664", mode_kept, Must(lambda m: None if m == 0o664 else f"mode {oct(m)}")

    def symlink() -> Any:
        link = os.path.join(tmp, "link.qet")
        if not os.path.lexists(link):
            os.symlink(path, link)
        qetjax.save(link, {"w": qa, "tag": "via link"})
        return os.path.islink(link), qetjax.load(path)["tag"]

    yield "save through a symlink", symlink, Must(lambda r: None if r == (True, "via link") else f"link {r[0]}, target {r[1]!r}")
    yield "save to a directory", lambda: qetjax.save(tmp, {"w": qa}), None
    yield "save into a missing directory", lambda: qetjax.save(os.path.join(tmp, "no", "x.qet"), {"w": qa}), None
    yield "load a missing file", lambda: qetjax.load(os.path.join(tmp, "missing.qet")), None
    yield "load a directory", lambda: qetjax.load(tmp), None
    yield (
        "no temp file left at the end",
        lambda: [n for n in os.listdir(tmp) if n.startswith(".qetjax-")],
        Must(lambda names: None if not names else f"left {names}"),
    )

    def flax_round_trip() -> Any:
        from flax import serialization

        template = {"w": qetjax.quantize(qetjax.rtn(4), jax.random.key(3), np.zeros_like(x))}
        back = serialization.from_bytes(template, serialization.to_bytes({"w": qa}))
        return {"w": qa}, back

    yield "flax.serialization round trip", flax_round_trip, Must(faithful)


FILE_ERRORS = (ValueError, TypeError, OSError)


def forged_file(spec: dict, shape: list, arrays: int = 2, nbytes: int = 256, batch: list | None = None) -> bytes:
    """A file with a valid checksum whose one quantized record claims ``spec`` and ``shape``."""
    import numpy as np
    from flax import serialization

    from qetjax import io

    meta = {"spec": spec, "shape": shape, "dtype": "float32", "batch_shape": batch or []}
    record = {
        "meta": json.dumps(meta),
        "params": [np.zeros(nbytes // 4, np.uint32)] * arrays,
        "codes": [np.zeros(nbytes // 4, np.uint32)],
    }
    payload = serialization.msgpack_serialize({"structure": json.dumps({"dict": {"w": {"leaf": 0}}}), "leaves": [record]})
    return io._HEADER.pack(io.MAGIC, io.FORMAT_VERSION, hashlib.sha256(payload).digest(), len(payload)) + payload


def forged_cases() -> Iterator[Case]:
    from qetjax import io

    def spec(name: str, **args: Any) -> dict:
        return {"name": name, "args": [[k, v] for k, v in args.items()]}

    pvq = lambda g, k: spec(
        "pvq", group_size=g, pulses=k, gain_bits=4, rotate=True, projection_method="best", gains="lloyd", gain_scale="row"
    )  # noqa: E731
    rtn = spec("rtn", bits=4, group_size=None, symmetric=False, granularity=None, scale_dtype="float16")
    cases = [
        ("PVQ group 4096, 16384 pulses (2 KB)", forged_file(pvq(4096, 16384), [1, 4096], nbytes=2048)),
        ("PVQ group 1024, 16384 pulses", forged_file(pvq(1024, 16384), [1, 1024], nbytes=2048)),
        ("PVQ group 2**20", forged_file(pvq(2**20, 1), [1, 2**20], nbytes=2048)),
        ("shape 2**20 x 2**20", forged_file(rtn, [2**20, 2**20])),
        ("shape 10**6 x 10**6 at 1 KB", forged_file(rtn, [10**6, 10**6], nbytes=1024)),
        ("batch 2**30", forged_file(rtn, [64, 32], batch=[2**30])),
        ("negative shape", forged_file(rtn, [-64, 32])),
        ("float shape", forged_file(rtn, [64.5, 32])),
        ("rank 40 shape", forged_file(rtn, [1] * 40)),
        (
            "bits 2**70",
            forged_file(
                spec("rtn", bits=2**70, group_size=None, symmetric=False, granularity=None, scale_dtype="float16"), [64, 32]
            ),
        ),
        ("unknown method", forged_file(spec("os.system", cmd="true"), [64, 32])),
        ("unknown argument", forged_file(spec("rtn", bits=4, evil=1), [64, 32])),
        (
            "scale_dtype object",
            forged_file(spec("rtn", bits=4, group_size=None, symmetric=False, granularity=None, scale_dtype="object"), [64, 32]),
        ),
        (
            "PQ 2**16 centroids x 2**15 wide",
            forged_file(spec("pq", subvector_dim=2**15, num_centroids=2**16), [2**16, 2**15], nbytes=2048),
        ),
        (
            "RQ 64 stages x 65536 centroids",
            forged_file(spec("rq", num_stages=64, num_centroids=65536), [4096, 4096], nbytes=2048),
        ),
        ("LSQ 256 codebooks", forged_file(spec("lsq", num_codebooks=256, num_centroids=65536), [4096, 4096], nbytes=2048)),
        ("QET 30 levels", forged_file(spec("qet", levels=30, subvector_dim=1, num_centroids=2), [64, 2**20], nbytes=2048)),
    ]
    for label, data in cases:
        yield label, (lambda d=data: io.from_bytes(d)), None


def kv_cases() -> Iterator[Case]:
    import jax

    import qetjax
    from qetjax import kv

    np = _np()
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 4, 8, 16)).astype(np.float32)
    mask = np.ones((2, 8), np.int32)
    key = jax.random.key(0)
    q = qetjax.rtn(4)
    codec = kv.fit_kv(key, q, [(k, k)], mask)
    yield "fit_kv with no samples", lambda: kv.fit_kv(key, q, [], mask), None
    yield "fit_kv with a mask of zeros", lambda: kv.fit_kv(key, q, [(k, k)], np.zeros((2, 8), np.int32)), None
    yield "fit_kv NaN values", lambda: kv.fit_kv(key, q, [(k, np.full_like(k, np.nan))], mask), None
    yield "fit_kv 3-D keys", lambda: kv.fit_kv(key, q, [(k[0], k[0])], mask), None
    yield "fit_kv wrong mask shape", lambda: kv.fit_kv(key, q, [(k, k)], np.ones((3, 5), np.int32)), None
    yield "fit_kv int key", lambda: kv.fit_kv(0, q, [(k, k)], mask), None
    yield "fit_kv q not a quantizer", lambda: kv.fit_kv(key, "rtn", [(k, k)], mask), None
    yield "transform wrong head size", lambda: kv.transform(codec)(0, k[..., :8], k[..., :8]), None
    yield "transform wrong heads", lambda: kv.transform(codec)(0, k[:, :2], k[:, :2]), None
    yield "transform layer out of range", lambda: kv.transform(codec)(5, k, k), None
    yield (
        "transform ok",
        lambda: kv.transform(codec)(0, k, k),
        Must(lambda r: None if r[0].shape == k.shape and np.isfinite(np.asarray(r[0])).all() else "bad output"),
    )
    yield "code_bits_per_element tokens=0", lambda: kv.code_bits_per_element(codec, 0, 16), None
    yield "code_bits_per_element tokens=-1", lambda: kv.code_bits_per_element(codec, -1, 16), None
    yield "code_bits_per_element head_dim=0", lambda: kv.code_bits_per_element(codec, 8, 0), None
    yield (
        "code_bits_per_element ok",
        lambda: kv.code_bits_per_element(codec, 8, 16),
        Must(lambda b: None if 0 < b < 32 else f"{b}"),
    )


def core_cases() -> Iterator[Case]:
    import jax

    import qetjax

    np = _np()
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    qa = qetjax.quantize(qetjax.rtn(4), jax.random.key(0), x)
    for label, obj in [("array", x), ("dict", {"w": qa}), ("None", None), ("Quantizer", qetjax.rtn(4))]:
        yield f"bits({label})", (lambda o=obj: qetjax.bits(o)), None
        yield f"dequantize({label})", (lambda o=obj: qetjax.dequantize(o)), None
    yield "quantize with a string quantizer", lambda: qetjax.quantize("rtn", jax.random.key(0), x), None
    yield (
        "quantize with an ad-hoc Quantizer",
        lambda: qetjax.quantize(qetjax.Quantizer(None, None, None), jax.random.key(0), x),
        None,
    )
    yield "quantize_batch of 2-D", lambda: qetjax.quantize_batch(qetjax.rtn(4), jax.random.key(0), x), None
    yield "quantize_batch int key", lambda: qetjax.quantize_batch(qetjax.rtn(4), 0, x[None]), None
    yield "stored_bits bad shape", lambda: qetjax.stored_bits(qetjax.rtn(4), (64,)), None
    yield "stored_bits float shape", lambda: qetjax.stored_bits(qetjax.rtn(4), (64.5, 32)), None
    yield "stored_bits not a quantizer", lambda: qetjax.stored_bits("rtn", (64, 32)), None
    yield "residual of a string", lambda: qetjax.residual("rtn"), None
    yield "residual of nothing", lambda: qetjax.residual(), None
    yield (
        "jit(dequantize)",
        lambda: jax.jit(qetjax.dequantize)(qa),
        Must(lambda y: None if sqnr(x, y) > 10 else f"SQNR {sqnr(x, y)}"),
    )
    qb = qetjax.quantize(qetjax.rtn(4), jax.random.key(1), -x)
    stacked = jax.tree.map(lambda *a: np.stack(a), qa, qb)
    yield (
        "vmap(dequantize) of stacked arrays",
        lambda: jax.vmap(qetjax.dequantize)(stacked),
        Must(lambda y: None if y.shape == (2, 64, 32) and sqnr(np.stack([x, -x]), y) > 10 else f"{y.shape}"),
    )


# --------------------------------------------------------------------------- driver


def areas() -> list[str]:
    return [f"data:{m}" for m in contract().NAMES] + ["budget", "constructors", "tree", "files", "forged", "kv", "core"]


def cases_of(area: str) -> Iterator[Case]:
    if area.startswith("data:"):
        return data_cases(area.split(":", 1)[1])
    return {
        "budget": budget_cases,
        "constructors": constructor_cases,
        "tree": tree_cases,
        "files": file_cases,
        "forged": forged_cases,
        "kv": kv_cases,
        "core": core_cases,
    }[area]()


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_once(area: str, skip: set, timeout: float, max_rss: float) -> tuple[list[dict], str | None, str | None]:
    """One subprocess over ``area``'s cases not in ``skip``: ``(results, failing case, reason)``."""
    env = dict(os.environ, QETJAX_SWEEP_SKIP=json.dumps(sorted(skip)))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", area], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    os.set_blocking(proc.stdout.fileno(), False)
    results, current, buffer, reason, start = [], None, b"", None, time.monotonic()
    while reason is None:
        chunk = proc.stdout.read() or b""
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            rec = json.loads(line)
            if "start" in rec:
                current = rec["start"]
            else:
                results.append(rec)
                current = None
        if proc.poll() is not None and not chunk:
            if proc.returncode != 0:
                reason = f"process died (exit {proc.returncode})"
            break
        if _rss_bytes(proc.pid) > max_rss:
            reason = f"memory above {max_rss / 2**30:.0f} GiB"
        elif time.monotonic() - start > timeout:
            reason = f"timeout after {timeout:.0f} s"
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return results, current, reason


def run_area(area: str, timeout: float, max_rss: float) -> list[dict]:
    """Runs ``area`` in subprocesses; a crash, timeout or memory blow-up marks the running case badly
    handled, and the area's remaining cases run in a fresh process."""
    results: list[dict] = []
    while True:
        got, current, reason = _run_once(area, {r["label"] for r in results}, timeout, max_rss)
        results += got
        if reason is None or current is None:
            if reason is not None:
                results.append({"label": "(area)", "well": False, "detail": reason})
            return results
        results.append({"label": current, "well": False, "detail": reason})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--areas", nargs="*", help="areas to run (default: all); e.g. data:pq files")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per area")
    parser.add_argument("--max-rss-gb", type=float, default=4.0, help="memory per area before it is killed")
    parser.add_argument("--verbose", action="store_true", help="list every badly handled case")
    parser.add_argument("--json", help="write every case's outcome to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, set(json.loads(os.environ.get("QETJAX_SWEEP_SKIP", "[]"))))
        return
    chosen = args.areas or areas()
    table, every = [], {}
    t0 = time.monotonic()
    for area in chosen:
        results = run_area(area, args.timeout, args.max_rss_gb * 2**30)
        every[area] = results
        well = sum(r["well"] for r in results)
        table.append((area, len(results), well, len(results) - well))
        print(f"{area}: {len(results)} tried, {well} well, {len(results) - well} badly", file=sys.stderr, flush=True)
    print("| area | tried | handled well | handled badly |\n|---|---:|---:|---:|")
    for row in table:
        print("| {} | {} | {} | {} |".format(*row))
    total = [sum(r[i] for r in table) for i in (1, 2, 3)]
    print(f"| **total** | {total[0]} | {total[1]} | {total[2]} |")
    print(f"\n{time.monotonic() - t0:.0f} s")
    if args.verbose:
        for area, results in every.items():
            for r in results:
                if not r["well"]:
                    print(f"- {area} / {r['label']}: {r['detail']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(every, f, indent=1)


def worker(area: str, skip: set) -> None:
    """Runs ``area``'s cases not in ``skip``, printing one JSON line per case (``start`` before, the outcome after)."""
    errors = FILE_ERRORS if area in ("files", "forged") else GOOD_ERRORS
    try:
        for label, thunk, check in cases_of(area):
            if label in skip:
                continue
            print(json.dumps({"start": label}), flush=True)
            well, detail = classify(thunk, check, errors)
            print(json.dumps({"label": label, "well": well, "detail": detail}), flush=True)
    except Exception as err:  # set-up of the area failed: reported as one badly handled case
        print(json.dumps({"label": "(area set-up)", "well": False, "detail": f"{type(err).__name__}: {err}"}), flush=True)


if __name__ == "__main__":
    main()
