"""
What one non-local block costs in Mask R-CNN R50-FPN: configs/mask_rcnn_nl_R50.yaml against detectron2's
baseline configs/mask_rcnn_R50.yaml, with the same weights (the baseline's state_dict loaded into the
non-local model), on 800 x 1333 images. Measures FLOPs, parameters, inference time, training-step time
and peak memory of both, and prints the ratios non-local / baseline measured in one run, as a table and
(--json) as JSON. The paper's claim to check: one block adds "<5% computation" (targets here: at most +5%
FLOPs and +5% inference time).

    python benchmarks/model_overhead.py                 # ~5 min on 2 CPU cores
    python benchmarks/model_overhead.py --repeats 5 --json overhead.json
    python benchmarks/model_overhead.py --no-memory --no-train

How it measures:
* Weights: random initialisation of the baseline (no download; frozen-BN statistics set from the
  activations of a synthetic image, so scores do not saturate), loaded into the non-local model, whose
  block starts as the identity, so both models compute the same detections and run the same heads.
  The test score threshold is 0, so both run the box and mask heads on the full 100 detections per image
  that a trained COCO model typically returns; the ROI heads' cost therefore does not depend on how
  confident random weights happen to be. Everything else is the configs' (1000 proposals per image, ...).
* FLOPs: nl_detectron.flop_count.flop_count_analysis (detectron2's fvcore analysis, plus a handle for the
  fused attention op, which fvcore alone counts as zero) of one eval-mode forward. One multiply-add = 1.
* Time: wall clock of an eval forward under no_grad (inference), and of a training step as detectron2's
  SimpleTrainer runs it (forward with losses, backward, SGD step of detectron2's build_optimizer, at
  learning rate 0 so that the weights stay the loaded ones), with the same sampling seeds for both models. `warmup` runs then `repeats` timed runs per model,
  alternating which model goes first to cancel drift; the median is reported.
* Memory: each (model, inference/training) runs in a fresh subprocess, so neither inherits the other's
  allocator state. It builds the model, runs one small step (loads kernels, creates the optimizer state),
  records its resident set size (VmRSS), resets the peak-RSS counter (writes 5 to /proc/self/clear_refs),
  runs one full-size step and reports VmHWM - VmRSS: what the step added at its peak (activations, and in
  training the gradients). glibc serves allocations >= 128 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed
  tensors go back to the OS and the RSS follows live memory. On CUDA: torch.cuda.max_memory_allocated.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"baseline": "configs/mask_rcnn_R50.yaml", "nonlocal": "configs/mask_rcnn_nl_R50.yaml"}
MODELS = tuple(CONFIGS)
NL_BLOCK = "backbone.bottom_up.res4.nonlocal5"


def model_cfg(name, device):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIGS[name]))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # the full 100 detections (see the module docstring)
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


def build(name, device, weights_path):
    """The model of ``name`` with the baseline weights saved at ``weights_path``, and its optimizer."""
    cfg = model_cfg(name, device)
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


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate_timings(models, run, warmup, repeats, device):
    """{name: [seconds]} of ``run(name, i)`` for i in range(warmup + repeats), alternating the order."""
    times = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name in models if i % 2 == 0 else models[::-1]:
            t = timed(lambda: run(name, i), device)
            if i >= warmup:
                times[name].append(t)
    return times


def nonlocal_diagnostics(model, batch, device):
    """The block's input shape in the real model, its share of inference time, and the attention kernel."""
    block = nonlocal_blocks(model)[NL_BLOCK]
    seen = {}

    def before(module, args):
        synchronize(device)
        seen["shape"], seen["start"] = tuple(args[0].shape), time.perf_counter()

    def after(module, args, out):
        synchronize(device)
        seen["time_s"] = time.perf_counter() - seen["start"]

    hooks = [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    inference(model, batch)  # warm
    total = timed(lambda: inference(model, batch), device)
    for h in hooks:
        h.remove()
    return {
        "input_shape": seen["shape"], "block_time_s": seen["time_s"], "model_time_s": total,
        "block_time_share": seen["time_s"] / total, "attention_kernel": attention_kernel(block, seen["shape"], device),
    }


def attention_kernel(block, shape, device):
    """The fused SDPA kernel the block gets at its real input size (SDPA raises when restricted to a kernel
    that cannot run, where it would otherwise fall back silently to the math path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(shape, device=device)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                block(x)
            return backend.name.lower()
        except RuntimeError:
            continue
    return "math (materialises the N x N' matrix)"


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


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(name, mode, args, weights_path):
    """One peak-memory measurement in this (fresh) process: prints a JSON line."""
    model, optimizer = build(name, args.device, weights_path)
    run = (lambda b: inference(model, b)) if mode == "inference" else (lambda b: train_step(model, optimizer, b, 0))
    run(make_batch(args.batch, 256, 320, args.device))  # load kernels, create the optimizer state
    batch = make_batch(args.batch, args.height, args.width, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        idle = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(batch)
        peak_mb = (torch.cuda.max_memory_allocated() - idle) / 2**20
    else:
        idle_kib = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        run(batch)
        peak_mb = (_status_kib("VmHWM") - idle_kib) / 1024
    print(json.dumps({"model": name, "mode": mode, "peak_mb": peak_mb}))


def measure_memory(name, mode, args, weights_path):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", name, mode, weights_path,
           "--device", args.device, "--batch", str(args.batch), "--size", str(args.height), str(args.width)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def machine(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward / training step (default 1)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing and memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--memory-worker", nargs=3, metavar=("MODEL", "MODE", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.height, args.width = args.size
    for key in ("repeats", "batch"):
        if getattr(args, key) < 1:
            parser.error(f"--{key}={getattr(args, key)}: must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: must be >= 0")
    if args.memory_worker:
        name, mode, weights_path = args.memory_worker
        return memory_worker(name, mode, args, weights_path)

    modes = ["inference"] + ([] if args.no_train else ["training"])
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, "baseline.pth")
        torch.manual_seed(0)
        baseline = build_model(model_cfg("baseline", args.device))
        calibrate_frozen_bn(baseline, make_batch(args.batch, args.height // 2, args.width // 2, args.device))
        torch.save(baseline.state_dict(), weights_path)
        del baseline
        models = {name: build(name, args.device, weights_path) for name in MODELS}
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

        log("timing inference ...")
        times = alternate_timings(
            MODELS, lambda name, i: inference(models[name][0], batch), args.warmup, args.repeats, args.device
        )
        for name in MODELS:
            results[name]["inference_s"] = times[name]
        if not args.no_train:
            log("timing training steps ...")
            times = alternate_timings(
                MODELS, lambda name, i: train_step(*models[name], batch, seed=i), args.warmup, args.repeats,
                args.device,
            )
            for name in MODELS:
                results[name]["train_step_s"] = times[name]
        diagnostics = nonlocal_diagnostics(models["nonlocal"][0], batch, args.device)
        del models, outputs
        if not args.no_memory:
            for mode in modes:
                for name in MODELS:
                    log(f"peak memory: {name} {mode} (fresh process) ...")
                    results[name][f"{mode}_peak_mb"] = measure_memory(name, mode, args, weights_path)

    rows = table_rows(results, args)
    print_report(rows, results, diagnostics, detections, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "machine": machine(args.device), "torch": torch.__version__, "configs": CONFIGS,
                "batch": args.batch, "size": [args.height, args.width], "warmup": args.warmup,
                "repeats": args.repeats, "detections_per_image": detections, "nonlocal_block": diagnostics,
                "results": results, "rows": rows,
            }, f, indent=2)
        print(f"wrote {args.json}")


def table_rows(results, args):
    """[(metric, baseline, non-local, ratio, target ratio or None)]."""
    b, n = results["baseline"], results["nonlocal"]
    med = statistics.median
    rows = [
        ("FLOPs, whole model (G)", b["flops"]["total"] / 1e9, n["flops"]["total"] / 1e9, 1.05),
        ("FLOPs, backbone (G)", b["flops"]["backbone"] / 1e9, n["flops"]["backbone"] / 1e9, None),
        ("parameters (M)", b["params"] / 1e6, n["params"] / 1e6, None),
        ("inference (s)", med(b["inference_s"]), med(n["inference_s"]), 1.05),
    ]
    if "train_step_s" in b:
        rows.append(("training step (s)", med(b["train_step_s"]), med(n["train_step_s"]), None))
    for mode in ("inference", "training"):
        key = f"{mode}_peak_mb"
        if key in b:
            rows.append((f"peak memory, {mode} (MB)", b[key], n[key], None))
    return [(m, bv, nv, nv / bv, target) for m, bv, nv, target in rows]


def print_report(rows, results, diagnostics, detections, args):
    print(f"Mask R-CNN R50-FPN: {CONFIGS['nonlocal']} vs {CONFIGS['baseline']}, same weights")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}")
    print(f"input: {args.batch} image(s) of {args.height} x {args.width}; {detections} detections per image; "
          f"times: median of {args.repeats} after {args.warmup} warm-up, alternating models")
    header = f"{'':28s} {'baseline':>10s} {'non-local':>10s} {'ratio':>7s}  target"
    print(header)
    print("-" * len(header))
    for metric, base, nl, ratio, target in rows:
        verdict = "" if target is None else f"<= {target:.2f}: {'met' if ratio <= target else 'MISSED'}"
        print(f"{metric:28s} {base:10.3f} {nl:10.3f} {ratio:7.3f}  {verdict}")
    f = results["nonlocal"]["flops"]
    d = diagnostics
    print(f"non-local block: input {d['input_shape']}, {f['nonlocal_block'] / 1e9:.2f} GFLOPs "
          f"(attention {f['attention'] / 1e9:.2f}), {d['block_time_s']:.3f} s of a {d['model_time_s']:.3f} s "
          f"inference ({100 * d['block_time_share']:.1f}%), attention kernel: {d['attention_kernel']}")
    if "inference_s" in results["baseline"]:
        print("timings (s): " + "; ".join(
            f"{name} {key[:-2]} " + ", ".join(f"{t:.2f}" for t in results[name][key])
            for key in ("inference_s", "train_step_s") for name in MODELS if key in results[name]
        ))
    print("memory: peak RSS a full-size step adds over the idle model, fresh process per model and mode")


if __name__ == "__main__":
    main()
