"""Slides: open a whole-slide image (backends, native TIFF tiles, the ``Slide`` object, its lazy pyramid), the
tissue mask, pen ink, and the tile grid."""
