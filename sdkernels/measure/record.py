"""Result records: what a measurement writes to JSON."""
from __future__ import annotations

import math

__all__ = ["jsonable"]


def jsonable(o):
    """JSON-ready copy: non-finite floats become null, keys strings, tuples lists."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    return o
