"""qetjax: matrix quantization in JAX, with every stored bit counted.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> qa = qetjax.quantize(qetjax.pq(4, 256), jax.random.key(1), x)
    >>> x_hat = qetjax.dequantize(qa)
    >>> qa.bits_per_element, qetjax.bits(qa)["total"]
"""

# Engines and helpers, as modules.
from qetjax import data, gptq, kmeans, kv, metrics, packing, pvq, rotations, swap_tree

# The core abstraction.
from qetjax.budget import for_budget
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
    residual,
    stored_bits,
)

# Methods (each registers its constructor and budget solver on import).
from qetjax.lopq import lopq
from qetjax.lsq import lsq
from qetjax.opq import opq
from qetjax.pq import pq
from qetjax.qet import qet, qet_paper, qet_residual
from qetjax.rq import rq
from qetjax.scalar import lloyd_max, rtn

# Parameter trees and files.
from qetjax.io import load, save
from qetjax.tree import dequantize_tree, quantize_tree
