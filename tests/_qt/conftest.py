"""Fixtures the Qt tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """The committed synthetic sample slide."""
    path = REPO / "sample_data" / "sample_slide.tiff"
    assert path.is_file(), "sample_data/sample_slide.tiff is committed and must be there"
    return path


@pytest.fixture
def notifications():
    """Every napari notification shown during the test, as (severity, message)."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(notification) -> None:
        seen.append((str(notification.severity), notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def slowed_batches(monkeypatch, tmp_path):
    """``slowed_batches(seconds)``: an empty feature cache and ``seconds`` more per extracted batch, so that a
    run lasts long enough to be watched (progressive painting, Cancel, the Run bar)."""
    import time

    from napari_he2rna.maps import session as slide_session

    def slow_down(seconds: float) -> None:
        monkeypatch.setenv("HE2RNA_CACHE", str(tmp_path / "cache"))
        real = slide_session.SlideSession.take_batch

        def slow(self, *args, **kwargs):
            time.sleep(seconds)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(slide_session.SlideSession, "take_batch", slow)

    return slow_down
