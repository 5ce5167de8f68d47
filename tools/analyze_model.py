#!/usr/bin/env python
"""
Parameters, FLOPs, activations and structure of any config of this repo (YAML or LazyConfig), as
detectron2's tools/analyze_model.py reports them, with the non-local blocks' fused attention
(aten::scaled_dot_product_attention) counted; and a side-by-side of a non-local config and its baseline.

    tools/analyze_model.py --config-file configs/mask_rcnn_nl_R50.yaml --tasks parameter flop \
        --dataset nl_shapes_val -n 5
    tools/analyze_model.py --config-file configs/mask_rcnn_nl_R50.yaml --compare --dataset nl_shapes_val

FLOPs and activations depend on the input (its size after the config's test resizing, and the number of
detections the heads see): they are averaged over the first -n images of --dataset (default: the
config's first test dataset). Convention (fvcore's): one multiply-add is one flop. The baseline of
--compare is the same config with the non-local blocks left out (or --baseline-config); it runs with
the non-local model's weights but the blocks', so that both see the same detections.
"""
import argparse
import copy
import logging
import os
import sys

import numpy as np
import torch
from fvcore.nn import flop_count_table
from fvcore.nn.jit_handles import generic_activation_jit
from omegaconf import OmegaConf
from tabulate import tabulate

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.utils.analysis import activation_count_operators, parameter_count, parameter_count_table
from detectron2.utils.logger import setup_logger

from nl_detectron import add_nonlocal_blocks, nonlocal_blocks
from nl_detectron.checkpoint import SafeCheckpointer
from nl_detectron.config_files import build_model, evaluation_dataset_names, inference_mapper, is_lazy, load_config
from nl_detectron.data import ensure_builtin_dataset
from nl_detectron.flop_count import flop_count_analysis

logger = logging.getLogger("nl_detectron.analyze_model")

TASKS = ("parameter", "flop", "activation", "structure")
# The detectron2 backbone each non-local one extends.
BASELINE_BACKBONES = {
    "build_resnet_fpn_nl_backbone": "build_resnet_fpn_backbone",
    "build_resnet_nl_backbone": "build_resnet_backbone",
    "build_retinanet_resnet_fpn_nl_backbone": "build_retinanet_resnet_fpn_backbone",
}
# The detectron2 keypoint head the non-local one extends (nl_detectron/keypoint_head.py).
BASELINE_KEYPOINT_HEADS = {"KRCNNConvDeconvUpsampleNLHead": "KRCNNConvDeconvUpsampleHead"}
# fvcore has no activation handle for the fused attention: its output is the activation, as for matmul.
ACTIVATION_HANDLES = {
    "aten::scaled_dot_product_attention": generic_activation_jit("aten::scaled_dot_product_attention")
}


def baseline_config(cfg):
    """``cfg`` without its non-local blocks: the detectron2 backbone and keypoint head it extends, all else equal."""
    cfg = copy.deepcopy(cfg)
    if not is_lazy(cfg):
        name, head = cfg.MODEL.BACKBONE.NAME, cfg.MODEL.ROI_KEYPOINT_HEAD.NAME
        nonlocal_head = cfg.MODEL.KEYPOINT_ON and head in BASELINE_KEYPOINT_HEADS
        if name not in BASELINE_BACKBONES and not nonlocal_head:
            raise ValueError(
                f"MODEL.BACKBONE.NAME={name!r} is not a non-local backbone (nor is there a non-local keypoint "
                f"head), so the config has no baseline to derive; valid choices: {', '.join(BASELINE_BACKBONES)}, "
                f"or MODEL.ROI_KEYPOINT_HEAD.NAME {', '.join(BASELINE_KEYPOINT_HEADS)} (or pass --baseline-config)"
            )
        cfg.defrost()
        cfg.MODEL.BACKBONE.NAME = BASELINE_BACKBONES.get(name, name)
        cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = BASELINE_KEYPOINT_HEADS.get(head, head)
        return cfg
    OmegaConf.resolve(cfg)  # e.g. FPN's in_features="${.bottom_up.resnet.out_features}" outlives the wrapper
    if not _drop_add_nonlocal_blocks(cfg.model):
        raise ValueError("the LazyConfig's model has no L(add_nonlocal_blocks)(...) node, so no baseline to derive")
    return cfg


def _drop_add_nonlocal_blocks(node) -> bool:
    """Replace every ``L(add_nonlocal_blocks)(resnet=R, ...)`` under ``node`` by ``R``; whether any was found."""
    found = False
    if OmegaConf.is_dict(node):
        for key in list(node.keys()):
            child = node[key]
            if OmegaConf.is_dict(child) and child.get("_target_") in (add_nonlocal_blocks, _qualname(add_nonlocal_blocks)):
                node[key] = child.resnet
                found = True
            else:
                found |= _drop_add_nonlocal_blocks(child)
    elif OmegaConf.is_list(node):
        for child in node:
            found |= _drop_add_nonlocal_blocks(child)
    return found


def _qualname(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def model_inputs(cfg, dataset: str, num_inputs: int):
    """The first ``num_inputs`` images of ``dataset`` as the config's test mapper makes them, one per batch."""
    if dataset not in DatasetCatalog.list():
        raise KeyError(
            f"--dataset {dataset!r} is not registered; valid choices: {', '.join(sorted(DatasetCatalog.list()))}"
        )
    ensure_builtin_dataset(dataset)
    for attr in ("json_file", "image_root"):
        path = getattr(MetadataCatalog.get(dataset), attr, None)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(
                f"--dataset {dataset!r}: its {attr} {path!r} does not exist; set $DETECTRON2_DATASETS, or "
                f"pass e.g. --dataset nl_shapes_val (the built-in dataset)"
            )
    dicts = get_detection_dataset_dicts(dataset, filter_empty=False)[:num_inputs]
    loader = build_detection_test_loader(dicts, mapper=inference_mapper(cfg), num_workers=0)
    return list(loader)


def load_model(cfg, weights: str = ""):
    model = build_model(cfg)
    if weights:
        SafeCheckpointer(model).load(weights)
    model.eval()
    return model


def count_parameters(model) -> dict:
    counts = parameter_count(model)
    blocks = nonlocal_blocks(model)
    return dict(total=counts[""], nonlocal_blocks=sum(counts[name] for name in blocks), table=parameter_count_table(model, max_depth=5))


def count_flops(model, inputs) -> dict:
    """Mean and std of the total, and of the backbone, the keypoint head and the non-local blocks, over
    ``inputs``; per-op mean."""
    blocks = list(nonlocal_blocks(model))
    totals, backbone, keypoint_head, nonlocal_, by_operator = [], [], [], [], {}
    analysis = None
    for i, batch in enumerate(inputs):
        analysis = flop_count_analysis(model, batch)
        if i > 0:
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = analysis.by_module()
        # detectron2 traces through a wrapper whose child is the model: module names start with "model.".
        totals.append(analysis.total())
        backbone.append(by_module.get("model.backbone", 0))
        keypoint_head.append(by_module.get("model.roi_heads.keypoint_head", 0))
        nonlocal_.append(sum(by_module.get(f"model.{name}", 0) for name in blocks))
        for op, count in analysis.by_operator().items():
            by_operator[op] = by_operator.get(op, 0) + count / len(inputs)
    return dict(
        total=float(np.mean(totals)), total_std=float(np.std(totals)), backbone=float(np.mean(backbone)),
        keypoint_head=float(np.mean(keypoint_head)), nonlocal_blocks=float(np.mean(nonlocal_)), by_operator=by_operator,
        table=flop_count_table(analysis, max_depth=4) if analysis is not None else "",
    )


def count_activations(model, inputs) -> dict:
    totals = [sum(activation_count_operators(model, batch, supported_ops=ACTIVATION_HANDLES).values()) for batch in inputs]
    return dict(total=float(np.mean(totals)) * 1e6, total_std=float(np.std(totals)) * 1e6)  # fvcore counts in millions


def compare(cfg, baseline_cfg, inputs, weights: str = "") -> dict:
    """Parameters, FLOPs and activations of the non-local model and its baseline, on the same inputs."""
    model = load_model(cfg, weights)
    baseline = build_model(baseline_cfg)
    block_names = tuple(nonlocal_blocks(model))
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(n + "." for n in block_names))}
    incompatible = baseline.load_state_dict(shared, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(
            "the baseline and the non-local model differ beyond the non-local blocks: missing "
            f"{incompatible.missing_keys[:5]}, unexpected {incompatible.unexpected_keys[:5]}"
        )
    baseline.eval()
    rows = {}
    for name, m in (("baseline", baseline), ("non-local", model)):
        params, flops, acts = count_parameters(m), count_flops(m, inputs), count_activations(m, inputs)
        rows[name] = {
            "parameters (M)": params["total"] / 1e6,
            "GFLOPs, whole model": flops["total"] / 1e9,
            "GFLOPs, backbone": flops["backbone"] / 1e9,
            "GFLOPs, non-local blocks": flops["nonlocal_blocks"] / 1e9,
            "activations (M)": acts["total"] / 1e6,
        }
        if hasattr(getattr(m, "roi_heads", None), "keypoint_head"):  # Keypoint R-CNN: the head's share (Table 6)
            rows[name]["GFLOPs, keypoint head"] = flops["keypoint_head"] / 1e9
    return rows


def comparison_table(rows) -> str:
    base, nl = rows["baseline"], rows["non-local"]
    table = []
    for key in base:
        delta = nl[key] - base[key]
        percent = f"{100 * delta / base[key]:+.2f}%" if base[key] else "n/a"
        table.append([key, f"{base[key]:.3f}", f"{nl[key]:.3f}", f"{delta:+.3f}", percent])
    return tabulate(table, headers=["", "baseline", "non-local", "delta", "delta %"], tablefmt="pipe")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a .yaml or LazyConfig .py config")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=[], help="what to report")
    parser.add_argument("--compare", action="store_true", help="side-by-side with the baseline")
    parser.add_argument("--baseline-config", default="", help="baseline for --compare; default: derived")
    parser.add_argument("-n", "--num-inputs", type=int, default=10, help="images for flops/activations")
    parser.add_argument("--dataset", default="", help="images for flops/activations; default: the config's test set")
    parser.add_argument("--weights", default="", help="checkpoint to load; default: none, random init")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides, last: KEY VALUE pairs (YAML) or key=value (LazyConfig); right after --tasks, "
        "separate them with --",
    )
    return parser


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="nl_detectron")
    if not args.tasks and not args.compare:
        raise ValueError(f"nothing to do: give --tasks (valid choices: {', '.join(TASKS)}) and/or --compare")
    if args.num_inputs < 1:
        raise ValueError(f"--num-inputs {args.num_inputs}: must be a positive integer")
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    cfg = load_config(args.config_file, opts)
    if args.compare:  # before any work: a config without non-local blocks fails now
        baseline_cfg = load_config(args.baseline_config, opts) if args.baseline_config else baseline_config(cfg)
    results = {}
    needs_inputs = args.compare or {"flop", "activation"} & set(args.tasks)
    inputs = None
    if needs_inputs:
        dataset = args.dataset or (evaluation_dataset_names(cfg) or [""])[0]
        inputs = model_inputs(cfg, dataset, args.num_inputs)
        sizes = sorted({tuple(batch[0]["image"].shape[-2:]) for batch in inputs})
        logger.info(f"{len(inputs)} inputs from {dataset}, sizes (H, W) after the test resizing: {sizes}")
    if args.tasks:
        model = load_model(cfg, args.weights)
    if "parameter" in args.tasks:
        results["parameter"] = count_parameters(model)
        logger.info("Parameter count:\n" + results["parameter"]["table"])
    if "flop" in args.tasks:
        results["flop"] = flops = count_flops(model, inputs)
        logger.info("Flops table of the last input:\n" + flops["table"])
        logger.info("Average GFlops per operator: " + str({k: round(v / 1e9, 4) for k, v in flops["by_operator"].items()}))
        logger.info(
            f"Total GFlops: {flops['total'] / 1e9:.3f}±{flops['total_std'] / 1e9:.3f}; backbone "
            f"{flops['backbone'] / 1e9:.3f}; keypoint head {flops['keypoint_head'] / 1e9:.3f}; non-local blocks "
            f"{flops['nonlocal_blocks'] / 1e9:.3f}"
        )
    if "activation" in args.tasks:
        results["activation"] = acts = count_activations(model, inputs)
        logger.info(f"Total activations (M): {acts['total'] / 1e6:.3f}±{acts['total_std'] / 1e6:.3f}")
    if "structure" in args.tasks:
        results["structure"] = str(model)
        logger.info("Model structure:\n" + results["structure"])
    if args.compare:
        results["compare"] = rows = compare(cfg, baseline_cfg, inputs, args.weights)
        results["compare_table"] = comparison_table(rows)
        print(f"\n{os.path.basename(args.config_file)} vs its baseline, mean over {len(inputs)} inputs:\n")
        print(results["compare_table"])
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
