"""The training engine shared by every stage."""

from sipa_core.runtime import resolve_device
from sipa_core.train.engine import (FitResult, TrainingDiverged, fit, set_determinism, soft_cross_entropy,
                                    train_one_epoch)
from sipa_core.train.evaluation import accuracy, evaluate, sixteen_bit, normalized, predict
from sipa_core.train.recipe import RECIPE_SCHEMA, check_recipe, default_recipe
from sipa_core.train.structure import GhostBatchNorm2d, apply_ghost_bn, configure_model, swap_activations

__all__ = ["FitResult", "TrainingDiverged", "GhostBatchNorm2d", "RECIPE_SCHEMA", "accuracy", "apply_ghost_bn",
           "check_recipe", "configure_model", "default_recipe", "evaluate", "fit", "sixteen_bit", "normalized",
           "predict", "resolve_device", "set_determinism", "soft_cross_entropy", "swap_activations",
           "train_one_epoch"]
