"""
NonLocalBlock2d on a CUDA device: against the literal reference (float32 outputs and gradients), under
float16 and bfloat16 autocast with dot products beyond float16's range, and with the softmax modes held
to SDPA's fused kernels. Skipped where torch sees no CUDA device (CI has none; run on a GPU machine with
`python -m pytest tests/test_nonlocal_block_cuda.py`).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import nl_detectron.nonlocal_block as nonlocal_block
from nl_detectron.nonlocal_block import NONLOCAL_MODES, NonLocalBlock2d
from reference_nonlocal import block_weights, reference_nonlocal
from test_nonlocal_block import (
    AUTOCAST_BOUNDS,
    AUTOCAST_CASES,
    SOFTMAX_MODES,
    SUBSAMPLING,
    force_chunked_backward,
    large_magnitude_case,
    max_embedded_dot_product,
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


# Every mode as the block runs it at 256 channels, and the softmax modes with the chunked backward forced
# (what embeddings over 256-d get).
MODES_AND_BACKWARDS = [(mode, False) for mode in NONLOCAL_MODES] + [(mode, True) for mode in SOFTMAX_MODES]


@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
@pytest.mark.parametrize("mode,chunked", MODES_AND_BACKWARDS)
def test_float32_matches_the_reference(monkeypatch, mode, chunked, subsampling):
    if chunked:
        force_chunked_backward(monkeypatch)
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


# Each case as the block runs it (16-bit 16-d embeddings: SDPA's own backward), and the softmax modes with
# their chunked backward forced (what 16-bit embeddings over 256-d get).
CASES_AND_BACKWARDS = [
    pytest.param(*case.values, chunked, id=f"{case.id}{'-chunked' if chunked else ''}")
    for case in AUTOCAST_CASES for chunked in (False, True) if not chunked or case.values[0] in SOFTMAX_MODES
]


@pytest.mark.parametrize("mode,dtype,chunked", CASES_AND_BACKWARDS)
def test_autocast_large_dot_products(monkeypatch, mode, dtype, chunked):
    if chunked:
        force_chunked_backward(monkeypatch)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [1024, 512])  # res4 and res3: 512-d and 256-d embeddings
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_softmax_modes_run_a_fused_kernel(mode, channels, dtype):
    # Restricted to the fused kernels, SDPA raises instead of falling back to the math path, which
    # materialises the N x N' matrix (the chunked backward, where it runs, calls no SDPA).
    block = NonLocalBlock2d(channels, mode=mode).cuda()
    x = torch.randn(2, channels, 12, 14, device="cuda", requires_grad=True)
    with sdpa_kernel(FUSED_KERNELS), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        block(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "mode,channels,chunked",
    [("embedded_gaussian", 1024, True), ("embedded_gaussian", 512, False), ("gaussian", 512, True)],
)
def test_backward_over_256_channels_goes_by_chunks(monkeypatch, mode, channels, chunked):
    # Head dims over 256 (res4's 512-d embeddings, x's channels for gaussian) get the chunked backward;
    # res3's 256-d embeddings keep SDPA's own (flash/cuDNN in 16-bit).
    calls = []
    real_apply = nonlocal_block._SdpaChunkedBackward.apply
    monkeypatch.setattr(
        nonlocal_block._SdpaChunkedBackward, "apply", lambda *args: calls.append(1) or real_apply(*args)
    )
    block = NonLocalBlock2d(channels, mode=mode).cuda()
    x = torch.randn(2, channels, 12, 14, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = block(x)
    z.sum().backward()
    assert len(calls) == (1 if chunked else 0)
    with torch.no_grad():  # inference: SDPA's fused forward alone
        block(x)
    assert len(calls) == (1 if chunked else 0)
