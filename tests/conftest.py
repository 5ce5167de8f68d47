import os
import tempfile

# The built-in dataset is generated into a cache; keep the tests' copy away from the user's.
os.environ.setdefault("NL_DETECTRON_CACHE", os.path.join(tempfile.gettempdir(), "nl_detectron_test_cache"))

import itertools

import pytest

_slice_ids = itertools.count()


@pytest.fixture
def two_val_images():
    """
    The name of a 2-image slice of nl_shapes_val (evaluations of it take seconds), registered for one test.
    Each test gets its own: COCOEvaluator writes a COCO-format json of the dataset into the test's output
    directory and records its path in the dataset's metadata, which must not outlive that directory.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from nl_detectron.data import SHAPES_CLASSES

    name = f"nl_shapes_val_first2_{next(_slice_ids)}"
    DatasetCatalog.register(name, lambda: DatasetCatalog.get("nl_shapes_val")[:2])
    MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES), evaluator_type="coco")
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
