"""Plots of CANAL training, predictions and the example bank, with scanpy's ``ax``/``show``/``save``/``return_fig``."""

from ._annotation import confusion, uncertainty
from ._training import example_bank, stage_metrics
from ._tree import cell_type_tree

__all__ = ["cell_type_tree", "confusion", "example_bank", "stage_metrics", "uncertainty"]
