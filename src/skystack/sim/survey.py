"""A simulated ZTF-like survey, written as the pipeline expects real data.

Exposures from Palomar spread over years, each a mosaic of CCD-quadrant images with
their own TAN (optionally TAN-SIP) WCS; per-exposure seeing, sky, noise and zero point;
a static sky of stars and galaxies rendered with GalSim under a PSF that varies across the
focal plane; difference images (science minus the static sky) with subtraction residuals,
hot pixels, cosmic rays and NaN-masked bad columns; and moving objects on heliocentric
Kepler orbits, at fluxes set by a target per-image SNR (most invisible in one image).

Every random draw comes from ``numpy.random.SeedSequence([seed, purpose, id])``, so the
survey is a function of the config alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ..astrometry.astropy_wcs import astropy_world2pix_near
from ..astrometry.directions import sky_positions
from ..core.io import atomic_path, write_parquet
from ..core.units import FWHM_PER_SIGMA, NMGY_ZERO_MAG, PALOMAR, counts_per_nmgy
from ..orbits.population import population
from ..orbits.table import ELEMENT_COLUMNS, load_known_objects
from ..search.intersect import intersect
from .galsim_render import draw_into, local_jacobian, source_object

log = logging.getLogger(__name__)

SEED_PURPOSE = {"schedule": 1, "sky": 2, "noise": 3, "defects": 4, "family": 5, "snr": 6}

PRESETS = {
    # Few images, so brighter movers: the combined SNR still clears the detection threshold.
    "tiny": dict(n_nights=5, visits_per_night=2, mosaic=[2, 2], quadrant_px=[96, 96], n_family=2,
                 source_density_per_deg2=12000.0, per_image_snr=[3.0, 4.5]),
    "demo": dict(n_nights=60, visits_per_night=2, mosaic=[2, 2], quadrant_px=[128, 128], n_family=6,
                 source_density_per_deg2=12000.0),
}
DEFAULTS = dict(
    preset="tiny",
    seed=2026,
    start_utc="2019-03-01",
    years=3.0,
    bands=["r", "g", "i"],
    pixel_scale_arcsec=1.01,
    quadrant_gap_px=8,
    exptime_s=30.0,
    seeing_fwhm_arcsec=[1.6, 2.6],
    psf_field_variation=0.15,
    sky_adu=[120.0, 260.0],
    magzp=[26.0, 26.4],
    gain=6.2,
    saturate_adu=60000.0,
    sip=True,
    star_fraction=0.4,
    r_mag_range=[17.0, 23.0],
    track="2060 Chiron",
    known_objects=["2060 Chiron"],
    known_objects_path=None,
    per_image_snr=[0.9, 2.2],
    family_sigma={"a_frac": 1e-4, "mean_anomaly_deg": 0.01, "node_deg": 0.004, "inc_deg": 0.004},
    family_min_fraction=0.8,
    defects={"hot_pixels": 3, "cosmic_rays": 2, "bad_columns": 1, "residual_fraction": 0.02},
    site=dict(PALOMAR),
)


def settings(cfg: dict | None) -> dict:
    """Preset values, then defaults, overridden by the given config."""
    cfg = dict(cfg or {})
    preset = cfg.get("preset", DEFAULTS["preset"])
    if preset not in PRESETS and preset != "custom":
        raise ValueError(f"survey.simulate.preset: unknown preset {preset!r} (tiny, demo, custom)")
    base = {**DEFAULTS, **PRESETS.get(preset, PRESETS["tiny"])}
    out = {**base, **cfg}
    out["family_sigma"] = {**base["family_sigma"], **cfg.get("family_sigma", {})}
    return out


def _rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SEED_PURPOSE[purpose], *map(int, ids)]))


# ----------------------------------------------------------------------------- schedule
@dataclass
class Exposure:
    exposure_id: int
    mjd_start_utc: float
    band: str
    ra_deg: float
    dec_deg: float
    rot_deg: float
    seeing_fwhm_arcsec: float
    sky_adu: float
    magzp: float


def schedule(s: dict, track_radec) -> list[Exposure]:
    """Nights spread over ``years``, several visits a night in cycling bands, pointed near
    the track object (so that a slowly moving family stays on the mosaic)."""
    rng = _rng(s["seed"], "schedule")
    start = Time(s["start_utc"], scale="utc").mjd
    nights = np.sort(rng.uniform(0, 365.25 * s["years"], s["n_nights"])).round()
    nights = np.unique(nights)
    while len(nights) < s["n_nights"]:  # rounding merged some nights: add more, deterministically
        nights = np.unique(np.concatenate([nights, rng.uniform(0, 365.25 * s["years"], 1).round()]))
    mjds = []
    for night in nights:
        # Local midnight at Palomar is about 08:00 UTC; visits ~25 min apart.
        for v in range(s["visits_per_night"]):
            mjds.append(start + night + 0.30 + v * 0.018)
    mjds = np.array(mjds)
    ra, dec = track_radec(mjds)
    fov_deg = np.array(s["mosaic"]) * np.array(s["quadrant_px"]) * s["pixel_scale_arcsec"] / 3600.0
    exps = []
    for i, mjd in enumerate(mjds):
        jitter = rng.uniform(-0.25, 0.25, 2) * fov_deg
        exps.append(Exposure(
            exposure_id=i + 1,
            mjd_start_utc=float(mjd),
            band=s["bands"][i % len(s["bands"])] if s["visits_per_night"] > 1 else s["bands"][0],
            ra_deg=float(ra[i] + jitter[0] / np.cos(np.radians(dec[i]))),
            dec_deg=float(dec[i] + jitter[1]),
            rot_deg=float(rng.normal(0.0, 0.05)),
            seeing_fwhm_arcsec=float(rng.uniform(*s["seeing_fwhm_arcsec"])),
            sky_adu=float(rng.uniform(*s["sky_adu"])),
            magzp=float(rng.uniform(*s["magzp"])),
        ))
    return exps


# ----------------------------------------------------------------------------- focal plane
def quadrant_wcs(s: dict, exp: Exposure, qx: int, qy: int) -> WCS:
    """TAN (or TAN-SIP) WCS of one quadrant: all quadrants share the exposure's tangent point."""
    nx, ny = s["quadrant_px"]
    mx, my = s["mosaic"]
    gap = s["quadrant_gap_px"]
    # Pixel (0-based) of the optical axis in this quadrant's own frame.
    fp_x = (mx * nx + (mx - 1) * gap) / 2.0 - qx * (nx + gap)
    fp_y = (my * ny + (my - 1) * gap) / 2.0 - qy * (ny + gap)
    scale = s["pixel_scale_arcsec"] / 3600.0
    th = np.radians(exp.rot_deg)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if s["sip"] else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [exp.ra_deg, exp.dec_deg]
    w.wcs.crpix = [fp_x + 1.0, fp_y + 1.0]  # FITS is 1-based
    w.wcs.cd = scale * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    if s["sip"]:
        # Cubic radial distortion about the optical axis: about 0.3 px at the mosaic corner.
        r_max = 0.5 * np.hypot(mx * nx, my * ny)
        k = 0.3 / r_max**3
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[3, 0] = a[1, 2] = k
        b[0, 3] = b[2, 1] = k
        from astropy.wcs import Sip

        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def _psf_fwhm_arcsec(s: dict, exp: Exposure, w: WCS, x: float, y: float) -> float:
    """Seeing grows towards the edge of the focal plane (space-variant PSF)."""
    nx, ny = s["quadrant_px"]
    mx, my = s["mosaic"]
    r_max = 0.5 * np.hypot(mx * nx, my * ny)
    dx, dy = x - (w.wcs.crpix[0] - 1), y - (w.wcs.crpix[1] - 1)
    return exp.seeing_fwhm_arcsec * (1.0 + s["psf_field_variation"] * (dx * dx + dy * dy) / r_max**2)


# ----------------------------------------------------------------------------- static sky
CELL_DEG = 0.02


def _cell_range(dec_range):
    return range(int(np.floor(dec_range[0] / CELL_DEG)), int(np.floor(dec_range[1] / CELL_DEG)) + 1)


def _cell_width_deg(i: int) -> float:
    return CELL_DEG / max(np.cos(np.radians(i * CELL_DEG + CELL_DEG / 2)), 0.05)


def sky_cells(boxes) -> list[tuple[int, int]]:
    """The sky cells (dec row i, RA column j) that overlap any of the given
    (ra_lo, ra_hi, dec_lo, dec_hi) boxes, in degrees (ra_lo may be negative at 0h)."""
    cells = set()
    for ra_lo, ra_hi, dec_lo, dec_hi in boxes:
        for i in _cell_range((dec_lo, dec_hi)):
            w = _cell_width_deg(i)
            cells.update((i, j) for j in range(int(np.floor(ra_lo / w)), int(np.floor(ra_hi / w)) + 1))
    return sorted(cells)


def static_sources(s: dict, cells) -> pd.DataFrame:
    """Stars and galaxies in the given sky cells, each cell drawn from its own seed so
    that overlapping images always see the same sources."""
    rows = [_cell_sources(s, i, j, i * CELL_DEG, j * _cell_width_deg(i), _cell_width_deg(i)) for i, j in cells]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _cell_sources(s, i, j, dec_lo, ra_lo, width) -> pd.DataFrame:
    rng = _rng(s["seed"], "sky", i + 100000, j % 1000000)
    area = width * CELL_DEG * np.cos(np.radians(dec_lo + CELL_DEG / 2))
    n = rng.poisson(s["source_density_per_deg2"] * area)
    lo, hi = s["r_mag_range"]
    # Number counts rising with magnitude (d log N / dm = 0.3).
    u = rng.uniform(size=n)
    mag_r = np.log10(10 ** (0.3 * lo) + u * (10 ** (0.3 * hi) - 10 ** (0.3 * lo))) / 0.3
    is_star = rng.uniform(size=n) < s["star_fraction"]
    color_gr = np.where(is_star, rng.normal(0.7, 0.35, n), rng.normal(0.6, 0.25, n))
    color_ri = np.where(is_star, rng.normal(0.3, 0.25, n), rng.normal(0.35, 0.15, n))
    flux_r = 10 ** (-0.4 * (mag_r - NMGY_ZERO_MAG))
    return pd.DataFrame({
        "source_id": [f"{i}_{j}_{k}" for k in range(n)],
        "ra_deg": (ra_lo + rng.uniform(size=n) * width) % 360.0,
        "dec_deg": dec_lo + rng.uniform(size=n) * CELL_DEG,
        "is_star": is_star,
        "flux_g_nmgy": flux_r * 10 ** (-0.4 * color_gr),
        "flux_r_nmgy": flux_r,
        "flux_i_nmgy": flux_r * 10 ** (0.4 * color_ri),
        "gal_frac_dev": np.where(is_star, 0.0, rng.uniform(size=n)),
        "gal_axis_ratio": np.where(is_star, 1.0, rng.uniform(0.35, 1.0, n)),
        "gal_angle_deg": np.where(is_star, 0.0, rng.uniform(0.0, 180.0, n)),
        "gal_radius_arcsec": np.where(is_star, 0.0, np.exp(rng.normal(np.log(1.3), 0.35, n))),
    })


@dataclass
class SimImage:
    exposure: Exposure
    ccd_id: int
    wcs: WCS
    nx: int
    ny: int
    psf_fwhm_arcsec: float
    noise_sigma: float
    name: str
    extra: dict = field(default_factory=dict)


def plan_images(s: dict, exposures: list[Exposure]) -> list[SimImage]:
    out = []
    nx, ny = s["quadrant_px"]
    for exp in exposures:
        for qy in range(s["mosaic"][1]):
            for qx in range(s["mosaic"][0]):
                ccd = qy * s["mosaic"][0] + qx
                w = quadrant_wcs(s, exp, qx, qy)
                fwhm = _psf_fwhm_arcsec(s, exp, w, (nx - 1) / 2, (ny - 1) / 2)
                noise = np.sqrt(exp.sky_adu * s["gain"]) / s["gain"]
                name = f"sim_{exp.exposure_id:05d}_{exp.band}_c{ccd:02d}"
                out.append(SimImage(exp, ccd, w, nx, ny, fwhm, noise, name))
    return out


def images_frame(s: dict, images: list[SimImage]) -> pd.DataFrame:
    """The columns of the image index that intersections need, for the simulated images."""
    mid = Time([im.exposure.mjd_start_utc + s["exptime_s"] / 2.0 / 86400.0 for im in images],
               format="mjd", scale="utc")
    tdb = mid.tdb
    return pd.DataFrame({
        "image_id": np.arange(len(images), dtype=np.int64),
        "exposure_id": np.array([im.exposure.exposure_id for im in images], dtype=np.int64),
        "mjd_mid_utc": mid.utc.mjd,
        "jd_tdb_mid": tdb.jd1 + tdb.jd2,
        "site_lat_deg": s["site"]["lat_deg"],
        "site_lon_deg": s["site"]["lon_deg"],
        "site_height_m": s["site"]["height_m"],
        "wcs_header": [im.wcs.to_header_string(relax=True) for im in images],
        "naxis1": np.array([im.nx for im in images], dtype=np.int64),
        "naxis2": np.array([im.ny for im in images], dtype=np.int64),
    })


def _image_boxes(images: list[SimImage], pad_deg: float = 0.01):
    """An RA/Dec box around each image, padded so that sources just off the edge are drawn."""
    boxes = []
    for im in images:
        c = im.wcs.all_pix2world(np.array([[0, 0], [im.nx - 1, 0], [0, im.ny - 1], [im.nx - 1, im.ny - 1]], float), 0)
        ra0 = c[0, 0]
        dra = (c[:, 0] - ra0 + 180.0) % 360.0 - 180.0
        cosd = max(np.cos(np.radians(np.abs(c[:, 1]).max() + pad_deg)), 0.05)
        boxes.append((ra0 + dra.min() - pad_deg / cosd, ra0 + dra.max() + pad_deg / cosd,
                      c[:, 1].min() - pad_deg, c[:, 1].max() + pad_deg))
    return boxes


def _sources_in_image(sources: pd.DataFrame, im: SimImage, margin_px: float = 20.0):
    if sources.empty:
        return sources.iloc[:0], np.zeros(0), np.zeros(0)
    x, y = astropy_world2pix_near(im.wcs, sources["ra_deg"].to_numpy(), sources["dec_deg"].to_numpy(), (im.ny, im.nx))
    keep = (x > -margin_px) & (x < im.nx - 1 + margin_px) & (y > -margin_px) & (y < im.ny - 1 + margin_px)
    return sources[keep], x[keep], y[keep]


def render_image(s: dict, im: SimImage, sources: pd.DataFrame, movers: pd.DataFrame, index: int):
    """Science image (ADU, sky included), difference image (static sky removed) and mask."""
    import galsim

    exp = im.exposure
    cpn = counts_per_nmgy(exp.magzp)
    static = galsim.ImageF(im.nx, im.ny, xmin=0, ymin=0)
    moving = galsim.ImageF(im.nx, im.ny, xmin=0, ymin=0)
    srcs, xs, ys = _sources_in_image(sources, im)
    residual = np.zeros((im.ny, im.nx), np.float32)
    for (_, src), x, y in zip(srcs.iterrows(), xs, ys):
        jac = local_jacobian(im.wcs, x, y)
        psf = galsim.Gaussian(fwhm=_psf_fwhm_arcsec(s, exp, im.wcs, x, y))
        obj = source_object(src, psf, float(src[f"flux_{exp.band}_nmgy"]) * cpn)
        draw_into(static, obj, x, y, jac)
        if src["is_star"]:
            # Imperfect subtraction: the reference's star sits 0.15 px off and its flux is off.
            dip = galsim.ImageF(im.nx, im.ny, xmin=0, ymin=0)
            frac = s["defects"]["residual_fraction"]
            draw_into(dip, obj.withScaledFlux(1 + frac), x + 0.15, y, jac)
            tmp = galsim.ImageF(im.nx, im.ny, xmin=0, ymin=0)
            draw_into(tmp, obj, x, y, jac)
            residual += (tmp.array - dip.array).astype(np.float32)
    for _, mv in movers.iterrows():
        jac = local_jacobian(im.wcs, mv["x"], mv["y"])
        psf = galsim.Gaussian(fwhm=_psf_fwhm_arcsec(s, exp, im.wcs, mv["x"], mv["y"]))
        draw_into(moving, psf.withFlux(float(mv["flux_counts"])), mv["x"], mv["y"], jac)
    rng = _rng(s["seed"], "noise", index)
    signal = exp.sky_adu + static.array + moving.array
    noise = rng.normal(size=signal.shape) * np.sqrt(np.clip(signal, 0, None) / s["gain"])
    science = (signal + noise).astype(np.float32)
    defects = _defects(s, im, index)
    science = science + defects["add"]
    difference = (science - exp.sky_adu - static.array + residual).astype(np.float32)
    science = np.minimum(science, np.float32(s["saturate_adu"]))
    mask = defects["mask"]
    science[mask] = np.nan
    difference[mask] = np.nan
    return science, difference, mask.astype(np.int16)


def _defects(s: dict, im: SimImage, index: int) -> dict:
    rng = _rng(s["seed"], "defects", index)
    d = s["defects"]
    add = np.zeros((im.ny, im.nx), np.float32)
    sigma = im.noise_sigma
    for _ in range(d["hot_pixels"]):
        add[rng.integers(im.ny), rng.integers(im.nx)] += rng.uniform(30, 300) * sigma
    for _ in range(d["cosmic_rays"]):
        x0, y0 = rng.uniform(0, im.nx), rng.uniform(0, im.ny)
        ang, length = rng.uniform(0, np.pi), rng.uniform(2, 8)
        for t in np.linspace(0, length, int(length * 2) + 1):
            xi, yi = int(x0 + t * np.cos(ang)), int(y0 + t * np.sin(ang))
            if 0 <= xi < im.nx and 0 <= yi < im.ny:
                add[yi, xi] += rng.uniform(20, 80) * sigma
    mask = np.zeros((im.ny, im.nx), bool)
    for _ in range(d["bad_columns"]):
        mask[:, rng.integers(im.nx)] = True
    return {"add": add, "mask": mask}


def _header(s: dict, im: SimImage, kind: str) -> fits.Header:
    exp = im.exposure
    hdr = im.wcs.to_header(relax=True)
    start = Time(exp.mjd_start_utc, format="mjd", scale="utc")
    cards = [
        ("EXTNAME", "SCI"),
        ("IMAGETYP", kind, "science or difference"),
        ("TELESCOP", "SIM48", "simulated 48-inch survey telescope"),
        ("ORIGIN", "skystack simulate_survey"),
        ("EXPID", exp.exposure_id, "exposure number"),
        ("CCDID", im.ccd_id // 4 + 1, "CCD number (1-based)"),
        ("QID", im.ccd_id % 4 + 1, "quadrant number (1-based)"),
        ("DATE-OBS", start.isot, "start of exposure (UTC)"),
        ("MJD-OBS", exp.mjd_start_utc, "start of exposure (UTC)"),
        ("TIMESYS", "UTC"),
        ("EXPTIME", s["exptime_s"], "[s]"),
        ("FILTER", exp.band),
        ("OBSGEO-B", s["site"]["lat_deg"], "[deg] geodetic latitude"),
        ("OBSGEO-L", s["site"]["lon_deg"], "[deg] east longitude"),
        ("OBSGEO-H", s["site"]["height_m"], "[m] height above WGS84"),
        ("MAGZP", exp.magzp, "AB zero point (ADU)"),
        ("GAIN", s["gain"], "[e-/ADU]"),
        ("SATURATE", s["saturate_adu"], "[ADU]"),
        ("SEEING", im.psf_fwhm_arcsec, "[arcsec] PSF FWHM at the image centre"),
        ("PSF_FWHM", im.psf_fwhm_arcsec / s["pixel_scale_arcsec"], "[px] PSF FWHM at the image centre"),
        ("SKYLEVEL", exp.sky_adu if kind == "science" else 0.0, "[ADU]"),
    ]
    for card in cards:
        hdr[card[0]] = card[1:] if len(card) > 2 else card[1]
    return hdr


def _psf_stamp(s: dict, im: SimImage, size: int = 25) -> np.ndarray:
    import galsim

    x, y = (im.nx - 1) / 2, (im.ny - 1) / 2
    psf = galsim.Gaussian(fwhm=_psf_fwhm_arcsec(s, im.exposure, im.wcs, x, y))
    img = psf.drawImage(nx=size, ny=size, wcs=local_jacobian(im.wcs, x, y))
    return (img.array / img.array.sum()).astype(np.float32)


def write_image(path: Path, s: dict, im: SimImage, pixels: np.ndarray, mask: np.ndarray, kind: str, index: int) -> None:
    """One image per file, RICE tile-compressed as surveys distribute them."""
    hdus = [
        fits.PrimaryHDU(),
        fits.CompImageHDU(pixels, header=_header(s, im, kind), compression_type="RICE_1",
                          quantize_level=16.0, dither_seed=1 + index % 10000),
        fits.CompImageHDU(mask, name="MASK", compression_type="RICE_1"),
        fits.ImageHDU(_psf_stamp(s, im), name="PSF"),
    ]
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)


# ----------------------------------------------------------------------------- survey driver
def simulate_survey(cfg: dict, out_dir, known_objects_path, progress=log.info) -> dict:
    """Simulate the survey into ``out_dir``: ``images/*.fits.fz`` and the truth tables
    ``orbits.parquet``, ``sources.parquet`` and ``injected.parquet``. Returns a summary."""

    s = settings(cfg)
    out_dir = Path(out_dir)
    known = load_known_objects(s.get("known_objects_path") or known_objects_path)
    names = list(dict.fromkeys([s["track"], *s["known_objects"]]))
    missing = [n for n in names if n not in set(known["name"])]
    if missing:
        raise ValueError(f"{known_objects_path}: no known object named {missing} (have {known['name'].tolist()})")
    known = known.set_index("name").loc[names].reset_index()
    track = known.iloc[0]
    site = s["site"]

    def track_radec(mjd_utc):
        t = Time(np.asarray(mjd_utc) + s["exptime_s"] / 2 / 86400, format="mjd", scale="utc").tdb
        ra, dec = sky_positions(known.iloc[:1].assign(orbit_id=0), t.jd1 + t.jd2, site)
        return ra[0], dec[0]

    exposures = schedule(s, track_radec)
    images = plan_images(s, exposures)
    frame = images_frame(s, images)
    progress(f"simulate: {len(exposures)} exposures, {len(images)} quadrant images of {s['quadrant_px']} px")

    # Family members that stay on the mosaic in most exposures.
    # The one population generator, with a seed of its own: the search's random orbits (same
    # config seed) must not reproduce the family.
    family_seed = int(np.random.SeedSequence([s["seed"], SEED_PURPOSE["family"]]).generate_state(1)[0])
    reference = track[ELEMENT_COLUMNS].astype(float).to_dict()
    cand = population("focused", np.arange(1000, 1000 + max(20 * s["n_family"], 20)), family_seed,
                      reference=reference, sigma=s["family_sigma"])
    hits = intersect(cand, frame)
    n_exp = hits.merge(frame[["image_id", "exposure_id"]], on="image_id").groupby("orbit_id")["exposure_id"].nunique()
    good = n_exp[n_exp >= s["family_min_fraction"] * len(exposures)].index[: s["n_family"]]
    family = cand[cand["orbit_id"].isin(good)].assign(name=lambda d: [f"family-{i}" for i in d["orbit_id"]])
    truth = pd.concat([known.assign(orbit_id=np.arange(1, len(known) + 1, dtype=np.int64)), family], ignore_index=True)
    truth = truth[["orbit_id", "name", *ELEMENT_COLUMNS]]

    injected = intersect(truth, frame).merge(frame[["image_id", "exposure_id"]], on="image_id")
    psf_sigma_px = np.array([im.psf_fwhm_arcsec / s["pixel_scale_arcsec"] / FWHM_PER_SIGMA for im in images])
    noise = np.array([im.noise_sigma for im in images])
    cpn = np.array([counts_per_nmgy(im.exposure.magzp) for im in images])
    snr_rng = _rng(s["seed"], "snr")
    truth["per_image_snr"] = snr_rng.uniform(*s["per_image_snr"], len(truth))
    unit_snr_nmgy = noise * np.sqrt(4 * np.pi) * psf_sigma_px / cpn  # flux (nmgy) that gives SNR 1
    flux = []
    for oid, snr in zip(truth["orbit_id"], truth["per_image_snr"]):
        ids = injected.loc[injected["orbit_id"] == oid, "image_id"].to_numpy()
        flux.append(snr * np.median(unit_snr_nmgy[ids]) if len(ids) else np.nan)
    truth["flux_nmgy"] = flux
    injected = injected.merge(truth[["orbit_id", "flux_nmgy"]], on="orbit_id")
    injected["flux_counts"] = injected["flux_nmgy"] * cpn[injected["image_id"]]
    injected["expected_snr"] = injected["flux_nmgy"] / unit_snr_nmgy[injected["image_id"]]
    comb = injected.groupby("orbit_id")["expected_snr"].apply(lambda v: float(np.sqrt(np.sum(v**2))))
    truth["n_images"] = truth["orbit_id"].map(injected.groupby("orbit_id").size()).fillna(0).astype(np.int64)
    truth["expected_combined_snr"] = truth["orbit_id"].map(comb).fillna(0.0)

    sources = static_sources(s, sky_cells(_image_boxes(images)))

    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, im in enumerate(images):
        movers = injected[injected["image_id"] == i]
        sci, diff, mask = render_image(s, im, sources, movers, i)
        for kind, pixels in (("science", sci), ("difference", diff)):
            path = img_dir / f"{im.name}_{'sci' if kind == 'science' else 'diff'}.fits.fz"
            write_image(path, s, im, pixels, mask, kind, 2 * i + (kind == "difference"))
            rows.append({"sim_image": i, "kind": kind, "path": str(path)})
        if (i + 1) % max(1, len(images) // 10) == 0 or i + 1 == len(images):
            progress(f"simulate: rendered {i + 1}/{len(images)} images")
    files = pd.DataFrame(rows)
    inj = injected.rename(columns={"image_id": "sim_image"}).merge(files, on="sim_image")
    inj = inj[["orbit_id", "sim_image", "kind", "path", "exposure_id", "x", "y", "flux_nmgy", "flux_counts", "expected_snr"]]
    write_parquet(truth, out_dir / "orbits.parquet")
    write_parquet(sources, out_dir / "sources.parquet")
    write_parquet(inj, out_dir / "injected.parquet")
    return {"n_exposures": len(exposures), "n_images": 2 * len(images), "n_sources": len(sources),
            "n_movers": len(truth), "files": files}
