#!/usr/bin/env python
"""
Table 5 of the paper from your own runs: box and mask AP of baseline and non-local Mask R-CNN, the
deltas, and the paper's numbers for the same backbone, as a Markdown table.

    tools/compare_results.py --pair output/mask_rcnn_R50 output/mask_rcnn_nl_R50 \
                             --pair output/mask_rcnn_R101 output/mask_rcnn_nl_R101

Table 6 (Keypoint R-CNN, keypoint AP) from the baseline, +4 NL head and +4 head +1 backbone runs, in that order:

    tools/compare_results.py --table6 output/keypoint_rcnn_R101 output/keypoint_rcnn_nl_head_R101 \
                             output/keypoint_rcnn_nl_R101

Each directory is a run's OUTPUT_DIR (tools/train_net.py or tools/lazyconfig_train_net.py). Its COCOEvaluator
results are read from metrics.json (the last evaluation during training), or, for --eval-only runs, from
the "copypaste" lines detectron2 writes to log.txt. The backbone (R50, R101, X152, ...) is read from the
run's config.yaml, or given with --backbones.
"""
import argparse
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional

import yaml

METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75")]
HEADERS = ["backbone", "model", "source", "AP box", "AP50 box", "AP75 box", "AP mask", "AP50 mask", "AP75 mask"]
# The paper's Table 5 (Mask R-CNN, COCO val2017): backbone -> (baseline, +1 NL), in METRICS order.
PAPER_TABLE5 = {
    "R50": ((38.0, 59.6, 41.0, 34.6, 56.4, 36.5), (39.0, 61.1, 41.9, 35.5, 58.0, 37.4)),
    "R101": ((39.5, 61.4, 42.9, 36.0, 58.1, 38.3), (40.8, 63.1, 44.5, 37.1, 59.9, 39.2)),
    "X152": ((44.1, 66.4, 48.4, 39.7, 63.2, 42.2), (45.0, 67.8, 48.9, 40.3, 64.4, 42.8)),
}


def read_results(output_dir: str) -> Dict[str, float]:
    """{"bbox/AP": ..., "segm/AP75": ...} of the run's last COCO evaluation, in percent."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"output directory {output_dir!r} does not exist")
    metrics_path = os.path.join(output_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            evaluations = [r for r in map(json.loads, filter(str.strip, f)) if "bbox/AP" in r]
        if evaluations:
            return {k: v for k, v in evaluations[-1].items() if "/" in k}
    log_path = os.path.join(output_dir, "log.txt")
    results = _read_copypaste(log_path) if os.path.isfile(log_path) else {}
    if "bbox/AP" in results:
        return results
    raise FileNotFoundError(
        f"{output_dir!r} holds no COCO evaluation: neither metrics.json nor log.txt has a bbox AP "
        f"(evaluate the run with TEST.EVAL_PERIOD, at the end of training, or with --eval-only)"
    )


def _read_copypaste(log_path: str) -> Dict[str, float]:
    """The last results of each task that detectron2's print_csv_format logged ("copypaste: ...")."""
    lines = [m.group(1) for m in re.finditer(r"copypaste: (.*)", open(log_path).read())]
    results = {}
    for i, line in enumerate(lines[:-2]):
        task = re.fullmatch(r"Task: (\S+)", line)
        if task:
            names, values = lines[i + 1].split(","), lines[i + 2].split(",")
            results.update({f"{task.group(1)}/{n}": float(v) for n, v in zip(names, values)})
    return results


class _ConfigDumpLoader(yaml.SafeLoader):
    """Safe YAML loading that reads LazyConfig dumps' python/object tags (e.g. ShapeSpec) as None."""


_ConfigDumpLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def backbone_of(output_dir: str) -> Optional[str]:
    """"R50", "X152", ... from the run's config.yaml (a YAML or LazyConfig dump), or None if it cannot tell."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = yaml.load(f, Loader=_ConfigDumpLoader) or {}
    if "MODEL" in cfg:
        resnet = cfg["MODEL"].get("RESNETS") or {}
        depth, groups = resnet.get("DEPTH"), resnet.get("NUM_GROUPS", 1)
    else:  # LazyConfig: the ResNet's L(ResNet.make_default_stages)(depth=..., num_groups=...)
        stages = _find_node(cfg.get("model"), lambda n: str(n.get("_target_", "")).endswith("make_default_stages"))
        depth, groups = (stages or {}).get("depth"), (stages or {}).get("num_groups", 1)
    if not isinstance(depth, int):
        return None
    return f"{'X' if groups > 1 else 'R'}{depth}"


def _find_node(node, predicate):
    if isinstance(node, dict):
        if predicate(node):
            return node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = _find_node(child, predicate)
            if found is not None:
                return found
    return None


def _row(values) -> List[str]:
    return [f"{v:.1f}" if v is not None and not math.isnan(v) else "—" for v in values]


def _delta(a, b) -> List[str]:
    return [f"{y - x:+.1f}" if not (math.isnan(x) or math.isnan(y)) else "—" for x, y in zip(a, b)]


def _paper_rows(backbone) -> List[List[str]]:
    """The paper's baseline, +1 NL and delta rows of Table 5 for ``backbone`` (one of PAPER_TABLE5)."""
    baseline, nonlocal_ = PAPER_TABLE5[backbone]
    return [
        [backbone, "baseline", "paper"] + _row(baseline),
        [backbone, "+1 NL", "paper"] + _row(nonlocal_),
        [backbone, "delta", "paper"] + _delta(baseline, nonlocal_),
    ]


def table5(pairs, backbones=None) -> str:
    """Markdown: per pair, your baseline, +1 NL and delta rows, then the paper's for that backbone."""
    if backbones and len(backbones) != len(pairs):
        raise ValueError(f"--backbones: {len(backbones)} names for {len(pairs)} --pair s; give one per pair")
    rows = [HEADERS, ["---"] * 2 + [":---"] + ["---:"] * 6]
    for i, (baseline_dir, nonlocal_dir) in enumerate(pairs):
        ours = []
        for d in (baseline_dir, nonlocal_dir):
            results = read_results(d)
            ours.append([results.get(f"{task}/{metric}", float("nan")) for task, metric in METRICS])
        backbone = backbones[i] if backbones else (backbone_of(nonlocal_dir) or backbone_of(baseline_dir) or "?")
        rows += [
            [backbone, "baseline", "this run"] + _row(ours[0]),
            [backbone, "+1 NL", "this run"] + _row(ours[1]),
            [backbone, "delta", "this run"] + _delta(*ours),
        ]
        if backbone in PAPER_TABLE5:
            rows += _paper_rows(backbone)
        else:
            rows.append([backbone, "—", f"paper: no {backbone} row (it has {', '.join(PAPER_TABLE5)})"] + ["—"] * 6)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# Table 6 (Keypoint R-CNN R101-FPN, COCO val2017): keypoint AP, AP50, AP75 of each row.
TABLE6_METRICS = [("keypoints", "AP"), ("keypoints", "AP50"), ("keypoints", "AP75")]
TABLE6_HEADERS = ["model", "source", "AP kp", "AP50 kp", "AP75 kp"]
TABLE6_MODELS = ["baseline", "+4 NL in head", "+4 NL in head, +1 in backbone"]
PAPER_TABLE6 = ((65.1, 86.8, 70.4), (66.0, 87.1, 71.7), (66.5, 87.3, 72.8))


def table6(run_dirs) -> str:
    """
    Markdown, Table 6's layout: the keypoint AP of your baseline, +4 NL (head) and, if given, +4 head +1
    backbone runs, each non-local row followed by its delta to the baseline; then the paper's rows.

    Args:
        run_dirs: output directories in the paper's row order: baseline, +4 NL in the head, and optionally
            +4 in the head and +1 in the backbone (e.g. of configs/keypoint_rcnn_R101.yaml,
            keypoint_rcnn_nl_head_R101.yaml, keypoint_rcnn_nl_R101.yaml).
    """
    if not 2 <= len(run_dirs) <= 3:
        raise ValueError(
            f"--table6: {len(run_dirs)} directories; give 2 or 3, in the paper's order: "
            + ", ".join(TABLE6_MODELS)
        )
    ours = []
    for d in run_dirs:
        results = read_results(d)
        if "keypoints/AP" not in results:
            raise ValueError(f"--table6: {d!r} has no keypoint AP (keypoints/AP): is it a Keypoint R-CNN run?")
        ours.append([results.get(f"{task}/{metric}", float("nan")) for task, metric in TABLE6_METRICS])
    rows = [TABLE6_HEADERS, ["---", ":---"] + ["---:"] * 3]
    for source, values in (("this run", ours), ("paper", PAPER_TABLE6)):
        for i, (model, row) in enumerate(zip(TABLE6_MODELS, values)):
            rows.append([model, source] + _row(row))
            if i:
                rows.append(["delta", source] + _delta(values[0], row))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def get_table6_parser():
    parser = argparse.ArgumentParser(
        description="Table 6 of the paper from your own runs: keypoint AP, AP50, AP75 of Keypoint R-CNN runs, "
        "the deltas to the baseline, and the paper's rows (R101-FPN), as a Markdown table."
    )
    parser.add_argument(
        "--table6", nargs="+", required=True, metavar="DIR",
        help="output directories of the baseline, +4 NL in head and (optionally) +4 head +1 backbone runs",
    )
    parser.add_argument("--output", default="", help="also write the table to this Markdown file")
    return parser


def main_table6(argv=None) -> str:
    args = get_table6_parser().parse_args(argv)
    table = table6(args.table6)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    return table


def seed_statistics(values: List[float]):
    """(mean, sample standard deviation): the std is nan for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _seed_values(model_results, seeds) -> Dict[int, List[float]]:
    """{seed: [METRICS values]} of one model of a benchmarks/gain.py result."""
    runs = {run["seed"]: run for run in model_results["runs"]}
    if sorted(runs) != sorted(seeds):
        raise ValueError(f"the result's runs have seeds {sorted(runs)}, its seed list is {sorted(seeds)}")
    value = lambda run, task, metric: float("nan") if run[task].get(metric) is None else run[task][metric]  # noqa: E731
    return {s: [value(runs[s], task, metric) for task, metric in METRICS] for s in seeds}


def _mean_std_row(per_seed: List[List[float]], signed: bool = False) -> List[str]:
    cells = []
    for column in zip(*per_seed):
        mean, std = seed_statistics(list(column))
        if math.isnan(mean):  # some seed has no value
            cells.append("—")
            continue
        text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
        cells.append(text + (f" ± {std:.1f}" if not math.isnan(std) else ""))
    return cells


def seed_table5(comparisons) -> str:
    """
    Markdown, in the Table 5 layout, of benchmarks/gain.py results: for each (backbone, result) of
    ``comparisons``, the baseline's, the non-local model's and their difference's mean ± sample standard
    deviation over the seeds and every seed's value (the difference per seed: the two models trained
    with the same seed), then the paper's rows for that backbone where it has them.

    Args:
        comparisons: [(backbone name, result)], each result a dict with "baseline" and "nonlocal", each
            {"seeds": [...], "runs": [{"seed": s, "bbox": {"AP": ...}, "segm": {...}}, ...]}.
    """
    rows = [HEADERS[:2] + ["seeds"] + HEADERS[3:], ["---"] * 2 + [":---"] + ["---:"] * 6]
    for backbone, result in comparisons:
        seeds = list(result["baseline"]["seeds"])
        if list(result["nonlocal"]["seeds"]) != seeds:
            raise ValueError(
                f"{backbone}: baseline seeds {seeds} and non-local seeds {result['nonlocal']['seeds']} differ; "
                "the difference is taken seed by seed"
            )
        baseline = _seed_values(result["baseline"], seeds)
        nonlocal_ = _seed_values(result["nonlocal"], seeds)
        delta = {s: [y - x for x, y in zip(baseline[s], nonlocal_[s])] for s in seeds}
        stats = f"mean ± std ({len(seeds)} seeds)"
        for name, values, signed in (("baseline", baseline, False), ("+1 NL", nonlocal_, False), ("delta", delta, True)):
            rows.append([backbone, name, stats] + _mean_std_row([values[s] for s in seeds], signed))
            for s in seeds:
                cells = [f"{v:+.1f}" if not math.isnan(v) else "—" for v in values[s]] if signed else _row(values[s])
                rows.append([backbone, name, f"seed {s}"] + cells)
        if backbone in PAPER_TABLE5:
            rows += _paper_rows(backbone)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pair", nargs=2, action="append", required=True, metavar=("BASELINE_DIR", "NONLOCAL_DIR"),
        help="output directories of a baseline run and its non-local run (repeat for more backbones)",
    )
    parser.add_argument("--backbones", nargs="+", help="backbone names, one per --pair (default: from config.yaml)")
    parser.add_argument("--output", default="", help="also write the table to this Markdown file")
    return parser


def main(argv=None) -> str:
    if "--table6" in (sys.argv[1:] if argv is None else argv):
        return main_table6(argv)
    args = get_parser().parse_args(argv)
    table = table5(args.pair, args.backbones)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
