"""The built-in keypoint dataset (nl_houses_*) and a short run of its quick config: Keypoint R-CNN with the
non-local keypoint head, trained through tools/train_net.py and evaluated by COCOEvaluator (box and
keypoint AP), as configs/quick/keypoint_rcnn_nl_R18_houses.yaml does for real."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.data import transforms as T
from detectron2.engine import default_argument_parser

from nl_detectron import nonlocal_blocks
from nl_detectron.data.houses import HOUSE_KEYPOINT_NAMES, generate_houses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_CONFIG = os.path.join(REPO, "configs", "quick", "keypoint_rcnn_nl_R18_houses.yaml")
LEFT_RIGHT = [("left_eave", "right_eave"), ("left_base", "right_base")]


def _keypoints(annotation):
    return {name: annotation["keypoints"][3 * i: 3 * i + 3] for i, name in enumerate(HOUSE_KEYPOINT_NAMES)}


def test_houses_are_generated_from_a_seed_in_coco_keypoint_format(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_houses(str(tmp_path / name), "val", num_images=5, seed=seed)
    load = lambda name: json.loads((tmp_path / name / "annotations" / "keypoints_val.json").read_text())  # noqa: E731
    a, b, c = load("a"), load("b"), load("c")
    assert a["annotations"] == b["annotations"] and a["annotations"] != c["annotations"]
    assert (tmp_path / "a" / "val" / "000001.png").read_bytes() == (tmp_path / "b" / "val" / "000001.png").read_bytes()
    (category,) = a["categories"]
    assert category["keypoints"] == list(HOUSE_KEYPOINT_NAMES)
    assert a["annotations"]
    for ann in a["annotations"]:
        assert ann["num_keypoints"] == 5 and len(ann["keypoints"]) == 15
        x0, y0, w, h = ann["bbox"]
        for name, (x, y, v) in _keypoints(ann).items():
            assert v == 2
            # Pixel-index convention (continuous corner - 0.5): on the box's edge, inside the image.
            assert x0 - 0.5 - 1e-6 <= x <= x0 + w - 0.5 + 1e-6 and y0 - 0.5 - 1e-6 <= y <= y0 + h - 0.5 + 1e-6, name
            assert 0 <= x + 0.5 <= 256 and 0 <= y + 0.5 <= 256
        # The house's left is the image's left.
        kp = _keypoints(ann)
        assert all(kp[left][0] < kp[right][0] for left, right in LEFT_RIGHT)


def test_houses_metadata_and_flip_map_keep_left_on_the_left():
    meta = MetadataCatalog.get("nl_houses_train")
    assert meta.keypoint_names == list(HOUSE_KEYPOINT_NAMES)
    assert meta.thing_classes == ["house"] and meta.evaluator_type == "coco"
    assert len(meta.keypoint_oks_sigmas) == 5 and all(0 < s < 0.2 for s in meta.keypoint_oks_sigmas)
    # What detectron2's DatasetMapper does with RANDOM_FLIP: flip the image, swap left and right.
    flip_indices = detection_utils.create_keypoint_hflip_indices(["nl_houses_train"])
    record = DatasetCatalog.get("nl_houses_val")[0]
    transforms = T.TransformList([T.HFlipTransform(record["width"])])
    for ann in record["annotations"]:
        flipped = detection_utils.transform_instance_annotations(
            dict(ann), transforms, (record["height"], record["width"]), keypoint_hflip_indices=flip_indices
        )
        kp = {n: flipped["keypoints"][i] for i, n in enumerate(HOUSE_KEYPOINT_NAMES)}
        before = {n: k for n, k in zip(HOUSE_KEYPOINT_NAMES, np.asarray(ann["keypoints"]).reshape(-1, 3))}
        mirrored = lambda k: pytest.approx([record["width"] - k[0], k[1]])  # noqa: E731
        assert all(kp[left][0] < kp[right][0] for left, right in LEFT_RIGHT)
        # Each side's corner is the mirror image of the other side's; the apex is mirrored in place.
        for left, right in LEFT_RIGHT:
            assert list(kp[left][:2]) == mirrored(before[right]) and list(kp[right][:2]) == mirrored(before[left])
        assert list(kp["apex"][:2]) == mirrored(before["apex"])


@pytest.fixture
def two_house_images():
    name = "nl_houses_val_first2_test"
    DatasetCatalog.register(name, lambda: DatasetCatalog.get("nl_houses_val")[:2])
    MetadataCatalog.get(name).set(**{
        k: v for k, v in MetadataCatalog.get("nl_houses_val").as_dict().items() if k not in ("name", "json_file")
    })
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_keypoint_config_trains_and_reports_keypoint_and_box_ap(tmp_path, two_house_images):
    """The quick config, shortened: 4 iterations on 128 px images, evaluated on 2 val images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small work; a second spinning thread slows it on a shared 2-core machine
    try:
        output = str(tmp_path / "run")
        train_net = _train_net()
        args = default_argument_parser().parse_args([
            "--config-file", QUICK_CONFIG, "OUTPUT_DIR", output, "DATASETS.TEST", f"('{two_house_images}',)",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()",
            "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        ])
        cfg = train_net.setup(args)
        model = train_net.Trainer.build_model(cfg)
        assert list(nonlocal_blocks(model)) == ["backbone.bottom_up.res4.nonlocal1"] + [
            f"roi_heads.keypoint_head.nonlocal{k}" for k in (2, 4, 6, 8)
        ]
        del model
        train_net.main(args)
    finally:
        torch.set_num_threads(threads)

    # COCOEvaluator's box and keypoint AP, in its log lines and in metrics.json. (Not the "copypaste"
    # lines: tests/test_compare_results.py's setup_logger of their logger stops them from propagating.)
    log = open(os.path.join(output, "log.txt")).read()
    assert "Evaluation results for bbox" in log and "Evaluation results for keypoints" in log
    with open(os.path.join(output, "metrics.json")) as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    final, history = lines[-1], lines[:-1]
    assert final["iteration"] == 4  # the evaluation after the last iteration (3)
    for task in ("bbox", "keypoints"):
        for metric in ("AP", "AP50", "AP75"):
            value = final[f"{task}/{metric}"]
            assert math.isfinite(value) and 0 <= value <= 100, (task, metric, value)
    assert history and all(math.isfinite(h["loss_keypoint"]) for h in history)


def test_evaluator_takes_the_oks_sigmas_from_the_config_else_from_the_dataset(tmp_path):
    from detectron2.config import get_cfg

    from nl_detectron import add_nonlocal_config
    from nl_detectron.engine import Trainer

    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(QUICK_CONFIG)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.KEYPOINT_OKS_SIGMAS = [0.1] * 5
    assert list(Trainer.build_evaluator(cfg, "nl_houses_val")._kpt_oks_sigmas) == [0.1] * 5
    cfg.TEST.KEYPOINT_OKS_SIGMAS = []  # detectron2's default: COCOEvaluator would use COCO's 17
    assert list(Trainer.build_evaluator(cfg, "nl_houses_val")._kpt_oks_sigmas) == [0.05] * 5
