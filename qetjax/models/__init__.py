"""Flax models with real weights."""
