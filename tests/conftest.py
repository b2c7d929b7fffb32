"""Shared fixtures: the real data in ``../shared/data`` and a small generated sample cohort."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_he2rna.torch_preload import preload

# Before any napari test loads Mesa's OpenGL: see napari_he2rna.torch_preload (a segfault otherwise).
preload()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HE2RNA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real slides and annotation files (never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set HE2RNA_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_slide(shared_data: Path) -> Path:
    """A real Aperio H&E slide, 2220x2967 px at 0.499 µm/px."""
    return shared_data / "slides" / "cmu-1-small-region.svs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's feature cache out of the user's home."""
    monkeypatch.setenv("HE2RNA_CACHE", str(tmp_path_factory.getbasetemp() / "he2rna-cache"))


@pytest.fixture
def one_torch_thread():
    """One torch thread for tiny networks: more threads only fight over a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cli_in_process():
    """:func:`run_cli_in_process`, for tests and fixtures of any scope."""
    return run_cli_in_process


def run_cli_in_process(*args, cwd: Path | None = None, env: dict[str, str] | None = None):
    """Run ``he2rna ARGS`` in this process, as the console script does (``cli.main``), and return what a
    subprocess would: ``returncode``, ``stdout`` and ``stderr`` (a ``subprocess.CompletedProcess``).

    Many times faster than a subprocess (no interpreter and no torch import per call). For messages and exit
    codes only: what depends on a separate process (signals, two processes at once, the umask, output
    streamed while the run goes on) stays in a subprocess.
    """
    import contextlib
    import io
    import subprocess
    import warnings

    from napari_he2rna import cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        if cwd is not None:
            mp.chdir(cwd)
        # each run shows its warnings afresh and filtered as in a new interpreter (Python's default filters,
        # not pytest's), and cli.main's showwarning is undone afterwards
        stack.enter_context(warnings.catch_warnings())
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["he2rna", *argv], code, out.getvalue(), err.getvalue())
