from .check import check_datasets, ensure_builtin_dataset
from .context_cue import CONTEXT_CLASSES, CONTEXT_SPLITS, ensure_context, generate_context, register_context
from .houses import HOUSES_SPLITS, ensure_houses, register_houses
from .shapes import SHAPES_CLASSES, ensure_shapes, generate_shapes, register_shapes, shapes_root

register_shapes()
register_houses()
register_context()
