"""Accelerating (SIPA section 2.4): the exit module, softsmoothing, adaptive inference and exit costs, and the stage."""

from sipa_core.accelerate.exits import (LOSS_FUNCTIONS, LOSSES, EarlyExitNetwork, ExitCost, ExitModule, create_exit,
                                        cross_entropy_loss, exit_config, exit_cost, from_record, risk_coverage,
                                        simulate, softsmoothing_loss)
from sipa_core.accelerate.rule import ExitRule, ThresholdPoint, choose, most_exits, sweep
from sipa_core.accelerate.stage import (ACCELERATE_SCHEMA, STAGE, ExitRun, accelerate, adaptive_predictions,
                                        load_early_exit, read_config)

__all__ = ["ACCELERATE_SCHEMA", "EarlyExitNetwork", "ExitCost", "ExitModule", "ExitRule", "ExitRun", "LOSSES",
           "LOSS_FUNCTIONS", "STAGE", "ThresholdPoint", "accelerate", "adaptive_predictions", "create_exit", "choose",
           "cross_entropy_loss", "exit_config", "exit_cost", "from_record", "load_early_exit", "most_exits",
           "read_config", "risk_coverage", "simulate", "softsmoothing_loss", "sweep"]
