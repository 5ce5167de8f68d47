"""
The trainer of tools/train_net.py: detectron2's DefaultTrainer, evaluated with COCOEvaluator, saving and
loading checkpoints with :class:`~nl_detectron.checkpoint.SafeCheckpointer`, also on several CPU processes.
"""
import contextlib
import functools
import os

import torch

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .checkpoint import SafeCheckpointer

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


def _share_cpu_threads(cfg):
    """Give each of the processes on this machine its share of the cores instead of all of them each."""
    if cfg.MODEL.DEVICE != "cpu" or comm.get_local_size() <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, torch.get_num_threads() // comm.get_local_size()))


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with COCO evaluation (box, mask and keypoint AP), atomic checkpoints that load without running
    code (:class:`SafeCheckpointer`) and multi-process training on CPUs (gloo).
    """

    def __init__(self, cfg):
        _share_cpu_threads(cfg)
        with _cpu_ddp(cfg):
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ makes a DetectionCheckpointer right before it calls build_hooks; swap
        # it here, so that resume_or_load and the PeriodicCheckpointer hook use the safe one.
        self.checkpointer = SafeCheckpointer(
            self.checkpointer.model, self.checkpointer.save_dir, **self.checkpointer.checkpointables
        )
        return super().build_hooks()

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            # detectron2 stops on a non-finite loss (naming the iteration and the loss terms) and, earlier
            # in the step, on non-finite RPN proposals (naming neither): say where, and what is left.
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
            raise FloatingPointError(
                f"Training stopped at iteration {self.iter}: {e}\nThe last complete checkpoint is "
                f"{last or '(none yet)'}; resume from it with --resume after lowering SOLVER.BASE_LR or "
                "enabling SOLVER.CLIP_GRADIENTS."
            ) from e

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # The fast COCOeval is C++ inside detectron2's _C; pycocotools' COCOeval gives the same numbers.
        # Keypoint OKS sigmas: the config's, else the dataset's own (the built-in nl_houses_* have 5
        # keypoints, not COCO's 17, whose sigmas COCOEvaluator falls back to).
        sigmas = cfg.TEST.KEYPOINT_OKS_SIGMAS or MetadataCatalog.get(dataset_name).get("keypoint_oks_sigmas", [])
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops(), kpt_oks_sigmas=sigmas
        )
