"""The sample cohort: synthetic H&E-like slides with planted, known truth.

Every slide is drawn from a seed (numpy ``Generator``), written as a tiled pyramidal TIFF that OpenSlide
opens as ``generic-tiff`` (256 px JPEG tiles, reduced levels as top-level pages with ``subfiletype=1``,
resolution tags in centimetres so ``openslide.mpp-x`` = 10000 / XResolution), with its ground truth:

* ``<id>_tiles.csv``: per 112 µm tile of the grid of ``docs/architecture.md``: cell counts per type, tissue,
  epithelium, tumour, stroma and fat fractions;
* ``<id>_cells.csv``: every drawn nucleus (level-0 px centre, type, proliferating flag);
* ``<id>_CD3.tsv`` / ``<id>_CD20.tsv``: "IHC" cell tables in QuPath's detection measurement export format;
* ``<id>_epithelium_mask.png`` (+ ``.json`` sidecar): binary epithelium mask at downsample 8;
* ``<id>_tumor.geojson``: QuPath GeoJSON tumour annotation polygons (level-0 px, holes allowed).

A cohort adds ``samples.tsv`` (sample, patient, cancer type, slide file, MSI-like label),
``expression.tsv`` (samples x genes, log10(1 + FPKM-UQ)-like) and ``cell_abundance.tsv``, and
cell-type-resolved targets for SLIDE-EX (``celltype_expression/<type>.tsv``, ``celltype_abundance.tsv``,
``responders.tsv``, see :func:`write_celltype_targets`) and ``genes.tsv`` (each gene's role: planted, with its
driver, or control; see :func:`write_gene_roles`). The generative
formulas are documented in ``sample_data/README.md`` and in :data:`GENE_PANEL` /
:func:`expression_from_signals`.

Drawing model: tissue regions come from smooth random fields (thresholded at quantiles that hit the wanted
area fractions) on a coarse "layout" grid (8 level-0 px per cell), bilinearly upsampled so that region borders
stay smooth; nuclei are placed on jittered grids inside their regions and painted as small optical-density
patches; the colour comes from a Beer-Lambert stain model with standard haematoxylin and eosin OD vectors.
T and B lymphocytes look alike (one optical-density law, overlapping sizes) and share the lymphoid aggregates
(B-cell core, T-cell rim); T cells also infiltrate stroma and tumour. The lymphocyte levels follow one
distribution for every cancer type (:data:`IMMUNE_PRIOR`); only the tissue composition depends on the type.

The package: :mod:`.params` (sizes, cancer types, the latent composition of a slide), :mod:`.biology` (the
gene panel and the expression model: signals -> expression, labels, cell-type targets), :mod:`.drawing`
(layout, nuclei, painting), :mod:`.truth` (the planted truth per tile), :mod:`.writers` (TIFF and truth files)
and :mod:`.cohort` (:func:`make_slide`, :func:`make_cohort`, :func:`load_cohort`).
"""

from __future__ import annotations

from .biology import (
    CELLTYPE_PANEL,
    CONTROL_PREFIX,
    DECONV_CELL_TYPES,
    GENE_PANEL,
    GENES,
    HOUSEKEEPING,
    HOUSEKEEPING_SIGMA,
    SIGNAL_REFERENCE,
    cell_states,
    celltype_targets,
    control_genes,
    expression_from_signals,
    is_control_gene,
    msi_probability,
    responder_probability,
    slide_signals,
)
from .cohort import (
    CohortInfo,
    load_cohort,
    make_cohort,
    make_slide,
)
from .drawing import (
    Layout,
    draw_slide,
)
from .params import (
    AGGREGATE_CORE_T,
    AGGREGATE_RIM_T,
    B_RADIUS_UM,
    BACKGROUND,
    CANCER_PROFILES,
    CANCER_TYPES,
    CELL_TYPES,
    EPITHELIUM,
    FAT,
    FOLLICLE,
    IMMUNE_PHENOTYPES,
    IMMUNE_PRIOR,
    JPEG_QUALITY,
    LAYOUT_DS,
    LYMPHOCYTE_GRAIN,
    LYMPHOCYTE_OD,
    MASK_DOWNSAMPLE,
    MPP,
    STROMA,
    T_RADIUS_UM,
    TIFF_TILE,
    TILE_UM,
    TUMOR_SPACING_UM,
    SlideParams,
    apply_phenotype,
    draw_immune,
    draw_params,
)
from .truth import (
    SlideTruth,
    load_cells,
    load_tile_truth,
    rasterize_polygons,
    truth_rasters,
)
from .writers import (
    DRIVER_NAMES,
    INVISIBLE_DRIVERS,
    gene_roles_table,
    truth_paths,
    write_celltype_targets,
    write_gene_roles,
    write_pyramid_tiff,
    write_table,
    write_truth_files,
)

__all__ = [
    "SIGNAL_REFERENCE",
    "GENE_PANEL",
    "HOUSEKEEPING",
    "HOUSEKEEPING_SIGMA",
    "CONTROL_PREFIX",
    "GENES",
    "control_genes",
    "is_control_gene",
    "slide_signals",
    "expression_from_signals",
    "msi_probability",
    "DECONV_CELL_TYPES",
    "CELLTYPE_PANEL",
    "cell_states",
    "responder_probability",
    "celltype_targets",
    "CohortInfo",
    "make_slide",
    "make_cohort",
    "load_cohort",
    "Layout",
    "draw_slide",
    "MPP",
    "TILE_UM",
    "LAYOUT_DS",
    "MASK_DOWNSAMPLE",
    "TUMOR_SPACING_UM",
    "TIFF_TILE",
    "JPEG_QUALITY",
    "CANCER_TYPES",
    "CELL_TYPES",
    "BACKGROUND",
    "STROMA",
    "FAT",
    "EPITHELIUM",
    "FOLLICLE",
    "CANCER_PROFILES",
    "IMMUNE_PHENOTYPES",
    "IMMUNE_PRIOR",
    "apply_phenotype",
    "LYMPHOCYTE_OD",
    "LYMPHOCYTE_GRAIN",
    "T_RADIUS_UM",
    "B_RADIUS_UM",
    "AGGREGATE_CORE_T",
    "AGGREGATE_RIM_T",
    "SlideParams",
    "draw_immune",
    "draw_params",
    "SlideTruth",
    "rasterize_polygons",
    "truth_rasters",
    "load_tile_truth",
    "load_cells",
    "write_celltype_targets",
    "write_pyramid_tiff",
    "truth_paths",
    "write_table",
    "write_truth_files",
    "DRIVER_NAMES",
    "INVISIBLE_DRIVERS",
    "gene_roles_table",
    "write_gene_roles",
]
