"""Image partitions: one tile cache and one search job each."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.bisection import balanced_bisection


def assign_partitions(images: pd.DataFrame, n_partitions: int) -> np.ndarray:
    """Partition number per image: balanced by count (sizes differ by at most one), spatially
    coherent (bisection of the image centres, ``core.bisection``) and deterministic (ties
    broken by image_id)."""
    return balanced_bisection(images["ra_center_deg"].to_numpy(), images["dec_center_deg"].to_numpy(),
                              n_partitions, tie_key=images["image_id"].to_numpy())
