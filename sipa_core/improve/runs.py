"""The improving stage's trainings: each recipe trained as a resumable run with a kept result
(``TrialRunner``: trials, the final training, the base comparison), the greedy selection over the
candidates on validation, and the final training of the adopted recipe beside the base recipe's."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from sipa_core.improve.techniques import TECHNIQUES, apply_techniques, greedy_select, ordered
from sipa_core.resume import file_digest, keep, load_kept, run_key
from sipa_core.stage_common import create_seeded_model
from sipa_core.train import TrainingDiverged, configure_model, evaluate, fit
from sipa_core.train.recipe import check_recipe


@dataclass
class TrialRunner:
    """Trains one recipe of the stage as a resumable run with a kept result
    (``state/<kind>/<run key>/``): trials, the final training, the base comparison."""

    cfg: dict
    spec: dict
    data: object
    init: Path | None
    params_file: str
    progress: bool | None = None

    def train(self, recipe: dict, *, epochs: int, seed: int, kind: str, train_splits=("train",), val_split="val",
              live=None, need_model: bool = False):
        """(result dict, trained model or None when the result was kept or the run diverged).
        ``need_model``: skip the kept result and resume the run (a finished one trains nothing)."""
        recipe = check_recipe({**recipe, "epochs": epochs, "seed": seed}, file=self.params_file,
                              section="improve.base")
        model = configure_model(create_seeded_model(self.spec, seed, self.init), recipe)
        key = run_key({"recipe": recipe, "spec": model.spec, "tag": f"{kind}:{','.join(train_splits)}:{self.init}",
                       "data": self.data.source, "init": file_digest(self.init) if self.init else None})
        run_dir = Path(self.cfg["state"]) / kind / key
        kept = None if need_model else load_kept(run_dir / "result.json", announce=f"improve {kind} {key}")
        if kept is not None:
            return kept, None
        started = time.time()
        try:
            res = fit(model, self.data, recipe, state_path=run_dir / "state.pt", live_dir=live,
                      train_splits=train_splits, val_split=val_split, tag=kind, desc=f"{kind} {key}",
                      progress=self.progress)
        except TrainingDiverged:
            return keep(run_dir / "result.json", {"val_acc": float("nan"), "diverged": True}, since=started), None
        out = {"val_acc": res.val_acc if res.val_acc is not None else float("nan"),
               "images_per_sec": res.images_per_sec, "seconds": res.seconds, "history": res.history}
        return keep(run_dir / "result.json", out, since=started), model

    def trial(self, recipe: dict) -> float:
        """Mean validation accuracy of a short run over ``trial_seeds`` seeds (NaN if any diverged)."""
        base_seed = self.cfg["base"]["seed"]
        accs = [self.train(recipe, epochs=self.cfg["trial_epochs"], seed=base_seed + k, kind="trial")[0]["val_acc"]
                for k in range(self.cfg["trial_seeds"])]
        return float("nan") if any(math.isnan(a) for a in accs) else sum(accs) / len(accs)


def select_techniques(cfg: dict, runner: TrialRunner):
    """The adopted techniques (greedy or fixed), one decision per trial, the base trial accuracy."""
    candidates = ordered(cfg["candidates"], cfg["order"])
    if not cfg["greedy"]:
        return ordered(cfg["adopt"], cfg["order"]), [], float("nan")
    adopted, decisions, base_acc = greedy_select(candidates, cfg["base"], cfg["options"], cfg["threshold"],
                                                 runner.trial)
    return adopted + [n for n in candidates if TECHNIQUES[n].final_only], decisions, base_acc


def train_final(cfg: dict, runner: TrialRunner, adopted: list[str], data):
    """The final training of the adopted recipe, and (``compare_base``) of the base recipe for the
    comparison: when the adopted techniques leave the base recipe as it is, the final network *is*
    the base recipe's network, and it is not trained a second time."""
    final_recipe = apply_techniques(cfg["base"], adopted, cfg["options"])
    no_val = "no_validation" in adopted
    splits, val_split = (("train", "val"), None) if no_val else (("train",), "val")
    base = cfg["base"]
    result, model = runner.train(final_recipe, epochs=cfg["final_epochs"], seed=base["seed"], kind="final",
                                 train_splits=splits, val_split=val_split, live=cfg["live"], need_model=True)
    extra, curves = {}, {"final": result["history"]}
    if cfg["compare_base"]:
        base_model = model
        if final_recipe != base:
            result, base_model = runner.train(base, epochs=cfg["final_epochs"], seed=base["seed"], kind="base-final",
                                              train_splits=splits, val_split=val_split, need_model=True)
        extra["base_accuracy"] = evaluate(base_model, data, "test", fp16=cfg["bits"] == 16)
        extra["base_is_final"] = final_recipe == base
        curves["base"] = result["history"]
    return final_recipe, model, extra, splits, curves
