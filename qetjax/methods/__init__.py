"""The quantization methods, one module each; importing this package registers them all.

Each module owns its constructor and its budget solver and registers both under the
method's name (:func:`qetjax.core.register_method`, :func:`qetjax.core.register_budget`),
so :func:`qetjax.for_budget` and ``qetjax-bench`` find every method here.

Example:
    >>> from qetjax.methods import pq
    >>> q = pq.pq(subvector_dim=4, num_centroids=256)
"""

from qetjax.methods import lopq, lsq, opq, pq, pvq, qet, rq, scalar, trellis

__all__ = ["lopq", "lsq", "opq", "pq", "pvq", "qet", "rq", "scalar", "trellis"]
