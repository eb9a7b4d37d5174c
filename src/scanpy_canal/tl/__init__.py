"""Tools on annotated data: annotation with a CANAL model, and metrics for predictions and continual streams."""

from ._annotate import annotate, mirror_obs, unassign, write_annotation
from ._evaluate import continual_metrics, evaluate

# The other names imported here are this package's interface to the layers above it (see docs/code_map.md);
# the user's API is `__all__`.
__all__ = ["annotate", "continual_metrics", "evaluate", "unassign"]
