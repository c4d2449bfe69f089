"""Evaluation against the simulated truth: which injected object a detection recovers."""
from __future__ import annotations

import numpy as np
import pandas as pd


def match_truth(detections: pd.DataFrame, truth_positions: pd.DataFrame, candidates: pd.DataFrame, match_px: float) -> pd.Series:
    """For each detection, the injected orbit it recovers (positions within ``match_px`` in at
    least half the images both cover), or -1."""
    out = pd.Series(-1, index=detections.index, dtype="int64")
    truth_by = {oid: g.set_index("image_id")[["x", "y"]] for oid, g in truth_positions.groupby("orbit_id")}
    for i, oid in detections["orbit_id"].items():
        mine = candidates[candidates["orbit_id"] == oid].set_index("image_id")[["x", "y"]]
        for toid, t in truth_by.items():
            shared = mine.index.intersection(t.index)
            if len(shared) and np.mean(np.hypot(mine.loc[shared, "x"] - t.loc[shared, "x"], mine.loc[shared, "y"] - t.loc[shared, "y"]) <= match_px) >= 0.5:
                out[i] = toid
                break
    return out
