"""A profile's whole pipeline at toy scale, under `dvc repro`, to prove every stage runs on a device
(or on a network: ``--preset``).

    python benchmarks/toy_pipeline.py --profile profiles/paper.yaml --workdir /tmp/toy   # on a GPU
    python benchmarks/toy_pipeline.py --profile profiles/paper.yaml --workdir /tmp/toy --dry
    python benchmarks/toy_pipeline.py --profile params.yaml --workdir /tmp/toy --dry \
        --preset 'torchvision:resnet18(small_input=true)' --positions layer2,layer3

The profile's settings are kept (its architectures, recipes, augmentation policy, ghost
BatchNorm, pruning rounds, exit, widths) except what sets the scale: the data is the
CIFAR-10 subset shipped in the repository (no network), a few images per class; every epoch
count is 1; no accuracy bar (``min_accuracy`` and ``max_drop`` off: a toy network reaches
none). ``--dry`` (the CPU, in the test suite): fewer images, the first and last pruning and
exit rounds only, no extra quantization widths, the report's latency timed briefly. The
pipeline's code and ``dvc.yaml`` are copied into the work folder and run there with
``dvc repro``; one JSON line per stage
(device, processes, wall time, images trained, accuracy, score; the quantizing stage's
integer ONNX kernels), then a summary line. A check that the stages run, not a measurement
of accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "search", "improve", "prune", "accelerate", "quantize", "report")
REPORTED = ("accuracy", "score", "score_tree", "images_trained", "rounds", "onnx_integer_layers", "onnx_float_layers")


def first_and_last(values: list) -> list:
    return values if len(values) <= 2 else [values[0], values[-1]]


def toy_params(profile: dict, images: int, dry: bool, processes: int) -> dict:
    """The profile at toy scale: the shipped subset, every epoch count 1, no accuracy bar."""
    p = {k: dict(v) if isinstance(v, dict) else v for k, v in profile.items()}
    p["distributed"] = {**p.get("distributed", {}), "processes": processes}
    p["prepare"] = {**p["prepare"], "source": "cifar10_subset", "root": None, "download": False,
                    "images_per_class": images, "test_images_per_class": images, "val_size": 10 * images // 4,
                    "classes": None, "image_size": None}
    p["search"]["recipe"] = {**p["search"].get("recipe", {}), "epochs": 1}
    p["improve"].update(final_epochs=1, trial_epochs=1)
    p["prune"].update(epochs=1, min_accuracy=None, max_drop=None)
    p["accelerate"].update(epochs=1, exit_prune_epochs=1, min_accuracy=None, max_drop=None)
    if p["accelerate"].get("exit_stabilize_epochs"):
        p["accelerate"]["exit_stabilize_epochs"] = 1
    p["quantize"].update(epochs=1, exit_epochs=1)
    if p["quantize"].get("schedule"):
        p["quantize"]["schedule_epochs"] = 1
    if dry:
        p["prune"]["schedule"] = first_and_last(p["prune"]["schedule"])
        p["accelerate"]["exit_schedule"] = first_and_last(p["accelerate"].get("exit_schedule", []))
        p["quantize"]["compare_widths"] = []
        report = p.setdefault("report", {})
        if report.get("latency", {}) is not None:  # timed, briefly: 20 single images, one pass in batches
            report["latency"] = {**(report.get("latency") or {}), "singles": 20, "rounds": 1}  # the rest: defaults
    return p


def workspace(work: Path, params: dict) -> None:
    """The pipeline's code, dvc.yaml and shipped data in ``work``, a DVC project without git."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for part in ("sipa_core", "stages", "datasets", "networks"):
        shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=work, check=True)
    # No detached update-check process writing into .dvc/tmp after `dvc repro` has returned
    # (it raced the caller's clean-up of the work folder), no analytics.
    (work / ".dvc" / "config").write_text("[core]\n    no_scm = True\n    check_update = false\n"
                                          "    analytics = false\n")


def stage_lines(work: Path) -> list[dict]:
    rows = []
    for name in STAGES[:-1]:
        metrics = json.loads((work / "metrics" / f"{name}.json").read_text())
        info_path = work / "info" / f"{name}.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        rows.append({"check": "pipeline", "stage": name, "device": info.get("device"),
                     "processes": info.get("processes"), "wall_time_s": metrics.get("wall_time_s"),
                     **{k: metrics[k] for k in REPORTED if k in metrics}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=str(ROOT / "profiles/paper.yaml"))
    ap.add_argument("--workdir", required=True, help="emptied, then holds the toy project")
    ap.add_argument("--images-per-class", type=int, default=None, help="default: 48, or 6 with --dry")
    ap.add_argument("--processes", type=int, default=1, help="distributed.processes (one per device)")
    ap.add_argument("--dry", action="store_true", help="the CPU at tiny sizes (a test of this script)")
    ap.add_argument("--preset", default=None, help="train this network instead of searching (search.method: "
                    "preset): a registered name, torchvision:<name>, networks/<file>.py:<function>")
    ap.add_argument("--positions", default=None, help="accelerate.positions, comma-separated (indices or names)")
    args = ap.parse_args(argv)
    images = args.images_per_class or (6 if args.dry else 48)
    params = toy_params(yaml.safe_load(Path(args.profile).read_text()), images, args.dry, args.processes)
    if args.preset:
        params["search"].update(method="preset", preset=args.preset)
    if args.positions:
        params["accelerate"]["positions"] = [int(p) if p.strip().isdigit() else p.strip()
                                             for p in args.positions.split(",")]
    work = Path(args.workdir).resolve()
    workspace(work, params)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    t0 = time.perf_counter()
    p = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=work, env=env,
                       capture_output=True, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    if p.returncode:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-6000:])
        print(json.dumps({"check": "pipeline", "ok": False, "seconds": seconds, "workdir": str(work)}))
        return 1
    for row in stage_lines(work):
        print(json.dumps(row))
    print(json.dumps({"check": "pipeline", "ok": True, "seconds": seconds, "profile": Path(args.profile).name,
                      "images_per_class": images, "onnx": sorted(str(f.relative_to(work)) for f in
                                                                  (work / "models").rglob("*.onnx"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
