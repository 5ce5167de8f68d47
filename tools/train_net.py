#!/usr/bin/env python
"""
Train and evaluate Mask R-CNN with non-local ResNet backbones, with detectron2's command line:

    tools/train_net.py --config-file configs/mask_rcnn_nl_R50.yaml --num-gpus 8
    tools/train_net.py --config-file configs/mask_rcnn_nl_R50.yaml --eval-only MODEL.WEIGHTS model.pth
"""
import os

import torch

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from nl_detectron import add_nonlocal_config
from nl_detectron.checkpoint import SafeCheckpointer
from nl_detectron.data import check_datasets
from nl_detectron.engine import Trainer


def setup(args):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"  # logged by default_setup's config dump
    cfg.freeze()
    if not (args.resume or args.eval_only):
        refuse_to_overwrite_checkpoints(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    return cfg


def refuse_to_overwrite_checkpoints(output_dir):
    """Training from scratch would overwrite the checkpoints of an earlier run: stop before touching them."""
    last = os.path.join(output_dir, "last_checkpoint")
    if os.path.exists(last):
        with open(last) as f:
            name = f.read().strip()
        raise FileExistsError(
            f"OUTPUT_DIR {output_dir!r} already holds the checkpoints of a run (last_checkpoint: {name}); "
            "training from scratch would overwrite them. Pass --resume to continue that run, or set "
            "another OUTPUT_DIR (e.g. a trailing `OUTPUT_DIR output/new_run`)."
        )


def main(args):
    cfg = setup(args)
    check_datasets(cfg)  # before the model is built: a missing dataset fails now, naming its path

    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
