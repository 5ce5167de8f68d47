"""
What Table 6's 4 non-local blocks cost in the keypoint head: the head of configs/keypoint_rcnn_nl_head_R101.yaml
(KRCNNConvDeconvUpsampleNLHead: 8 convolutions of 512 channels, a block after conv_fcn2, 4, 6, 8) against
detectron2's KRCNNConvDeconvUpsampleHead of configs/keypoint_rcnn_R101.yaml, with the same weights, on
the same RoI features. Measures FLOPs, parameters, inference time, training-step time and peak memory of
both heads, and prints the ratios non-local / baseline measured in one run (a table, and --json).

    python benchmarks/keypoint_head_overhead.py                  # 100 RoIs: detectron2's test-time count
    python benchmarks/keypoint_head_overhead.py --threads 1 --repeats 5 --json kp_head.json
    python benchmarks/keypoint_head_overhead.py MODEL.NONLOCAL.KEYPOINT_HEAD.SUBSAMPLE True  # overrides

How it measures (benchmarks/model_overhead.py's helpers, imported):
* Input: --rois RoI feature maps (R, 256, 14, 14), what detectron2's keypoint pooler gives the head; the
  default 100 is TEST.DETECTIONS_PER_IMAGE, the detections per image the head sees at test time (in
  training it sees the sampled foreground proposals, up to 128 per image). Random features, ReLU'd as
  FPN outputs are not; the cost does not depend on the values.
* Weights: the baseline head's random initialisation, loaded into the non-local head, whose blocks start
  as identities (both heads give the same heatmaps, checked).
* FLOPs: nl_detectron.flop_count.flop_count_analysis of one forward of the head's layers (fvcore plus the
  fused attention op). One multiply-add = 1.
* Time: an eval-mode forward under no_grad (inference: layers and detectron2's heatmap-to-keypoint
  decoding), and a training step (forward with detectron2's keypoint loss on synthetic ground truth,
  backward, SGD step of detectron2's build_optimizer at learning rate 0). Runs alternate between the heads;
  each head's median is reported, the ratio is the median of the rounds' ratios (model_overhead.py).
* Memory: what a call adds at its peak to the resident set (CPU) or allocated memory (CUDA).
"""
import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_keypoint_head
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage

from nl_detectron import add_nonlocal_config, nonlocal_blocks
from nl_detectron.flop_count import flop_count_analysis

from model_overhead import StepMeter, alternate_runs, log, machine, synchronize  # beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"baseline": "configs/keypoint_rcnn_R101.yaml", "nonlocal": "configs/keypoint_rcnn_nl_head_R101.yaml"}
HEADS = tuple(CONFIGS)


def head_cfg(name, opts=()):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIGS[name]))
    if name == "nonlocal":
        cfg.merge_from_list(list(opts))
    cfg.SOLVER.BASE_LR = 0.0  # the optimizer's full arithmetic, the weights left as loaded
    return cfg


class HeadLayers(nn.Module):
    """The head's layers (convolutions, blocks, deconvolution, upsampling) as a module, for fvcore's tracer."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)


def build_heads(cfgs, input_shape, device):
    torch.manual_seed(0)
    heads = {name: build_keypoint_head(cfgs[name], input_shape).to(device) for name in HEADS}
    incompatible = heads["nonlocal"].load_state_dict(heads["baseline"].state_dict(), strict=False)
    blocks = tuple(n + "." for n in nonlocal_blocks(heads["nonlocal"]))
    assert not incompatible.unexpected_keys and all(k.startswith(blocks) for k in incompatible.missing_keys)
    return heads


def make_rois(num_rois, input_shape, num_keypoints, device, seed=0):
    """RoI features (R, C, 14, 14) and one image's Instances with proposal boxes and visible keypoints."""
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(num_rois, input_shape.channels, input_shape.height, input_shape.width, generator=g)
    xy0 = torch.rand(num_rois, 2, generator=g) * 600
    wh = 50 + torch.rand(num_rois, 2, generator=g) * 200
    instances = Instances((1000, 1000))
    instances.proposal_boxes = Boxes(torch.cat([xy0, xy0 + wh], dim=1))
    xy = xy0[:, None] + torch.rand(num_rois, num_keypoints, 2, generator=g) * wh[:, None]
    instances.gt_keypoints = Keypoints(torch.cat([xy, torch.full((num_rois, num_keypoints, 1), 2.0)], dim=2))
    return features.to(device), instances.to(device)


def inference(head, features, instances):
    head.eval()
    with torch.no_grad():
        boxes = Instances(instances.image_size)
        boxes.pred_boxes = instances.proposal_boxes
        return head(features, [boxes])[0]


def train_step(head, optimizer, features, instances):
    head.train()
    with EventStorage(0):
        loss = head(features, [instances])["loss_keypoint"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def count_flops(head, features):
    head.eval()
    analysis = flop_count_analysis(HeadLayers(head), features)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()  # names of detectron2's tracing wrapper: "model.head." + module name
    blocks = list(nonlocal_blocks(head))
    assert all(f"model.head.{name}" in by_module for name in blocks), sorted(by_module)
    return {
        "total": analysis.total(),
        "nonlocal_blocks": sum(by_module[f"model.head.{name}"] for name in blocks),
        "attention": analysis.by_operator().get("scaled_dot_product_attention", 0),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rois", type=int, default=100, help="RoIs per call (default 100: detectron2's "
                        "TEST.DETECTIONS_PER_IMAGE)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per head (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per head first (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-train", action="store_true", help="skip the training steps")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides of the non-local head's config, e.g. MODEL.NONLOCAL.KEYPOINT_HEAD.SUBSAMPLE True")
    args = parser.parse_args()
    for key in ("rois", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key}={getattr(args, key)}: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)

    cfgs = {name: head_cfg(name, args.opts) for name in HEADS}
    input_shape = ShapeSpec(channels=cfgs["baseline"].MODEL.FPN.OUT_CHANNELS,
                            height=cfgs["baseline"].MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION,
                            width=cfgs["baseline"].MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION)
    heads = build_heads(cfgs, input_shape, args.device)
    optimizers = {name: build_optimizer(cfgs[name], heads[name]) for name in HEADS}
    features, instances = make_rois(args.rois, input_shape, cfgs["baseline"].MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS,
                                    args.device)
    results = {name: {} for name in HEADS}

    log("counting FLOPs ...")
    for name, head in heads.items():
        results[name]["flops"] = count_flops(head, features)
        results[name]["params"] = sum(p.numel() for p in head.parameters())
    outputs = {name: inference(head, features, instances) for name, head in heads.items()}
    assert torch.equal(outputs["baseline"].pred_keypoint_heatmaps, outputs["nonlocal"].pred_keypoint_heatmaps), (
        "the non-local head at init must give the baseline's heatmaps"
    )
    del outputs

    meter = StepMeter(args.device)
    runs = {"inference": lambda name, i: inference(heads[name], features, instances)}
    if not args.no_train:
        runs["train_step"] = lambda name, i: train_step(heads[name], optimizers[name], features, instances)
    for key, run in runs.items():
        log(f"timing {key} ...")
        measured = alternate_runs(HEADS, run, args.warmup, args.repeats, meter)
        for name in HEADS:
            results[name][f"{key}_s"], results[name][f"{key}_peak_mb"] = measured[name]
    synchronize(args.device)

    rows = table_rows(results)
    block_names = list(nonlocal_blocks(heads["nonlocal"]))
    print(f"Keypoint head: {CONFIGS['nonlocal']}{' ' + ' '.join(args.opts) if args.opts else ''} "
          f"({len(block_names)} blocks: {', '.join(block_names)}) vs {CONFIGS['baseline']}, same weights")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; input: {args.rois} RoIs of "
          f"{tuple(features.shape[1:])}; times: median of {args.repeats} after {args.warmup} warm-up, "
          "alternating heads; time ratios: median of the rounds' ratios")
    header = f"{'':30s} {'baseline':>10s} {'non-local':>10s} {'ratio':>7s}"
    print(header + "\n" + "-" * len(header))
    for metric, base, nl, ratio in rows:
        print(f"{metric:30s} {base:10.3f} {nl:10.3f} {ratio:7.3f}")
    f = results["nonlocal"]["flops"]
    print(f"the {len(block_names)} blocks: {f['nonlocal_blocks'] / 1e9:.2f} GFLOPs, of which attention "
          f"{f['attention'] / 1e9:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({
                "machine": machine(args.device), "torch": torch.__version__, "configs": CONFIGS,
                "nonlocal_overrides": args.opts, "rois": args.rois, "roi_shape": list(features.shape[1:]),
                "nonlocal_blocks": block_names, "warmup": args.warmup, "repeats": args.repeats,
                "results": results, "rows": rows,
            }, fh, indent=2)
        print(f"wrote {args.json}")


def table_rows(results):
    """[(metric, baseline, non-local, ratio)]."""
    b, n = results["baseline"], results["nonlocal"]
    med = statistics.median

    def times(key):  # medians; ratio: the median of the rounds' ratios
        return med(b[key]), med(n[key]), med(nv / bv for bv, nv in zip(b[key], n[key]))

    rows = [
        ("FLOPs, head (G)", b["flops"]["total"] / 1e9, n["flops"]["total"] / 1e9, n["flops"]["total"] / b["flops"]["total"]),
        ("parameters, head (M)", b["params"] / 1e6, n["params"] / 1e6, n["params"] / b["params"]),
        ("inference (s)", *times("inference_s")),
    ]
    if "train_step_s" in b:
        rows.append(("training step (s)", *times("train_step_s")))
    rows.append(("peak memory, inference (MB)", med(b["inference_peak_mb"]), med(n["inference_peak_mb"]),
                 med(n["inference_peak_mb"]) / med(b["inference_peak_mb"])))
    if "train_step_s" in b:
        rows.append(("peak memory, train step (MB)", med(b["train_step_peak_mb"]), med(n["train_step_peak_mb"]),
                     med(n["train_step_peak_mb"]) / med(b["train_step_peak_mb"])))
    return rows


if __name__ == "__main__":
    sys.exit(main())
