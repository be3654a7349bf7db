from . import shapes
from .shapes import DEFAULT_CLASSES, SHAPE_KINDS, mask_to_polygons, write_shapes_dataset

__all__ = ['DEFAULT_CLASSES', 'SHAPE_KINDS', 'mask_to_polygons', 'write_shapes_dataset']
