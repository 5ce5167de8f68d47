"""
tools/compare_results.py on results written the way detectron2 writes them (metrics.json, log.txt), and on
two real tools/train_net.py runs, which also leave TensorBoard events behind.
"""
import glob
import importlib.util
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.evaluation import print_csv_format
from detectron2.utils.events import EventStorage, JSONWriter
from detectron2.utils.logger import setup_logger

from nl_detectron import add_nonlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load("compare_results")


def _results(box, mask):
    return {"bbox": dict(zip(METRICS, box)), "segm": dict(zip(METRICS, mask))}


def _write_config(output_dir, config):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())


def _write_training_run(output_dir, config, evaluations):
    """metrics.json as DefaultTrainer writes it: training scalars, and an evaluation's results per eval."""
    os.makedirs(output_dir)
    _write_config(output_dir, config)
    writer = JSONWriter(os.path.join(output_dir, "metrics.json"))
    with EventStorage(0) as storage:
        for iteration, results in evaluations:
            storage.iter = iteration
            storage.put_scalar("total_loss", 1.0 / (iteration + 1))
            flat = {f"{task}/{k}": v for task, res in results.items() for k, v in res.items()}
            storage.put_scalars(**flat, smoothing_hint=False)
            writer.write()
    writer.close()


def _write_eval_only_run(output_dir, config, results):
    """An --eval-only run leaves only log.txt, with detectron2's "copypaste" lines."""
    os.makedirs(output_dir)
    _write_config(output_dir, config)
    logger = setup_logger(os.path.join(output_dir, "log.txt"), name="detectron2.evaluation.testing")
    print_csv_format(results)
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _parse(table):
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_table5_layout_with_deltas_and_the_papers_numbers(tmp_path):
    baseline, nonlocal_ = str(tmp_path / "mask_rcnn_R50"), str(tmp_path / "mask_rcnn_nl_R50")
    # An early and the final evaluation: the final one counts.
    _write_training_run(baseline, "mask_rcnn_R50.yaml", [
        (999, _results([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])),
        (1999, _results([37.84, 59.2, 40.95, 20, 40, 50], [34.5, 56.0, 36.51, 15, 37, 52])),
    ])
    _write_eval_only_run(nonlocal_, "mask_rcnn_nl_R50.yaml", _results([38.91, 60.8, 41.7, 21, 41, 51], [35.36, 57.74, 37.3, 16, 38, 53]))
    out = tmp_path / "table5.md"
    table = tool.main(["--pair", baseline, nonlocal_, "--output", str(out)])
    assert out.read_text().strip() == table

    rows = _parse(table)
    assert list(rows[0]) == ["backbone", "model", "source", "AP box", "AP50 box", "AP75 box", "AP mask", "AP50 mask", "AP75 mask"]
    values = lambda row: [row[k] for k in list(row)[3:]]  # noqa: E731
    assert [(r["backbone"], r["model"], r["source"]) for r in rows] == [
        ("R50", "baseline", "this run"), ("R50", "+1 NL", "this run"), ("R50", "delta", "this run"),
        ("R50", "baseline", "paper"), ("R50", "+1 NL", "paper"), ("R50", "delta", "paper"),
    ]
    assert values(rows[0]) == ["37.8", "59.2", "41.0", "34.5", "56.0", "36.5"]
    assert values(rows[1]) == ["38.9", "60.8", "41.7", "35.4", "57.7", "37.3"]
    # Deltas of the unrounded results (38.91 - 37.84 = 1.07), as the paper's are of its numbers.
    assert values(rows[2]) == ["+1.1", "+1.6", "+0.8", "+0.9", "+1.7", "+0.8"]
    assert values(rows[3]) == ["38.0", "59.6", "41.0", "34.6", "56.4", "36.5"]
    assert values(rows[4]) == ["39.0", "61.1", "41.9", "35.5", "58.0", "37.4"]
    assert values(rows[5]) == ["+1.0", "+1.5", "+0.9", "+0.9", "+1.6", "+0.9"]


def test_a_backbone_the_paper_does_not_have_and_a_run_without_results(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        _write_training_run(d, "mask_rcnn_R50.yaml", [(9, _results([10] * 6, [5] * 6))])
    rows = _parse(tool.main(["--pair", a, b, "--backbones", "R18"]))
    assert [r["source"] for r in rows] == ["this run"] * 3 + ["paper: no R18 row (it has R50, R101, X152)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no COCO evaluation"):
        tool.main(["--pair", a, str(empty)])


def test_reads_what_train_net_writes_and_train_net_writes_tensorboard_events(tmp_path, two_val_images):
    train_net = _load("train_net")
    run = str(tmp_path / "nonlocal")
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(REPO, "configs", "quick", "tiny_mask_rcnn_nl_R18.yaml"),
        "OUTPUT_DIR", run, "DATASETS.TEST", f"('{two_val_images}',)",
        "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.BASE_LR", "0.0001",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    ])
    train_net.main(args)

    # TensorBoard events with the training losses and the final evaluation, next to metrics.json.
    (events,) = glob.glob(os.path.join(run, "events.out.tfevents.*"))
    scalars = EventAccumulator(events).Reload().Tags()["scalars"]
    assert {"total_loss", "lr", "bbox/AP", "segm/AP"} <= set(scalars), scalars
    with open(os.path.join(run, "metrics.json")) as f:
        final = json.loads(f.read().splitlines()[-1])  # the evaluation after the last iteration
    assert final["iteration"] == 2

    baseline = str(tmp_path / "baseline")
    _write_training_run(baseline, "quick/tiny_mask_rcnn_nl_R18.yaml", [(1, _results([0.5] * 6, [0.25] * 6))])
    rows = _parse(tool.main(["--pair", baseline, run]))
    assert [(r["backbone"], r["model"]) for r in rows[:3]] == [("R18", "baseline"), ("R18", "+1 NL"), ("R18", "delta")]
    assert rows[1]["AP box"] == f"{final['bbox/AP']:.1f}" and rows[1]["AP mask"] == f"{final['segm/AP']:.1f}"
    assert rows[2]["AP box"] == f"{final['bbox/AP'] - 0.5:+.1f}"


def _gain_result(baseline, nonlocal_, seeds):
    """A benchmarks/gain.py result: per model, per seed, box then mask (AP, AP50, AP75)."""
    def model(values):
        runs = [
            {"seed": s, "bbox": dict(zip(["AP", "AP50", "AP75"], v[:3])), "segm": dict(zip(["AP", "AP50", "AP75"], v[3:]))}
            for s, v in zip(seeds, values)
        ]
        return {"seeds": list(seeds), "runs": runs}
    return {"baseline": model(baseline), "nonlocal": model(nonlocal_)}


def test_seed_table5_has_mean_std_every_seed_and_the_seedwise_difference():
    baseline = [[10, 20, 30, 40, 50, 60], [12, 22, 33, 42, 52, None], [14, 24, 36, 44, 54, 66]]
    nonlocal_ = [[11, 25, 30, 41, 55, 61], [16, 22, 30, 43, 53, 63], [15, 25, 36, 48, 54, 66]]
    table = tool.seed_table5([("R50", _gain_result(baseline, nonlocal_, [7, 8, 9]))])
    rows = _parse(table)
    assert list(rows[0])[:3] == ["backbone", "model", "seeds"]
    labels = [(r["model"], r["seeds"]) for r in rows]
    assert labels == [
        ("baseline", "mean ± std (3 seeds)"), ("baseline", "seed 7"), ("baseline", "seed 8"), ("baseline", "seed 9"),
        ("+1 NL", "mean ± std (3 seeds)"), ("+1 NL", "seed 7"), ("+1 NL", "seed 8"), ("+1 NL", "seed 9"),
        ("delta", "mean ± std (3 seeds)"), ("delta", "seed 7"), ("delta", "seed 8"), ("delta", "seed 9"),
        ("baseline", "paper"), ("+1 NL", "paper"), ("delta", "paper"),
    ]
    # Box AP: baseline 10, 12, 14 (mean 12, sample std 2); non-local 11, 16, 15; per-seed deltas 1, 4, 1.
    assert rows[0]["AP box"] == "12.0 ± 2.0" and rows[2]["AP box"] == "12.0"
    assert rows[4]["AP box"] == "14.0 ± 2.6"  # std of 11, 16, 15: sqrt(7) = 2.65
    assert [rows[i]["AP box"] for i in (8, 9, 10, 11)] == ["+2.0 ± 1.7", "+1.0", "+4.0", "+1.0"]
    assert rows[8]["AP50 box"] == "+2.0 ± 2.6"  # deltas 5, 0, 1
    # A metric COCOeval left undefined (None in the JSON) shows as missing, and so do its mean and delta.
    assert [rows[i]["AP75 mask"] for i in (0, 2, 8, 10)] == ["—"] * 4
    assert rows[4]["AP75 mask"] == "63.3 ± 2.5" and rows[11]["AP75 mask"] == "+0.0"
    assert rows[12]["AP box"] == "38.0" and rows[14]["AP box"] == "+1.0"


def test_seed_table5_refuses_runs_of_different_seeds():
    result = _gain_result([[1] * 6], [[2] * 6], [1])
    result["nonlocal"]["seeds"] = [2]
    with pytest.raises(ValueError, match=r"baseline seeds \[1\] and non-local seeds \[2\] differ"):
        tool.seed_table5([("R18", result)])
