"""
FLOP counting that sees the non-local block's attention.

fvcore's :class:`~fvcore.nn.FlopCountAnalysis` has no handle for ``aten::scaled_dot_product_attention``,
the fused op the embedded-Gaussian mode of :class:`~nl_detectron.NonLocalBlock2d` runs through, so it
reports its pairwise computation as zero (with an "unsupported operator" warning).
:func:`flop_count_analysis` is detectron2's FlopCountAnalysis with the handles of
:func:`nonlocal_flop_handles` added.

Convention (fvcore's and detectron2's): one multiply-add is one flop; only matrix products,
convolutions and norms are counted; elementwise ops, softmax and max-pooling are not.
The other modes need nothing new: ``dot_product`` runs two batched ``aten::matmul`` s and
``concatenation`` two matrix-vector ``aten::matmul`` s and a ``ReLU(...) @ g`` ``aten::matmul``, which
fvcore counts.
"""
from math import prod
from typing import Any, Dict, List, Optional

from detectron2.utils.analysis import FlopCountAnalysis
import torch
from fvcore.nn.jit_handles import Handle, get_shape

__all__ = ["flop_count_analysis", "nonlocal_flop_handles", "scaled_dot_product_attention_flop_jit"]


def scaled_dot_product_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """
    Flops of ``aten::scaled_dot_product_attention(query, key, value, ...)``, counted as fvcore counts
    the two matmuls it fuses: ``query @ key^T`` (N x d times d x N') and ``weights @ value``
    (N x N' times N' x dv), per batch element and head: ``N * N' * (d + dv)``. The output
    (..., N, dv) carries the broadcast batch and head dimensions. Scaling, masking, softmax and dropout
    are elementwise and not counted, as fvcore does not count ``aten::softmax``.
    """
    query, key, out = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    head_dim, num_keys, value_dim = query[-1], key[-2], out[-1]
    return prod(out[:-1]) * num_keys * (head_dim + value_dim)


def nonlocal_flop_handles() -> Dict[str, Optional[Handle]]:
    """
    Op name -> fvcore handle for the ops of :class:`~nl_detectron.NonLocalBlock2d` that fvcore does not
    know; pass them to ``FlopCountAnalysis.set_op_handle(**handles)``. ``None`` marks ops without
    multiply-adds (max-pooling the keys), so they are skipped silently.
    """
    return {
        "aten::scaled_dot_product_attention": scaled_dot_product_attention_flop_jit,
        "aten::max_pool2d": None,
    }


class _NoGradFlopCountAnalysis(FlopCountAnalysis):
    """Traces without autograd: FLOPs are a forward-pass count, and what a model runs only to save
    memory for backward (activation checkpointing, custom autograd Functions, which the tracer records
    as opaque ``prim::PythonOp`` nodes) should not hide the work it wraps."""

    def _analyze(self):  # fvcore's one entry point that traces the model
        with torch.no_grad():
            return super()._analyze()


def flop_count_analysis(model, inputs) -> FlopCountAnalysis:
    """
    :class:`detectron2.utils.analysis.FlopCountAnalysis` of ``model`` on ``inputs``, counting the
    non-local blocks' attention. ``inputs`` are what ``model`` takes: a tensor for a backbone or block,
    a ``list[dict]`` for a detectron2 meta-architecture (put it in eval mode first, as
    ``detectron2.utils.analysis.flop_count_operators`` does). Counts are per call, for the whole batch.
    detectron2 traces through a wrapper, so ``by_module()`` names start with ``"model."``. The trace runs
    under ``torch.no_grad()``.
    """
    analysis = _NoGradFlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**nonlocal_flop_handles())
    return analysis
