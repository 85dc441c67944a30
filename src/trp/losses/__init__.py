"""Losses and matching of trp's decoder heads."""

from trp.losses.matcher import HungarianMatcher, assign, flatten_targets

__all__ = ["HungarianMatcher", "assign", "flatten_targets"]
