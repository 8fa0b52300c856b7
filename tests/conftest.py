"""Shared test configuration: hypothesis profiles and freeing compiled code.

``default`` keeps the suite fast (few examples, no deadline: the first call of a
jitted function compiles, which would trip hypothesis' per-example deadline).
``thorough`` runs many more examples: ``pytest --hypothesis-profile=thorough``.
"""

import gc

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("default")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop JAX's compiled executables after each test module.

    Each XLA:CPU executable keeps a few memory mappings of JIT code; a worker that
    runs the whole suite compiles thousands of them and reached the kernel's
    ``vm.max_map_count`` (65530) in CI, where every later ``mmap`` failed with a
    ``MemoryError`` (CI run of 2026-12-03). Modules rarely share shapes, so
    little is recompiled.
    """
    yield
    jax.clear_caches()
    gc.collect()
