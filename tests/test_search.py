"""The Searching stage: space, budget, fitness, persistence, bad bounds."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_BLOCKS, save_prepared, tiny_data
from sipa_core.data.prepared import load_prepared
from sipa_core.models import create_model, create_spec
from sipa_core.models.registry import SIPA_BASELINE_BLOCKS
from sipa_core.search import (blocks_from, candidate, fitness, pareto_front, read_config, resolution_factor, search,
                              smallest_score, stride_options)
from sipa_core.stage_common import resolve_arch

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path, **search_cfg):
    save_prepared(tiny_data(n_train=96, n_val=32, n_test=32), tmp_path / "data.pt")
    cfg = {"method": "hyperopt", "template": TINY_BLOCKS, "head": 32, "max_evals": 3, "startup_trials": 2,
           "space": {"kernel": [3, 5], "expand": [2, 4], "repeats": [1, 2], "channels": [0.5, 1.0],
                     "r": [1.0, 1.2], "width": [0.5, 0.6], "depth": [1.0, 1.0]},
           "budget": 1.0, "target": 1.0,
           "recipe": {"epochs": 2, "batch_size": 16, "lr": 0.05},
           "data": str(tmp_path / "data.pt"), "out_arch": str(tmp_path / "models/search/arch.yaml"),
           "out": str(tmp_path / "models/search/model.pt"), "state": str(tmp_path / "state"),
           "metrics": str(tmp_path / "metrics/search.json"), "info": str(tmp_path / "info/search.json"),
           "table": str(tmp_path / "plots/trials.csv"),
           "pareto": str(tmp_path / "plots/pareto.csv")}
    for key, value in search_cfg.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"search": cfg}))
    return tmp_path / "params.yaml"


def trial_store(work: Path, step: str = "blocks") -> Path | None:
    """The step's trial store under ``work/state`` (named by what decides its trials), if written."""
    found = sorted((work / "state").glob(f"{step}-*.json"))
    assert len(found) <= 1, found
    return found[0] if found else None


def stage(params, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "stages/search.py"), "--params", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_fitness_and_pareto():
    cfg = {"target": 0.01, "alpha": 0.1, "w": 2.0}
    assert fitness(0.7, 0.009, cfg) == 0.7
    assert fitness(0.7, 0.011, cfg) == pytest.approx(0.7 - 0.01)
    rows = [{"step": "blocks", "tid": i, "status": "trained", "accuracy": a, "score": s}
            for i, (a, s) in enumerate([(0.5, 0.01), (0.6, 0.02), (0.4, 0.015), (0.6, 0.03)])]
    rows.append({"step": "blocks", "tid": 4, "status": "rejected", "accuracy": float("nan"), "score": 0.001})
    assert pareto_front(rows) == {"blocks-0", "blocks-1"}


def test_space_decoding_chains_channels_and_keeps_stride_count(tmp_path):
    cfg = read_config(write_params(tmp_path))
    template = cfg["template_args"]
    assert stride_options(template) == [[1]]
    point = {"se_ratio": 0.3, "strides": (1,), "k0": 5, "r0": 2, "c0": 1.0, "k1": 3, "e1": 4, "r1": 1, "c1": 0.5}
    blocks = blocks_from(point, cfg)
    assert blocks == ["r2_k5_s1_e1_i8_o8_se0.3", "r1_k3_s2_e4_i8_o8_se0.3"]


def test_resolution_factor_is_r_to_the_phi_rounded():
    assert resolution_factor(1.4, 2.0) == 1.96  # the paper's 63 px: ceil(32 * 1.96)
    assert resolution_factor(1.0, 2.0) == 1.0 and resolution_factor(1.2, 2.0) == 1.44
    assert resolution_factor(1.3, 3.0) == 2.2  # 2.197 rounded to 2 decimals


def test_the_paper_network_is_a_point_of_the_default_space(tmp_path):
    """sipa_baseline (its block strings; width 0.9, depth 1.0, r 1.4, phi 2) is a point of the
    default space: step 1 decodes it to the baseline's blocks, step 2 to its scaling, and the
    spec built from that point equals the registered one."""
    params = tmp_path / "params.yaml"
    params.write_text("search: {}\n")
    cfg = read_config(params)
    sp = cfg["space"]
    template = cfg["template_args"]
    point = {"se_ratio": 0.2, "strides": [i for i, b in enumerate(template) if b.stride == 2]}
    for i, b in enumerate(template):
        point.update({f"k{i}": b.kernel, f"e{i}": b.expand, f"r{i}": b.repeats, f"c{i}": 1.0})
    assert point["strides"] in [list(c) for c in stride_options(template)]
    assert all(point[f"k{i}"] in sp["kernel"] and point[f"c{i}"] in sp["channels"] for i in range(len(template)))
    assert all(point[f"e{i}"] in sp["expand"] for i in range(1, len(template)))
    assert all(sp["repeats"][0] <= point[f"r{i}"] <= sp["repeats"][1] for i in range(len(template)))
    assert sp["se_ratio"][0] <= 0.2 <= sp["se_ratio"][1]
    blocks, _, _ = candidate("blocks", point, cfg, {}, 100, 32)
    assert blocks == SIPA_BASELINE_BLOCKS
    scaling_point = {"depth": 1.0, "width": 0.9, "r": 1.4}
    assert all(sp[k][0] <= v <= sp[k][1] for k, v in scaling_point.items()) and sp["phi"] == 2.0
    _, scaling, spec = candidate("scaling", scaling_point, cfg, {"blocks": blocks}, 100, 32)
    assert scaling["resolution"] == 1.96
    registered = create_spec("sipa_baseline", num_classes=100, image_size=32)
    assert {k: v for k, v in spec.items() if k != "name"} == {k: v for k, v in registered.items() if k != "name"}
    stem_input = []
    model = create_model(spec).eval()
    model.stem.register_forward_pre_hook(lambda m, inp: stem_input.append(inp[0].shape[-1]))
    model(torch.zeros(1, 3, 32, 32))
    assert stem_input == [63]


def test_search_trains_writes_and_feeds_improve(tmp_path):
    params = write_params(tmp_path)
    m = search(read_config(params), params_file=str(params), log=lambda *_: None, progress=False)
    assert m["trials"] == 6 and m["fitness"] >= m["median_fitness"]
    rows = (tmp_path / "plots/trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,step,status,score,accuracy,fitness") and len(rows) == 7
    assert any(r.split(",")[12] == "yes" for r in rows[1:])  # a Pareto front is marked
    spec = yaml.safe_load((tmp_path / "models/search/arch.yaml").read_text())
    assert spec["family"] == "efficientnet" and spec["num_classes"] == 4

    resolved, _ = resolve_arch(str(tmp_path / "models/search/arch.yaml"), load_prepared(tmp_path / "data.pt"), "t")
    assert resolved["blocks"] == spec["blocks"]
    assert json.loads((tmp_path / "metrics/search.json").read_text())["score"] == m["score"]


def test_a_changed_search_does_not_take_the_trials_of_another(tmp_path):
    """Finished trials are kept for a run of the same search (a larger max_evals goes on from them);
    another space, recipe or data set starts afresh."""
    params = write_params(tmp_path, steps=["blocks"], max_evals=2)
    cfg = read_config(params)
    quiet = dict(params_file=str(params), log=lambda *_: None, progress=False)
    search(cfg, **quiet)
    first = trial_store(tmp_path)
    lines = []
    search({**cfg, "max_evals": 3}, **{**quiet, "log": lines.append})
    assert trial_store(tmp_path) == first and len(json.loads(first.read_text())) == 3
    assert "2 finished trial(s) kept" in lines[0]
    other = read_config(write_params(tmp_path, steps=["blocks"], max_evals=2, space={"kernel": [3, 3]}))
    lines.clear()
    search(other, **{**quiet, "log": lines.append})
    stores = sorted((tmp_path / "state").glob("blocks-*.json"))
    assert len(stores) == 2 and not any("kept" in line for line in lines)
    assert all(r["blocks"][0].count("_k3") for r in json.loads(next(s for s in stores if s != first).read_text()))


def test_over_budget_candidates_are_rejected_before_training(tmp_path):
    params = write_params(tmp_path, steps=["blocks"], max_evals=4)
    cfg = read_config(params)
    low = smallest_score(cfg, 4, 16)
    cfg["budget"] = cfg["target"] = low * 1.3
    search(cfg, params_file=str(params), log=lambda *_: None, progress=False)
    store = trial_store(tmp_path)
    records = json.loads(store.read_text())
    rejected = [r for r in records if r["status"] == "rejected"]
    assert rejected, "some candidate of this space is over 1.3x the smallest score"
    for r in rejected:
        assert r["score"] > cfg["budget"]
        assert not (tmp_path / "state/trials" / store.stem / str(r["tid"])).exists()


@pytest.mark.slow  # stage subprocesses, one killed
def test_killed_search_resumes_from_finished_trials(tmp_path):
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean_dir.mkdir(), killed_dir.mkdir()
    params = {d: write_params(d, steps=["blocks"], max_evals=5, recipe={"epochs": 3}) for d in (clean_dir, killed_dir)}
    assert stage(params[clean_dir]).wait(timeout=600) == 0
    proc = stage(params[killed_dir])
    deadline = time.time() + 300
    while time.time() < deadline:
        store = trial_store(killed_dir)
        if store and len(json.loads(store.read_text())) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(store.read_text())
    assert 2 <= len(done) < 5
    out = stage(params[killed_dir])
    stdout, _ = out.communicate(timeout=600)
    assert out.returncode == 0
    for line in (f"trial {i}/5" for i in range(1, len(done) + 1)):
        assert line not in stdout  # finished trials are not redone
    after = json.loads(store.read_text())
    assert after[:len(done)] == done and len(after) == 5
    clean = json.loads(trial_store(clean_dir).read_text())
    assert [r["blocks"] for r in after] == [r["blocks"] for r in clean]  # same proposals as uninterrupted


@pytest.mark.slow  # a stage subprocess per case
@pytest.mark.parametrize("patch, message", [
    ({"space": {"kernel": []}}, "search.space.kernel: must list at least one value"),
    ({"space": {"repeats": [3, 1]}}, "search.space.repeats: min 3 is above max 1"),
    ({"space": {"r": [1.4]}}, "search.space.r: must be [min, max]"),
    ({"max_evals": 0}, "search.max_evals: must be >= 1, got 0"),
    ({"method": "bayes"}, "search.method: 'bayes' is not one of preset, hyperopt, random"),
    ({"template": ["r1_k3_s1_e1_i8"]}, "search.template: malformed block string"),
    ({"budget": 1e-7}, "search.budget: 1e-07 is below the smallest network of the space"),
])
def test_bad_bounds_fail_before_any_trial(tmp_path, patch, message):
    p = stage(write_params(tmp_path, **patch))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "state").exists()


@pytest.mark.slow  # a Ray instance and its workers
def test_ray_backend_two_concurrent_trials_and_warm_restart(tmp_path):
    pytest.importorskip("ray.tune", reason="Ray Tune is not installed (pip install 'ray[tune]')")
    params = write_params(tmp_path, steps=["blocks"], max_evals=2, backend="ray", ray_concurrent=2,
                          ray_cpus_per_trial=1.0)
    cfg = read_config(params)
    lines = []
    m = search(cfg, params_file=str(params), log=lines.append, progress=False)
    assert m["trials"] == 2 and len(lines) == 2 and all("(ray)" in line for line in lines)
    first = json.loads(trial_store(tmp_path).read_text())
    assert [r["tid"] for r in first] == [0, 1]
    assert all(Path(r["run_dir"], "model.pt").is_file() for r in first if r["status"] == "trained")
    # the workers' training counts toward the search's cost
    assert all(r["images_trained"] > 0 for r in first if r["status"] == "trained")
    assert m["images_trained"] == sum(r["images_trained"] for r in first) > 0
    # A larger budget later: the searcher is warm-started with the two finished trials, runs one more.
    cfg["max_evals"] = 3
    lines.clear()
    search(cfg, params_file=str(params), log=lines.append, progress=False)
    after = json.loads(trial_store(tmp_path).read_text())
    assert after[:2] == first and len(after) == 3 and len(lines) == 1


def test_no_search_without_a_validation_split(tmp_path, run_script):
    """Trials are never compared on test: without validation images the search stops (exit 2)."""
    params = write_params(tmp_path)
    save_prepared(tiny_data(n_train=96, n_val=0, n_test=32), tmp_path / "data.pt")
    code, _, err = run_script(ROOT / "stages/search.py", "--params", params, cwd=tmp_path)
    assert code == 2 and "search.method: trials are compared on the validation split" in err, err
    assert not (tmp_path / "state").exists()
