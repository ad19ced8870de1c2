"""The cost of a params file before it runs: every training each stage will do
(epochs, images per epoch, images in all, input resolution) and an estimated
wall time from a training throughput (``sipa plan``).

Counts are upper bounds where a result decides (a search trial over the
budget is skipped; greedy improving may stop trying). Exit and quantization
trainings are estimated at the main network's throughput, an upper bound
for the exit (its backward pass stops at the exit).
"""

from __future__ import annotations

import math
import time

import torch

from sipa_core.data.sources import scan_imagefolder
from sipa_core.models import create_model, create_spec
from sipa_core.pipeline import STAGES
from sipa_core.quantize.training import schedule_steps
from sipa_core.runtime import resolve_device
from sipa_core.train.recipe import check_recipe

# Images per class of the standard sources: (classes, train, test per class).
KNOWN_SOURCES = {"cifar10": (10, 5000, 1000), "cifar100": (100, 500, 100), "cifar10_subset": (10, 500, 200)}


def data_sizes(prep: dict) -> dict:
    """Training, validation and test images the prepare stage will produce."""
    wanted = prep["classes"]
    if prep["source"] in KNOWN_SOURCES:
        classes, train_per, test_per = KNOWN_SOURCES[prep["source"]]
        classes = len(wanted) if wanted else classes
        train_sizes, test_sizes = [train_per] * classes, [test_per] * classes
    else:
        _, found = scan_imagefolder(prep["root"], "prepare.root")
        train_sizes = [len(v) for c, v in found["train"].items() if not wanted or c in wanted]
        test_sizes = [len(v) for c, v in found["test"].items() if not wanted or c in wanted]
    per, tper = prep["images_per_class"], prep["test_images_per_class"]
    train = sum(min(n, per) if per else n for n in train_sizes)
    test = sum(min(n, tper) if tper else n for n in test_sizes)
    return {"classes": len(train_sizes), "train": train - prep["val_size"], "val": prep["val_size"], "test": test}


def _row(stage: str, what: str, runs: int, epochs: int, images: int, size: int) -> dict:
    return {"stage": stage, "training": what, "runs": runs, "epochs": epochs, "images_per_epoch": images,
            "images": runs * epochs * images, "resolution": size}


def _input_size(cfg: dict, image_size: int) -> int:
    search = cfg["search"]
    name = search["preset"] if search["method"] == "preset" else None
    spec = create_spec(name) if name else {"resolution": search["base_scaling"].get("resolution", 1.0)}
    return math.ceil(image_size * spec.get("resolution", 1.0))


def trainings(cfg: dict, sizes: dict, image_size: int) -> list[dict]:
    """One row per kind of training, in pipeline order."""
    s, im, pr, ac, q = (cfg[k] for k in ("search", "improve", "prune", "accelerate", "quantize"))
    n, size = sizes["train"], _input_size(cfg, image_size)
    trial_n = min(n, s["trial_images_per_class"] * sizes["classes"]) if s["trial_images_per_class"] else n
    trials = 1 if s["method"] == "preset" else len(s["steps"]) * s["max_evals"]
    rows = [_row("search", "preset network" if s["method"] == "preset" else "trials (at most)", trials,
                 s["recipe"]["epochs"], trial_n, size)]
    if im["greedy"]:
        rows.append(_row("improve", "technique trials (at most)", (1 + len(im["candidates"])) * im["trial_seeds"],
                         im["trial_epochs"], n, size))
    final_n = n + sizes["val"] if "no_validation" in im["adopt"] else n
    rows.append(_row("improve", "final recipe" + (" and base recipe" if im["compare_base"] else ""),
                     2 if im["compare_base"] else 1, im["final_epochs"], final_n, size))
    if pr["method"] == "gradual":  # one run to the last target, then its fine-tune epochs
        rows.append(_row("prune", "gradual (pruning, then fine-tune epochs)", 1,
                         pr["epochs"] + pr["gradual_finetune_epochs"], final_n, size))
    else:
        rows.append(_row("prune", f"{len(pr['schedule'])} rounds", len(pr["schedule"]), pr["epochs"], final_n, size))
    exits = len(ac["positions"]) + (1 if ac["compare_loss"] else 0)
    rows.append(_row("accelerate", "exits (positions + compared loss)", exits, ac["epochs"], final_n, size))
    extra = len(ac["exit_schedule"]) * ac["exit_prune_epochs"] + ac["exit_stabilize_epochs"]
    if extra:
        rows.append(_row("accelerate", "exit pruning rounds and stabilisation", exits, extra, final_n, size))
    widths = 1 + len(q["compare_widths"])
    steps = (len(schedule_steps(q, q["widths"])) - 1) * q["schedule_epochs"]  # the width schedule's steps
    rows.append(_row("quantize", f"QAT, {widths} widths (main, then exit)", widths,
                     q["epochs"] + q["exit_epochs"] + steps, final_n, size))
    return rows


def plan(path: str) -> tuple[dict, list[dict]]:
    """(data sizes, training rows) of a params file, every section checked first."""
    cfg = {name: stage.read_config(path) for name, stage in STAGES.items()}
    prep = cfg["prepare"]
    sizes = data_sizes(prep)
    image_size = prep["image_size"] or 32
    return sizes, trainings(cfg, sizes, image_size)


def format_plan(sizes: dict, rows: list[dict], throughput: float | None, measured: str = "") -> str:
    lines = [f"data: {sizes['train']:,} training / {sizes['val']:,} validation / {sizes['test']:,} test images, "
             f"{sizes['classes']} classes", "",
             "| stage | training | runs | epochs | images per epoch | images | input | est. time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = _duration(r["images"] / throughput) if throughput else "-"
        lines.append(f"| {r['stage']} | {r['training']} | {r['runs']} | {r['epochs']} | {r['images_per_epoch']:,} | "
                     f"{r['images']:,} | {r['resolution']} px | {est} |")
    total = sum(r["images"] for r in rows)
    est = f", about {_duration(total / throughput)} at {throughput:,.0f} images/s{measured}" if throughput else ""
    lines += ["", f"total: {total:,} training images ({total / max(1, sizes['train']):,.0f} epochs of the "
                  f"training split){est}"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measure_throughput(path: str, steps: int = 5) -> float:
    """Training images/s of the stage's network and the improving stage's base recipe on this
    machine's device: a few timed steps on random images after two warm-up steps."""
    cfg = {n: STAGES[n].read_config(path) for n in ("prepare", "search", "improve")}
    recipe = check_recipe({**cfg["improve"]["base"], "epochs": 1}, file=path, section="improve.base")
    device = resolve_device(recipe["device"])
    name = cfg["search"]["preset"]
    model = create_model(create_spec(name, image_size=cfg["prepare"]["image_size"] or 32)).to(device)
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    size, bs = cfg["prepare"]["image_size"] or 32, recipe["batch_size"]
    x = torch.randn(bs, 3, size, size, device=device)
    y = torch.randint(0, model.spec["num_classes"], (bs,), device=device)
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - t0)
