"""Pyramid vector quantization (PVQ) for LLM weights (arXiv 2410.16926).

``qetjax.pvq`` is both this package and the quantizer constructor: the module
object is callable, so ``qetjax.pvq(group_size, pulses, gain_bits, rotate=True)``
returns a :class:`~qetjax.core.Quantizer` (it calls :func:`pvq`), while the exact
enumeration lives beside it: ``qetjax.pvq.num_points(D, K)``,
``qetjax.pvq.encode_index(y)``, ``qetjax.pvq.decode_index(index, D, K)``.

Submodules: :mod:`~qetjax.methods.pvq.enumeration` (exact multi-limb indices),
:mod:`~qetjax.methods.pvq.projection` (greedy and round-and-fix),
:mod:`~qetjax.methods.pvq.gains` (Beta quantiles, Lloyd-Max),
:mod:`~qetjax.methods.pvq.quantizer` (the method and its budget solver).

Example:
    >>> import jax, qetjax
    >>> qetjax.pvq.num_points(3, 3)
    38
    >>> q = qetjax.pvq(group_size=32, pulses=24, gain_bits=4)
    >>> qa = qetjax.quantize(q, jax.random.key(0), jax.random.normal(jax.random.key(1), (8, 64)))
"""

import sys
import types

from qetjax.methods.pvq.enumeration import decode_index, encode_index, index_bits, num_points
from qetjax.methods.pvq.quantizer import pvq

__all__ = ["decode_index", "encode_index", "index_bits", "num_points", "pvq"]


class _CallableModule(types.ModuleType):
    """This package's module type: calling the module calls :func:`pvq`."""

    def __call__(self, *args, **kwargs):
        return pvq(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
