"""The hospital A/B experiment's defaults, without torch: the command line's parser reads them."""

from __future__ import annotations

#: The paper's A:B splits (share of the patients that go to hospital A), 0 = no hospital A.
DEFAULT_RATIOS: tuple[float, ...] = (5 / 6, 3 / 4, 2 / 3, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 0.0)
#: Hospital B's classifiers: on the mean feature, the representation, autoencoder codes learnt on A or on B.
METHODS: tuple[str, ...] = ("direct", "representation", "autoencoder_A", "autoencoder_B")
