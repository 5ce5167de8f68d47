"""
Where `concatenation` keeps its N x N' matrix: the forward+backward time of its attention,
ReLU(u_i + v_j) g_j / N' (u = w_theta . theta_i, v = w_phi . phi_j), on the CPU, in the two forms of
nl_detectron.pairwise, each against the naive form that builds and keeps the matrix (autograd's
add-ReLU-matmul, as benchmarks/nonlocal_block.py's naive block computes it):

* kept: the one N x N' matrix of ReLU'd pairs, its gradient formed and reduced chunk by chunk;
* recomputed: query chunks of ``recomputed_chunk_elements``, each recomputed in backward (nothing of size
  N x N' kept).

The cost rule (`materialise_pairwise(..., recomputable=True)`) keeps the matrix up to
`MATERIALISE_ELEMENTS`. Prints the forms' and the naive form's median times and the ratios form / naive,
each the median of alternating rounds measured in this one run.

    python benchmarks/concatenation_paths.py                    # res4 x pooled and res4, ~1 min
    python benchmarks/concatenation_paths.py --cases res3-sub res3-nosub --repeats 3
"""
import argparse
import os
import statistics
import time

import torch

from nl_detectron.pairwise import (
    MATERIALISE_ELEMENTS, _ConcatKeepingPairs, _concat_by_chunks, recomputed_chunk_elements, pairwise_chunk_elements,
)

# name: (queries N, keys N', value channels C'); the positions of 800 x 1333 images at res4 / res3.
CASES = {"res4-poolx": (50 * 84, 25 * 42, 512), "res4-nosub": (50 * 84, 50 * 84, 512),
         "res3-sub": (100 * 168, 50 * 84, 256), "res3-nosub": (100 * 168, 100 * 168, 256)}
BATCH = 2


def naive(u, v, value):
    return (u[:, :, None] + v[:, None, :]).relu_() @ value


def kept(u, v, value):
    return _ConcatKeepingPairs.apply(u, v, value, max(1, pairwise_chunk_elements["cpu"] // (BATCH * v.shape[1])))


def recomputed(u, v, value):
    return _concat_by_chunks(u, v, value, max(1, recomputed_chunk_elements["cpu"] // (BATCH * v.shape[1])))


FORMS = {"kept": kept, "recomputed": recomputed}


def forward_backward(form, u, v, value, grad_out):
    u, v, value = (t.detach().requires_grad_() for t in (u, v, value))
    start = time.perf_counter()
    form(u, v, value).backward(grad_out)
    return time.perf_counter() - start, u.grad, v.grad, value.grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["res4-poolx", "res4-nosub"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (default 5)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: must be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, forward+backward; "
          f"ratio form / naive: median of {args.repeats} alternating rounds")
    print(f"{'case':11s} {'matrix':>7s} {'rule':>10s} {'naive ms':>9s} {'kept ms':>8s} {'recomp. ms':>10s} "
          f"{'kept/naive':>10s} {'recomp./naive':>13s}")
    for case in args.cases:
        n, n_keys, channels = CASES[case]
        torch.manual_seed(0)
        u, v = torch.randn(BATCH, n) / n_keys, torch.randn(BATCH, n_keys) / n_keys
        value, grad_out = torch.randn(BATCH, n_keys, channels), torch.randn(BATCH, n, channels)
        want = forward_backward(naive, u, v, value, grad_out)  # also the warm-up
        for form in FORMS.values():  # warm-up, and the same gradients as the naive form
            for got, expected in zip(forward_backward(form, u, v, value, grad_out)[1:], want[1:]):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        times = {name: [] for name in ("naive", *FORMS)}
        ratios = {name: [] for name in FORMS}
        for round_ in range(args.repeats):
            for name, form in FORMS.items():
                # Each form back to back with the naive one, which goes first every other round.
                pair = (naive, form) if round_ % 2 == 0 else (form, naive)
                measured = dict(zip(pair, (forward_backward(f, u, v, value, grad_out)[0] for f in pair)))
                ratios[name].append(measured[form] / measured[naive])
                times[name].append(measured[form])
                times["naive"].append(measured[naive])
        elements = BATCH * n * n_keys
        rule = "kept" if elements <= MATERIALISE_ELEMENTS else "recomputed"
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        print(f"{case:11s} {elements / 1e6:6.0f}M {rule:>10s} {ms['naive']:9.0f} {ms['kept']:8.0f} "
              f"{ms['recomputed']:10.0f} {statistics.median(ratios['kept']):10.3f} "
              f"{statistics.median(ratios['recomputed']):13.3f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
