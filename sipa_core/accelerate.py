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

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from sipa_core.early_exit import LOSSES
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_torch_save, atomic_write_csv, load_checkpoint, publish_metrics, publishing
from sipa_core.params import Field, check_section, load_yaml
from sipa_core.train.recipe import check_recipe

LOGITS_FORMAT = "sipa-exit-logits"


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


ACCELERATE_SCHEMA = {
    "model": Field(str, "models/prune.pt", help="checkpoint of the main network (the pruning stage's)"),
    "data": Field(str, "data/prepared/dataset.pt"),
    "positions": Field(list, [4], check=_positions, help="candidate blocks to attach the exit after"),
    "width": Field(int, None, nullable=True, min=1, help="exit's 1x1 expansion width (null: the head width)"),
    "kernel": Field(int, 3, min=1, help="exit's depthwise kernel"),
    "loss": Field(str, "softsmoothing", choices=LOSSES),
    "compare_loss": Field(bool, True, help="also train the other loss at the chosen position (risk-coverage)"),
    "epochs": Field(int, 2, min=1, help="exit training epochs (the paper: 800)"),
    "recipe": Field(dict, {}, help="overrides of the input checkpoint's training recipe"),
    "update_main_bn": Field(bool, False, help="let the frozen main network's BatchNorm statistics update"),
    "thresholds": Field(list, None, nullable=True, check=_thresholds,
                        help="candidate confidence thresholds (null: 0.05, 0.06, ..., 0.99)"),
    "table_thresholds": Field(list, [0.85, 0.88, 0.92], check=_thresholds,
                              help="thresholds shown for every position in the exit table (Table 2)"),
    "min_accuracy": Field(float, None, nullable=True, min=0, max=1, help="validation accuracy target (absolute)"),
    "allow_no_exit": Field(bool, True, help="pass the main network through when no exit lowers its score"),
    "max_drop": Field(float, 0.01, nullable=True, min=0, max=1,
                      help="validation accuracy target: at most this below the main network's"),
    "exit_sparsity": Field(float, 0.0, min=0, max=1, max_exclusive=True,
                           help="prune the exit module's weights to this sparsity (pruning stage's code)"),
    "exit_prune_epochs": Field(int, 1, min=0, help="exit fine-tune epochs after pruning it"),
    "bits": Field(int, 16, min=1, max=32),
    "seed": Field(int, 0, min=0),
    "out": Field(str, "models/accelerate.pt"),
    "state": Field(str, "state/accelerate"),
    "metrics": Field(str, "metrics/accelerate.json"),
    "table": Field(str, "plots/accelerate_exits.csv"),
    "risk_coverage": Field(str, "plots/accelerate_risk_coverage.csv"),
}


def read_config(params_path: str | Path) -> dict:
    data = load_yaml(params_path)
    cfg = check_section(data.get("accelerate"), ACCELERATE_SCHEMA, file=params_path, section="accelerate")
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


def accelerate(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    from sipa_core.checkpoint import save_model
    from sipa_core.early_exit import (LOSS_FUNCTIONS, EarlyExitNetwork, exit_config, exit_cost, risk_coverage,
                                      simulate)
    from sipa_core.pruning import apply_masks, full_masks, magnitude_masks, sparsity
    from sipa_core.stage import file_digest, load_data, load_input_model, provenance, score_metrics
    from sipa_core.train import fit, half_weights, predict

    started = time.time()
    where = f"{params_file}: accelerate"
    data = load_data(cfg["data"], f"{where}.data")
    source = Path(cfg["model"])
    main, meta = load_input_model(source, data, f"{where}.model", "pruning")
    if not hasattr(main, "boundaries"):
        raise SipaError(f"{where}.model: early exits need an EfficientNet-family network")
    last = len(main.boundaries()) - 2
    bad = [p for p in cfg["positions"] if p > last]
    if bad:
        raise SipaError(f"{where}.positions: block {bad[0]} is past the last place an exit can go "
                        f"(this network has blocks 0..{last + 1}; an exit goes after 0..{last})")
    if len(data.val_y) == 0:
        raise SipaError(f"{where}: the threshold is chosen on the validation split, but prepare.val_size is 0")
    recipe = check_recipe({**(meta.get("recipe") or {}), "ghost_batch": 0, **cfg["recipe"],
                           "epochs": cfg["epochs"], "seed": cfg["seed"]},
                          file=params_file, section="accelerate.recipe")
    fp16 = cfg["bits"] == 16
    h = data.image_size[0]
    main.eval()
    for p in main.parameters():
        p.requires_grad_(False)

    key_base = {"input": file_digest(source), "data": data.source, "recipe": recipe, "bits": cfg["bits"],
                "width": cfg["width"], "kernel": cfg["kernel"], "update_main_bn": cfg["update_main_bn"],
                "exit_sparsity": cfg["exit_sparsity"], "exit_prune_epochs": cfg["exit_prune_epochs"]}
    state = Path(cfg["state"])

    def logits_of(model, split):
        x, _ = data.split(split)
        return predict(model, x, data.mean, data.std, batch_size=recipe["eval_batch_size"], fp16_weights=fp16)

    main_file = state / f"main-{hashlib.sha256(json.dumps(key_base, sort_keys=True, default=str).encode()).hexdigest()[:12]}.pt"
    cached = load_checkpoint(main_file, "cached logits") if main_file.is_file() else None
    if isinstance(cached, dict) and cached.get("format") == LOGITS_FORMAT:
        main_logits = {"val": cached["val"], "test": cached["test"]}
    else:
        main_logits = {s: logits_of(main, s) for s in ("val", "test")}
        atomic_torch_save(main_file, {"format": LOGITS_FORMAT, **main_logits})
    y = {s: data.split(s)[1] for s in ("val", "test")}
    main_val_acc = float((main_logits["val"].argmax(1) == y["val"]).float().mean())
    main_test_acc = float((main_logits["test"].argmax(1) == y["test"]).float().mean())

    def train_exit(position: int, loss: str) -> tuple[EarlyExitNetwork, dict]:
        """Train (or load) the exit at ``position`` with ``loss``; its cached logits."""
        ecfg = exit_config(main, position, cfg["width"], cfg["kernel"])
        key = hashlib.sha256(json.dumps({**key_base, "exit": ecfg, "loss": loss}, sort_keys=True,
                                        default=str).encode()).hexdigest()[:12]
        run_dir = state / f"exit{position}-{loss}-{key}"
        torch.manual_seed(cfg["seed"] + position)
        net = EarlyExitNetwork(main, ecfg)
        result = run_dir / "result.pt"
        if result.is_file():
            saved = load_checkpoint(result, "exit result")
            if isinstance(saved, dict) and saved.get("format") == LOGITS_FORMAT:
                net.exit.load_state_dict(saved["exit"])
                if cfg["update_main_bn"]:
                    net.main.load_state_dict(saved["main"])
                print(f"exit after block {position} ({loss}): kept from {result}", file=sys.stderr)
                return net, saved

        def train_mode(model):
            model.eval()
            model.exit.train()
            if cfg["update_main_bn"]:  # the authors' setting: BN statistics of the frozen main network move
                for m in model.main.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.train()

        common = dict(params=net.exit.parameters(), loss_fn=LOSS_FUNCTIONS[loss], train_mode=train_mode,
                      val_split="val", progress=progress)
        fit(net, data, recipe, state_path=run_dir / "train.pt", tag=f"exit{position}-{loss}",
            desc=f"exit after block {position} ({loss})", **common)
        masks = {}
        if cfg["exit_sparsity"] > 0:
            masks = magnitude_masks(net.exit, full_masks(net.exit), cfg["exit_sparsity"], scope="global",
                                    normalize="l2")
            apply_masks(net.exit, masks)
            if cfg["exit_prune_epochs"] > 0:
                fit(net, data, {**recipe, "epochs": cfg["exit_prune_epochs"]}, state_path=run_dir / "prune.pt",
                    tag=f"exit{position}-{loss}-pruned", desc=f"exit {position} pruned fine-tune",
                    after_step=lambda m: apply_masks(m.exit, masks), **common)
        net.cpu().eval()
        scored = half_weights(net) if fp16 else net
        out = {"format": LOGITS_FORMAT, "exit": net.exit.state_dict(), "exit_cfg": ecfg,
               "main": net.main.state_dict() if cfg["update_main_bn"] else None}
        for split in ("val", "test"):
            x, _ = data.split(split)
            out[split] = predict(scored, x, data.mean, data.std, batch_size=recipe["eval_batch_size"])  # exit logits
        atomic_torch_save(result, out)
        fault_point("exit")
        return net, out

    def main_logits_for(net):
        # With BN updates the main network changed too: its logits come from this exit's run.
        if not cfg["update_main_bn"]:
            return main_logits
        scored = half_weights(net.main) if fp16 else net.main
        return {s: logits_of(scored, s) for s in ("val", "test")}

    target = max(cfg["min_accuracy"] if cfg["min_accuracy"] is not None else 0.0,
                 main_val_acc - cfg["max_drop"] if cfg["max_drop"] is not None else 0.0)
    input_shape = (3, h, h)
    rows, candidates, nets = [], [], {}
    for position in cfg["positions"]:
        net, saved = train_exit(position, cfg["loss"])
        ml = main_logits_for(net)
        cost = exit_cost(net, input_shape, bits=cfg["bits"])
        nets[position] = (net, saved, ml, cost)
        exit_acc = float((saved["test"].argmax(1) == y["test"]).float().mean())
        for t in sorted(set(cfg["thresholds"]) | set(cfg["table_thresholds"])):
            vpred, vexit = simulate(saved["val"], ml["val"], t)
            tpred, texit = simulate(saved["test"], ml["test"], t)
            val_ratio = float(vexit.float().mean())
            s = cost.summary(val_ratio)
            row = {"position": position, "channels": net.exit_cfg["channels"], "size": net.exit_cfg["size"],
                   "path_ops_ratio": (cost.path_ops + cost.exit_ops) / cost.full_ops,
                   "added_params_ratio": cost.exit_bytes / cost.main_bytes, "threshold": t,
                   "val_exit_ratio": val_ratio, "val_accuracy": float((vpred == y["val"]).float().mean()),
                   "exit_ratio": float(texit.float().mean()), "accuracy": float((tpred == y["test"]).float().mean()),
                   "path_accuracy": exit_acc, "ops": s["ops"], "score": s["score"]}
            if t in cfg["thresholds"]:
                candidates.append(row)
            if t in cfg["table_thresholds"]:
                rows.append(row)

    chosen = choose(candidates, target)
    main_score = score_metrics(main, data, cfg["bits"])
    metrics = {"main_accuracy": main_test_acc, "main_val_accuracy": main_val_acc, "val_target": target,
               "score_without_exit": main_score["score"], "loss": cfg["loss"]}
    if chosen is None:
        metrics["passthrough_reason"] = "no exit meets the validation accuracy target"
    elif cfg["allow_no_exit"] and chosen["score"] >= main_score["score"]:
        metrics["passthrough_reason"] = f"the best exit (score {chosen['score']:.6f}) does not lower the score"
        metrics["best_exit_score"] = chosen["score"]
        chosen = None
    if chosen is None:
        # No exit meets the target: the main network passes through unchanged.
        metrics.update(main_score)
        metrics.update(accuracy=main_test_acc, exit_position=None, threshold=None, exit_ratio=0.0,
                       val_exit_ratio=0.0, passthrough=True, accuracy_change=0.0, ops_saving=0.0)
        final_model, exit_record = main, None
        rc_rows, rc_columns = [], ["coverage", f"risk_{cfg['loss']}"]
    else:
        position, t = chosen["position"], chosen["threshold"]
        net, saved, ml, cost = nets[position]
        if (t, position) not in {(r["threshold"], r["position"]) for r in rows}:
            rows.append(chosen)
        tpred, texit = simulate(saved["test"], ml["test"], t)
        # Real adaptive inference on the test split must give the simulated predictions.
        x_test, _ = data.split("test")
        adaptive_pred = _adaptive_predictions(half_weights(net) if fp16 else net, x_test, data, t,
                                              recipe["eval_batch_size"])
        test_ratio = float(texit.float().mean())
        metrics.update(cost.summary(test_ratio))
        exited = texit.nonzero().squeeze(1)
        metrics.update(
            accuracy=float((tpred == y["test"]).float().mean()), exit_position=position, threshold=t,
            exit_ratio=test_ratio, val_exit_ratio=chosen["val_exit_ratio"], val_accuracy=chosen["val_accuracy"],
            path_accuracy=chosen["path_accuracy"],
            exited_accuracy=float((tpred[exited] == y["test"][exited]).float().mean()) if len(exited) else None,
            adaptive_matches_simulated=bool(torch.equal(adaptive_pred, tpred)), passthrough=False,
            exit_sparsity=sparsity(net.exit), exit_bytes=cost.exit_bytes)
        metrics["accuracy_change"] = metrics["accuracy"] - main_test_acc
        metrics["ops_saving"] = 1 - metrics["ops"] / main_score["ops"]
        final_model = net.main
        exit_record = {**net.exit_cfg, "state": net.exit.state_dict(), "threshold": t, "exit_ratio": test_ratio,
                       "loss": cfg["loss"]}
        # Figure 9: risk-coverage of the two losses' exits at the chosen position.
        curves = {cfg["loss"]: risk_coverage(saved["test"], y["test"])}
        if cfg["compare_loss"]:
            other = [name for name in LOSSES if name != cfg["loss"]][0]
            curves[other] = risk_coverage(train_exit(position, other)[1]["test"], y["test"])
        for name, (_, aurc) in curves.items():
            metrics[f"aurc_{name}"] = aurc
        names = list(curves)
        rc_rows = [{"coverage": cov, **{f"risk_{n}": curves[n][0][i][1] for n in names}}
                   for i, (cov, _) in enumerate(curves[names[0]][0])]
        rc_columns = ["coverage"] + [f"risk_{n}" for n in names]
    for row in rows:
        row["chosen"] = "yes" if chosen is not None and (row["position"], row["threshold"]) == (
            chosen["position"], chosen["threshold"]) else "no"
    rows.sort(key=lambda r: (r["position"], r["threshold"]))
    with publishing(cfg["metrics"]):
        save_model(cfg["out"], final_model, masks=meta.get("masks"), recipe=recipe, stage="accelerate",
                   **({"exit": exit_record} if exit_record is not None else {}))
        atomic_write_csv(cfg["risk_coverage"], rc_rows, rc_columns)
        atomic_write_csv(cfg["table"], rows, ["position", "channels", "size", "path_ops_ratio", "added_params_ratio",
                                              "threshold", "val_exit_ratio", "val_accuracy", "exit_ratio",
                                              "accuracy", "path_accuracy", "ops", "score", "chosen"])
    metrics.update(provenance(seed=cfg["seed"], device=recipe["device"], started=started))
    publish_metrics(cfg["metrics"], metrics)
    return metrics


@torch.no_grad()
def _adaptive_predictions(net, x, data, threshold: float, batch_size: int) -> torch.Tensor:
    from sipa_core.train.engine import _stats
    from sipa_core.train.augment import normalize

    net.eval()
    mean, std = _stats(data.mean, "cpu"), _stats(data.std, "cpu")
    preds = [net.adaptive(normalize(chunk, mean, std, False), threshold)[0].argmax(1) for chunk in x.split(batch_size)]
    return torch.cat(preds)


def load_early_exit(path) -> tuple[torch.nn.Module, dict]:
    """An accelerate checkpoint as an ``EarlyExitNetwork`` (and its exit record)."""
    from sipa_core.checkpoint import load_model
    from sipa_core.early_exit import from_record

    main, meta = load_model(path)
    record = meta.get("exit")
    if not isinstance(record, dict) or "state" not in record:
        raise SipaError(f"{path}: no early exit in this checkpoint")
    return from_record(main, record, path).eval(), record
