"""Sub-commands of ``he2rna``; each module exposes ``register(subparsers)`` (see :mod:`napari_he2rna.cli`)."""
