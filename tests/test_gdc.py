"""``he2rna cohort gdc|matrix``: a GDC download in the published layouts becomes a cohort that trains.

The download is built here from synthetic slides: a current-form sheet (one cart with RNA-seq and slides)
and two older-form sheets (``Sample Type``), gdc-client's ``<File ID>/<File Name>`` folders and a flat
folder, STAR - Counts tables with their ``# gene-model`` line, header and four ``N_*`` rows, DX and TS
slides of one patient, a normal sample, a duplicate aliquot, a file missing, two projects.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.cohorts.gdc import STAR_HEADER
from napari_he2rna.synthetic import make_slide

NEW_COLUMNS = [
    "File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID",
    "Tissue Type", "Tumor Descriptor", "Specimen Type", "Preservation Method",
]  # fmt: skip
OLD_COLUMNS = [*NEW_COLUMNS[:7], "Sample Type"]
RNA = ("Transcriptome Profiling", "Gene Expression Quantification")
SLIDE = ("Biospecimen", "Slide Image")

# (gene_id, gene_name, gene_type), sorted by id as GDC writes them: a PAR_Y copy (CD99), a symbol of a
# lncRNA and of a later protein-coding gene (PINX1), a symbol of two misc_RNA genes (Y_RNA).
GENES = [
    ("ENSG00000000003.15", "TSPAN6", "protein_coding"),
    ("ENSG00000000419.13", "DPM1", "protein_coding"),
    ("ENSG00000002586.20", "CD99", "protein_coding"),
    ("ENSG00000002586.20_PAR_Y", "CD99", "protein_coding"),
    ("ENSG00000075624.17", "ACTB", "protein_coding"),
    ("ENSG00000091831.24", "ESR1", "protein_coding"),
    ("ENSG00000111640.15", "GAPDH", "protein_coding"),
    ("ENSG00000141510.18", "TP53", "protein_coding"),
    ("ENSG00000148773.14", "MKI67", "protein_coding"),
    ("ENSG00000199270.1", "Y_RNA", "misc_RNA"),
    ("ENSG00000201317.1", "Y_RNA", "misc_RNA"),
    ("ENSG00000230417.11", "LINC00595", "lncRNA"),
    ("ENSG00000254093.8", "PINX1", "lncRNA"),
    ("ENSG00000258724.1", "PINX1", "protein_coding"),
]


def star_text(rng: np.random.Generator) -> tuple[str, pd.DataFrame]:
    """A STAR - Counts table as the GDC serves it, and its gene rows as numbers."""
    n = len(GENES)
    counts = rng.integers(50, 5000, n)
    counts[3] = 0  # the PAR_Y copy gets no reads
    tpm = np.round(counts * rng.uniform(0.5, 2.0, n), 4)
    fpkm = np.round(tpm * 0.3, 4)
    fpkm_uq = np.round(tpm * 1.7 + rng.uniform(0, 1, n), 4)
    fpkm_uq[3] = tpm[3] = fpkm[3] = 0.0
    genes = pd.DataFrame(GENES, columns=["gene_id", "gene_name", "gene_type"])
    genes = genes.assign(
        unstranded=counts, stranded_first=counts // 2, stranded_second=counts // 2,
        tpm_unstranded=tpm, fpkm_unstranded=fpkm, fpkm_uq_unstranded=fpkm_uq,
    )  # fmt: skip
    lines = ["# gene-model: GENCODE v36", "\t".join(STAR_HEADER)]
    for name in ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"):
        c = int(rng.integers(10**5, 10**7))
        lines.append(f"{name}\t\t\t{c}\t{c}\t{c}\t\t\t")
    for r in genes.itertuples(index=False):
        lines.append("\t".join(str(v) for v in r))
    return "\n".join(lines) + "\n", genes


class Download:
    """A GDC download: sheets, files, and what each STAR file holds (``values[file name]``)."""

    def __init__(self, root):
        self.root = root
        self.gdc = root / "gdc"  # gdc-client's layout: <File ID>/<File Name>
        self.flat = root / "flat"  # files straight in the folder
        self.rng = np.random.default_rng(7)
        self.values: dict[str, pd.DataFrame] = {}
        self.rows: dict[str, list[list[str]]] = {"cart": [], "luad_rna": [], "luad_slides": []}
        self.seed = 0

    def _place(self, name: str, data: bytes | None, flat: bool, slide_px: int = 0) -> str:
        file_id = str(uuid.UUID(bytes=self.rng.bytes(16), version=4))
        folder = self.flat if flat else self.gdc / file_id
        folder.mkdir(parents=True, exist_ok=True)
        if slide_px:
            self.seed += 1
            make_slide(folder / name, seed=self.seed, size_px=(slide_px, slide_px), write_truth=False)
        elif data is not None:
            (folder / name).write_bytes(data)
        return file_id

    def rna(self, sheet, project, sample, extra, flat=False, missing=False) -> str:
        name = f"{uuid.uuid4()}.rna_seq.augmented_star_gene_counts.tsv"
        text, genes = star_text(self.rng)
        file_id = self._place(name, None if missing else text.encode(), flat)
        self.values[name] = genes
        self.rows[sheet].append([file_id, name, *RNA, project, sample[:12], sample, *extra])
        return name

    def slide(
        self, sheet, project, barcode, sample, extra, flat=False, px=0, missing=False, case=None
    ) -> str:
        name = f"{barcode}.{str(uuid.uuid4()).upper()}.svs"
        data = None if missing or px else b"a slide this test never opens"
        file_id = self._place(name, data, flat, 0 if missing else px)
        self.rows[sheet].append([file_id, name, *SLIDE, project, case or barcode[:12], sample, *extra])
        return name

    def write_sheets(self):
        paths = []
        for key, columns in (("cart", NEW_COLUMNS), ("luad_rna", OLD_COLUMNS), ("luad_slides", OLD_COLUMNS)):
            path = self.root / f"gdc_sample_sheet.{key}.tsv"
            pd.DataFrame(self.rows[key], columns=columns).to_csv(path, sep="\t", index=False)
            paths.append(path)
        return paths


TUMOUR = ["Tumor", "Primary", "Solid Tissue", "Unknown"]
TUMOUR_FFPE = ["Tumor", "Primary", "Solid Tissue", "FFPE"]
TUMOUR_OCT = ["Tumor", "Primary", "Solid Tissue", "OCT"]
NORMAL = ["Normal", "Not Applicable", "Solid Tissue", "Unknown"]
NORMAL_OCT = ["Normal", "Not Applicable", "Solid Tissue", "OCT"]
PX = 448  # 2x2 tiles of 112 µm: enough for hed-stats features and a 2-epoch training


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    d = Download(tmp_path_factory.mktemp("gdc_download"))
    brca = "TCGA-BRCA"
    # P1: RNA, a diagnostic (DX) and a frozen (TS) slide
    d.p1_rna = d.rna("cart", brca, "TCGA-A1-A0SB-01A", TUMOUR)
    d.p1_dx = d.slide("cart", brca, "TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A1-A0SB-01Z", TUMOUR_FFPE, px=PX)
    d.p1_ts = d.slide("cart", brca, "TCGA-A1-A0SB-01A-01-TS1", "TCGA-A1-A0SB-01A", TUMOUR_OCT)
    # P2: two RNA-seq aliquots of one sample (one in the flat folder), two DX slides; comma-separated cells
    d.p2_rna = [
        d.rna("cart", brca, "TCGA-A2-A04P-01A", TUMOUR),
        d.rna("cart", brca, "TCGA-A2-A04P-01B", TUMOUR, flat=True),
    ]
    case = "TCGA-A2-A04P, TCGA-A2-A04P"
    for n, sample in ((1, "TCGA-A2-A04P-01Z"), (2, "TCGA-A2-A04P-01Z, TCGA-A2-A04P-01Z")):
        d.slide("cart", brca, f"TCGA-A2-A04P-01Z-00-DX{n}", sample, TUMOUR_FFPE, px=PX, case=case)
    # P3: tumour and normal RNA, a DX slide and a frozen normal slide
    d.p3_rna = d.rna("cart", brca, "TCGA-A7-A0CE-01A", TUMOUR)
    d.p3_normal_rna = d.rna("cart", brca, "TCGA-A7-A0CE-11A", NORMAL)
    d.slide("cart", brca, "TCGA-A7-A0CE-01Z-00-DX1", "TCGA-A7-A0CE-01Z", TUMOUR_FFPE, px=PX)
    d.p3_normal_ts = d.slide("cart", brca, "TCGA-A7-A0CE-11A-01-TS1", "TCGA-A7-A0CE-11A", NORMAL_OCT)
    # P4: its slide is listed but was never downloaded; P5: RNA only
    d.p4_rna = d.rna("cart", brca, "TCGA-AR-A1AR-01A", TUMOUR)
    d.p4_dx = d.slide("cart", brca, "TCGA-AR-A1AR-01Z-00-DX1", "TCGA-AR-A1AR-01Z", TUMOUR_FFPE, missing=True)
    d.p5_rna = d.rna("cart", brca, "TCGA-BH-A0B3-01A", TUMOUR)
    # not RNA-seq, not a slide
    file_id = d._place("nationwidechildrens.org_clinical.TCGA-A1-A0SB.xml", b"<xml/>", False)
    d.rows["cart"].append(
        [file_id, "nationwidechildrens.org_clinical.TCGA-A1-A0SB.xml", "Clinical", "Clinical Supplement",
         brca, "TCGA-A1-A0SB", "", "", "", "", ""]
    )  # fmt: skip
    # LUAD, older sheets (Sample Type), RNA and slides in separate sheets, slides in the flat folder
    d.luad_rna = [
        d.rna("luad_rna", "TCGA-LUAD", "TCGA-05-4244-01A", ["Primary Tumor"]),
        d.rna("luad_rna", "TCGA-LUAD", "TCGA-05-4249-01A", ["Primary Tumor"]),
        d.rna("luad_rna", "TCGA-LUAD", "TCGA-05-4250-01A", ["Primary Tumor"]),
    ]
    for p in ("TCGA-05-4244", "TCGA-05-4249", "TCGA-05-4250"):
        d.slide(
            "luad_slides", "TCGA-LUAD", f"{p}-01Z-00-DX1", f"{p}-01Z", ["Primary Tumor"], flat=True, px=PX
        )
    d.sheets = d.write_sheets()
    return d


def log_values(d: Download, names: list[str], column: str = "fpkm_uq_unstranded") -> pd.Series:
    """What a row must hold: log10(1 + column) of the file, the mean of the logs over several files."""
    logs = [np.log10(1.0 + d.values[n][column].to_numpy(np.float64)) for n in names]
    mean = logs[0] if len(logs) == 1 else np.mean(np.stack(logs), axis=0)
    genes = d.values[names[0]]
    return pd.Series(mean.astype(np.float32), index=genes["gene_id"])


def run_gdc(cli, d, out, *extra):
    return cli(
        "cohort", "gdc", *d.sheets, "--files", d.gdc, "--files", d.flat, "--out", out, "--quiet", *extra
    )


@pytest.fixture(scope="module")
def cohort(download, tmp_path_factory, cli_in_process):
    out = tmp_path_factory.mktemp("cohort")
    proc = run_gdc(cli_in_process, download, out)
    return proc, out


def test_a_gdc_download_becomes_a_cohort(download, cohort):
    proc, out = cohort
    # the missing slide: listed, the rest written, exit 1 with one warning sentence
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 missing file(s) left out (see unmatched.tsv)" in proc.stderr
    assert "cohort: 6 patients, 6 samples, 7 slides, 13 genes" in proc.stdout
    assert "1 sample(s) have several RNA-seq aliquots" in proc.stdout
    assert "2 projects mixed: BRCA (4 slides), LUAD (3 slides)" in proc.stdout
    assert "GENCODE v36" in proc.stdout

    samples = pd.read_csv(out / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(samples.columns[:4]) == ["sample_id", "patient_id", "cancer_type", "slide"]
    assert sorted(samples["sample_id"]) == [
        "TCGA-05-4244-01Z-00-DX1", "TCGA-05-4249-01Z-00-DX1", "TCGA-05-4250-01Z-00-DX1",
        "TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A2-A04P-01Z-00-DX1", "TCGA-A2-A04P-01Z-00-DX2",
        "TCGA-A7-A0CE-01Z-00-DX1",
    ]  # fmt: skip
    s = samples.set_index("sample_id")
    assert s.loc["TCGA-A2-A04P-01Z-00-DX2", "patient_id"] == "TCGA-A2-A04P"
    assert s.loc["TCGA-A2-A04P-01Z-00-DX2", "n_rna_aliquots"] == "2"
    assert "mean of the log values of 2" in s.loc["TCGA-A2-A04P-01Z-00-DX1", "note"]
    assert s.loc["TCGA-05-4244-01Z-00-DX1", "cancer_type"] == "LUAD"
    assert s.loc["TCGA-05-4244-01Z-00-DX1", "sample_type"] == "Primary Tumor"  # older sheet column kept
    assert s.loc["TCGA-A1-A0SB-01Z-00-DX1", "preservation_method"] == "FFPE"  # current sheet column kept
    assert s.loc["TCGA-A1-A0SB-01Z-00-DX1", "cancer_type"] == "BRCA"
    assert s.loc["TCGA-A2-A04P-01Z-00-DX1", "case_id"] == "TCGA-A2-A04P"
    assert s.loc["TCGA-A2-A04P-01Z-00-DX2", "slide_sample_id"] == "TCGA-A2-A04P-01Z"
    assert all(os.path.isfile(p) for p in s["slide"])

    genes = pd.read_csv(out / "genes.tsv", sep="\t", keep_default_na=False).set_index("gene_id")
    assert genes.loc["ENSG00000002586.20_PAR_Y", "column"] == ""  # PAR_Y copy left out
    assert genes.loc["ENSG00000002586.20", "column"] == "CD99"
    assert genes.loc["ENSG00000258724.1", "column"] == "PINX1"  # the protein-coding one
    assert genes.loc["ENSG00000254093.8", "column"] == "PINX1_ENSG00000254093"
    assert genes.loc["ENSG00000199270.1", "column"] == "Y_RNA"  # the first in file order
    assert genes.loc["ENSG00000201317.1", "column"] == "Y_RNA_ENSG00000201317"
    named = genes[genes["column"] != ""]

    expr = pd.read_parquet(out / "expression.parquet").set_index("sample_id")
    assert list(expr.columns) == list(named["column"]) and (expr.dtypes == np.float32).all()
    expected = {
        "TCGA-A1-A0SB-01Z-00-DX1": [download.p1_rna],
        "TCGA-A2-A04P-01Z-00-DX1": download.p2_rna,
        "TCGA-A2-A04P-01Z-00-DX2": download.p2_rna,
        "TCGA-A7-A0CE-01Z-00-DX1": [download.p3_rna],
        "TCGA-05-4244-01Z-00-DX1": [download.luad_rna[0]],
        "TCGA-05-4249-01Z-00-DX1": [download.luad_rna[1]],
        "TCGA-05-4250-01Z-00-DX1": [download.luad_rna[2]],
    }
    for sid, files in expected.items():
        want = log_values(download, files)[named.index].to_numpy()
        np.testing.assert_array_equal(expr.loc[sid].to_numpy(), want, err_msg=sid)  # exactly


def test_every_file_is_accounted_for(download, cohort):
    _, out = cohort
    sheets = pd.concat([pd.read_csv(p, sep="\t", dtype=str) for p in download.sheets])
    samples = pd.read_csv(out / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    used = set(samples["slide_file_id"]) | {i for ids in samples["rna_file_id"] for i in ids.split(",")}
    left = pd.read_csv(out / "unmatched.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert not used & set(left["file_id"])
    assert used | set(left["file_id"]) == set(sheets["File ID"])
    why = left.set_index("file_name")["reason"]
    assert why[download.p1_ts] == "frozen slide (TS); --slides frozen keeps it"
    assert why[download.p3_normal_rna].startswith("normal tissue (sample type 11)")
    assert why[download.p3_normal_ts].startswith("normal tissue")
    assert why[download.p4_dx].startswith("file not found")
    assert why[download.p4_rna] == "its slide is not on disk (TCGA-AR-A1AR-01Z-00-DX1)"
    assert why[download.p5_rna] == "no slide of sample TCGA-BH-A0B3-01 in the sheets"
    assert why["nationwidechildrens.org_clinical.TCGA-A1-A0SB.xml"].startswith("neither RNA-seq")


def test_the_cohort_extracts_and_trains(download, cohort, tmp_path, cli_in_process, one_torch_thread):
    _, out = cohort
    feats = tmp_path / "features"
    proc = cli_in_process("extract", out / "samples.tsv", "--backbone", "hed-stats", "--cache-dir", feats)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = tmp_path / "model.safetensors"
    proc = cli_in_process(
        "train", "--samples", out / "samples.tsv", "--expression", out / "expression.parquet",
        "--cache-dir", feats, "--backbone", "hed-stats", "--hidden", "8", "--epochs", "2",
        "--folds", "2", "--val-fraction", "0", "--out", model,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "transform: none (already log)" in proc.stdout
    assert "7 samples matched" in proc.stdout
    from napari_he2rna.model.bundle import load_bundle

    assert {"CD99", "PINX1", "MKI67"} <= set(load_bundle(model).genes)


def test_slide_kinds_normal_samples_and_another_value(download, tmp_path, cli_in_process):
    proc = run_gdc(cli_in_process, download, tmp_path / "all", "--slides", "all", "--include-normal")
    assert proc.returncode == 1, proc.stderr
    s = pd.read_csv(tmp_path / "all" / "samples.tsv", sep="\t", dtype=str).set_index("sample_id")
    assert s.loc["TCGA-A1-A0SB-01A-01-TS1", "patient_id"] == "TCGA-A1-A0SB"  # DX and TS rows, one patient
    assert "TCGA-A1-A0SB-01Z-00-DX1" in s.index
    assert s.loc["TCGA-A7-A0CE-11A-01-TS1", "tissue"] == "normal"
    assert s.loc["TCGA-A7-A0CE-11A-01-TS1", "rna_file_name"] == download.p3_normal_rna

    proc = run_gdc(cli_in_process, download, tmp_path / "frozen", "--slides", "frozen", "--value", "tpm")
    s = pd.read_csv(tmp_path / "frozen" / "samples.tsv", sep="\t", dtype=str)
    assert list(s["sample_id"]) == ["TCGA-A1-A0SB-01A-01-TS1"]
    assert "log10(1 + tpm_unstranded)" in proc.stdout
    expr = pd.read_parquet(tmp_path / "frozen" / "expression.parquet").set_index("sample_id")
    want = log_values(download, [download.p1_rna], "tpm_unstranded").drop("ENSG00000002586.20_PAR_Y")
    np.testing.assert_array_equal(expr.iloc[0].to_numpy(), want.to_numpy())
    left = pd.read_csv(tmp_path / "frozen" / "unmatched.tsv", sep="\t").set_index("file_name")
    assert "--slides frozen" in left.loc[download.p2_rna[0], "reason"]


def test_a_matrix_with_barcode_columns_gives_the_same_cohort(download, cohort, tmp_path, cli_in_process):
    """SEQUOIA's download script: write.table(fpkm, sep = " "): symbols as rows, aliquot barcodes as
    columns, a header one field short; R's dots in the barcodes."""
    _, out = cohort
    files = {
        "TCGA.A1.A0SB.01A.11R.A144.07": [download.p1_rna],
        "TCGA-A2-A04P-01A-31R-A034-07": [download.p2_rna[0]],
        "TCGA-A2-A04P-01B-41R-A21T-07": [download.p2_rna[1]],
        "TCGA-A7-A0CE-01A-11R-A00Z-07": [download.p3_rna],
    }
    genes = download.values[download.p1_rna]
    lines = [" ".join(f'"{c}"' for c in files)]
    for i, (name, kind) in enumerate(zip(genes["gene_name"], genes["gene_type"], strict=True)):
        if kind in ("protein_coding", "lncRNA", "miRNA"):  # SEQUOIA's gene types
            row = [str(download.values[f[0]]["fpkm_uq_unstranded"].iloc[i]) for f in files.values()]
            lines.append(" ".join([f'"{name}"', *row]))
    matrix = tmp_path / "BRCA.txt"
    matrix.write_text("\n".join(lines) + "\n")
    slides = [p for p in download.gdc.rglob("TCGA-*.svs") if p.stat().st_size > 1000]
    folder = tmp_path / "slides"
    for p in slides:
        (folder / p.parent.name).mkdir(parents=True)
        (folder / p.parent.name / p.name).symlink_to(p)
    proc = cli_in_process(
        "cohort",
        "matrix",
        matrix,
        "--files",
        folder,
        "--project",
        "TCGA-BRCA",
        "--out",
        tmp_path / "m",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "cohort: 3 patients, 3 samples, 4 slides" in proc.stdout
    m = pd.read_parquet(tmp_path / "m" / "expression.parquet").set_index("sample_id")
    g = pd.read_parquet(out / "expression.parquet").set_index("sample_id")
    # symbols only: a repeated symbol's later rows are SYMBOL_2, ... (the PAR_Y copy of CD99, the
    # protein-coding PINX1 after the lncRNA); no misc_RNA (SEQUOIA's gene types)
    assert {"PINX1", "PINX1_2", "CD99", "CD99_2"} <= set(m.columns) and "Y_RNA" not in m.columns
    shared = ["TSPAN6", "ACTB", "MKI67", "CD99", "LINC00595"]
    pd.testing.assert_frame_equal(m[shared], g.loc[m.index, shared])  # the same values, exactly

    sheet = download.sheets[0]  # the slides from the cart's sheet instead (its RNA-seq rows not used)
    proc = cli_in_process(
        "cohort",
        "matrix",
        matrix,
        "--sheet",
        sheet,
        "--files",
        download.gdc,
        "--out",
        tmp_path / "s",
        "--quiet",
    )
    assert proc.returncode == 1 and "1 missing file(s) left out (see unmatched.tsv)" in proc.stderr
    s = pd.read_parquet(tmp_path / "s" / "expression.parquet").set_index("sample_id")
    pd.testing.assert_frame_equal(s, m)
    left = pd.read_csv(tmp_path / "s" / "unmatched.tsv", sep="\t").set_index("file_name")["reason"]
    assert left[download.p5_rna].startswith("RNA-seq file not used")


def test_a_tcgabiolinks_matrix_with_ensembl_rows(download, cohort, tmp_path, cli_in_process):
    """write.csv(assay(se)) with rowData's gene_name and gene_type beside: Ensembl rows, every gene."""
    _, out = cohort
    names = {"TCGA-A1-A0SB-01A-11R-A144-07": download.p1_rna, "TCGA-A7-A0CE-01A-11R-A00Z-07": download.p3_rna}
    genes = download.values[download.p1_rna]
    table = genes[["gene_id", "gene_name", "gene_type"]].set_index("gene_id")
    for barcode, name in names.items():
        table[barcode] = download.values[name]["fpkm_uq_unstranded"].to_numpy()
    table.index.name = ""
    table.to_csv(tmp_path / "brca.csv")
    proc = cli_in_process(
        "cohort", "matrix", tmp_path / "brca.csv", "--sheet", download.sheets[0], "--files", download.gdc,
        "--out", tmp_path / "e", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the cart's missing slide
    e = pd.read_parquet(tmp_path / "e" / "expression.parquet").set_index("sample_id")
    g = pd.read_parquet(out / "expression.parquet").set_index("sample_id")
    assert list(e.index) == ["TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A7-A0CE-01Z-00-DX1"]
    pd.testing.assert_frame_equal(e, g.loc[e.index])  # the same gene rule, the same values


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda p: p.write_text("id\tfilename\tmd5\tsize\tstate\n"),
            "is a gdc-client manifest, not a sample sheet",
        ),
        (
            lambda p: p.write_text("sample\tslide\nA\tb.svs\n"),
            "is not a GDC sample sheet: it lacks the column(s) File ID",
        ),
    ],
)
def test_a_sheet_that_is_not_a_gdc_sheet(make, says, download, tmp_path, cli_in_process):
    sheet = tmp_path / "sheet.tsv"
    make(sheet)
    proc = cli_in_process("cohort", "gdc", sheet, "--files", download.gdc, "--out", tmp_path / "out")
    assert proc.returncode == 2 and says in proc.stderr
    assert [
        ln for ln in proc.stderr.splitlines() if ln.startswith("he2rna: error")
    ] == proc.stderr.splitlines()
    assert not (tmp_path / "out" / "samples.tsv").exists()


def test_a_star_file_with_another_header_and_an_unreadable_one(download, tmp_path, cli_in_process):
    p = next(download.gdc.rglob(download.p1_rna))
    original = p.read_bytes()
    try:
        p.write_text("# gene-model: GENCODE v36\ngene_id\tgene_name\tcount\nENSG00000000003.15\tTSPAN6\t3\n")
        proc = run_gdc(cli_in_process, download, tmp_path / "out")
        assert proc.returncode == 2
        assert (
            f"{p.name} is not a GDC STAR - Counts table: its header is gene_id, gene_name, count"
            in proc.stderr
        )
        assert not (tmp_path / "out" / "samples.tsv").exists()
        text = original.decode().splitlines()
        p.write_text("\n".join(text[:8] + [text[8].rsplit("\t", 1)[0] + "\tnot-a-number"] + text[9:]) + "\n")
        proc = run_gdc(cli_in_process, download, tmp_path / "out")
        assert proc.returncode == 1 and "1 unreadable" in proc.stderr
        left = pd.read_csv(tmp_path / "out" / "unmatched.tsv", sep="\t").set_index("file_name")["reason"]
        assert left[p.name].startswith("unreadable: 1 genes have no number in fpkm_uq_unstranded")
        assert "is unreadable" in left[download.p1_dx]
    finally:
        p.write_bytes(original)


def test_an_existing_cohort_is_kept_without_overwrite(download, cohort, cli_in_process):
    proc, out = cohort
    before = (out / "expression.parquet").read_bytes()
    proc = run_gdc(cli_in_process, download, out)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert (out / "expression.parquet").read_bytes() == before
    proc = run_gdc(cli_in_process, download, out, "--overwrite")
    assert proc.returncode == 1 and "cohort: 6 patients" in proc.stdout
