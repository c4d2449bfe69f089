"""A refined track that crosses a brighter object's on part of the survey is that object's light
(``search.refinement._drop_ghosts``); an object that only crosses another's track keeps its own."""
import logging

import numpy as np
import pandas as pd

from skystack.search.refinement import _drop_ghosts


def _track(image_ids, x, y, snr_per_image, rng):
    """A refined track's per-image rows: psi / sqrt(phi) is each image's SNR (unit-variance noise)."""
    n = len(image_ids)
    phi = np.full(n, 4.0)
    psi = (np.asarray(snr_per_image, float) + rng.normal(0, 1, n)) * np.sqrt(phi)
    return pd.DataFrame({"image_id": image_ids, "x": x, "y": y, "psi": psi, "phi": phi, "kept": True})


def _row(orbit_id, t):
    return {"orbit_id": orbit_id, "snr": float(t["psi"].sum() / np.sqrt(t["phi"].sum())), "n_merged_refined": 0}


def test_a_track_on_a_brighter_objects_images_is_merged_and_a_crossing_object_is_kept():
    rng = np.random.default_rng(4)
    ids = np.arange(100)
    bright = _track(ids, 50 + 0.3 * ids, np.full(100, 40.0), 2.0, rng)  # SNR about 20
    # The ghost: on images 0-39 it lies on the bright track and collects its light; elsewhere
    # it runs through empty sky.
    gx = np.where(ids < 40, 50 + 0.3 * ids, 50 + 0.3 * ids + 0.2 * (ids - 40))
    ghost = _track(ids, gx, np.where(ids < 40, 40.0, 40.0 + 0.5 * (ids - 40)), np.where(ids < 40, 2.0, 0.0), rng)
    # An independent object of SNR about 10 crossing the bright track on images 60-64 only.
    cross_y = 40.0 + 0.8 * (ids - 62)
    real = _track(ids, 50 + 0.3 * ids, cross_y, 1.0, rng)
    out = [_row(1, bright), _row(2, ghost), _row(3, real)]
    assert out[1]["snr"] > 7.0 and out[2]["snr"] > 7.0  # both would pass the refined threshold
    kept, tracks = _drop_ghosts(out, [bright, ghost, real], match_px=2.4, snr_threshold=7.0,
                                log=logging.getLogger("test"))
    assert [r["orbit_id"] for r in kept] == [1, 3]
    assert kept[0]["n_merged_refined"] == 1 and len(tracks) == 2
