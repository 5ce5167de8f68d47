"""tools/compare_results.py --table6: Table 6's layout (keypoint AP, AP50, AP75, deltas, the paper's rows)
from Keypoint R-CNN runs' output directories, as detectron2 writes them (metrics.json, log.txt)."""
import pytest

from test_compare_results import _parse, _write_eval_only_run, _write_training_run, tool

METRICS = ["AP", "AP50", "AP75", "APm", "APl"]


def _results(box_ap, keypoints):
    return {"bbox": {"AP": box_ap, "AP50": 80.0, "AP75": 60.0}, "keypoints": dict(zip(METRICS, keypoints))}


def test_table6_layout_with_deltas_and_the_papers_rows(tmp_path):
    baseline, head, full = (str(tmp_path / n) for n in ("kp_R101", "kp_nl_head_R101", "kp_nl_R101"))
    # An early and the final evaluation: the final one counts.
    _write_training_run(baseline, "keypoint_rcnn_R101.yaml", [
        (999, _results(1.0, [1, 2, 3, 4, 5])), (1999, _results(55.0, [64.94, 86.6, 70.51, 60, 70])),
    ])
    _write_training_run(head, "keypoint_rcnn_nl_head_R101.yaml", [(1999, _results(55.1, [66.03, 87.2, 71.58, 61, 71]))])
    _write_eval_only_run(full, "keypoint_rcnn_nl_R101.yaml", _results(55.4, [66.4, 87.26, 72.9, 62, 72]))
    out = tmp_path / "table6.md"
    table = tool.main(["--table6", baseline, head, full, "--output", str(out)])
    assert out.read_text().strip() == table

    rows = _parse(table)
    assert list(rows[0]) == ["model", "source", "AP kp", "AP50 kp", "AP75 kp"]
    values = lambda row: [row[k] for k in list(row)[2:]]  # noqa: E731
    assert [(r["model"], r["source"]) for r in rows] == [
        ("baseline", "this run"), ("+4 NL in head", "this run"), ("delta", "this run"),
        ("+4 NL in head, +1 in backbone", "this run"), ("delta", "this run"),
        ("baseline", "paper"), ("+4 NL in head", "paper"), ("delta", "paper"),
        ("+4 NL in head, +1 in backbone", "paper"), ("delta", "paper"),
    ]
    assert values(rows[0]) == ["64.9", "86.6", "70.5"]
    assert values(rows[1]) == ["66.0", "87.2", "71.6"]
    # Deltas of the unrounded results to the baseline (66.03 - 64.94 = 1.09).
    assert values(rows[2]) == ["+1.1", "+0.6", "+1.1"]
    assert values(rows[3]) == ["66.4", "87.3", "72.9"]
    assert values(rows[4]) == ["+1.5", "+0.7", "+2.4"]
    assert values(rows[5]) == ["65.1", "86.8", "70.4"]
    assert values(rows[6]) == ["66.0", "87.1", "71.7"]
    assert values(rows[7]) == ["+0.9", "+0.3", "+1.3"]
    assert values(rows[8]) == ["66.5", "87.3", "72.8"]
    assert values(rows[9]) == ["+1.4", "+0.5", "+2.4"]


def test_table6_with_two_runs_and_bad_input(tmp_path):
    baseline, head = str(tmp_path / "a"), str(tmp_path / "b")
    _write_training_run(baseline, "keypoint_rcnn_R101.yaml", [(9, _results(5.0, [10] * 5))])
    _write_training_run(head, "keypoint_rcnn_nl_head_R101.yaml", [(9, _results(5.0, [12] * 5))])
    rows = _parse(tool.main(["--table6", baseline, head]))
    assert [r["source"] for r in rows] == ["this run"] * 3 + ["paper"] * 5
    assert rows[2]["AP kp"] == "+2.0"
    with pytest.raises(ValueError, match=r"--table6: 1 directories; give 2 or 3.*baseline, \+4 NL in head"):
        tool.main(["--table6", baseline])
    mask_run = str(tmp_path / "mask")
    _write_training_run(mask_run, "mask_rcnn_R50.yaml", [(9, {"bbox": {"AP": 1.0}, "segm": {"AP": 1.0}})])
    with pytest.raises(ValueError, match=r"has no keypoint AP"):
        tool.main(["--table6", baseline, mask_run])
    # Table 5's command line is unchanged.
    assert _parse(tool.main(["--pair", mask_run, mask_run, "--backbones", "R50"]))[0]["model"] == "baseline"
