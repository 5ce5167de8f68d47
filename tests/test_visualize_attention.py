"""tools/visualize_attention.py on the built-in dataset: files, sizes, and the maps against a literal reference."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer

from nl_detectron import NonLocalBlock2d, nonlocal_blocks
from nl_detectron.config_files import build_model, load_config, inference_mapper

from reference_nonlocal import block_weights, reference_pairwise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quick", "mask_rcnn_nl_R18_shapes.yaml")
TEST_SIZE = 128  # the shapes images are 256 x 256: the model sees them at half size
STRIDE = 16  # res4, where the quick config's block is


def _load_tool():
    spec = importlib.util.spec_from_file_location("visualize_attention", os.path.join(REPO, "tools", "visualize_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _opts(mode):
    return [
        "INPUT.MIN_SIZE_TEST", str(TEST_SIZE), "INPUT.MAX_SIZE_TEST", str(TEST_SIZE), "MODEL.NONLOCAL.MODE", mode,
        # Few proposals and detections: the heads' work is not what these tests look at.
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "TEST.DETECTIONS_PER_IMAGE", "5",
    ]


def _checkpoint_with_sharp_attention(opts, path):
    """Random weights, with the block's embeddings scaled up so that its attention is far from uniform."""
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, opts))
    (block,) = nonlocal_blocks(model).values()
    for name in ("theta", "phi", "g", "concat_project"):
        layer = getattr(block, name)
        if layer is not None:
            torch.nn.init.normal_(layer.weight, std=0.5)
    torch.save({"model": model.state_dict()}, path)


def _reference_maps(opts, weights, image_path, cells):
    """The rows of the literal pairwise matrix (tests/reference_nonlocal.py) for the query cells."""
    cfg = load_config(CONFIG, opts)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    (block,) = nonlocal_blocks(model).values()
    captured = []
    handle = block.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    with torch.no_grad():
        model([inference_mapper(cfg)({"file_name": image_path, "height": 256, "width": 256, "image_id": 0})])
    handle.remove()
    x = captured[0].double()
    pairwise = reference_pairwise(
        x, block_weights(block, torch.float64), mode=block.mode, sub_sample=True, use_scale=block.use_scale
    )
    grid_w = x.shape[-1]
    hk, wk = -(-x.shape[-2] // 2), -(-grid_w // 2)
    return np.stack([pairwise[0, r * grid_w + c].reshape(hk, wk).detach().numpy() for r, c in cells])


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
def test_writes_one_picture_per_query_and_the_maps_of_those_queries(mode, tmp_path):
    opts = _opts(mode)
    weights = str(tmp_path / "model.pth")
    _checkpoint_with_sharp_attention(opts, weights)
    points = [(10, 20), (200, 100), (255, 255)]
    argv = ["--config-file", CONFIG, "--weights", weights, "--output", str(tmp_path / "out")]
    for x, y in points:
        argv += ["--point", f"{x},{y}"]
    written = tool.main(argv + opts)

    assert len(written["queries"]) == len(points)
    for path, (x, y) in zip(written["queries"], points):
        assert path.endswith(f"_x{x}_y{y}.png")
        with Image.open(path) as picture:
            assert picture.size == (256, 256)  # the original image's size, not the model's 128
            assert picture.mode == "RGB"
    with Image.open(written["summary"]) as sheet:
        assert sheet.width > 256 and sheet.height > 200

    result = np.load(written["npz"])
    assert str(result["mode"]) == mode
    assert str(result["block"]) == "backbone.bottom_up.res4.nonlocal1"
    maps = result["maps"]
    assert maps.shape == (3, 4, 4)  # 128 px at stride 16: 8 x 8 queries, 4 x 4 max-pooled keys
    # The query's cell: pixel * 128/256 // 16, clamped to the grid.
    expected_cells = [(y * TEST_SIZE // 256 // STRIDE, x * TEST_SIZE // 256 // STRIDE) for x, y in points]
    assert result["cells"].tolist() == [list(c) for c in expected_cells]
    reference = _reference_maps(opts, weights, str(result["image"]), expected_cells)
    np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-6)
    if mode in ("embedded_gaussian", "gaussian"):
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # Different queries see different maps (the attention is not uniform with these weights).
    assert not np.allclose(maps[0], maps[1])


def test_default_grid_of_queries_on_the_default_image(tmp_path):
    written = tool.main(["--config-file", CONFIG, "--grid", "2", "--output", str(tmp_path)] + _opts("embedded_gaussian"))
    names = sorted(os.path.basename(p) for p in written["queries"])
    assert names == ["query00_x64_y64.png", "query01_x192_y64.png", "query02_x64_y192.png", "query03_x192_y192.png"]
    maps = np.load(written["npz"])["maps"]
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert os.path.isfile(written["summary"])


def test_recording_is_only_done_when_asked(monkeypatch):
    cfg = load_config(CONFIG, _opts("embedded_gaussian"))
    model = build_model(cfg).eval()
    (name, block), = nonlocal_blocks(model).items()
    model_input = inference_mapper(cfg)({"file_name": tool.default_image(), "height": 256, "width": 256, "image_id": 0})
    tool.attention_maps(model, name, model_input, [(5, 5)])
    assert not block._forward_hooks  # the tool's hook is gone

    def refuse(*args, **kwargs):
        raise AssertionError("normal inference must not materialise the pairwise weights")

    monkeypatch.setattr(NonLocalBlock2d, "pairwise_weights", refuse)
    with torch.no_grad():
        model([model_input])


def test_bad_block_or_point_names_the_argument_and_the_choices(tmp_path):
    base = ["--config-file", CONFIG, "--output", str(tmp_path)]
    with pytest.raises(ValueError, match=r"--block 'res4'.*valid choices: backbone\.bottom_up\.res4\.nonlocal1"):
        tool.main(base + ["--block", "res4"] + _opts("embedded_gaussian"))
    with pytest.raises(ValueError, match=r"--point: \(300, 5\) is outside the 256 x 256 image"):
        tool.main(base + ["--point", "300,5"] + _opts("embedded_gaussian"))
