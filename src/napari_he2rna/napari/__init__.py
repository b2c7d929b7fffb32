"""The napari face of napari-he2rna: reader, sample data and dock widgets (the only code importing napari)."""
