"""`sipa score` and checkpoints, as a user runs them."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sipa_core.checkpoint import load_model, save_model
from sipa_core.cli import main
from sipa_core.errors import SipaError
from sipa_core.models import create_model
from sipa_core.prune.masks import apply_masks, magnitude_masks, masks_from_zeros


def sipa_subprocess(*args):
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("sipa")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sipa_core.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)


@pytest.fixture
def sipa(capsys):
    """The same entry point in-process (a torch import per call would cost seconds)."""

    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def assert_clean_failure(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow  # the console script in a subprocess
def test_score_json_for_the_baseline():
    p = sipa_subprocess("score", "--arch", "sipa_baseline", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    for key in ("params", "params_mb", "ops", "mults", "adds", "params_score", "ops_score", "score"):
        assert key in s
    assert s["params_score"] == pytest.approx(0.006534, abs=1e-6)
    assert s["ops_score"] == pytest.approx(0.008433, abs=1e-6)
    assert s["score"] == pytest.approx(0.014967, abs=1e-6)
    p = sipa_subprocess("score", "--arch", "sipa_baseline", "--uniform-sparsity", "0.64", "--json")
    s = json.loads(p.stdout)
    assert s["params_score"] == pytest.approx(0.002833, abs=1e-6)
    assert s["ops_score"] == pytest.approx(0.003253, abs=1e-6)


def test_score_after_a_global_prune_counts_what_the_pruning_stage_would_leave(tmp_path, sipa):
    """--global-sparsity S: the pruning stage's masks (global, L2-normalised) at S, then counted; the
    same count as a checkpoint pruned with those masks, and below the dense network's."""
    torch.manual_seed(0)
    model = create_model("sipa_baseline_32", num_classes=10)
    save_model(tmp_path / "dense.pt", model)
    pruned = create_model("sipa_baseline_32", num_classes=10)
    pruned.load_state_dict(model.state_dict())
    apply_masks(pruned, magnitude_masks(pruned, masks_from_zeros(pruned), 0.7, scope="global", normalize="l2"))
    save_model(tmp_path / "pruned.pt", pruned)
    scores = {}
    for name, extra in (("dense", []), ("global", ["--global-sparsity", "0.7"]), ("pruned", [])):
        p = sipa("score", "--checkpoint", str(tmp_path / f"{'pruned' if name == 'pruned' else 'dense'}.pt"),
                 "--weight-bits", "4", "--act-bits", "8", "--json", *extra)
        assert p.returncode == 0, p.stderr
        scores[name] = json.loads(p.stdout)
    assert scores["global"]["weight_sparsity"] == pytest.approx(0.7, abs=0.02)  # over every counted weight
    assert scores["global"]["score"] == scores["pruned"]["score"] < 0.6 * scores["dense"]["score"]
    assert_clean_failure(sipa("score", "--checkpoint", str(tmp_path / "dense.pt"), "--global-sparsity", "1"),
                         "--global-sparsity must be in [0, 1)")
    assert_clean_failure(sipa("score", "--arch", "sipa_baseline", "--global-sparsity", "0.5",
                              "--uniform-sparsity", "0.5"), "not with --uniform-sparsity")


def test_score_table_and_wrn(sipa):
    p = sipa("score", "--arch", "wrn28_10", "--bits", "32", "--layers")
    assert p.returncode == 0, p.stderr
    assert "blocks.0.conv1" in p.stdout and "params score    1.000765" in p.stdout
    assert "ops score       0.999998" in p.stdout


def test_checkpoint_round_trip(tmp_path, sipa):
    model = create_model("sipa_baseline_32", num_classes=10)
    with torch.no_grad():
        model.blocks[3].project[0].weight.mul_(
            (torch.rand_like(model.blocks[3].project[0].weight) > 0.5).float())
    path = save_model(tmp_path / "m.pt", model)
    loaded, ckpt = load_model(path)
    assert ckpt.arch["num_classes"] == 10 and ckpt.stage is None and ckpt.records == {}
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    p = sipa("score", "--checkpoint", str(path), "--json")
    assert p.returncode == 0, p.stderr
    dense = json.loads(sipa("score", "--arch", "sipa_baseline_32", "--num-classes", "10", "--json").stdout)
    assert json.loads(p.stdout)["params_bytes"] < dense["params_bytes"]  # the sparse tensor counts as sparse
    # A bare state_dict works with --arch.
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    p2 = sipa("score", "--arch", "sipa_baseline_32", "--num-classes", "10", "--checkpoint", str(tmp_path / "sd.pt"),
              "--json")
    assert json.loads(p2.stdout)["score"] == json.loads(p.stdout)["score"]


def test_arch_from_yaml(tmp_path, sipa):
    spec = tmp_path / "arch.yaml"
    spec.write_text("family: efficientnet\nblocks: [r1_k3_s1_e1_i16_o16_se0.25, r2_k5_s2_e4_i16_o32]\n"
                    "num_classes: 10\nhead: 64\n")
    p = sipa("score", "--arch", str(spec), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["params"] > 0
    spec.write_text("family: efficientnet\nblocks: [r1_k3_s1_e1_i16_o16_qq]\n")
    assert_clean_failure(sipa("score", "--arch", str(spec)), "malformed block string", "qq")


def test_input_size_builds_the_network_for_it_and_a_size_it_cannot_take_is_refused(tmp_path, sipa):
    """--input-size with --arch counts the network as a stage builds it for data of that size; 0 (once
    counted at 32 px without a word), a negative size, or a checkpoint's network at a size it was not
    built for: one line, exit 2."""
    at = {n: json.loads(sipa("score", "--arch", "sipa_baseline_32", "--input-size", str(n), "--json").stdout)
          for n in (32, 16)}
    assert at[16]["ops"] < at[32]["ops"] / 3 and at[16]["params"] == at[32]["params"]
    assert_clean_failure(sipa("score", "--arch", "sipa_baseline_32", "--input-size", "0"),
                         "--input-size must be a positive number of pixels, got 0")
    assert_clean_failure(sipa("score", "--arch", "wrn28_10", "--input-size", "-8"), "got -8")
    path = save_model(tmp_path / "m.pt", create_model("sipa_baseline_32", num_classes=10))
    assert_clean_failure(sipa("score", "--checkpoint", str(path), "--input-size", "64"),
                         "--input-size 64", "built for 32x32 inputs")


def test_bad_inputs_exit_2_with_one_line(tmp_path, sipa):
    assert_clean_failure(sipa("score", "--arch", "sipa_basline"), "unknown architecture", "sipa_baseline")
    assert_clean_failure(sipa("score", "--checkpoint", str(tmp_path / "nope.pt")), "nope.pt", "not found")
    bad = tmp_path / "trunc.pt"
    save_model(bad, create_model("sipa_baseline_32"))
    bad.write_bytes(bad.read_bytes()[:1000])
    assert_clean_failure(sipa("score", "--checkpoint", str(bad)), "trunc.pt", "cannot read")
    other = tmp_path / "wrn.pt"
    torch.save(create_model("wrn28_10", depth=10, widen=1).state_dict(), other)
    assert_clean_failure(sipa("score", "--arch", "sipa_baseline", "--checkpoint", str(other)),
                         "wrn.pt", "does not fit architecture sipa_baseline")
    assert_clean_failure(sipa("score", "--arch", "sipa_baseline", "--uniform-sparsity", "1.5"), "sparsity")


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "sipa-checkpoint", "model": {}, "x": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(SipaError, match="refused for safety"):
        load_model(evil)
    p = sipa_subprocess("score", "--checkpoint", str(evil))  # exit status and stderr of the real command
    assert_clean_failure(p, "evil.pt", "refused for safety")
    assert "pickled code ran" not in p.stdout


def test_archs_lists_the_registry(sipa):
    p = sipa("archs")
    assert p.returncode == 0 and "sipa_baseline" in p.stdout and "wrn28_10" in p.stdout


def test_check_params_accepts_every_profile_and_names_a_bad_key(tmp_path, run_script):
    root = Path(__file__).resolve().parents[1]
    for name in ["params.yaml"] + sorted(str(p.relative_to(root)) for p in (root / "profiles").glob("*.yaml")):
        code, out, err = run_script("sipa", "check-params", root / name)
        assert code == 0 and "ok" in out, err
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["schedul"] = [0.5]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    code, _, err = run_script("sipa", "check-params", tmp_path / "p.yaml")
    assert code == 2
    assert "prune.schedul: unknown key (did you mean prune.schedule?)" in err
