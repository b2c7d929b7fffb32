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
