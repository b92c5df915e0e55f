"""JSON that strict parsers accept: what every ``--json`` output and the API print.

Python's ``json`` writes ``NaN`` and ``Infinity`` for undefined floats (a ROC-AUC on one
class, an empty mean), which ``JSON.parse``, ``jq`` and most other parsers refuse. Here
they become ``null``: the value is undefined, and a consumer can tell that from 0.
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (also numpy floats) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return strict(obj.item())  # numpy scalar
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`strict` (``allow_nan=False`` guards what slipped through)."""
    kwargs.setdefault("default", str)
    return json.dumps(strict(obj), allow_nan=False, **kwargs)
