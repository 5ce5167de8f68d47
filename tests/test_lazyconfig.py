"""configs/mask_rcnn_nl_R50.py (LazyConfig) against its YAML twin, and training it with tools/lazyconfig_train_net.py."""
import glob
import importlib.util
import json
import os

import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

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
            "train.max_iter=2", "train.log_period=1", "train.checkpointer.period=1000",
            "optimizer.lr=1e-6",  # random R50 with FrozenBN has huge losses: keep the model finite "model.roi_heads.num_classes=3",
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
    torch.manual_seed(0)
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

    # --eval-only evaluates that checkpoint: the same numbers as the end of training.
    eval_args = ["--config-file", LAZY_CONFIG, "--eval-only"] + opts + [f"train.init_checkpoint={tmp_path}/model_final.pth"]
    results = tool.main(parser.parse_args(eval_args))
    final = records[-1]
    for key in ("AP", "AP50", "AP75"):
        assert results["bbox"][key] == final[f"bbox/{key}"] and results["segm"][key] == final[f"segm/{key}"]
