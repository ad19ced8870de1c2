"""The Accelerating stage (SIPA section 2.4, Appendix A.4): early exit.

For each candidate position an exit module is trained on the frozen main
network (softsmoothing or cross-entropy loss). The exit and main logits of
the validation and test splits are cached, so choosing a threshold needs no
new forward pass. The (position, threshold) pair is chosen on the validation
split only: the lowest MicroNet score whose validation accuracy meets the
target. Test accuracy and exit ratio are then reported at that choice, and
the real adaptive forward is checked against the simulated predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sipa_core.accelerate.exits import (LOSS_FUNCTIONS, LOSSES, EarlyExitNetwork, ExitCost, exit_config, exit_cost,
                                        from_record, risk_coverage, simulate)
from sipa_core.accelerate.rule import ExitRule, ThresholdPoint, choose, most_exits, threshold_point, sweep
from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_write_csv, publish_metrics, publishing
from sipa_core.lineage import input_lineage, refuse_trained_split
from sipa_core.paths import path_fields
from sipa_core.params import Field, check_section, load_yaml, refuse_keys
from sipa_core.prune.masks import apply_masks, full_masks, magnitude_masks, sparsity
from sipa_core.resume import file_digest, keep, load_kept, run_key
from sipa_core.runtime import provenance
from sipa_core.stage_common import load_data, load_input_model, score_metrics
from sipa_core.stage_runner import Stage
from sipa_core.train import fit, sixteen_bit, normalized, predict
from sipa_core.train.evaluation import accuracy
from sipa_core.train.recipe import check_recipe, refuse_distillation, speed_settings

LOGITS_FORMAT = "sipa-exit-logits"

# The exit's own recipe (the authors' code): softsmoothing on ONE-HOT targets, no mixup or CutMix,
# SGD lr 0.13, weight decay 1e-5 without bias decay, cosine; whatever the main network trained with.
EXIT_RECIPE = {"lr": 0.13, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-5, "no_bias_decay": True,
               "batch_size": 128, "schedule": "cosine", "warmup_epochs": 0, "label_smoothing": 0.0,
               "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ghost_batch": 0, "augment": "none"}


def _positions(value) -> str | None:
    if not value:
        return "must list at least one block index"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return "must be a list of block indices (integers >= 0)"
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
    "positions": Field(list, [2, 4], check=_positions, help="candidate blocks to attach the exit after"),
    "width": Field(int, None, nullable=True, min=1, help="exit's 1x1 expansion width (null: the head width)"),
    "kernel": Field(int, 3, min=1, help="exit's depthwise kernel"),
    "loss": Field(str, "softsmoothing", choices=LOSSES),
    "compare_loss": Field(bool, True, help="also train the other loss at the chosen position (risk-coverage)"),
    "epochs": Field(int, 3, min=1, help="exit training epochs (the paper: 800)"),
    "recipe": Field(dict, {"lr": 0.05, "batch_size": 64},
                    help="overrides of the exit recipe (EXIT_RECIPE: one-hot softsmoothing, no mixup)"),
    "update_main_bn": Field(bool, False, help="let the frozen main network's BatchNorm statistics update"),
    "thresholds": Field(list, None, nullable=True, check=_thresholds,
                        help="candidate confidence thresholds (null: 0.05, 0.06, ..., 0.99)"),
    "table_thresholds": Field(list, [0.85, 0.88, 0.92], check=_thresholds,
                              help="thresholds shown for every position in the exit table (Table 2)"),
    "min_accuracy": Field(float, None, nullable=True, min=0, max=1, help="validation accuracy target (absolute)"),
    "allow_no_exit": Field(bool, True, help="pass the main network through when no exit lowers its score"),
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
    data = load_yaml(params_path)
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


EXIT_TABLE_COLUMNS = ["position", "channels", "size", "path_ops_ratio", "added_params_ratio", "threshold",
                      "val_exit_ratio", "val_accuracy", "exit_ratio", "accuracy", "path_accuracy", "ops", "score",
                      "score_tree", "chosen"]


@dataclass
class TrainedExit:
    """One position's trained exit: the network, its kept record (weights and the exit's
    validation and test logits), the main network's logits it is read with, its cost."""

    net: EarlyExitNetwork
    saved: dict
    main_logits: dict
    cost: ExitCost

    @property
    def logits(self) -> dict:
        return {s: self.saved[s] for s in ("val", "test")}


@dataclass
class ExitRun:
    """The state of one accelerate run: the frozen main network, its cached
    logits, the exit recipe, the keys of kept work, and the trained exits."""

    cfg: dict
    data: object
    main: torch.nn.Module
    recipe: dict
    key_base: dict
    lineage: dict
    progress: bool | None = None
    main_logits: dict = field(default_factory=dict)
    exits: dict[int, TrainedExit] = field(default_factory=dict)

    @property
    def fp16(self) -> bool:
        return self.cfg["bits"] == 16

    @property
    def state(self) -> Path:
        return Path(self.cfg["state"])

    def labels(self, split: str) -> torch.Tensor:
        return self.data.split(split)[1]

    def split_labels(self) -> dict:
        return {s: self.labels(s) for s in ("val", "test")}

    def logits_of(self, model, split: str) -> torch.Tensor:
        x, _ = self.data.split(split)
        return predict(model, x, self.data.mean, self.data.std, batch_size=self.recipe["eval_batch_size"],
                       fp16=self.fp16)

    def load_main_logits(self) -> None:
        """The main network's validation and test logits, computed once and kept."""
        path = self.state / f"main-{run_key(self.key_base)}.pt"
        cached = load_kept(path, LOGITS_FORMAT, what="cached logits")
        if cached is None:
            cached = keep(path, {s: self.logits_of(self.main, s) for s in ("val", "test")}, LOGITS_FORMAT)
        self.main_logits = {"val": cached["val"], "test": cached["test"]}

    def main_logits_for(self, net) -> dict:
        """With BN updates the main network changed too: its logits come from this exit's run."""
        if not self.cfg["update_main_bn"]:
            return self.main_logits
        return {s: self.logits_of(net.main, s) for s in ("val", "test")}  # at 16 bits where counted so

    def train_mode(self, model) -> None:
        model.eval()
        model.exit.train()
        if self.cfg["update_main_bn"]:  # the authors' setting: BN statistics of the frozen main network move
            for m in model.main.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()

    def train_exit(self, position: int, loss: str):
        """Train (or load) the exit at ``position`` with ``loss``; (network, kept record with its logits)."""
        cfg = self.cfg
        ecfg = exit_config(self.main, position, cfg["width"], cfg["kernel"])
        run_dir = self.state / f"exit{position}-{loss}-{run_key({**self.key_base, 'exit': ecfg, 'loss': loss})}"
        torch.manual_seed(cfg["seed"] + position)
        net = EarlyExitNetwork(self.main, ecfg)
        saved = load_kept(run_dir / "result.pt", LOGITS_FORMAT, what="exit result",
                          announce=f"exit after block {position} ({loss})")
        if saved is not None:
            net.exit.load_state_dict(saved["exit"])
            if cfg["update_main_bn"]:
                net.main.load_state_dict(saved["main"])
            return net, saved
        started = time.time()
        self._fit_exit(net, position, loss, run_dir)
        return net, self._keep_exit(net, ecfg, run_dir, started)

    def _fit_exit(self, net, position: int, loss: str, run_dir: Path) -> None:
        """Exit training on the frozen main network, then (optionally) gradual exit pruning and the
        stabilisation of the exit path."""
        cfg = self.cfg
        common = dict(params=list(net.exit.parameters()), loss_fn=LOSS_FUNCTIONS[loss], train_mode=self.train_mode,
                      val_split="val", progress=self.progress, train_splits=tuple(self.lineage["splits"]))
        fit(net, self.data, self.recipe, state_path=run_dir / "train.pt", tag=f"exit{position}-{loss}",
            desc=f"exit after block {position} ({loss})", **common)
        masks = self._prune_exit(net, common, position, loss, run_dir)
        if cfg["exit_stabilize_epochs"] > 0:  # the paper's stabilisation of the exit path
            stable = {**self.recipe, "epochs": 0, "stabilize_epochs": cfg["exit_stabilize_epochs"],
                      "stabilize_lr": cfg["exit_stabilize_lr"]}
            fit(net, self.data, stable, state_path=run_dir / "stabilize.pt", tag=f"exit{position}-{loss}-stable",
                desc=f"exit {position} stabilisation", after_step=(lambda m: apply_masks(m.exit, masks)) if masks
                else None, **common)

    def _prune_exit(self, net, common: dict, position: int, loss: str, run_dir: Path) -> dict:
        """Gradual pruning of the exit module: one round per ``exit_schedule`` target, each retrained
        (resumable per round); returns the final masks ({} when the exit stays dense)."""
        cfg, masks = self.cfg, {}
        for k, target in enumerate(cfg["exit_schedule"], start=1):
            masks = magnitude_masks(net.exit, masks or full_masks(net.exit), target, scope="global", normalize="l2")
            apply_masks(net.exit, masks)
            if cfg["exit_prune_epochs"] > 0:
                fit(net, self.data, {**self.recipe, "epochs": cfg["exit_prune_epochs"]},
                    state_path=run_dir / f"prune_{k:02d}.pt", tag=f"exit{position}-{loss}-pruned-{k}",
                    desc=f"exit {position} pruning round {k}/{len(cfg['exit_schedule'])}",
                    after_step=lambda m, masks=masks: apply_masks(m.exit, masks), **common)
        return masks

    def _keep_exit(self, net, ecfg: dict, run_dir: Path, started: float) -> dict:
        net.cpu().eval()
        scored = sixteen_bit(net) if self.fp16 else net
        out = {"exit": net.exit.state_dict(), "exit_cfg": ecfg,
               "main": net.main.state_dict() if self.cfg["update_main_bn"] else None}
        for split in ("val", "test"):
            x, _ = self.data.split(split)
            out[split] = predict(scored, x, self.data.mean, self.data.std,
                                 batch_size=self.recipe["eval_batch_size"])  # exit logits
        saved = keep(run_dir / "result.pt", out, LOGITS_FORMAT, since=started)
        fault_point("exit")
        return saved


def table_row(trained: TrainedExit, point: ThresholdPoint, path_accuracy: float) -> dict:
    """One (position, threshold) row of the exit table (Table 2)."""
    net, cost = trained.net, trained.cost
    return {"position": point.position, "channels": net.exit_cfg["channels"], "size": net.exit_cfg["size"],
            "path_ops_ratio": (cost.path_ops + cost.exit_ops) / cost.full_ops,
            "added_params_ratio": cost.exit_bytes / cost.main_bytes, "threshold": point.threshold,
            "val_exit_ratio": point.val_exit_ratio, "val_accuracy": point.val_accuracy,
            "exit_ratio": point.exit_ratio, "accuracy": point.accuracy, "path_accuracy": path_accuracy,
            "ops": point.ops, "score": point.score, "score_tree": point.score_tree}


def _load_main(cfg: dict, params_file: str):
    """Data and the frozen main network, checked against the positions."""
    where = f"{params_file}: accelerate"
    data = load_data(cfg["data"], f"{where}.data")
    main, meta = load_input_model(Path(cfg["model"]), data, f"{where}.model", "pruning")
    if not hasattr(main, "boundaries"):
        raise SipaError(f"{where}.model: early exits need an EfficientNet-family network")
    last = len(main.boundaries()) - 2
    bad = [p for p in cfg["positions"] if p > last]
    if bad:
        raise SipaError(f"{where}.positions: block {bad[0]} is past the last place an exit can go "
                        f"(this network has blocks 0..{last + 1}; an exit goes after 0..{last})")
    if len(data.val_y) == 0:
        raise SipaError(f"{where}: the threshold is chosen on the validation split, but prepare.val_size is 0")
    main.eval()
    for p in main.parameters():
        p.requires_grad_(False)
    return data, main, meta


def exit_recipe(cfg: dict, meta: dict, params_file: str) -> dict:
    """The exit's training recipe: ``EXIT_RECIPE`` (one-hot targets, no mixing), the input
    checkpoint's speed settings only, then ``accelerate.recipe``."""
    return check_recipe({**EXIT_RECIPE, **speed_settings(meta.get("recipe")), **cfg["recipe"],
                         "epochs": cfg["epochs"], "seed": cfg["seed"]},
                        file=params_file, section="accelerate.recipe")


def _start_run(cfg: dict, params_file: str, progress) -> tuple[ExitRun, dict]:
    data, main, meta = _load_main(cfg, params_file)
    lineage = input_lineage(meta, data, f"{params_file}: accelerate.model", cfg["model"])
    refuse_trained_split("val", lineage, f"{params_file}: accelerate.thresholds (calibrated on val)", cfg["model"])
    recipe = exit_recipe(cfg, meta, params_file)
    key_base = {"input": file_digest(cfg["model"]), "data": data.source, "recipe": recipe, "bits": cfg["bits"],
                "width": cfg["width"], "kernel": cfg["kernel"], "update_main_bn": cfg["update_main_bn"],
                "exit_schedule": cfg["exit_schedule"], "exit_prune_epochs": cfg["exit_prune_epochs"],
                "exit_stabilize": [cfg["exit_stabilize_epochs"], cfg["exit_stabilize_lr"]]}
    key_base["splits"] = lineage["splits"]
    run = ExitRun(cfg, data, main, recipe, key_base, lineage, progress)
    run.load_main_logits()
    return run, meta


@dataclass
class ExitSweep:
    """Every position's exit at every threshold: the table rows (``table_thresholds``, by
    (position, threshold)) and the candidates the rule chooses from (``thresholds``)."""

    rows: dict[tuple[int, float], dict]
    candidates: list[ThresholdPoint]


def _sweep(run: ExitRun) -> ExitSweep:
    """Train every position's exit and simulate it at every threshold."""
    cfg = run.cfg
    h = run.data.image_size[0]
    labels = run.split_labels()
    rows, candidates = {}, []
    for position in cfg["positions"]:
        net, saved = run.train_exit(position, cfg["loss"])
        trained = TrainedExit(net, saved, run.main_logits_for(net), exit_cost(net, (3, h, h), bits=cfg["bits"]))
        run.exits[position] = trained
        path_accuracy = accuracy(saved["test"], labels["test"])  # the exit alone, once per position
        thresholds = sorted(set(cfg["thresholds"]) | set(cfg["table_thresholds"]))
        for point in sweep(trained.logits, trained.main_logits, labels, thresholds, trained.cost, position):
            rows[(position, point.threshold)] = table_row(trained, point, path_accuracy)
            if point.threshold in cfg["thresholds"]:
                candidates.append(point)
    return ExitSweep(rows, candidates)


@dataclass(frozen=True)
class MainNetwork:
    """The main network's figures the exit is judged against."""

    val_accuracy: float
    test_accuracy: float
    score: dict  # its MicroNet keys (score_metrics)


@dataclass(frozen=True)
class ExitDecision:
    """What the rule chose on validation: a point, or none and why."""

    chosen: ThresholdPoint | None
    target: float
    passthrough_reason: str | None = None
    best_exit_score: float | None = None

    def metrics(self) -> dict:
        out = {"val_target": self.target}
        if self.passthrough_reason is not None:
            out["passthrough_reason"] = self.passthrough_reason
        if self.best_exit_score is not None:
            out["best_exit_score"] = self.best_exit_score
        return out


def decide(candidates: list[ThresholdPoint], rule: ExitRule, main: MainNetwork, allow_no_exit: bool) -> ExitDecision:
    """The chosen candidate on validation, or none (with the reason) when the network passes through."""
    target = rule.target(main.val_accuracy)
    chosen = choose(candidates, target)
    if chosen is None:
        return ExitDecision(None, target, "no exit meets the validation accuracy target")
    if allow_no_exit and chosen.score >= main.score["score"]:
        return ExitDecision(None, target, f"the best exit (score {chosen.score:.6f}) does not lower the score",
                            chosen.score)
    return ExitDecision(chosen, target)


def _passthrough_metrics(main: MainNetwork) -> dict:
    """No exit kept: the main network passes through unchanged."""
    return {**main.score, "accuracy": main.test_accuracy, "exit_position": None, "threshold": None,
            "exit_ratio": 0.0, "val_exit_ratio": 0.0, "passthrough": True, "accuracy_change": 0.0, "ops_saving": 0.0}


def _exit_metrics(run: ExitRun, chosen: ThresholdPoint, path_accuracy: float, main: MainNetwork) -> dict:
    """Test figures at the chosen (position, threshold), and the adaptive forward's check."""
    trained = run.exits[chosen.position]
    y_test = run.labels("test")
    tpred, texit = simulate(trained.saved["test"], trained.main_logits["test"], chosen.threshold)
    # Real adaptive inference on the test split must give the simulated predictions.
    adaptive_pred = adaptive_predictions(sixteen_bit(trained.net) if run.fp16 else trained.net,
                                         run.data.split("test")[0], run.data, chosen.threshold,
                                         run.recipe["eval_batch_size"])
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


def _compared_loss(run: ExitRun, position: int, target: float) -> tuple[list[dict], list[str], dict]:
    """Figure 9: risk-coverage of the two losses' exits at the chosen position; (rows, columns,
    metrics: each loss's AURC and the compared loss's exit at the same validation target)."""
    cfg, y_test = run.cfg, run.labels("test")
    curves = {cfg["loss"]: risk_coverage(run.exits[position].saved["test"], y_test)}
    metrics = {}
    if cfg["compare_loss"]:
        other = [name for name in LOSSES if name != cfg["loss"]][0]
        saved = run.train_exit(position, other)[1]
        curves[other] = risk_coverage(saved["test"], y_test)
        metrics.update(_calibrated_on_val(run, saved, run.exits[position].main_logits, target, other))
    for name, (_, aurc) in curves.items():
        metrics[f"aurc_{name}"] = aurc
    names = list(curves)
    rows = [{"coverage": cov, **{f"risk_{n}": curves[n][0][i][1] for n in names}}
            for i, (cov, _) in enumerate(curves[names[0]][0])]
    return rows, ["coverage"] + [f"risk_{n}" for n in names], metrics


def _calibrated_on_val(run: ExitRun, saved: dict, main_logits: dict, target: float, name: str) -> dict:
    """The compared loss's exit at the same validation target: its threshold (the one
    sending most validation images out), and its test exit ratio and accuracy."""
    labels = {"val": run.labels("val"), "test": run.labels("test")}
    best = most_exits(sweep({"val": saved["val"]}, main_logits, labels, run.cfg["thresholds"]), target)
    if best is None:
        return {f"{name}_threshold": None, f"{name}_exit_ratio": None, f"{name}_accuracy": None}
    at_test = threshold_point(saved, main_logits, labels, best.threshold)
    return {f"{name}_threshold": best.threshold, f"{name}_exit_ratio": at_test.exit_ratio,
            f"{name}_accuracy": at_test.accuracy}


def _table_rows(table: ExitSweep, thresholds: list, chosen: ThresholdPoint | None) -> list[dict]:
    """The exit table: every position at ``table_thresholds`` and the chosen point, marked."""
    key = (chosen.position, chosen.threshold) if chosen is not None else None
    keys = {k for k in table.rows if k[1] in thresholds} | ({key} if key else set())
    return [{**table.rows[k], "chosen": "yes" if k == key else "no"} for k in sorted(keys)]


def accelerate(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    started = time.time()
    run, meta = _start_run(cfg, params_file, progress)
    rule = ExitRule.from_config(cfg)
    main = MainNetwork(accuracy(run.main_logits["val"], run.labels("val")),
                       accuracy(run.main_logits["test"], run.labels("test")),
                       score_metrics(run.main, run.data, cfg["bits"]))
    table = _sweep(run)
    decision = decide(table.candidates, rule, main, cfg["allow_no_exit"])
    chosen = decision.chosen
    metrics = {"main_accuracy": main.test_accuracy, "main_val_accuracy": main.val_accuracy,
               "score_without_exit": main.score["score"], "loss": cfg["loss"], **decision.metrics()}
    final_model, exit_record = run.main, None
    rc_rows, rc_columns = [], ["coverage", f"risk_{cfg['loss']}"]
    if chosen is None:
        metrics.update(_passthrough_metrics(main))
    else:
        path_accuracy = table.rows[(chosen.position, chosen.threshold)]["path_accuracy"]
        metrics.update(_exit_metrics(run, chosen, path_accuracy, main))
        net = run.exits[chosen.position].net
        final_model = net.main
        exit_record = {**net.exit_cfg, "state": net.exit.state_dict(), "threshold": chosen.threshold,
                       "exit_ratio": metrics["exit_ratio"], "loss": cfg["loss"], "rule": rule.as_record()}
        rc_rows, rc_columns, compared = _compared_loss(run, chosen.position, decision.target)
        metrics.update(compared)
    with publishing(cfg["metrics"]):
        save_model(cfg["out"], final_model, masks=meta.get("masks"), recipe=run.recipe, stage="accelerate",
                   lineage=run.lineage, **({"exit": exit_record} if exit_record is not None else {}))
        atomic_write_csv(cfg["risk_coverage"], rc_rows, rc_columns)
        atomic_write_csv(cfg["table"], _table_rows(table, cfg["table_thresholds"], chosen), EXIT_TABLE_COLUMNS)
    metrics.update(provenance(seed=cfg["seed"], device=run.recipe["device"], started=started))
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


@torch.no_grad()
def adaptive_predictions(net, x, data, threshold: float, batch_size: int) -> torch.Tensor:
    """Predicted labels of the real adaptive forward (the rest of the network only for samples that stay)."""
    net.eval()
    preds = [net.adaptive(normalized(chunk, data.mean, data.std), threshold)[0].argmax(1)
             for chunk in x.split(batch_size)]
    return torch.cat(preds)


def load_early_exit(path) -> tuple[torch.nn.Module, dict]:
    """An accelerate checkpoint as an ``EarlyExitNetwork`` (and its exit record)."""
    main, meta = load_model(path)
    record = meta.get("exit")
    if not isinstance(record, dict) or "state" not in record:
        raise SipaError(f"{path}: no early exit in this checkpoint")
    return from_record(main, record, path).eval(), record


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that these settings do not use."""
    out = []
    if not cfg["exit_schedule"] and "exit_prune_epochs" in raw:
        out.append("accelerate.exit_prune_epochs: exit_schedule is empty (the exit stays dense)")
    if not cfg["exit_stabilize_epochs"] and "exit_stabilize_lr" in raw:
        out.append("accelerate.exit_stabilize_lr: exit_stabilize_epochs is 0")
    return out


def summary(cfg: dict, m: dict) -> str:
    if m["passthrough"]:
        return (f"accelerate: {m['passthrough_reason']}; the main network passes through "
                f"(accuracy {m['accuracy']:.4f}, score {m['score']:.6f})")
    return (f"accelerate: exit after block {m['exit_position']} at threshold {m['threshold']:.2f}: "
            f"{m['exit_ratio']:.1%} of test images exit; accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f}); "
            f"ops -{m['ops_saving']:.1%}; score {m['score']:.6f} (without exit {m['score_without_exit']:.6f})")


STAGE = Stage("accelerate", __doc__, read_config, accelerate, summary, inactive)
