"""Agreement of results across JAX backends: a small deterministic set of search,
deconvolution and catalog results, saved on one backend and recomputed on another.

    JAX_PLATFORMS=cpu python -m benchmarks.device_agreement --save DIR      # reference (CPU)
    python -m benchmarks.device_agreement --compare DIR [--json PATH]      # e.g. on a GPU

``--save`` writes the inputs (``inputs.npz``, ``images.parquet``, ``orbits.parquet``) and the
results computed on the current backend (``results.npz``, ``hits.parquet``,
``combined.parquet``, ``catalog.parquet``) to DIR. ``--compare`` reads the inputs back, so
both backends see the same bits, recomputes and prints JSON with the largest differences and
pass/fail against the tolerances below; the exit status is 1 when a check fails.

The inputs need no Snakemake run: B1's metadata-only mosaic and random KBO orbits through
``search.intersect.intersect``; seeded patches (noise, and sources on a fifth of the orbits)
at the reference's intersections through ``search.matched_filter.matched_filter`` and
``search.combine.combine_partials``; a few Condat-Vu iterations on simulated galaxy stamps
(``deconvolve.solvers.deconvolve_stack``, float64 and float32); a catalog fit of a few
isolated sources (``catalog.fit.fit_region``). The stamps and the catalog's images are drawn
with GalSim at ``--save``; where GalSim is missing (the GPU machine) ``--inputs DIR`` takes
them from an earlier save, and without either those two parts are skipped with the reason.

Tolerances: intersections, the same (orbit, image) pairs and x, y within 1e-9 px; matched
filter, psi and phi within 1e-6 relative (psi against max(|psi|, sqrt(phi)), its own noise
scale, since psi can be near zero); detections, the same orbits above the SNR threshold;
deconvolution, 1e-6 relative (largest per-stamp ||a - b|| / ||b||); catalog, 1e-9 relative
with the same iteration counts. The catalog's Newton iterations stop on a decrement
tolerance, so where a backend takes one iteration more or fewer the results differ by up
to that last step (at most sqrt(2 tol) standard deviations); then the looser check is every
value within 0.01 of its reported standard deviation, and the JSON says so.

For a machine without GalSim or Snakemake (``benchmarks/gpu.sh``), the same file carries the
benchmarks' inputs made here and replays them there:

    python -m benchmarks.device_agreement --carry-inputs DIR        # here: GalSim, Snakemake
    python -m benchmarks.device_agreement --replay catalog_speed --carried DIR -- [its arguments]

``--carry-inputs`` writes a simulated field for ``catalog_speed`` (``CARRIED_FIELD``), the
distinct galaxy and PSF images of ``deconvolve``'s stack (``CARRIED_STACK``) and the tiny
survey's search inputs for ``end_to_end`` (built with Snakemake: images table, orbit plan,
tile caches). ``--replay`` runs the benchmark's ``main`` with its simulator (or its Snakemake
build) replaced by a reader of those files; the figures are the benchmark's own.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

TOL_XY_PX = 1e-9
TOL_MATCHED_FILTER_REL = 1e-6
TOL_DECONVOLVE_REL = 1e-6
TOL_CATALOG_REL = 1e-9
TOL_CATALOG_SD_FRACTION = 0.01  # looser check where iteration counts differ (see the docstring)

# Sizes: small enough for a minute on two CPU cores, large enough to exercise every kernel.
SURVEY = {"n_exposures": 40, "years": 6.0, "seed": 0}
N_ORBITS = 3000
PSF_SIGMA_PX = 1.5
NOISE_ADU = 10.0
SKY_ADU = 100.0
MAGZP = 27.0
SNR_THRESHOLD = 5.0
DECONV = {"n": 16, "n_psfs": 8, "seed": 1, "max_iter": 30}
CATALOG = {"n_sources": 9, "n_epochs": 1, "seed": 2, "spacing_px": 30}
CATALOG_BATCH = 8

INPUT_FILES = ("inputs.npz", "images.parquet", "orbits.parquet")


# ----------------------------------------------------------------------------- inputs

def _survey_inputs():
    from skystack.orbits.population import population
    from skystack.sim.mosaic import ecliptic_survey

    images = ecliptic_survey(SURVEY["n_exposures"], SURVEY["years"], SURVEY["seed"])
    orbits = population("kbo", np.arange(N_ORBITS), seed=SURVEY["seed"])
    return images, orbits


def _patches_at(hits: pd.DataFrame, seed: int = 3) -> dict:
    """Sky + noise patches around each intersection, a PSF-shaped source in those of every
    fifth orbit (fluxes spread around the detection threshold)."""
    from skystack.core.units import counts_per_nmgy
    from skystack.search.matched_filter import patch_radius_px

    rng = np.random.default_rng(seed)
    r = patch_radius_px(PSF_SIGMA_PX)
    k = 2 * r + 1
    n = len(hits)
    x, y = hits["x"].to_numpy(), hits["y"].to_numpy()
    dx, dy = x - np.floor(x + 0.5), y - np.floor(y + 0.5)
    grid = np.arange(k) - r
    gx = np.exp(-0.5 * ((grid[None, :] - dx[:, None]) / PSF_SIGMA_PX) ** 2)
    gy = np.exp(-0.5 * ((grid[None, :] - dy[:, None]) / PSF_SIGMA_PX) ** 2)
    psf = gy[:, :, None] * gx[:, None, :] / (2 * np.pi * PSF_SIGMA_PX**2)
    orbit_id = hits["orbit_id"].to_numpy()
    # SNR of one image ~ flux_adu / (noise * sqrt(4 pi sigma^2)); spread 0..3x the threshold
    snr_one = np.where(orbit_id % 5 == 0, (orbit_id % 7) / 2.0 * SNR_THRESHOLD, 0.0)
    flux_adu = snr_one * NOISE_ADU * np.sqrt(4 * np.pi) * PSF_SIGMA_PX
    patches = SKY_ADU + flux_adu[:, None, None] * psf + rng.normal(0, NOISE_ADU, (n, k, k))
    patches = patches.astype(np.float32)
    patches[rng.uniform(size=patches.shape) < 0.002] = np.nan  # a few bad pixels
    return {"mf_patches": patches, "mf_x": x, "mf_y": y,
            "mf_adu_per_nmgy": np.full(n, counts_per_nmgy(MAGZP)), "mf_orbit_id": orbit_id,
            "mf_image_id": hits["image_id"].to_numpy()}


def _deconv_inputs() -> dict:
    from skystack.sim.stacks import simulate_truth_stack

    _truth, observed, psfs, sigma = simulate_truth_stack(DECONV["n"], size=41, n_psfs=DECONV["n_psfs"],
                                                        seed=DECONV["seed"])
    return {"dc_observed": observed, "dc_psfs": psfs, "dc_sigma": sigma}


def _catalog_inputs() -> dict:
    from skystack.sim.fields import simulate_field

    images, truth = simulate_field(**CATALOG)
    rng = np.random.default_rng(CATALOG["seed"])
    cand = truth[["ra", "dec", "flux_r_nmgy"]].copy()
    cand["ra"] += rng.normal(0, 0.3, len(cand)) / 3600 / np.cos(np.radians(cand["dec"]))
    cand["dec"] += rng.normal(0, 0.3, len(cand)) / 3600
    cand["flux_r_nmgy"] *= np.exp(rng.normal(0, 0.2, len(cand)))
    return {**_field_arrays(images, "cat_"),
            "cat_cand_ra": cand["ra"].to_numpy(), "cat_cand_dec": cand["dec"].to_numpy(),
            "cat_cand_flux_r_nmgy": cand["flux_r_nmgy"].to_numpy()}


def _have_galsim() -> bool:
    try:
        import galsim  # noqa: F401
    except ImportError:
        return False
    return True


def make_inputs(out: Path, inputs_from: Path | None, skipped: dict) -> None:
    """Write the inputs to ``out``: copied from ``inputs_from``, or made here."""
    out.mkdir(parents=True, exist_ok=True)
    if inputs_from is not None:
        for name in INPUT_FILES:
            if (inputs_from / name).resolve() != (out / name).resolve():
                shutil.copyfile(inputs_from / name, out / name)
        return
    from skystack.search.intersect import intersect, prepare_images

    images, orbits = _survey_inputs()
    images.to_parquet(out / "images.parquet", compression="zstd")
    orbits.to_parquet(out / "orbits.parquet")
    arrays = _patches_at(intersect(orbits, prepare_images(images)))
    if _have_galsim():
        arrays |= _deconv_inputs() | _catalog_inputs()
    else:
        skipped["deconvolution"] = skipped["catalog"] = "GalSim is not installed and no --inputs were given"
    np.savez_compressed(out / "inputs.npz", **arrays)


# ----------------------------------------------------------------------------- results

def compute(d: Path) -> tuple[dict, dict, dict]:
    """Results on the current backend from the inputs in ``d``: (arrays, tables, seconds)."""
    from skystack.search.combine import combine_partials
    from skystack.search.intersect import intersect, prepare_images
    from skystack.search.matched_filter import matched_filter

    inp = dict(np.load(d / "inputs.npz"))
    arrays, tables, seconds = {}, {}, {}

    t = time.perf_counter()
    images, orbits = pd.read_parquet(d / "images.parquet"), pd.read_parquet(d / "orbits.parquet")
    tables["hits"] = intersect(orbits, prepare_images(images))
    seconds["intersections"] = time.perf_counter() - t

    t = time.perf_counter()
    n = len(inp["mf_x"])
    psi, phi = matched_filter(inp["mf_patches"], inp["mf_x"], inp["mf_y"], np.full(n, PSF_SIGMA_PX),
                              np.full(n, NOISE_ADU), inp["mf_adu_per_nmgy"], batch=256,
                              background=np.full(n, SKY_ADU, np.float32))
    arrays["mf_psi"], arrays["mf_phi"] = psi, phi
    partials = pd.DataFrame({"orbit_id": inp["mf_orbit_id"], "image_id": inp["mf_image_id"], "psi": psi, "phi": phi})
    tables["combined"] = combine_partials(partials, n_sigma_g=3.0)
    seconds["matched_filter_and_combine"] = time.perf_counter() - t

    if "dc_observed" in inp:
        from skystack.deconvolve.solvers import deconvolve_stack

        t = time.perf_counter()
        for dtype in ("float64", "float32"):
            x, diag = deconvolve_stack(inp["dc_observed"], inp["dc_psfs"], inp["dc_sigma"], max_iter=DECONV["max_iter"],
                                       tol=0.0, n_reweights=1, batch_size=DECONV["n"], dtype=dtype)
            arrays[f"dc_{dtype}"] = np.asarray(x)
            arrays[f"dc_{dtype}_iterations"] = diag["iterations"].to_numpy()
        seconds["deconvolution"] = time.perf_counter() - t

    if "cat_pixels" in inp:
        from skystack.catalog.fit import fit_region

        t = time.perf_counter()
        cand = pd.DataFrame({"ra": inp["cat_cand_ra"], "dec": inp["cat_cand_dec"],
                             "flux_r_nmgy": inp["cat_cand_flux_r_nmgy"]})
        # the same vector width on every backend (its default differs: 1 on CPU, the batch elsewhere)
        tables["catalog"] = fit_region(cand, None, _field_images(inp, "cat_"), patch_px=15, batch_size=CATALOG_BATCH,
                                       vector_width=CATALOG_BATCH)
        seconds["catalog"] = time.perf_counter() - t
    return arrays, tables, seconds


# ----------------------------------------------------------------------------- comparison

def _rel(a, b, scale=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.abs(a), np.abs(b)) if scale is None else scale
    diff = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    r = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.where(diff > 0, np.inf, 0.0))
    r = np.where(both_nan, 0.0, np.where(np.isnan(r), np.inf, r))
    return float(r.max())


def _check_intersections(got: pd.DataFrame, want: pd.DataFrame) -> dict:
    key = ["orbit_id", "image_id"]
    both = want.merge(got, on=key, how="outer", suffixes=("_ref", ""), indicator=True)
    only_ref, only_here = int((both["_merge"] == "left_only").sum()), int((both["_merge"] == "right_only").sum())
    common = both[both["_merge"] == "both"]
    dx = float(np.abs(common["x"] - common["x_ref"]).max()) if len(common) else 0.0
    dy = float(np.abs(common["y"] - common["y_ref"]).max()) if len(common) else 0.0
    return {"intersections_ref": len(want), "intersections": len(got), "only_in_ref": only_ref,
            "only_here": only_here, "max_abs_dx_px": dx, "max_abs_dy_px": dy, "tolerance_px": TOL_XY_PX,
            "pass": only_ref == 0 and only_here == 0 and max(dx, dy) <= TOL_XY_PX}


def _check_matched_filter(got: dict, want: dict) -> dict:
    psi, phi, psi0, phi0 = got["mf_psi"], got["mf_phi"], want["mf_psi"], want["mf_phi"]
    psi_scale = np.maximum(np.maximum(np.abs(psi), np.abs(psi0)), np.sqrt(np.maximum(phi0, 0)))
    r_psi, r_phi = _rel(psi, psi0, psi_scale), _rel(phi, phi0)
    return {"n": len(psi0), "max_rel_psi": r_psi, "max_rel_psi_vs_max_abs": _rel(psi, psi0), "max_rel_phi": r_phi,
            "identical": bool(np.array_equal(psi, psi0, equal_nan=True) and np.array_equal(phi, phi0, equal_nan=True)),
            "tolerance_rel": TOL_MATCHED_FILTER_REL, "pass": max(r_psi, r_phi) <= TOL_MATCHED_FILTER_REL}


def _check_detections(got: pd.DataFrame, want: pd.DataFrame) -> dict:
    above = set(got.loc[got["snr"] >= SNR_THRESHOLD, "orbit_id"].tolist())
    above0 = set(want.loc[want["snr"] >= SNR_THRESHOLD, "orbit_id"].tolist())
    both = want.merge(got, on="orbit_id", suffixes=("_ref", ""))
    same_rows = len(both) == len(want) == len(got)
    margin = float(np.abs(want["snr"] - SNR_THRESHOLD).min()) if len(want) else None
    return {"orbits": len(want), "snr_threshold": SNR_THRESHOLD, "above_ref": len(above0), "above": len(above),
            "same_orbits_above": above == above0, "same_orbits": same_rows,
            "same_images_kept": bool(same_rows and (both["n_images"] == both["n_images_ref"]).all()),
            "max_rel_snr": _rel(both["snr"], both["snr_ref"]), "closest_snr_to_threshold_ref": margin,
            "pass": above == above0 and same_rows}


def _check_deconvolution(got: dict, want: dict) -> dict:
    out, ok = {}, True
    for dtype in ("float64", "float32"):
        a, b = got[f"dc_{dtype}"].astype(np.float64), want[f"dc_{dtype}"].astype(np.float64)
        per_stamp = np.linalg.norm((a - b).reshape(len(b), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)
        peak = float(np.abs(a - b).max() / np.abs(b).max())
        same_iter = bool(np.array_equal(got[f"dc_{dtype}_iterations"], want[f"dc_{dtype}_iterations"]))
        passed = float(per_stamp.max()) <= TOL_DECONVOLVE_REL and same_iter
        out[dtype] = {"max_rel_norm_per_stamp": float(per_stamp.max()), "max_abs_over_peak": peak,
                      "identical": bool(np.array_equal(a, b)), "same_iterations": same_iter, "pass": passed}
        ok &= passed
    return {**out, "stamps": len(want["dc_float64"]), "iterations": DECONV["max_iter"],
            "tolerance_rel": TOL_DECONVOLVE_REL, "pass": ok}


def _check_catalog(got: pd.DataFrame, want: pd.DataFrame) -> dict:
    counts = ("iterations", "converged", "n_images", "region")  # compared for equality
    numeric = [c for c in want.columns if pd.api.types.is_numeric_dtype(want[c]) and c not in counts]
    rel = {c: _rel(got[c], want[c]) for c in numeric}
    same_iter = bool(len(got) == len(want) and all((got[c].to_numpy() == want[c].to_numpy()).all() for c in counts))
    worst = max(rel, key=rel.get)
    out = {"sources": len(want), "same_iterations_and_convergence": same_iter, "max_rel": rel[worst],
           "max_rel_column": worst, "tolerance_rel": TOL_CATALOG_REL,
           "max_position_difference_mas": float(3.6e6 * np.max(np.hypot(
               (got["ra"] - want["ra"]) * np.cos(np.radians(want["dec"])), got["dec"] - want["dec"])))}
    # the largest difference in units of the reported standard deviation, where there is one
    def sd_of(c):
        return c.replace("_nmgy", "_sd_nmgy") if c.startswith("flux_") else c + "_sd"

    in_sd = {}
    for c in numeric:
        if sd_of(c) not in want:
            continue
        diff = np.abs(got[c] - want[c])
        if c in ("ra", "dec"):  # degrees against arcsec on the sky
            diff = diff * 3600 * (np.cos(np.radians(want["dec"])) if c == "ra" else 1.0)
        in_sd[c] = float(np.nanmax(diff / np.maximum(want[sd_of(c)], 1e-300)))
    out["max_difference_in_sd"] = max(in_sd.values()) if in_sd else None
    out["strict_pass"] = same_iter and rel[worst] <= TOL_CATALOG_REL
    if out["strict_pass"]:
        out["pass"] = True
    else:
        out["loose_tolerance_in_sd"] = TOL_CATALOG_SD_FRACTION
        out["loose_reason"] = ("iteration counts differ: Newton stops on a decrement tolerance, so the results "
                               "differ by up to the last step" if not same_iter else
                               "same iterations but above 1e-9 relative: float rounding differs between backends")
        out["pass"] = out["max_difference_in_sd"] is not None and out["max_difference_in_sd"] <= TOL_CATALOG_SD_FRACTION
    return out


# ----------------------------------------------------------------------------- carried inputs

#: catalog_speed's field as carried (its defaults: 256 sources, 7 epochs, seed 0, 30 px apart)
CARRIED_FIELD = {"n_sources": 256, "n_epochs": 7, "seed": 0, "spacing_px": 30}
#: deconvolve's stack as carried: the distinct profiles (its --quick counts; speed does not
#: depend on how many distinct ones there are), stamps tiled from them there
CARRIED_STACK = {"n_galaxies": 200, "n_psfs": 100, "seed": 0}
E2E_CONFIG = Path(__file__).resolve().parents[1] / "config" / "experiments" / "tiny.yaml"


def _field_arrays(images, prefix: str) -> dict:
    """ImageData list as plain arrays (Gaussian PSFs, sky held in the pixels)."""
    if any(not isinstance(im.psf, float) or im.sky_subtracted for im in images):
        raise ValueError("carried fields: expected Gaussian PSFs on images holding their sky")
    return {f"{prefix}pixels": np.stack([im.pixels for im in images]),
            f"{prefix}band": np.array([im.band for im in images]),
            f"{prefix}magzp": np.array([im.magzp for im in images]),
            f"{prefix}wcs_header": np.array([im.wcs_header for im in images]),
            f"{prefix}psf_sigma_px": np.array([im.psf for im in images]),
            f"{prefix}sky_adu": np.array([float(im.sky_level) for im in images]),
            f"{prefix}gain": np.array([im.gain for im in images]),
            f"{prefix}image_id": np.array([im.image_id for im in images]),
            f"{prefix}mjd": np.array([im.mjd for im in images])}


def _field_images(inp: dict, prefix: str):
    from skystack.catalog.data import ImageData

    return [ImageData(pixels=inp[f"{prefix}pixels"][i], band=str(inp[f"{prefix}band"][i]),
                      magzp=float(inp[f"{prefix}magzp"][i]), wcs_header=str(inp[f"{prefix}wcs_header"][i]),
                      psf=float(inp[f"{prefix}psf_sigma_px"][i]), sky_level=float(inp[f"{prefix}sky_adu"][i]),
                      gain=float(inp[f"{prefix}gain"][i]), image_id=int(inp[f"{prefix}image_id"][i]),
                      mjd=float(inp[f"{prefix}mjd"][i]))
            for i in range(len(inp[f"{prefix}pixels"]))]


def _e2e_targets(cfg: dict) -> list[Path]:
    """The files of a search's inputs, relative to the workflow's directory (as
    ``end_to_end.build_inputs`` asks Snakemake for them, plus the listed orbits it reads)."""
    res = Path(cfg["results_dir"]) / cfg["experiment"]
    cache = Path(cfg["cache_dir"]) / cfg["experiment"]
    return [res / "images.parquet", res / "search" / "plan.json", res / "search" / "orbits_listed.parquet",
            *(cache / f"partition_{p}.tiles" for p in range(cfg["partitions"]))]


def carry_inputs(out: Path, cores: int = 2) -> dict:
    """Make the replayed benchmarks' inputs here (GalSim, Snakemake) and write them to ``out``."""
    from benchmarks.end_to_end import build_inputs
    from skystack.sim.fields import simulate_field
    from skystack.sim.stacks import simulate_truth_stack

    out.mkdir(parents=True, exist_ok=True)
    images, truth = simulate_field(**CARRIED_FIELD)
    np.savez_compressed(out / "catalog_field.npz", **_field_arrays(images, ""),
                        **{f"truth_{c}": truth[c].to_numpy() for c in truth.columns},
                        **{f"sim_{k}": v for k, v in CARRIED_FIELD.items()})
    n_gal, n_psf = CARRIED_STACK["n_galaxies"], CARRIED_STACK["n_psfs"]
    gal, _, psfs, sigma = simulate_truth_stack(max(n_gal, n_psf), size=41, n_psfs=n_psf, seed=CARRIED_STACK["seed"],
                                               n_galaxies=n_gal)
    np.savez_compressed(out / "deconvolve_stack.npz", galaxies=gal[:n_gal], psfs=psfs[:n_psf],
                        noise_sigma=float(sigma[0]), seed=CARRIED_STACK["seed"])
    # The tiny survey's search inputs, built with Snakemake in a scratch folder beside them.
    build_dir = out.parent / (out.name + "_build") / "end_to_end_tiny"
    build_dir.mkdir(parents=True, exist_ok=True)
    built = build_inputs(E2E_CONFIG, build_dir.resolve(), cores)
    e2e = out / "end_to_end_tiny"
    for rel in _e2e_targets(built["cfg"]):
        src, dst = build_dir / rel, e2e / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    sizes = {p.name: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    return {"carried": str(out), "mib": round(sum(sizes.values()) / 2**20, 2), "files": len(sizes)}


def _replay_field(carried: Path):
    def simulate_field(n_sources=None, n_epochs=None, seed=None, spacing_px=None, **other):
        inp = dict(np.load(carried / "catalog_field.npz"))
        asked = {"n_epochs": n_epochs, "seed": seed, "spacing_px": spacing_px}
        have = {k: inp[f"sim_{k}"].item() for k in asked}
        n_have = int(inp["sim_n_sources"])
        if other or asked != have or n_sources > n_have:
            raise ValueError(f"carried field is {have}, {n_have} sources, Gaussian PSF; asked {asked}, {n_sources} "
                             f"sources {other}: change CARRIED_FIELD and rerun benchmarks/gpu_prepare.sh")
        truth = pd.DataFrame({k[6:]: v for k, v in inp.items() if k.startswith("truth_")})
        if n_sources < n_have:  # isolated sources: the others' light stays outside the fitted patches
            print(f"replayed field: the first {n_sources} of its {n_have} sources are fitted", flush=True)
            truth = truth.iloc[:n_sources]
        return _field_images(inp, ""), truth
    return simulate_field


def _replay_stack(carried: Path):
    def simulate_truth_stack(n, size=41, n_psfs=None, seed=0, noise_sigma=None, n_galaxies=None, **other):
        from scipy.signal import fftconvolve

        inp = np.load(carried / "deconvolve_stack.npz")
        gal, psfs = inp["galaxies"], inp["psfs"]
        if size != gal.shape[-1] or other:
            raise ValueError(f"carried stack holds {gal.shape[-1]} px stamps; asked {size} {other}")
        # as many distinct profiles as asked for, at most the carried ones
        n_gal, n_psf = min(n_galaxies or n, len(gal)), min(n_psfs or n, len(psfs))
        sigma = float(inp["noise_sigma"]) if noise_sigma is None else noise_sigma
        truth = gal[np.arange(n) % n_gal]
        psf = psfs[np.arange(n) % n_psf]
        blurred = fftconvolve(truth, psf, mode="same", axes=(-2, -1))
        observed = blurred + np.random.default_rng(seed).normal(0, sigma, blurred.shape)
        print(f"replayed stack: {n} stamps from {n_gal} carried galaxies and {n_psf} PSFs", flush=True)
        return truth, observed, psf, np.full(n, sigma)
    return simulate_truth_stack


def _replay_build(carried: Path):
    def build_inputs(config_path, workdir, cores):
        from skystack.core.config import load_config

        cfg = load_config(config_path)
        workdir = carried / "end_to_end_tiny"
        missing = [str(p) for p in _e2e_targets(cfg) if not (workdir / p).exists()]
        if missing:
            raise FileNotFoundError(f"carried search inputs missing (rerun benchmarks/gpu_prepare.sh): {missing}")
        return {"cfg": cfg, "results": workdir / cfg["results_dir"] / cfg["experiment"],
                "cache": workdir / cfg["cache_dir"] / cfg["experiment"], "build_s": 0.0}
    return build_inputs


def _no_modopt(observed, psfs, weights, tau, sigma, rho, n_iter):
    """Stands in for ModOpt's solve where ModOpt is not installed: NaN results, NaN time."""
    return np.full(observed.shape, np.nan), float("nan")


def replay(name: str, carried: Path, argv: list[str]) -> dict:
    """Run benchmark ``name``'s main on ``argv``, its inputs read from ``carried`` where it
    would draw them with GalSim or build them with Snakemake."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    if name == "catalog_speed":
        module.simulate_field = _replay_field(carried)
    elif name == "deconvolve":
        module.simulate_truth_stack = _replay_stack(carried)
        try:
            import modopt  # noqa: F401
        except ImportError:
            print("ModOpt is not installed: its comparison is skipped (NaN in the JSON)", flush=True)
            module._modopt_solve = _no_modopt
    elif name == "end_to_end":
        module.build_inputs = _replay_build(carried)
        argv = ["--config", str(E2E_CONFIG), *argv]
    # others (intersections) need nothing carried: their main runs as it is
    return module.main(argv)


def _save(d: Path, arrays: dict, tables: dict, meta: dict) -> None:
    np.savez_compressed(d / "results.npz", **arrays)
    for name, table in tables.items():
        table.to_parquet(d / f"{name}.parquet")
    (d / "meta.json").write_text(json.dumps(meta, indent=1))


def main(argv=None) -> dict:
    from skystack.core.runtime import configure, device_summary

    configure()  # float64 positions, the compilation cache
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", type=Path, help="write inputs and this backend's results here")
    ap.add_argument("--compare", type=Path, help="recompute from the inputs here and compare with its results")
    ap.add_argument("--inputs", type=Path, help="with --save: take the inputs from an earlier save (no GalSim needed)")
    ap.add_argument("--json", type=Path, help="also write the printed JSON here")
    ap.add_argument("--carry-inputs", type=Path, help="write the replayed benchmarks' inputs here (needs GalSim, "
                                                      "Snakemake)")
    ap.add_argument("--replay", choices=("intersections", "catalog_speed", "deconvolve", "end_to_end"),
                    help="run this benchmark, on the inputs in --carried; arguments after -- go to it")
    ap.add_argument("--carried", type=Path, help="folder written by --carry-inputs")
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.replay:
        if args.carried is None and args.replay != "intersections":
            ap.error("--replay needs --carried DIR")
        out = replay(args.replay, args.carried, rest)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
        return out
    if args.carry_inputs:
        out = carry_inputs(args.carry_inputs)
        print(json.dumps(out, indent=1))
        return out
    if (args.save is None) == (args.compare is None):
        ap.error("give one of --save DIR, --compare DIR, --carry-inputs DIR or --replay NAME")
    t0 = time.perf_counter()
    result = {"backend": device_summary()}
    skipped: dict = {}
    if args.save:
        make_inputs(args.save, args.inputs, skipped)
        arrays, tables, seconds = compute(args.save)
        _save(args.save, arrays, tables, {"backend": result["backend"], "numpy": np.__version__,
                                          "python": sys.version.split()[0]})
        result |= {"saved": str(args.save), "intersections": len(tables["hits"]),
                   "orbits": len(tables["combined"]),
                   "orbits_above_threshold": int((tables["combined"]["snr"] >= SNR_THRESHOLD).sum())}
    else:
        d = args.compare
        want_arrays = dict(np.load(d / "results.npz"))
        want = {p.stem: pd.read_parquet(p) for p in d.glob("*.parquet") if p.stem not in ("images", "orbits")}
        result["reference_backend"] = json.loads((d / "meta.json").read_text())["backend"]
        arrays, tables, seconds = compute(d)
        checks = {"intersections": _check_intersections(tables["hits"], want["hits"]),
                  "matched_filter": _check_matched_filter(arrays, want_arrays),
                  "detections": _check_detections(tables["combined"], want["combined"])}
        if "dc_float64" in want_arrays and "dc_float64" in arrays:
            checks["deconvolution"] = _check_deconvolution(arrays, want_arrays)
        else:
            skipped["deconvolution"] = "no deconvolution inputs in the reference (saved without GalSim)"
        if "catalog" in want and "catalog" in tables:
            checks["catalog"] = _check_catalog(tables["catalog"], want["catalog"])
        else:
            skipped["catalog"] = "no catalog inputs in the reference (saved without GalSim)"
        result |= checks
        result["pass"] = all(c["pass"] for c in checks.values())
    result["skipped"] = skipped
    result["seconds"] = {k: round(v, 2) for k, v in seconds.items()} | {"total": round(time.perf_counter() - t0, 2)}
    text = json.dumps(result, indent=1, default=float)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("pass", True) else 1)
