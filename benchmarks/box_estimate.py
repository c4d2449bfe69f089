"""One-tile covering estimates for the demo's Chiron box, widened, on smoothed images.

    python -m benchmarks.box_estimate [--factor 33.3] [--smoothing-arcsec 2.5] [--max-snr-loss 0.8]

``--factor`` widens ``benchmarks.region_search``'s box (3x the family's spread) in every element:
33.3 gives the box 100x the family's spread.
"""
from __future__ import annotations

import argparse

from skystack.core.runtime import configure


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=100 / 3)
    ap.add_argument("--smoothing-arcsec", type=float, default=2.5)
    ap.add_argument("--max-snr-loss", type=float, default=0.8)
    args = ap.parse_args(argv)
    configure()
    from benchmarks.region_search import _region
    from skystack.orbits import covering as cv

    ex = cv.survey_exposures({"preset": "demo"})
    jd, site = ex["jd_tdb"].to_numpy(), cv.exposure_site(ex)
    _, ref, box = _region(cv, "chiron")
    loss_sigma, _ = cv.smoothed_filter(ex["psf_sigma_arcsec"].to_numpy(), args.smoothing_arcsec)
    metric = cv.track_metric(ref, jd, site, loss_sigma)
    for label, factor in (("box", 1.0), (f"box x {args.factor:g}", args.factor)):
        plan = cv.covering_plan(ref, {k: v * factor for k, v in box.items()}, metric, args.max_snr_loss)
        print(f"{label}: about {plan['estimate']:.3g} trial orbits (one tile, smoothing {args.smoothing_arcsec:g} "
              f"arcsec, max_snr_loss {args.max_snr_loss:g})")


if __name__ == "__main__":
    main()
