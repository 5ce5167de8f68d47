"""
The configs of ``configs/``, found the way detectron2's ``model_zoo`` finds its own, from any directory:

    from nl_detectron import model_zoo
    cfg = model_zoo.get_config("mask_rcnn_nl_R50.yaml")        # CfgNode with cfg.MODEL.NONLOCAL
    lazy = model_zoo.get_config("mask_rcnn_nl_R50.py")         # LazyConfig
    path = model_zoo.get_config_file("quick/mask_rcnn_nl_R18_shapes.yaml")

An installed package (``pip install .``, a wheel) carries the configs inside it, as ``nl_detectron/configs``
(setup.py builds the repository's ``configs/`` in); a source checkout or an editable install reads the
repository's ``configs/`` itself. Both keep the layout of ``configs/``, so ``_BASE_`` chains resolve.
"""
import importlib.resources
import os
from typing import List, Union

from detectron2.config import CfgNode, LazyConfig, get_cfg
from omegaconf import DictConfig

from .config import add_nonlocal_config

__all__ = ["get_config_file", "get_config", "list_configs", "configs_dir"]

_CONFIG_SUFFIXES = (".yaml", ".py")


def configs_dir() -> str:
    """The directory that holds the configs: the installed package's, else the source checkout's."""
    installed = importlib.resources.files(__package__).joinpath("configs")
    if installed.is_dir():
        return str(installed)  # a wheel installs plain files, which detectron2's loaders read by path
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if os.path.isdir(checkout):
        return checkout
    raise FileNotFoundError(
        f"nl_detectron's configs are neither in the package ({installed}) nor in a source checkout "
        f"({checkout}): reinstall nl_detectron (`pip install .` from its repository)"
    )


def list_configs() -> List[str]:
    """Every config's name, relative to the configs directory (``quick/...`` for those in subfolders)."""
    root = configs_dir()
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(_CONFIG_SUFFIXES):
                names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return sorted(names)


def get_config_file(config_path: str) -> str:
    """
    Args:
        config_path: a name relative to ``configs/``, e.g. ``"mask_rcnn_nl_R50.yaml"`` or
            ``"quick/tiny_mask_rcnn_nl_R18.yaml"``.

    Returns:
        the config file's absolute path.
    """
    available = list_configs()
    if config_path not in available:
        raise RuntimeError(
            f"{config_path!r} is not one of nl_detectron's configs; valid choices: {', '.join(available)}"
        )
    return os.path.join(configs_dir(), *config_path.split("/"))


def get_config(config_path: str) -> Union[CfgNode, DictConfig]:
    """
    The loaded config: a YAML one as a detectron2 ``CfgNode`` with ``cfg.MODEL.NONLOCAL`` added
    (:func:`~nl_detectron.add_nonlocal_config`), a ``.py`` one as a LazyConfig. Either is ready for
    ``build_model`` / ``instantiate`` and detectron2's trainers, as the configs set it.
    """
    path = get_config_file(config_path)
    if path.endswith(".py"):
        return LazyConfig.load(path)
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(path)
    return cfg
