"""Accelerating (SIPA section 2.4): the exit module and adaptive inference (``exits``), the exit
rule (``rule``), exit training (``training``), choosing the exit (``selection``), the two losses
compared (``compare``), the exit record of a checkpoint (``record``), and the stage."""

from sipa_core.accelerate.config import ACCELERATE_SCHEMA, read_config
from sipa_core.accelerate.exits import (LOSS_FUNCTIONS, LOSSES, EarlyExitNetwork, ExitConfig, ExitCost, ExitModule,
                                        adaptive_predictions, create_exit, cross_entropy_loss, exit_config, exit_cost,
                                        risk_coverage, simulate, softsmoothing_loss)
from sipa_core.accelerate.record import ExitRecord, float_exit_network, load_early_exit
from sipa_core.accelerate.rule import (ExitDecision, ExitRule, MainNetwork, ThresholdPoint, choose, decide, most_exits,
                                       sweep)
from sipa_core.accelerate.stage import STAGE, accelerate
from sipa_core.accelerate.training import EXIT_RECIPE, ExitTrainer, exit_recipe

__all__ = ["ACCELERATE_SCHEMA", "EXIT_RECIPE", "EarlyExitNetwork", "ExitConfig", "ExitCost", "ExitDecision",
           "ExitModule", "ExitRecord", "ExitRule", "ExitTrainer", "LOSSES", "LOSS_FUNCTIONS", "MainNetwork", "STAGE",
           "ThresholdPoint", "accelerate", "adaptive_predictions", "choose", "create_exit", "cross_entropy_loss",
           "decide", "exit_config", "exit_cost", "exit_recipe", "float_exit_network", "load_early_exit", "most_exits",
           "read_config", "risk_coverage", "simulate", "softsmoothing_loss", "sweep"]
