"""The context-cue dataset: what its images and annotations promise (docs/gain.md), read back from the files."""
import json
import math

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from nl_detectron.data import CONTEXT_CLASSES, check_datasets, generate_context
from nl_detectron.data.context_cue import MARKER_COLOURS, MARKER_SIZE, MIN_GAP


def _generate(tmp_path, seed=5, n=30):
    generate_context(str(tmp_path), "val", n, seed)
    with open(tmp_path / "annotations" / "instances_val.json") as f:
        return json.load(f)


def _gap(a, b):
    """Distance between boxes given as (x, y, w, h), by brute force over their edges' pixel grid."""
    ax, ay = np.meshgrid(np.linspace(a[0], a[0] + a[2], 50), np.linspace(a[1], a[1] + a[3], 50))
    bx, by = np.meshgrid(np.linspace(b[0], b[0] + b[2], 50), np.linspace(b[1], b[1] + b[3], 50))
    return math.sqrt(((ax.ravel()[:, None] - bx.ravel()[None]) ** 2 + (ay.ravel()[:, None] - by.ravel()[None]) ** 2).min())


def test_the_category_is_the_far_markers_colour_and_nothing_else_is_coloured(tmp_path):
    coco = _generate(tmp_path)
    assert [c["name"] for c in coco["categories"]] == CONTEXT_CLASSES
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(by_image) == len(coco["images"])  # every image has at least one object
    seen = set()
    for image in coco["images"]:
        pixels = np.asarray(Image.open(tmp_path / "val" / image["file_name"]).convert("RGB")).astype(int)
        cue = image["cue"]
        x, y, w, h = (int(round(v)) for v in cue["bbox"])
        assert w == h == MARKER_SIZE
        marker = pixels[y : y + h, x : x + w].reshape(-1, 3)
        assert (marker == MARKER_COLOURS[cue["category_id"] - 1]).all()
        # Outside the marker the image is grey: no pixel tells the category.
        outside = np.ones(pixels.shape[:2], bool)
        outside[y : y + h, x : x + w] = False
        grey = pixels[outside]
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
        for ann in by_image[image["id"]]:
            assert ann["category_id"] == cue["category_id"]
            assert _gap(ann["bbox"], cue["bbox"]) >= MIN_GAP - 0.5
            # The polygon is the drawn object: its pixels differ from the background around it.
            rle = mask_util.frPyObjects(ann["segmentation"], image["height"], image["width"])
            inside = mask_util.decode(rle)[..., 0].astype(bool)
            assert inside.sum() > 0.8 * ann["area"]
        seen.add(cue["category_id"])
    assert seen == {1, 2, 3}


def test_generated_from_its_seed(tmp_path):
    a = _generate(tmp_path / "a", seed=3, n=5)
    b = _generate(tmp_path / "b", seed=3, n=5)
    c = _generate(tmp_path / "c", seed=4, n=5)
    assert a == b and a["annotations"] != c["annotations"]
    assert open(tmp_path / "a" / "val" / "000003.png", "rb").read() == open(tmp_path / "b" / "val" / "000003.png", "rb").read()


def test_registered_and_checked_like_the_shapes_dataset():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("nl_context_train",), ("nl_context_val",)
    check_datasets(cfg)  # generates both splits where their metadata points
    val = DatasetCatalog.get("nl_context_val")
    assert len(val) == 100 and len(DatasetCatalog.get("nl_context_train")) == 1000
    assert MetadataCatalog.get("nl_context_val").thing_classes == CONTEXT_CLASSES
    assert {a["category_id"] for r in val for a in r["annotations"]} == {0, 1, 2}  # contiguous ids
