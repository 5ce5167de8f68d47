"""Which scaled_dot_product_attention kernel a call runs, seen at torch's dispatcher."""
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten's fused SDPA kernels by op name (CPU flash: _scaled_dot_product_flash_attention_for_cpu).
_FUSED = (
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
)
MATH = "math (materialises the N x N' matrix)"


class _SdpaCalls(TorchFunctionMode):
    """Counts F.scaled_dot_product_attention calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def sdpa_kernels(fn) -> str:
    """
    The SDPA kernels that ``fn()`` runs, e.g. "flash" (forward and backward), "efficient (forward only)"
    (the block's chunked backward on CUDA), "none" without an SDPA call.
    The math path is what remains when SDPA was called and no fused kernel ran (it decomposes into plain
    matmul/softmax ops, which carry no name of their own).
    """
    with _SdpaCalls() as calls, _AtenOps() as ops:
        fn()
    found = []
    for op, label in _FUSED:
        forward = any(op in name and not name.endswith("_backward") for name in ops.names)
        backward = any(op in name and name.endswith("_backward") for name in ops.names)
        if forward or backward:
            found.append(label if forward == backward else f"{label} ({'forward' if forward else 'backward'} only)")
    if calls.calls and not found:
        found = [MATH]
    return ", ".join(found) or "none"
