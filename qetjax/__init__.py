"""qetjax: matrix quantization in JAX, with every stored bit counted.

Example:
    >>> import jax, qetjax
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> qa = qetjax.quantize(qetjax.pq(4, 256), jax.random.key(1), x)
    >>> x_hat = qetjax.dequantize(qa)
    >>> qa.bits_per_element, qetjax.bits(qa)["total"]
"""

from qetjax import kmeans, metrics, packing
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
from qetjax.pq import pq
from qetjax import gptq, pvq, rotations
from qetjax.opq import opq
from qetjax.lopq import lopq
from qetjax.rq import rq
from qetjax.lsq import lsq
from qetjax.scalar import lloyd_max, rtn
from qetjax.io import load, save
from qetjax.tree import dequantize_tree, quantize_tree
from qetjax import data, swap_tree
from qetjax.qet import qet, qet_paper, qet_residual
