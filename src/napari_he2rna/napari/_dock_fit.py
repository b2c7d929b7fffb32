"""Fitting the plugin's widgets into a narrow dock: nothing wider than the dock, long text shortened.

A dock beside napari's canvas is a few hundred pixels wide. Combo boxes size themselves to their longest item
by default (a gene label, a model file name), and a form puts each label beside its field; both can make a
tab wider than the dock, and the dock then cuts its right edge off. :func:`compact_widgets` makes every
combo box elide its items instead and lets form rows put the label above the field when they do not fit;
:func:`elide_middle` shortens a path or name for a label (the full text goes in its tooltip).
"""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QFormLayout, QLayout, QWidget

#: Characters a combo box keeps before eliding its items (its smallest width).
COMBO_MIN_CHARS = 10


def elide_middle(text: str, max_chars: int = 40) -> str:
    """``text`` if it is at most ``max_chars`` long, else its start and end around an ellipsis."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - 1, 2)
    head = keep // 2
    return text[:head] + "…" + text[len(text) - (keep - head) :]


def _form_layouts(layout: QLayout | None):
    if layout is None:
        return
    if isinstance(layout, QFormLayout):
        yield layout
    for i in range(layout.count()):
        child = layout.itemAt(i).layout()
        if child is not None:
            yield from _form_layouts(child)


def compact_widgets(root: QWidget) -> None:
    """Let everything under ``root`` shrink to a narrow dock: combo boxes elide their items (at least
    :data:`COMBO_MIN_CHARS` characters shown) and form rows wrap their label above the field when the two
    do not fit side by side."""
    for combo in root.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(COMBO_MIN_CHARS)
    for widget in [root, *root.findChildren(QWidget)]:
        for form in _form_layouts(widget.layout()):
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
