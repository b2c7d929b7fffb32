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


def open_viewer(slide: str | None = None, mpp: float | None = None, show: bool = True):
    """Build the viewer: the slide through the plugin's reader, then every plugin widget docked.

    Returns the viewer (the caller runs the event loop). napari is imported here only: the rest of the CLI
    must work on machines without a display.
    """
    from ..torch_preload import preload

    preload()  # before napari creates a GL context: see napari_he2rna.torch_preload
    import napari

    from ..errors import SlideError
    from ..slides.slide import validate_mpp

    if slide is not None and not Path(slide).exists():
        raise SlideError(f"{slide} does not exist.")
    mpp = validate_mpp(mpp) if mpp is not None else None
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
    for name in [PANEL] if PANEL in names else names:
        viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return viewer
