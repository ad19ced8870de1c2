"""Pruning rounds (SIPA section 2.3, Appendix A.3): each round prunes to the next
cumulative target of the schedule (``_prune_step``: weights by magnitude, or whole filters),
retrains (``_retrain``: fine-tune from the current weights, or re-initialise and train with
the masks), evaluates on the selection split and on test, and counts the MicroNet score with
each tensor's own sparsity. A round's result is kept under the stage's state folder, so a
killed stage resumes at its first unfinished round (and mid-round at its last finished
epoch). ``gradual`` prunes in one training run instead (``gradual.py``). ``select_round``
takes the sparsest round that keeps the accuracy requirement on the selection split.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sipa_core.checkpoint import load_model
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.lineage import Lineage, input_lineage, refuse_trained_split
from sipa_core.models import create_model
from sipa_core.prune.cost import masks_for_score, weight_costs
from sipa_core.prune.gradual import GradualPruner
from sipa_core.prune.masks import (apply_masks, magnitude_masks, records_filters, refresh_spec, remove_filters,
                                   sparsity)
from sipa_core.resume import file_digest, keep, load_kept, run_key
from sipa_core.stage_common import load_data, load_input_model, score_metrics
from sipa_core.train import configure_model, evaluate, fit
from sipa_core.train.recipe import check_recipe

ROUND_FORMAT = "sipa-prune-round"


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
    lineage: Lineage | None = None  # the input model's: its training splits are retrained on
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


def prepare_run(cfg: dict, params_file: str, progress):
    """Data, input model and recipe, checked; the run folder keyed by everything that decides the rounds."""
    where = f"{params_file}: prune"
    data = load_data(cfg["data"], f"{where}.data")
    source = Path(cfg["model"])
    model, ckpt = load_input_model(source, data, f"{where}.model", "improving")
    if cfg["granularity"] == "filter" and not records_filters(model):
        raise SipaError(f"{where}.granularity: filter pruning records no channel counts for the "
                        f"{model.spec.get('family')} family (weight granularity prunes it)")
    split = cfg["select_split"]
    if split == "val" and len(data.val_y) == 0:
        raise SipaError(f"{where}.select_split: the round is chosen on the validation split, but it is empty "
                        f"(prepare.val_size: 0); prepare one, or set prune.select_split: test to choose on "
                        f"test as the authors did (marked as chosen on test in the metrics and Table 1)")
    lineage = input_lineage(ckpt.lineage, data, f"{where}.model", source)
    refuse_trained_split(split, lineage, f"{params_file}: prune.select_split", source)
    recipe = check_recipe({**(ckpt.recipe or {}), **cfg["recipe"], "epochs": cfg["epochs"],
                           "seed": cfg["seed"]}, file=params_file, section="prune.recipe")
    key_blob = {k: cfg[k] for k in ("granularity", "scope", "normalize", "schedule", "retrain", "seed", "method")}
    if cfg["target"] != "sparsity":
        key_blob["target"] = cfg["target"]
    if cfg["round_to"] is not None:
        key_blob["round_to"] = cfg["round_to"]
    if cfg["method"] == "gradual":
        key_blob.update(every=cfg["gradual_every"], finetune=cfg["gradual_finetune_epochs"])
    key = run_key({**key_blob, "recipe": recipe, "input": file_digest(source), "data": data.source,
                   "splits": list(lineage.splits)})
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
                   normalize=cfg["normalize"], round_to=cfg["round_to"])
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
            train_splits=tuple(run.lineage.splits),
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
        train_splits=tuple(run.lineage.splits), after_step=pruner, tag="prune-gradual",
        desc=f"gradual pruning to {cfg['schedule'][-1]:.0%}", progress=progress, teacher=run.teacher)
    model = create_model(trainee.spec)
    model.load_state_dict(trainee.state_dict())
    return model.cpu().eval(), pruner.masks or {}


def load_round(saved: dict):
    model = create_model(saved["arch"])
    model.load_state_dict(saved["model"])
    return model


def run_round(run: PruneRun, model, masks: dict, k: int, target: float, progress):
    """One round (or its kept result): (model, masks, row)."""
    saved = load_kept(run.round_dir(k) / "result.pt", ROUND_FORMAT, what="pruning round",
                      announce=f"prune round {k}")
    if saved is not None:
        return load_round(saved), saved["masks"], saved["row"]
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


def chosen_network(run: PruneRun, chosen: dict | None):
    """(network, masks) of the chosen round, or the input network unchanged when none was chosen."""
    if chosen is None:
        return load_model(run.cfg["model"])[0].eval(), {}
    saved = load_kept(run.round_dir(chosen["round"]) / "result.pt", ROUND_FORMAT, what="pruning round",
                      counted=False)
    return load_round(saved).eval(), saved["masks"]
