"""Open napari with a slide and the plugin's panel docked (what ``he2rna view`` runs).

napari is imported inside :func:`open_viewer` only, so that importing this module (and the CLI) works on
machines without a display.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN = "napari-he2rna"
#: The manifest widget holding the others as tabs (what ``he2rna view`` docks).
PANEL = "HE2RNA"


def manifest_widgets(manifest: Path | None = None) -> list[str]:
    """Display names of the widgets the plugin declares (installed npe2 manifest, else ``napari.yaml``)."""
    if manifest is None:
        try:
            from npe2 import PluginManager

            pm = PluginManager.instance()
            pm.discover()
            widgets = pm.get_manifest(PLUGIN).contributions.widgets or []
            return [w.display_name for w in widgets]
        except (ImportError, KeyError):
            manifest = Path(__file__).resolve().parents[1] / "napari.yaml"
    if not manifest.is_file():
        return []
    import yaml  # a napari dependency; the manifest is plain YAML

    doc = yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}
    widgets = (doc.get("contributions") or {}).get("widgets") or []
    return [w["display_name"] for w in widgets if isinstance(w, dict) and w.get("display_name")]


def open_viewer(slide: str | None = None, mpp: float | None = None, show: bool = True, viewer=None):
    """Build the viewer: the slide through the plugin's reader, then every plugin widget docked; with no
    saved window geometry, the window is fitted to the screen (:func:`fit_window`).

    ``viewer`` builds into that viewer instead of a new one (tests). Returns the viewer (the caller runs
    the event loop). napari is imported here only: the rest of the CLI must work on machines without a
    display.
    """
    from ..torch_preload import preload

    preload()  # before napari creates a GL context: see napari_he2rna.torch_preload
    import napari

    from ..errors import SlideError
    from ..slides.slide import validate_mpp

    if slide is not None and not Path(slide).exists():
        raise SlideError(f"{slide} does not exist.")
    mpp = validate_mpp(mpp) if mpp is not None else None
    if viewer is None:
        viewer = napari.Viewer(title="napari-he2rna", show=show)
    if slide is not None and mpp is None:
        viewer.open(slide, plugin=PLUGIN)
    elif slide is not None:
        # npe2 readers get a path only, so a pixel-size override goes through the reader's own layer builder.
        from ._reader import open_slide_layer

        for data, kwargs, _kind in (d for d in open_slide_layer(slide, mpp=mpp) if d[0] is not None):
            viewer.add_image(data, **kwargs)
    # One dock with the widgets as tabs (the separate widgets stay in the Plugins menu).
    names = manifest_widgets()
    docked = [PANEL] if PANEL in names else names
    docks = [viewer.window.add_plugin_dock_widget(PLUGIN, name)[0] for name in docked]
    if docks and not saved_geometry():
        fit_window(docks[0])
    return viewer


def saved_geometry() -> bool:
    """True when napari restores a window size the user left (it saves one on close, if allowed)."""
    from napari.settings import get_settings

    app = get_settings().application
    return bool(app.save_window_geometry and app.window_size)


def fit_window(dock, screen: tuple[int, int] | None = None) -> tuple[int, int]:
    """Size napari's window to the screen and the plugin's dock to a sensible width: the canvas gets most.

    napari's first window is its layout's size hint (1089 x 630 on a fresh install), where the plugin's dock
    left the canvas about 200 px. Here the window takes the screen's free area (``screen`` = (width, height)
    instead of the screen's, e.g. in tests) and the dock about a fifth of its width, from its minimum (what
    its tabs need) up to :data:`~._panel.PANEL_WIDTH`. Returns the window's new (width, height).
    """
    from qtpy.QtCore import Qt

    from ._panel import PANEL_WIDTH

    window = dock.window()
    area = window.screen().availableGeometry()
    width, height = screen if screen is not None else (area.width(), area.height())
    window.resize(width, height)
    if screen is None:
        window.move(area.topLeft())
    least = dock.widget().minimumSizeHint().width()  # what the panel's tabs need
    want = min(PANEL_WIDTH, max(least, int(0.22 * width)))
    window.resizeDocks([dock], [want], Qt.Orientation.Horizontal)
    return width, height


def run_viewer(slide: str | None = None, mpp: float | None = None) -> None:
    """What ``he2rna view`` does: :func:`open_viewer`, then napari's event loop until the window closes."""
    import napari

    open_viewer(slide, mpp)
    napari.run()
