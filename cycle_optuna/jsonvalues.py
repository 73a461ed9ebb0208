"""Values as strict JSON can hold them: Optuna attrs, `best --json` and the JSON trial log."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(v: Any) -> Any:
    """`v` with every NaN/inf float, however deep in lists and dicts, as None (strict JSON has no
    NaN; a trial's attrs and the JSON log would otherwise hold invalid JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_or_none(x) for x in v]
    return v
