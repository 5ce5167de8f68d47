"""
NonLocalBlock2d on a CUDA device, on every path of nl_detectron.pairwise (forced, and as the cost rule
chooses): against the literal reference (float32 outputs and gradients), under float16 and bfloat16
autocast with dot products beyond float16's range (the materialised path's 16-bit products return
float32 logits through ``out_dtype``), with the softmax modes held to SDPA's fused kernels where they
run, and the cost rule's choices. Skipped where torch sees no CUDA device (CI has none; run on a GPU
machine with `python -m pytest tests/test_nonlocal_block_cuda.py`, as benchmarks/run_on_gpu.sh does).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import nl_detectron.pairwise as pairwise
from nl_detectron.nonlocal_block import NonLocalBlock2d
from reference_nonlocal import block_weights, reference_nonlocal
from test_nonlocal_block import (
    AUTOCAST_BOUNDS,
    AUTOCAST_CASES,
    MODES_AND_PATHS,
    SUBSAMPLING,
    force_path,
    large_magnitude_case,
    max_embedded_dot_product,
    mode_paths,
    randomize_,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUSED_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.fixture(autouse=True)
def no_tf32():
    # TF32 (cuDNN's default for convolutions) rounds to 10 bits: the float32 comparison below is about
    # the block's arithmetic, not the card's rounding mode.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(actual, expected):
    return (torch.linalg.vector_norm(actual.double() - expected) / torch.linalg.vector_norm(expected)).item()


# Every path of every mode, forced ("rule": as the cost rule chooses).
@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
@pytest.mark.parametrize("mode,path", MODES_AND_PATHS + [("embedded_gaussian", "rule"), ("gaussian", "rule")])
def test_float32_matches_the_reference(monkeypatch, mode, path, subsampling):
    force_path(monkeypatch, path)
    sub_sample, sub_sample_input = SUBSAMPLING[subsampling]
    gen = torch.Generator().manual_seed(6)
    block = randomize_(
        NonLocalBlock2d(256, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input), gen
    )
    x = torch.randn(2, 256, 25, 42, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)
    # Ground truth in float64 on the CPU, from the same float32 weights and input.
    x_ref = x.double().requires_grad_(True)
    z_ref = reference_nonlocal(
        x_ref, block_weights(block, torch.float64), mode=mode, sub_sample=sub_sample,
        sub_sample_input=sub_sample_input, use_scale=True,
    )
    z_ref.backward(grad_out.double())
    block.cuda()
    x_gpu = x.cuda().requires_grad_(True)
    z = block(x_gpu)
    z.backward(grad_out.cuda())
    # float32 sums over 256 channels and up to 1050 keys: rounding errors ~1e-6 of the scale; a wrong key,
    # scale or pooling is off by order 1.
    assert relative_error(z.cpu() - x, z_ref.detach() - x.double()) < 1e-4
    assert relative_error(x_gpu.grad.cpu(), x_ref.grad) < 1e-4


# Each case on every path of its mode, forced, and as the cost rule chooses.
CASES_AND_PATHS = [
    pytest.param(*case.values, path, id=f"{case.id}-{path}")
    for case in AUTOCAST_CASES for path in dict.fromkeys(mode_paths(case.values[0]) + ("rule",))
]


@pytest.mark.parametrize("mode,dtype,path", CASES_AND_PATHS)
def test_autocast_large_dot_products(monkeypatch, mode, dtype, path):
    force_path(monkeypatch, path)
    block, x = large_magnitude_case(mode)
    assert max_embedded_dot_product(block, x) > 65504  # beyond float16's largest finite value
    block, x = block.cuda(), x.cuda().requires_grad_(True)
    with torch.no_grad():
        expected = (block(x) - x).double()
    with torch.autocast("cuda", dtype=dtype):
        z = block(x)
    assert z.dtype == torch.float32  # x + W_z(y): the residual add promotes
    assert torch.isfinite(z).all()
    assert relative_error(z - x, expected) < AUTOCAST_BOUNDS[dtype]
    z.mean().backward()  # as in the CPU test: a mean-reduced loss
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_products_return_float32_logits(dtype):
    # What keeps the materialised path from overflowing: 16-bit operands, float32 products (out_dtype).
    a = torch.full((2, 3, 64), 64.0, device="cuda", dtype=dtype)
    b = torch.full((2, 64, 5), 64.0, device="cuda", dtype=dtype)
    product = pairwise._bmm(a, b, torch.float32)
    assert product.dtype == torch.float32
    assert torch.equal(product, torch.full((2, 3, 5), 64.0**3, device="cuda"))  # 262144 > 65504


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [1024, 512])  # res4 and res3: 512-d and 256-d embeddings
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_softmax_modes_run_a_fused_kernel(monkeypatch, mode, channels, dtype):
    # Restricted to the fused kernels, SDPA raises instead of falling back to the math path, which
    # materialises the N x N' matrix (the chunked backward, where it runs, calls no SDPA). The path that
    # keeps no matrix is forced; inference runs SDPA whatever the rule.
    force_path(monkeypatch, "unmaterialised")
    block = NonLocalBlock2d(channels, mode=mode).cuda()
    x = torch.randn(2, channels, 12, 14, device="cuda", requires_grad=True)
    with sdpa_kernel(FUSED_KERNELS), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        block(x).sum().backward()
        with torch.no_grad():
            block(x)
    assert x.grad is not None


# (mode, channels, dtype, matrix budget) -> the path the cost rule takes: float32 and head dims over 256 keep
# the matrix within the budget, else SDPA's forward and the chunked backward (over 256) or SDPA alone.
RULE_CASES = [
    ("embedded_gaussian", 1024, torch.bfloat16, None, "materialised"),
    ("embedded_gaussian", 1024, torch.bfloat16, 0, "chunked_backward"),
    ("embedded_gaussian", 512, torch.bfloat16, None, "sdpa"),
    ("embedded_gaussian", 512, torch.float16, None, "sdpa"),
    ("embedded_gaussian", 512, torch.float32, None, "materialised"),
    ("embedded_gaussian", 512, torch.float32, 0, "sdpa"),
    ("gaussian", 512, torch.bfloat16, None, "materialised"),
    ("gaussian", 512, torch.bfloat16, 0, "chunked_backward"),
]


@pytest.mark.parametrize("mode,channels,dtype,budget,path", RULE_CASES)
def test_cost_rule_on_cuda(monkeypatch, mode, channels, dtype, budget, path):
    if budget is not None:
        monkeypatch.setattr(pairwise, "CUDA_MATERIALISE_ELEMENTS", budget)
    calls = []
    for name in ("_SoftmaxKeepingWeights", "_SdpaChunkedBackward"):
        function = getattr(pairwise, name)
        monkeypatch.setattr(function, "apply", lambda *args, f=function.apply, n=name: calls.append(n) or f(*args))
    block = NonLocalBlock2d(channels, mode=mode).cuda()
    x = torch.randn(2, channels, 12, 14, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        z = block(x)
    z.sum().backward()
    expected = {"materialised": ["_SoftmaxKeepingWeights"], "chunked_backward": ["_SdpaChunkedBackward"]}
    assert calls == expected.get(path, [])
    with torch.no_grad():  # inference: SDPA's fused forward alone
        block(x)
    assert calls == expected.get(path, [])


@pytest.mark.parametrize("budget,kept", [(None, True), (0, False)])
def test_concatenation_cost_rule_on_cuda(monkeypatch, budget, kept):
    # Concatenation keeps its matrix of ReLU'd pairs within the budget, else recomputes query chunks.
    if budget is not None:
        monkeypatch.setattr(pairwise, "MATERIALISE_ELEMENTS", budget)
    calls = []
    function = pairwise._ConcatKeepingPairs
    monkeypatch.setattr(function, "apply", lambda *args, f=function.apply: calls.append(1) or f(*args))
    block = NonLocalBlock2d(64, mode="concatenation").cuda()
    x = torch.randn(2, 64, 12, 14, device="cuda", requires_grad=True)
    block(x).sum().backward()
    assert calls == ([1] if kept else [])
