"""configs/mask_rcnn_nl_R50.py (LazyConfig) against its YAML twin, and training it with tools/lazyconfig_train_net.py."""
import glob
import importlib.util
import json
import os

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetMapper
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer

from nl_detectron import add_nonlocal_config, nonlocal_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY_CONFIG = os.path.join(REPO, "configs", "mask_rcnn_nl_R50.py")
YAML_CONFIG = os.path.join(REPO, "configs", "mask_rcnn_nl_R50.yaml")


def test_python_config_builds_the_same_model_as_the_yaml_one():
    lazy = instantiate(LazyConfig.load(LAZY_CONFIG).model)
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(YAML_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    yaml = build_model(cfg)

    def structure(model):
        return [(name, type(m).__name__) for name, m in model.named_modules()]

    def tensors(model):
        return [(name, tuple(t.shape), t.requires_grad) for name, t in model.named_parameters()]

    assert structure(lazy) == structure(yaml)
    assert tensors(lazy) == tensors(yaml)  # names, shapes and which ones are frozen (FREEZE_AT 2)
    assert [n for n, _ in lazy.named_buffers()] == [n for n, _ in yaml.named_buffers()]
    assert sum(p.numel() for p in lazy.parameters()) == sum(p.numel() for p in yaml.parameters())
    assert str(lazy) == str(yaml)  # every layer's hyper-parameters, as their reprs print them
    (name, block), = nonlocal_blocks(lazy).items()
    assert name == "backbone.bottom_up.res4.nonlocal5"  # right before the last of ResNet-50's 6 res4 blocks
    assert (block.mode, block.inner_channels, block.sub_sample, block.sub_sample_input, block.use_scale) == (
        "embedded_gaussian", 512, True, True, True
    )


def _yaml_cfg():
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(YAML_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_python_config_has_the_yaml_ones_buffers_solver_schedule_data_and_weights():
    """Beyond the modules: what the two configs train with, each built by detectron2's own builders."""
    lazy_cfg, cfg = LazyConfig.load(LAZY_CONFIG), _yaml_cfg()
    lazy, yaml = instantiate(lazy_cfg.model), build_model(cfg)

    # Buffers by value: the input normalisation (pixel mean/std of the ImageNet weights), FrozenBN's.
    lazy_buffers, yaml_buffers = dict(lazy.named_buffers()), dict(yaml.named_buffers())
    assert lazy_buffers.keys() == yaml_buffers.keys()
    for name in yaml_buffers:
        assert torch.equal(lazy_buffers[name], yaml_buffers[name]), name
    assert torch.equal(lazy.pixel_mean, torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1))
    assert torch.equal(lazy.pixel_std, torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1))
    assert lazy.input_format == cfg.INPUT.FORMAT

    # The initial weights.
    assert lazy_cfg.train.init_checkpoint == cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

    # The optimizer: every parameter in a group with the same lr, weight decay, momentum and nesterov.
    def groups(optimizer, model):
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted(
            (names[id(p)], g["lr"], g["weight_decay"], g["momentum"], g["nesterov"])
            for g in optimizer.param_groups for p in g["params"]
        )

    lazy_cfg.optimizer.params.model = lazy
    lazy_optimizer, yaml_optimizer = instantiate(lazy_cfg.optimizer), build_optimizer(cfg, yaml)
    assert type(lazy_optimizer) is type(yaml_optimizer) is torch.optim.SGD
    assert groups(lazy_optimizer, lazy) == groups(yaml_optimizer, yaml)

    # The schedule: the same learning rate at every iteration that matters (warmup, both steps, the end).
    assert lazy_cfg.train.max_iter == cfg.SOLVER.MAX_ITER == 90000
    assert lazy_cfg.dataloader.train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH == 16
    lazy_multiplier = instantiate(lazy_cfg.lr_multiplier)
    yaml_multiplier = build_lr_scheduler(cfg, yaml_optimizer)._multiplier
    for it in (0, 1, 500, 999, 1000, 59999, 60000, 79999, 80000, 89999):
        where = it / cfg.SOLVER.MAX_ITER
        assert lazy_cfg.optimizer.lr * lazy_multiplier(where) == pytest.approx(
            cfg.SOLVER.BASE_LR * yaml_multiplier(where), rel=1e-12
        ), it

    # The data: datasets, and the mappers (augmentations, image and mask formats) of training and test.
    assert lazy_cfg.dataloader.train.dataset.names == cfg.DATASETS.TRAIN[0]
    assert lazy_cfg.dataloader.test.dataset.names == cfg.DATASETS.TEST[0]
    def describe(augmentations):
        """Each augmentation's type and settings (lists and tuples alike; one size by choice or range alike)."""
        described = []
        for a in augmentations:
            settings = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in vars(a).items()}
            if len(set(settings.get("short_edge_length", ()))) == 1:
                settings.pop("sample_style"), settings.pop("is_range")
            described.append((type(a).__name__, settings))
        return described

    for is_train, mapper in ((True, lazy_cfg.dataloader.train.mapper), (False, lazy_cfg.dataloader.test.mapper)):
        ours, theirs = instantiate(mapper), DatasetMapper(cfg, is_train=is_train)
        assert describe(ours.augmentations.augs) == describe(theirs.augmentations.augs), is_train
        # (A test-time mapper drops the annotations, so only the training one's mask settings matter.)
        attributes = ["is_train", "image_format"]
        attributes += ["use_instance_mask", "instance_mask_format", "recompute_boxes"] if is_train else []
        for attribute in attributes:
            assert getattr(ours, attribute) == getattr(theirs, attribute), (is_train, attribute)


def _load_tool():
    path = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    spec = importlib.util.spec_from_file_location("lazyconfig_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lazyconfig_train_net_trains_evaluates_and_writes_detectron2_logs(tmp_path, two_val_images):
    tool = _load_tool()
    opts = (
        [
            # The R50 config as it is, on the built-in dataset, at 64 px, for two iterations.
            f"train.output_dir={tmp_path}", "train.init_checkpoint=''", "train.device=cpu",
            # default_setup reseeds every RNG from train.seed (from the clock when it is -1). A random R50's
            # box deltas are huge: for some initialisations every box leaves the 64 px image, is dropped,
            # and COCOEvaluator, seeing no masks, evaluates bbox only. Seed 1 keeps 3 and 4 boxes.
            "train.seed=1",
            "train.max_iter=2", "train.log_period=1", "train.checkpointer.period=1000",
            "optimizer.lr=1e-6",  # random R50 with FrozenBN has huge losses: keep the model finite
            "model.roi_heads.num_classes=3",  # the built-in dataset's classes
            "model.proposal_generator.post_nms_topk=[100,20]", "model.roi_heads.box_predictor.test_topk_per_image=5",
            "model.roi_heads.box_predictor.test_score_thresh=-1.0",  # keep even 0-score boxes of an untrained model
            "dataloader.train.dataset.names=nl_shapes_train", f"dataloader.test.dataset.names={two_val_images}",
            "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
            "dataloader.train.mapper.augmentations.0.max_size=64",
            "dataloader.test.mapper.augmentations.0.short_edge_length=64",
            "dataloader.test.mapper.augmentations.0.max_size=64",
        ]
    )
    parser = default_argument_parser()
    tool.main(parser.parse_args(["--config-file", LAZY_CONFIG] + opts))

    records = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    train_records = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in train_records] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in train_records)
    # The end-of-training COCO evaluation (pycocotools, as detectron2._C is absent) reached the logs.
    assert any("bbox/AP" in r and "segm/AP" in r for r in records)
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert os.path.isfile(tmp_path / "config.yaml") and os.path.isfile(tmp_path / "log.txt")

    # The checkpoint holds a trained non-local block: W_z left its zero initialisation.
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert torch.count_nonzero(state["backbone.bottom_up.res4.nonlocal5.w_z.weight"]) > 0
    # It trained the 3 classes of the data (and background), not COCO's 80: the overrides took effect.
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3 + 1
    assert state["roi_heads.mask_head.predictor.weight"].shape[0] == 3

    # --eval-only evaluates that checkpoint: the same numbers as the end of training.
    eval_args = ["--config-file", LAZY_CONFIG, "--eval-only"] + opts + [f"train.init_checkpoint={tmp_path}/model_final.pth"]
    results = tool.main(parser.parse_args(eval_args))
    final = records[-1]
    for key in ("AP", "AP50", "AP75"):
        assert results["bbox"][key] == final[f"bbox/{key}"] and results["segm"][key] == final[f"segm/{key}"]
