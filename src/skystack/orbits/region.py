"""``orbits.source: region``: the trial orbits that cover each configured region of orbit space.

A region is a reference orbit (a known object's name or six elements with their epoch) and a
half-width per element (``orbits.regions[].half_width``, the schema's units), or a 6 x 6
covariance with ``n_sigma`` (``orbits.ellipsoid``: the box of its marginal widths is covered and
the trials no orbit of the ellipsoid needs are dropped). The covering
(``orbits.covering``) is built from the survey's own metric: the exposures that orbits of the
region reach (found with the search's own intersection code on orbits sampled from the box),
their times and sites, and the width of the matched filter on them (the indexed PSF, widened
in quadrature by ``search.smoothing_sigma_px``: a coarse pass on smoothed images needs a
correspondingly sparser lattice, at the width ``covering.smoothed_filter`` gives the loss). The
covering is pruned to the survey's images (``orbits.footprint``): every orbit of the box whose
track falls on at least ``search.min_images`` of those exposures then has a trial orbit whose
track costs at most ``search.max_snr_loss`` of the matched filter's SNR (an orbit on fewer
cannot be a detection, and most of a box wider than the survey's fields is such orbits); a
region needing more than ``search.max_trials`` is refused with the number and the search time.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from .covering import (
    DEFAULT_THROUGHPUT_ORBITS_PER_S,
    REGION_ELEMENTS,
    covering_lattice,
    sample_region,
    smoothed_filter,
    track_metric,
)
from .ellipsoid import ellipsoid_half_width, prune_to_ellipsoid, region_ellipsoid
from .footprint import exposure_fields
from .noise_peaks import scaled_to_filter
from .table import ELEMENT_COLUMNS, load_known_objects

#: Orbits sampled from a box (its 2^6 vertices are added) to find the exposures it reaches
#: (enough that a box mostly off the survey's fields still finds every exposure it reaches).
REACH_SAMPLES = 4096


def region_reference(spec: dict, known: pd.DataFrame, where: str) -> dict:
    """The reference elements of one region: a known object's name or a mapping of elements."""
    ref = spec.get("reference")
    if isinstance(ref, str):
        match = known[known["name"] == ref]
        if match.empty:
            raise ValueError(f"{where}.reference: {ref!r} is not a known object (have {', '.join(known['name'])})")
        return {k: float(match.iloc[0][k]) for k in ELEMENT_COLUMNS}
    if not isinstance(ref, dict):
        raise ValueError(f"{where}.reference: a known object's name or the elements {', '.join(ELEMENT_COLUMNS)}")
    missing = [k for k in ELEMENT_COLUMNS if k not in ref]
    if missing:
        raise ValueError(f"{where}.reference: missing {', '.join(missing)}")
    out = {k: float(ref[k]) for k in ELEMENT_COLUMNS}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad or out["a_au"] <= 0 or not 0 <= out["e"] < 1:
        raise ValueError(f"{where}.reference: not a bound orbit ({out})")
    return out


def region_half_width(spec: dict, reference: dict, where: str) -> dict:
    """Half-widths per element (missing = 0: not varied); the box must stay a bound orbit."""
    hw = {k: float((spec.get("half_width") or {}).get(k, 0.0)) for k in REGION_ELEMENTS}
    bad = [k for k, v in hw.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{where}.half_width: {', '.join(bad)} must be finite and >= 0")
    if not any(hw.values()):
        raise ValueError(f"{where}.half_width: every half-width is 0 (a region of one orbit: use orbits.source: file)")
    if reference["a_au"] - hw["a_au"] <= 0 or reference["e"] + hw["e"] >= 1 or reference["e"] - hw["e"] < 0:
        raise ValueError(f"{where}.half_width: the box leaves bound orbits (a {reference['a_au']} +- {hw['a_au']} AU, "
                         f"e {reference['e']} +- {hw['e']})")
    return hw


def _box_probe(reference: dict, hw: dict, seed: int) -> pd.DataFrame:
    """Orbits that stand for the box: its vertices and a uniform sample."""
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 6, indexing="ij")).reshape(6, -1).T
    x0 = np.array([reference[k] for k in REGION_ELEMENTS])
    h = np.array([hw[k] for k in REGION_ELEMENTS])
    corners = pd.DataFrame(x0 + signs * h, columns=REGION_ELEMENTS).assign(epoch_jd_tdb=reference["epoch_jd_tdb"])
    sample = sample_region(reference, hw, REACH_SAMPLES, seed=seed)
    probe = pd.concat([corners, sample[ELEMENT_COLUMNS]], ignore_index=True)
    for col in ("node_deg", "argperi_deg", "mean_anomaly_deg"):
        probe[col] = probe[col] % 360.0
    probe["inc_deg"] = probe["inc_deg"].clip(0.0, 180.0)
    return probe.assign(orbit_id=np.arange(len(probe), dtype=np.int64))


def region_exposures(images: pd.DataFrame, reference: dict, hw: dict, *, smoothing_sigma_px: float = 0.0,
                     seed: int = 0) -> pd.DataFrame:
    """The exposures orbits of the box reach, one row each: jd_tdb, site, the matched
    filter's Gaussian width ``psf_sigma_arcsec`` (mean over the exposure's reached images of the
    indexed PSF widened by the smoothing, in arcsec), the unsmoothed width, and the width of the
    SNR loss an offset costs the object under that filter, ``loss_sigma_arcsec``
    (``covering.smoothed_filter``; equal to the filter's when unsmoothed)."""
    from ..astrometry.astropy_wcs import wcs_from_header_text
    from ..search.intersect import intersect
    from ..survey.headers import pixel_scale_arcsec

    hits = intersect(_box_probe(reference, hw, seed), images)
    reached = images[images["image_id"].isin(hits["image_id"].unique())].copy()
    if reached.empty:
        return pd.DataFrame(columns=["exposure_id", "jd_tdb", "site_lat_deg", "site_lon_deg", "site_height_m",
                                     "psf_sigma_arcsec", "unsmoothed_sigma_arcsec", "loss_sigma_arcsec",
                                     "n_images"])
    scale = np.array([pixel_scale_arcsec(wcs_from_header_text(h)) for h in reached["wcs_header"]])
    reached["filter_sigma_arcsec"] = np.hypot(reached["psf_sigma_px"].to_numpy(float), smoothing_sigma_px) * scale
    reached["unsmoothed_sigma_arcsec"] = reached["psf_sigma_px"].to_numpy(float) * scale
    reached["loss_sigma_arcsec"] = smoothed_filter(reached["psf_sigma_px"].to_numpy(float), smoothing_sigma_px)[0] * scale
    per = reached.groupby("exposure_id", sort=True).agg(
        jd_tdb=("jd_tdb_mid", "first"), site_lat_deg=("site_lat_deg", "first"), site_lon_deg=("site_lon_deg", "first"),
        site_height_m=("site_height_m", "first"), psf_sigma_arcsec=("filter_sigma_arcsec", "mean"),
        unsmoothed_sigma_arcsec=("unsmoothed_sigma_arcsec", "mean"), loss_sigma_arcsec=("loss_sigma_arcsec", "mean"),
        n_images=("image_id", "size"))
    return per.reset_index()


def _ellipsoid_of(spec: dict, where: str):
    """(covariance, n_sigma) of a region given as an ellipsoid, None for a box."""
    if "covariance" not in spec:
        if "n_sigma" in spec:
            raise ValueError(f"{where}: n_sigma needs a covariance")
        return None
    if "half_width" in spec:
        raise ValueError(f"{where}: a half_width or a covariance, not both")
    return region_ellipsoid(spec, where)


def _width_ratio(exp: pd.DataFrame) -> float:
    """How much narrower the unsmoothed filter is than the covering's loss width (rms over
    exposures, as M)."""
    return float(np.sqrt(np.mean(exp["unsmoothed_sigma_arcsec"] ** -2) / np.mean(exp["loss_sigma_arcsec"] ** -2)))


def region_trials(regions: list, images: pd.DataFrame, known_path, *, max_snr_loss: float, max_trials: int,
                  smoothing_sigma_px: float = 0.0, min_exposures: int | None = None, start_id: int = 0, seed: int = 0,
                  throughput_orbits_per_s: float = DEFAULT_THROUGHPUT_ORBITS_PER_S,
                  log: logging.Logger | None = None):
    """Trial orbits covering every region, in region order, ids from ``start_id``.

    With ``min_exposures`` the covering is pruned to the survey's images
    (``footprint``): it then covers the orbits of each region whose tracks fall on at least that
    many of the region's exposures (the search's ``min_images``: an orbit on fewer cannot be a
    detection); None covers the whole box.

    Returns ``(trials, summaries)``: an orbit table with ``name`` (the region's) and ``tile``,
    and one JSON-able summary per region (trials, tiles, safety factor, promised loss, the
    exposures and images the metric was built on).
    """
    log = log or logging.getLogger(__name__)
    if not regions:
        raise ValueError("orbits.regions: orbits.source is 'region' but no region is configured")
    known = load_known_objects(known_path)
    names = [str(r.get("name") or f"region-{i}") for i, r in enumerate(regions)]
    if len(set(names)) < len(names):
        raise ValueError(f"orbits.regions: names must differ (got {', '.join(names)})")
    parts, summaries, budget_left = [], [], int(max_trials)
    for i, (spec, name) in enumerate(zip(regions, names)):
        where = f"orbits.regions[{i}] ({name})"
        ref = region_reference(spec, known, where)
        ellipsoid = _ellipsoid_of(spec, where)
        hw = region_half_width({"half_width": ellipsoid_half_width(*ellipsoid)} if ellipsoid else spec, ref, where)
        exp = region_exposures(images, ref, hw, smoothing_sigma_px=smoothing_sigma_px, seed=seed + i)
        if len(exp) < 3:
            raise ValueError(f"{where}: orbits of the region fall on {len(exp)} of the survey's exposures; a search "
                             f"needs at least 3 (check the reference and the survey's pointings)")
        site = {"lat_deg": exp["site_lat_deg"].to_numpy(float), "lon_deg": exp["site_lon_deg"].to_numpy(float),
                "height_m": exp["site_height_m"].to_numpy(float)}
        metric = track_metric(ref, exp["jd_tdb"].to_numpy(float), site, exp["loss_sigma_arcsec"].to_numpy(float))
        # An object half a filter width off an image still lands part of its light on it.
        margin = 2.0 * float(exp["psf_sigma_arcsec"].max())
        fields = (None if min_exposures is None else
                  exposure_fields(images, exp["exposure_id"].to_numpy(), metric.geometry, margin_arcsec=margin))
        try:
            trials, summary = covering_lattice(ref, hw, metric, max_snr_loss, max_trials=max(budget_left, 1),
                                               start_id=start_id, seed=seed + i,
                                               throughput_orbits_per_s=throughput_orbits_per_s, fields=fields,
                                               min_exposures=int(min_exposures or 1))
        except ValueError as err:
            hint = (" (search.max_trials bounds all regions together; raise it, narrow the region, raise "
                    "search.max_snr_loss or smooth: search.smoothing_sigma_px)" if "trial orbits" in str(err) else "")
            raise ValueError(f"{where}: {err}{hint}") from None
        n_box = len(trials)
        if ellipsoid:
            trials = prune_to_ellipsoid(trials, ref, *ellipsoid, metric.matrix, summary["rho"] ** 2, start_id)
        budget_left -= len(trials)
        start_id += len(trials)
        parts.append(trials.assign(name=name))
        summaries.append({
            "name": name, "reference": ref, "half_width": hw, "n_trials": len(trials),
            "n_exposures": len(exp), "n_images": int(exp["n_images"].sum()),
            "filter_sigma_arcsec_median": float(np.median(exp["psf_sigma_arcsec"])),
            "tiles": summary["tiles"], "n_tiles": int(summary["n_tiles"]),
            "n_grid_tiles": int(summary["n_grid_tiles"]), "min_exposures": summary["min_exposures"],
            "n_lattice_points": int(summary["n_lattice_points"]),
            "safety_factor": float(summary["safety_factor"]),
            "max_snr_loss": float(max_snr_loss), "linear_loss_bound": float(summary["linear_loss_bound"]),
            "dimension": int(summary.get("dimension", 0)),
            "varied_elements": list(summary["varied_elements"]),
            **({"covariance": ellipsoid[0].tolist(), "n_sigma": ellipsoid[1], "n_box_trials": n_box} if ellipsoid
               else {}),
            # The SNR field's curvatures at full resolution (refinement's), for the noise peaks to expect
            # (for an ellipsoid, those of the box that holds it: an upper bound).
            "lipschitz_killing": scaled_to_filter(summary["lipschitz_killing"], _width_ratio(exp)).tolist(),
        })
        scope = ("the box" if min_exposures is None else
                 f"the orbits of the box on >= {int(min_exposures)} exposures ({summary['n_lattice_points']:,} "
                 f"lattice points in {summary['n_tiles']} of {summary['n_grid_tiles']} tiles)")
        log.info("region %s: %d trial orbits cover %s for max SNR loss %.3g (safety factor %.3g, "
                 "%d thick directions) on %d exposures (%d images, matched filter sigma %.2f arcsec median); "
                 "search about %.0f s at %.0f orbits/s", name, len(trials), scope, max_snr_loss,
                 summary["safety_factor"], summaries[-1]["dimension"],
                 len(exp), summaries[-1]["n_images"], summaries[-1]["filter_sigma_arcsec_median"],
                 len(trials) / throughput_orbits_per_s, throughput_orbits_per_s)
    return pd.concat(parts, ignore_index=True), summaries
