"""The trainer of tools/train_net.py: detectron2's DefaultTrainer, evaluated with COCOEvaluator, also on CPUs."""
import contextlib
import functools
import os

from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator

__all__ = ["Trainer", "has_compiled_ops"]


def has_compiled_ops() -> bool:
    """Whether detectron2's compiled ``_C`` extension is importable (a build from source has it)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _cpu_ddp(cfg):
    """
    detectron2's DefaultTrainer wraps the model with ``device_ids=[local_rank]``, which
    DistributedDataParallel refuses for a CPU model. For CPU training (gloo), pass ``device_ids=None``.
    """
    if cfg.MODEL.DEVICE != "cpu":
        yield
        return
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO evaluation (box and mask AP) and multi-process training on CPUs."""

    def __init__(self, cfg):
        with _cpu_ddp(cfg):
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # The fast COCOeval is C++ inside detectron2's _C; pycocotools' COCOeval gives the same numbers.
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops())
