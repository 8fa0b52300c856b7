"""The benchmarks' configuration mini-language: ``method[:option=value...][+gptq][+seq][+mixed]``.

A configuration names a method with a budget solver, options passed to that solver
(``qetjax.for_budget(method, shape, bits, **options)``), and flags: ``+gptq`` (GPTQ on
calibration inputs, :mod:`qetjax.calibration`), ``+seq`` (sequential GPTQ: each layer calibrated
on the model whose earlier layers are already quantized; implies ``+gptq``; the MiniLM benchmark's
GPTQ is sequential by default, SmolLM2's one-shot) and ``+mixed`` (per-leaf budgets from measured
sensitivity). Option values are JSON (``128``, ``true``, ``"row"``) or, failing that, plain
strings.

Example:
    >>> parse_config("pvq:group_size=64+gptq+mixed")
    Config(method='pvq', options=(('group_size', 64),), gptq=True, mixed=True, sequential=False)
    >>> parse_config("rtn:group_size=128").label
    'rtn:group_size=128'
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import qetjax.methods  # noqa: F401  (registers every method and its budget solver)
from qetjax.core import METHODS


def registered_methods() -> list[str]:
    """The registered methods that have a budget solver, sorted (every method of :mod:`qetjax.methods`)."""
    return sorted(n for n, m in METHODS.items() if m.budget is not None)


class Config(NamedTuple):
    """One weight-quantization configuration: a budgeted method, its solver options, GPTQ or not,
    one budget for every leaf or budgets allocated by measured sensitivity (``mixed``), sequential GPTQ."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()
    gptq: bool = False
    mixed: bool = False
    sequential: bool = False

    @property
    def label(self) -> str:
        """The string :func:`parse_config` reads back."""
        opts = "".join(f":{k}={json.dumps(v)}" for k, v in self.options)
        return (self.method + opts + ("+gptq" if self.gptq else "") + ("+seq" if self.sequential else "")
                + ("+mixed" if self.mixed else ""))


def parse_config(text: str) -> Config:
    """Parses ``method[:option=value...][+gptq][+seq][+mixed]``; values are JSON (``128``, ``true``) or plain strings.

    Raises:
      ValueError: an unknown suffix or method, or an option that is not ``name=value``.

    Example:
        >>> parse_config("rtn:group_size=128+gptq")
        Config(method='rtn', options=(('group_size', 128),), gptq=True, mixed=False, sequential=False)
    """
    if not isinstance(text, str):
        raise TypeError(f"config must be a string, got {type(text).__name__}")
    body, *flags = text.split("+")
    if len(set(flags)) != len(flags) or not set(flags) <= {"gptq", "seq", "mixed"}:
        raise ValueError(f"config {text!r}: the suffixes are '+gptq', '+seq' and '+mixed', each at most once")
    method, *opts = body.split(":")
    if method not in METHODS or METHODS[method].budget is None:
        raise ValueError(f"config {text!r}: {method!r} is not a method with a budget solver ({registered_methods()})")
    options = []
    for opt in opts:
        name, eq, value = opt.partition("=")
        if not eq or not name.isidentifier():
            raise ValueError(f"config {text!r}: options are name=value, got {opt!r}")
        try:
            options.append((name, json.loads(value)))
        except json.JSONDecodeError:
            options.append((name, value))
    sequential = "seq" in flags
    return Config(method, tuple(options), "gptq" in flags or sequential, "mixed" in flags, sequential)
