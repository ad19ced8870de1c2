"""The Pruning stage (SIPA section 2.3, Appendix A.3): iterative pruning rounds.

Each round prunes to the next cumulative target of the schedule (weights by
magnitude, or whole filters), retrains (fine-tune from the current weights,
or re-initialise and train from scratch with the masks), evaluates and counts
the MicroNet score with each tensor's own sparsity. A round's result is kept
under the stage's state folder, so a killed stage resumes at its first
unfinished round (and mid-round at its last finished epoch). The stage's
result is the sparsest round that keeps the accuracy requirement; if none
does, the input model passes through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_torch_save, atomic_write_csv, load_checkpoint, publish_metrics, publishing
from sipa_core.params import Field, check_section, load_yaml
from sipa_core.pruning import GRANULARITIES, NORMALIZATIONS, SCOPES
from sipa_core.train.recipe import check_recipe

# The paper's schedule (Appendix A.3): 10% steps to 50%, then 2.5% steps to 60%, then 2% steps to 64%.
PAPER_SCHEDULE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.525, 0.55, 0.575, 0.6, 0.62, 0.64]
ROUND_FORMAT = "sipa-prune-round"


def _schedule(value) -> str | None:
    if not value:
        return "must list at least one sparsity target (one entry = one-shot pruning)"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a list of numbers (cumulative sparsity targets)"
    if not all(0 < v < 1 for v in value):
        return "every target must be in (0, 1): a fraction of the weights removed"
    if any(b <= a for a, b in zip(value, value[1:])):
        return "targets must increase (they are cumulative)"
    return None


PRUNE_SCHEMA = {
    "model": Field(str, "models/improve.pt", help="checkpoint to prune (the improving stage's)"),
    "data": Field(str, "data/prepared/dataset.pt"),
    "granularity": Field(str, "weight", choices=GRANULARITIES,
                         help="weight: unstructured masks; filter: remove whole output channels"),
    "scope": Field(str, "global", choices=SCOPES, help="global: one threshold; layerwise: same sparsity everywhere"),
    "normalize": Field(str, "l2", choices=NORMALIZATIONS,
                       help="global scope: divide each layer's |w| by its L2 norm first (the paper's)"),
    "preset": Field(str, None, nullable=True, choices=("paper",), help="paper: the paper's 11-round schedule"),
    "schedule": Field(list, [0.3, 0.5, 0.6], check=_schedule,
                      help="cumulative sparsity targets, one per round (filter: fraction of channels)"),
    "epochs": Field(int, 2, min=0, help="retraining epochs per round (0: prune only)"),
    "retrain": Field(str, "finetune", choices=("finetune", "reinit"),
                     help="finetune: from the current weights; reinit: fresh weights, same masks"),
    "recipe": Field(dict, {}, help="overrides of the input checkpoint's training recipe"),
    "min_accuracy": Field(float, None, nullable=True, min=0, max=1, help="keep rounds at or above this accuracy"),
    "max_drop": Field(float, None, nullable=True, min=0, max=1, help="keep rounds within this of the input's accuracy"),
    "select_split": Field(str, "val", choices=("val", "test"),
                          help="split the selection reads (val; test only where there is no validation split)"),
    "bits": Field(int, 16, min=1, max=32),
    "seed": Field(int, 0, min=0),
    "out": Field(str, "models/prune.pt"),
    "state": Field(str, "state/prune"),
    "metrics": Field(str, "metrics/prune.json"),
    "rounds_table": Field(str, "plots/prune_rounds.csv"),
    "layers_table": Field(str, "plots/prune_layers.csv"),
}


def read_config(params_path: str | Path) -> dict:
    data = load_yaml(params_path)
    cfg = check_section(data.get("prune"), PRUNE_SCHEMA, file=params_path, section="prune")
    if cfg["preset"] == "paper":
        cfg["schedule"] = list(PAPER_SCHEDULE)
    cfg["schedule"] = [float(v) for v in cfg["schedule"]]
    # Checked now, completed with the input checkpoint's recipe when the stage runs.
    check_recipe({**cfg["recipe"], "epochs": cfg["epochs"]}, file=params_path, section="prune.recipe")
    return cfg


def select_round(rows: list[dict], reference: float, min_accuracy: float | None, max_drop: float | None):
    """The sparsest round meeting the requirement (None: none does). With no
    requirement set, the last (sparsest) round."""
    ok = []
    for row in rows:
        acc = row["select_accuracy"]
        if min_accuracy is not None and not acc >= min_accuracy:
            continue
        if max_drop is not None and not acc >= reference - max_drop - 1e-12:
            continue
        ok.append(row)
    return max(ok, key=lambda r: (r["sparsity"], r["round"])) if ok else None


def prune(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    from sipa_core.checkpoint import load_model, save_model
    from sipa_core.models import build_model
    from sipa_core.pruning import (apply_masks, layer_table, magnitude_masks, masks_from_zeros,
                                   refresh_spec, remove_filters, sparsity)
    from sipa_core.stage import file_digest, load_data, load_input_model, score_metrics, stage_metrics
    from sipa_core.train import configure_model, evaluate, fit

    started = time.time()
    where = f"{params_file}: prune"
    data = load_data(cfg["data"], f"{where}.data")
    source = Path(cfg["model"])
    model, meta = load_input_model(source, data, f"{where}.model", "improving")
    if cfg["granularity"] == "filter" and not hasattr(model, "channel_counts"):
        raise SipaError(f"{where}.granularity: filter pruning needs an EfficientNet-family network")
    split = cfg["select_split"]
    if split == "val" and len(data.val_y) == 0:
        split = "test"  # no validation split (prepare.val_size: 0): the authors' procedure, recorded in metrics
    recipe = check_recipe({**(meta.get("recipe") or {}), **cfg["recipe"], "epochs": cfg["epochs"],
                           "seed": cfg["seed"]}, file=params_file, section="prune.recipe")
    fp16 = cfg["bits"] == 16
    h = data.image_size[0]
    example = torch.zeros(1, 3, h, h)

    key_blob = {k: cfg[k] for k in ("granularity", "scope", "normalize", "schedule", "retrain", "seed")}
    key = hashlib.sha256(json.dumps({**key_blob, "recipe": recipe, "input": file_digest(source),
                                     "data": data.source}, sort_keys=True, default=str).encode()).hexdigest()[:12]
    run_dir = Path(cfg["state"]) / key
    model.eval()
    ref_select = evaluate(model, data, split, fp16_weights=fp16)
    ref_test = evaluate(model, data, "test", fp16_weights=fp16)
    ref_score = score_metrics(model, data, cfg["bits"])
    input_row = {"round": 0, "target": 0.0, "sparsity": sparsity(model), "select_accuracy": ref_select,
                 "accuracy": ref_test, "accuracy_change": 0.0, "params": ref_score["params"],
                 "ops": ref_score["ops"], "params_score": ref_score["params_score"],
                 "ops_score": ref_score["ops_score"], "score": ref_score["score"], "epochs": 0, "seconds": 0.0}

    masks = masks_from_zeros(model) if cfg["granularity"] == "weight" else {}
    rows = [input_row]
    for k, target in enumerate(cfg["schedule"], start=1):
        round_dir = run_dir / f"round_{k:02d}"
        result = round_dir / "result.pt"
        if result.is_file():
            saved = load_checkpoint(result, "pruning round")
            if isinstance(saved, dict) and saved.get("format") == ROUND_FORMAT:
                model = build_model(saved["arch"])
                model.load_state_dict(saved["model"])
                masks = saved["masks"]
                rows.append(saved["row"])
                print(f"prune round {k}: kept from {result}", file=sys.stderr)
                continue
        t0 = time.time()
        if cfg["granularity"] == "weight":
            masks = magnitude_masks(model, masks, target, scope=cfg["scope"], normalize=cfg["normalize"])
        else:
            # Targets are cumulative fractions of the input's channels; each round removes the
            # fraction of the *current* channels that reaches the next target.
            prev = cfg["schedule"][k - 2] if k > 1 else 0.0
            remove_filters(model, 1 - (1 - target) / (1 - prev), example, scope=cfg["scope"],
                           normalize=cfg["normalize"])
            refresh_spec(model)
        if cfg["retrain"] == "reinit":
            torch.manual_seed(cfg["seed"] + k)
            model = build_model(model.spec)
        if masks:
            apply_masks(model, masks)
        if cfg["epochs"] > 0:
            trainee = configure_model(build_model(model.spec), recipe)  # ghost BN etc. for training only
            trainee.load_state_dict(model.state_dict())
            fit(trainee, data, recipe, state_path=round_dir / "train.pt", val_split=None,
                after_step=(lambda m: apply_masks(m, masks)) if masks else None,
                tag=f"prune-round-{k}", desc=f"prune round {k}/{len(cfg['schedule'])}", progress=progress)
            model = build_model(trainee.spec)
            model.load_state_dict(trainee.state_dict())  # back to plain modules (state-dict compatible)
        model.cpu().eval()
        acc_select = evaluate(model, data, split, fp16_weights=fp16)
        acc_test = evaluate(model, data, "test", fp16_weights=fp16)
        s = score_metrics(model, data, cfg["bits"])
        row = {"round": k, "target": target, "sparsity": sparsity(model) if masks else 1 - s["params"] / ref_score["params"],
               "select_accuracy": acc_select, "accuracy": acc_test, "accuracy_change": acc_test - ref_test,
               "params": s["params"], "ops": s["ops"], "params_score": s["params_score"],
               "ops_score": s["ops_score"], "score": s["score"], "epochs": cfg["epochs"],
               "seconds": round(time.time() - t0, 2)}
        atomic_torch_save(result, {"format": ROUND_FORMAT, "arch": dict(model.spec), "model": model.state_dict(),
                                   "masks": masks, "row": row})
        fault_point("round")
        rows.append(row)

    chosen = select_round(rows[1:], ref_select, cfg["min_accuracy"], cfg["max_drop"])
    if chosen is None:
        final, final_masks, chosen_round = load_model(source)[0], {}, 0
    else:
        saved = load_checkpoint(run_dir / f"round_{chosen['round']:02d}" / "result.pt", "pruning round")
        final = build_model(saved["arch"])
        final.load_state_dict(saved["model"])
        final_masks, chosen_round = saved["masks"], chosen["round"]
    final.eval()
    for row in rows:
        row["chosen"] = "yes" if row["round"] == chosen_round else "no"

    columns = ["round", "target", "sparsity", "select_accuracy", "accuracy", "accuracy_change", "params", "ops",
               "params_score", "ops_score", "score", "epochs", "seconds", "chosen"]
    with publishing(cfg["metrics"]):
        atomic_write_csv(cfg["rounds_table"], rows, columns)
        atomic_write_csv(cfg["layers_table"], layer_table(final), ["layer", "shape", "numel", "nonzero", "sparsity"])
        save_model(cfg["out"], final, masks=final_masks or None, recipe=recipe, stage="prune",
                   pruned_round=chosen_round)
    metrics = stage_metrics(final, data, seed=cfg["seed"], device=recipe["device"], started=started,
                            bits=cfg["bits"], chosen_round=chosen_round, passthrough=chosen is None,
                            rounds=len(cfg["schedule"]), sparsity=rows[chosen_round]["sparsity"],
                            target=rows[chosen_round]["target"], input_accuracy=ref_test,
                            select_split=split, granularity=cfg["granularity"], scope=cfg["scope"],
                            normalize=cfg["normalize"], retrain=cfg["retrain"])
    metrics["accuracy_change"] = metrics["accuracy"] - ref_test
    metrics["input_score"] = ref_score["score"]
    publish_metrics(cfg["metrics"], metrics)
    return metrics
