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

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_write_csv, publish_metrics, publishing
from sipa_core.lineage import input_lineage, refuse_trained_split
from sipa_core.models import create_model
from sipa_core.paths import path_fields
from sipa_core.params import Field, check_section, load_yaml, raw_section, refuse_keys
from sipa_core.prune.cost import masks_for_score, weight_costs
from sipa_core.prune.gradual import GradualPruner
from sipa_core.prune.masks import (GRANULARITIES, NORMALIZATIONS, SCOPES, apply_masks, layer_table, magnitude_masks,
                                   masks_from_zeros, refresh_spec, remove_filters, sparsity)
from sipa_core.resume import file_digest, keep, load_kept, run_key
from sipa_core.stage_common import load_data, load_input_model, score_metrics, stage_metrics
from sipa_core.stage_runner import Stage
from sipa_core.train import configure_model, evaluate, fit
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
        return "every target must be in (0, 1): a fraction of the weights removed, or a score"
    return None


PRUNE_SCHEMA = {
    "granularity": Field(str, "weight", choices=GRANULARITIES,
                         help="weight: unstructured masks; filter: remove whole output channels"),
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
    data = load_yaml(params_path)
    cfg = check_section(data.get("prune"), PRUNE_SCHEMA, file=params_path, section="prune")
    if cfg["preset"] == "paper":
        refuse_keys(raw_section(params_path, "prune"), ("schedule",), file=params_path, section="prune",
                    why="prune.preset: paper sets the schedule; remove one of the two")
        cfg["schedule"] = list(PAPER_SCHEDULE)
    cfg["schedule"] = [float(v) for v in cfg["schedule"]]
    _check_targets(cfg, params_path)
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


def select_round(rows: list[dict], reference: float, min_accuracy: float | None, max_drop: float | None,
                 by_score: bool = False):
    """The sparsest round meeting the requirement (``by_score``: the lowest score; None: none
    does). With no requirement set, the last (sparsest) round."""
    ok = []
    for row in rows:
        acc = row["select_accuracy"]
        if min_accuracy is not None and not acc >= min_accuracy:
            continue
        if max_drop is not None and not acc >= reference - max_drop - 1e-12:
            continue
        ok.append(row)
    if by_score:
        return min(ok, key=lambda r: (r["score"], -r["round"])) if ok else None
    return max(ok, key=lambda r: (r["sparsity"], r["round"])) if ok else None


ROUND_COLUMNS = ["round", "target", "sparsity", "select_accuracy", "accuracy", "accuracy_change", "params", "ops",
                 "params_score", "ops_score", "score", "score_tree", "epochs", "seconds", "chosen"]


@dataclass
class PruneRun:
    """What the rounds share: config, data, the selection split, the recipe,
    the run folder, and the input model's reference figures."""

    cfg: dict
    data: object
    split: str
    recipe: dict
    run_dir: Path
    lineage: dict = field(default_factory=dict)  # the input model's: its training splits are retrained on
    ref_test: float = 0.0
    ref_params: float = 0.0
    rows: list = field(default_factory=list)
    teacher: torch.nn.Module | None = None  # distillation (recipe.distill_weight > 0): the input network
    costs: dict | None = None  # normalize or target score: each tensor's WeightCost (prune/cost.py)

    @property
    def fp16(self) -> bool:
        return self.cfg["bits"] == 16

    def round_dir(self, k: int) -> Path:
        return self.run_dir / f"round_{k:02d}"

    def row(self, model, k: int, target: float, *, filters: bool = False, epochs: int = 0) -> dict:
        """One line of the rounds table (the input model is round 0): evaluate, count. Sparsity is
        the masks' (``filters``: the fraction of the input's parameters removed)."""
        acc_select = evaluate(model, self.data, self.split, fp16=self.fp16)
        acc_test = evaluate(model, self.data, "test", fp16=self.fp16)
        s = score_metrics(model, self.data, self.cfg["bits"])
        sparsity_value = 1 - s["params"] / self.ref_params if filters else sparsity(model)
        return {"round": k, "target": target, "sparsity": sparsity_value, "select_accuracy": acc_select,
                "accuracy": acc_test, "accuracy_change": acc_test - self.ref_test if k else 0.0,
                "params": s["params"], "ops": s["ops"], "params_score": s["params_score"],
                "ops_score": s["ops_score"], "score": s["score"], "score_tree": s["score_tree"], "epochs": epochs,
                "seconds": 0.0}


def _prepare_run(cfg: dict, params_file: str, progress):
    """Data, input model and recipe, checked; the run folder keyed by everything that decides the rounds."""
    where = f"{params_file}: prune"
    data = load_data(cfg["data"], f"{where}.data")
    source = Path(cfg["model"])
    model, meta = load_input_model(source, data, f"{where}.model", "improving")
    if cfg["granularity"] == "filter" and not hasattr(model, "channel_counts"):
        raise SipaError(f"{where}.granularity: filter pruning needs an EfficientNet-family network")
    split = cfg["select_split"]
    if split == "val" and len(data.val_y) == 0:
        raise SipaError(f"{where}.select_split: the round is chosen on the validation split, but it is empty "
                        f"(prepare.val_size: 0); prepare one, or set prune.select_split: test to choose on "
                        f"test as the authors did (marked as chosen on test in the metrics and Table 1)")
    lineage = input_lineage(meta, data, f"{where}.model", source)
    refuse_trained_split(split, lineage, f"{params_file}: prune.select_split", source)
    recipe = check_recipe({**(meta.get("recipe") or {}), **cfg["recipe"], "epochs": cfg["epochs"],
                           "seed": cfg["seed"]}, file=params_file, section="prune.recipe")
    key_blob = {k: cfg[k] for k in ("granularity", "scope", "normalize", "schedule", "retrain", "seed", "method")}
    if cfg["target"] != "sparsity":
        key_blob["target"] = cfg["target"]
    if cfg["method"] == "gradual":
        key_blob.update(every=cfg["gradual_every"], finetune=cfg["gradual_finetune_epochs"])
    key = run_key({**key_blob, "recipe": recipe, "input": file_digest(source), "data": data.source,
                   "splits": lineage["splits"]})
    run = PruneRun(cfg, data, split, recipe, Path(cfg["state"]) / key, lineage)
    run.teacher = copy.deepcopy(model).eval() if recipe["distill_weight"] else None
    if "score" in (cfg["normalize"], cfg["target"]):
        run.costs = weight_costs(model, (3, *data.image_size), cfg["bits"])
    return run, model


def _prune_step(run: PruneRun, model, masks: dict, k: int, target: float):
    """Prune ``model`` to the round's cumulative target (masks, or whole filters removed)."""
    cfg = run.cfg
    if cfg["granularity"] == "weight":
        def make(s):
            return magnitude_masks(model, masks, s, scope=cfg["scope"], normalize=cfg["normalize"], costs=run.costs)
        if cfg["target"] == "score":
            return masks_for_score(make, model, target, sparsity(model), (3, *run.data.image_size), cfg["bits"])[0]
        return make(target)
    # Targets are cumulative fractions of the input's channels; each round removes the
    # fraction of the *current* channels that reaches the next target.
    prev = cfg["schedule"][k - 2] if k > 1 else 0.0
    h = run.data.image_size[0]
    remove_filters(model, 1 - (1 - target) / (1 - prev), torch.zeros(1, 3, h, h), scope=cfg["scope"],
                   normalize=cfg["normalize"])
    refresh_spec(model)
    return masks


def _retrain(run: PruneRun, model, masks: dict, k: int, progress):
    """Fine-tune (or re-initialise and train) with the masks re-applied after every step."""
    cfg = run.cfg
    if cfg["retrain"] == "reinit":
        torch.manual_seed(cfg["seed"] + k)
        model = create_model(model.spec)
    if masks:
        apply_masks(model, masks)
    if cfg["epochs"] > 0:
        trainee = configure_model(create_model(model.spec), run.recipe)  # ghost BN etc. for training only
        trainee.load_state_dict(model.state_dict())
        fit(trainee, run.data, run.recipe, state_path=run.round_dir(k) / "train.pt", val_split=None,
            train_splits=tuple(run.lineage["splits"]),
            after_step=(lambda m: apply_masks(m, masks)) if masks else None,
            tag=f"prune-round-{k}", desc=f"prune round {k}/{len(cfg['schedule'])}", progress=progress,
            teacher=run.teacher)
        model = create_model(trainee.spec)
        model.load_state_dict(trainee.state_dict())  # back to plain modules (state-dict compatible)
    return model.cpu().eval()


def _gradual(run: PruneRun, model, progress):
    """Zhu-Gupta pruning to the schedule's last target in one training run (``epochs`` pruning
    epochs, then ``gradual_finetune_epochs`` at the final sparsity); masks kept after every step."""
    cfg = run.cfg
    pruner = GradualPruner(sparsity(model), cfg["schedule"][-1], cfg["epochs"], cfg["gradual_every"],
                           cfg["scope"], cfg["normalize"], run.costs)
    recipe = {**run.recipe, "epochs": cfg["epochs"] + cfg["gradual_finetune_epochs"]}
    trainee = configure_model(create_model(model.spec), recipe)
    trainee.load_state_dict(model.state_dict())
    fit(trainee, run.data, recipe, state_path=run.round_dir(1) / "train.pt", val_split=None,
        train_splits=tuple(run.lineage["splits"]), after_step=pruner, tag="prune-gradual",
        desc=f"gradual pruning to {cfg['schedule'][-1]:.0%}", progress=progress, teacher=run.teacher)
    model = create_model(trainee.spec)
    model.load_state_dict(trainee.state_dict())
    return model.cpu().eval(), pruner.masks or {}


def _load_round(saved: dict):
    model = create_model(saved["arch"])
    model.load_state_dict(saved["model"])
    return model


def _run_round(run: PruneRun, model, masks: dict, k: int, target: float, progress):
    """One round (or its kept result): (model, masks, row)."""
    saved = load_kept(run.round_dir(k) / "result.pt", ROUND_FORMAT, what="pruning round",
                      announce=f"prune round {k}")
    if saved is not None:
        return _load_round(saved), saved["masks"], saved["row"]
    t0 = time.time()
    if run.cfg["method"] == "gradual":
        model, masks = _gradual(run, model, progress)
        epochs = run.cfg["epochs"] + run.cfg["gradual_finetune_epochs"]
    else:
        masks = _prune_step(run, model, masks, k, target)
        model = _retrain(run, model, masks, k, progress)
        epochs = run.cfg["epochs"]
    row = run.row(model, k, target, filters=not masks, epochs=epochs)
    row["seconds"] = round(time.time() - t0, 2)
    keep(run.round_dir(k) / "result.pt", {"arch": dict(model.spec), "model": model.state_dict(), "masks": masks,
                                          "row": row}, ROUND_FORMAT, since=t0)
    fault_point("round")
    return model, masks, row


def prune(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage; returns the metrics written to ``cfg['metrics']``."""
    started = time.time()
    run, model = _prepare_run(cfg, params_file, progress)
    model.eval()
    input_row = run.row(model, 0, 0.0)
    run.ref_test, run.ref_params = input_row["accuracy"], input_row["params"]
    masks = masks_from_zeros(model) if cfg["granularity"] == "weight" else {}
    rows = [input_row]
    schedule = cfg["schedule"][-1:] if cfg["method"] == "gradual" else cfg["schedule"]  # gradual: one run
    for k, target in enumerate(schedule, start=1):
        model, masks, row = _run_round(run, model, masks, k, target, progress)
        rows.append(row)
    chosen = select_round(rows[1:], input_row["select_accuracy"], cfg["min_accuracy"], cfg["max_drop"],
                          by_score=cfg["target"] == "score")
    if chosen is None:
        final, final_masks, chosen_round = load_model(cfg["model"])[0], {}, 0
    else:
        saved = load_kept(run.round_dir(chosen["round"]) / "result.pt", ROUND_FORMAT, what="pruning round",
                          counted=False)
        final, final_masks, chosen_round = _load_round(saved), saved["masks"], chosen["round"]
    final.eval()
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
