"""Pruning (SIPA section 2.3): magnitude masks and filter removal, and the rounds of the stage."""

from sipa_core.prune.masks import (GRANULARITIES, NORMALIZATIONS, SCOPES, apply_masks, full_masks, layer_table,
                                   magnitude_masks, masks_from_zeros, prunable, refresh_spec, remove_filters, scores,
                                   sparsity)
from sipa_core.prune.rounds import select_round
from sipa_core.prune.stage import PAPER_SCHEDULE, PRUNE_SCHEMA, STAGE, prune, read_config

__all__ = ["GRANULARITIES", "NORMALIZATIONS", "PAPER_SCHEDULE", "PRUNE_SCHEMA", "SCOPES", "STAGE", "apply_masks",
           "full_masks", "layer_table", "magnitude_masks", "masks_from_zeros", "prunable", "prune", "read_config",
           "refresh_spec", "remove_filters", "scores", "select_round", "sparsity"]
