"""Preprocessing: bring expression values to CANAL's scale and data onto a model's gene panel."""

from ._align import align_genes
from ._normalize import normalize

__all__ = ["align_genes", "normalize"]
