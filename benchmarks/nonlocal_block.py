"""
Time and peak memory of NonLocalBlock2d's forward+backward against the naive form that materialises the
N x N' pairwise matrix (as mmcv's NonLocal2d does), with the same weights, on the feature maps of a batch of
two 800 x 1333 images. Prints the ratios ours/naive measured in one run, as a table and (--json) as JSON.

    python benchmarks/nonlocal_block.py                 # every mode and case (~20 min on 2 cores)
    python benchmarks/nonlocal_block.py --quick         # res4 and res3 with subsampling, 1 round (~3 min)
    python benchmarks/nonlocal_block.py --modes embedded_gaussian --cases res4-nosub --repeats 5
    python benchmarks/nonlocal_block.py --modes embedded_gaussian --cases res4-poolx res3-poolx  # Table 5's pooling
    python benchmarks/nonlocal_block.py --device cuda --dtype bfloat16   # on a GPU, under autocast
    python benchmarks/nonlocal_block.py --force-path unmaterialised --cases res4-poolx  # A/B of the rule

Memory: each (form, mode, case) runs in a fresh subprocess, so that no measurement inherits another's
allocator state or peak. It builds the module and its inputs, runs a small forward+backward to load the
kernels, records its resident set size (VmRSS), resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), runs the full forward+backward once and reports VmHWM - baseline: what the
forward+backward added at its peak, saved activations, gradients and library workspaces included. glibc's
malloc is told to serve every allocation of 128 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_, which
also turns off its adaptive threshold), so that a freed tensor goes back to the OS at once and the RSS
follows the live memory rather than the allocator's retained heap.

Time: one more subprocess per (mode, case), with the default allocator, holds both forms; after one
warm-up pass each, it times them in rounds, alternating (ours, naive, then naive, ours, ...) so that a
change in the machine's load hits both alike: --repeats rounds, more (up to 9) while less than 20 s have
passed (not with --quick). It reports each form's median time and, as the ratio, the median of the
rounds' ours/naive. The machine's load average is printed with the results: on a shared machine the
ratios move by several percent from run to run.

On CUDA (--device cuda) everything runs in one process: memory is torch.cuda.max_memory_allocated over
memory_allocated before the forward+backward (exact: the caching allocator counts every tensor), time is
wall clock around a synchronised forward+backward, in alternating rounds for at least 0.5 s; besides, the
time the GPU spends in kernels (torch.profiler), which the wall time exceeds where launching takes longer. --dtype
float16/bfloat16 runs both forms under torch.autocast, as mixed-precision training does. The SDPA kernel
that ran is read at torch's dispatcher (benchmarks/_sdpa.py: the op names of aten's fused kernels).
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from nl_detectron import pairwise
from nl_detectron.nonlocal_block import NONLOCAL_MODES, NonLocalBlock2d

from _proc import cpu_name, cpu_vector_flags, reset_peak_rss, status_kib  # benchmarks/_proc.py, beside this script
from _sdpa import sdpa_kernels  # benchmarks/_sdpa.py

# name: (channels, height, width, sub_sample, sub_sample_input); stride 16 (res4) and 8 (res3) of an
# 800 x 1333 image. "-sub": the paper's max-pool of phi(x) and g(x) (the block's default); "-poolx": the
# authors' max-pool of x before phi and g (the Table 5 configs').
CASES = {
    "res4-sub": (1024, 50, 84, True, False),
    "res4-nosub": (1024, 50, 84, False, False),
    "res3-sub": (512, 100, 168, True, False),
    "res3-nosub": (512, 100, 168, False, False),
    "res4-poolx": (1024, 50, 84, True, True),
    "res3-poolx": (512, 100, 168, True, True),
}
QUICK_CASES = ("res4-sub", "res3-sub")
BATCH = 2
MIN_TIMING_S, MAX_ROUNDS = 20.0, 9  # cases quicker than that get extra timed rounds (not with --quick)
CUDA_MIN_TIMING_S, CUDA_MAX_ROUNDS = 0.5, 200
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IMPLS = ("ours", "naive")
SOFTMAX_MODES = ("embedded_gaussian", "gaussian")
# --force-path: what our block runs where the cost rule (nl_detectron.pairwise.materialise_pairwise) decides.
FORCED_PATHS = {"rule": None, "materialised": True, "unmaterialised": False}


class MaterialisedNonLocal(nn.Module):
    """
    The naive form with the weights of ``block``: the N x N' pairwise matrix is built and kept for
    backward, as in mmcv's NonLocal2d. For concatenation, mmcv even builds the (B, 2C', N, N') tensor of
    concatenated pairs (36 GB to 578 GB at these sizes, impossible here); this form builds only the
    N x N' matrix ReLU(w_theta . theta_i + w_phi . phi_j), the smallest materialising version.
    """

    def __init__(self, block: NonLocalBlock2d):
        super().__init__()
        self.block = block

    def forward(self, x):
        block = self.block
        b, _, h, w = x.shape
        theta = block.theta(x) if block.theta is not None else x
        pool = lambda t: F.max_pool2d(t, 2, ceil_mode=True)  # noqa: E731
        keys_from = pool(x) if block.sub_sample_input else x  # the authors' order: pool x, then phi/g
        phi = block.phi(keys_from) if block.phi is not None else keys_from
        g = block.g(keys_from)
        if block.sub_sample and not block.sub_sample_input:  # the paper's: phi/g, then pool
            phi, g = pool(phi), pool(g)
        theta = theta.flatten(2).transpose(1, 2)  # (B, N, d)
        phi = phi.flatten(2)  # (B, d, N')
        g = g.flatten(2).transpose(1, 2)  # (B, N', C')
        num_keys = phi.shape[-1]
        if block.mode in SOFTMAX_MODES:
            pairwise = theta @ phi
            if block.use_scale:
                pairwise /= math.sqrt(theta.shape[-1])
            pairwise = pairwise.softmax(dim=-1)
        elif block.mode == "dot_product":
            pairwise = theta @ phi
            pairwise /= num_keys
        else:
            w_theta, w_phi = block.concat_project.weight.chunk(2, dim=1)
            u = theta @ w_theta.t()  # (B, N, 1)
            v = w_phi @ phi  # (B, 1, N')
            pairwise = (u + v).div_(num_keys).relu_()  # in place: ReLU(a) / N' = ReLU(a / N')
        y = (pairwise @ g).transpose(1, 2).reshape(b, -1, h, w)
        return x + block.w_z(y)


def force_path(path):
    """Make the cost rule answer ``path`` in every call of this process (``"rule"``: leave it be)."""
    keep = FORCED_PATHS[path]
    if keep is not None:
        pairwise.materialise_pairwise = lambda *args, **kwargs: keep


def build(impl, mode, case, device="cpu"):
    channels, height, width, sub_sample, sub_sample_input = CASES[case]
    torch.manual_seed(0)
    block = NonLocalBlock2d(channels, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input)
    with torch.no_grad():  # a trained-looking W_z instead of the zero initialisation
        nn.init.normal_(block.w_z.weight, std=0.01)
    module = (block if impl == "ours" else MaterialisedNonLocal(block)).to(device)
    x = torch.randn(BATCH, channels, height, width, device=device, requires_grad=True)
    return module, x, torch.randn(x.shape, device=device)


def forward_backward(module, x, grad_out, dtype="float32"):
    """One forward+backward; float16/bfloat16: under autocast, as mixed-precision training runs it."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(x.device.type, dtype=DTYPES[dtype], enabled=dtype != "float32"):
        z = module(x)
    z.backward(grad_out)


def memory_worker(impl, mode, case, dtype):
    """Peak memory of one forward+backward, in its own process: prints a JSON line."""
    module, x, grad_out = build(impl, mode, case)
    small = x.detach()[:, :, :8, :8].clone().requires_grad_(True)
    forward_backward(module, small, torch.randn(small.shape), dtype)  # load kernels, build thread pools
    small = None
    baseline_kib = status_kib("VmRSS")
    try:
        reset_peak_rss()
        peak_field = "VmHWM"
    except OSError:  # no reset possible: the lifetime peak, which includes the small warm-up
        peak_field = None
    forward_backward(module, x, grad_out, dtype)
    if peak_field:
        peak_kib = status_kib(peak_field)
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (peak_kib - baseline_kib) / 1024}))


def alternating_times(forms, dtype, repeats, min_timing_s, max_rounds, calls=1):
    """
    {impl: [seconds per forward+backward]} of both forms, after one warm-up round each: they alternate
    (ours, naive, then naive, ours, ...) so that a change of the machine's load hits both alike, for at
    least ``repeats`` rounds, more for quick cases until ``min_timing_s`` have passed (at most
    ``max_rounds``). A round is ``calls`` forward+backward passes, synchronised once at its end on CUDA.
    """
    def run(impl):
        module, x, grad_out = forms[impl]
        for _ in range(calls):
            forward_backward(module, x, grad_out, dtype)
        if x.is_cuda:
            torch.cuda.synchronize()

    for impl in IMPLS:
        run(impl)
    times = {impl: [] for impl in IMPLS}
    start_all = time.perf_counter()
    round_ = 0
    while round_ < repeats or (time.perf_counter() - start_all < min_timing_s and round_ < max_rounds):
        for impl in IMPLS if round_ % 2 == 0 else reversed(IMPLS):
            start = time.perf_counter()
            run(impl)
            times[impl].append((time.perf_counter() - start) / calls)
        round_ += 1
    return times


def time_worker(mode, case, repeats, min_timing_s, dtype):
    """Forward+backward times of both forms (CPU), in one process: prints a JSON line of the per-run times."""
    forms = {impl: build(impl, mode, case) for impl in IMPLS}
    print(json.dumps(alternating_times(forms, dtype, repeats, min_timing_s, MAX_ROUNDS)))


def cuda_measure(mode, case, repeats, dtype):
    """Peak memory and per-round times of both forms on the current CUDA device, in this process."""
    forms = {impl: build(impl, mode, case, "cuda") for impl in IMPLS}
    result = {}
    for impl in IMPLS:
        forward_backward(*forms[impl], dtype)  # warm-up: kernels, cuBLAS/cuDNN workspaces
        torch.cuda.synchronize()
        idle = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(*forms[impl], dtype)
        torch.cuda.synchronize()
        result[impl] = {"peak_mb": (torch.cuda.max_memory_allocated() - idle) / 2**20}
    times = alternating_times(forms, dtype, repeats, CUDA_MIN_TIMING_S, CUDA_MAX_ROUNDS)
    for impl in IMPLS:
        result[impl]["times_s"] = times[impl]
        result[impl]["kernel_s"] = kernel_time(*forms[impl], dtype)
    return result


def kernel_time(module, x, grad_out, dtype, runs=3):
    """
    Seconds the GPU spends in kernels per forward+backward (torch.profiler, the mean of ``runs``): what the
    block costs where the host launches ahead of the GPU, as inside a whole model. The wall time above
    also holds the host's time to launch the kernels, which is most of it where they are small (res4).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            forward_backward(module, x, grad_out, dtype)
        torch.cuda.synchronize()
    # With CUDA activity alone no operator is recorded, so device time is the kernels' (and memsets') only.
    return sum(e.self_device_time_total for e in prof.key_averages()) / runs / 1e6


def _subprocess(args, env=None):
    cmd = [sys.executable, __file__] + [str(a) for a in args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(mode, case, repeats, min_timing_s, dtype, path="rule"):
    # Every allocation >= 128 KiB gets its own mmap and is unmapped when freed: RSS follows live memory.
    malloc_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    result = {}
    for impl in IMPLS:  # one at a time: the naive cases take up to several GB
        result[impl] = _subprocess(["--memory-worker", impl, mode, case, "--dtype", dtype, "--force-path", path],
                                   env=malloc_env)
    times = _subprocess(["--time-worker", mode, case, "--repeats", repeats, "--min-timing-s", min_timing_s,
                         "--dtype", dtype, "--force-path", path])
    for impl in IMPLS:
        result[impl]["times_s"] = times[impl]
    return result


def materialised(mode, case, device, dtype):
    """What nl_detectron.pairwise's cost rule (or --force-path) decides for a forward+backward of ``case``:
    whether the N x N' matrix is kept (None for dot_product, which never forms it)."""
    if mode == "dot_product":
        return None
    channels, height, width, sub_sample, _ = CASES[case]
    n, inner = height * width, channels // 2
    n_keys = math.ceil(height / 2) * math.ceil(width / 2) if sub_sample else n
    d = channels if mode == "gaussian" else inner
    # The dtype the block's aggregation sees: the convolutions' under autocast; gaussian's x in float32,
    # but in the autocast dtype on CUDA and in bfloat16 on the CPU.
    rows_dtype = DTYPES[dtype]
    if mode == "gaussian" and device == "cpu" and dtype == "float16":
        rows_dtype = torch.float32
    q, k, v = (torch.empty(BATCH, m, c, device=device, dtype=rows_dtype) for m, c in ((n, d), (n_keys, d), (n_keys, inner)))
    if mode == "concatenation":
        return pairwise.materialise_pairwise(q, k, v, fused=False, recomputable=True)
    fused = mode != "gaussian" or device == "cuda"
    return pairwise.materialise_pairwise(q, k, v, fused=fused)


def sdpa_backend(mode, case, device, dtype):
    """How our block's forward+backward runs the case: the path the cost rule chooses at the case's size and
    the SDPA kernels it calls (on the CPU on a small map of the case's channels with the path the rule
    chooses at full size, since the kernel does not depend on the size there; on CUDA at the case's size)."""
    keep = materialised(mode, case, device, dtype)
    module, x, grad_out = build("ours", mode, case, device)
    rule = pairwise.materialise_pairwise
    if device == "cpu":
        x = x.detach()[:, :, :12, :14].clone().requires_grad_(True)
        grad_out = grad_out[:, :, :12, :14]
        pairwise.materialise_pairwise = lambda *args, **kwargs: keep
    try:
        kernels = sdpa_kernels(lambda: forward_backward(module, x, grad_out, dtype))
    finally:
        pairwise.materialise_pairwise = rule
    path = {None: "no N x N' matrix", True: "materialised"}.get(keep, "not materialised")
    if device == "cpu" and dtype == "bfloat16" and mode in SOFTMAX_MODES:
        path += ", bfloat16 products" if keep else ", bfloat16 chunks recomputed"
    return path if kernels == "none" else f"{path}, SDPA {kernels}"


def check_same_function(mode):
    """The naive form computes what the block does (small input, float64)."""
    for sub_sample, sub_sample_input in ((True, False), (True, True), (False, False)):
        torch.manual_seed(0)
        block = NonLocalBlock2d(64, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input).double()
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(std=0.1)
        x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
        torch.testing.assert_close(MaterialisedNonLocal(block)(x), block(x))


def machine(device):
    info = {
        "cpu": cpu_name(), "cpu_flags": cpu_vector_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=NONLOCAL_MODES, default=list(NONLOCAL_MODES))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed rounds at least, after a warm-up (default 3, quick cases get more; --quick: 1)",
    )
    parser.add_argument("--quick", action="store_true", help=f"cases {', '.join(QUICK_CASES)}, 1 round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="float16/bfloat16: both forms run under torch.autocast (default float32)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--force-path", choices=list(FORCED_PATHS), default="rule",
        help="where the N x N' matrix can be kept or not (softmax modes, concatenation): as the cost rule "
             "chooses (default), or always kept / never kept, to measure the rule's alternatives",
    )
    parser.add_argument("--memory-worker", nargs=3, metavar=("IMPL", "MODE", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", nargs=2, metavar=("MODE", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--min-timing-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error(f"--repeats={repeats}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.dtype == "float16" and args.device == "cpu":
        parser.error("--dtype float16 is for --device cuda (mixed precision on the CPU is bfloat16); "
                     "valid choices on the CPU: float32, bfloat16")
    force_path(args.force_path)
    if args.memory_worker:
        return memory_worker(*args.memory_worker, args.dtype)
    if args.time_worker:
        return time_worker(*args.time_worker, repeats, args.min_timing_s, args.dtype)
    if args.force_path == "unmaterialised" and args.device == "cpu" and "gaussian" in args.modes:
        # No fused kernel takes gaussian on the CPU: not materialising would be autograd over query chunks,
        # which keeps every chunk's weights, the whole matrix in pieces.
        parser.error("--force-path unmaterialised: gaussian on the CPU has no path that keeps no N x N' matrix; "
                     "pass --modes without gaussian (valid: embedded_gaussian dot_product concatenation)")
    cases = args.cases or list(QUICK_CASES if args.quick else CASES)

    info = machine(args.device)
    where = (f"{info['gpu']} (CUDA {info['cuda']})" if args.device == "cuda" else
             f"{info['cpu']}, {info['cpu_count']} CPUs, {info['torch_threads']} threads")
    print(f"machine: {where}, torch {info['torch']}, load average {os.getloadavg()[0]:.1f}")
    memory = "allocated CUDA memory" if args.device == "cuda" else "peak RSS (fresh process each)"
    if args.force_path != "rule":
        print(f"--force-path {args.force_path}: the cost rule's choice is overridden")
    print(f"batch {BATCH}, forward+backward in {args.dtype}"
          f"{' (autocast)' if args.dtype != 'float32' else ''}; time: median of >= {repeats} alternating "
          f"rounds after a warm-up, time o/n: median of the rounds' ratios; memory: {memory} the "
          "forward+backward adds")
    header = (f"{'mode':17s} {'case':10s} {'ours ms':>8s} {'naive ms':>8s} {'time o/n':>8s} "
              f"{'ours MB':>7s} {'naive MB':>8s} {'mem o/n':>7s}  SDPA kernel (ours)")
    print(header)
    print("-" * len(header), flush=True)
    start = time.time()
    rows = []
    for mode in args.modes:
        check_same_function(mode)
        for case in cases:
            result = {"mode": mode, "case": case, "sdpa_backend": sdpa_backend(mode, case, args.device, args.dtype)}
            if args.device == "cuda":
                result.update(cuda_measure(mode, case, repeats, args.dtype))
            else:
                min_timing_s = 0.0 if args.quick else MIN_TIMING_S
                result.update(measure(mode, case, repeats, min_timing_s, args.dtype, args.force_path))
            ours, naive = result["ours"], result["naive"]
            for form in (ours, naive):
                form.update(time_s=statistics.median(form["times_s"]), min_time_s=min(form["times_s"]))
            # Median over rounds of ours/naive, each pair timed back to back: steadier than the ratio of
            # the medians when the machine's load changes during the measurement.
            result["time_ratio"] = statistics.median(
                o / n for o, n in zip(ours["times_s"], naive["times_s"])
            )
            result["memory_ratio"] = ours["peak_mb"] / naive["peak_mb"]
            if ours.get("kernel_s") and naive.get("kernel_s"):
                result["kernel_time_ratio"] = ours["kernel_s"] / naive["kernel_s"]
            result["load_average"] = os.getloadavg()[0]
            rows.append(result)
            print(f"{mode:17s} {case:10s} {1e3 * ours['time_s']:8.1f} {1e3 * naive['time_s']:8.1f} "
                  f"{result['time_ratio']:8.2f} {ours['peak_mb']:7.0f} {naive['peak_mb']:8.0f} "
                  f"{result['memory_ratio']:7.3f}  {result['sdpa_backend']}"
                  + (f"; GPU kernels {1e3 * ours['kernel_s']:.2f} / {1e3 * naive['kernel_s']:.2f} ms"
                     f" = {result['kernel_time_ratio']:.2f}" if "kernel_time_ratio" in result else ""), flush=True)
            if args.json:  # after every case, so that a run cut short leaves what it measured
                write_json(args.json, info, args, repeats, cases, rows, complete=False)
    print(f"{time.time() - start:.0f} s in all; load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        write_json(args.json, info, args, repeats, cases, rows, complete=True)
        print(f"wrote {args.json}")


def write_json(path, info, args, repeats, cases, rows, complete):
    with open(path, "w") as f:
        json.dump({"machine": info, "device": args.device, "dtype": args.dtype, "force_path": args.force_path,
                   "batch": BATCH,
                   "repeats": repeats, "quick": args.quick, "complete": complete, "cases": {
            k: dict(zip(("channels", "height", "width", "sub_sample", "sub_sample_input"), v))
            for k, v in CASES.items() if k in cases
        }, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
