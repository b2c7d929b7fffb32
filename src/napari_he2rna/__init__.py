"""napari-he2rna: predict gene expression from H&E whole-slide images and paint it onto the slide.

The compute library (this package minus :mod:`napari_he2rna.napari`) never imports Qt or napari.
"""

__version__ = "0.1.0"
