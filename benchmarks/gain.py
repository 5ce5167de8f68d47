"""
Does the non-local block help? Train the baseline and the non-local model the same way for several seeds,
evaluate both with COCOEvaluator, and print the Table 5 layout (mean ± std over the seeds, every seed,
and the difference) through tools/compare_results.py. docs/gain.md has the recorded comparisons.

    # The context-cue dataset (docs/gain.md), on the CPU:
    python benchmarks/gain.py --config configs/quick/mask_rcnn_nl_R18_context.yaml --seeds 1 2 3 \
        --output-dir output/gain_context --json benchmarks/results/cpu/gain_context.json --jobs 2
    # The same on other registered datasets, with overrides (KEY VALUE) for both models:
    python benchmarks/gain.py --config configs/quick/mask_rcnn_nl_R18_shapes.yaml --seeds 1 2 \
        --train-dataset nl_shapes_train --test-dataset nl_shapes_val --output-dir output/gain_shapes \
        --json gain_shapes.json SOLVER.MAX_ITER 300
    # On a GPU: MODEL.DEVICE cuda (and --num-gpus for several)
    # COCO (under $DETECTRON2_DATASETS), the Table 5 pairs configs/mask_rcnn_{R50,R101,X152}.yaml and
    # configs/mask_rcnn_nl_{R50,R101,X152}.yaml, beside the paper's rows:
    python benchmarks/gain.py --table5 R50 R101 X152 --seeds 1 2 3 --num-gpus 8 \
        --output-dir output/gain_coco --json benchmarks/results/<gpu>/gain_coco.json

Both models are the same config except for the backbone builder: the baseline uses detectron2's own
(``build_resnet_fpn_backbone`` for ``build_resnet_fpn_nl_backbone``, ...), or ``--baseline-config``.
Every run is ``tools/train_net.py`` in a subprocess, with ``SEED s`` and ``OUTPUT_DIR
<output-dir>/<model>/seed<s>`` (kept: metrics.json, log.txt, TensorBoard events, model_final.pth); its
results are the last evaluation in its metrics.json. The datasets of both configs are checked before
any training starts. On data whose COCO json gives each image a "cue" (the context-cue dataset), each
non-local model's attention from object queries to the cue is measured on the test split
(tools/visualize_attention.py: cue_attention_share) and printed.

The JSON (--json): {"baseline": {"config", "opts", "seeds", "runs": [{"seed", "output_dir", "bbox": {"AP",
"AP50", "AP75", ...}, "segm": {...}, "wall_time_s"}]}, "nonlocal": {... and per run "cue_attention"},
"command", "device", "torch", "wall_time_s"}; with --table5, one such dict per backbone under its name.
"""
import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import cpu_name  # noqa: E402  (benchmarks/_proc.py, beside this script)

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
MODELS = ("baseline", "nonlocal")
# Our backbone builders -> detectron2's, which build the same network without the non-local blocks.
DETECTRON2_BUILDERS = {
    "build_resnet_fpn_nl_backbone": "build_resnet_fpn_backbone",
    "build_resnet_nl_backbone": "build_resnet_backbone",
    "build_retinanet_resnet_fpn_nl_backbone": "build_retinanet_resnet_fpn_backbone",
}
TABLE5_BACKBONES = ("R50", "R101", "X152")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_results = _load_tool("compare_results")


def plan_pair(nonlocal_config: str, baseline_config: str, opts) -> dict:
    """
    {"baseline": (config, opts), "nonlocal": (config, opts)}: without ``baseline_config``, the baseline is
    the non-local config with detectron2's backbone builder. Checked before any training: both configs
    load, have a test dataset, and every dataset of both is registered and present.
    """
    from nl_detectron.config_files import load_config
    from nl_detectron.data import check_datasets

    cfg = load_config(nonlocal_config, opts)
    plans = {"nonlocal": (nonlocal_config, list(opts))}
    if baseline_config:
        plans["baseline"] = (baseline_config, list(opts))
    else:
        name = cfg.MODEL.BACKBONE.NAME
        if name not in DETECTRON2_BUILDERS:
            raise ValueError(
                f"--config {nonlocal_config!r}: MODEL.BACKBONE.NAME {name!r} is not a non-local builder; valid "
                f"choices: {', '.join(DETECTRON2_BUILDERS)} (or give the baseline with --baseline-config)"
            )
        plans["baseline"] = (nonlocal_config, list(opts) + ["MODEL.BACKBONE.NAME", DETECTRON2_BUILDERS[name]])
    for model, (config, model_opts_) in plans.items():
        cfg = load_config(config, model_opts_)
        if not cfg.DATASETS.TEST:
            raise ValueError(f"{model} ({config}): DATASETS.TEST is empty; give --test-dataset (the runs are compared on it)")
        check_datasets(cfg)
    return plans


def run_dir(output_dir: str, model: str, seed: int) -> str:
    return os.path.join(output_dir, model, f"seed{seed}")


def train_command(config, opts, seed, output_dir, args) -> list:
    command = [sys.executable, TRAIN_NET, "--config-file", config]
    if args.num_gpus != 1 or args.num_machines != 1:
        command += ["--num-gpus", str(args.num_gpus), "--num-machines", str(args.num_machines),
                    "--machine-rank", str(args.machine_rank), "--dist-url", args.dist_url]
    if args.resume:
        command.append("--resume")
    return command + [str(o) for o in opts] + ["SEED", str(seed), "OUTPUT_DIR", output_dir]


def run_all(jobs_list, jobs: int, env) -> dict:
    """Run [(key, command, output_dir)] with at most ``jobs`` at once; {key: wall seconds}. Stops on a failure."""
    pending, running, times = list(jobs_list), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            key, command, output_dir = pending.pop(0)
            os.makedirs(output_dir, exist_ok=True)
            log = open(os.path.join(output_dir, "train_net.out"), "w")
            print(f"[gain] start {key}: {shlex.join(command)}", flush=True)
            running[key] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time(), output_dir)
        time.sleep(1)
        for key, (proc, log, start, output_dir) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.kill()
                raise RuntimeError(
                    f"run {key} failed (exit code {proc.returncode}); its output: "
                    f"{os.path.join(output_dir, 'train_net.out')}"
                )
            times[key] = time.time() - start
            print(f"[gain] done {key} in {times[key]:.0f} s", flush=True)
    return times


def _run_results(output_dir: str) -> dict:
    """{"bbox": {...}, "segm": {...}} of a finished run, which must have its final model."""
    if not os.path.isfile(os.path.join(output_dir, "model_final.pth")):
        raise FileNotFoundError(f"run {output_dir!r} has no model_final.pth: it did not finish")
    flat = compare_results.read_results(output_dir)
    results = {}
    for key, value in flat.items():
        task, metric = key.split("/", 1)
        if task in ("bbox", "segm"):  # COCOeval's NaN (no object of that size) as JSON's null
            results.setdefault(task, {})[metric] = None if math.isnan(value) else value
    return results


def cue_attention(config, opts, output_dir, max_images=0) -> dict:
    """The trained non-local model's attention share on the cue over its test split; {} without cues."""
    from nl_detectron.config_files import load_config

    visualize_attention = _load_tool("visualize_attention")
    cfg = load_config(config, list(opts) + ["OUTPUT_DIR", output_dir])
    dataset = cfg.DATASETS.TEST[0]
    if not visualize_attention.has_cues(dataset):
        return {}
    return visualize_attention.cue_attention_share(
        cfg, os.path.join(output_dir, "model_final.pth"), dataset, max_images=max_images
    )


def compare(plans, seeds, output_dir, args, env) -> dict:
    """Train every (model, seed) of one pair, then collect the results into the JSON layout."""
    jobs_list = []
    for seed in seeds:
        for model in MODELS:
            config, opts = plans[model]
            d = run_dir(output_dir, model, seed)
            jobs_list.append(((model, seed), train_command(config, opts, seed, d, args), d))
    times = run_all(jobs_list, args.jobs, env)
    result = {}
    for model in MODELS:
        config, opts = plans[model]
        runs = []
        for seed in seeds:
            d = run_dir(output_dir, model, seed)
            run = dict(seed=seed, output_dir=d, wall_time_s=round(times[(model, seed)], 1), **_run_results(d))
            if model == "nonlocal" and not args.no_attention:
                share = cue_attention(config, opts, d, args.attention_images)
                if share:
                    run["cue_attention"] = share
            runs.append(run)
        result[model] = dict(config=os.path.relpath(config, REPO), opts=[str(o) for o in opts], seeds=list(seeds), runs=runs)
    return result


def device_name(plans, args) -> str:
    """The GPU (times how many) where the runs' MODEL.DEVICE is CUDA and there is one, else the CPU."""
    import torch

    from nl_detectron.config_files import load_config

    if load_config(*plans["nonlocal"]).MODEL.DEVICE.startswith("cuda"):  # load_config: cpu without CUDA
        return f"{torch.cuda.get_device_name(0)} x {args.num_gpus * args.num_machines}"
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def print_attention(name, result):
    for run in result["nonlocal"]["runs"]:
        share = run.get("cue_attention")
        if share:
            print(
                f"{name} seed {run['seed']}: object queries put {100 * share['share']:.1f}% of their attention on "
                f"the cue's keys, whose uniform share is {100 * share['uniform_share']:.1f}% (x{share['ratio']:.2f}; "
                f"{share['queries']} queries on {share['images']} images)"
            )


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="the non-local model's config (the baseline: the same with detectron2's backbone builder)")
    what.add_argument(
        "--table5", nargs="+", metavar="BACKBONE", choices=TABLE5_BACKBONES,
        help=f"COCO: the paper's pairs configs/mask_rcnn_<B>.yaml and configs/mask_rcnn_nl_<B>.yaml ({', '.join(TABLE5_BACKBONES)})",
    )
    what.add_argument("--table-only", metavar="JSON", help="print the table of a JSON this script wrote, and stop")
    parser.add_argument("--baseline-config", default="", help="the baseline's config instead (with --config)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="SEED of each pair of runs")
    parser.add_argument(
        "--train-dataset", action="append", default=None, help="DATASETS.TRAIN of both (repeat for more; default: the config's)"
    )
    parser.add_argument(
        "--test-dataset", action="append", default=None, help="DATASETS.TEST of both (repeat for more; default: the config's)"
    )
    parser.add_argument("--output-dir", default="output/gain", help="runs go to <output-dir>/<model>/seed<s>")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--backbone", default="", help="the table's backbone name (default: from the config, e.g. R18)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (CPU: e.g. 2 on 2 cores with --threads 1)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (default: unset)")
    parser.add_argument("--resume", action="store_true", help="pass --resume to train_net: continue or re-evaluate runs")
    parser.add_argument("--no-attention", action="store_true", help="skip the cue attention measurement")
    parser.add_argument("--attention-images", type=int, default=0, help="measure it on the first N test images (default: all)")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides of both models' configs")
    return parser


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.table_only:
        with open(args.table_only) as f:
            saved = json.load(f)
        comparisons = [(b, saved[b]) for b in saved["backbones"]] if "backbones" in saved else [(saved["backbone"], saved)]
        print(compare_results.seed_table5(comparisons))
        return saved
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {args.seeds}: each seed once")
    if len(args.opts) % 2:
        raise ValueError(f"overrides {args.opts}: KEY VALUE pairs, an even number of words")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be at least 1")
    dataset_opts = []
    if args.train_dataset:
        dataset_opts += ["DATASETS.TRAIN", repr(tuple(args.train_dataset))]
    if args.test_dataset:
        dataset_opts += ["DATASETS.TEST", repr(tuple(args.test_dataset))]
    opts = dataset_opts + list(args.opts)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    # Every pair is planned and its datasets checked before the first run starts.
    if args.table5:
        pairs = [
            (b, plan_pair(os.path.join(REPO, "configs", f"mask_rcnn_nl_{b}.yaml"),
                          os.path.join(REPO, "configs", f"mask_rcnn_{b}.yaml"), opts))
            for b in args.table5
        ]
    else:
        pairs = [(args.backbone, plan_pair(args.config, args.baseline_config, opts))]

    start = time.time()
    comparisons = []
    for backbone, plans in pairs:
        output_dir = os.path.join(args.output_dir, backbone) if args.table5 else args.output_dir
        result = compare(plans, args.seeds, output_dir, args, env)
        backbone = backbone or compare_results.backbone_of(result["nonlocal"]["runs"][0]["output_dir"]) or "?"
        comparisons.append((backbone, result))
    info = dict(
        command=shlex.join(["python", "benchmarks/gain.py"] + list(argv if argv is not None else sys.argv[1:])),
        device=device_name(pairs[0][1], args), torch=__import__("torch").__version__, wall_time_s=round(time.time() - start, 1),
    )
    if args.table5:
        saved = dict({b: r for b, r in comparisons}, backbones=[b for b, _ in comparisons], **info)
    else:
        saved = dict(comparisons[0][1], backbone=comparisons[0][0], **info)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=2)
    print(compare_results.seed_table5(comparisons))
    for backbone, result in comparisons:
        print_attention(backbone, result)
    print(f"[gain] {len(comparisons) * len(MODELS) * len(args.seeds)} runs in {info['wall_time_s']:.0f} s on {info['device']}")
    return saved


if __name__ == "__main__":
    main(sys.argv[1:])
