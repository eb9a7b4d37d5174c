"""Cell-type relations from Cell Ontology ids: reading the ids, the nearest-ancestor rule, the stage, the CLI."""

import sys

import numpy as np
import pandas as pd
import pytest
from conftest import QUIET, TINY_ARCH

import scanpy_canal as canal
from scanpy_canal.model._ontology import cell_ontology, merge_terms, ontology_relations, read_terms

T_CELL, CD4, CD8, B_CELL, LYMPHOCYTE = "CL:0000084", "CL:0000624", "CL:0000625", "CL:0000236", "CL:0000542"
#: A hand-made piece of the ontology: each term's ancestors with their distances (as the Cell Ontology has them).
ANCESTORS = {
    CD4: {"CL:0000791": 1, T_CELL: 3, LYMPHOCYTE: 4},
    CD8: {"CL:0000791": 1, T_CELL: 3, LYMPHOCYTE: 4},
    T_CELL: {LYMPHOCYTE: 1},
    B_CELL: {LYMPHOCYTE: 2},
    LYMPHOCYTE: {},
}
SETTINGS = {"max_epochs": 1, "batch_size": 16, **QUIET}


def test_terms_are_read_per_label_and_bad_ones_are_clear_errors():
    labels = np.array(["T", "T", "B", "B", "NK"])
    obs = pd.DataFrame({"cl": [T_CELL, T_CELL, B_CELL, None, ""]})
    assert read_terms(obs, labels, "cl") == {"T": T_CELL, "B": B_CELL}  # NK carries none
    with pytest.raises(ValueError, match="more than one Cell Ontology id.*'T'"):
        read_terms(obs.assign(cl=[T_CELL, CD4, B_CELL, B_CELL, B_CELL]), labels, "cl")
    with pytest.raises(ValueError, match="not Cell Ontology ids.*T cell"):
        read_terms(obs.assign(cl=["T cell", T_CELL, B_CELL, B_CELL, B_CELL]), labels, "cl")
    with pytest.raises(KeyError, match="'ontology'.*available columns"):
        read_terms(obs, labels, "ontology")
    with pytest.raises(ValueError, match=r"'T': \('CL:0000084', 'CL:0000624'\)"):
        merge_terms({"T": T_CELL}, {"T": CD4})


def test_new_types_go_under_their_nearest_ancestor_and_a_coarse_name_over_known_types():
    # refinement: CD4 T and CD8 T under T cell, the nearest of their ancestors among the model's types
    terms = {"lymphocyte": LYMPHOCYTE, "T cell": T_CELL, "B": B_CELL, "CD4 T": CD4, "CD8 T": CD8}
    relations, evidence = ontology_relations(terms, ["CD4 T", "CD8 T"], {"T cell": "lymphocyte"}, ANCESTORS.get)
    assert relations == {"CD4 T": "T cell", "CD8 T": "T cell"}
    assert evidence["CD4 T"] == {"term": CD4, "parent_term": T_CELL, "distance": 3}
    # a coarse name after the fine ones: the known types without a parent go under it; one with a parent keeps it
    terms = {"CD4 T": CD4, "CD8 T": CD8, "B": B_CELL, "T cell": T_CELL}
    relations, _ = ontology_relations(terms, ["T cell"], {"CD8 T": "B"}, ANCESTORS.get)
    assert relations == {"CD4 T": "T cell"}
    # unrelated terms relate nothing
    assert ontology_relations({"T cell": T_CELL, "B": B_CELL}, ["B"], {}, ANCESTORS.get)[0] == {}


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cellxgene_ontology_guide.ontology_parser", None)
    with pytest.raises(ImportError, match=r"scanpy-canal\[ontology\]"):
        cell_ontology()


def with_terms(adata, mapping):
    adata = adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).map(lambda name: mapping[name][0])
    adata.obs["cl"] = adata.obs["cell_type"].map(dict(mapping.values()))
    canal.CANAL.setup_anndata(adata, labels_key="cell_type", ontology_key="cl")
    return adata


def test_a_stage_takes_its_relations_from_the_cell_ontology(small_stream, tmp_path):
    pytest.importorskip("cellxgene_ontology_guide")
    names = {"type_0": ("T cell", T_CELL), "type_1": ("B", B_CELL)}
    first = with_terms(small_stream.train[0], names)
    second = with_terms(small_stream.train[1], {**names, "type_2": ("CD4 T", CD4), "type_3": ("CD8 T", CD8)})
    model = canal.CANAL(first, **TINY_ARCH)
    model.train(**SETTINGS)
    model.train(second, **SETTINGS)
    assert model.cell_type_parents_ == {"CD4 T": "T cell", "CD8 T": "T cell"}
    record = model.stage_history_[-1]
    assert record["relation_evidence"]["CD8 T"] == {"term": CD8, "parent_term": T_CELL, "distance": 3}
    model.save(tmp_path / "model")
    loaded = canal.CANAL.load(tmp_path / "model")
    assert loaded.cell_type_terms_ == {"T cell": T_CELL, "B": B_CELL, "CD4 T": CD4, "CD8 T": CD8}
    assert loaded.cell_type_parents_ == model.cell_type_parents_


def test_setup_checks_the_ids(small_stream):
    adata = small_stream.train[0].copy()
    adata.obs["cl"] = "not an id"
    with pytest.raises(ValueError, match="not Cell Ontology ids"):
        canal.CANAL.setup_anndata(adata, labels_key="cell_type", ontology_key="cl")
    with pytest.raises(ValueError, match="give labels_key"):
        canal.CANAL.setup_anndata(adata, ontology_key="cl")
