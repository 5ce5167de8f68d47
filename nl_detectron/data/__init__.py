from .check import check_datasets
from .context_cue import CONTEXT_CLASSES, CONTEXT_SPLITS, ensure_context, generate_context, register_context
from .shapes import SHAPES_CLASSES, ensure_shapes, generate_shapes, register_shapes, shapes_root

register_shapes()
register_context()
