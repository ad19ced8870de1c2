"""Choosing the exit (SIPA Table 2): every candidate position's exit trained and simulated at
every threshold from cached logits, the rule's decision on validation, the exit table, and
the test figures at the choice, the real adaptive forward checked against the simulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sipa_core.accelerate.exits import adaptive_predictions, exit_cost, simulate
from sipa_core.accelerate.rule import MainNetwork, ThresholdPoint, sweep
from sipa_core.accelerate.training import ExitTrainer, TrainedExit
from sipa_core.prune.masks import sparsity
from sipa_core.train import sixteen_bit
from sipa_core.train.evaluation import accuracy

EXIT_TABLE_COLUMNS = ["position", "channels", "size", "path_ops_ratio", "added_params_ratio", "threshold",
                      "val_exit_ratio", "val_accuracy", "exit_ratio", "accuracy", "path_accuracy", "ops", "score",
                      "score_tree", "chosen"]


@dataclass
class ExitSweep:
    """Every position's trained exit, its rows at every threshold (by (position, threshold)), and
    the candidates the rule chooses from (``thresholds``)."""

    exits: dict[int, TrainedExit]
    rows: dict[tuple[int, float], dict]
    candidates: list[ThresholdPoint]


def table_row(trained: TrainedExit, point: ThresholdPoint, path_accuracy: float) -> dict:
    """One (position, threshold) row of the exit table (Table 2)."""
    cfg, cost = trained.net.exit_cfg, trained.cost
    return {"position": point.position, "channels": cfg.channels, "size": cfg.size,
            "path_ops_ratio": (cost.path_ops + cost.exit_ops) / cost.full_ops,
            "added_params_ratio": cost.exit_bytes / cost.main_bytes, "threshold": point.threshold,
            "val_exit_ratio": point.val_exit_ratio, "val_accuracy": point.val_accuracy,
            "exit_ratio": point.exit_ratio, "accuracy": point.accuracy, "path_accuracy": path_accuracy,
            "ops": point.ops, "score": point.score, "score_tree": point.score_tree}


def sweep_positions(trainer: ExitTrainer) -> ExitSweep:
    """Train every position's exit and simulate it at every threshold."""
    cfg, reader = trainer.cfg, trainer.splits
    h = reader.data.image_size[0]
    labels = {s: reader.labels(s) for s in ("val", "test")}
    thresholds = sorted(set(cfg["thresholds"]) | set(cfg["table_thresholds"]))
    out = ExitSweep({}, {}, [])
    for position in cfg["positions"]:
        net, saved = trainer.train_exit(position, cfg["loss"])
        trained = TrainedExit(net, saved, trainer.main_logits_for(net), exit_cost(net, (3, h, h), bits=cfg["bits"]))
        out.exits[position] = trained
        path_accuracy = accuracy(saved["test"], labels["test"])  # the exit alone, once per position
        for point in sweep(trained.logits, trained.main_logits, labels, thresholds, trained.cost, position):
            out.rows[(position, point.threshold)] = table_row(trained, point, path_accuracy)
            if point.threshold in cfg["thresholds"]:
                out.candidates.append(point)
    return out


def table_rows(table: ExitSweep, thresholds: list, chosen: ThresholdPoint | None) -> list[dict]:
    """The exit table: every position at ``table_thresholds`` and the chosen point, marked."""
    key = (chosen.position, chosen.threshold) if chosen is not None else None
    keys = {k for k in table.rows if k[1] in thresholds} | ({key} if key else set())
    return [{**table.rows[k], "chosen": "yes" if k == key else "no"} for k in sorted(keys)]


def passthrough_metrics(main: MainNetwork) -> dict:
    """No exit kept: the main network passes through unchanged."""
    return {**main.score, "accuracy": main.test_accuracy, "exit_position": None, "threshold": None,
            "exit_ratio": 0.0, "val_exit_ratio": 0.0, "passthrough": True, "accuracy_change": 0.0, "ops_saving": 0.0}


def exit_metrics(trainer: ExitTrainer, trained: TrainedExit, chosen: ThresholdPoint, path_accuracy: float,
                 main: MainNetwork) -> dict:
    """Test figures at the chosen (position, threshold), and the adaptive forward's check."""
    reader = trainer.splits
    y_test = reader.labels("test")
    tpred, texit = simulate(trained.saved["test"], trained.main_logits["test"], chosen.threshold)
    # Real adaptive inference on the test split must give the simulated predictions.
    adaptive_pred = adaptive_predictions(sixteen_bit(trained.net) if trainer.fp16 else trained.net,
                                         reader.data.split("test")[0], reader.data, chosen.threshold,
                                         reader.batch_size)
    test_ratio = float(texit.float().mean())
    exited = texit.nonzero().squeeze(1)
    out = {**trained.cost.summary(test_ratio),
           "accuracy": accuracy(tpred, y_test), "exit_position": chosen.position, "threshold": chosen.threshold,
           "exit_ratio": test_ratio, "val_exit_ratio": chosen.val_exit_ratio, "val_accuracy": chosen.val_accuracy,
           "path_accuracy": path_accuracy,
           "exited_accuracy": accuracy(tpred[exited], y_test[exited]) if len(exited) else None,
           "adaptive_matches_simulated": bool(torch.equal(adaptive_pred, tpred)), "passthrough": False,
           "exit_sparsity": sparsity(trained.net.exit), "exit_bytes": trained.cost.exit_bytes}
    out["accuracy_change"] = out["accuracy"] - main.test_accuracy
    out["ops_saving"] = 1 - out["ops"] / main.score["ops"]
    return out
