"""Maps: per-tile scoring and gene sets, the slide session, progressive painting, what the viewer reads out,
and the exports (CSV, PNG, GeoJSON, TIFF, AnnData)."""
