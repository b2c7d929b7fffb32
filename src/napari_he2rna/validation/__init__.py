"""Validation: ground-truth formats (QuPath cells, masks, annotations), tile-level metrics, the
``Comparison`` of a heatmap with its truth, and the alignment of an IHC slide onto its H&E."""
