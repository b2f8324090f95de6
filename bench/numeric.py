"""Small number helpers shared by the bench modules."""
from __future__ import annotations

import math
import statistics


def median(values):
    """Median of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rounded(v, digits: int = 4):
    """`v` rounded for a report; None for None, NaN and infinities (JSON has no NaN)."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(v, digits)
