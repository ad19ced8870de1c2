"""The Searching stage (SIPA section 2.1): hyperopt search of block arguments,
then of compound scaling coefficients.

Step 1 searches, per stage of a template network, the kernel, expansion
ratio, repeats and output channels, plus the SE ratio and where the stride-2
stages sit; step 2 searches depth, width and the resolution coefficient r
(the input is upsampled by round(r^phi, 2), the authors' parameterisation).
Each candidate is counted first: over the hard budget it is rejected from its
count alone, before any training; the others train for a short budget on a
subset and get the fitness R = A - [alpha * I(score - target)]^w (SIPA's
form, after Dai et al.). Finished trials are stored as JSON after each one and
fed back into hyperopt, so a killed search goes on from its finished trials;
every proposal is drawn from a generator seeded with (seed, trials so far), so
a resumed search proposes what the uninterrupted one would have.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import yaml

from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.launch import read_distributed
from sipa_core.io import atomic_write_text, publish_metrics, publishing
from sipa_core.lineage import lineage_record
from sipa_core.models import create_spec, decode_blocks
from sipa_core.entry_points import named_entry_point
from sipa_core.models.registry import SIPA_BASELINE_BLOCKS
from sipa_core.paths import path_fields, read_params
from sipa_core.params import Field, check_section
from sipa_core.search.ray_backend import check_ray, run_step_ray
from sipa_core.search.space import SPACE_SCHEMA, create_candidate_spec, smallest_score
from sipa_core.search.trials import best_of, run_step, subset_per_class, trial_id, write_tables
from sipa_core.stage_common import create_seeded_model, load_data, stage_metrics
from sipa_core.stage_runner import Stage
from sipa_core.train import configure_model, fit
from sipa_core.train.recipe import check_recipe, refuse_distillation


SEARCH_SCHEMA = {
    "method": Field(str, "hyperopt", choices=("preset", "hyperopt", "random")),
    "preset": Field(str, "sipa_baseline", help="the network `method: preset` trains: a registered name, "
                    "torchvision:<name>, timm:<name> or networks/<file>.py:<function> (docs/networks.md)"),
    "template": Field(list, list(SIPA_BASELINE_BLOCKS), help="block strings the search varies"),
    "head": Field(int, 150, min=1),
    "base_scaling": Field(dict, {"width": 1.0, "depth": 1.0, "resolution": 1.0},
                          help="scaling used while step 1 searches blocks"),
    "steps": Field(list, ["blocks", "scaling"], check=lambda v: None if v and set(v) <= {"blocks", "scaling"}
                   and len(set(v)) == len(v) else "must list blocks and/or scaling, once each"),
    "max_evals": Field(int, 3, min=1, help="trials per step, finished ones included"),
    "startup_trials": Field(int, 2, min=1, help="random trials before TPE models the results"),
    "space": Field(dict, {}),
    "budget": Field(float, 0.02, min=0, min_exclusive=True, help="hard budget on the MicroNet score"),
    "target": Field(float, 0.015, nullable=True, min=0, help="soft target of the fitness (null: the budget)"),
    "alpha": Field(float, 0.1, min=0, help="fitness penalty scale over the target"),
    "w": Field(float, 1.0, min=0, min_exclusive=True, help="fitness penalty exponent"),
    "trial_images_per_class": Field(int, None, nullable=True, min=1, help="train each trial on this subset"),
    "recipe": Field(dict, {"epochs": 2, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "weight_decay": 0.0005},
                    help="training recipe of a trial"),
    "seed": Field(int, 0, min=0),
    "backend": Field(str, "local", choices=("local", "ray")),
    "ray_address": Field(str, None, nullable=True, help="Ray cluster address (null: a local instance)"),
    "ray_concurrent": Field(int, 2, min=1),
    "ray_gpus_per_trial": Field(float, 0.0, min=0),
    "ray_cpus_per_trial": Field(float, 1.0, min=0, min_exclusive=True),
    "bits": Field(int, 16, min=1, max=32),
    **path_fields('search', data=('prepare', 'out')),
}


def read_config(params_path) -> dict:
    """The checked ``search`` section, bounds and recipe included, before any work."""
    raw = read_params(params_path)
    cfg = check_section(raw.get("search"), SEARCH_SCHEMA, file=params_path, section="search")
    where = f"{params_path}: search"
    cfg["space"] = check_section(cfg["space"], SPACE_SCHEMA, file=params_path, section="search.space")
    cfg["recipe"] = check_recipe(cfg["recipe"], file=params_path, section="search.recipe")
    refuse_distillation(cfg["recipe"], file=params_path, section="search.recipe")
    cfg["base_scaling"] = check_section(cfg["base_scaling"], {
        k: Field(float, 1.0, min=0, min_exclusive=True) for k in ("width", "depth", "resolution")},
        file=params_path, section="search.base_scaling")
    try:
        cfg["template_args"] = decode_blocks(cfg["template"])
    except SipaError as err:
        raise SipaError(f"{where}.template: {err}") from None
    if cfg["method"] == "preset":
        try:
            create_spec(cfg["preset"])
            named_entry_point(cfg["preset"], where + ".preset")
        except SipaError as err:
            raise SipaError(f"{where}.preset: {err}") from None
    if cfg["target"] is None:
        cfg["target"] = cfg["budget"]
    if cfg["backend"] == "ray" and cfg["method"] != "preset" and read_distributed(params_path)["processes"] > 1:
        raise SipaError(f"{where}.backend: ray spreads the trials over its own workers; with "
                        f"distributed.processes > 1 use backend: local (each trial data-parallel)")
    return cfg


def _train_preset(cfg: dict, data, trial_data, progress):
    """``method: preset``: the registered architecture, trained once with the trial recipe."""
    h, _ = data.image_size
    spec = create_spec(cfg["preset"], num_classes=data.num_classes, image_size=h)
    model = configure_model(create_seeded_model(spec, cfg["recipe"]["seed"]), cfg["recipe"])
    fit(model, trial_data, cfg["recipe"], state_path=Path(cfg["state"]) / "preset" / "state.pt", val_split=None,
        desc="preset", progress=progress)
    return model, [], {"trials": 0}


def _run_steps(cfg: dict, data, trial_data, where: str, progress, log) -> list[dict]:
    """Every step of the search in turn (each starts from the previous step's best blocks)."""
    fixed, rows = {"blocks": list(cfg["template"])}, []
    for step in cfg["steps"]:
        if cfg["backend"] == "ray":
            records = run_step_ray(step, cfg, trial_data, fixed, log=log)
        else:
            records = run_step(step, cfg, data, trial_data, fixed, progress, log)
        rows += records
        best = best_of(records)
        if best is None:
            raise SipaError(f"{where}: no candidate of step {step} fit the budget {cfg['budget']}; "
                            f"raise search.budget or shrink search.space")
        fixed = {"blocks": best["blocks"]}
    return rows


def _search_space(cfg: dict, data, trial_data, where: str, progress, log):
    """``method: hyperopt | random``: the steps, then the best trial's trained network."""
    h, _ = data.image_size
    if cfg["backend"] == "ray":
        check_ray(where)
    if len(data.val_y) == 0:
        raise SipaError(f"{where}.method: trials are compared on the validation split, but it is empty "
                        f"(prepare.val_size: 0); prepare one, or use method: preset")
    smallest = smallest_score(cfg, data.num_classes, h)
    if smallest > cfg["budget"]:
        raise SipaError(f"{where}.budget: {cfg['budget']} is below the smallest network of the space "
                        f"(score {smallest:.6f}); raise the budget or shrink the template/space")
    rows = _run_steps(cfg, data, trial_data, where, progress, log)
    best = best_of(rows)
    spec = create_candidate_spec(best["blocks"], {k: best[k] for k in ("width", "depth", "resolution")}, cfg,
                                 data.num_classes, h)
    model, _ = load_model(Path(best["run_dir"]) / "model.pt", spec)
    extra = {"trials": len(rows), "best_trial": trial_id(best), "fitness": best["fitness"],
             "median_fitness": statistics.median(r["fitness"] for r in rows if r["status"] == "trained")}
    return model, rows, extra


def search(cfg: dict, *, params_file: str = "params.yaml", progress=None, log=print) -> dict:
    """Run the stage; returns its metrics."""
    started = time.time()
    where = f"{params_file}: search"
    data = load_data(cfg["data"], f"{where}.data")
    trial_data = subset_per_class(data, cfg["trial_images_per_class"], cfg["seed"])
    if cfg["method"] == "preset":
        model, rows, extra = _train_preset(cfg, data, trial_data, progress)
    else:
        model, rows, extra = _search_space(cfg, data, trial_data, where, progress, log)
    model.cpu().eval()
    with publishing(cfg["metrics"]):
        write_tables(cfg, rows)
        atomic_write_text(cfg["out_arch"], yaml.safe_dump(dict(model.spec), sort_keys=False))
        save_model(cfg["out"], model, stage="search", lineage=lineage_record(data, ["train"]))
    metrics = stage_metrics(model, data, seed=cfg["seed"], device=cfg["recipe"]["device"], started=started,
                            bits=cfg["bits"], method=cfg["method"], **extra)
    publish_metrics(cfg["metrics"], metrics, cfg["info"])
    return metrics


SEARCH_ONLY_KEYS = ("template", "head", "base_scaling", "steps", "max_evals", "startup_trials", "space", "budget",
                    "target", "alpha", "w", "backend")
RAY_KEYS = ("ray_address", "ray_concurrent", "ray_gpus_per_trial", "ray_cpus_per_trial")


def inactive(cfg: dict, raw: dict) -> list[str]:
    """Keys set in the file that this mode does not use."""
    if cfg["method"] == "preset":
        return [f"search.{k}: method: preset trains search.preset without a search" for k in
                SEARCH_ONLY_KEYS + RAY_KEYS if k in raw]
    out = ["search.preset: used by method: preset only"] if "preset" in raw else []
    if cfg["backend"] != "ray":
        out += [f"search.{k}: used by backend: ray only" for k in RAY_KEYS if k in raw]
    return out


def summary(cfg: dict, m: dict) -> str:
    return (f"search ({m['method']}, {m['trials']} trials): accuracy {m['accuracy']:.4f}, "
            f"score {m['score']:.6f} -> {cfg['out_arch']}")


STAGE = Stage("search", __doc__, read_config, search, summary, inactive)
