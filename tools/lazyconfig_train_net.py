#!/usr/bin/env python
"""
Train and evaluate a LazyConfig (Python) config, e.g. configs/mask_rcnn_nl_R50.py, with detectron2's
``tools/lazyconfig_train_net.py`` flow (its wheel does not ship that script):

    tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_nl_R50.py --num-gpus 8
    tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_nl_R50.py --eval-only \
        train.init_checkpoint=output/mask_rcnn_nl_R50_lazy/model_final.pth

Overrides are ``key=value`` pairs of the config (``train.max_iter=1000``). Unlike upstream's script,
this one also runs on machines without CUDA or detectron2's compiled ops: ``train.device`` falls back to
the CPU, DDP over CPU processes (gloo) gets ``device_ids=None``, and COCOEvaluator uses pycocotools.
It writes what tools/train_net.py writes: checkpoints, metrics.json, TensorBoard events, log.txt.
"""
import logging
import os

import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import nl_detectron  # noqa: F401  (registers the built-in dataset)
from nl_detectron.checkpoint import SafeCheckpointer
from nl_detectron.engine import has_compiled_ops

logger = logging.getLogger("detectron2")


def setup(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"  # logged by default_setup's config dump
    if "evaluator" in cfg.dataloader:
        evaluator = cfg.dataloader.evaluator
        # COCOEvaluator's fast path is C++ inside detectron2's _C; pycocotools gives the same numbers.
        if "use_fast_impl" not in evaluator and not has_compiled_ops():
            evaluator.use_fast_impl = False
        if "output_dir" not in evaluator:
            evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    default_setup(cfg, args)
    return cfg


def ddp(model, cfg, **ddp_kwargs):
    if cfg.train.device == "cpu":
        ddp_kwargs["device_ids"] = None  # DistributedDataParallel refuses device_ids for a CPU model
    return create_ddp_model(model, **ddp_kwargs)


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret


def do_train(args, cfg):
    # The data first: a missing dataset fails now, naming its path, before the model is built.
    train_loader = instantiate(cfg.dataloader.train)

    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    model = ddp(model, cfg, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = SafeCheckpointer(
        model, cfg.train.output_dir, optimizer=optim, trainer=trainer
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint stores the iteration that just finished: start at the next one.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = ddp(model, cfg)
        SafeCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


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
