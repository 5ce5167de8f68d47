"""tools/analyze_model.py: counts of the non-local block against hand-computed ones, and the derived baselines."""
import importlib.util
import logging
import os

import pytest

from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from nl_detectron.config_files import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick", "mask_rcnn_nl_R18_shapes.yaml")
SIZE = 128
OPTS = [
    "INPUT.MIN_SIZE_TEST", str(SIZE), "INPUT.MAX_SIZE_TEST", str(SIZE),
    "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "TEST.DETECTIONS_PER_IMAGE", "5",
]


def _load_tool():
    spec = importlib.util.spec_from_file_location("analyze_model", os.path.join(REPO, "tools", "analyze_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()

# The quick config's block: ResNet-18 res4, C = 256 channels, C' = 128; at 128 px, res4 is 8 x 8.
C, INNER = 256, 128
N = (SIZE // 16) ** 2  # queries
N_KEYS = (SIZE // 32) ** 2  # 2 x 2 max-pooled keys
BLOCK_PARAMS = 3 * (C * INNER + INNER) + (INNER * C + C)  # theta, phi, g; W_z (all with biases)
# One multiply-add = one flop: the four 1x1 convs, then theta phi^T (N x C' x N') and weights @ g (N x N' x C').
BLOCK_FLOPS = 3 * N * C * INNER + N * INNER * C + N * N_KEYS * (INNER + INNER)
# Activations (output elements of convs and of the attention): theta, phi, g, attention output, W_z.
BLOCK_ACTIVATIONS = 3 * N * INNER + N * INNER + N * C


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_counts_and_side_by_side_with_the_baseline(capsys):
    # fvcore's warnings go to its jit_analysis logger, whatever handlers the tool gives "fvcore".
    fvcore_log = _Records()
    logging.getLogger("fvcore.nn.jit_analysis").addHandler(fvcore_log)
    try:
        results = tool.main(
            ["--config-file", QUICK, "--tasks", "parameter", "flop", "structure", "--compare", "-n", "1",
             "--dataset", "nl_shapes_val"] + OPTS
        )
    finally:
        logging.getLogger("fvcore.nn.jit_analysis").removeHandler(fvcore_log)
    # theta, phi and g run as modules: fvcore sees every module of the block called (it used to warn that
    # res4.nonlocal*.theta/.phi/.g "were never called during the trace").
    assert fvcore_log.messages and not [m for m in fvcore_log.messages if "never called" in m]
    assert results["parameter"]["nonlocal_blocks"] == BLOCK_PARAMS
    assert results["flop"]["nonlocal_blocks"] == BLOCK_FLOPS
    # The fused attention is counted (fvcore alone reports it as an unsupported op with no flops).
    assert results["flop"]["by_operator"]["scaled_dot_product_attention"] == N * N_KEYS * 2 * INNER
    assert "NonLocalBlock2d" in results["structure"]

    base, nl = results["compare"]["baseline"], results["compare"]["non-local"]
    assert nl["parameters (M)"] - base["parameters (M)"] == pytest.approx(BLOCK_PARAMS / 1e6, abs=1e-9)
    # Same weights but the block's, W_z = 0: identical detections, so the whole-model difference is the block.
    for key in ("GFLOPs, whole model", "GFLOPs, backbone"):
        assert nl[key] - base[key] == pytest.approx(BLOCK_FLOPS / 1e9, rel=1e-6)
    assert nl["GFLOPs, non-local blocks"] == pytest.approx(BLOCK_FLOPS / 1e9) and base["GFLOPs, non-local blocks"] == 0
    assert nl["activations (M)"] - base["activations (M)"] == pytest.approx(BLOCK_ACTIVATIONS / 1e6, rel=1e-6)
    printed = capsys.readouterr().out
    assert "| GFLOPs, non-local blocks |" in printed and "delta %" in printed


def test_derived_baselines_are_the_detectron2_models():
    # YAML: the non-local R50 config without its block is configs/mask_rcnn_R50.yaml's model.
    derived = tool.baseline_config(load_config(os.path.join(REPO, "configs", "mask_rcnn_nl_R50.yaml"), ["MODEL.DEVICE", "cpu"]))
    expected = load_config(os.path.join(REPO, "configs", "mask_rcnn_R50.yaml"), ["MODEL.DEVICE", "cpu"])
    assert str(build_model(derived)) == str(build_model(expected))
    # LazyConfig: configs/mask_rcnn_nl_R50.py without it is detectron2's own mask_rcnn_R_50_FPN_1x.py.
    derived = tool.baseline_config(LazyConfig.load(os.path.join(REPO, "configs", "mask_rcnn_nl_R50.py")))
    zoo = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
    assert str(instantiate(derived.model)) == str(instantiate(zoo.model))


def test_compare_needs_a_nonlocal_config():
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE.NAME='build_resnet_fpn_backbone' is not a non-local backbone"):
        tool.main(["--config-file", os.path.join(REPO, "configs", "mask_rcnn_R50.yaml"), "--compare", "--dataset", "nl_shapes_val", "-n", "1", "MODEL.DEVICE", "cpu"])
