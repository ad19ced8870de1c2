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

import sys
import time
from pathlib import Path

from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.improve.runs import TrialRunner, select_techniques, train_final
from sipa_core.improve.techniques import (OPTIONS_SCHEMA, PAPER_ADOPTED, PAPER_BASE, Decision, _technique_list,
                                          apply_techniques)
from sipa_core.io import atomic_write_csv, atomic_write_text, publish_metrics, publishing
from sipa_core.lineage import lineage_record
from sipa_core.entry_points import named_entry_point
from sipa_core.paths import PATHS, path_fields, read_params
from sipa_core.params import Field, check_section, refuse_keys
from sipa_core.stage_common import create_seeded_model, load_data, resolve_arch, stage_metrics
from sipa_core.stage_runner import Stage
from sipa_core.train import evaluate
from sipa_core.train.recipe import check_recipe, refuse_distillation
from sipa_core.train.structure import unsupported_structure

IMPROVE_SCHEMA = {
    "arch": Field(str, PATHS["search"]["out_arch"],
                  help="the search's result (default), a registered name, an architecture YAML, or a checkpoint"),
    "init": Field(str, None, nullable=True, help="start from this checkpoint's weights (null: fresh init)"),
    "greedy": Field(bool, True, help="false: train base + `adopt` directly"),
    "preset": Field(str, None, nullable=True, choices=("paper",), help="paper: the paper's base and final recipe"),
    "candidates": Field(list, ["larger_lr", "no_bias_decay", "swish", "label_smoothing"], check=_technique_list),
    "adopt": Field(list, [], check=_technique_list, help="techniques applied without selection (greedy: false)"),
    "order": Field(str, "category", choices=("category", "listed"),
                   help="category: try candidates from least to most sensitive group; listed: as written"),
    "base": Field(dict, {"batch_size": 64, "lr": 0.05, "schedule": "cosine", "weight_decay": 0.0005,
                         "activation": "relu", "seed": 0}, help="the base training recipe (see the recipe keys)"),
    "options": Field(dict, {"larger_lr": 0.1},
                     help="values the techniques set (larger_lr, ghost_batch, label_smoothing, ...)"),
    "trial_epochs": Field(int, 2, min=1),
    "trial_seeds": Field(int, 1, min=1),
    "threshold": Field(float, 0.0, min=0, max=1, help="adopt when mean val accuracy gains more than this"),
    "final_epochs": Field(int, 4, min=1),
    "compare_base": Field(bool, True, help="also train the base recipe for the final budget, to report the gain"),
    "bits": Field(int, 16, min=1, max=32, help="bit width the score and the reported accuracy use"),
    **path_fields('improve', data=('prepare', 'out'), search_model=('search', 'out')),
}


def read_config(params_path: str | Path) -> dict:
    """The checked ``improve`` section; recipes and options checked too, before any work."""
    data = read_params(params_path)
    cfg = check_section(data.get("improve"), IMPROVE_SCHEMA, file=params_path, section="improve")
    refuse_keys(cfg["base"], ("epochs",), file=params_path, section="improve.base",
                why="set improve.trial_epochs / improve.final_epochs instead (each training sets its own)")
    base = dict(PAPER_BASE) if cfg["preset"] == "paper" else {}
    base.update(cfg["base"])
    cfg["base"] = check_recipe(base, file=params_path, section="improve.base")
    refuse_distillation(cfg["base"], file=params_path, section="improve.base")
    cfg["options"] = check_section(cfg["options"], OPTIONS_SCHEMA, file=params_path, section="improve.options")
    if cfg["preset"] == "paper" and not cfg["adopt"]:
        cfg["adopt"] = list(PAPER_ADOPTED)
    named_entry_point(cfg["arch"], f"{params_path}: improve.arch")  # a network file outside networks/ fails
    return cfg


def write_compare(path: str | Path, curves: dict[str, list[dict]]) -> None:
    """Per epoch: the final recipe's and (with compare_base) the base recipe's validation accuracy,
    training loss and learning rate (at the epoch's last step); written whatever the options, base
    columns empty when not trained."""
    epochs = max((len(h) for h in curves.values()), default=0)
    rows = [{"epoch": e + 1, **{f"{name}_{key}": h[e].get(key) for name, h in curves.items() if e < len(h)
                                for key in ("val_acc", "train_loss", "lr")}} for e in range(epochs)]
    atomic_write_csv(path, rows, ["epoch", "final_val_acc", "base_val_acc", "final_train_loss", "base_train_loss",
                                  "final_lr", "base_lr"])


def write_table(path: str | Path, decisions: list[Decision], base_acc: float) -> None:
    lines = ["technique,category,acc_without,acc_with,gain,adopted"]
    lines.append(f"base,-,{base_acc:.4f},{base_acc:.4f},0.0000,base")
    for d in decisions:
        lines.append(f"{d.technique},{d.category},{d.acc_without:.4f},{d.acc_with:.4f},{d.gain:.4f},"
                     f"{'yes' if d.adopted else 'no'}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _check_inputs(cfg: dict, data, where: str):
    """The architecture spec and the init checkpoint, checked before any trial."""
    spec, _ = resolve_arch(cfg["arch"], data, f"{where}.arch")  # architecture only; weights come from `init`
    init = Path(cfg["init"]) if cfg["init"] else None
    if init is not None and not init.is_file():
        raise SipaError(f"{where}.init: checkpoint {init} not found")
    if init is not None:  # a checkpoint that does not fit the architecture fails now, not after trials
        try:
            create_seeded_model(spec, 0, init)
        except SipaError as err:
            raise SipaError(f"{where}.init: {err}") from None
    for name in [None] + list(cfg["candidates"] if cfg["greedy"] else cfg["adopt"]):
        recipe = apply_techniques(cfg["base"], [name] if name else [], cfg["options"])
        missing = unsupported_structure(spec, recipe)
        if missing:
            key = f"{where}.{'candidates' if cfg['greedy'] else 'adopt'}: {name}" if name else f"{where}.base"
            raise SipaError(f"{key} sets {missing[0]}, but the network {spec.get('name') or spec['family']} has no "
                            f"{missing[0]} setting: a checkpoint could not rebuild it as trained")
    if cfg["greedy"] and len(data.val_y) == 0:
        raise SipaError(f"{where}.greedy: selection needs validation data, but prepare.val_size is 0")
    return spec, init


def improve(cfg: dict, *, params_file: str = "params.yaml", progress: bool | None = None) -> dict:
    """Run the stage: selection (or a fixed recipe), final training, outputs. Returns the metrics."""
    started = time.time()
    where = f"{params_file}: improve"
    data = load_data(cfg["data"], f"{where}.data")
    spec, init = _check_inputs(cfg, data, where)
    runner = TrialRunner(cfg, spec, data, init, params_file, progress)
    adopted, decisions, base_acc = select_techniques(cfg, runner)
    final_recipe, model, extra, splits, curves = train_final(cfg, runner, adopted, data)
    model.cpu().eval()
    with publishing(cfg["metrics"]):
        write_table(cfg["table"], decisions, base_acc)
        write_compare(cfg["compare"], curves)
        save_model(cfg["out"], model, recipe=final_recipe, adopted=adopted, stage="improve",
                   lineage=lineage_record(data, splits))
    base = cfg["base"]
    metrics = stage_metrics(model, data, seed=base["seed"], device=base["device"], started=started,
                            bits=cfg["bits"], adopted=",".join(adopted) or "-", **extra)
    if "base_accuracy" in extra:
        metrics["gain_over_base"] = metrics["accuracy"] - extra["base_accuracy"]
    if "val" not in splits:
        metrics.update(_against_input(cfg, data, metrics))
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


def _against_input(cfg: dict, data, metrics: dict) -> dict:
    """The search's trained network on validation (when improve trains the search's architecture,
    as in the pipeline): a stage that hands on a worse network says so."""
    path = Path(cfg["search_model"])
    from_search = Path(cfg["arch"]).resolve().parent == path.resolve().parent  # the search's own result
    if not from_search or not path.is_file() or len(data.val_y) == 0:
        return {}
    try:
        searched, _ = load_model(path)
        searched_val = evaluate(searched, data, "val", fp16=cfg["bits"] == 16)
    except Exception:  # noqa: BLE001 - another architecture or data: no comparison to make
        return {}
    worse = metrics["val_accuracy"] < searched_val
    if worse:
        print(f"improve: the improved network is WORSE on validation than the search's trained network "
              f"({metrics['val_accuracy']:.4f} < {searched_val:.4f}, {path}): more final_epochs or another "
              f"base recipe", file=sys.stderr)
    return {"input_val_accuracy": searched_val, "worse_than_input": worse}


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that this mode does not use."""
    if cfg["greedy"]:
        unused = ["adopt"] if raw.get("adopt") else []
        return [f"improve.{k}: greedy selection chooses the techniques (adopt is for greedy: false)" for k in unused]
    keys = [k for k in ("candidates", "order", "trial_epochs", "trial_seeds", "threshold") if k in raw]
    return [f"improve.{k}: greedy: false trains `adopt` without trials" for k in keys]


def summary(cfg: dict, m: dict) -> str:
    base = f", base recipe {m['base_accuracy']:.4f}" if "base_accuracy" in m else ""
    return f"improve: adopted {m['adopted']}; test accuracy {m['accuracy']:.4f}{base}; score {m['score']:.6f}"


STAGE = Stage("improve", __doc__, read_config, improve, summary, inactive)
