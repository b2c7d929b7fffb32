"""Maps: gene sets and per-tile scoring, the slide session, progressive painting, what the viewer reads out,
heatmaps, the exports (CSV, PNG, GeoJSON, TIFF, AnnData), and the two jobs: ``spatialize`` (files) and
``predict`` (in memory)."""
