"""Catalog accuracy on a simulated survey region: skystack's Bayesian catalog vs the heuristic.

Simulates fields of stars and galaxies (g, r, i; several epochs) rendered by GalSim with
Gaussian, Moffat and SDSS-like 3-Gaussian PSFs (the catalog gets the pixelised PSF, as from a
PSF extension), isolated on a grid or placed at random so that they blend; detects candidates,
splits them into regions, fits every region with its halo (``catalog.stage.fit_all_regions``,
as the workflow's jobs do), and scores both catalogs against the truth with
Celeste's table (errors are means of absolute differences over matched sources), the bias and
1-sd coverage of every quantity, and completeness by magnitude against sep at 1.5 sigma.

    JAX_PLATFORMS=cpu python benchmarks/catalog_accuracy.py [--fields moffat-b2.5 ...] [--n-sources 100]
"""
from __future__ import annotations

import argparse
import json
import time

from skystack.catalog.detect import detect_sources
from skystack.catalog.heuristic import heuristic_catalog
from skystack.catalog.score import markdown_table, score_catalog
from skystack.catalog.stage import fit_all_regions
from skystack.core.runtime import configure, device_summary
from skystack.sim.fields import perturbed_start, simulate_field

#: The fields: PSF profile and FWHM range (px), whether sources are isolated (a grid) or placed at
#: random at a density (blends), and the field's size.
FIELDS = {
    "gaussian": dict(psf_profile="gaussian", psf_sigma_px=(1.2, 1.7), isolated=True),
    "moffat-b2.5": dict(psf_profile="moffat", moffat_beta=2.5, psf_sigma_px=(1.1, 1.4), isolated=True),
    "moffat-b3.5": dict(psf_profile="moffat", moffat_beta=3.5, psf_sigma_px=(1.6, 2.1), isolated=True),
    "sdss3g": dict(psf_profile="sdss3g", psf_sigma_px=(1.2, 1.6), isolated=True),
    "blended-moffat-b3": dict(psf_profile="moffat", moffat_beta=3.0, psf_sigma_px=(1.2, 1.7), isolated=False),
}
MAG_EDGES = (17.5, 19.0, 20.0, 20.5, 21.0, 21.5, 22.0)


def run_field(name: str, *, n_sources: int, epochs: int, seed: int, density_per_arcmin2: float,
              max_sources_per_region: int, candidates: str = "detected") -> dict:
    """Simulate one field, fit it, and score skystack and the sep heuristic against the truth."""
    from skystack.catalog.score import (
        calibration_table,
        completeness_by_mag,
        match_catalog,
    )

    spec = dict(FIELDS[name])
    extra = {} if spec["psf_profile"] == "gaussian" else dict(stamp_half_px=30, psf_image_half_px=25)
    images, truth = simulate_field(n_sources=n_sources, n_epochs=epochs, seed=seed, spacing_px=30,
                                   density_per_arcmin2=density_per_arcmin2, r_mag_range=(17.5, 22.0),
                                   **spec, **extra)
    t0 = time.perf_counter()
    # "truth": every true source, perturbed as a detection would give it, so that sources the
    # detection misses play no part (their light is then in the model).
    cands = detect_sources(images) if candidates == "detected" else perturbed_start(truth)
    cat = fit_all_regions(cands, images, max_sources_per_region=max_sources_per_region)
    t_fit = time.perf_counter() - t0
    heur = heuristic_catalog(images)
    sep_faint = heuristic_catalog(images, thresh_sigma=1.5)
    # Errors compared over the true sources both catalogs found, so that the one that finds
    # fainter sources is not penalised for measuring them; calibration and completeness use all.
    both = ((match_catalog(cat, truth) >= 0) & (match_catalog(heur, truth) >= 0))
    common = truth[both].reset_index(drop=True)
    scores = {"skystack": score_catalog(cat, common), "heuristic": score_catalog(heur, common)}
    gain = {k: 1.0 - scores["skystack"][k] / scores["heuristic"][k]
            for k in ("position_px", "mag_r", "color_gr", "color_ri")}
    # What the position goal can reach: an estimator whose errors were exactly skystack's reported
    # sds (the curvature of its likelihood, near the Cramer-Rao bound) would have a mean error of
    # position_floor_px; no reduction beyond 1 - floor / heuristic's error is then to be had.
    gain["position_px_at_reported_sds"] = 1.0 - scores["skystack"]["position_floor_px"] / scores["heuristic"]["position_px"]
    bands = sorted({im.band for im in images})
    return {"field": name, "n_images": len(images), "n_truth": len(truth), "n_candidates": len(cands),
            "n_both_found": int(both.sum()),
            "n_regions": int(cat["region"].max() + 1) if len(cat) else 0, "fit_s": round(t_fit, 1),
            "sources_per_s": round(len(cat) / t_fit, 1), "converged_fraction": float(cat["converged"].mean()),
            "scores": scores, "error_reduction_vs_heuristic": gain,
            "calibration": calibration_table(cat, truth, bands),
            "min_p_star_galaxy_or_max_star": [float(cat["p_star"].min()), float(cat["p_star"].max())],
            "completeness": {"skystack": completeness_by_mag(cat, truth, MAG_EDGES),
                             "sep_1.5sigma": completeness_by_mag(sep_faint, truth, MAG_EDGES)}}


def print_field(out: dict) -> None:
    print(f"## {out['field']}: {out['n_truth']} sources ({out['n_both_found']} found by both), {out['n_images']} images, "
          f"{out['fit_s']} s ({out['sources_per_s']} sources/s), converged {out['converged_fraction']:.2f}")
    print(markdown_table(out["scores"]))
    print("error reduction vs heuristic (goal >= 0.30 for position and colours): "
          + ", ".join(f"{k} {v:.2f}" for k, v in out["error_reduction_vs_heuristic"].items()))
    cal = out["calibration"]
    print("bias (sd units, goal |b| < 0.3): " + ", ".join(f"{k[5:]} {v:+.2f}" for k, v in cal.items()
                                                          if k.startswith("bias_")))
    print("1-sd coverage (goal 0.60-0.76): " + ", ".join(f"{k[10:]} {v:.2f}" for k, v in cal.items()
                                                         if k.startswith("within1sd_")))
    comp = out["completeness"]
    print("completeness by r mag: " + ", ".join(
        f"[{a['mag_lo']:g},{a['mag_hi']:g}) {a['completeness']:.2f}/{b['completeness']:.2f}"
        for a, b in zip(comp["skystack"], comp["sep_1.5sigma"])) + "  (skystack/sep at 1.5 sigma)")
    print()


def main(argv=None) -> list[dict]:
    configure()  # float64 positions, the compilation cache
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", nargs="+", default=list(FIELDS), choices=list(FIELDS))
    ap.add_argument("--n-sources", type=int, default=100, help="per isolated field (blended: x3)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--density-per-arcmin2", type=float, default=5.0)
    ap.add_argument("--max-sources-per-region", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--candidates", choices=("detected", "truth"), default="detected",
                    help="starting sources: the detection's, or all true sources perturbed")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    print(f"device: {device_summary()}\n")
    results = []
    for name in args.fields:
        n = args.n_sources * (3 if not FIELDS[name]["isolated"] else 1)
        out = run_field(name, n_sources=n, epochs=args.epochs, seed=args.seed,
                        density_per_arcmin2=args.density_per_arcmin2,
                        max_sources_per_region=args.max_sources_per_region, candidates=args.candidates)
        print_field(out)
        results.append(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
