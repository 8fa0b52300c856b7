"""qetjax: matrix quantization in JAX, with every stored bit counted.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> qa = qetjax.quantize(qetjax.pq(4, 256), jax.random.key(1), x)
    >>> x_hat = qetjax.dequantize(qa)
    >>> qa.bits_per_element, qetjax.bits(qa)["total"]
"""

import importlib as _importlib
import sys as _sys

# Modules (engines, integration), the core abstraction, the methods (each registers its constructor and
# budget solver on import), parameter trees and files, fine-tuning.
from qetjax import (
    calibration,
    codebooks,
    combinators,
    gptq,
    kmeans,
    kv,
    metrics,
    nn,
    packing,
    rotations,
    sharding,
    swap_tree,
)
from qetjax.bench import data
from qetjax.budget import for_budget
from qetjax.combinators import residual
from qetjax.core import (
    METHODS,
    QuantizedArray,
    Quantizer,
    Spec,
    bits,
    dequantize,
    encode_with,
    fit,
    quantize,
    quantize_batch,
    stored_bits,
)
from qetjax.finetune import finetune
from qetjax.io import load, save
from qetjax.methods import pvq
from qetjax.methods.lopq import lopq
from qetjax.methods.lsq import lsq
from qetjax.methods.opq import opq
from qetjax.methods.pq import pq
from qetjax.methods.qet import qet, qet_paper, qet_residual
from qetjax.methods.rq import rq
from qetjax.methods.scalar import lloyd_max, nf, rotated_rtn, rtn
from qetjax.methods.trellis import trellis
from qetjax.tree import dequantize_tree, quantize_tree

# Module paths of releases before the folders by layer (``qetjax.pq``, ``qetjax.eval``, ...)
# stay importable: each names the module that now holds that code.
_MOVED = {"scalar": "methods.scalar", "pq": "methods.pq", "qet": "methods.qet", "opq": "methods.opq",
          "lopq": "methods.lopq", "rq": "methods.rq", "lsq": "methods.lsq", "pvq": "methods.pvq",
          "data": "bench.data", "corpus": "bench.corpus"}
for _old, _new in _MOVED.items():
    _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f"{__name__}.{_new}")
del _old, _new

__all__ = [
    # modules
    "calibration", "codebooks", "combinators", "data", "gptq", "kmeans", "kv", "metrics", "nn", "packing", "pvq",
    "rotations", "sharding", "swap_tree",
    # the core abstraction
    "METHODS", "QuantizedArray", "Quantizer", "Spec", "bits", "dequantize", "encode_with", "fit", "for_budget",
    "quantize", "quantize_batch", "residual", "stored_bits",
    # methods
    "lloyd_max", "lopq", "lsq", "opq", "pq", "qet", "qet_paper", "qet_residual", "rq", "rtn", "trellis",
    "nf", "rotated_rtn",
    # parameter trees and files
    "dequantize_tree", "finetune", "load", "quantize_tree", "save",
]
