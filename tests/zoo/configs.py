"""Tiny random builds for tests: the engine's (:mod:`lightning_ulysses.support.configs`)."""

from lightning_ulysses.support.configs import build_tiny, tiny_config_kwargs  # noqa: F401
