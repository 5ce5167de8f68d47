"""
Load either kind of detectron2 config file, YAML (``CfgNode``) or LazyConfig (Python), and build what the
tools need from it: the model, its weights' path, and the test-time input mapper.
"""
import os
from typing import Sequence, Union

import torch
from omegaconf import DictConfig

from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model as build_model_from_cfgnode

from .config import add_nonlocal_config

__all__ = ["load_config", "is_lazy", "build_model", "config_weights", "inference_mapper", "evaluation_dataset_names"]

CONFIG_SUFFIXES = (".yaml", ".py")


def load_config(path: str, opts: Sequence[str] = ()) -> Union[CfgNode, DictConfig]:
    """
    Args:
        path: a ``.yaml`` config (read with ``cfg.MODEL.NONLOCAL`` added) or a LazyConfig ``.py`` one.
        opts: overrides: ``KEY VALUE ...`` for YAML (``MODEL.DEVICE cpu``), ``key=value`` for
            LazyConfig (``train.device=cpu``), as detectron2's tools take them.

    A CUDA device in the config becomes the CPU where CUDA is not available.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if path.endswith(".yaml"):
        cfg = get_cfg()
        add_nonlocal_config(cfg)
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            cfg.MODEL.DEVICE = "cpu"
        return cfg
    if path.endswith(".py"):
        cfg = LazyConfig.load(path)
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
        if "train" in cfg and cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
            cfg.train.device = "cpu"
        return cfg
    raise ValueError(
        f"config file {path!r}: unknown kind; valid choices: a name ending in {' or '.join(CONFIG_SUFFIXES)}"
    )


def is_lazy(cfg) -> bool:
    return not isinstance(cfg, CfgNode)


def _device(cfg) -> str:
    if is_lazy(cfg):
        return cfg.train.device if "train" in cfg else "cpu"
    return cfg.MODEL.DEVICE


def build_model(cfg) -> torch.nn.Module:
    """The config's model, randomly initialised, on the config's device, in training mode."""
    if is_lazy(cfg):
        return instantiate(cfg.model).to(_device(cfg))
    return build_model_from_cfgnode(cfg)


def config_weights(cfg) -> str:
    """The checkpoint the config initialises from: ``MODEL.WEIGHTS`` or ``train.init_checkpoint``."""
    if is_lazy(cfg):
        return cfg.train.init_checkpoint if "train" in cfg else ""
    return cfg.MODEL.WEIGHTS


def inference_mapper(cfg) -> DatasetMapper:
    """The config's test-time mapper: reads an image, resizes it as evaluation does, makes the model input."""
    if is_lazy(cfg):
        return instantiate(cfg.dataloader.test.mapper)
    return DatasetMapper(cfg, is_train=False)


def evaluation_dataset_names(cfg) -> list:
    if is_lazy(cfg):
        names = cfg.dataloader.test.dataset.names
        return [names] if isinstance(names, str) else list(names)
    return list(cfg.DATASETS.TEST)
