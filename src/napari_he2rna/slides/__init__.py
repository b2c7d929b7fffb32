"""Slides: open a whole-slide image (backends, the ``Slide`` object, its lazy pyramid), the tissue mask, pen ink,
and the tile grid."""
