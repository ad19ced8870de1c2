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

from sipa_core.accelerate.exits import LOSSES
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_write_csv, publish_metrics, publishing
from sipa_core.paths import path_fields
from sipa_core.params import Field, check_section, load_yaml, refuse_keys
from sipa_core.resume import file_digest, keep, load_kept, run_key
from sipa_core.stage_runner import Stage
from sipa_core.train.evaluation import accuracy
from sipa_core.train.recipe import check_recipe

LOGITS_FORMAT = "sipa-exit-logits"

# The exit's own recipe (the authors' code): softsmoothing on ONE-HOT targets, no mixup or CutMix,
# SGD lr 0.13, weight decay 1e-5 without bias decay, cosine; whatever the main network trained with.
EXIT_RECIPE = {"lr": 0.13, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-5, "no_bias_decay": True,
               "batch_size": 128, "schedule": "cosine", "warmup_epochs": 0, "label_smoothing": 0.0,
               "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "ghost_batch": 0, "augment": "none"}
# What the exit takes from the input checkpoint's recipe: how to run fast, not what to learn.
SPEED_KEYS = ("precision", "channels_last", "compile", "device", "deterministic", "eval_batch_size")


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
    if cfg["kernel"] % 2 != 1:
        raise SipaError(f"{params_path}: accelerate.kernel: must be odd (same padding), got {cfg['kernel']}")
    if cfg["thresholds"] is None:
        cfg["thresholds"] = [round(0.05 + 0.01 * i, 2) for i in range(95)]
    return cfg


def choose(candidates: list[dict], target: float) -> dict | None:
    """The lowest-score candidate whose validation accuracy meets ``target``
    (ties: higher validation accuracy, then the higher threshold)."""
    ok = [c for c in candidates if c["val_accuracy"] >= target - 1e-12]
    return min(ok, key=lambda c: (c["score"], -c["val_accuracy"], -c["threshold"])) if ok else None


EXIT_TABLE_COLUMNS = ["position", "channels", "size", "path_ops_ratio", "added_params_ratio", "threshold",
                      "val_exit_ratio", "val_accuracy", "exit_ratio", "accuracy", "path_accuracy", "ops", "score",
                      "chosen"]


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
    exits: dict = field(default_factory=dict)  # position -> (net, saved logits, main logits, cost)

    @property
    def fp16(self) -> bool:
        return self.cfg["bits"] == 16

    @property
    def state(self) -> Path:
        return Path(self.cfg["state"])

    def labels(self, split: str) -> torch.Tensor:
        return self.data.split(split)[1]

    def logits_of(self, model, split: str) -> torch.Tensor:
        from sipa_core.train import predict

        x, _ = self.data.split(split)
        return predict(model, x, self.data.mean, self.data.std, batch_size=self.recipe["eval_batch_size"],
                       fp16_weights=self.fp16)

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
        from sipa_core.train import half_weights

        scored = half_weights(net.main) if self.fp16 else net.main
        return {s: self.logits_of(scored, s) for s in ("val", "test")}

    def train_mode(self, model) -> None:
        model.eval()
        model.exit.train()
        if self.cfg["update_main_bn"]:  # the authors' setting: BN statistics of the frozen main network move
            for m in model.main.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()

    def train_exit(self, position: int, loss: str):
        """Train (or load) the exit at ``position`` with ``loss``; (network, kept record with its logits)."""
        from sipa_core.accelerate.exits import EarlyExitNetwork, exit_config

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
        from sipa_core.accelerate.exits import LOSS_FUNCTIONS
        from sipa_core.prune.masks import apply_masks
        from sipa_core.train import fit

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
        from sipa_core.prune.masks import apply_masks, full_masks, magnitude_masks
        from sipa_core.train import fit

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
        from sipa_core.train import half_weights, predict

        net.cpu().eval()
        scored = half_weights(net) if self.fp16 else net
        out = {"exit": net.exit.state_dict(), "exit_cfg": ecfg,
               "main": net.main.state_dict() if self.cfg["update_main_bn"] else None}
        for split in ("val", "test"):
            x, _ = self.data.split(split)
            out[split] = predict(scored, x, self.data.mean, self.data.std,
                                 batch_size=self.recipe["eval_batch_size"])  # exit logits
        saved = keep(run_dir / "result.pt", out, LOGITS_FORMAT, since=started)
        fault_point("exit")
        return saved

    def threshold_row(self, position: int, t: float, path_accuracy: float) -> dict:
        """One (position, threshold) point: exit ratio and accuracy on validation and test, score."""
        from sipa_core.accelerate.exits import simulate

        net, saved, ml, cost = self.exits[position]
        vpred, vexit = simulate(saved["val"], ml["val"], t)
        tpred, texit = simulate(saved["test"], ml["test"], t)
        val_ratio = float(vexit.float().mean())
        s = cost.summary(val_ratio)
        return {"position": position, "channels": net.exit_cfg["channels"], "size": net.exit_cfg["size"],
                "path_ops_ratio": (cost.path_ops + cost.exit_ops) / cost.full_ops,
                "added_params_ratio": cost.exit_bytes / cost.main_bytes, "threshold": t,
                "val_exit_ratio": val_ratio, "val_accuracy": accuracy(vpred, self.labels("val")),
                "exit_ratio": float(texit.float().mean()), "accuracy": accuracy(tpred, self.labels("test")),
                "path_accuracy": path_accuracy, "ops": s["ops"], "score": s["score"]}


def _load_main(cfg: dict, params_file: str):
    """Data and the frozen main network, checked against the positions."""
    from sipa_core.stage_common import load_data, load_input_model

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
    inherited = {k: v for k, v in (meta.get("recipe") or {}).items() if k in SPEED_KEYS}
    return check_recipe({**EXIT_RECIPE, **inherited, **cfg["recipe"], "epochs": cfg["epochs"], "seed": cfg["seed"]},
                        file=params_file, section="accelerate.recipe")


def _start_run(cfg: dict, params_file: str, progress) -> tuple[ExitRun, dict]:
    from sipa_core.lineage import input_lineage, refuse_trained_split

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


def _sweep(run: ExitRun) -> tuple[list[dict], list[dict]]:
    """Train every position's exit; (table rows at ``table_thresholds``, candidates at ``thresholds``)."""
    from sipa_core.accelerate.exits import exit_cost

    cfg = run.cfg
    h = run.data.image_size[0]
    rows, candidates = [], []
    for position in cfg["positions"]:
        net, saved = run.train_exit(position, cfg["loss"])
        run.exits[position] = (net, saved, run.main_logits_for(net), exit_cost(net, (3, h, h), bits=cfg["bits"]))
        path_accuracy = accuracy(saved["test"], run.labels("test"))  # the exit alone, once per position
        for t in sorted(set(cfg["thresholds"]) | set(cfg["table_thresholds"])):
            row = run.threshold_row(position, t, path_accuracy)
            if t in cfg["thresholds"]:
                candidates.append(row)
            if t in cfg["table_thresholds"]:
                rows.append(row)
    return rows, candidates


def _passthrough(metrics: dict, main_score: dict, main_test_acc: float) -> dict:
    """No exit kept: the main network passes through unchanged."""
    metrics.update(main_score)
    metrics.update(accuracy=main_test_acc, exit_position=None, threshold=None, exit_ratio=0.0,
                   val_exit_ratio=0.0, passthrough=True, accuracy_change=0.0, ops_saving=0.0)
    return metrics


def _exit_metrics(run: ExitRun, chosen: dict, metrics: dict, main_score: dict, main_test_acc: float) -> dict:
    """Test figures at the chosen (position, threshold), and the adaptive forward's check."""
    from sipa_core.accelerate.exits import simulate
    from sipa_core.prune.masks import sparsity
    from sipa_core.train import half_weights

    position, t = chosen["position"], chosen["threshold"]
    net, saved, ml, cost = run.exits[position]
    y_test = run.labels("test")
    tpred, texit = simulate(saved["test"], ml["test"], t)
    # Real adaptive inference on the test split must give the simulated predictions.
    adaptive_pred = adaptive_predictions(half_weights(net) if run.fp16 else net, run.data.split("test")[0],
                                         run.data, t, run.recipe["eval_batch_size"])
    test_ratio = float(texit.float().mean())
    metrics.update(cost.summary(test_ratio))
    exited = texit.nonzero().squeeze(1)
    metrics.update(
        accuracy=accuracy(tpred, y_test), exit_position=position, threshold=t,
        exit_ratio=test_ratio, val_exit_ratio=chosen["val_exit_ratio"], val_accuracy=chosen["val_accuracy"],
        path_accuracy=chosen["path_accuracy"],
        exited_accuracy=accuracy(tpred[exited], y_test[exited]) if len(exited) else None,
        adaptive_matches_simulated=bool(torch.equal(adaptive_pred, tpred)), passthrough=False,
        exit_sparsity=sparsity(net.exit), exit_bytes=cost.exit_bytes)
    metrics["accuracy_change"] = metrics["accuracy"] - main_test_acc
    metrics["ops_saving"] = 1 - metrics["ops"] / main_score["ops"]
    return metrics


def _risk_coverage_rows(run: ExitRun, position: int, metrics: dict):
    """Figure 9: risk-coverage of the two losses' exits at the chosen position (AURC into ``metrics``)."""
    from sipa_core.accelerate.exits import risk_coverage

    cfg, y_test = run.cfg, run.labels("test")
    curves = {cfg["loss"]: risk_coverage(run.exits[position][1]["test"], y_test)}
    if cfg["compare_loss"]:
        other = [name for name in LOSSES if name != cfg["loss"]][0]
        saved = run.train_exit(position, other)[1]
        curves[other] = risk_coverage(saved["test"], y_test)
        metrics.update(_calibrated_on_val(run, saved, run.exits[position][2], metrics["val_target"], other))
    for name, (_, aurc) in curves.items():
        metrics[f"aurc_{name}"] = aurc
    names = list(curves)
    rows = [{"coverage": cov, **{f"risk_{n}": curves[n][0][i][1] for n in names}}
            for i, (cov, _) in enumerate(curves[names[0]][0])]
    return rows, ["coverage"] + [f"risk_{n}" for n in names]


def _calibrated_on_val(run: ExitRun, saved: dict, main_logits: dict, target: float, name: str) -> dict:
    """The compared loss's exit at the same validation target: its threshold (the one
    sending most validation images out), and its test exit ratio and accuracy."""
    from sipa_core.accelerate.exits import simulate

    best = None
    for t in run.cfg["thresholds"]:
        vpred, vexit = simulate(saved["val"], main_logits["val"], t)
        ratio = float(vexit.float().mean())
        if accuracy(vpred, run.labels("val")) >= target - 1e-12 and (best is None or ratio > best[1]):
            best = (t, ratio)
    if best is None:
        return {f"{name}_threshold": None, f"{name}_exit_ratio": None, f"{name}_accuracy": None}
    tpred, texit = simulate(saved["test"], main_logits["test"], best[0])
    return {f"{name}_threshold": best[0], f"{name}_exit_ratio": float(texit.float().mean()),
            f"{name}_accuracy": accuracy(tpred, run.labels("test"))}


def _choose_exit(run: ExitRun, candidates: list[dict], metrics: dict, main_score: dict) -> dict | None:
    """The chosen candidate on validation, or None (reason in ``metrics``) when the network passes through."""
    cfg = run.cfg
    chosen = choose(candidates, metrics["val_target"])
    if chosen is None:
        metrics["passthrough_reason"] = "no exit meets the validation accuracy target"
    elif cfg["allow_no_exit"] and chosen["score"] >= main_score["score"]:
        metrics["passthrough_reason"] = f"the best exit (score {chosen['score']:.6f}) does not lower the score"
        metrics["best_exit_score"] = chosen["score"]
        chosen = None
    return chosen


def accelerate(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    from sipa_core.checkpoint import save_model
    from sipa_core.runtime import provenance
    from sipa_core.stage_common import score_metrics

    started = time.time()
    run, meta = _start_run(cfg, params_file, progress)
    main_val_acc = accuracy(run.main_logits["val"], run.labels("val"))
    main_test_acc = accuracy(run.main_logits["test"], run.labels("test"))
    target = max(cfg["min_accuracy"] if cfg["min_accuracy"] is not None else 0.0,
                 main_val_acc - cfg["max_drop"] if cfg["max_drop"] is not None else 0.0)
    rows, candidates = _sweep(run)
    main_score = score_metrics(run.main, run.data, cfg["bits"])
    metrics = {"main_accuracy": main_test_acc, "main_val_accuracy": main_val_acc, "val_target": target,
               "score_without_exit": main_score["score"], "loss": cfg["loss"]}
    chosen = _choose_exit(run, candidates, metrics, main_score)
    final_model, exit_record = run.main, None
    rc_rows, rc_columns = [], ["coverage", f"risk_{cfg['loss']}"]
    if chosen is None:
        _passthrough(metrics, main_score, main_test_acc)
    else:
        if (chosen["threshold"], chosen["position"]) not in {(r["threshold"], r["position"]) for r in rows}:
            rows.append(chosen)
        _exit_metrics(run, chosen, metrics, main_score, main_test_acc)
        net = run.exits[chosen["position"]][0]
        final_model = net.main
        exit_record = {**net.exit_cfg, "state": net.exit.state_dict(), "threshold": chosen["threshold"],
                       "exit_ratio": metrics["exit_ratio"], "loss": cfg["loss"]}
        rc_rows, rc_columns = _risk_coverage_rows(run, chosen["position"], metrics)
    for row in rows:
        row["chosen"] = "yes" if chosen is not None and (row["position"], row["threshold"]) == (
            chosen["position"], chosen["threshold"]) else "no"
    rows.sort(key=lambda r: (r["position"], r["threshold"]))
    with publishing(cfg["metrics"]):
        save_model(cfg["out"], final_model, masks=meta.get("masks"), recipe=run.recipe, stage="accelerate",
                   lineage=run.lineage,
                   **({"exit": exit_record} if exit_record is not None else {}))
        atomic_write_csv(cfg["risk_coverage"], rc_rows, rc_columns)
        atomic_write_csv(cfg["table"], rows, EXIT_TABLE_COLUMNS)
    metrics.update(provenance(seed=cfg["seed"], device=run.recipe["device"], started=started))
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


@torch.no_grad()
def adaptive_predictions(net, x, data, threshold: float, batch_size: int) -> torch.Tensor:
    """Predicted labels of the real adaptive forward (the rest of the network only for samples that stay)."""
    from sipa_core.train import normalized

    net.eval()
    preds = [net.adaptive(normalized(chunk, data.mean, data.std), threshold)[0].argmax(1)
             for chunk in x.split(batch_size)]
    return torch.cat(preds)


def load_early_exit(path) -> tuple[torch.nn.Module, dict]:
    """An accelerate checkpoint as an ``EarlyExitNetwork`` (and its exit record)."""
    from sipa_core.accelerate.exits import from_record
    from sipa_core.checkpoint import load_model

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
