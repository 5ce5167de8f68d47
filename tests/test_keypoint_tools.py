"""tools/analyze_model.py and tools/visualize_attention.py on the keypoint head's non-local blocks (Table 6):
FLOPs against hand-computed ones, the derived baselines, and a head block's map over one RoI against the
literal reference."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer

from nl_detectron import nonlocal_blocks
from nl_detectron.config_files import build_model, inference_mapper, load_config

from reference_nonlocal import block_weights, reference_pairwise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quick", "keypoint_rcnn_nl_R18_houses.yaml")
SIZE = 128
DETECTIONS = 5
# Few proposals, and a zero score threshold so that the untrained model's head sees DETECTIONS RoIs.
OPTS = [
    "INPUT.MIN_SIZE_TEST", str(SIZE), "INPUT.MAX_SIZE_TEST", str(SIZE), "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]
HEAD_BLOCKS = [f"roi_heads.keypoint_head.nonlocal{k}" for k in (2, 4, 6, 8)]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


analyze_model, visualize_attention = _load_tool("analyze_model"), _load_tool("visualize_attention")

# A head block of the quick config: C = 64 channels, C' = 32, on a 14 x 14 RoI map, keys not subsampled.
C, INNER, N = 64, 32, 14 * 14
HEAD_BLOCK_FLOPS = 3 * N * C * INNER + N * INNER * C + N * N * (INNER + INNER)  # per RoI
# The backbone block (ResNet-18 res4 at 128 px, 8 x 8, 2 x 2 max-pooled phi(x), g(x)), as test_analyze_model.
BC, BINNER, BN, BKEYS = 256, 128, (SIZE // 16) ** 2, (SIZE // 32) ** 2
BACKBONE_BLOCK_FLOPS = 3 * BN * BC * BINNER + BN * BINNER * BC + BN * BKEYS * 2 * BINNER


def test_counts_and_side_by_side_with_the_baseline_count_the_head_blocks():
    results = analyze_model.main(
        ["--config-file", QUICK, "--tasks", "flop", "--compare", "-n", "1", "--dataset", "nl_houses_val"] + OPTS
    )
    head_blocks = DETECTIONS * len(HEAD_BLOCKS) * HEAD_BLOCK_FLOPS
    assert results["flop"]["nonlocal_blocks"] == BACKBONE_BLOCK_FLOPS + head_blocks
    base, nl = results["compare"]["baseline"], results["compare"]["non-local"]
    # Same weights but the blocks', which are identities: the same detections, so the differences are the blocks.
    assert nl["GFLOPs, keypoint head"] - base["GFLOPs, keypoint head"] == pytest.approx(head_blocks / 1e9, rel=1e-6)
    assert nl["GFLOPs, backbone"] - base["GFLOPs, backbone"] == pytest.approx(BACKBONE_BLOCK_FLOPS / 1e9, rel=1e-6)
    assert nl["GFLOPs, whole model"] - base["GFLOPs, whole model"] == pytest.approx(
        (BACKBONE_BLOCK_FLOPS + head_blocks) / 1e9, rel=1e-6
    )
    assert base["GFLOPs, non-local blocks"] == 0


@pytest.mark.parametrize("config", ["keypoint_rcnn_nl_head_R101.yaml", "keypoint_rcnn_nl_R101.yaml"])
def test_derived_baseline_of_a_table6_config_is_detectron2s_keypoint_rcnn(config):
    derived = analyze_model.baseline_config(load_config(os.path.join(REPO, "configs", config), ["MODEL.DEVICE", "cpu"]))
    expected = load_config(os.path.join(REPO, "configs", "keypoint_rcnn_R101.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(derived)
    assert not nonlocal_blocks(model)
    assert str(model) == str(build_model(expected))


def _checkpoint_with_sharp_head_attention(path, block_name):
    """Random weights, with the head block's embeddings scaled up so that its attention is far from uniform."""
    torch.manual_seed(0)
    model = build_model(load_config(QUICK, OPTS))
    block = nonlocal_blocks(model)[block_name]
    for layer in (block.theta, block.phi):
        torch.nn.init.normal_(layer.weight, std=0.5)
    torch.save({"model": model.state_dict()}, path)


def _reference_roi_maps(weights, image_path, block_name, roi, cells):
    """Rows of the literal pairwise matrix (tests/reference_nonlocal.py) of RoI ``roi``'s features, and
    that detection's box as the model outputs it (original-image pixels)."""
    cfg = load_config(QUICK, OPTS)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    block = nonlocal_blocks(model)[block_name]
    captured = []
    handle = block.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    with torch.no_grad():
        (output,) = model([inference_mapper(cfg)({"file_name": image_path, "height": 256, "width": 256, "image_id": 0})])
    handle.remove()
    x = captured[0][roi: roi + 1].double()
    assert captured[0].shape == (DETECTIONS, C, 14, 14)  # one 14 x 14 map per detection
    pairwise = reference_pairwise(x, block_weights(block, torch.float64), mode=block.mode, sub_sample=False,
                                  use_scale=block.use_scale)
    maps = np.stack([pairwise[0, r * 14 + c].reshape(14, 14).detach().numpy() for r, c in cells])
    return maps, output["instances"].pred_boxes.tensor[roi].numpy()


def test_head_block_map_over_one_roi(tmp_path):
    block_name, roi = "roi_heads.keypoint_head.nonlocal4", 1
    weights = str(tmp_path / "model.pth")
    _checkpoint_with_sharp_head_attention(weights, block_name)
    written = visualize_attention.main(
        ["--config-file", QUICK, "--weights", weights, "--output", str(tmp_path / "out"), "--block", block_name,
         "--roi", str(roi), "--grid", "2"] + OPTS
    )
    result = np.load(written["npz"])
    assert str(result["block"]) == block_name and int(result["roi"]) == roi
    maps, points, (x0, y0, x1, y1) = result["maps"], result["points"], result["box"]
    assert maps.shape == (4, 14, 14)  # a 2 x 2 grid of queries over the box; all 14 x 14 keys of the RoI
    assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    # The query's cell: its position in the box, on the RoI's 14 x 14 grid.
    expected_cells = [(int((y - y0) / (y1 - y0) * 14), int((x - x0) / (x1 - x0) * 14)) for x, y in points]
    assert result["cells"].tolist() == [list(c) for c in expected_cells]
    reference, detection_box = _reference_roi_maps(weights, str(result["image"]), block_name, roi, expected_cells)
    # The box is RoI roi's detection (the head's RoIs are the detections, best first), in the image's pixels.
    np.testing.assert_allclose(result["box"], detection_box, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert not np.allclose(maps[0], maps[3])
    # Pictures over the original image; the map covers the box only, the image around it is left grey.
    with Image.open(written["queries"][0]) as picture:
        assert picture.size == (256, 256)
        pixels = np.asarray(picture).astype(int)
    inside = pixels[int(y0) + 1: int(y1) - 1, int(x0) + 1: int(x1) - 1]
    assert (inside[..., 0] != inside[..., 2]).any()  # coloured by the map
    outside = np.ones(pixels.shape[:2], dtype=bool)
    outside[max(int(y0) - 1, 0): int(y1) + 2, max(int(x0) - 1, 0): int(x1) + 2] = False
    # Outside the box every weight is 0, the map's minimum: one colour blended over grey.
    assert np.ptp(pixels[outside][:, 0] - pixels[outside][:, 1]) <= 2


def test_bad_roi_or_point_of_a_head_block(tmp_path):
    base = ["--config-file", QUICK, "--output", str(tmp_path), "--block", HEAD_BLOCKS[0]]
    with pytest.raises(ValueError, match=rf"--roi 9: the head's blocks ran on {DETECTIONS} RoIs.*0\.\.{DETECTIONS - 1}"):
        visualize_attention.main(base + ["--roi", "9"] + OPTS)
    with pytest.raises(ValueError, match=r"--point: \(0, 255\) is outside RoI 0's box"):
        visualize_attention.main(base + ["--point", "0,255"] + OPTS)
