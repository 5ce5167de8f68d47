"""
What one non-local block costs in Mask R-CNN R50-FPN: configs/mask_rcnn_nl_R50.yaml against detectron2's
baseline configs/mask_rcnn_R50.yaml, with the same weights (the baseline's state_dict loaded into the
non-local model), on 800 x 1333 images. Measures FLOPs, parameters, inference time, training-step time
and peak memory of both, and prints the ratios non-local / baseline measured in one run, as a table and
(--json) as JSON. The paper's claim to check: one block adds "<5% computation" (targets here: at most +5%
FLOPs and +5% inference time).

    python benchmarks/model_overhead.py                 # ~5 min on 2 CPU cores
    python benchmarks/model_overhead.py --repeats 5 --json overhead.json
    python benchmarks/model_overhead.py --threads 1     # steadier timings on a machine shared with other jobs
    python benchmarks/model_overhead.py --no-train --size 400 667
    python benchmarks/model_overhead.py MODEL.NONLOCAL.SUBSAMPLE_INPUT False  # overrides of the non-local config
    python benchmarks/model_overhead.py --device cuda --amp bfloat16           # on a GPU, mixed precision

How it measures:
* Weights: random initialisation of the baseline (no download), with every frozen-BN's statistics set
  from its input on a synthetic image, so that activations keep their scale through the depth as in a
  trained model (with detectron2's identity statistics they grow until every score saturates). These
  are saved and loaded into the non-local model, whose block starts as the identity: both models compute
  the same detections and run the same heads. The configs are used as they are (1000 proposals, score
  threshold 0.05, at most 100 detections); at 800 x 1333 the synthetic image gets the full 100
  detections (printed), so the mask head runs on a full set of detections, not on a handful.
* FLOPs: nl_detectron.flop_count.flop_count_analysis (detectron2's fvcore analysis, plus a handle for the
  fused attention op, which fvcore alone counts as zero) of one eval-mode forward. One multiply-add = 1.
* Time: wall clock of an eval forward under no_grad (inference), and of a training step as detectron2's
  SimpleTrainer runs it (forward with losses, backward, SGD step of detectron2's build_optimizer, at
  learning rate 0 so that the weights stay the loaded ones), with the same sampling seeds for both
  models. `warmup` runs then `repeats` timed rounds, each running both models back to back, alternating
  which goes first to cancel drift; each model's median is reported, and as the ratio the median of the
  rounds' ratios (as benchmarks/nonlocal_block.py does: steadier than the ratio of the medians when the
  machine's load moves during the run). The block's own share is timed by hooks inside those runs.
  --amp float16/bfloat16 runs both under torch.autocast, as detectron2's AMPTrainer does (without its
  gradient scaler, which costs the same for both models).
* Memory: measured in the same timed runs: the resident set size (VmRSS) before the call, the kernel's
  peak-RSS counter reset (writing 5 to /proc/self/clear_refs), then VmHWM - VmRSS after it: what the call
  added at its peak (activations; in training also the gradients), whatever else the process holds.
  glibc is told (mallopt) to serve allocations >= 128 KiB by mmap and to trim eagerly, so freed tensors
  go back to the OS at once and the RSS follows live memory rather than the allocator's retained heap;
  that is what lets both models share one process (instead of a fresh process per model, which would
  double the run time). On CUDA: torch.cuda.max_memory_allocated over memory_allocated before the call.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from nl_detectron import add_nonlocal_config, nonlocal_blocks
from nl_detectron.flop_count import flop_count_analysis

from _proc import cpu_name, reset_peak_rss, status_kib  # benchmarks/_proc.py, beside this script
from _sdpa import sdpa_kernels  # benchmarks/_sdpa.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"baseline": "configs/mask_rcnn_R50.yaml", "nonlocal": "configs/mask_rcnn_nl_R50.yaml"}
MODELS = tuple(CONFIGS)
NL_BLOCK = "backbone.bottom_up.res4.nonlocal5"


def model_cfg(name, device, opts=()):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIGS[name]))
    if name == "nonlocal":
        cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    # The optimizer does its full arithmetic (momentum, weight decay) but leaves the weights as loaded:
    # random weights diverge within a few real steps, and every timed step should see the same model.
    cfg.SOLVER.BASE_LR = 0.0
    return cfg


def calibrate_frozen_bn(model, batch):
    """
    Set every FrozenBatchNorm2d's statistics to those of its input on ``batch`` (a data-dependent init):
    with the identity statistics of a fresh detectron2 model, activations grow with depth until every
    score saturates and only a handful of detections survive, which is not what a trained model runs.
    """
    def set_statistics(norm, args):
        x = args[0]
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_statistics) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    inference(model, batch)
    for h in hooks:
        h.remove()


def build(name, device, weights_path, opts=()):
    """The model of ``name`` with the baseline weights saved at ``weights_path``, and its optimizer."""
    cfg = model_cfg(name, device, opts)
    model = build_model(cfg)
    incompatible = model.load_state_dict(torch.load(weights_path, map_location=device), strict=False)
    assert not incompatible.unexpected_keys, incompatible
    assert all(k.startswith(NL_BLOCK + ".") for k in incompatible.missing_keys), incompatible
    return model, build_optimizer(cfg, model)


def make_batch(images, height, width, device, seed=0):
    """``images`` synthetic BGR images with 4 filled rectangles each, annotated as boxes and masks."""
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(images):
        img = rng.uniform(0, 80, size=(height, width, 3)).astype(np.float32)
        boxes, masks = [], []
        for _ in range(4):
            h, w = rng.integers(height // 10, height // 3), rng.integers(width // 10, width // 3)
            y0, x0 = rng.integers(0, height - h), rng.integers(0, width - w)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(100, 255, size=3)
            boxes.append([x0, y0, x0 + w, y0 + h])
            mask = np.zeros((height, width), dtype=bool)
            mask[y0:y0 + h, x0:x0 + w] = True
            masks.append(mask)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.as_tensor(rng.integers(0, 80, size=4))
        instances.gt_masks = BitMasks(torch.as_tensor(np.stack(masks)))
        batch.append({
            "image": torch.as_tensor(img.transpose(2, 0, 1).copy()).to(device),
            "height": height, "width": width, "instances": instances.to(device),
        })
    return batch


def inference(model, batch):
    model.eval()
    with torch.no_grad():
        return model([{k: v for k, v in d.items() if k != "instances"} for d in batch])


def train_step(model, optimizer, batch, seed):
    """detectron2's SimpleTrainer.run_step, without its metrics: losses, backward, optimizer step."""
    model.train()
    torch.manual_seed(seed)  # the same proposal and ROI sampling for both models
    with EventStorage(seed):  # where detectron2's heads log their training statistics
        losses = sum(model(batch).values())
    optimizer.zero_grad()
    losses.backward()
    optimizer.step()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepMeter:
    """Wall time and peak memory of one call (see "Memory" in the module docstring)."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            # glibc: serve allocations >= 128 KiB by mmap and trim the heap eagerly, so that freed
            # tensors go back to the OS and the RSS follows the live memory.
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also turns off its dynamic adjustment)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD

    def __call__(self, fn):
        """(seconds, MB the call added at its peak over the memory in use before it)."""
        synchronize(self.device)
        if self.cuda:
            idle = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            idle = status_kib("VmRSS") * 1024
            reset_peak_rss()
        start = time.perf_counter()
        fn()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if self.cuda else status_kib("VmHWM") * 1024
        return seconds, (peak - idle) / 2**20


def alternate_runs(names, run, warmup, repeats, meter):
    """{name: ([seconds], [peak MB])} of ``run(name, i)`` for i < warmup + repeats, warm-up runs dropped,
    alternating which model goes first."""
    results = {name: ([], []) for name in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, peak_mb = meter(lambda: run(name, i))
            if i >= warmup:
                results[name][0].append(seconds)
                results[name][1].append(peak_mb)
    return results


class BlockTimer:
    """Hooks timing the non-local block inside the model's own runs: its forward in inference, and its
    forward and backward in training steps; and recording its input shape."""

    def __init__(self, block, device):
        self.device, self.input_shape = device, None
        self.times = {"inference": [], "train_forward": [], "train_backward": []}
        block.register_forward_pre_hook(self.before)
        block.register_forward_hook(self.after)
        block.register_full_backward_pre_hook(lambda module, grad_out: self.before(module, None))
        block.register_full_backward_hook(lambda module, grad_in, grad_out: self.after_backward())

    def before(self, module, args):
        synchronize(self.device)
        if args is not None:
            self.input_shape = tuple(args[0].shape)
        self.start = time.perf_counter()

    def after(self, module, args, out):
        synchronize(self.device)
        key = "train_forward" if torch.is_grad_enabled() else "inference"
        self.times[key].append(time.perf_counter() - self.start)

    def after_backward(self):
        synchronize(self.device)
        self.times["train_backward"].append(time.perf_counter() - self.start)

    def timed_runs(self, key, warmup, repeats):
        return self.times[key][warmup: warmup + repeats]


def attention_kernel(block, shape, device, amp):
    """The SDPA kernels the block's forward+backward runs at its real input size (benchmarks/_sdpa.py)."""
    x = torch.randn(shape, device=device, requires_grad=True)

    def forward_backward():
        with autocast(device, amp):
            z = block(x)
        z.sum().backward()

    kernels = sdpa_kernels(forward_backward)
    block.zero_grad(set_to_none=True)
    return kernels


def autocast(device, amp):
    """torch.autocast in ``amp`` ("float16"/"bfloat16"), or a no-op for None."""
    dtype = getattr(torch, amp) if amp else None
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=amp is not None)


def count_flops(model, batch):
    model.eval()
    analysis = flop_count_analysis(model, [{"image": d["image"]} for d in batch])
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()  # names of detectron2's tracing wrapper: "model." + module name
    return {
        "total": analysis.total(),
        "backbone": by_module["model.backbone"],
        "nonlocal_block": by_module.get("model." + NL_BLOCK, 0),
        "attention": analysis.by_operator().get("scaled_dot_product_attention", 0),
    }


def machine(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward / training step (default 1)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); "
                        "1 is steadier on a machine shared with other jobs")
    parser.add_argument("--amp", choices=("float16", "bfloat16"), default=None,
                        help="run inference and training steps under torch.autocast in this dtype")
    parser.add_argument("--no-train", action="store_true", help="skip the training steps")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides of the non-local model's config, e.g. MODEL.NONLOCAL.SUBSAMPLE_INPUT False")
    args = parser.parse_args()
    args.height, args.width = args.size
    for key in ("repeats", "batch"):
        if getattr(args, key) < 1:
            parser.error(f"--{key}={getattr(args, key)}: must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)

    meter = StepMeter(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, "baseline.pth")
        torch.manual_seed(0)
        baseline = build_model(model_cfg("baseline", args.device))
        calibrate_frozen_bn(baseline, make_batch(args.batch, args.height // 2, args.width // 2, args.device))
        torch.save(baseline.state_dict(), weights_path)
        del baseline
        models = {name: build(name, args.device, weights_path, args.opts) for name in MODELS}
    batch = make_batch(args.batch, args.height, args.width, args.device)
    results = {name: {} for name in MODELS}

    log("counting FLOPs ...")
    for name, (model, _) in models.items():
        results[name]["flops"] = count_flops(model, batch)
        results[name]["params"] = sum(p.numel() for p in model.parameters())
    outputs = {name: inference(model, batch) for name, (model, _) in models.items()}
    detections = [len(o["instances"]) for o in outputs["baseline"]]
    assert all(
        torch.equal(a["instances"].scores, b["instances"].scores)
        for a, b in zip(outputs["baseline"], outputs["nonlocal"])
    ), "the non-local model at init must give the baseline's detections"
    del outputs

    block = nonlocal_blocks(models["nonlocal"][0])[NL_BLOCK]
    block_timer = BlockTimer(block, args.device)
    log("timing inference ...")
    def infer(name, i):
        with autocast(args.device, args.amp):
            inference(models[name][0], batch)

    def step(name, i):
        with autocast(args.device, args.amp):
            train_step(*models[name], batch, seed=i)

    runs = {"inference": infer}
    if not args.no_train:
        runs["train_step"] = step
    for key, run in runs.items():
        if key == "train_step":
            log("timing training steps ...")
        measured = alternate_runs(MODELS, run, args.warmup, args.repeats, meter)
        for name in MODELS:
            results[name][f"{key}_s"], results[name][f"{key}_peak_mb"] = measured[name]
    med = statistics.median
    diagnostics = {
        "input_shape": block_timer.input_shape,
        "inference_s": block_timer.timed_runs("inference", args.warmup, args.repeats),
        "attention_kernel": attention_kernel(block, block_timer.input_shape, args.device, args.amp),
    }
    diagnostics["inference_share"] = med(diagnostics["inference_s"]) / med(results["nonlocal"]["inference_s"])
    if not args.no_train:
        forward = block_timer.timed_runs("train_forward", args.warmup, args.repeats)
        backward = block_timer.timed_runs("train_backward", args.warmup, args.repeats)
        diagnostics["train_step_s"] = [f + b for f, b in zip(forward, backward)]
        diagnostics["train_step_share"] = med(diagnostics["train_step_s"]) / med(results["nonlocal"]["train_step_s"])

    rows = table_rows(results, args)
    print_report(rows, results, diagnostics, detections, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "machine": machine(args.device), "torch": torch.__version__, "configs": CONFIGS,
                "nonlocal_overrides": args.opts, "amp": args.amp,
                "batch": args.batch, "size": [args.height, args.width], "warmup": args.warmup,
                "repeats": args.repeats, "detections_per_image": detections, "nonlocal_block": diagnostics,
                "results": results, "rows": rows,
            }, f, indent=2)
        print(f"wrote {args.json}")


def table_rows(results, args):
    """[(metric, baseline, non-local, ratio, target ratio or None)]."""
    b, n = results["baseline"], results["nonlocal"]
    med = statistics.median

    def times(key, target):  # medians; ratio: the median of the rounds' ratios
        return med(b[key]), med(n[key]), med(nv / bv for bv, nv in zip(b[key], n[key])), target

    def ratio_of(bv, nv, target=None):
        return bv, nv, nv / bv, target

    rows = [
        ("FLOPs, whole model (G)", *ratio_of(b["flops"]["total"] / 1e9, n["flops"]["total"] / 1e9, 1.05)),
        ("FLOPs, backbone (G)", *ratio_of(b["flops"]["backbone"] / 1e9, n["flops"]["backbone"] / 1e9)),
        ("parameters (M)", *ratio_of(b["params"] / 1e6, n["params"] / 1e6)),
        ("inference (s)", *times("inference_s", 1.05)),
    ]
    if "train_step_s" in b:
        rows.append(("training step (s)", *times("train_step_s", None)))
    rows.append(("peak memory, inference (MB)", *ratio_of(med(b["inference_peak_mb"]), med(n["inference_peak_mb"]))))
    if "train_step_s" in b:
        rows.append(("peak memory, train step (MB)",
                     *ratio_of(med(b["train_step_peak_mb"]), med(n["train_step_peak_mb"]))))
    return rows


def print_report(rows, results, diagnostics, detections, args):
    overrides = f" {' '.join(args.opts)}" if args.opts else ""
    print(f"Mask R-CNN R50-FPN: {CONFIGS['nonlocal']}{overrides} vs {CONFIGS['baseline']}, same weights")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; "
          + (f"autocast {args.amp}" if args.amp else "float32"))
    print(f"input: {args.batch} image(s) of {args.height} x {args.width}; {detections} detections per image; "
          f"times: median of {args.repeats} after {args.warmup} warm-up, alternating models; time ratios: "
          "median of the rounds' ratios")
    header = f"{'':28s} {'baseline':>10s} {'non-local':>10s} {'ratio':>7s}  target"
    print(header)
    print("-" * len(header))
    for metric, base, nl, ratio, target in rows:
        verdict = "" if target is None else f"<= {target:.2f}: {'met' if ratio <= target else 'MISSED'}"
        print(f"{metric:28s} {base:10.3f} {nl:10.3f} {ratio:7.3f}  {verdict}")
    f = results["nonlocal"]["flops"]
    d = diagnostics
    print(f"non-local block: input {d['input_shape']}, {f['nonlocal_block'] / 1e9:.2f} GFLOPs "
          f"(attention {f['attention'] / 1e9:.2f}), attention kernel: {d['attention_kernel']}; timed inside the "
          f"runs: {statistics.median(d['inference_s']):.3f} s per inference "
          f"({100 * d['inference_share']:.1f}% of the non-local model's)" + (
              f", {statistics.median(d['train_step_s']):.3f} s forward+backward per training step "
              f"({100 * d['train_step_share']:.1f}%)" if "train_step_s" in d else ""))
    print("runs (s): " + "; ".join(
        f"{name} {key[:-2]} " + ", ".join(f"{t:.2f}" for t in results[name][key])
        for key in ("inference_s", "train_step_s") for name in MODELS if key in results[name]
    ))
    print("memory: peak RSS (CPU) or allocated memory (CUDA) a call adds over what is in use before it")


if __name__ == "__main__":
    main()
