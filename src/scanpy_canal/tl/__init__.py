"""Tools on annotated data: annotation with a CANAL model, and metrics for predictions and continual streams."""

from ._annotate import annotate, unassign
from ._evaluate import continual_metrics, evaluate

__all__ = ["annotate", "continual_metrics", "evaluate", "unassign"]
