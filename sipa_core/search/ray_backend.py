"""The search's scale-out backend: the same trials in parallel on Ray Tune.

Ray Tune's HyperOptSearch proposes points of the same hyperopt space, at
most ``search.ray_concurrent`` at a time, each trial on its own slot
(``ray_cpus_per_trial`` / ``ray_gpus_per_trial``) of a local Ray instance or
of the cluster at ``search.ray_address``. Finished trials go to the same
JSON store as the local backend's, and a restarted search warm-starts the
searcher from them (``add_evaluated_point``) and runs only what is left.
Ray is an optional dependency: ``pip install 'sipa[ray]'``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from sipa_core.errors import SipaError
from sipa_core.resume import run_key
from sipa_core.search.space import candidate, hyperopt_space, jsonable, vals_from_point
from sipa_core.search.trials import count_trials, evaluate_candidate, hyperopt_trials, trial_store


def check_ray(where: str) -> None:
    try:
        import ray  # noqa: F401, PLC0415 -- optional dependency (sipa[ray])
        from ray.tune.search.hyperopt import HyperOptSearch  # noqa: F401, PLC0415
    except ImportError:
        raise SipaError(f"{where}.backend: ray needs Ray Tune installed (pip install 'ray[tune]'), "
                        f"or use backend: local") from None


def _trial(config, cfg=None, step=None, fixed=None, data=None, trials_dir=None):
    """One trial on a Ray worker: the local backend's candidate evaluation."""
    torch.set_num_threads(max(1, int(cfg["ray_cpus_per_trial"])))
    h, _ = data.image_size
    blocks, scaling, spec = candidate(step, config, cfg, fixed, data.num_classes, h)
    key = run_key(spec)
    run_dir = Path(trials_dir) / f"ray-{key}"
    t0 = time.time()
    result = evaluate_candidate(spec, cfg, data, run_dir, progress=False)
    return {**result, "point_json": json.dumps(jsonable(config)), "blocks_json": json.dumps(blocks),
            "scaling_json": json.dumps(scaling), "run_dir": str(run_dir), "seconds": round(time.time() - t0, 2)}


def warm_searcher(step: str, cfg: dict, records: list[dict]):
    """Ray Tune's HyperOptSearch over the step's space, warm-started from the finished trials."""
    from ray.tune.search.hyperopt import HyperOptSearch  # noqa: PLC0415 -- optional dependency (sipa[ray])

    searcher = HyperOptSearch(hyperopt_space(step, cfg), metric="loss", mode="min",
                              n_initial_points=cfg["startup_trials"], random_state_seed=cfg["seed"] + len(records))
    if records:
        # Warm start: the finished trials become hyperopt's history (HyperOptSearch has no
        # add_evaluated_point), so TPE models them and nothing is evaluated twice.
        history = hyperopt_trials([{**r, "vals": vals_from_point(step, cfg, r["point"])} for r in records])
        history._ids.update(range(len(records)))  # new proposals get fresh trial ids
        searcher._hpopt_trials = history
    return searcher


def run_step_ray(step: str, cfg: dict, trial_data, fixed: dict, log=print) -> list[dict]:
    """Run (or finish) one search step on Ray Tune; returns its trial records (the local backend's format)."""
    import ray  # noqa: PLC0415 -- optional dependency (sipa[ray])
    from ray import tune  # noqa: PLC0415
    from ray.tune.search import ConcurrencyLimiter  # noqa: PLC0415


    store, trials_dir = trial_store(step, cfg, fixed)
    state = Path(cfg["state"]).resolve()
    records = store.load()
    count_trials(records)
    remaining = cfg["max_evals"] - len(records)
    if remaining <= 0:
        return records

    searcher = warm_searcher(step, cfg, records)

    class Persist(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result
            if "loss" not in r:
                return
            point = json.loads(r["point_json"])
            row = {"tid": len(records), "step": step, "vals": vals_from_point(step, cfg, point), "point": point,
                   "blocks": json.loads(r["blocks_json"]), **json.loads(r["scaling_json"]),
                   **{k: r[k] for k in ("score", "params", "ops", "status", "accuracy", "fitness", "loss",
                                         "run_dir", "seconds", "images_trained", "train_epochs")}}
            count_trials([row])  # trained in a worker process: noted here for the search's cost
            records.append(row)
            store.save(records)
            log(f"search {step} trial {len(records)}/{cfg['max_evals']} (ray): {row['status']}, "
                f"score {row['score']:.6f}, accuracy {row['accuracy']:.4f}, fitness {row['fitness']:.4f}")

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg["ray_address"], include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}})
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, cfg=cfg, step=step, fixed=fixed, data=trial_data,
                                 trials_dir=str(trials_dir)),
            {"cpu": cfg["ray_cpus_per_trial"], "gpu": cfg["ray_gpus_per_trial"]})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, cfg["ray_concurrent"]),
                                        num_samples=remaining, metric="loss", mode="min"),
            run_config=tune.RunConfig(name=f"{step}-{len(records)}", storage_path=str(state / "ray"),
                                      callbacks=[Persist()], verbose=0))
        results = tuner.fit()
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        if errors:
            raise SipaError(f"search (ray): {len(errors)} trial(s) failed, first: {errors[0][:300]}")
    finally:
        if started_here:
            ray.shutdown()
    return records
