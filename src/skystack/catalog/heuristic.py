"""A non-Bayesian baseline catalog: sep extraction and AUTO photometry, merged across images.

This is what the Bayesian catalog is scored against: sep alone (no joint matched filter), each
image measured on its own (windowed centroid, Kron flux), and per-band fluxes are
inverse-variance means over images.
"""
from __future__ import annotations

import pandas as pd

from .data import ImageData
from .detect import add_magnitudes_and_colors, detect_sources


def heuristic_catalog(images: list[ImageData], *, thresh_sigma: float = 3.0, match_radius_arcsec: float = 1.5,
                      min_detections: int | None = None) -> pd.DataFrame:
    """Catalog with the Bayesian catalog's columns where the heuristic has them.

    ra_sd/dec_sd (arcsec) and flux sds are the formal errors of the means; p_star is a
    hard 0/1 guess from the half-light radius against the PSF's; galaxy shapes are moment
    estimates (frac_dev is not measured: NaN).
    """
    cat = detect_sources(images, thresh_sigma=thresh_sigma, match_radius_arcsec=match_radius_arcsec,
                         min_detections=min_detections, matched_filter=False)
    bands = sorted({im.band for im in images})
    cat = add_magnitudes_and_colors(cat, bands)
    cat["p_star"] = cat["is_star"].astype(float) if len(cat) else []
    cat["gal_frac_dev"] = float("nan")
    return cat
