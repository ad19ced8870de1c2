"""The report stage: Table 1 and the summary from the stages' metrics files."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sipa_core.pareto import Point, accuracy_range, front, merge_labels, place
from sipa_core.report import read_config, report

ROOT = Path(__file__).resolve().parents[1]


def _metrics(tmp_path, **scores):
    (tmp_path / "metrics").mkdir(exist_ok=True)
    for stage, score in scores.items():
        m = {"accuracy": 0.5, "params": 1e5, "ops": 3e7, "params_score": score / 2, "ops_score": score / 2,
             "score": score, "seed": 0, "device": "cpu", "torch": "x", "python": "3", "wall_time_s": 10.0,
             "images_trained": 1000, "weight_bits": 8, "act_bits": 4}
        (tmp_path / "metrics" / f"{stage}.json").write_text(json.dumps(m))


TABLES = {  # the stages' tables as they write them (header, then rows), as few rows as the tests need
    "prune_rounds": "round,target,sparsity,select_accuracy,accuracy,score,score_tree,chosen\n",
    "accelerate_exits": "position,threshold,val_accuracy,accuracy,score,score_tree,chosen\n",
    "quantize_widths": "widths,val_accuracy,accuracy,score,score_tree,chosen\n",
}


def _tables(tmp_path, rows: dict | None = None) -> dict:
    """Write the three tables the Pareto front reads (header only unless ``rows``); their paths."""
    (tmp_path / "plots").mkdir(exist_ok=True)
    paths = {}
    for key, header in TABLES.items():
        paths[key] = str(tmp_path / "plots" / f"{key}.csv")
        Path(paths[key]).write_text(header + "".join(line + "\n" for line in (rows or {}).get(key, [])))
    return paths


def _params(tmp_path, **cfg):
    base = {"metrics_dir": str(tmp_path / "metrics"), "summary": str(tmp_path / "metrics/summary.json"),
            "table": str(tmp_path / "reports/table1.md"), "table_csv": str(tmp_path / "plots/summary.csv"),
            "info_dir": str(tmp_path / "info"),
            "info": str(tmp_path / "info/report.json"), "claims": str(tmp_path / "reports/claims.md"),
            "figure": str(tmp_path / "reports/stages.png"), "pareto": str(tmp_path / "reports/pareto.png"),
            "pareto_csv": str(tmp_path / "plots/pareto.csv"), "latency": None, **_tables(tmp_path)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {**base, **cfg}}))
    return tmp_path / "params.yaml"


def test_table_and_summary(tmp_path):
    _metrics(tmp_path, search=0.015, improve=0.015, prune=0.006, accelerate=0.005, quantize=0.0025)
    params = _params(tmp_path, stages=["search", "improve", "prune", "accelerate"])
    s = report(read_config(params), params_file=str(params))
    assert s["final_stage"] == "accelerate" and s["score"] == 0.005
    assert s["compression_params"] == pytest.approx(3.0)
    written = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert written["score"] == 0.005 and "final_stage" not in written and "stages" not in written
    info = json.loads((tmp_path / "info/report.json").read_text())
    assert info["final_stage"] == "accelerate" and info["stages"]["prune"]["score"] == 0.006
    assert s["pipeline_wall_time_s"] == pytest.approx(40.0)
    table1, leaderboard = (tmp_path / "reports/table1.md").read_text().split("## Beside the 2019")
    table = table1.splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert rows[0].startswith("| stage | accuracy | parameters (n) | math ops (n)")
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "Searching", "Improving", "Pruning", "Accelerating", "WideResNet-28-10 (reference)",
        "Searching (paper)", "Improving (paper)", "Pruning (paper)", "Accelerating (paper)"]
    assert "| Pruning | 50.00% | 0.100M | 0.030B | 0.003000 | 0.003000 | 0.006000 | - | - | - | 0.00M | 10 s |" in rows
    assert "Latency not measured (report.latency: null)." in table1
    assert "| #1 (CIFAR-100) | 0.0044 | DenseNet-100 distilled" in leaderboard
    assert "| this run: Accelerating (50.00%) | 0.005000 | every addition at 32 bits (strict); - by" in leaderboard
    assert "0.005798" in rows[-1] and rows[-1].endswith("| - | - | - | - |")
    assert s["images_trained"] == 4000 and "Pipeline cost: 4,000 training images processed, 40 s" in "\n".join(table)
    # The default stages end with the quantized network, its widths in its row's name.
    params = _params(tmp_path)
    s = report(read_config(params), params_file=str(params))
    assert s["final_stage"] == "quantize" and s["score"] == 0.0025
    assert "| Quantizing (W8A4) | 50.00%" in (tmp_path / "reports/table1.md").read_text()
    # With the adder-tree keys the stages record, the table and the summary carry both accountings.
    path = tmp_path / "metrics/quantize.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "score_tree": 0.0012}))
    s = report(read_config(params), params_file=str(params))
    text = (tmp_path / "reports/table1.md").read_text()
    assert s["score_tree"] == 0.0012 and "| 0.002500 | 0.001200 | - | - | 0.00M | 10 s |" in text
    assert "| this run: Quantizing (W8A4) (50.00%) | 0.002500 | every addition at 32 bits (strict); 0.001200" in text
    csv = (tmp_path / "plots/summary.csv").read_text().splitlines()
    assert csv[0] == "stage,accuracy,params,ops,params_score,ops_score,score,ms_batch1,images_per_s" and len(csv) == 6


def test_the_figure_draws_the_stages_and_the_papers_side_panel(tmp_path):
    """reports/stages.png: accuracy against score, the run's stages and (with references) the paper's."""
    _metrics(tmp_path, search=0.015, improve=0.015, prune=0.006, accelerate=0.005, quantize=0.0025)
    sizes = {}
    for references in (True, False):
        params = _params(tmp_path, references=references)
        report(read_config(params), params_file=str(params))
        with Image.open(tmp_path / "reports/stages.png") as image:
            assert image.format == "PNG"
            sizes[references] = image.size
            colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20))
        assert colours > 50  # drawn: axes, labels, points; not a blank canvas
    assert sizes[True][0] > 1.8 * sizes[False][0]  # the side panel is there only with the references


def test_missing_or_broken_metrics_exit_2(tmp_path, run_script):
    _metrics(tmp_path, search=0.015)
    params = _params(tmp_path, stages=["search", "prune"])
    code, _, err = run_script(ROOT / "stages/report.py", "--params", params)
    assert code == 2 and "report.stages" in err and "prune.json not found" in err
    (tmp_path / "metrics/prune.json").write_text("{not json")
    code, _, err = run_script(ROOT / "stages/report.py", "--params", params)
    assert code == 2 and "prune.json: not valid JSON" in err
    params = _params(tmp_path, stages=["serch"])
    code, _, err = run_script(ROOT / "stages/report.py", "--params", params)
    assert code == 2 and "report.stages: unknown stage 'serch'" in err
    for latency, said in (({"threds": 2}, "unknown key 'threds'"), ({"batch": 0}, "batch must be a positive")):
        params = _params(tmp_path, stages=["search"], latency=latency)
        code, _, err = run_script(ROOT / "stages/report.py", "--params", params)
        assert code == 2 and "report.latency" in err and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "reports/table1.md").exists()


def test_latency_settings_fill_in_from_the_defaults(tmp_path):
    cfg = read_config(_params(tmp_path, latency={"threads": 1}))
    assert cfg["latency"] == {"threads": 1, "singles": 200, "batch": 256, "rounds": 5}


def test_a_round_chosen_on_test_is_marked(tmp_path):
    _metrics(tmp_path, search=0.015, improve=0.015, prune=0.006, accelerate=0.005, quantize=0.0025)
    m = json.loads((tmp_path / "metrics/prune.json").read_text())
    (tmp_path / "metrics/prune.json").write_text(json.dumps({**m, "chosen_on_test": True}))
    params = _params(tmp_path)
    report(read_config(params), params_file=str(params))
    table = (tmp_path / "reports/table1.md").read_text()
    assert "| Pruning (chosen on test) |" in table and "| Improving |" in table


def test_claims_table_holds_each_claim_against_its_threshold(tmp_path):
    _metrics(tmp_path, search=0.015, improve=0.015, prune=0.006, accelerate=0.005, quantize=0.0025)
    extra = {"improve": dict(accuracy=0.80, base_accuracy=0.78, params=1e5),
             "prune": dict(accuracy=0.796, weight_sparsity=0.6, accuracy_change=-0.004, params=4e4),
             "quantize": dict(score_tree=0.001),
             "accelerate": dict(accuracy=0.790, ops_saving=0.2, accuracy_change=-0.006, exit_ratio=0.4,
                                aurc_softsmoothing=0.10, aurc_cross_entropy=0.12, cross_entropy_exit_ratio=0.3,
                                cross_entropy_accuracy=0.789)}
    for stage, values in extra.items():
        path = tmp_path / "metrics" / f"{stage}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    (tmp_path / "info").mkdir()
    (tmp_path / "info/accelerate.json").write_text(json.dumps({"loss": "softsmoothing"}))  # the chosen loss
    params = _params(tmp_path)
    report(read_config(params), params_file=str(params))
    rows = [line for line in (tmp_path / "reports/claims.md").read_text().splitlines() if line.startswith("| ")]
    verdicts = [r.rsplit("|", 2)[1].strip() for r in rows[1:]]
    assert verdicts == ["holds", "holds", "does not hold", "holds", "a count, not a claim"]  # exit: -0.6 pp > 0.5
    assert ("W8A4, test 50.00%: score 0.002500 with every addition at 32 bits, 0.001000 by adder tree, below "
            "the 2019 winner's 0.0044") in rows[5]
    assert "improved 80.00% against base 78.00% (+2.00 pp)" in rows[1]
    assert "60.0% of the prunable weights removed (60.0% of the counted parameter bytes)" in rows[2]
    assert "expected ops -20.0% (exit ratio 40.0%), test accuracy -0.60 pp" in rows[3]
    assert "softsmoothing 40.0% out, test 79.00%, cross-entropy 30.0% out, test 78.90%" in rows[4]
    # The loss the stage recorded decides which keys are whose, not which keys exist.
    (tmp_path / "info/accelerate.json").write_text(json.dumps({"loss": "cross_entropy"}))
    report(read_config(params), params_file=str(params))
    row = (tmp_path / "reports/claims.md").read_text().splitlines()[-2]  # the loss claim
    assert "softsmoothing no threshold meets the target, cross-entropy 40.0% out, test 79.00%" in row
    (tmp_path / "info/accelerate.json").unlink()
    report(read_config(params), params_file=str(params))
    row = (tmp_path / "reports/claims.md").read_text().splitlines()[-2]  # the loss claim
    assert "loss is not recorded" in row and row.endswith("| not measured |")


def test_claims_say_why_no_exit_was_kept(tmp_path):
    _metrics(tmp_path, search=0.015, improve=0.015, prune=0.006, accelerate=0.006, quantize=0.004)
    path = tmp_path / "metrics/accelerate.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "passthrough": True, "ops_saving": 0.0,
                                "accuracy_change": 0.0, "exit_ratio": 0.0, "best_exit_score": 0.0061}))
    params = _params(tmp_path)
    report(read_config(params), params_file=str(params))
    rows = [line for line in (tmp_path / "reports/claims.md").read_text().splitlines() if line.startswith("| ")]
    assert "no exit kept: the best exit's score 0.006100 is above the network's own 0.006000" in rows[3]
    assert rows[3].endswith("| does not hold |")
    assert "no exit kept, so no exit was compared" in rows[4] and rows[4].endswith("| not measured |")


def test_the_pareto_front_by_hand():
    """On the front: no other network has a score at most its own and a higher accuracy, or a lower
    score and the same accuracy (within 1e-6, the tables' rounding); without a score, not on it."""
    def net(acc, score, tree=None):
        return Point("prune", f"{acc}@{score}", acc, score, tree, False)

    points = [net(0.80, 0.010, 0.008), net(0.79, 0.006, 0.005), net(0.79, 0.007, 0.004),
              net(0.70, 0.003), net(0.7000004, 0.003), net(0.69, 0.0035)]
    assert front(points, "score") == [True, True, False, True, True, False]
    assert front(points, "score_tree") == [True, False, True, False, False, False]


def test_a_figure_shows_the_networks_near_the_best_and_marks_those_far_below():
    """An untrained search result (17.5%) does not stretch the range: it is drawn on the floor as v
    with its accuracy; networks drawn at one place (a stage that passed its input on) share a label."""
    floor, top = accuracy_range([76.5, 75.6, 69.1, 17.5])
    assert (floor, top) == pytest.approx((68.1, 77.5))
    assert place(69.1, "W4A4", floor) == (69.1, "o", "W4A4")
    assert place(17.5, "Searching", floor) == pytest.approx((68.4, "v", "Searching (17.5%, below)"))
    assert accuracy_range([]) == (0.0, 100.0)
    marks = [(0.0033, 75.6, "Pruning"), (0.0033, 75.6, "Accelerating"), (0.0017, 75.4, "Quantizing")]
    assert merge_labels(marks) == [(0.0033, 75.6, "Pruning = Accelerating"), (0.0017, 75.4, "Quantizing")]


def test_the_report_draws_every_network_of_the_run_and_its_front(tmp_path):
    _metrics(tmp_path, search=0.015, improve=0.014, prune=0.006, accelerate=0.005, quantize=0.0025)
    rows = {"prune_rounds": ["0,0,0,0.5,0.52,0.014,0.013,no", "1,0.3,0.3,0.5,0.53,0.009,0.008,no",
                             "2,0.5,0.5,0.5,0.50,0.006,0.005,yes"],
            "accelerate_exits": ["2,0.85,0.5,0.50,0.0055,,no", "2,0.5,0.5,0.5,0.005,0.004,yes"],
            "quantize_widths": ["W8A8,0.5,0.5,0.0025,0.002,yes", "W4A4,0.4,0.41,0.0015,0.0011,no"]}
    params = _params(tmp_path)
    _tables(tmp_path, rows)
    report(read_config(params), params_file=str(params))
    lines = (tmp_path / "plots/pareto.csv").read_text().splitlines()
    assert lines[0] == "stage,label,accuracy,score,score_tree,ms_batch1,chosen,front,front_tree"
    table = [line.split(",") for line in lines[1:]]
    # each stage's result (chosen), then the rows that are not the input (round 0) or a stage's result
    assert [r[1] for r in table] == ["Searching", "Improving", "Pruning", "Accelerating", "Quantizing",
                                     "pruning round 1 (30% sparse)", "exit after block 2 at threshold 0.85", "W4A4 QAT"]
    front_strict = {r[1] for r in table if r[7] == "yes"}
    assert front_strict == {"pruning round 1 (30% sparse)", "Quantizing", "W4A4 QAT"}, table
    assert table[6][4] == "" and table[6][8] == "no"  # no adder-tree score recorded: not on that front
    assert all(r[5] == "" for r in table)  # latency not measured (report.latency: null)
    with Image.open(tmp_path / "reports/pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000  # two panels
    (tmp_path / "plots/quantize_widths.csv").unlink()
    with pytest.raises(Exception, match="quantize_widths.csv: not found"):
        report(read_config(params), params_file=str(params))
