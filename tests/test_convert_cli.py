"""``he2rna convert``: fold checkpoints in, one bundle out that predicts what the checkpoints predict."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from napari_he2rna.cli import main
from napari_he2rna.model.bundle import load_bundle

GENES = ["CD3D", "MKI67", "KRT8"]


def _folds(folder, n=3):
    folder.mkdir()
    models = []
    for fold in range(n):
        torch.manual_seed(fold)
        m = nn.Sequential(nn.Conv1d(10, 6, 1), nn.ReLU(), nn.Dropout(0.25), nn.Conv1d(6, 3, 1)).eval()
        torch.save(m.state_dict(), folder / f"he2rna-coad-{fold}.pt")
        models.append(m)
    return models


def test_convert_cli_writes_an_ensemble_that_matches_the_checkpoints(tmp_path, capsys):
    models = _folds(tmp_path / "ckpt")
    (tmp_path / "genes.txt").write_text("\n".join(GENES) + "\n")
    out = tmp_path / "coad.safetensors"
    args = ["convert", str(tmp_path / "ckpt"), "--genes", str(tmp_path / "genes.txt"), "--out", str(out)]
    assert main(args + ["--cancer-type", "TCGA-COAD", "--tile-um", "112"]) == 0
    assert "model bundle" in capsys.readouterr().out
    bundle = load_bundle(out)
    assert bundle.genes == GENES and bundle.n_folds == 3 and bundle.metadata["cancer_type"] == "TCGA-COAD"
    x = torch.randn(25, 10)
    with torch.no_grad():
        expected = torch.stack([m(x.T[None])[0].T for m in models]).mean(0).numpy()
    np.testing.assert_allclose(bundle.tile_scores(x.numpy()), expected, rtol=1e-5, atol=1e-6)

    # an existing bundle is never overwritten without --overwrite, and is left intact
    before = out.read_bytes()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_convert_cli_refuses_a_wrong_gene_list_and_a_pickled_model(tmp_path, capsys):
    _folds(tmp_path / "ckpt", n=1)
    (tmp_path / "genes.txt").write_text("CD3D\nMKI67\n")
    out = tmp_path / "x.safetensors"
    ckpt = str(tmp_path / "ckpt" / "he2rna-coad-0.pt")
    assert main(["convert", ckpt, "--genes", str(tmp_path / "genes.txt"), "--out", str(out)]) == 2
    assert "3 outputs but 2 gene names" in capsys.readouterr().err
    assert not out.exists()

    # a whole pickled module (code, not weights) is refused: weights_only loading
    torch.save(nn.Sequential(nn.Conv1d(10, 3, 1)), tmp_path / "whole.pt")
    (tmp_path / "g3.txt").write_text("\n".join(GENES))
    assert (
        main(["convert", str(tmp_path / "whole.pt"), "--genes", str(tmp_path / "g3.txt"), "--out", str(out)])
        == 2
    )
    assert "weights-only" in capsys.readouterr().err
    assert not out.exists()
