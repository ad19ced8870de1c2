"""The Searching stage (SIPA section 2.1): hyperopt search of block arguments,
then of compound scaling coefficients.

Step 1 searches, per stage of a template network, the kernel, expansion
ratio, repeats and output channels, plus the SE ratio and where the stride-2
stages sit; step 2 searches depth and resolution with the width following
from the resource constraint depth * width^2 * resolution^2 = resource.
Each candidate is counted first: over the hard budget it is rejected from its
count alone, before any training; the others train for a short budget on a
subset and get the fitness R = A - [alpha * I(score - target)]^w (SIPA's
form, after Dai et al.). Finished trials are stored as JSON after each one and
fed back into hyperopt, so a killed search goes on from its finished trials;
every proposal is drawn from a generator seeded with (seed, trials so far), so
a resumed search proposes what the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_write_json, atomic_write_text, publish_metrics, publishing
from sipa_core.models import decode_blocks, efficientnet_spec, get_spec
from sipa_core.models.blocks import BlockArgs, round_filters
from sipa_core.models.registry import SIPA_BASELINE_BLOCKS
from sipa_core.params import Field, check_section, load_yaml
from sipa_core.train.recipe import check_recipe


def _choices(kind):
    def check(value):
        if not value:
            return "must list at least one value"
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return f"must be a list of {'integers' if kind is int else 'numbers'}"
        if any(v <= 0 for v in value):
            return "values must be positive"
        return None
    return check


def _range(kind):
    def check(value):
        if len(value) != 2 or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return f"must be [min, max] ({'integers' if kind is int else 'numbers'})"
        if value[0] > value[1]:
            return f"min {value[0]} is above max {value[1]}"
        if value[0] <= 0:
            return "min must be > 0"
        return None
    return check


SPACE_SCHEMA = {
    "kernel": Field(list, [3, 5], check=_choices(int), help="kernel sizes to choose from, per stage"),
    "expand": Field(list, [4, 6], check=_choices(int), help="expansion ratios, per stage (the first stage keeps its own)"),
    "repeats": Field(list, [1, 2], check=_range(int), help="[min, max] repeats per stage"),
    "channels": Field(list, [0.75, 1.0, 1.25], check=_choices((int, float)),
                      help="multipliers of the template's output channels, per stage"),
    "se_ratio": Field(list, [0.2, 0.4], check=_range((int, float))),
    "stride_placement": Field(bool, True, help="search which stages have stride 2 (their number stays)"),
    "resolution": Field(list, [1.0, 1.4], check=_range((int, float))),
    "depth": Field(list, [1.0, 1.0], check=_range((int, float))),
    "resource": Field(float, 2.0, min=0, min_exclusive=True, help="depth * width^2 * resolution^2"),
}

SEARCH_SCHEMA = {
    "method": Field(str, "preset", choices=("preset", "hyperopt", "random")),
    "preset": Field(str, "sipa_baseline", help="the registered architecture `method: preset` takes"),
    "template": Field(list, list(SIPA_BASELINE_BLOCKS), help="block strings the search varies"),
    "head": Field(int, 150, min=1),
    "base_scaling": Field(dict, {"width": 1.0, "depth": 1.0, "resolution": 1.0},
                          help="scaling used while step 1 searches blocks"),
    "steps": Field(list, ["blocks", "scaling"], check=lambda v: None if v and set(v) <= {"blocks", "scaling"}
                   and len(set(v)) == len(v) else "must list blocks and/or scaling, once each"),
    "max_evals": Field(int, 8, min=1, help="trials per step, finished ones included"),
    "startup_trials": Field(int, 3, min=1, help="random trials before TPE models the results"),
    "space": Field(dict, {}),
    "budget": Field(float, 0.02, min=0, min_exclusive=True, help="hard budget on the MicroNet score"),
    "target": Field(float, None, nullable=True, min=0, help="soft target of the fitness (null: the budget)"),
    "alpha": Field(float, 0.1, min=0, help="fitness penalty scale over the target"),
    "w": Field(float, 1.0, min=0, min_exclusive=True, help="fitness penalty exponent"),
    "trial_images_per_class": Field(int, None, nullable=True, min=1, help="train each trial on this subset"),
    "recipe": Field(dict, {}, help="training recipe of a trial"),
    "seed": Field(int, 0, min=0),
    "backend": Field(str, "local", choices=("local", "ray")),
    "ray_address": Field(str, None, nullable=True, help="Ray cluster address (null: a local instance)"),
    "ray_concurrent": Field(int, 2, min=1),
    "ray_gpus_per_trial": Field(float, 0.0, min=0),
    "ray_cpus_per_trial": Field(float, 1.0, min=0, min_exclusive=True),
    "bits": Field(int, 16, min=1, max=32),
    "data": Field(str, "data/prepared/dataset.pt"),
    "out_arch": Field(str, "models/search/arch.yaml"),
    "out": Field(str, "models/search/model.pt"),
    "state": Field(str, "state/search"),
    "metrics": Field(str, "metrics/search.json"),
    "table": Field(str, "plots/search_trials.csv"),
    "pareto": Field(str, "plots/search_pareto.csv"),
}


def read_config(params_path) -> dict:
    """The checked ``search`` section, bounds and recipe included, before any work."""
    raw = load_yaml(params_path)
    cfg = check_section(raw.get("search"), SEARCH_SCHEMA, file=params_path, section="search")
    where = f"{params_path}: search"
    cfg["space"] = check_section(cfg["space"], SPACE_SCHEMA, file=params_path, section="search.space")
    cfg["recipe"] = check_recipe(cfg["recipe"], file=params_path, section="search.recipe")
    cfg["base_scaling"] = check_section(cfg["base_scaling"], {
        k: Field(float, 1.0, min=0, min_exclusive=True) for k in ("width", "depth", "resolution")},
        file=params_path, section="search.base_scaling")
    try:
        cfg["template_args"] = decode_blocks(cfg["template"])
    except SipaError as err:
        raise SipaError(f"{where}.template: {err}") from None
    if cfg["method"] == "preset":
        try:
            get_spec(cfg["preset"])
        except SipaError as err:
            raise SipaError(f"{where}.preset: {err}") from None
    if cfg["target"] is None:
        cfg["target"] = cfg["budget"]
    return cfg


# ---------------------------------------------------------------------------
# The space


def stride_options(template: list[BlockArgs]) -> list[tuple[int, ...]]:
    """Which stages may carry the template's stride-2 count (never the first)."""
    n2 = sum(b.stride == 2 for b in template)
    return [list(c) for c in itertools.combinations(range(1, len(template)), n2)]


def hyperopt_space(step: str, cfg: dict):
    from hyperopt import hp

    sp, template = cfg["space"], cfg["template_args"]
    if step == "scaling":
        return {"depth": hp.uniform("depth", *sp["depth"]) if sp["depth"][0] < sp["depth"][1] else sp["depth"][0],
                "resolution": hp.uniform("resolution", *sp["resolution"])
                if sp["resolution"][0] < sp["resolution"][1] else sp["resolution"][0]}
    space = {"se_ratio": hp.uniform("se_ratio", *sp["se_ratio"])}
    if sp["stride_placement"]:
        space["strides"] = hp.choice("strides", stride_options(template))
    lo, hi = sp["repeats"]
    for i in range(len(template)):
        space[f"k{i}"] = hp.choice(f"k{i}", sp["kernel"])
        if i > 0:  # the first stage keeps its expansion (EfficientNet's e1 stage)
            space[f"e{i}"] = hp.choice(f"e{i}", sp["expand"])
        space[f"r{i}"] = hp.quniform(f"r{i}", lo - 0.5, hi + 0.5, 1) if lo < hi else lo
        space[f"c{i}"] = hp.choice(f"c{i}", sp["channels"])
    return space


def vals_from_point(step: str, cfg: dict, point: dict) -> dict:
    """hyperopt's raw ``vals`` (choice indices, numbers) of a decoded point of ``hyperopt_space``."""
    sp, template = cfg["space"], cfg["template_args"]
    vals = {}
    if step == "scaling":
        for key in ("depth", "resolution"):
            if sp[key][0] < sp[key][1]:
                vals[key] = [float(point[key])]
        return vals
    vals["se_ratio"] = [float(point["se_ratio"])]
    if sp["stride_placement"]:
        vals["strides"] = [stride_options(template).index(list(point["strides"]))]
    for i in range(len(template)):
        vals[f"k{i}"] = [sp["kernel"].index(point[f"k{i}"])]
        if i > 0:
            vals[f"e{i}"] = [sp["expand"].index(point[f"e{i}"])]
        if sp["repeats"][0] < sp["repeats"][1]:
            vals[f"r{i}"] = [float(point[f"r{i}"])]
        vals[f"c{i}"] = [sp["channels"].index(point[f"c{i}"])]
    return vals


def blocks_from(point: dict, cfg: dict) -> list[str]:
    """Block strings of a step-1 point (chained: each stage takes the previous one's output)."""
    template = cfg["template_args"]
    strides = set(point["strides"]) if "strides" in point else {i for i, b in enumerate(template) if b.stride == 2}
    lo, hi = cfg["space"]["repeats"]
    out, prev = [], template[0].in_ch
    for i, b in enumerate(template):
        ch = max(8, round_filters(b.out_ch, float(point[f"c{i}"])))
        repeats = int(min(hi, max(lo, round(point[f"r{i}"]))))
        expand = b.expand if i == 0 else int(point[f"e{i}"])
        out.append(BlockArgs(repeats, int(point[f"k{i}"]), 2 if i in strides else 1, expand, prev, ch,
                             round(float(point["se_ratio"]), 3)).encode())
        prev = ch
    return out


def width_for(depth: float, resolution: float, resource: float) -> float:
    return math.sqrt(resource / (depth * resolution ** 2))


def spec_for(blocks: list[str], scaling: dict, cfg: dict, data_classes: int, image_size: int) -> dict:
    return efficientnet_spec(blocks, width=scaling["width"], depth=scaling["depth"],
                             resolution=scaling["resolution"], head=cfg["head"], num_classes=data_classes,
                             image_size=image_size)


def fitness(accuracy: float, score: float, cfg: dict) -> float:
    """R = A - [alpha * I(score - target)]^w."""
    over = 1.0 if score > cfg["target"] else 0.0
    return accuracy - (cfg["alpha"] * over) ** cfg["w"]


def pareto_front(rows: list[dict]) -> set[int]:
    """Trials no other trial beats on both accuracy (higher) and score (lower)."""
    ok = [r for r in rows if r["status"] == "trained"]
    front = set()
    for r in ok:
        if not any((o["accuracy"] >= r["accuracy"] and o["score"] <= r["score"])
                   and (o["accuracy"] > r["accuracy"] or o["score"] < r["score"]) for o in ok):
            front.add(trial_id(r))
    return front


def trial_id(row: dict) -> str:
    return f"{row['step']}-{row['tid']}"


# ---------------------------------------------------------------------------
# Trials


@dataclass
class TrialStore:
    """Finished trials of one step, as JSON, rewritten atomically after each."""

    path: Path

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError:
            raise SipaError(f"{self.path}: trial store is not valid JSON; delete it to restart the search") from None

    def save(self, records: list[dict]) -> None:
        atomic_write_json(self.path, records)


def _trials_from(records: list[dict]):
    from hyperopt import Trials
    from hyperopt.base import JOB_STATE_DONE

    trials = Trials()
    for rec in records:
        tid = rec["tid"]
        misc = {"tid": tid, "cmd": ("domain_attachment", "FMinIter_Domain"), "workdir": None,
                "idxs": {k: ([tid] if v else []) for k, v in rec["vals"].items()}, "vals": rec["vals"]}
        docs = trials.new_trial_docs([tid], [None], [{"status": "ok", "loss": rec["loss"]}], [misc])
        docs[0]["state"] = JOB_STATE_DONE
        trials.insert_trial_docs(docs)
    trials.refresh()
    return trials


def propose(step: str, cfg: dict, records: list[dict], algo_name: str) -> tuple[dict, dict]:
    """The next point (decoded) and its raw hyperopt vals, given the finished trials."""
    from hyperopt import rand, space_eval, tpe
    from hyperopt.base import Domain

    space = hyperopt_space(step, cfg)
    trials = _trials_from(records)
    algo = (functools.partial(tpe.suggest, n_startup_jobs=cfg["startup_trials"]) if algo_name == "hyperopt"
            else rand.suggest)
    domain = Domain(lambda p: 0.0, space)
    tid = len(records)
    seed = int(np.random.default_rng([cfg["seed"], tid, 0 if step == "blocks" else 1]).integers(2 ** 31))
    new = algo([tid], domain, trials, seed)
    vals = {k: [v[0]] if v else [] for k, v in new[0]["misc"]["vals"].items()}
    flat = {k: v[0] for k, v in vals.items() if v}
    point = space_eval(space, flat)
    vals = {k: [float(x) if isinstance(x, (float, np.floating)) else int(x) for x in v] for k, v in vals.items()}
    return point, vals


def subset_per_class(data, per_class: int | None, seed: int):
    """The prepared data with at most ``per_class`` training images per class (seeded)."""
    if per_class is None:
        return data
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.train_y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    keep = torch.cat(keep).sort().values
    return replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])


def evaluate_candidate(spec: dict, cfg: dict, data, run_dir: Path, progress=None) -> dict:
    """Count, reject over budget, else train briefly and measure validation accuracy."""
    from sipa_core.checkpoint import save_model
    from sipa_core.stage import build_for, score_metrics
    from sipa_core.train import TrainingDiverged, configure_model, evaluate, fit

    model = build_for(spec, cfg["recipe"]["seed"])
    s = score_metrics(model, data, cfg["bits"])
    row = {"score": s["score"], "params": s["params"], "ops": s["ops"]}
    if s["score"] > cfg["budget"]:
        return {**row, "status": "rejected", "accuracy": float("nan"), "fitness": float("nan"),
                "loss": 1.0 + s["score"] / cfg["budget"]}
    configure_model(model, cfg["recipe"])
    try:
        fit(model, data, cfg["recipe"], state_path=run_dir / "state.pt", val_split=None, desc="trial",
            progress=progress)
    except TrainingDiverged:
        return {**row, "status": "diverged", "accuracy": 0.0, "fitness": fitness(0.0, s["score"], cfg), "loss": 1.0}
    split = "val" if len(data.val_y) else "test"
    acc = evaluate(model, data, split)
    save_model(run_dir / "model.pt", model.cpu())
    f = fitness(acc, s["score"], cfg)
    return {**row, "status": "trained", "accuracy": acc, "fitness": f, "loss": -f}


def run_step(step: str, cfg: dict, data, trial_data, fixed: dict, progress=None, log=print) -> list[dict]:
    """Run (or finish) one search step; returns its trial records."""
    state = Path(cfg["state"])
    store = TrialStore(state / f"{step}.json")
    records = store.load()
    if records:
        log(f"search {step}: {len(records)} finished trial(s) kept from {store.path}")
    h, _ = data.image_size
    while len(records) < cfg["max_evals"]:
        point, vals = propose(step, cfg, records, cfg["method"])
        blocks, scaling, spec = candidate(step, point, cfg, fixed, data.num_classes, h)
        tid = len(records)
        t0 = time.time()
        run_dir = state / "trials" / f"{step}-{tid}"
        result = evaluate_candidate(spec, cfg, trial_data, run_dir, progress)
        records.append({"tid": tid, "step": step, "vals": vals, "point": jsonable(point), "blocks": blocks,
                        **scaling, **result, "run_dir": str(run_dir), "seconds": round(time.time() - t0, 2)})
        store.save(records)
        fault_point("trial")
        log(f"search {step} trial {tid + 1}/{cfg['max_evals']}: {result['status']}, score {result['score']:.6f}, "
            f"accuracy {result['accuracy']:.4f}, fitness {result['fitness']:.4f}")
    return records


def jsonable(point: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else float(v) if isinstance(v, (float, np.floating))
                else int(v) if isinstance(v, (int, np.integer)) else v) for k, v in point.items()}


def candidate(step: str, point: dict, cfg: dict, fixed: dict, num_classes: int, image_size: int):
    """(blocks, scaling, spec) of a proposed point."""
    if step == "blocks":
        blocks, scaling = blocks_from(point, cfg), dict(cfg["base_scaling"])
    else:
        blocks = fixed["blocks"]
        scaling = {"depth": float(point["depth"]), "resolution": float(point["resolution"])}
        scaling["width"] = width_for(scaling["depth"], scaling["resolution"], cfg["space"]["resource"])
    return blocks, scaling, spec_for(blocks, scaling, cfg, num_classes, image_size)


def best_of(records: list[dict]) -> dict | None:
    trained = [r for r in records if r["status"] == "trained"]
    return max(trained, key=lambda r: (r["fitness"], -r["score"])) if trained else None


def smallest_score(cfg: dict, num_classes: int, image_size: int) -> float:
    """The score of the smallest network the space holds (a budget below it can never be met)."""
    from sipa_core.stage import build_for
    from sipa_core.scoring import count

    sp = cfg["space"]
    point = {"se_ratio": sp["se_ratio"][0]}
    for i in range(len(cfg["template_args"])):
        point.update({f"k{i}": min(sp["kernel"]), f"e{i}": min(sp["expand"]), f"r{i}": sp["repeats"][0],
                      f"c{i}": min(sp["channels"])})
    blocks = blocks_from(point, cfg) if "blocks" in cfg["steps"] else list(cfg["template"])
    best = math.inf
    for depth in sp["depth"]:
        for res in sp["resolution"]:
            scaling = ({"depth": depth, "resolution": res, "width": width_for(depth, res, sp["resource"])}
                       if "scaling" in cfg["steps"] else dict(cfg["base_scaling"]))
            model = build_for(spec_for(blocks, scaling, cfg, num_classes, image_size), 0)
            best = min(best, count(model, (3, image_size, image_size), bits=cfg["bits"])["score"])
    return best


def write_tables(cfg: dict, rows: list[dict]) -> None:
    front = pareto_front(rows)
    head = "trial,step,status,score,accuracy,fitness,params,ops,width,depth,resolution,pareto,blocks"
    lines, pareto_lines = [head], ["score,accuracy,trial"]
    for r in rows:
        lines.append(f"{trial_id(r)},{r['step']},{r['status']},{r['score']:.6f},{r['accuracy']:.4f},"
                     f"{r['fitness']:.4f},{r['params']:.0f},{r['ops']:.0f},{r['width']:.4f},{r['depth']:.4f},"
                     f"{r['resolution']:.4f},{'yes' if trial_id(r) in front else 'no'},{' '.join(r['blocks'])}")
    for r in sorted((r for r in rows if trial_id(r) in front), key=lambda r: r["score"]):
        pareto_lines.append(f"{r['score']:.6f},{r['accuracy']:.4f},{trial_id(r)}")
    atomic_write_text(cfg["table"], "\n".join(lines) + "\n")
    atomic_write_text(cfg["pareto"], "\n".join(pareto_lines) + "\n")


def search(cfg: dict, *, params_file: str = "params.yaml", progress=None, log=print) -> dict:
    """Run the stage; returns its metrics."""
    import yaml

    from sipa_core.checkpoint import load_model, save_model
    from sipa_core.stage import build_for, load_data, stage_metrics
    from sipa_core.train import configure_model, fit

    started = time.time()
    where = f"{params_file}: search"
    data = load_data(cfg["data"], f"{where}.data")
    h, _ = data.image_size
    trial_data = subset_per_class(data, cfg["trial_images_per_class"], cfg["seed"])
    state = Path(cfg["state"])

    if cfg["method"] == "preset":
        spec = get_spec(cfg["preset"], num_classes=data.num_classes, image_size=h)
        run_dir = state / "preset"
        model = configure_model(build_for(spec, cfg["recipe"]["seed"]), cfg["recipe"])
        fit(model, trial_data, cfg["recipe"], state_path=run_dir / "state.pt", val_split=None, desc="preset",
            progress=progress)
        rows, extra = [], {"trials": 0}
    else:
        if cfg["backend"] == "ray":
            from sipa_core.search_ray import check_ray

            check_ray(where)
        smallest = smallest_score(cfg, data.num_classes, h)
        if smallest > cfg["budget"]:
            raise SipaError(f"{where}.budget: {cfg['budget']} is below the smallest network of the space "
                            f"(score {smallest:.6f}); raise the budget or shrink the template/space")
        fixed, rows = {"blocks": list(cfg["template"])}, []
        for step in cfg["steps"]:
            if cfg["backend"] == "ray":
                from sipa_core.search_ray import run_step_ray

                records = run_step_ray(step, cfg, data, trial_data, fixed, log=log)
            else:
                records = run_step(step, cfg, data, trial_data, fixed, progress, log)
            rows += records
            best = best_of(records)
            if best is None:
                raise SipaError(f"{where}: no candidate of step {step} fit the budget {cfg['budget']}; "
                                f"raise search.budget or shrink search.space")
            fixed = {"blocks": best["blocks"]}
        best = best_of(rows)
        spec = spec_for(best["blocks"], {k: best[k] for k in ("width", "depth", "resolution")}, cfg,
                        data.num_classes, h)
        model, _ = load_model(Path(best["run_dir"]) / "model.pt", spec)
        extra = {"trials": len(rows), "best_trial": trial_id(best), "fitness": best["fitness"],
                 "median_fitness": statistics.median(r["fitness"] for r in rows if r["status"] == "trained")}
    model.cpu().eval()
    with publishing(cfg["metrics"]):
        write_tables(cfg, rows)
        atomic_write_text(cfg["out_arch"], yaml.safe_dump(dict(model.spec), sort_keys=False))
        save_model(cfg["out"], model, stage="search")
    metrics = stage_metrics(model, data, seed=cfg["seed"], device=cfg["recipe"]["device"], started=started,
                            bits=cfg["bits"], method=cfg["method"], **extra)
    publish_metrics(cfg["metrics"], metrics)
    return metrics
