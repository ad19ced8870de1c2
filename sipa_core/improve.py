"""The Improving stage (SIPA section 2.2): greedy selection of training techniques.

Candidates are tried in category order, from the least to the most
sensitive (general training settings, structural, loss-related, others).
Each is trained on top of what was adopted so far for a short trial budget,
averaged over seeds, and adopted only when validation accuracy improves by
more than a threshold. Then the adopted set trains for the full budget.
Every trial is a resumable run under the stage's state folder whose result
is kept, so a killed stage continues where it was and finished trials are
never trained twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sipa_core.errors import SipaError
from sipa_core.io import atomic_write_json, atomic_write_text, publish_metrics, publishing
from sipa_core.params import Field, check_section, load_yaml
from sipa_core.train.recipe import check_recipe

CATEGORIES = ("general", "structural", "loss", "others")  # least -> most sensitive (paper, Figure 4)


@dataclass(frozen=True)
class Technique:
    name: str
    category: str
    overrides: Callable[[dict, dict], dict]  # (recipe so far, options) -> recipe changes
    help: str
    final_only: bool = False  # changes the final training only (cannot be judged on validation)


TECHNIQUES: dict[str, Technique] = {t.name: t for t in [
    Technique("cosine", "general", lambda r, o: {"schedule": "cosine"}, "cosine annealing to lr_min"),
    Technique("larger_lr", "general", lambda r, o: {"lr": o["larger_lr"]}, "a larger initial learning rate"),
    Technique("warmup", "general", lambda r, o: {"warmup_epochs": o["warmup_epochs"]}, "linear warmup"),
    Technique("nesterov", "general", lambda r, o: {"nesterov": True}, "Nesterov momentum"),
    Technique("no_bias_decay", "general", lambda r, o: {"no_bias_decay": True}, "no weight decay on biases"),
    Technique("no_bn_decay", "general", lambda r, o: {"no_bn_decay": True}, "no weight decay on BatchNorm"),
    Technique("ghost_bn", "structural", lambda r, o: {"ghost_batch": o["ghost_batch"]}, "ghost BatchNorm"),
    Technique("swish", "structural", lambda r, o: {"activation": "swish"}, "swish activation"),
    Technique("label_smoothing", "loss", lambda r, o: {"label_smoothing": o["label_smoothing"]}, "label smoothing"),
    Technique("mixup", "loss", lambda r, o: {"mixup_alpha": o["mixup_alpha"]}, "mixup, one lambda per batch"),
    Technique("cutmix", "loss", lambda r, o: {"cutmix_alpha": o["cutmix_alpha"]}, "CutMix"),
    Technique("autoaugment", "others", lambda r, o: {"augment": "autoaugment"}, "AutoAugment (CIFAR policy)"),
    Technique("randaugment", "others", lambda r, o: {"augment": "randaugment"}, "RandAugment"),
    Technique("trivialaugment", "others", lambda r, o: {"augment": "trivialaugment"}, "TrivialAugment"),
    Technique("stabilize", "others", lambda r, o: {"stabilize_epochs": o["stabilize_epochs"],
                                                   "stabilize_lr": o["stabilize_lr"]},
              "distribution stabilisation: final epochs at a small lr with crop/flip only"),
    Technique("no_validation", "others", lambda r, o: {}, "final training on train + validation", final_only=True),
]}

# The paper's final recipe (Appendix A.2): what `improve.preset: paper` adopts.
PAPER_ADOPTED = ["cosine", "larger_lr", "no_bias_decay", "ghost_bn", "swish", "label_smoothing", "mixup",
                 "autoaugment", "no_validation"]
PAPER_BASE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "batch_size": 128, "schedule": "constant",
              "activation": "relu", "augment": "none"}

OPTIONS_SCHEMA = {
    "larger_lr": Field(float, 0.13, min=0, min_exclusive=True),
    "warmup_epochs": Field(int, 1, min=1),
    "ghost_batch": Field(int, 32, min=1),
    "label_smoothing": Field(float, 0.3, min=0, max=1, max_exclusive=True),
    "mixup_alpha": Field(float, 1.0, min=0, min_exclusive=True),
    "cutmix_alpha": Field(float, 1.0, min=0, min_exclusive=True),
    "stabilize_epochs": Field(int, 1, min=1),
    "stabilize_lr": Field(float, 0.001, min=0, min_exclusive=True),
}


def _technique_list(value) -> str | None:
    if not all(isinstance(v, str) for v in value):
        return "must be a list of technique names"
    unknown = [v for v in value if v not in TECHNIQUES]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], TECHNIQUES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown technique {unknown[0]!r}{hint}; known: {', '.join(TECHNIQUES)}"
    if len(set(value)) != len(value):
        return "lists a technique twice"
    return None


IMPROVE_SCHEMA = {
    "arch": Field(str, "sipa_baseline", help="registered name, architecture YAML, or checkpoint of the previous stage"),
    "init": Field(str, None, nullable=True, help="start from this checkpoint's weights (null: fresh init)"),
    "data": Field(str, "data/prepared/dataset.pt"),
    "greedy": Field(bool, True, help="false: train base + `adopt` directly"),
    "preset": Field(str, None, nullable=True, choices=("paper",), help="paper: the paper's base and final recipe"),
    "candidates": Field(list, list(TECHNIQUES)[:11], check=_technique_list),
    "adopt": Field(list, [], check=_technique_list, help="techniques applied without selection (greedy: false)"),
    "order": Field(str, "category", choices=("category", "listed"),
                   help="category: try candidates from least to most sensitive group; listed: as written"),
    "base": Field(dict, {}, help="the base training recipe (see the recipe keys)"),
    "options": Field(dict, {}, help="values the techniques set (larger_lr, ghost_batch, label_smoothing, ...)"),
    "trial_epochs": Field(int, 3, min=1),
    "trial_seeds": Field(int, 1, min=1),
    "threshold": Field(float, 0.0, min=0, max=1, help="adopt when mean val accuracy gains more than this"),
    "final_epochs": Field(int, 10, min=1),
    "compare_base": Field(bool, True, help="also train the base recipe for the final budget, to report the gain"),
    "bits": Field(int, 16, min=1, max=32, help="bit width the score and the reported accuracy use"),
    "out": Field(str, "models/improve.pt"),
    "state": Field(str, "state/improve"),
    "metrics": Field(str, "metrics/improve.json"),
    "table": Field(str, "plots/improve_techniques.csv"),
    "live": Field(str, "dvclive/improve"),
}


def read_config(params_path: str | Path) -> dict:
    """The checked ``improve`` section; recipes and options checked too, before any work."""
    data = load_yaml(params_path)
    cfg = check_section(data.get("improve"), IMPROVE_SCHEMA, file=params_path, section="improve")
    base = dict(PAPER_BASE) if cfg["preset"] == "paper" else {}
    base.update(cfg["base"])
    cfg["base"] = check_recipe(base, file=params_path, section="improve.base")
    cfg["options"] = check_section(cfg["options"], OPTIONS_SCHEMA, file=params_path, section="improve.options")
    if cfg["preset"] == "paper" and not cfg["adopt"]:
        cfg["adopt"] = list(PAPER_ADOPTED)
    return cfg


def apply_techniques(base: dict, names, options: dict) -> dict:
    recipe = dict(base)
    for name in names:
        recipe.update(TECHNIQUES[name].overrides(recipe, options))
    return recipe


def ordered(names: list[str], order: str) -> list[str]:
    if order == "listed":
        return list(names)
    return sorted(names, key=lambda n: (CATEGORIES.index(TECHNIQUES[n].category), names.index(n)))


@dataclass
class Decision:
    technique: str
    category: str
    acc_without: float
    acc_with: float
    adopted: bool

    @property
    def gain(self) -> float:
        return self.acc_with - self.acc_without


def greedy_select(candidates: list[str], base: dict, options: dict, threshold: float,
                  trial: Callable[[dict], float]) -> tuple[list[str], list[Decision], float]:
    """Adopt each candidate whose trial beats the best so far by more than ``threshold``.

    ``trial(recipe)`` returns the mean validation accuracy of a short run
    (NaN when the run diverged: never adopted). Returns the adopted names, one
    decision per candidate, and the base recipe's trial accuracy.
    """
    adopted: list[str] = []
    base_acc = trial(apply_techniques(base, [], options))
    best = base_acc
    decisions = []
    for name in candidates:
        if TECHNIQUES[name].final_only:
            continue
        acc = trial(apply_techniques(base, adopted + [name], options))
        take = not math.isnan(acc) and (math.isnan(best) or acc - best > threshold)
        decisions.append(Decision(name, TECHNIQUES[name].category, best, acc, take))
        if take:
            adopted.append(name)
            best = acc
    return adopted, decisions, base_acc


def run_key(recipe: dict, spec: dict, tag: str) -> str:
    blob = json.dumps({"recipe": recipe, "spec": spec, "tag": tag}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_table(path: str | Path, decisions: list[Decision], base_acc: float) -> None:
    lines = ["technique,category,acc_without,acc_with,gain,adopted"]
    lines.append(f"base,-,{base_acc:.4f},{base_acc:.4f},0.0000,base")
    for d in decisions:
        lines.append(f"{d.technique},{d.category},{d.acc_without:.4f},{d.acc_with:.4f},{d.gain:.4f},"
                     f"{'yes' if d.adopted else 'no'}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def improve(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage: selection (or a fixed recipe), final training, outputs. Returns the metrics."""
    from sipa_core.checkpoint import save_model
    from sipa_core.stage import build_for, load_data, resolve_arch, stage_metrics
    from sipa_core.train import TrainingDiverged, configure_model, fit

    started = time.time()
    where = f"{params_file}: improve"
    data = load_data(cfg["data"], f"{where}.data")
    spec, _ = resolve_arch(cfg["arch"], data, f"{where}.arch")  # architecture only; weights come from `init`
    init = Path(cfg["init"]) if cfg["init"] else None
    if init is not None and not init.is_file():
        raise SipaError(f"{where}.init: checkpoint {init} not found")
    if init is not None:  # a checkpoint that does not fit the architecture fails now, not after trials
        try:
            build_for(spec, 0, init)
        except SipaError as err:
            raise SipaError(f"{where}.init: {err}") from None
    state = Path(cfg["state"])
    base, options = cfg["base"], cfg["options"]
    candidates = ordered(cfg["candidates"], cfg["order"])
    if cfg["greedy"] and len(data.val_y) == 0:
        raise SipaError(f"{where}.greedy: selection needs validation data, but prepare.val_size is 0")

    def train(recipe: dict, *, epochs: int, seed: int, kind: str, train_splits=("train",), val_split="val",
              live=None):
        recipe = check_recipe({**recipe, "epochs": epochs, "seed": seed}, file=params_file, section="improve.base")
        model = configure_model(build_for(spec, seed, init), recipe)
        key = run_key(recipe, model.spec, f"{kind}:{','.join(train_splits)}:{init}")
        run_dir = state / kind / key
        result_file = run_dir / "result.json"
        if result_file.is_file() and live is None:
            print(f"improve {kind} {key}: kept from {result_file}", file=sys.stderr)
            return json.loads(result_file.read_text()), None
        try:
            res = fit(model, data, recipe, state_path=run_dir / "state.pt", live_dir=live,
                      train_splits=train_splits, val_split=val_split, tag=kind, desc=f"{kind} {key}",
                      progress=progress)
        except TrainingDiverged:
            out = {"val_acc": float("nan"), "diverged": True}
            atomic_write_json(result_file, out)
            return out, None
        out = {"val_acc": res.val_acc if res.val_acc is not None else float("nan"),
               "images_per_sec": res.images_per_sec, "seconds": res.seconds}
        atomic_write_json(result_file, out)
        return out, model

    def trial(recipe: dict) -> float:
        accs = [train(recipe, epochs=cfg["trial_epochs"], seed=base["seed"] + k, kind="trial")[0]["val_acc"]
                for k in range(cfg["trial_seeds"])]
        return float("nan") if any(math.isnan(a) for a in accs) else sum(accs) / len(accs)

    if cfg["greedy"]:
        adopted, decisions, base_acc = greedy_select(candidates, base, options, cfg["threshold"], trial)
        adopted += [n for n in candidates if TECHNIQUES[n].final_only]
    else:
        adopted, decisions, base_acc = ordered(cfg["adopt"], cfg["order"]), [], float("nan")

    final_recipe = apply_techniques(base, adopted, options)
    no_val = "no_validation" in adopted
    splits = ("train", "val") if no_val else ("train",)
    _, model = train(final_recipe, epochs=cfg["final_epochs"], seed=base["seed"], kind="final",
                     train_splits=splits, val_split=None if no_val else "val", live=cfg["live"])
    extra = {}
    if cfg["compare_base"]:
        _, base_model = train(base, epochs=cfg["final_epochs"], seed=base["seed"], kind="base-final",
                              train_splits=splits, val_split=None if no_val else "val",
                              live=str(Path(cfg["live"]).with_name(Path(cfg["live"]).name + "_base")))
        from sipa_core.train import evaluate

        extra["base_accuracy"] = evaluate(base_model, data, "test", fp16_weights=cfg["bits"] == 16)
    model.cpu().eval()
    with publishing(cfg["metrics"]):
        write_table(cfg["table"], decisions, base_acc)
        save_model(cfg["out"], model, recipe=final_recipe, adopted=adopted, stage="improve")
    metrics = stage_metrics(model, data, seed=base["seed"], device=base["device"], started=started,
                            bits=cfg["bits"], adopted=",".join(adopted) or "-", **extra)
    if "base_accuracy" in extra:
        metrics["gain_over_base"] = metrics["accuracy"] - extra["base_accuracy"]
    publish_metrics(cfg["metrics"], metrics)
    return metrics
