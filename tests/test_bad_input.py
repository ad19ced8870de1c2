"""The bad-input corpus: every case gets one line naming the file and key,
exit status 2, before any long computation, and earlier outputs stay intact."""

import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import save_prepared, tiny_arch_yaml, tiny_data, tiny_model
from sipa_core.checkpoint import save_model
from sipa_core.errors import SipaError
from sipa_core.lineage import lineage_record
from sipa_core.quantize.quantizers import Quantizers
from sipa_core.quantize.record import QuantRecord
from sipa_core.models import create_model
from sipa_core.quantize.qat import calibrate, fold_batchnorm, quantize_modules
from sipa_core.scoring.bits import BitWidths
from sipa_core.train import default_recipe, fit, soft_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = '{"score": 0.5}\n'


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Inputs every case starts from: data, an architecture, checkpoints good and bad."""
    d = tmp_path_factory.mktemp("bad")
    data = tiny_data()
    save_prepared(data, d / "data.pt")
    tiny_arch_yaml(d / "arch.yaml")
    save_model(d / "good.pt", tiny_model(), lineage=lineage_record(data, ["train"]))
    save_model(d / "trained_on_val.pt", tiny_model(), lineage=lineage_record(data, ["train", "val"]))
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:200])
    torch.save([1, 2, 3], d / "foreign.pt")
    torch.save({"format": "sipa-checkpoint", "model": {}, "x": Payload()}, d / "evil.pt", pickle_module=pickle)
    save_model(d / "other_arch.pt", create_model("sipa_baseline_32", num_classes=4))
    widths = BitWidths(8, 8, 32)  # a quantize stage's checkpoint: BatchNorm folded, Brevitas layers
    quantized = tiny_model().eval()
    fold_batchnorm(quantized)
    quantize_modules(quantized, widths)
    calibrate(quantized, [data.train_x[:8].float() / 255])
    save_model(d / "quantized.pt", quantized, lineage=lineage_record(data, ["train"]),
               records={"quant": QuantRecord(widths, Quantizers())})
    ckpt = torch.load(d / "good.pt", weights_only=True)  # records as another version would write them
    torch.save({**ckpt, "foo": 1}, d / "other_version.pt")
    exit_record = {"position": 0, "channels": 8, "size": 8, "width": 16, "kernel": 3, "activation": "swish",
                   "num_classes": 10, "state": {}, "threshold": 0.5, "exit_ratio": 0.5, "loss": "softsmoothing",
                   "rule": {"thresholds": [0.5], "min_accuracy": None, "max_drop": 0.1}}  # no allow_no_exit
    torch.save({**ckpt, "exit": exit_record}, d / "old_exit.pt")
    (d / "wrn.yaml").write_text("family: wrn\ndepth: 10\nwiden: 1\nnum_classes: 10\nimage_size: 16\n")
    (d / "empty_folder/train").mkdir(parents=True)
    (d / "empty_folder/test").mkdir(parents=True)
    for split in ("train", "test"):
        (d / f"broken_folder/{split}/cat").mkdir(parents=True)
        (d / f"broken_folder/{split}/cat/0.jpg").write_bytes(b"not a jpeg at all")
    return d


GOOD = {
    "prepare": {"source": "imagefolder", "root": "empty_folder", "out": "data/prepared.pt", "val_size": 0,
                "metrics": "metrics/prepare.json"},
    "improve": {"arch": "arch.yaml", "data": "data.pt", "candidates": ["cosine"], "trial_epochs": 1,
                "final_epochs": 1, "base": {"batch_size": 16}},
    "prune": {"model": "good.pt", "data": "data.pt", "schedule": [0.5], "epochs": 1},
    "accelerate": {"model": "good.pt", "data": "data.pt", "positions": [0], "epochs": 1},
    "quantize": {"model": "good.pt", "data": "data.pt", "epochs": 0, "exit_epochs": 0, "compare_widths": []},
    "report": {"stages": ["prune"]},
}

# (stage, section changes or raw YAML text, what the one line must say)
CASES = [
    ("prune", "prune: [unclosed", "malformed YAML at line 1"),
    ("prune", {"prune": {"schedul": [0.5]}}, "prune.schedul: unknown key (did you mean prune.schedule?)"),
    ("prune", {"prune": {"epochs": "two"}}, "prune.epochs"),
    ("improve", {"improve": {"final_epochs": -1}}, "improve.final_epochs"),
    ("improve", {"improve": {"base": {"epochs": -3}}}, "improve.base.epochs"),
    ("prune", {"prune": {"schedule": [0.5, 1.0]}}, "prune.schedule: every target must be in (0, 1)"),
    ("prune", {"prune": {"schedule": []}}, "prune.schedule: must list at least one"),
    ("accelerate", {"accelerate": {"thresholds": [0.5, 1.2]}},
     "accelerate.thresholds: every threshold must be in [0, 1]"),
    ("accelerate", {"accelerate": {"table_thresholds": [-0.1]}}, "accelerate.table_thresholds"),
    ("accelerate", {"accelerate": {"positions": [7]}}, "accelerate.positions: block 7 is past"),
    ("prune", {"prune": {"model": "missing.pt"}}, "prune.model: checkpoint missing.pt not found"),
    ("prune", {"prune": {"model": "truncated.pt"}}, "truncated, corrupt or not a torch file"),
    ("prune", {"prune": {"model": "foreign.pt"}}, "not a sipa checkpoint nor a state_dict"),
    ("accelerate", {"accelerate": {"model": "evil.pt"}}, "pickled code or objects that are not plain tensors"),
    ("improve", {"improve": {"init": "other_arch.pt"}}, "does not fit architecture"),
    ("prune", {"prune": {"data": "nothing.pt"}}, "prune.data: prepared data nothing.pt not found"),
    ("prune", {"prune": {"model": "trained_on_val.pt"}}, "prune.select_split: the val split chooses here"),
    ("accelerate", {"accelerate": {"model": "trained_on_val.pt"}}, "accelerate.thresholds (calibrated on val)"),
    ("prune", {"prune": {"recipe": {"epochs": 5}}}, "prune.recipe.epochs: set prune.epochs"),
    ("prune", {"prune": {"preset": "paper", "schedule": [0.5]}}, "prune.schedule: prune.preset: paper sets"),
    ("prepare", {}, "prepare.root: empty_folder/train: no class subfolders, so no images"),
    ("prepare", {"prepare": {"root": "broken_folder"}}, "prepare.root: broken_folder/t"),  # + "cannot read image"

    ("report", {"report": {"stages": ["prun"]}}, "report.stages: unknown stage 'prun'"),
    # A checkpoint of the wrong kind: the quantize stage's, where a floating-point network is needed.
    ("prune", {"prune": {"model": "quantized.pt"}}, "prune.model: quantized.pt is already quantized (W8A8"),
    ("accelerate", {"accelerate": {"model": "quantized.pt"}}, "accelerate.model: quantized.pt is already quantized"),
    ("improve", {"improve": {"init": "quantized.pt"}}, "improve.init: quantized.pt is already quantized"),
    # Distillation: a weight out of range, and a weight where the stage has no teacher.
    ("prune", {"prune": {"recipe": {"distill_weight": 1.5}}}, "prune.recipe.distill_weight: must be <= 1"),
    ("improve", {"improve": {"base": {"distill_weight": 0.5}}}, "improve.base.distill_weight: this stage has no"),
    ("accelerate", {"accelerate": {"recipe": {"distill_weight": 0.5}}}, "accelerate.recipe.distill_weight: this"),
    # A misspelt section would run its stage on defaults: refused, with a did-you-mean.
    ("prune", "prune: {model: good.pt, data: data.pt}\nprnue: {epochs: 1}\n",
     "params.yaml: prnue: unknown section (did you mean prune?)"),
    # A structural setting the network cannot record (it would be rebuilt without it), said before training.
    ("improve", {"improve": {"arch": "wrn.yaml", "base": {"drop_connect": 0.1}}},
     "improve.base sets drop_connect, but the network wrn has no drop_connect setting"),
    # Checkpoints of another version: an unknown record; an exit record from before the whole rule.
    ("prune", {"prune": {"model": "other_version.pt"}}, "other_version.pt: unknown checkpoint record 'foo'"),
    ("quantize", {"quantize": {"model": "old_exit.pt"}},
     "old_exit.pt: the exit record carries no complete threshold rule"),
]


def write_params(work: Path, change) -> Path:
    path = work / "params.yaml"
    if isinstance(change, str):
        path.write_text(change)
        return path
    params = {k: dict(v) for k, v in GOOD.items()}
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(params[section].get(key), dict):
                params[section][key] = {**params[section][key], **value}
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params))
    return path


SUBPROCESS_CASES = {0, 13}  # a malformed file and a pickled-code checkpoint: also as real processes


def run_stage(name, work, preexec=None):
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), "--params", "params.yaml"],
                          cwd=work, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_line_and_exit_2(project, case, run_script):
    stage, change, message = CASES[case]
    work = project
    metrics = work / "metrics" / f"{stage}.json"
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_text(SENTINEL)  # an earlier run's output
    write_params(work, change)
    if case in SUBPROCESS_CASES:
        p = run_stage(stage, work)
        code, out, err = p.returncode, p.stdout, p.stderr
    else:
        code, out, err = run_script(ROOT / "stages" / f"{stage}.py", "--params", "params.yaml", cwd=work)
    assert code == 2, (code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "params.yaml" in lines[0] or ".pt" in lines[0], lines[0]  # the file, and the key or the bad input
    if "broken_folder" in message:
        assert "cannot read image" in lines[0]
    assert "pickled code ran" not in out + err
    assert metrics.read_text() == SENTINEL  # nothing already written is lost or half-written


@pytest.mark.slow  # fault injection: a stage subprocess under a file-size limit
def test_full_disk_while_writing_keeps_the_old_file(project, tmp_path):
    """A file-size limit makes the checkpoint write fail like a full disk does:
    one line, exit 2, the previous checkpoint and metrics untouched."""
    work = tmp_path
    for name in ("data.pt", "good.pt"):
        (work / name).write_bytes((project / name).read_bytes())
    (work / "models").mkdir()
    old = b"previous checkpoint"
    (work / "models/prune.pt").write_bytes(old)
    (work / "metrics").mkdir()
    (work / "metrics/prune.json").write_text(SENTINEL)
    write_params(work, {"prune": {"epochs": 0}})

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    p = run_stage("prune", work, preexec=limit)
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert "could not write (File too large)" in line and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (work / "models/prune.pt").read_bytes() == old
    assert (work / "metrics/prune.json").read_text() == SENTINEL
    assert not list(work.rglob(".*.tmp"))  # the unfinished temporary file is removed


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_state(project, tmp_path):
    calls = []

    def poisoned(logits, targets, labels):  # the first step of epoch 2 (4 steps per epoch) goes NaN
        calls.append(1)
        loss = soft_cross_entropy(logits, targets)
        return loss * float("nan") if len(calls) == 5 else loss

    state = tmp_path / "state.pt"
    with pytest.raises(SipaError,
                       match=r"loss is nan at epoch 2, step 1; the last good state is .*state.pt \(epoch 1\)"):
        fit(tiny_model(), tiny_data(), default_recipe(epochs=3, batch_size=16), state_path=state, loss_fn=poisoned,
            val_split=None, progress=False)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values()
                                       if v.is_floating_point())
