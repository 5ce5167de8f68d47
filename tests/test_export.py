"""
Export: the non-local backbone and the whole Mask R-CNN through detectron2's tracing path (TracingAdapter +
torch.jit.trace), and the backbone to ONNX (torch.onnx.export, run with onnxruntime); outputs equal eager.
"""
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from detectron2.export import TracingAdapter

from nl_detectron import NONLOCAL_MODES, NonLocalBlock2d, nonlocal_blocks
from nl_detectron.config_files import build_model, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quick", "mask_rcnn_nl_R18_shapes.yaml")
# Traced at one size, run at others: the traces keep the shapes symbolic.
TRACE_SIZE, OTHER_SIZES = (128, 128), [(96, 160), (160, 64)]


# The block's two subsampling orders: the paper's (pool phi(x), g(x)) and the Table 5 configs' inference
# path (pool x, a channels-last copy of it in inference).
@pytest.fixture(scope="module", params=[False, True], ids=["phi-g-pooled", "x-pooled-table5"])
def model(request):
    cfg = load_config(
        CONFIG,
        ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
         "MODEL.NONLOCAL.SUBSAMPLE_INPUT", str(request.param)],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    (block,) = nonlocal_blocks(model).values()
    assert block.sub_sample and block.sub_sample_input == request.param
    # A block that changes its input (W_z is zero at initialisation) with a non-uniform attention.
    for layer in (block.theta, block.phi, block.g, block.w_z):
        torch.nn.init.normal_(layer.weight, std=0.2)
    return model


def _image(size, seed):
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)) * 255


def _batch(model, size, seed):
    """What the backbone sees: the normalised, padded image batch."""
    return model.preprocess_image([{"image": _image(size, seed)}]).tensor


def test_backbone_traces_with_the_fused_attention_and_matches_eager(model):
    backbone = model.backbone
    with torch.no_grad():
        traced = torch.jit.trace(backbone, (_batch(model, TRACE_SIZE, 0),), strict=False, check_trace=False)
    assert "aten::scaled_dot_product_attention" in str(traced.inlined_graph)
    for seed, size in enumerate([TRACE_SIZE] + OTHER_SIZES):
        x = _batch(model, size, seed + 1)
        with torch.no_grad():
            expected, actual = backbone(x), traced(x)
        assert list(actual) == list(expected) == ["p2", "p3", "p4", "p5", "p6"]
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


def _inference(model, inputs):
    # detectron2's tracing recipe: raw detections (no resizing to the original image), as Instances.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def test_mask_rcnn_exports_through_tracing_adapter_and_matches_eager(model, tmp_path):
    adapter = TracingAdapter(model, [{"image": _image(TRACE_SIZE, 0)}], _inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)  # compared below
    # Saved and loaded back as TorchScript, as a deployment would.
    path = str(tmp_path / "mask_rcnn_nl.ts")
    traced.save(path)
    loaded = torch.jit.load(path)
    assert "aten::scaled_dot_product_attention" in str(loaded.inlined_graph)

    for seed, size in enumerate([TRACE_SIZE] + OTHER_SIZES[:1]):
        image = _image(size, seed + 10)
        with torch.no_grad():
            expected = _inference(model, [{"image": image}])[0]["instances"]
            actual = adapter.outputs_schema(loaded(image))[0]["instances"]
        assert len(expected) == 10 and len(actual) == len(expected)
        torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(actual.scores, expected.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(actual.pred_classes, expected.pred_classes)
        torch.testing.assert_close(actual.pred_masks, expected.pred_masks, rtol=1e-4, atol=1e-4)


def test_backbone_exports_to_onnx_and_onnxruntime_matches_eager(model, tmp_path):
    backbone = model.backbone
    path = str(tmp_path / "backbone_nl.onnx")
    # torch.onnx.export's default exporter (dynamo, opset 18). Height and width are dynamic multiples of
    # 32, the FPN's size divisibility.
    height, width = torch.export.Dim("height32", min=1, max=64), torch.export.Dim("width32", min=1, max=64)
    names = ["p2", "p3", "p4", "p5", "p6"]
    torch.onnx.export(
        backbone,
        (_batch(model, TRACE_SIZE, 0),),
        path,
        input_names=["image"],
        output_names=names,
        dynamic_shapes={"x": {2: 32 * height, 3: 32 * width}},
    )
    graph = onnx.load(path).graph
    assert {"Softmax", "MatMul", "MaxPool"} <= {node.op_type for node in graph.node}  # the attention is in it
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, size in enumerate([TRACE_SIZE] + OTHER_SIZES):
        x = _batch(model, size, seed + 20)
        with torch.no_grad():
            expected = backbone(x)
        outputs = session.run(names, {"image": x.numpy()})
        for name, actual in zip(names, outputs):
            # Features reach tens: an absolute 1e-3 is float32 round-off of differently ordered sums.
            np.testing.assert_allclose(actual, expected[name].numpy(), rtol=1e-4, atol=1e-3)


# Every mode and subsampling of the block on its own, through both export paths, in inference (no
# autograd), where the x-pooled branch (the Table 5 configs' SUBSAMPLE_INPUT) pools a channels-last copy.
BLOCK_CASES = [
    pytest.param(mode, sub_sample, sub_sample_input, id=f"{mode}-{name}")
    for mode in NONLOCAL_MODES
    for name, sub_sample, sub_sample_input in (("x-pooled", True, True), ("phi-g-pooled", True, False), ("no-pool", False, False))
]
BLOCK_SIZES = [(9, 12), (7, 5), (16, 10)]  # traced at the first; odd sizes: the pooled key grid rounds up


def _block(mode, sub_sample, sub_sample_input):
    torch.manual_seed(0)
    block = NonLocalBlock2d(32, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input).eval()
    with torch.no_grad():  # away from the identity start, with a non-uniform attention
        for p in block.parameters():
            p.normal_(std=0.3)
    return block


def _block_input(size, seed, channels_last=False):
    x = torch.randn(2, 32, *size, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("mode, sub_sample, sub_sample_input", BLOCK_CASES)
def test_block_traces_in_every_mode_and_matches_eager(mode, sub_sample, sub_sample_input):
    block = _block(mode, sub_sample, sub_sample_input)
    with torch.no_grad():
        traced = torch.jit.trace(block, (_block_input(BLOCK_SIZES[0], 0),), check_trace=False)
        for seed, size in enumerate(BLOCK_SIZES):
            for channels_last in (False, True):
                x = _block_input(size, seed + 1, channels_last)
                torch.testing.assert_close(traced(x), block(x), rtol=1e-5, atol=1e-5)
    if mode == "embedded_gaussian":
        assert "aten::scaled_dot_product_attention" in str(traced.inlined_graph)


@pytest.mark.parametrize("mode, sub_sample, sub_sample_input", BLOCK_CASES)
def test_block_exports_to_onnx_in_every_mode_and_onnxruntime_matches_eager(mode, sub_sample, sub_sample_input, tmp_path):
    block = _block(mode, sub_sample, sub_sample_input)
    path = str(tmp_path / "block.onnx")
    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    torch.onnx.export(block, (_block_input(BLOCK_SIZES[0], 0),), path, input_names=["x"], output_names=["z"],
                      dynamic_shapes={"x": {2: height, 3: width}})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, size in enumerate(BLOCK_SIZES):
        x = _block_input(size, seed + 1)
        with torch.no_grad():
            expected = block(x)
        (actual,) = session.run(["z"], {"x": x.numpy()})
        np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-4, atol=1e-4)
