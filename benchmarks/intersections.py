"""B4: orbit x image intersection throughput.

Builds a metadata-only ZTF-like image index (exposures of 8 x 8 quadrants of 3072 x 3080 px
at 1.01 arcsec/px, TAN-SIP, pointed along the ecliptic at random times over several years,
from Palomar) and a batch of random KBO orbits, then times ``skystack.search.intersect``
after a warm-up call (compilation excluded). Prints JSON: pairs (orbits x images) per
second, orbits per second, the intersections found and the device.

    python -m benchmarks.intersections [--exposures 200] [--orbits 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from astropy.wcs import WCS, Sip

from skystack._jax import device_summary
from skystack.orbits import OBLIQUITY_J2000_ARCSEC, random_orbits
from skystack.search import intersect, prepare_images

PALOMAR = dict(lat_deg=33.3563, lon_deg=-116.8650, height_m=1712.0)
QUADRANT_PX = (3072, 3080)
MOSAIC = (8, 8)
SCALE_ARCSEC = 1.01


def ecliptic_to_radec_deg(lon_deg, lat_deg):
    """J2000 ecliptic longitude/latitude to ICRS RA/Dec (degrees)."""
    eps = np.radians(OBLIQUITY_J2000_ARCSEC / 3600.0)
    lon, lat = np.radians(lon_deg), np.radians(lat_deg)
    x = np.cos(lat) * np.cos(lon)
    y = np.cos(lat) * np.sin(lon) * np.cos(eps) - np.sin(lat) * np.sin(eps)
    z = np.cos(lat) * np.sin(lon) * np.sin(eps) + np.sin(lat) * np.cos(eps)
    return np.degrees(np.arctan2(y, x)) % 360.0, np.degrees(np.arcsin(z))


def quadrant_header(ra_deg, dec_deg, qx, qy, sip: bool) -> str:
    """One quadrant of the mosaic: shared tangent point at the mosaic centre."""
    nx, ny = QUADRANT_PX
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    # FITS CRPIX (1-based) of the mosaic centre in this quadrant's pixel frame.
    w.wcs.crpix = [MOSAIC[0] * nx / 2 - qx * nx + 0.5, MOSAIC[1] * ny / 2 - qy * ny + 0.5]
    w.wcs.cd = SCALE_ARCSEC / 3600.0 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    if sip:
        # Cubic radial distortion, ~2 px at the mosaic corner.
        k = 2.0 / (0.5 * np.hypot(MOSAIC[0] * nx, MOSAIC[1] * ny)) ** 3
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        a[3, 0] = a[1, 2] = k
        b[0, 3] = b[2, 1] = k
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w.to_header_string(relax=True)


def images_table(n_exposures: int, years: float, seed: int, sip: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    jd = 2458119.5 + rng.uniform(0, 365.25 * years, n_exposures)
    ra, dec = ecliptic_to_radec_deg(rng.uniform(0, 360, n_exposures), rng.normal(0, 3, n_exposures))
    rows = []
    for e in range(n_exposures):
        for qy in range(MOSAIC[1]):
            for qx in range(MOSAIC[0]):
                rows.append(dict(image_id=len(rows), exposure_id=e, jd_tdb_mid=jd[e],
                                 wcs_header=quadrant_header(ra[e], dec[e], qx, qy, sip),
                                 naxis1=QUADRANT_PX[0], naxis2=QUADRANT_PX[1],
                                 site_lat_deg=PALOMAR["lat_deg"], site_lon_deg=PALOMAR["lon_deg"],
                                 site_height_m=PALOMAR["height_m"]))
    return pd.DataFrame(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exposures", type=int, default=200, help="exposures of 64 quadrants each")
    ap.add_argument("--orbits", type=int, default=20000, help="random KBO orbits")
    ap.add_argument("--years", type=float, default=4.0, help="time span of the exposures")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls after the warm-up (best is reported)")
    ap.add_argument("--max-batch-mb", type=int, default=256)
    ap.add_argument("--no-sip", action="store_true", help="plain TAN headers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t = time.perf_counter()
    images = images_table(args.exposures, args.years, args.seed, sip=not args.no_sip)
    orbits = random_orbits("kbo", args.orbits, seed=args.seed, chunk=0)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    prepared = prepare_images(images)
    t_prepare = time.perf_counter() - t
    budget = args.max_batch_mb << 20

    t = time.perf_counter()
    hits = intersect(orbits, prepared, max_batch_bytes=budget)  # warm-up: compiles
    t_first = time.perf_counter() - t
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        hits = intersect(orbits, prepared, max_batch_bytes=budget)
        times.append(time.perf_counter() - t)
    best = min(times)
    pairs = len(images) * len(orbits)
    result = {
        "benchmark": "intersections",
        "device": device_summary(),
        "n_exposures": args.exposures,
        "n_images": len(images),
        "n_orbits": len(orbits),
        "sip": not args.no_sip,
        "max_batch_mb": args.max_batch_mb,
        "intersections": len(hits),
        "orbits_with_intersections": int(hits["orbit_id"].nunique()),
        "seconds": best,
        "seconds_all": times,
        "pairs_per_s": pairs / best,
        "orbits_per_s": len(orbits) / best,
        "first_call_s": t_first,
        "prepare_images_s": t_prepare,
        "build_tables_s": t_build,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
