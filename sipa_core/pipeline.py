"""The pipeline's stages in order: one registry of the ``Stage`` objects that
the scripts in ``stages/`` run and that ``sipa check-params`` checks.

(A stage script imports its own stage module, not this registry, so that the
code DVC tracks for a stage is the code that stage runs.)
"""

from __future__ import annotations

from sipa_core.accelerate.stage import STAGE as ACCELERATE
from sipa_core.accelerate.training import exit_recipe
from sipa_core.data.prepare import STAGE as PREPARE
from sipa_core.improve.stage import STAGE as IMPROVE
from sipa_core.improve.techniques import apply_techniques
from sipa_core.launch import DISTRIBUTED_SCHEMA, __doc__ as DISTRIBUTED_DOC
from sipa_core.params import check_section, raw_section
from sipa_core.paths import read_params
from sipa_core.prune.stage import STAGE as PRUNE
from sipa_core.quantize.stage import STAGE as QUANTIZE
from sipa_core.quantize.training import QAT_RECIPE
from sipa_core.report import STAGE as REPORT
from sipa_core.search.stage import STAGE as SEARCH
from sipa_core.stage_runner import Stage
from sipa_core.train.recipe import check_recipe

STAGES: dict[str, Stage] = {s.name: s for s in (PREPARE, SEARCH, IMPROVE, PRUNE, ACCELERATE, QUANTIZE, REPORT)}
# Sections that are not a stage's: name -> (what it is, its schema).
SETTINGS = {"distributed": (DISTRIBUTED_DOC, DISTRIBUTED_SCHEMA)}


def check_params(path: str) -> list[str]:
    """Check every stage's section of a params file (schemas, recipes, schedules);
    the first problem is a SipaError naming the file and key."""
    data = read_params(path, complete=True)  # every section dvc.yaml's stages read, none unknown
    for name, (_, schema) in SETTINGS.items():
        check_section(data.get(name), schema, file=path, section=name)
    for stage in STAGES.values():
        stage.read_config(path)
    return list(SETTINGS) + list(STAGES)


def inactive_keys(path: str) -> list[str]:
    """Keys the file sets that its own settings leave unused (``sipa check-params`` shows them)."""
    out = []
    for name, stage in STAGES.items():
        if stage.inactive is not None:
            out += stage.inactive(stage.read_config(path), raw_section(path, name))
    return out


def resolved_trainings(path: str) -> dict[str, dict]:
    """Every training the pipeline will run with this params file, and its effective recipe
    (after presets, technique options, inheritance from the previous stage and overrides).
    What depends on a result (a greedy selection) is said, not guessed."""
    cfg = {name: stage.read_config(path) for name, stage in STAGES.items()}
    search, improve, prune, accelerate = (cfg[k] for k in ("search", "improve", "prune", "accelerate"))
    out = {f"search ({search['method']})": {"each training": search["recipe"]}}
    imp = {}
    if improve["greedy"]:
        imp["trials"] = {"recipe": {**improve["base"], "epochs": improve["trial_epochs"]},
                         "candidates, each on top of the adopted ones": improve["candidates"]}
        imp["final"] = f"base + the adopted techniques, {improve['final_epochs']} epochs (chosen by the trials)"
        final = None
    else:
        final = check_recipe({**apply_techniques(improve["base"], improve["adopt"], improve["options"]),
                              "epochs": improve["final_epochs"]}, file=path, section="improve")
        imp["final"] = {"techniques": improve["adopt"], "recipe": final,
                        "splits": ["train", "val"] if "no_validation" in improve["adopt"] else ["train"]}
    out["improve"] = imp
    overrides = {**prune["recipe"], "epochs": prune["epochs"], "seed": prune["seed"]}
    out["prune"] = {f"each of {len(prune['schedule'])} rounds {prune['schedule']}":
                    check_recipe({**final, **overrides}, file=path, section="prune") if final
                    else f"improve's final recipe + {overrides}"}
    exit_ = exit_recipe(accelerate, final or {}, path)
    out["accelerate"] = {f"exit after block {p}": exit_ for p in accelerate["positions"]}
    if accelerate["exit_schedule"]:
        out["accelerate"]["exit pruning rounds"] = {"targets": accelerate["exit_schedule"],
                                                    "epochs each": accelerate["exit_prune_epochs"]}
    if accelerate["exit_stabilize_epochs"]:
        out["accelerate"]["exit stabilisation"] = {"epochs": accelerate["exit_stabilize_epochs"],
                                                   "lr": accelerate["exit_stabilize_lr"], "augment": "crop/flip"}
    out["quantize"] = quantize_trainings(cfg["quantize"], path)
    return out


def quantize_trainings(q: dict, path: str) -> dict:
    """The quantizing stage's trainings: per width, QAT of the main network, then of the exit."""
    recipe = check_recipe({**QAT_RECIPE, **q["recipe"], "epochs": q["epochs"], "seed": q["seed"]}, file=path,
                          section="quantize.recipe")
    widths = [q["widths"].label()] + list(q["compare_widths"])
    steps = {"width schedule": f"{q['schedule']}, {q['schedule_epochs']} epochs each, then the final widths"}
    return {"widths trained": widths, **(steps if q["schedule"] else {}),
            "quantizers": {k: q[k] for k in ("act_quantizers", "output_bits", "weight_scale", "scale_lr")},
            "main network, each width": recipe,
            "exit, each width": {**recipe, "epochs": q["exit_epochs"], "label_smoothing": 0.0},
            "speed keys": "from the input checkpoint (precision, channels_last, device, ...)"}
