"""Fail at start, with the path that was looked for, when a config's datasets are not there."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .context_cue import CONTEXT_SPLITS, ensure_context
from .houses import HOUSES_SPLITS, ensure_houses
from .shapes import SHAPES_SPLITS, ensure_shapes

__all__ = ["check_datasets", "ensure_builtin_dataset", "DatasetNotRegisteredError"]


class DatasetNotRegisteredError(KeyError):
    """A dataset name that detectron2's DatasetCatalog does not know."""

    def __str__(self):  # KeyError would print the repr, escaping every quote of the message
        return str(self.args[0])


_HOW_TO = (
    "detectron2's built-in datasets live under $DETECTRON2_DATASETS (now {root!r}): set it to the folder "
    "that holds coco/ (coco/annotations/instances_train2017.json, coco/train2017/, ...), or point the "
    "config at another registered dataset, e.g. DATASETS.TRAIN \"('nl_shapes_train',)\" "
    "DATASETS.TEST \"('nl_shapes_val',)\" for the built-in one."
)


def check_datasets(cfg) -> None:
    """
    Check that every dataset in ``cfg.DATASETS.TRAIN`` and ``cfg.DATASETS.TEST`` is registered and that
    the files its metadata names exist (generating the built-in datasets on first use), so that a
    missing dataset stops the run before any model is built, not deep inside a data-loader worker.

    Raises:
        DatasetNotRegisteredError (a KeyError): a dataset name that is not registered.
        FileNotFoundError: a registered dataset whose annotation file or image folder is missing.
    """
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for key in ("TRAIN", "TEST"):
        for name in getattr(cfg.DATASETS, key):
            if name not in DatasetCatalog.list():
                raise DatasetNotRegisteredError(
                    f"cfg.DATASETS.{key} names dataset {name!r}, which is not registered. Registered: "
                    f"{', '.join(sorted(DatasetCatalog.list()))}. " + _HOW_TO.format(root=root)
                )
            ensure_builtin_dataset(name)
            meta = MetadataCatalog.get(name)
            for attr in ("json_file", "image_root"):
                path = getattr(meta, attr, None)
                if path is not None and not os.path.exists(path):
                    raise FileNotFoundError(
                        f"cfg.DATASETS.{key} names dataset {name!r}, whose {attr} {path!r} does not "
                        f"exist. " + _HOW_TO.format(root=root)
                    )


def ensure_builtin_dataset(name: str) -> None:
    """Generate ``name`` if it is one of the built-in datasets (shapes, houses, context cue) and not there yet."""
    if name in SHAPES_SPLITS:
        ensure_shapes(name)
    elif name in HOUSES_SPLITS:
        ensure_houses(name)
    elif name in CONTEXT_SPLITS:
        ensure_context(name)
