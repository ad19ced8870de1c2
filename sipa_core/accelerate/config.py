"""The accelerate stage's parameters: the schema of its ``accelerate`` section, read and checked
before any work, and the keys a file sets that its own settings leave unused."""

from __future__ import annotations

from pathlib import Path

from sipa_core.accelerate.exits import LOSSES
from sipa_core.errors import SipaError
from sipa_core.params import Field, check_section, refuse_keys
from sipa_core.paths import path_fields, read_params
from sipa_core.train.recipe import check_recipe, refuse_distillation


def _positions(value) -> str | None:
    if not value:
        return "must list at least one block index"
    if not all((isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v)
               for v in value):
        return "must be a list of block indices (integers >= 0) or module names"
    if len(set(value)) != len(value):
        return "lists a position twice"
    return None


def _thresholds(value) -> str | None:
    if value is None:
        return None
    if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a non-empty list of numbers"
    if not all(0 <= v <= 1 for v in value):
        return "every threshold must be in [0, 1] (a maximum softmax)"
    return None


def _exit_schedule(value) -> str | None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in value):
        return "every target must be a number in (0, 1)"
    if any(b <= a for a, b in zip(value, value[1:])):
        return "targets must increase (they are cumulative)"
    return None


ACCELERATE_SCHEMA = {
    "positions": Field(list, [2, 4], check=_positions,
                       help="candidate blocks to attach the exit after: indices into the network's blocks or "
                            "module names (docs/networks.md)"),
    "width": Field(int, None, nullable=True, min=1, help="exit's 1x1 expansion width (null: the head width)"),
    "kernel": Field(int, 3, min=1, help="exit's depthwise kernel"),
    "loss": Field(str, "softsmoothing", choices=LOSSES),
    "compare_loss": Field(bool, True, help="also train the other loss at the chosen position (risk-coverage)"),
    "epochs": Field(int, 3, min=1, help="exit training epochs (the paper: 800)"),
    "recipe": Field(dict, {"lr": 0.05, "batch_size": 64},
                    help="overrides of the exit recipe (EXIT_RECIPE in accelerate/training.py: one-hot "
                         "softsmoothing, no mixup)"),
    "update_main_bn": Field(bool, False, help="let the frozen main network's BatchNorm statistics update"),
    "thresholds": Field(list, None, nullable=True, check=_thresholds,
                        help="candidate confidence thresholds (null: 0.05, 0.06, ..., 0.99)"),
    "table_thresholds": Field(list, [0.85, 0.88, 0.92], check=_thresholds,
                              help="thresholds shown for every position in the exit table (Table 2)"),
    "min_accuracy": Field(float, None, nullable=True, min=0, max=1, help="validation accuracy target (absolute)"),
    "allow_no_exit": Field(bool, True, help="pass the main network through when no exit lowers its score (the "
                                            "quantizing stage applies the same rule, recorded in the exit)"),
    "max_drop": Field(float, 0.04, nullable=True, min=0, max=1,
                      help="validation accuracy target: at most this below the main network's"),
    "exit_schedule": Field(list, [], check=_exit_schedule,
                           help="prune the exit module in rounds to these cumulative sparsities (the pruning "
                                "stage's masks), retraining it after each; [] = keep it dense"),
    "exit_prune_epochs": Field(int, 1, min=0, help="exit retraining epochs after each pruning round"),
    "exit_stabilize_epochs": Field(int, 0, min=0,
                                   help="final epochs of the exit at exit_stabilize_lr with crop/flip only"),
    "exit_stabilize_lr": Field(float, 0.001, min=0, min_exclusive=True),
    "bits": Field(int, 16, min=1, max=32),
    "seed": Field(int, 0, min=0),
    **path_fields('accelerate', model=('prune', 'out'), data=('prepare', 'out')),
}


def read_config(params_path: str | Path) -> dict:
    data = read_params(params_path)
    cfg = check_section(data.get("accelerate"), ACCELERATE_SCHEMA, file=params_path, section="accelerate")
    refuse_keys(cfg["recipe"], ("epochs", "seed"), file=params_path, section="accelerate.recipe",
                why="set accelerate.epochs / accelerate.seed instead (the stage sets these itself)")
    check_recipe({**cfg["recipe"], "epochs": cfg["epochs"]}, file=params_path, section="accelerate.recipe")
    refuse_distillation(cfg["recipe"], file=params_path, section="accelerate.recipe")
    if cfg["kernel"] % 2 != 1:
        raise SipaError(f"{params_path}: accelerate.kernel: must be odd (same padding), got {cfg['kernel']}")
    if cfg["thresholds"] is None:
        cfg["thresholds"] = [round(0.05 + 0.01 * i, 2) for i in range(95)]
    return cfg


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that these settings do not use."""
    out = []
    if not cfg["exit_schedule"] and "exit_prune_epochs" in raw:
        out.append("accelerate.exit_prune_epochs: exit_schedule is empty (the exit stays dense)")
    if not cfg["exit_stabilize_epochs"] and "exit_stabilize_lr" in raw:
        out.append("accelerate.exit_stabilize_lr: exit_stabilize_epochs is 0")
    return out
