"""
benchmarks/gain.py end to end at a tiny size: 2 seeds of the baseline and the non-local model, 2 training
iterations each, on the context-cue dataset; every run happened, and the JSON and the table hold what the
runs' own metrics.json say. And a missing dataset stops it before any training.
"""
import glob
import importlib.util
import json
import math
import os
import statistics

import pytest
import yaml

from nl_detectron.data.check import DatasetNotRegisteredError

from tiny_training import TINY_CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = [3, 4]
METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75")]


def _load_gain():
    spec = importlib.util.spec_from_file_location("gain", os.path.join(REPO, "benchmarks", "gain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gain = _load_gain()


def _argv(output_dir, json_path, *extra):
    return [
        "--config", TINY_CONFIG, "--seeds", *map(str, SEEDS), "--output-dir", str(output_dir), "--json", str(json_path),
        "--jobs", "2", "--threads", "1", "--attention-images", "5", *extra,
        # Any detection counts, few of them: the evaluation of 100 val images takes seconds.
        "SOLVER.MAX_ITER", "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20",
    ]


def _final_evaluation(run_dir):
    """The last line of metrics.json that has COCO results (read here, not with compare_results)."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [line for line in lines if "bbox/AP" in line][-1]


def _first_loss(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.loads(f.readline())["total_loss"]


def _parse(table):
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_trains_both_models_for_every_seed_and_reports_their_metrics(tmp_path, capsys):
    out, json_path = tmp_path / "runs", tmp_path / "gain.json"
    saved = gain.main(_argv(out, json_path, "--train-dataset", "nl_context_train", "--test-dataset", "nl_context_val"))
    printed = capsys.readouterr().out
    with open(json_path) as f:
        assert json.load(f) == json.loads(json.dumps(saved))
    assert saved["device"] and saved["torch"] and saved["wall_time_s"] > 0
    assert saved["command"].startswith("python benchmarks/gain.py --config ")

    expected = {}
    for model, backbone in (("baseline", "build_resnet_fpn_backbone"), ("nonlocal", "build_resnet_fpn_nl_backbone")):
        assert saved[model]["seeds"] == SEEDS
        assert [r["seed"] for r in saved[model]["runs"]] == SEEDS
        for run, seed in zip(saved[model]["runs"], SEEDS):
            # Every run happened, in its own kept directory, with the model and seed it was meant to have.
            run_dir = str(out / model / f"seed{seed}")
            assert run["output_dir"] == run_dir
            assert os.path.isfile(os.path.join(run_dir, "model_final.pth"))
            assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
            with open(os.path.join(run_dir, "config.yaml")) as f:
                cfg = yaml.safe_load(f)
            assert cfg["MODEL"]["BACKBONE"]["NAME"] == backbone and cfg["SEED"] == seed
            assert cfg["DATASETS"]["TEST"] == ["nl_context_val"] and cfg["DATASETS"]["TRAIN"] == ["nl_context_train"]
            final = _final_evaluation(run_dir)
            assert final["iteration"] == 2  # the evaluation after the last iteration
            values = [final[f"{task}/{metric}"] for task, metric in METRICS]
            assert [run[task][metric] for task, metric in METRICS] == values
            expected[model, seed] = values
        # Each seed trained its own model (2 iterations leave AP near 0 for all, so compare the losses).
        first_losses = [_first_loss(out / model / f"seed{seed}") for seed in SEEDS]
        assert first_losses[0] != first_losses[1]

    # The non-local runs' attention on the cue was measured (5 val images).
    for run in saved["nonlocal"]["runs"]:
        share = run["cue_attention"]
        assert share["images"] == 5 and share["queries"] >= 5
        assert math.isclose(share["ratio"], share["share"] / share["uniform_share"])
        assert f"seed {run['seed']}: object queries put {100 * share['share']:.1f}% of their attention" in printed
    assert all("cue_attention" not in run for run in saved["baseline"]["runs"])

    # The printed table holds those numbers: each seed, mean ± sample std, and the seed-wise difference.
    table = printed[printed.index("| backbone |"):].split("\n\n")[0]
    rows = {(r["model"], r["seeds"]): r for r in _parse("\n".join(line for line in table.splitlines() if line.startswith("|")))}
    columns = ["AP box", "AP50 box", "AP75 box", "AP mask", "AP50 mask", "AP75 mask"]
    for label, model in (("baseline", "baseline"), ("+1 NL", "nonlocal")):
        for seed in SEEDS:
            assert [rows[label, f"seed {seed}"][c] for c in columns] == [f"{v:.1f}" for v in expected[model, seed]]
        for c, per_seed in zip(columns, zip(*(expected[model, s] for s in SEEDS))):
            assert rows[label, "mean ± std (2 seeds)"][c] == f"{statistics.mean(per_seed):.1f} ± {statistics.stdev(per_seed):.1f}"
    for seed in SEEDS:
        deltas = [n - b for b, n in zip(expected["baseline", seed], expected["nonlocal", seed])]
        assert [rows["delta", f"seed {seed}"][c] for c in columns] == [f"{d:+.1f}" for d in deltas]
    assert ("baseline", "paper") not in rows  # R18: the paper has no such row


def test_a_missing_dataset_stops_it_before_any_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(gain.subprocess, "Popen", no_training)
    out = tmp_path / "runs"
    with pytest.raises(DatasetNotRegisteredError, match=r"DATASETS.TEST names dataset 'nl_context_vall', which is not registered"):
        gain.main(_argv(out, tmp_path / "gain.json", "--test-dataset", "nl_context_vall"))
    assert not out.exists() and not (tmp_path / "gain.json").exists()
    # A config without a test dataset cannot be compared either (the tiny config has none).
    with pytest.raises(ValueError, match=r"DATASETS.TEST is empty; give --test-dataset"):
        gain.main(_argv(out, tmp_path / "gain.json"))
    # Nor one whose backbone has no detectron2 counterpart to be the baseline.
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE.NAME 'build_resnet_fpn_backbone' is not a non-local builder"):
        gain.main(_argv(out, tmp_path / "gain.json", "--test-dataset", "nl_context_val", "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"))
    assert not out.exists()


def test_table5_mode_pairs_the_papers_configs_and_checks_coco_first(tmp_path, monkeypatch):
    monkeypatch.setattr(gain.subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"DATASETS.TRAIN names dataset 'coco_2017_train', whose json_file"):
        gain.main(["--table5", "R50", "R101", "--output-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
    configs = os.path.join(REPO, "configs")
    plans = gain.plan_pair(
        os.path.join(configs, "mask_rcnn_nl_R50.yaml"), os.path.join(configs, "mask_rcnn_R50.yaml"),
        ["DATASETS.TRAIN", "('nl_shapes_train',)", "DATASETS.TEST", "('nl_shapes_val',)"],
    )
    assert plans["baseline"][0].endswith("configs/mask_rcnn_R50.yaml")
    assert plans["nonlocal"][0].endswith("configs/mask_rcnn_nl_R50.yaml")
