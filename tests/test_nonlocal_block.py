"""
NonLocalBlock2d against the literal reference in reference_nonlocal.py (full pairwise matrix): outputs and
gradients, identity at initialisation, res4 sizes, reduced precision, chunking, argument errors.
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import nl_detectron.pairwise as pairwise
from nl_detectron import layout
from nl_detectron.subsample import max_pool_2x2
from nl_detectron.nonlocal_block import (
    NONLOCAL_MODES,
    NONLOCAL_NORMS,
    NonLocalArgumentError,
    NonLocalBlock2d,
)
from reference_nonlocal import (
    batch_norm_eval,
    block_weights,
    embeddings,
    group_norm,
    reference_nonlocal,
    reference_pairwise,
)

SOFTMAX_MODES = ("embedded_gaussian", "gaussian")


def randomize_(block, generator):
    """Random weights of reasonable magnitude everywhere, W_z included (it is zero at initialisation)."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            elif name.startswith("w_z.norm"):  # the norm's scale
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
    return block


def assert_close_rel(actual, expected, rel, scale=None):
    """|actual - expected| <= rel * (|expected| + scale) element-wise; scale defaults to max |expected|."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def forward_backward(fn, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    z = fn(x)
    z.backward(grad_out)
    return z.detach(), x.grad


# sub_sample, sub_sample_input: no subsampling; the paper's max-pool of phi(x) and g(x); the authors'
# code's max-pool of x before phi and g.
SUBSAMPLING = {"none": (False, False), "pool_phi_g": (True, False), "pool_input": (True, True)}


# The softmax modes' paths in nl_detectron.pairwise, forced whatever the cost rule would choose:
# "materialised" keeps the one N x N' matrix; "unmaterialised" keeps none (SDPA's fused kernel);
# "chunked_backward" is SDPA's forward with a backward over query chunks (CUDA's path for head dims over
# 256 where the matrix is not kept). "rule": as the cost rule chooses.
PATHS = ("materialised", "unmaterialised", "chunked_backward")


def force_path(monkeypatch, path):
    """``path``: one of PATHS or "rule"; "materialised_16bit" keeps 16-bit weights, as CUDA does for 16-bit
    inputs (on the CPU its products run in float32 rather than through ``out_dtype``)."""
    if path == "rule":
        return
    materialised = path.startswith("materialised")
    monkeypatch.setattr(pairwise, "materialise_pairwise", lambda *args, **kwargs: materialised)
    monkeypatch.setattr(pairwise, "_slow_fused_backward", lambda query: path == "chunked_backward")
    if path == "materialised_16bit":
        real = pairwise._weights_dtype
        monkeypatch.setattr(
            pairwise, "_weights_dtype",
            lambda query, dtype: query.dtype if query.dtype in (torch.float16, torch.bfloat16) else real(query, dtype),
        )


def force_chunked_backward(monkeypatch):
    force_path(monkeypatch, "chunked_backward")


def mode_paths(mode):
    """The paths ``mode`` has: the softmax modes three, concatenation two, dot_product one."""
    if mode == "concatenation":
        return PATHS[:2]
    return PATHS if mode in SOFTMAX_MODES else ("rule",)


def assert_matches_reference_float64(block, gen, height, width):
    """Output, input gradient and parameter gradients of ``block`` (float64) against the reference."""
    mode, sub_sample, sub_sample_input = block.mode, block.sub_sample, block.sub_sample_input
    randomize_(block, gen)
    weights = block_weights(block)
    x = torch.randn(2, block.in_channels, height, width, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    z, x_grad = forward_backward(block, x, grad_out)
    z_ref, x_grad_ref = forward_backward(
        lambda t: reference_nonlocal(
            t, weights, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input,
            use_scale=block.use_scale,
        ),
        x,
        grad_out,
    )
    assert z.shape == x.shape
    assert_close_rel(z, z_ref, 1e-6)
    assert_close_rel(x_grad, x_grad_ref, 1e-6)
    with torch.no_grad():  # inference has paths of its own (e.g. sub_sample_input's channels-last pooling)
        assert_close_rel(block(x), z_ref, 1e-6)
    # Relative to the case's largest parameter gradient: in the softmax modes phi's bias has an exactly
    # zero gradient (a query's logits all shift by theta_i . b_phi), so per-tensor relative is moot.
    params = dict(block.named_parameters())
    assert set(params) == {k for k, v in weights.items() if v is not None}
    scale = max(w.grad.abs().max().item() for w in weights.values() if w is not None)
    for name, p in params.items():
        assert_close_rel(p.grad, weights[name].grad, 1e-6, scale=scale)


MODES_AND_PATHS = [(mode, path) for mode in NONLOCAL_MODES for path in mode_paths(mode)]


def rule_rows(n, n_keys, d, value_channels, dtype=torch.float32):
    """Empty (meta) query/key/value rows of a batch of two, for the cost rule, which reads only shapes."""
    return [torch.empty(2, m, c, dtype=dtype, device="meta") for m, c in ((n, d), (n_keys, d), (n_keys, value_channels))]


BENCHMARK_CASES = [(4200, 1050, 1024), (4200, 4200, 1024), (16800, 4200, 512), (16800, 16800, 512)]


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,n_keys,channels", BENCHMARK_CASES)
def test_cost_rule_on_the_cpu(monkeypatch, n, n_keys, channels, dtype, capability):
    # The benchmark's cases (res4/res3, with and without subsampling, batch 2). Embedded Gaussian keeps
    # the matrix in bfloat16 up to 2^28 elements (everywhere but res3 without subsampling, 0.56e9), in
    # float32 on AVX-512 up to 2^26 (res4), and otherwise leaves it to the fused kernel. Gaussian (C-channel
    # logits, C/2-channel values: no fused kernel) always keeps it. Concatenation keeps it up to 2^28.
    monkeypatch.setattr(pairwise, "_cpu_capability", lambda: capability)
    inner = channels // 2
    elements = 2 * n * n_keys
    if dtype == torch.bfloat16:
        expected = elements <= 1 << 28
    else:
        expected = capability == "AVX512" and elements <= 1 << 26
    assert pairwise.materialise_pairwise(*rule_rows(n, n_keys, inner, inner, dtype), fused=True) == expected
    assert pairwise.materialise_pairwise(*rule_rows(n, n_keys, channels, inner, dtype), fused=False)
    concatenation = pairwise.materialise_pairwise(*rule_rows(n, n_keys, inner, inner, dtype), False, True)
    assert concatenation == (n_keys != 16800)


def large_logits_rows(split):
    """
    bfloat16 rows (exact) whose logits are +-256 plus a term of order 1-10 that varies with i and j:
    every query holds 16 in channel 0, and so does every key (``split``: half the keys, the others -16).
    bfloat16 spaces numbers near 256 by 2, so rounded there the varying term is lost. Centring the keys
    removes a shared 16, not the split.
    """
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(1, 48, 16, generator=gen)
    key = torch.randn(1, 64, 16, generator=gen)
    query[..., 0], key[..., 0] = 16.0, 16.0
    if split:
        key[:, 32:, 0] = -16.0
    value = torch.randn(1, 64, 8, generator=gen)
    return [t.bfloat16().requires_grad_(True) for t in (query, key, value)]


def bfloat16_attention_error(query, key, value):
    out = pairwise.softmax_attention(query, key, value, scale=1.0)
    assert out.dtype == torch.bfloat16
    exact = torch.softmax(query.double() @ key.double().transpose(1, 2), dim=-1) @ value.double()
    return torch.linalg.vector_norm(out.double() - exact) / torch.linalg.vector_norm(exact)


# The bfloat16 paths on the CPU: the kept matrix and the recomputed chunks.
BFLOAT16_PATHS = ("materialised", "unmaterialised")


@pytest.mark.parametrize("path", BFLOAT16_PATHS)
@pytest.mark.parametrize("bound,fails", [(pairwise.BFLOAT16_LOGIT_BOUND, False), (float("inf"), True)])
def test_bfloat16_logits_beyond_the_bound_go_through_float32(monkeypatch, bound, fails, path):
    # The bfloat16 paths round the centred logits to bfloat16; rows where that could move the weights
    # are computed again from float32 products. Without that (bound = inf) this case loses its attention.
    force_path(monkeypatch, path)
    monkeypatch.setattr(pairwise, "BFLOAT16_LOGIT_BOUND", bound)
    error = bfloat16_attention_error(*large_logits_rows(split=True))
    # Measured: 4.0e-3 with the float32 rows (the output's own bfloat16 rounding), 0.24 without.
    assert (error > 0.05) == fails, f"relative error {error:.2e}"


@pytest.mark.parametrize("path", BFLOAT16_PATHS)
def test_bfloat16_logits_of_centred_keys(monkeypatch, path):
    # Keys that share a large component stay on bfloat16 products: centring them leaves only the varying
    # term to round. With the float32 rows turned off, it must still match (uncentred: 0.24).
    force_path(monkeypatch, path)
    monkeypatch.setattr(pairwise, "BFLOAT16_LOGIT_BOUND", float("inf"))
    error = bfloat16_attention_error(*large_logits_rows(split=False))
    assert error < 0.05, f"relative error {error:.2e}"


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
@pytest.mark.parametrize("mode,path", MODES_AND_PATHS)
def test_matches_reference_float64(monkeypatch, mode, path, subsampling, use_scale):
    force_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(0)
    sub_sample, sub_sample_input = SUBSAMPLING[subsampling]
    for height, width in ((5, 7), (6, 8)):  # odd sizes exercise the ceil-mode pooling
        block = NonLocalBlock2d(
            16, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input, use_scale=use_scale
        ).double()
        assert_matches_reference_float64(block, gen, height, width)


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_chunked_backward_matches_reference_float64(monkeypatch, mode, subsampling, use_scale):
    # The softmax modes' path on CUDA for embeddings over 256-d where the matrix is not kept: SDPA
    # forward, backward by query chunks that recompute their softmax rows.
    # Forced here on the CPU, with chunks of 5 query rows, so that several chunks and a ragged last one run.
    force_chunked_backward(monkeypatch)
    chunks = []
    real_row_chunks = pairwise._row_chunks
    monkeypatch.setattr(
        pairwise, "_row_chunks", lambda n, chunk: chunks.append(chunk) or real_row_chunks(n, chunk)
    )
    gen = torch.Generator().manual_seed(7)
    sub_sample, sub_sample_input = SUBSAMPLING[subsampling]
    block = NonLocalBlock2d(
        16, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input, use_scale=use_scale
    ).double()
    height, width = 5, 7
    num_keys = math.prod(block.key_grid(height, width))
    monkeypatch.setitem(pairwise.pairwise_chunk_elements, "cpu", 2 * num_keys * 5)
    assert_matches_reference_float64(block, gen, height, width)
    # The chunked backward ran, once, in chunks of 5 of the 35 queries (and gaussian's inference, which
    # on the CPU goes by query chunks, once more).
    assert chunks == [5] * (2 if mode == "gaussian" else 1)


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_matches_reference_with_norm_float64(norm):
    gen = torch.Generator().manual_seed(1)
    block = NonLocalBlock2d(64, norm=norm).double()
    randomize_(block, gen)
    bn = block.w_z.norm
    if norm == "BN":
        bn.running_mean.copy_(torch.randn(64, generator=gen))
        bn.running_var.copy_(torch.rand(64, generator=gen) + 0.5)
    block.eval()
    weights = block_weights(block)
    assert weights["w_z.bias"] is None  # the norm's shift replaces the conv's bias
    gamma = bn.weight.detach().clone().requires_grad_(True)
    beta = bn.bias.detach().clone().requires_grad_(True)
    if norm == "BN":
        reference_norm = batch_norm_eval(gamma, beta, bn.running_mean, bn.running_var, bn.eps)
    else:
        reference_norm = group_norm(32, gamma, beta, bn.eps)
    x = torch.randn(2, 64, 5, 6, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    z, x_grad = forward_backward(block, x, grad_out)
    z_ref, x_grad_ref = forward_backward(
        lambda t: reference_nonlocal(
            t, weights, mode="embedded_gaussian", sub_sample=True, use_scale=True, norm=reference_norm
        ),
        x,
        grad_out,
    )
    assert_close_rel(z, z_ref, 1e-6)
    assert_close_rel(x_grad, x_grad_ref, 1e-6)
    assert_close_rel(bn.weight.grad, gamma.grad, 1e-6)
    assert_close_rel(bn.bias.grad, beta.grad, 1e-6)
    assert_close_rel(block.w_z.weight.grad, weights["w_z.weight"].grad, 1e-6)


# Without a process group, nn.SyncBatchNorm ("SyncBN", "nnSyncBN") falls back to BatchNorm in train and eval
# mode, and detectron2's NaiveSyncBatchNorm ("naiveSyncBN") does so at world size 1, so every norm runs on CPU
# here. (Under an initialised CPU/gloo process group nn.SyncBatchNorm refuses CPU tensors in train mode;
# naiveSyncBN is the one that syncs on CPU.)
@pytest.mark.parametrize("norm", NONLOCAL_NORMS)
@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_identity_at_initialisation_then_learns(mode, norm):
    torch.manual_seed(0)
    block = NonLocalBlock2d(32, mode=mode, norm=norm)
    x = torch.randn(2, 32, 6, 7)
    for training in (False, True):
        block.train(training)
        assert torch.equal(block(x), x), f"not an identity in {'train' if training else 'eval'} mode"

    # One SGD step: the gradient reaches W_z (its conv when there is no norm, the norm's zero scale
    # otherwise), and the block stops being an identity.
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    z = block(x)
    (z * torch.randn_like(z)).sum().backward()
    zero_init = block.w_z.norm.weight if norm else block.w_z.weight
    assert zero_init.grad is not None and zero_init.grad.abs().max() > 0
    optimizer.step()
    assert (block(x) - x).abs().max() > 1e-4
    block.eval()
    assert (block(x) - x).abs().max() > 1e-4


def res4_case(mode):
    """Sizes of ResNet res4 (stride 16) for a batch of two 800 x 1333 images, 1024 channels."""
    if mode == "concatenation":
        # The literal reference builds the (B, 2C', N, N') tensor of concatenated pairs: 36 GB at the res4
        # size even with subsampling. Keep res4's 1024 channels on a smaller 20 x 34 map (1.9 GB in chunks).
        return 2, 1024, 20, 34
    return 2, 1024, 50, 84


@pytest.mark.parametrize(
    "mode,subsampling",
    [(m, "pool_phi_g") for m in NONLOCAL_MODES]
    + [("embedded_gaussian", "none"), ("embedded_gaussian", "pool_input")],
)
def test_float32_res4_sizes(mode, subsampling):
    gen = torch.Generator().manual_seed(2)
    sub_sample, sub_sample_input = SUBSAMPLING[subsampling]
    b, c, h, w = res4_case(mode)
    block = NonLocalBlock2d(c, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input)
    randomize_(block, gen)
    x = torch.randn(b, c, h, w, generator=gen)
    with torch.no_grad():
        residual = block(x) - x
        # Ground truth in float64 from the same float32 weights and input.
        reference = reference_nonlocal(
            x.double(), block_weights(block, torch.float64), mode=mode, sub_sample=sub_sample,
            sub_sample_input=sub_sample_input, use_scale=True, query_chunk=64,
        ) - x.double()
    # float32 keeps 24 bits (6e-8 relative); sums over 1024 channels and up to 4200 keys grow the rounding
    # error to ~1e-6 of the output's scale (measured: at most 1.5e-6). 1e-5 leaves margin but still
    # catches any wrong key, scale or pooling (errors of order 1).
    assert residual.dtype == torch.float32
    assert_close_rel(residual.double(), reference, 1e-5)


@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_float32_channels_last_copy(mode, subsampling):
    # In float32 theta, phi and g convolve one channels-last copy of x where they all read x and there are
    # at least four keys per channel (layout.for_convolutions; here 8 channels, 140 or 35 keys). Output
    # and every gradient stay float32-close to the float64 reference, and the output and x's gradient
    # keep x's layout.
    sub_sample, sub_sample_input = SUBSAMPLING[subsampling]
    gen = torch.Generator().manual_seed(4)
    block = randomize_(NonLocalBlock2d(8, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input), gen)
    inputs = {}
    for name in ("theta", "phi", "g"):
        if getattr(block, name) is not None:
            getattr(block, name).register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]}))
    weights = block_weights(block, torch.float64)
    x = torch.randn(2, 8, 14, 10, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)
    z, x_grad = forward_backward(block, x, grad_out)
    z_ref, x_grad_ref = forward_backward(
        lambda t: reference_nonlocal(
            t, weights, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input, use_scale=True
        ),
        x.double(), grad_out.double(),
    )
    copied = mode != "gaussian" and not sub_sample_input
    assert {name: layout.is_channels_last(t) for name, t in inputs.items()} == {name: copied for name in inputs}
    assert z.is_contiguous() and x_grad.is_contiguous()
    assert_close_rel(z.double(), z_ref, 1e-5)
    assert_close_rel(x_grad.double(), x_grad_ref, 1e-5)
    params = dict(block.named_parameters())
    scale = max(w.grad.abs().max().item() for w in weights.values() if w is not None)
    for name, p in params.items():
        assert_close_rel(p.grad.double(), weights[name].grad, 1e-5, scale=scale)


def large_magnitude_case(mode, dtype=torch.float32):
    """
    A block and input whose embedded dot products theta_i . phi_j (x_i . x_j for gaussian) exceed float16's
    range although the attention is well-conditioned, as with ReLU features that share a large component:
    half of x's channels hold the constant 64, which theta and phi map to 128 in half of their channels
    (all exact in bfloat16/float16), so every dot product is 16 * 128^2 = 262144 (gaussian: 32 * 64^2 =
    131072) plus a moderate term that varies with i and j.
    """
    gen = torch.Generator().manual_seed(3)
    c, d = 64, 32
    block = randomize_(NonLocalBlock2d(c, mode=mode), gen)
    with torch.no_grad():
        for embed in (block.theta, block.phi):
            if embed is None:
                continue
            embed.bias.zero_()
            weight = embed.weight.view(d, c)
            weight[:, : c // 2] = 0
            weight[: d // 2, c // 2 :] = 0
            weight[: d // 2, : d // 2] = 2 * torch.eye(d // 2)  # channel k < 16 reads constant channel k
    x = torch.randn(2, c, 6, 8, generator=gen)
    x[:, : c // 2] = 64.0
    return block.to(dtype), x.to(dtype)


def max_embedded_dot_product(block, x):
    weights = block_weights(block, torch.float64)
    theta, phi, _ = embeddings(x.double(), weights, mode=block.mode, sub_sample=block.sub_sample)
    return torch.einsum("bnd,bmd->bnm", theta, phi).abs().max().item()


# Relative error bounds of the residual under autocast. bfloat16 keeps 8 significant bits (unit roundoff 2^-8
# ~ 4e-3): autocast rounds x, the weights and each conv/attention output, a chain of a few roundings
# (measured: 3e-3 to 4.5e-3 of the residual's norm); float16 keeps 11 (measured: ~4e-4). The bounds leave
# 4-7x margin and still fail on any overflow or wrong result (errors of order 1).
AUTOCAST_BOUNDS = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
# dot_product's output theta_i . sum_j phi_j g_j / N' (~1e7 here) is itself beyond float16: no block can
# hand it to a float16 W_z. Its float16 case is left out (it is run in bfloat16).
AUTOCAST_CASES = [
    pytest.param(mode, dtype, id=f"{mode}-{str(dtype).split('.')[1]}")
    for dtype in (torch.bfloat16, torch.float16) for mode in NONLOCAL_MODES
    if (mode, dtype) != ("dot_product", torch.float16)
]
# Every path of every mode, forced (embedded_gaussian's 16-bit convolutions also with 16-bit weights kept).
AUTOCAST_CASES_AND_PATHS = [
    pytest.param(*case.values, path, id=f"{case.id}-{path}")
    for case in AUTOCAST_CASES
    for path in mode_paths(case.values[0]) + (("materialised_16bit",) if case.values[0] == "embedded_gaussian" else ())
]


@pytest.mark.parametrize("mode,dtype,path", AUTOCAST_CASES_AND_PATHS)
def test_autocast_large_dot_products(monkeypatch, mode, dtype, path):
    force_path(monkeypatch, path)
    block, x = large_magnitude_case(mode)
    assert max_embedded_dot_product(block, x) > 65504  # beyond float16's largest finite value
    x.requires_grad_(True)
    with torch.no_grad():
        expected = block(x) - x
    with torch.autocast("cpu", dtype=dtype):
        z = block(x)
    assert z.dtype == torch.float32  # x + W_z(y): the residual add promotes
    assert torch.isfinite(z).all()
    error = torch.linalg.vector_norm(z - x - expected) / torch.linalg.vector_norm(expected)
    assert error < AUTOCAST_BOUNDS[dtype], f"relative error {error:.2e}"
    # A mean-reduced loss, as a training loss is (a sum over thousands of positions of activations ~1e4
    # overflows any float16 weight gradient: what AMP's gradient scaler is for).
    z.mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("path", ["materialised", "materialised_16bit", "chunked_backward"])
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_autocast_float16_leaves_the_products_in_their_dtype(monkeypatch, mode, path):
    # float16 autocast casts a product's float32 operands back to float16, where logits and sums over
    # positions can overflow: the softmax paths turn it off for their products, forward and backward (the
    # backward runs under autocast where it is called inside it).
    force_path(monkeypatch, path)
    products = []  # (dtype asked for, dtype returned) of every product
    real_bmm = pairwise._bmm

    def recording_bmm(a, b, dtype):
        out = real_bmm(a, b, dtype)
        products.append((dtype, out.dtype))
        return out

    monkeypatch.setattr(pairwise, "_bmm", recording_bmm)
    block, x = large_magnitude_case(mode)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        block(x).mean().backward()
    assert products and all(asked == returned for asked, returned in products), products


@pytest.mark.parametrize("mode,path", MODES_AND_PATHS + [("embedded_gaussian", "materialised_16bit")])
def test_autocast_bfloat16_gradients(monkeypatch, mode, path):
    force_path(monkeypatch, path)
    # Mixed-precision training: the backward of every path (the projections' autograd Function included)
    # runs on bfloat16 gradients and hands float32 gradients to float32 inputs and parameters.
    gen = torch.Generator().manual_seed(5)
    block = randomize_(NonLocalBlock2d(64, mode=mode), gen)
    x = torch.randn(2, 64, 9, 10, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)
    grads = {}
    for precision in ("float32", "bfloat16"):
        block.zero_grad()
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            z = block(xx)
        z.backward(grad_out)
        params = [p.grad for p in block.parameters()]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in [xx.grad] + params)
        grads[precision] = (xx.grad, torch.cat([g.flatten() for g in params]))
    # Measured: x's gradient 0.7e-2 to 2.1e-2 off, the parameters' (weight gradients sum bfloat16 products
    # over every position) 0.6e-2 to 4.8e-2; a broken or missing path is off by ~1.
    for (exact, mixed), bound in zip(zip(grads["float32"], grads["bfloat16"]), (5e-2, 1.5e-1)):
        error = torch.linalg.vector_norm(mixed - exact) / torch.linalg.vector_norm(exact)
        assert error < bound, f"relative error {error:.2e}"


# dot_product is left out: its output theta_i . sum_j phi_j g_j / N' (~1e7 here) is itself beyond float16.
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "concatenation"])
def test_float16_on_cpu_large_dot_products(mode):
    block, x = large_magnitude_case(mode)
    assert max_embedded_dot_product(block, x) > 65504
    with torch.no_grad():
        expected = block(x) - x
        # The naive float16 product overflows; the block computes the attention in float32.
        embedded = x.half() if mode == "gaussian" else block.theta.half()(x.half())
        q = embedded.flatten(2).transpose(1, 2)
        assert torch.isinf(q @ q.transpose(1, 2)).any()
        block.half()
        z = block(x.half())
    assert z.dtype == torch.float16
    assert torch.isfinite(z).all()
    # float16 keeps 11 significant bits (rounding 2^-12 ~ 2.4e-4), 8x finer than bfloat16 (measured:
    # 5e-4 to 6e-4 of the residual's norm); 3e-3 leaves 5x margin.
    error = torch.linalg.vector_norm(z.float() - x - expected) / torch.linalg.vector_norm(expected)
    assert error < 3e-3, f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_embedded_gaussian_runs_the_fused_cpu_kernel(monkeypatch, sub_sample, dtype, memory_format):
    # Restricted to the flash kernel, SDPA raises instead of silently falling back to the math path (which
    # materialises the N x N' matrix), e.g. for q/k/v without a unit stride along the channels. The path
    # that keeps no matrix is forced (at this size the cost rule keeps it); inference takes SDPA anyway.
    # bfloat16 training without the matrix recomputes bfloat16 chunks instead (_SoftmaxBfloat16Recomputed).
    force_path(monkeypatch, "unmaterialised")
    block = NonLocalBlock2d(32, sub_sample=sub_sample).to(dtype)
    x = torch.randn(2, 32, 6, 7, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_(True)
    calls = []
    real_sdpa = pairwise.F.scaled_dot_product_attention
    monkeypatch.setattr(pairwise.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        block(x).sum().backward()
        with torch.no_grad():
            block(x)
    assert x.grad is not None and len(calls) == (1 if dtype == torch.bfloat16 else 2)


@pytest.mark.parametrize("autocast", [False, True])  # bfloat16 autocast: x goes channels-last inside
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_keeps_the_input_layout(mode, subsampling, memory_format, autocast):
    # The block works on rows inside; what it returns, and the gradient it hands back, are in x's own layout, so the layers around it keep their kernels (and the block is exactly
    # the identity at initialisation, whatever the layout).
    sub_sample, sub_sample_input = SUBSAMPLING[subsampling]
    block = NonLocalBlock2d(32, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input)
    x = torch.randn(2, 32, 7, 6).contiguous(memory_format=memory_format).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = block(x)
    assert z.dtype == torch.float32
    assert torch.equal(z, x)
    assert z.is_contiguous(memory_format=memory_format)
    z.backward(torch.randn_like(z))
    assert x.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("sub_sample_input", [False, True])
@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product"])
def test_theta_gets_its_gradient_in_its_own_layout(monkeypatch, mode, sub_sample_input, autocast):
    # The materialised softmax and the dot product hand theta's map its gradient in that map's layout (NCHW
    # for an NCHW x; channels-last where theta runs on a channels-last copy of x),
    # since a 1x1 convolution's backward on the other layout first copies it. Values are checked elsewhere.
    force_path(monkeypatch, "materialised")
    block = NonLocalBlock2d(32, mode=mode, sub_sample_input=sub_sample_input)
    randomize_(block, torch.Generator().manual_seed(0))
    layouts = []

    def record(module, inputs, output):
        output.register_hook(lambda grad: layouts.append((
            grad.is_contiguous(), output.is_contiguous(),
            grad.is_contiguous(memory_format=torch.channels_last),
            output.is_contiguous(memory_format=torch.channels_last),
        )))

    block.theta.register_forward_hook(record)
    x = torch.randn(2, 32, 7, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = block(x)
    z.backward(torch.randn_like(z))
    (grad_nchw, out_nchw, grad_last, out_last), = layouts
    # theta convolves a channels-last copy of x under autocast (in float32 only with four keys per channel).
    copied = autocast
    assert out_nchw != copied and out_last == copied
    assert (grad_nchw, grad_last) == (out_nchw, out_last)


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_materialised_softmax_keeps_one_matrix_and_says_so_on_a_second_backward(monkeypatch, mode):
    # The materialised path keeps its softmax weights and turns them into the logits' gradient in place: a
    # second backward through the same graph must fail loudly rather than use the overwritten weights.
    force_path(monkeypatch, "materialised")
    block = NonLocalBlock2d(16, mode=mode)
    x = torch.randn(2, 16, 6, 7, requires_grad=True)
    z = block(x)
    z.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])  # bfloat16: through channels-last
def test_key_max_pool_matches_torch_with_ties_and_odd_sizes(dtype):
    # The block's 2x2 max-pool finds its maxima again in backward instead of keeping indices: the same
    # values and gradients as F.max_pool2d(ceil_mode=True), ties (ReLU's zeros) included.
    x = torch.relu(torch.randn(2, 3, 7, 9, dtype=dtype)).requires_grad_(True)
    grad = torch.randn(2, 3, 4, 5, dtype=dtype)
    expected = torch.autograd.grad(torch.nn.functional.max_pool2d(x, 2, ceil_mode=True), x, grad)[0]
    y = max_pool_2x2(x)
    assert torch.equal(y, torch.nn.functional.max_pool2d(x, 2, ceil_mode=True))
    assert torch.equal(torch.autograd.grad(y, x, grad)[0], expected)
    # The layouts it is handed in a model: a channels-last gradient (from a convolution's backward), a
    # channels-last map.
    channels_last = grad.contiguous(memory_format=torch.channels_last)
    grad_nchw = torch.autograd.grad(max_pool_2x2(x), x, channels_last)[0]
    assert torch.equal(grad_nchw, expected)
    assert grad_nchw.is_contiguous()  # the gradient keeps x's layout
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.equal(max_pool_2x2(x_last), y)
    grad_last = torch.autograd.grad(max_pool_2x2(x_last), x_last, channels_last)[0]
    assert torch.equal(grad_last, expected)
    assert grad_last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_forward_hooks_on_theta_phi_g_and_w_z_fire(mode):
    # theta, phi and g run as the modules they are (not as one concatenated convolution), so that hooks
    # on them see their inputs and outputs, in forward and backward.
    block = NonLocalBlock2d(32, mode=mode, sub_sample_input=True)
    names = ["g", "w_z"] if mode == "gaussian" else ["theta", "phi", "g", "w_z"]
    seen = []
    for name in names:
        module = getattr(block, name)
        module.register_forward_hook(lambda m, inputs, output, name=name: seen.append((name, output.shape[-2:])))
        module.register_full_backward_hook(lambda m, grad_in, grad_out, name=name: seen.append((name, "backward")))
    x = torch.randn(2, 32, 7, 6, requires_grad=True)
    block(x).sum().backward()
    pooled, full = torch.Size([4, 3]), torch.Size([7, 6])
    grids = {"theta": full, "phi": pooled, "g": pooled, "w_z": full}
    assert sorted(seen, key=str) == sorted([(n, grids[n]) for n in names] + [(n, "backward") for n in names], key=str)


@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_pairwise_weights(mode, sub_sample):
    gen = torch.Generator().manual_seed(4)
    block = randomize_(NonLocalBlock2d(16, mode=mode, sub_sample=sub_sample), gen).double()
    x = torch.randn(2, 16, 5, 7, generator=gen, dtype=torch.float64)
    weights, grid = block.pairwise_weights(x)
    assert grid == ((3, 4) if sub_sample else (5, 7))
    assert weights.shape == (2, 35, grid[0] * grid[1])
    if mode in SOFTMAX_MODES:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 35, dtype=torch.float64))
    reference = reference_pairwise(
        x, block_weights(block), mode=mode, sub_sample=sub_sample, use_scale=True
    )
    assert_close_rel(weights, reference, 1e-6)


def test_concatenation_query_chunks_do_not_change_results(monkeypatch):
    force_path(monkeypatch, "unmaterialised")
    gen = torch.Generator().manual_seed(5)
    block = randomize_(NonLocalBlock2d(16, mode="concatenation", sub_sample=False), gen).double()
    x = torch.randn(2, 16, 6, 8, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def run():
        block.zero_grad(set_to_none=True)
        z, x_grad = forward_backward(block, x, grad_out)
        return [z, x_grad] + [p.grad.clone() for p in block.parameters()]

    whole = run()
    calls = []
    real_checkpoint = pairwise.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(pairwise, "checkpoint", counting_checkpoint)
    # 48 queries x 48 keys x batch 2: 200 elements -> chunks of 2 queries; 1 element -> 1 query per chunk.
    for elements, num_chunks in ((200, 24), (1, 48)):
        monkeypatch.setitem(pairwise.recomputed_chunk_elements, "cpu", elements)
        calls.clear()
        chunked = run()
        assert len(calls) == num_chunks  # recomputed per chunk in backward
        for a, b in zip(chunked, whole):
            assert_close_rel(a, b, 1e-12)
    # And without grad, the chunks are not checkpointed at all.
    calls.clear()
    with torch.no_grad():
        assert_close_rel(block(x), whole[0], 1e-12)
    assert not calls


@pytest.mark.parametrize("sub_sample", [True, False])
def test_materialised_softmax_query_chunks_do_not_change_results(monkeypatch, sub_sample):
    # gaussian on the CPU, which the cost rule always materialises (its fused kernel needs C' == d).
    gen = torch.Generator().manual_seed(6)
    block = randomize_(NonLocalBlock2d(16, mode="gaussian", sub_sample=sub_sample), gen).double()
    x = torch.randn(2, 16, 6, 8, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    weights = block_weights(block)
    reference, reference_grad = forward_backward(
        lambda t: reference_nonlocal(t, weights, mode="gaussian", sub_sample=sub_sample, use_scale=True),
        x,
        grad_out,
    )
    calls = []  # (rows per chunk, number of chunks) of every split into chunks
    real_row_chunks = pairwise._row_chunks

    def counting_row_chunks(num_rows, chunk):
        chunks = real_row_chunks(num_rows, chunk)
        calls.append((chunk, len(chunks)))
        return chunks

    monkeypatch.setattr(pairwise, "_row_chunks", counting_row_chunks)
    num_keys = 12 if sub_sample else 48
    # 48 queries in chunks of budget / (batch * keys) rows.
    for elements, num_chunks in ((1 << 22, 1), (2 * num_keys * 5, 10), (1, 48)):
        monkeypatch.setitem(pairwise.pairwise_chunk_elements, "cpu", elements)
        chunk = max(1, elements // (2 * num_keys))
        calls.clear()
        block.zero_grad(set_to_none=True)
        z, x_grad = forward_backward(block, x, grad_out)
        # The softmax chunks in forward (over the rows of both batch elements) and backward (per batch
        # element, as many elements per chunk); no split where one chunk holds every row (the whole batch
        # in one call).
        forward = [] if num_chunks == 1 else [(2 * chunk, num_chunks)]
        backward = [] if 2 * chunk >= 48 else [(2 * chunk, -(-48 // (2 * chunk)))] * 2
        assert sorted(calls) == sorted(forward + backward)
        assert_close_rel(z, reference, 1e-6)
        assert_close_rel(x_grad, reference_grad, 1e-6)
        scale = max(w.grad.abs().max().item() for w in weights.values() if w is not None)
        for name, p in block.named_parameters():
            assert_close_rel(p.grad, weights[name].grad, 1e-6, scale=scale)
        # Inference runs the same chunks without keeping the weights.
        calls.clear()
        with torch.no_grad():
            assert_close_rel(block(x), reference, 1e-6)
        assert calls == [(chunk, num_chunks)]


BAD_ARGUMENTS = [
    (dict(in_channels=64, mode="embeded_gaussian"), "mode", ["'embeded_gaussian'", "'embedded_gaussian'"]),
    (dict(in_channels=64, norm="IN"), "norm", ["'IN'", "'BN'", "'GN'"]),
    (dict(in_channels=64, norm="FrozenBN"), "norm", ["'FrozenBN'", "'BN'"]),
    (dict(in_channels=48, norm="GN"), "norm", ["'GN'", "in_channels=48"]),
    (dict(in_channels=64, sub_sample=False, sub_sample_input=True), "sub_sample_input",
     ["sub_sample_input=True", "sub_sample=True", "valid choices"]),
    (dict(in_channels=64, sub_sample_input="yes"), "sub_sample_input", ["sub_sample_input='yes'", "bool"]),
    (dict(in_channels=64, reduction=3), "reduction", ["reduction=3", "in_channels=64"]),
    (dict(in_channels=64, reduction=128), "reduction", ["reduction=128", "in_channels=64"]),
    (dict(in_channels=64, reduction=0), "reduction", ["reduction=0", "positive"]),
    (dict(in_channels=0), "in_channels", ["in_channels=0", "positive"]),
    (dict(in_channels=-8), "in_channels", ["in_channels=-8", "positive"]),
    (dict(in_channels=64.0), "in_channels", ["in_channels=64.0", "integer"]),
]


@pytest.mark.parametrize("kwargs,argument,fragments", BAD_ARGUMENTS)
def test_bad_arguments_are_named(kwargs, argument, fragments):
    in_channels = kwargs.pop("in_channels")
    with pytest.raises(NonLocalArgumentError) as info:
        NonLocalBlock2d(in_channels, **kwargs)
    assert info.value.argument == argument
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "shape,fragments",
    [((2, 64, 8), ["4-D", "(2, 64, 8)"]), ((2, 32, 4, 4), ["in_channels=64", "32 channels"])],
)
def test_bad_input_is_named(shape, fragments):
    block = NonLocalBlock2d(64)
    with pytest.raises(ValueError) as info:
        block(torch.zeros(shape))
    for fragment in fragments:
        assert fragment in str(info.value)
    with pytest.raises(ValueError):
        block.pairwise_weights(torch.zeros(shape))
