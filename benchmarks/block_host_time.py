"""
The host's time per forward+backward of NonLocalBlock2d against the naive form's (benchmarks/nonlocal_block.py's
MaterialisedNonLocal, the same weights), on a map small enough that the kernels take next to no time: what
the Python and the dispatcher around the kernels cost. On CUDA at res4 that host time, not the GPU's work,
sets the block's wall time (H200, the Table 5 case in bfloat16: 1.3 ms of kernels in 3.5 ms), so it is
the part of ours / naive that no faster kernel can fix. Prints the ratio measured in one run.

    python benchmarks/block_host_time.py                  # CPU, CUDA's path emulated (see --cpu-path)
    python benchmarks/block_host_time.py --device cuda --dtype bfloat16

On the CPU, unless --cpu-path, the CPU-only autograd Functions around the attention (the max-pool that
keeps no indices, the layout copies for oneDNN) are swapped for what the block runs on CUDA (``max_pool2d``,
``x + out``, no copies), so that the CPU measures the host work of CUDA's path; the one CUDA-only call left
out is ``bmm``'s ``out_dtype`` (16-bit products returning float32), which the CPU does not have. The
attention's path is forced to the kept N x N' matrix (--force-path), the one CUDA's cost rule takes for
every softmax case of nonlocal_block.py. Both forms are timed by nonlocal_block.py's alternating rounds,
here of --calls calls each after a warm-up round; the ratio is the median of the rounds' ours / naive.
"""
import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

import nl_detectron.nonlocal_block as block_module
from nl_detectron.nonlocal_block import NonLocalBlock2d

from nonlocal_block import DTYPES, FORCED_PATHS, MaterialisedNonLocal, alternating_times, force_path  # benchmarks/
from _proc import cpu_name  # benchmarks/_proc.py

SOFTMAX_MODES = ("embedded_gaussian", "gaussian")


def emulate_cuda_path():
    """The block's CPU-only Functions around the attention replaced by what it runs on CUDA."""
    block_module.max_pool_2x2 = lambda x: F.max_pool2d(x, 2, ceil_mode=True)
    block_module.for_convolutions = lambda x, readers, num_keys: x
    block_module.residual_sum = lambda x, out: x + out


def measure(mode, args):
    torch.manual_seed(0)
    block = NonLocalBlock2d(args.channels, mode=mode, sub_sample=True, sub_sample_input=True)
    torch.nn.init.normal_(block.w_z.weight, std=0.01)  # a trained-looking W_z, as nonlocal_block.py's
    block.to(args.device)
    x = torch.randn(2, args.channels, args.size, args.size, device=args.device, requires_grad=True)
    grad_out = torch.randn(x.shape, device=args.device)
    forms = {"ours": (block, x, grad_out), "naive": (MaterialisedNonLocal(block), x, grad_out)}
    times = alternating_times(forms, args.dtype, args.rounds, 0.0, args.rounds, calls=args.calls)
    ratios = [o / n for o, n in zip(times["ours"], times["naive"])]
    return {
        "mode": mode,
        "ours_us": 1e6 * statistics.median(times["ours"]),
        "naive_us": 1e6 * statistics.median(times["naive"]),
        "time_ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "times_s": times,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=SOFTMAX_MODES, default=list(SOFTMAX_MODES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="float16/bfloat16: both forms under torch.autocast (default float32)")
    parser.add_argument("--force-path", choices=list(FORCED_PATHS), default="materialised",
                        help="the attention's path (default: the kept matrix, CUDA's choice at these sizes)")
    parser.add_argument("--cpu-path", action="store_true",
                        help="on the CPU, time the block as it runs there (its CPU-only Functions included)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="the map is SIZE x SIZE (default 8)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=300, help="forward+backward calls per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.device == "cpu" and args.dtype == "float16":
        parser.error("--dtype float16 is for --device cuda; valid choices on the CPU: float32, bfloat16")
    for name in ("rounds", "calls", "threads", "channels", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.channels % 2:
        parser.error(f"--channels={args.channels}: must be even (the block's inner channels are half)")
    torch.set_num_threads(args.threads)
    force_path(args.force_path)
    emulated = args.device == "cpu" and not args.cpu_path
    if emulated:
        emulate_cuda_path()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {args.threads} thread(s)"
    print(f"machine: {where}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"batch 2, {args.channels} x {args.size} x {args.size}, x pooled, {args.dtype}, path {args.force_path}"
          f"{', CUDA path emulated' if emulated else ''}; median of {args.rounds} alternating rounds of "
          f"{args.calls} calls")
    results = []
    for mode in args.modes:
        r = measure(mode, args)
        results.append(r)
        print(f"{mode:17s} ours {r['ours_us']:7.0f} us  naive {r['naive_us']:7.0f} us  "
              f"extra {r['ours_us'] - r['naive_us']:+6.0f} us  ours/naive {r['time_ratio']:.3f} "
              f"(rounds {min(r['round_ratios']):.3f}-{max(r['round_ratios']):.3f})", flush=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"machine": where, "torch": torch.__version__, "emulated_cuda_path": emulated,
                       "config": config, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
