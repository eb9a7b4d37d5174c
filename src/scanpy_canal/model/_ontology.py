"""Cell-type relations from the Cell Ontology, offline, where the labels come with Cell Ontology term ids.

The ontology ships inside the optional ``cellxgene-ontology-guide`` package (``pip install "scanpy-canal[ontology]"``);
nothing is downloaded. A stage's new type goes under its nearest ontology ancestor among the model's types, and a
known type without a parent goes under its nearest ancestor among the stage's new types (a coarser name that arrives
after the fine ones).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

#: A Cell Ontology term id.
TERM_ID = re.compile(r"^CL:\d{7}$")


def read_terms(obs: pd.DataFrame, labels: np.ndarray, ontology_key: str) -> dict[str, str]:
    """Each label's Cell Ontology term from ``obs[ontology_key]``; labels whose cells carry none are left out.

    A malformed id, or a label whose cells carry two different ids, is an error.
    """
    if ontology_key not in obs:
        raise KeyError(
            f"Ontology key {ontology_key!r} is not a column of adata.obs; available columns: {list(obs.columns)}."
        )
    column = obs[ontology_key]
    given = column.notna().to_numpy() & (column.astype(str).str.strip() != "").to_numpy()
    pairs = pd.DataFrame({"label": np.asarray(labels)[given], "term": column.astype(str).to_numpy()[given]})
    malformed = sorted({term for term in pairs["term"] if not TERM_ID.match(term)})
    if malformed:
        raise ValueError(
            f"adata.obs[{ontology_key!r}] holds values that are not Cell Ontology ids (CL:0000000): {malformed[:5]}."
        )
    terms = pairs.drop_duplicates().groupby("label")["term"].agg(list)
    ambiguous = {label: found for label, found in terms.items() if len(found) > 1}
    if ambiguous:
        raise ValueError(
            f"adata.obs[{ontology_key!r}] gives some cell types more than one Cell Ontology id: {ambiguous}; each "
            "cell type needs one."
        )
    return {label: found[0] for label, found in terms.items()}


def merge_terms(known: Mapping[str, str], stage: Mapping[str, str]) -> dict[str, str]:
    """The model's terms with the stage's added; a known type given another term is an error."""
    changed = {name: (known[name], term) for name, term in stage.items() if known.get(name, term) != term}
    if changed:
        raise ValueError(
            "Some cell types have another Cell Ontology id in this stage than in the model's earlier stages "
            f"(type: (before, now)): {changed}."
        )
    return {**known, **stage}


def ontology_relations(
    terms: Mapping[str, str],
    new_types: Sequence[str],
    parents: Mapping[str, str],
    ancestor_distances: Callable[[str], Mapping[str, int]],
) -> tuple[dict[str, str], dict[str, dict[str, str | int]]]:
    """The relations ``{child: parent}`` the ontology gives a stage, with their evidence (terms and distance).

    Parameters
    ----------
    terms
        The term of every type that has one: the model's types and the stage's.
    new_types
        The stage's new types.
    parents
        The tree so far: a known type with a parent keeps it.
    ancestor_distances
        A term's ontology ancestors with their distances (``is_a`` and ``part_of`` steps).
    """
    relations: dict[str, str] = {}
    evidence: dict[str, dict[str, str | int]] = {}
    new = set(new_types)
    for child in terms:
        if child not in new and child in parents:
            continue
        candidates = [name for name in terms if name != child] if child in new else list(new_types)
        distances = ancestor_distances(terms[child])
        nearest = [(distances[terms[name]], name) for name in candidates if terms.get(name) in distances]
        if nearest:
            distance, parent = min(nearest)
            relations[child] = parent
            evidence[child] = {"term": terms[child], "parent_term": terms[parent], "distance": int(distance)}
    return relations, evidence


def cell_ontology() -> Callable[[str], Mapping[str, int]]:
    """A term's Cell Ontology ancestors with their distances, from the ontology the optional package ships."""
    try:
        from cellxgene_ontology_guide.ontology_parser import OntologyParser
    except ImportError as error:
        raise ImportError(
            "Relations from Cell Ontology ids need the `cellxgene-ontology-guide` package, which ships the ontology "
            "(no download): `pip install 'scanpy-canal[ontology]'`; or pass `parents=` to say them, or leave the "
            "ontology key out to find them from the data."
        ) from error
    parser = OntologyParser()

    def ancestor_distances(term: str) -> Mapping[str, int]:
        try:
            return parser.get_term_ancestors_with_distances(term)
        except (KeyError, ValueError) as error:
            raise ValueError(f"{term!r} is not a term of the Cell Ontology that ships with the package.") from error

    return ancestor_distances
