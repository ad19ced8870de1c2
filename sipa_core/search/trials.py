"""Search trials: proposals from hyperopt given the finished trials, one
trial's evaluation (count, reject over budget, else train briefly), the
fitness, the JSON trial store that makes a search resumable, and the tables.
Both backends (local, Ray) run trials through this module."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sipa_core.checkpoint import save_model
from sipa_core.errors import SipaError
from sipa_core.faults import fault_point
from sipa_core.io import atomic_write_json, atomic_write_text
from sipa_core.resume import file_digest, run_key
from sipa_core.runtime import record_training, training_cost
from sipa_core.search.space import candidate, hyperopt_space, jsonable
from sipa_core.stage_common import create_seeded_model, score_metrics
from sipa_core.train import TrainingDiverged, configure_model, evaluate, fit


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


# What does not decide a step's trials: the trial count (a larger one goes on from the finished
# trials), where outputs go, and how Ray spreads the trials.
_NOT_IN_KEY = {"max_evals", "state", "out", "out_arch", "metrics", "info", "table", "pareto", "backend",
               "ray_address", "ray_concurrent", "ray_cpus_per_trial", "ray_gpus_per_trial", "preset"}


@functools.lru_cache(maxsize=4)
def _data_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)  # once per file version, not once per step


def trial_store(step: str, cfg: dict, fixed: dict) -> tuple[TrialStore, Path]:
    """The store and trial folder of one step, named by everything that decides its trials (the
    section, the data file's content, the blocks fixed by the previous step): a changed search
    starts afresh instead of taking trials of another space or data set as its own."""
    decides = {k: v for k, v in cfg.items() if k not in _NOT_IN_KEY}
    data = Path(cfg["data"])
    digest = _data_digest(str(data), (st := data.stat()).st_size, st.st_mtime_ns) if data.is_file() else str(data)
    key = run_key({**decides, "fixed": fixed, "data": digest})
    state = Path(cfg["state"]).resolve()  # Ray trials run in their own working directories
    return TrialStore(state / f"{step}-{key}.json"), state / "trials" / f"{step}-{key}"


def hyperopt_trials(records: list[dict]):
    """hyperopt ``Trials`` holding finished trial records (their raw ``vals`` and loss): TPE's history."""
    from hyperopt import Trials  # noqa: PLC0415 -- heavy (about 2.5 s): only a search run needs it
    from hyperopt.base import JOB_STATE_DONE  # noqa: PLC0415

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
    from hyperopt import rand, space_eval, tpe  # noqa: PLC0415 -- heavy (about 2.5 s): only a search run needs it
    from hyperopt.base import Domain  # noqa: PLC0415

    space = hyperopt_space(step, cfg)
    trials = hyperopt_trials(records)
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

    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.train_y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    keep = torch.cat(keep).sort().values
    return replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])


def evaluate_candidate(spec: dict, cfg: dict, data, run_dir: Path, progress=None) -> dict:
    """Count, reject over budget, else train briefly and measure validation accuracy."""
    started = time.time()
    model = create_seeded_model(spec, cfg["recipe"]["seed"])
    s = score_metrics(model, data, cfg["bits"])
    row = {"score": s["score"], "params": s["params"], "ops": s["ops"], "images_trained": 0, "train_epochs": 0}
    if s["score"] > cfg["budget"]:
        return {**row, "status": "rejected", "accuracy": float("nan"), "fitness": float("nan"),
                "loss": 1.0 + s["score"] / cfg["budget"]}
    configure_model(model, cfg["recipe"])
    try:
        fit(model, data, cfg["recipe"], state_path=run_dir / "state.pt", val_split=None, desc="trial",
            progress=progress)
    except TrainingDiverged:
        return {**row, **training_cost(started), "status": "diverged", "accuracy": 0.0,
                "fitness": fitness(0.0, s["score"], cfg), "loss": 1.0}
    acc = evaluate(model, data, "val")  # never test: the search stops first when there is no validation split
    save_model(run_dir / "model.pt", model.cpu())
    f = fitness(acc, s["score"], cfg)
    return {**row, **training_cost(started), "status": "trained", "accuracy": acc, "fitness": f, "loss": -f}


def count_trials(records: list[dict]) -> None:
    """Note the training of trials this process did not run (kept from an earlier run, or run
    by Ray workers) toward the search's cost."""
    for r in records:
        if r.get("images_trained"):
            record_training(r["images_trained"], epochs=r.get("train_epochs", 0))


def run_step(step: str, cfg: dict, data, trial_data, fixed: dict, progress=None, log=print) -> list[dict]:
    """Run (or finish) one search step; returns its trial records."""
    store, trials_dir = trial_store(step, cfg, fixed)
    records = store.load()
    if records:
        log(f"search {step}: {len(records)} finished trial(s) kept from {store.path}")
        count_trials(records)
    h, _ = data.image_size
    while len(records) < cfg["max_evals"]:
        point, vals = propose(step, cfg, records, cfg["method"])
        blocks, scaling, spec = candidate(step, point, cfg, fixed, data.num_classes, h)
        tid = len(records)
        t0 = time.time()
        run_dir = trials_dir / str(tid)
        result = evaluate_candidate(spec, cfg, trial_data, run_dir, progress)
        records.append({"tid": tid, "step": step, "vals": vals, "point": jsonable(point), "blocks": blocks,
                        **scaling, **result, "run_dir": str(run_dir), "seconds": round(time.time() - t0, 2)})
        store.save(records)
        fault_point("trial")
        log(f"search {step} trial {tid + 1}/{cfg['max_evals']}: {result['status']}, score {result['score']:.6f}, "
            f"accuracy {result['accuracy']:.4f}, fitness {result['fitness']:.4f}")
    return records


def best_of(records: list[dict]) -> dict | None:
    trained = [r for r in records if r["status"] == "trained"]
    return max(trained, key=lambda r: (r["fitness"], -r["score"])) if trained else None


def write_tables(cfg: dict, rows: list[dict]) -> None:
    front = pareto_front(rows)
    head = "trial,step,status,score,accuracy,fitness,params,ops,width,depth,r,resolution,pareto,blocks"
    lines, pareto_lines = [head], ["score,accuracy,trial"]
    for r in rows:
        lines.append(f"{trial_id(r)},{r['step']},{r['status']},{r['score']:.6f},{r['accuracy']:.4f},"
                     f"{r['fitness']:.4f},{r['params']:.0f},{r['ops']:.0f},{r['width']:.4f},{r['depth']:.4f},"
                     f"{r.get('r', '')},"
                     f"{r['resolution']:.4f},{'yes' if trial_id(r) in front else 'no'},{' '.join(r['blocks'])}")
    for r in sorted((r for r in rows if trial_id(r) in front), key=lambda r: r["score"]):
        pareto_lines.append(f"{r['score']:.6f},{r['accuracy']:.4f},{trial_id(r)}")
    atomic_write_text(cfg["table"], "\n".join(lines) + "\n")
    atomic_write_text(cfg["pareto"], "\n".join(pareto_lines) + "\n")

