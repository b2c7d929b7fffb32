"""Genes and gene sets: the built-in sets, user-defined set specs, and what a requested name is scored with.

A name a person types is looked up as a gene of the model (exact, then case-insensitive), then as a gene set
(built-in :data:`GENE_SETS` or user-defined), then as an inline set (``name=G1+G2`` or ``G1+G2``); the tile
feature distance has a name of its own (:data:`DISTANCE_NAME`). Set definitions are read by one function,
:func:`parse_gene_sets` (a command's ``--genes`` and ``--gene-sets`` by :func:`parse_request`), which refuses
a set named like a gene of the model or defined twice. Plain Python: no Qt, no napari.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import GeneError
from ..model import ood

#: Built-in gene sets of the HE2RNA paper's spatialization figures.
GENE_SETS: dict[str, list[str]] = {
    "T cells": ["CD3D", "CD3E", "CD3G", "CD247"],
    "B cells": ["CD19", "MS4A1"],
    "epithelium": ["TP63", "KRT8", "KRT18"],
    "proliferation": ["MKI67"],
}

#: What the gene picker offers (and :meth:`SlideSession.scores` accepts) for the tile feature distance.
DISTANCE_NAME = "feature distance (to training data)"


class PartialGeneSetWarning(UserWarning):
    """Some genes of a gene set are not in the model; the set is scored with the genes that are."""


def _split_genes(text: str) -> list[str]:
    for sep in "+,;\t":
        text = text.replace(sep, " ")
    return [g for g in text.split() if g]


def parse_gene_sets(
    spec: str | os.PathLike | Mapping[str, Sequence[str]],
    genes: Sequence[str] | GeneLookup | None = None,
) -> dict[str, list[str]]:
    """Parse user-defined gene sets from an inline spec or a file: the one reader of set definitions.

    Every command (``--gene-sets``, and the inline sets of ``--genes`` through :func:`parse_request`) and the
    Model dock read sets with it, so one spec means the same everywhere.

    Parameters
    ----------
    spec
        Either an inline spec ``"name=G1+G2;other=G3+G4"`` (genes may also be separated by commas or spaces),
        or the path of a file: ``.json`` holding ``{"name": ["G1", "G2"], ...}``, or a GMT-like text file with
        one set per line, either ``name<TAB>description<TAB>G1<TAB>G2...`` (MSigDB GMT) or ``name=G1+G2`` /
        ``name: G1, G2``. Blank lines and lines starting with ``#`` are ignored. A mapping (set name ->
        genes) is checked as a spec is.
    genes
        The model's genes (or a :class:`GeneLookup` of them): a set named like one of them is refused, since
        the name would mean the gene in one place and the set in another.

    Returns
    -------
    dict
        Set name -> gene symbols, in the order given, duplicates removed.

    Raises
    ------
    GeneError
        The spec or file is malformed, a set has no genes, a name is defined twice (names are
        case-insensitive) or is a gene of the model.
    """
    if isinstance(spec, Mapping):
        pairs = [(str(k).strip(), [str(g).strip() for g in v if str(g).strip()]) for k, v in spec.items()]
        return _checked_sets(pairs, genes)
    text = str(spec)
    path = Path(text).expanduser()
    looks_inline = "=" in text and not path.is_file()
    if not looks_inline and path.is_file():
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GeneError(f"cannot read the gene-set file {path}: {exc}") from exc
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(content, object_pairs_hook=lambda pairs: pairs)  # keeps a repeated key
            except json.JSONDecodeError as exc:
                raise GeneError(
                    f"the gene-set file {path} is not valid JSON ({exc.msg}, line {exc.lineno})."
                ) from exc
            if not isinstance(data, list) or not all(isinstance(v, list) for _, v in data):
                raise GeneError(
                    f'the gene-set file {path} must hold an object {{"set name": ["GENE", ...]}}.'
                )
            sets = [(str(k).strip(), [str(g).strip() for g in v if str(g).strip()]) for k, v in data]
        else:
            sets = []
            for lineno, line in enumerate(content.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if "\t" in line and "=" not in line and ":" not in line.split("\t", 1)[0]:
                    fields = [f.strip() for f in line.split("\t")]
                    name, members = fields[0], [g for g in fields[2:] if g]  # GMT: name, description, genes
                else:
                    sep = "=" if "=" in line else ":" if ":" in line else None
                    if sep is None:
                        raise GeneError(
                            f"line {lineno} of {path} is not 'name=G1+G2', 'name: G1, G2' or a GMT line."
                        )
                    name, _, rest = line.partition(sep)
                    name, members = name.strip(), _split_genes(rest)
                sets.append((name, members))
    elif "=" in text:
        sets = []
        for part in text.split(";"):
            if not part.strip():
                continue
            name, sep, rest = part.partition("=")
            if not sep or not name.strip():
                raise GeneError(f"cannot read the gene set {part.strip()!r}: write it as 'name=GENE1+GENE2'.")
            sets.append((name.strip(), _split_genes(rest)))
    else:
        raise GeneError(
            f"{text!r} is neither a gene-set file nor a spec like 'name=GENE1+GENE2;other=GENE3'."
        )
    return _checked_sets(sets, genes)


def _checked_sets(
    sets: Sequence[tuple[str, list[str]]], genes: Sequence[str] | GeneLookup | None
) -> dict[str, list[str]]:
    """``(name, genes)`` pairs as a dict, each name checked: not empty, with genes, given once, no gene's."""
    upper = None if genes is None else (genes if isinstance(genes, GeneLookup) else GeneLookup(genes)).upper
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name, members in sets:
        if not name:
            raise GeneError("a gene set has an empty name.")
        if not members:
            raise GeneError(f"the gene set {name!r} lists no genes.")
        if name.lower() in seen:
            raise GeneError(_twice_message(name))
        if upper is not None and name.upper() in upper:
            raise GeneError(_shadow_message(name, upper[name.upper()]))
        seen.add(name.lower())
        out[name] = list(dict.fromkeys(members))
    return out


def _twice_message(name: str) -> str:
    """The sentence refusing a gene set defined twice."""
    return f"the gene set {name!r} is defined twice; give each set its own name."


def _shadow_message(name: str, gene: str) -> str:
    """The sentence refusing a gene set named like a gene of the model."""
    return f"the gene set {name!r} has the name of a gene of this model ({gene}); give the set another name."


def parse_request(
    names: Iterable[str] | str,
    gene_sets: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    genes: Sequence[str] | GeneLookup | None = None,
) -> tuple[list[str], dict[str, list[str]]]:
    """What a command was asked for: the names of ``--genes`` and the sets they use (every command's reading).

    ``names`` are genes, set names, unnamed sets (``G1+G2``) and inline sets (``name=G1+G2``), a list or one
    comma-separated string; ``gene_sets`` the sets of ``--gene-sets`` (see :func:`parse_gene_sets`). Each
    inline set is taken out of the names into the sets, and its name put in its place.

    Returns
    -------
    names, sets
        The names to resolve (:func:`resolve_names`) and the user-defined sets (name -> genes).

    Raises
    ------
    GeneError
        A set is malformed, defined twice (in ``--gene-sets``, in ``--genes`` or in both) or named like a gene
        of ``genes``.
    """
    items = split_names(names) if isinstance(names, str) else [str(n).strip() for n in names]
    sets = parse_gene_sets(gene_sets, genes) if gene_sets is not None else {}
    defined = {k.lower() for k in sets}
    out: list[str] = []
    for item in items:
        if "=" not in item:
            out.append(item)
            continue
        for name, members in parse_gene_sets(item, genes).items():
            if name.lower() in defined:
                raise GeneError(_twice_message(name))
            defined.add(name.lower())
            sets[name] = members
            out.append(name)
    return out, sets


def split_names(text: str) -> list[str]:
    """Split a comma-separated list of names (``'CD3D, MKI67,T cells'``), keeping spaces inside names."""
    return [
        n.strip().strip('"').strip("'").strip() for n in text.split(",") if n.strip().strip("\"'").strip()
    ]


class GeneLookup:
    """A model's genes indexed for name lookup (exact and case-insensitive), built once per model.

    :func:`resolve_names` accepts one in place of the gene list: on a 30,000-gene model, building the
    case-insensitive index costs about 10 ms, which a viewer pays once instead of at every gene pick.
    """

    def __init__(self, genes: Sequence[str]) -> None:
        self.genes: list[str] = list(genes)
        self.exact: frozenset[str] = frozenset(self.genes)
        self.upper: dict[str, str] = {g.upper(): g for g in self.genes}


def resolve_names(
    bundle_genes: Sequence[str] | GeneLookup,
    names: Iterable[str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Map each requested gene or gene-set name to the model genes it is scored with.

    A name is looked up as a gene of the model (exact, then case-insensitive), then as a gene set (the
    built-in :data:`GENE_SETS` plus ``gene_sets``, case-insensitive), then as an inline set in the syntax of
    :func:`parse_gene_sets`: ``name=G1+G2`` (the set ``name``) or ``G1+G2`` (a set named as written). A set
    whose genes are partly missing from the model is scored with the genes present and a
    :class:`PartialGeneSetWarning` names the missing ones. A name that is both a gene of the model and a
    user-defined set, an inline set named like a gene, and a set defined twice are refused (see
    :func:`parse_gene_sets`): which one was meant cannot be told.

    Parameters
    ----------
    bundle_genes
        The model's gene symbols (``ModelBundle.genes``), or a :class:`GeneLookup` of them.
    names
        Gene symbols and/or set names, as the user typed them.
    gene_sets
        User-defined sets (name -> genes); they take precedence over built-in sets of the same name.

    Returns
    -------
    dict
        Canonical name (the model's gene spelling or the set's name) -> list of model genes, in request order.

    Raises
    ------
    GeneError
        A name is neither a model gene nor a known set (with close-match suggestions), a set has none of its
        genes in the model, a set name is a gene's or is defined twice, or no name was given.
    """
    lookup = bundle_genes if isinstance(bundle_genes, GeneLookup) else GeneLookup(bundle_genes)
    genes, gene_set, upper = lookup.genes, lookup.exact, lookup.upper
    user = {k.lower(): k for k in (gene_sets or {})}
    defined = set(user)  # user-defined set names (lower case), the inline ones too as they come
    sets = {**GENE_SETS, **(dict(gene_sets) if gene_sets else {})}
    sets_lower = {k.lower(): k for k in sets}
    out: dict[str, list[str]] = {}
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        if name.upper() in upper and name.lower() in user:  # the gene or the set? refused, not guessed
            raise GeneError(_shadow_message(user[name.lower()], upper[name.upper()]))
        if name in gene_set:
            out[name] = [name]
        elif name.upper() in upper:
            out[upper[name.upper()]] = [upper[name.upper()]]
        elif name.lower() in sets_lower:
            set_name = sets_lower[name.lower()]
            out[set_name] = _set_members(set_name, sets[set_name], upper)
        elif "=" in name:  # an inline set, as the Model dock takes it: name=G1+G2
            for set_name, members in parse_gene_sets(name, lookup).items():
                if set_name.lower() in defined:
                    raise GeneError(_twice_message(set_name))
                defined.add(set_name.lower())
                out[set_name] = _set_members(set_name, members, upper)
        elif "+" in name:  # an unnamed set: G1+G2, named as written
            out[name] = _set_members(name, _split_genes(name), upper)
        else:
            raise GeneError(_unknown_name_message(name, genes, list(sets)))
    if not out:
        raise GeneError("no gene or gene set was given.")
    return out


def _set_members(set_name: str, genes: Sequence[str], upper: Mapping[str, str]) -> list[str]:
    """The model genes of a set (case-insensitive); warns about the missing ones, refuses a set of none."""
    members = [upper.get(g.upper()) for g in genes]
    present = [g for g in dict.fromkeys(members) if g is not None]
    missing = [g for g, m in zip(genes, members, strict=True) if m is None]
    if not present:
        raise GeneError(f"none of the genes of the set {set_name!r} ({', '.join(genes)}) is in the model.")
    if missing:
        warnings.warn(
            f"gene set {set_name!r}: {', '.join(missing)} not in the model; "
            f"scored with {', '.join(present)}.",
            PartialGeneSetWarning,
            stacklevel=3,
        )
    return present


def _unknown_name_message(name: str, genes: list[str], set_names: list[str]) -> str:
    # difflib on upper-cased symbols: gene symbols are case-insensitive for people ("cd3d" means CD3D).
    by_upper: dict[str, str] = {g.upper(): g for g in genes}
    by_upper.update({s.upper(): s for s in set_names})
    close = difflib.get_close_matches(name.upper(), list(by_upper), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(by_upper[c]) for c in close)}?" if close else ""
    return f"{name!r} is not a gene of this model nor a known gene set.{hint}"


def is_distance_name(name: str) -> bool:
    """True for :data:`DISTANCE_NAME`, its short form ``feature distance`` (any case) or the CSV column name
    ``feature_distance``."""
    key = " ".join(str(name).strip().lower().split())
    return key in (DISTANCE_NAME.lower(), "feature distance", ood.DISTANCE_COLUMN)
