"""Start-up work kept off the user's way: ``he2rna --help`` and argument errors answer at once (building the
parser imports no heavy library), and a backbone's libraries can load before its Run."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "torchvision", "dask", "pandas", "scipy", "sklearn", "napari")


def test_the_parser_imports_no_heavy_library():
    script = (
        "import sys\n"
        "from napari_he2rna.cli import build_parser\n"
        "build_parser()\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"building the parser imported: {out.stdout.strip()}"


def test_every_transfer_name_resolves_on_first_use():
    from napari_he2rna import transfer
    from napari_he2rna.model.evaluation import pearson_columns
    from napari_he2rna.transfer import experiment, params

    for name in transfer.__all__:
        assert getattr(transfer, name) is not None, name
    assert transfer.pearson_per_gene is pearson_columns
    assert transfer.DEFAULT_RATIOS is params.DEFAULT_RATIOS is experiment.DEFAULT_RATIOS
    assert set(transfer.__all__) <= set(dir(transfer))


def test_a_backbones_libraries_can_be_loaded_ahead_of_its_run():
    """What the Model dock runs in a thread when a model is chosen (a fresh process: no torchvision yet)."""
    script = (
        "import sys\n"
        "from napari_he2rna.features.backbones import import_backbone_libraries\n"
        "import_backbone_libraries('hed-stats'); a = 'torchvision' in sys.modules\n"
        "import_backbone_libraries('no-such-backbone')\n"
        "import_backbone_libraries('resnet50-imagenet'); b = 'torchvision.models' in sys.modules\n"
        "print(a, b)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
