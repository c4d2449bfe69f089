"""Bayesian catalogs of stars and galaxies from many overlapping images (Celeste-style).

Pipeline: :func:`detect_sources` (sep on every image, merged across epochs and bands) ->
:func:`make_regions` (balanced by source count) -> :func:`fit_region` per region (neighbours
from other regions held fixed) -> catalog. :func:`heuristic_catalog` is the non-Bayesian
baseline and :func:`score_catalog` compares either against a truth table.

Units: fluxes in nanomaggies (1 nmgy = AB 22.5), positions ICRS degrees, position
uncertainties and galaxy radii in arcsec, colours in AB magnitudes (``color_gr = g - r``).
"""
from .data import ImageData, pixel_scale_arcsec
from .detect import detect_sources, extract_image
from .fit import fit_region, output_columns
from .heuristic import heuristic_catalog
from .priors import DEFAULT_PRIORS
from .psf import PsfMixture, fit_psf_image, gaussian_psf
from .regions import make_regions, region_neighbours
from .score import markdown_table, score_catalog


def fit_catalog(images, candidates=None, *, n_regions=None, max_sources_per_region=256, margin_arcsec=15.0,
                priors=None, **fit_kw):
    """Detect (unless ``candidates`` are given), split into regions and fit every region.

    Regions are fitted one after another here; the workflow runs them as separate jobs.
    Neighbours from other regions are held at their candidate values.
    """
    import pandas as pd

    cands = detect_sources(images) if candidates is None else candidates.reset_index(drop=True)
    if len(cands) == 0:
        return fit_region(cands, None, images, priors, **fit_kw)
    regions = make_regions(cands, n_regions=n_regions, max_sources_per_region=max_sources_per_region)
    parts = []
    for r in range(int(regions.max()) + 1):
        mine = cands[regions == r]
        neigh = region_neighbours(cands, regions, r, margin_arcsec)
        parts.append(fit_region(mine, neigh, images, priors, region=r, **fit_kw))
    return pd.concat(parts, ignore_index=True)


__all__ = [
    "ImageData", "PsfMixture", "DEFAULT_PRIORS", "detect_sources", "extract_image", "make_regions",
    "region_neighbours", "fit_region", "fit_catalog", "heuristic_catalog", "score_catalog", "markdown_table",
    "fit_psf_image", "gaussian_psf", "output_columns", "pixel_scale_arcsec",
]
