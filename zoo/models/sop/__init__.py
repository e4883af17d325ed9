"""Sum-of-Parts: a prediction that is a weighted sum of the backbone's predictions on a few groups of
patches. ``model.py`` the registered model and its method; ``report.py`` the family's table rows.
"""

from .model import DEFAULT_SCHEDULE, SumOfParts, sparsemax
from .report import group_rows

__all__ = ["DEFAULT_SCHEDULE", "SumOfParts", "group_rows", "sparsemax"]
