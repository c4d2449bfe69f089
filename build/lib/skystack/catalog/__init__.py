"""Bayesian catalogs of stars and galaxies from many overlapping images (Celeste-style).

Pipeline: :func:`detect_sources` (sep on every image, merged across epochs and bands) ->
:func:`make_regions` (balanced by source count) -> :func:`fit_region` per region (neighbours
from other regions held fixed) -> catalog. :func:`heuristic_catalog` is the non-Bayesian
baseline and :func:`score_catalog` compares either against a truth table.

Units: fluxes in nanomaggies (1 nmgy = AB 22.5), positions ICRS degrees, position
uncertainties and galaxy radii in arcsec, colours in AB magnitudes (``color_gr = g - r``).
"""
from .data import ImageData
from .detect import detect_sources, extract_image
from .fit import fit_region, output_columns
from .heuristic import heuristic_catalog
from .priors import DEFAULT_PRIORS
from .psf import PsfMixture, fit_psf_image, gaussian_psf
from .regions import make_regions, region_neighbours
from .score import markdown_table, score_catalog

__all__ = [
    "ImageData", "PsfMixture", "DEFAULT_PRIORS", "detect_sources", "extract_image", "make_regions",
    "region_neighbours", "fit_region", "heuristic_catalog", "score_catalog", "markdown_table",
    "fit_psf_image", "gaussian_psf", "output_columns",
]
