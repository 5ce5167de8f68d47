from .check import check_datasets
from .shapes import SHAPES_CLASSES, ensure_shapes, generate_shapes, register_shapes, shapes_root

register_shapes()
