"""Shared test configuration: hypothesis profiles.

``default`` keeps the suite fast (few examples, no deadline: the first call of a
jitted function compiles, which would trip hypothesis' per-example deadline).
``thorough`` runs many more examples: ``pytest --hypothesis-profile=thorough``.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("default")
