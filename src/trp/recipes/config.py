"""Validation of a composed recipe config: bad keys and values fail early, naming the key.

The checks live with the schema (:mod:`trp.recipes.schema`, the dataclasses the YAML configs
extend); this module keeps the public names ``validate_config`` and ``ConfigError``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from trp.recipes.schema import BOX_REGION_TARGETS, STRATEGIES, ConfigError, validate

__all__ = [
    "BOX_REGION_TARGETS",
    "STRATEGIES",
    "ConfigError",
    "validate_config",
]


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for an unknown key (also one added with ``+``), a missing
    required value or a bad value of ``cfg``, naming the key (see :func:`schema.validate`)."""
    validate(cfg)
