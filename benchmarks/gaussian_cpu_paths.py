"""
Why `gaussian` keeps one N x N' matrix on the CPU: the forward+backward time of its attention,
softmax(x_i . x_j * s) g_j with C-channel logits against C/2-channel values, on the CPU, in three forms,
each against the naive form that builds and keeps the matrix (autograd's matmul-softmax-matmul):

* keep-one-matrix: what NonLocalBlock2d runs on the CPU (one N x N' matrix in all, chunked backward;
  nl_detectron.pairwise's materialised path);
* sdpa-padded: SDPA with the values zero-padded to C channels, since SDPA's fused CPU kernel needs one
  head size for q, k and v (without the padding it falls back to the math path, which builds the matrix);
* sdpa-chunked-backward: what the block runs on CUDA: SDPA's forward (the math path on the CPU, for the
  reason above; nothing of size N x N' is kept) and a backward that recomputes its softmax rows by chunks.

Prints the ratios form / naive, each the median of alternating rounds measured in this one run.

    python benchmarks/gaussian_cpu_paths.py                   # res4 with and without subsampling, ~2 min
    python benchmarks/gaussian_cpu_paths.py --cases res3-sub --repeats 3
"""
import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from nl_detectron.pairwise import _SdpaChunkedBackward, _SoftmaxKeepingWeights, pairwise_chunk_elements

# name: (queries N, keys N', channels C); the positions of 800 x 1333 images at res4 / res3.
CASES = {"res4-sub": (50 * 84, 25 * 42, 1024), "res4-nosub": (50 * 84, 50 * 84, 1024),
         "res3-sub": (100 * 168, 50 * 84, 512)}
BATCH = 2
CHUNK_ELEMENTS = pairwise_chunk_elements["cpu"]  # the block's chunk budget on the CPU


def naive(q, k, v, scale):
    return torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v


def keep_one_matrix(q, k, v, scale):
    chunk = max(1, CHUNK_ELEMENTS // (k.shape[0] * k.shape[1]))
    return _SoftmaxKeepingWeights.apply(q, k, v, scale, chunk)


def sdpa_padded(q, k, v, scale):
    padded = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], padded[:, None], scale=scale)
    return out[:, 0, :, : v.shape[-1]]


def sdpa_chunked_backward(q, k, v, scale):
    chunk = max(1, CHUNK_ELEMENTS // (k.shape[0] * k.shape[1]))
    return _SdpaChunkedBackward.apply(q, k, v, scale, chunk)


FORMS = {"keep-one-matrix": keep_one_matrix, "sdpa-padded": sdpa_padded,
         "sdpa-chunked-backward": sdpa_chunked_backward}


def inputs(case):
    n, n_keys, channels = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(BATCH, n, channels) * 0.5
    keys = x if n_keys == n else x[:, :n_keys].clone()
    return x, keys, torch.randn(BATCH, n_keys, channels // 2), 1.0 / math.sqrt(channels)


def forward_backward(form, q, k, v, scale):
    symmetric = k is q  # without subsampling the keys are the queries: one leaf, whose gradient has both parts
    q, v = (t.detach().requires_grad_() for t in (q, v))
    k = q if symmetric else k.detach().requires_grad_()
    start = time.perf_counter()
    out = form(q, k, v, scale)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start, out.detach(), q.grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["res4-sub", "res4-nosub"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (default 5)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: must be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, forward+backward; "
          f"ratio form / naive: median of {args.repeats} alternating rounds")
    print(f"{'case':11s} {'naive s':>8s} " + " ".join(f"{name:>22s}" for name in FORMS))
    for case in args.cases:
        q, k, v, scale = inputs(case)
        _, want_out, want_grad = forward_backward(naive, q, k, v, scale)  # also the warm-up
        for form in FORMS.values():  # warm-up, and the same function as the naive form
            _, out, grad = forward_backward(form, q, k, v, scale)
            torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-3)
        ratios = {name: [] for name in FORMS}
        naive_times = []
        for round_ in range(args.repeats):
            for name, form in FORMS.items():
                # Each form back to back with the naive one, which goes first every other round.
                pair = (naive, form) if round_ % 2 == 0 else (form, naive)
                times = dict(zip(pair, (forward_backward(f, q, k, v, scale)[0] for f in pair)))
                ratios[name].append(times[form] / times[naive])
                naive_times.append(times[naive])
        print(f"{case:11s} {statistics.median(naive_times):8.3f} "
              + " ".join(f"{statistics.median(r):22.2f}" for r in ratios.values()), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
