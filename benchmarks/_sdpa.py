"""Which scaled_dot_product_attention kernel a call runs, read from torch's profiler."""
import torch

# aten's SDPA kernels by op name (CPU flash: _scaled_dot_product_flash_attention_for_cpu).
_KERNELS = (
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
    ("_scaled_dot_product_attention_math", "math (materialises the N x N' matrix)"),
)


def sdpa_kernels(fn) -> str:
    """The SDPA kernels that ``fn()`` dispatches to, forward and backward, e.g. "flash"; "none" if none."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {event.name for event in prof.events()}
    found = [label for op, label in _KERNELS if any(op in name for name in names)]
    return ", ".join(found) or "none"
