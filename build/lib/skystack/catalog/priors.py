"""Priors of the catalog model, from a config dict with documented defaults.

Magnitudes are AB; fluxes are nanomaggies (``f = 10**(-0.4 (m - 22.5))``). Colours are
given in magnitudes per adjacent band pair (``"gr"`` is g - r) and converted to the model's
natural-log flux ratios (``c = 0.4 ln(10) (g - r)``).
"""
from __future__ import annotations

import copy

import numpy as np

from ..core.units import MAG_TO_LN, NMGY_ZERO_MAG

# Wavelength order of the usual survey filters; other band names sort after these.
BAND_ORDER = ("u", "g", "r", "i", "z", "y")

DEFAULT_PRIORS = {
    "p_star": 0.5,                      # prior probability that a source is a star
    "r_mag_mean": {"star": 21.0, "galaxy": 21.5},
    "r_mag_sd": 2.5,                    # broad: the data dominate above SNR ~ 3
    "color_mean_mag": {
        "star": {"ug": 1.3, "gr": 0.7, "ri": 0.3, "iz": 0.15, "zy": 0.05},
        "galaxy": {"ug": 1.2, "gr": 0.6, "ri": 0.35, "iz": 0.25, "zy": 0.1},
    },
    "color_sd_mag": 1.0,
    "default_color_mean_mag": 0.3,      # for band pairs not listed above
    "pos_sd_arcsec": 3.0,               # around the detected position
    "frac_dev_logit_mean": 0.0,
    "frac_dev_logit_sd": 1.5,
    "shape_u_sd": 0.6,                  # per component of u, |u| = -ln(axis ratio)
    "radius_arcsec_median": 1.0,
    "ln_radius_sd": 0.8,
}


def merged_priors(priors: dict | None) -> dict:
    """Defaults overridden (one level deep for nested dicts) by ``priors``."""
    out = copy.deepcopy(DEFAULT_PRIORS)
    for k, v in (priors or {}).items():
        if k not in out:
            raise KeyError(f"unknown catalog prior {k!r}; known: {', '.join(sorted(out))}")
        if isinstance(v, dict) and isinstance(out[k], dict):
            for kk, vv in v.items():
                out[k][kk] = {**out[k][kk], **vv} if isinstance(vv, dict) and isinstance(out[k].get(kk), dict) else vv
        else:
            out[k] = v
    return out


def sort_bands(bands) -> list[str]:
    """Bands in wavelength order (unknown names last, alphabetically)."""
    bands = sorted(set(bands))
    return sorted(bands, key=lambda b: (BAND_ORDER.index(b) if b in BAND_ORDER else len(BAND_ORDER), b))


def reference_band_index(bands: list[str]) -> int:
    """The r band when present, else the middle band."""
    return bands.index("r") if "r" in bands else (len(bands) - 1) // 2


def color_names(bands: list[str]) -> list[str]:
    """Adjacent-pair colour names, e.g. ``["gr", "ri"]``."""
    return [a + b for a, b in zip(bands[:-1], bands[1:])]


def type_prior_arrays(priors: dict, bands: list[str], source_type: str) -> dict:
    """Numeric prior parameters for one type (``"star"`` or ``"galaxy"``), model units."""
    p = merged_priors(priors)
    colors = color_names(bands)
    means = p["color_mean_mag"][source_type]
    color_mean = np.array([means.get(c, p["default_color_mean_mag"]) for c in colors]) * MAG_TO_LN
    return {
        "pos_sd_arcsec": np.float64(p["pos_sd_arcsec"]),
        "ln_flux_mean": np.float64(-MAG_TO_LN * (p["r_mag_mean"][source_type] - NMGY_ZERO_MAG)),
        "ln_flux_sd": np.float64(MAG_TO_LN * p["r_mag_sd"]),
        "color_mean": color_mean,
        "color_sd": np.full(len(colors), MAG_TO_LN * p["color_sd_mag"]),
        "logit_frac_dev_mean": np.float64(p["frac_dev_logit_mean"]),
        "logit_frac_dev_sd": np.float64(p["frac_dev_logit_sd"]),
        "shape_u_sd": np.float64(p["shape_u_sd"]),
        "ln_radius_mean": np.float64(np.log(p["radius_arcsec_median"])),
        "ln_radius_sd": np.float64(p["ln_radius_sd"]),
    }
