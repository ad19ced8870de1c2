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

import time
from pathlib import Path

from sipa_core.checkpoint import save_model
from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_csv, publish_metrics, publishing
from sipa_core.paths import path_fields, read_params
from sipa_core.params import Field, check_section, raw_section, refuse_keys
from sipa_core.prune.masks import GRANULARITIES, NORMALIZATIONS, SCOPES, layer_table, masks_from_zeros
from sipa_core.prune.rounds import ROUND_COLUMNS, chosen_network, prepare_run, run_round, select_round
from sipa_core.stage_common import stage_metrics
from sipa_core.stage_runner import Stage
from sipa_core.train.recipe import check_recipe

# The paper's schedule (Appendix A.3): 10% steps to 50%, then 2.5% steps to 60%, then 2% steps to 64%.
PAPER_SCHEDULE = [0.1, 0.2, 0.3, 0.4, 0.5, 0.525, 0.55, 0.575, 0.6, 0.62, 0.64]


def _schedule(value) -> str | None:
    if not value:
        return "must list at least one sparsity target (one entry = one-shot pruning)"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "must be a list of numbers (cumulative sparsity targets)"
    if not all(0 < v < 1 for v in value):
        return "every target must be in (0, 1): a fraction of the weights removed, or a score"
    return None


PRUNE_SCHEMA = {
    "granularity": Field(str, "weight", choices=GRANULARITIES,
                         help="weight: unstructured masks; filter: remove whole output channels"),
    "round_to": Field(int, None, nullable=True, min=1,
                      help="filter granularity: every layer keeps a multiple of this many channels (8 suits "
                           "integer kernels); null: any count"),
    "scope": Field(str, "global", choices=SCOPES, help="global: one threshold; layerwise: same sparsity everywhere"),
    "normalize": Field(str, "l2", choices=NORMALIZATIONS,
                       help="global scope: divide each layer's |w| by its L2 norm first (the paper's); score: "
                            "then by what one of its weights costs in the score (score-aware, weight granularity)"),
    "target": Field(str, "sparsity", choices=("sparsity", "score"),
                    help="what the schedule lists: sparsities (rising) or strict MicroNet scores (falling; "
                         "each round prunes weights until the counted score is at most its target)"),
    "preset": Field(str, None, nullable=True, choices=("paper",), help="paper: the paper's 11-round schedule"),
    "schedule": Field(list, [0.3, 0.5, 0.6], check=_schedule,
                      help="cumulative targets, one per round: sparsities (filter: fraction of channels), or "
                           "scores with target: score"),
    "epochs": Field(int, 2, min=0, help="retraining epochs per round (gradual: the pruning epochs)"),
    "method": Field(str, "rounds", choices=("rounds", "gradual"),
                    help="rounds: the paper's prune-retrain rounds; gradual: Zhu-Gupta in one training run"),
    "gradual_every": Field(int, 10, min=1, help="gradual: optimizer steps between mask updates"),
    "gradual_finetune_epochs": Field(int, 1, min=0, help="gradual: epochs at the final sparsity after pruning"),
    "retrain": Field(str, "finetune", choices=("finetune", "reinit"),
                     help="finetune: from the current weights; reinit: fresh weights, same masks"),
    "recipe": Field(dict, {"lr": 0.02}, help="overrides of the input checkpoint's training recipe"),
    "min_accuracy": Field(float, None, nullable=True, min=0, max=1, help="keep rounds at or above this accuracy"),
    "max_drop": Field(float, 0.05, nullable=True, min=0, max=1, help="keep rounds within this of the input's accuracy"),
    "select_split": Field(str, "val", choices=("val", "test"),
                          help="split the round is chosen on: val; test only on request (the authors' "
                               "procedure, marked as chosen on test)"),
    "bits": Field(int, 16, min=1, max=32),
    "seed": Field(int, 0, min=0),
    **path_fields('prune', model=('improve', 'out'), data=('prepare', 'out')),
}


def read_config(params_path: str | Path) -> dict:
    data = read_params(params_path)
    cfg = check_section(data.get("prune"), PRUNE_SCHEMA, file=params_path, section="prune")
    if cfg["preset"] == "paper":
        refuse_keys(raw_section(params_path, "prune"), ("schedule",), file=params_path, section="prune",
                    why="prune.preset: paper sets the schedule; remove one of the two")
        cfg["schedule"] = list(PAPER_SCHEDULE)
    cfg["schedule"] = [float(v) for v in cfg["schedule"]]
    _check_targets(cfg, params_path)
    if cfg["round_to"] is not None and cfg["granularity"] != "filter":
        raise SipaError(f"{params_path}: prune.round_to: rounds channel counts, which only filter pruning "
                        f"changes (granularity: {cfg['granularity']}); set it to null or granularity: filter")
    if cfg["method"] == "gradual" and cfg["granularity"] != "weight":
        raise SipaError(f"{params_path}: prune.method: gradual prunes weights (granularity: weight), "
                        f"not {cfg['granularity']}s")
    # Checked now, completed with the input checkpoint's recipe when the stage runs.
    refuse_keys(cfg["recipe"], ("epochs", "seed"), file=params_path, section="prune.recipe",
                why="set prune.epochs / prune.seed instead (the stage sets these itself)")
    check_recipe({**cfg["recipe"], "epochs": cfg["epochs"]}, file=params_path, section="prune.recipe")
    return cfg


def _check_targets(cfg: dict, params_path) -> None:
    """Sparsity targets rise, score targets fall; score-aware pruning and score targets prune weights."""
    rising = cfg["target"] == "sparsity"
    if any((b <= a) if rising else (b >= a) for a, b in zip(cfg["schedule"], cfg["schedule"][1:])):
        raise SipaError(f"{params_path}: prune.schedule: {cfg['target']} targets must "
                        f"{'increase' if rising else 'decrease'} (they are cumulative)")
    for key, value in (("normalize", "score"), ("target", "score")):
        if cfg[key] == value and cfg["granularity"] != "weight":
            raise SipaError(f"{params_path}: prune.{key}: {value} needs granularity: weight")
    if cfg["target"] == "score" and cfg["method"] == "gradual":
        raise SipaError(f"{params_path}: prune.target: score needs method: rounds (gradual pruning "
                        f"follows a sparsity schedule)")


def prune(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    started = time.time()
    run, model = prepare_run(cfg, params_file, progress)
    model.eval()
    input_row = run.row(model, 0, 0.0)
    run.ref_test, run.ref_params = input_row["accuracy"], input_row["params"]
    masks = masks_from_zeros(model) if cfg["granularity"] == "weight" else {}
    rows = [input_row]
    schedule = cfg["schedule"][-1:] if cfg["method"] == "gradual" else cfg["schedule"]  # gradual: one run
    for k, target in enumerate(schedule, start=1):
        model, masks, row = run_round(run, model, masks, k, target, progress)
        rows.append(row)
    chosen = select_round(rows[1:], input_row["select_accuracy"], cfg["min_accuracy"], cfg["max_drop"],
                          by_score=cfg["target"] == "score")
    final, final_masks = chosen_network(run, chosen)
    chosen_round = 0 if chosen is None else chosen["round"]
    for row in rows:
        row["chosen"] = "yes" if row["round"] == chosen_round else "no"
    with publishing(cfg["metrics"]):
        atomic_write_csv(cfg["rounds_table"], rows, ROUND_COLUMNS)
        atomic_write_csv(cfg["layers_table"], layer_table(final), ["layer", "shape", "numel", "nonzero", "sparsity"])
        save_model(cfg["out"], final, masks=final_masks or None, recipe=run.recipe, stage="prune",
                   pruned_round=chosen_round, lineage=run.lineage)
    metrics = stage_metrics(final, run.data, seed=cfg["seed"], device=run.recipe["device"], started=started,
                            bits=cfg["bits"], chosen_round=chosen_round, passthrough=chosen is None,
                            rounds=len(schedule), sparsity=rows[chosen_round]["sparsity"],
                            target=rows[chosen_round]["target"], input_accuracy=run.ref_test,
                            select_split=run.split, chosen_on_test=run.split == "test",
                            granularity=cfg["granularity"], scope=cfg["scope"],
                            normalize=cfg["normalize"], retrain=cfg["retrain"], method=cfg["method"])
    metrics["accuracy_change"] = metrics["accuracy"] - run.ref_test
    metrics["input_score"] = input_row["score"]
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


def summary(cfg: dict, m: dict) -> str:
    if m["passthrough"]:
        return (f"prune: no round kept the accuracy requirement; the input model passes through "
                f"(accuracy {m['accuracy']:.4f}, score {m['score']:.6f})")
    return (f"prune: round {m['chosen_round']}/{m['rounds']} chosen, sparsity {m['sparsity']:.3f}; "
            f"test accuracy {m['accuracy']:.4f} ({m['accuracy_change']:+.4f}); score {m['score']:.6f} "
            f"(input {m['input_score']:.6f})")


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that the chosen method or scope does not use."""
    scope = ["prune.normalize: scope is layerwise (every tensor at the same sparsity)"] \
        if cfg["scope"] == "layerwise" and "normalize" in raw else []
    if cfg["method"] == "rounds":
        return scope + [f"prune.{k}: method is rounds" for k in ("gradual_every", "gradual_finetune_epochs")
                        if k in raw]
    out = [f"prune.schedule: method gradual prunes to its last target only ({cfg['schedule'][-1]})"] \
        if len(cfg["schedule"]) > 1 else []
    return scope + out + (["prune.retrain: method gradual fine-tunes within its one run"] if "retrain" in raw else [])


STAGE = Stage("prune", __doc__, read_config, prune, summary, inactive)
