"""Helpers of the tests that train configs/quick/tiny_mask_rcnn_nl_R18.yaml through tools/train_net.py."""
import functools
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TINY_CONFIG = os.path.join(REPO, "configs", "quick", "tiny_mask_rcnn_nl_R18.yaml")
# A subprocess that trains gets this long; generous, because the test machine's 2 cores are shared.
SUBPROCESS_TIMEOUT = 600
# The environment of training subprocesses: one thread each. On the shared 2-core test machine, OpenMP
# threads spinning against other processes made the runs three times slower (measured: 15.5 s of CPU
# for 5 iterations with the default 2 threads, 4.5 s with 1).
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread():
    """Autouse where imported: in-process training uses one thread, as SUBPROCESS_ENV does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache()
def train_net():
    """tools/train_net.py as a module (its setup() and main() are what the command line runs)."""
    spec = importlib.util.spec_from_file_location("train_net", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_net_args(output_dir, *opts, resume=False, eval_only=False, num_gpus=1):
    """The command-line arguments of tools/train_net.py for the tiny config, writing to ``output_dir``."""
    args = ["--config-file", TINY_CONFIG]
    if num_gpus != 1:
        args += ["--num-gpus", str(num_gpus), "--dist-url", "auto"]
    args += ["--resume"] * resume + ["--eval-only"] * eval_only
    return args + ["OUTPUT_DIR", str(output_dir)] + [str(o) for o in opts]


def train_net_command(output_dir, *opts, **kwargs):
    return [sys.executable, TRAIN_NET] + train_net_args(output_dir, *opts, **kwargs)


def tiny_cfg(output_dir, *opts):
    """The cfg that ``tools/train_net.py`` builds for the tiny config (seeding the RNGs as it does)."""
    module = train_net()
    return module.setup(module.default_argument_parser().parse_args(train_net_args(output_dir, *opts)))


def checkpoint_iteration(path) -> int:
    """The training iteration a checkpoint written by the trainer was saved after."""
    return torch.load(path, map_location="cpu", weights_only=True)["iteration"]


def last_checkpoint(output_dir) -> str:
    """The file that ``output_dir/last_checkpoint`` names, as a path."""
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        return os.path.join(output_dir, f.read().strip())
