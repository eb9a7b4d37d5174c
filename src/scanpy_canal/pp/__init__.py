"""Preprocessing: bring expression values to CANAL's scale and data onto a model's gene panel."""

from scanpy_canal._genes import first_occurrences, gene_positions

from ._align import align_genes, gene_names, panel_columns, scatter_columns
from ._normalize import TARGET_SUM, is_natural_log1p, normalize

# The other names imported here are this package's interface to the layers above it (see docs/code_map.md);
# the user's API is `__all__`.
__all__ = ["align_genes", "normalize"]
