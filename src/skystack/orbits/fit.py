"""Orbit determination: heliocentric osculating elements fitted to astrometric RA/Dec.

The model is the search's own: two-body Kepler propagation around the Sun
(``astrometry.kepler``) with the light time iterated and the observatory's GCRS offset
(``astrometry.directions``), i.e. an orbit that fits here falls on the images where the
search looks for it. Observation times are UTC MJDs of the moment the position refers to
(mid-exposure for a centroid), converted to TDB with astropy (offline IERS tables).

Method
------
1. *Parameters.* The six fitted numbers are the body's geometric topocentric attributable at
   the epoch: the direction (RA, Dec offsets from a reference, arcsec), its rate
   (RA cos Dec and Dec, arcsec/day), the log of the distance from the observatory and the
   range rate (AU/day). Short arcs measure the first four directly and the last two only
   through curvature, so the parameters separate what is well and poorly determined (the
   osculating elements mix them). The state (and from it the elements) follows exactly from
   the attributable and the DE421 observatory and Sun states at the epoch.
2. *Start (Vaisala-like).* The observed direction and rate at the epoch come from a
   polynomial (up to quadratic) fit in the tangent plane. For each heliocentric distance of a
   log-spaced grid (1.02 to 100 AU) the distance from the observatory follows from the
   geometry, and the range rate from the condition that the heliocentric velocity is
   perpendicular to the radius (a circular orbit, or an orbit at perihelion or aphelion, at
   the epoch) with the sky motion as observed. Every bound candidate is scored by its
   chi-square on all observations; the best local minima along the grid are each fitted.
3. *Fit.* ``scipy.optimize.least_squares`` (trust-region reflective, ``x_scale='jac'``) on the
   whitened tangent-plane residuals, with a central-difference Jacobian evaluated for all
   twelve offsets in one batched model call. A trial state that is unbound (e >= 1) gets a
   large constant residual, so the trust region steps back.
4. *Covariance* of the six elements: (J^T J)^-1 in the fitted parameters, mapped through the
   Jacobian of the elements with respect to them (from the given sigmas, not rescaled by the
   reduced chi-square).

Short arcs constrain the direction and its motion well and the distance (hence a and e)
poorly. A one-week arc of a main-belt asteroid (ten positions on five nights, 0.1 arcsec
noise) gives positions within 0.2 arcsec over the arc and 0.6 arcsec three days beyond it,
the inclination and node to 0.4 deg, but a only to 1-3 AU and e to 0.1-0.4 (1 sd); four weeks
(2013 RR163's NSC arc) give a to 4e-4 AU. The covariance says how much
(``tests/test_orbit_fit.py``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..astrometry import ephemeris
from ..astrometry.directions import _directions_jit, observer_states
from ..astrometry.kepler import ecliptic_to_icrs_matrix, orbit_arrays
from ..core.units import GM_SUN_AU3_D2
from .table import ELEMENT_COLUMNS

ARCSEC = np.pi / (180.0 * 3600.0)
DEFAULT_SIGMA_ARCSEC = 0.1
#: Heliocentric distances (AU) of the starting grid.
START_GRID_AU = np.geomspace(1.02, 100.0, 160)
#: Local minima of the starting grid's chi-square that are each fitted.
N_STARTS = 3
#: Central-difference steps of the six parameters (arcsec, arcsec, arcsec/day, arcsec/day, ln AU, AU/day).
_STEPS = np.array([1e-3, 1e-3, 1e-3, 1e-3, 1e-7, 1e-8])
#: Residual (in sigmas) given to every observation when a trial orbit is unbound.
_UNBOUND_RESIDUAL = 1e6
_ANGLES = (2, 3, 4, 5)  # inc, node, argperi, mean anomaly: differences wrap at 360 deg


# ----------------------------------------------------------------------------- conversions
def _unit(ra, dec):
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _east_north(ra, dec):
    east = np.stack([-np.sin(ra), np.cos(ra), np.zeros_like(ra)], axis=-1)
    north = np.stack([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)], axis=-1)
    return east, north


def state_to_elements(pos_au, vel_au_per_day, epoch_jd_tdb) -> pd.DataFrame:
    """Osculating J2000 ecliptic elements of heliocentric ICRS states (n, 3) (AU, AU/day).

    Returns a DataFrame with ``ELEMENT_COLUMNS``; rows of unbound states (e >= 1) hold NaN.
    Angles are robust at e -> 0 and i -> 0: the argument of perihelion and the mean anomaly
    are measured from the same node line, so their sum (the position) stays exact.
    """
    rot = ecliptic_to_icrs_matrix()
    r = np.atleast_2d(pos_au) @ rot  # ICRS -> ecliptic (rot is orthogonal: r_ecl = rot^T r_icrs)
    v = np.atleast_2d(vel_au_per_day) @ rot
    mu = GM_SUN_AU3_D2
    rn = np.linalg.norm(r, axis=1)
    v2 = np.einsum("ij,ij->i", v, v)
    h = np.cross(r, v)
    hn = np.linalg.norm(h, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = 1.0 / (2.0 / rn - v2 / mu)
        e_vec = ((v2 - mu / rn)[:, None] * r - np.einsum("ij,ij->i", r, v)[:, None] * v) / mu
        e = np.linalg.norm(e_vec, axis=1)
        hh = h / hn[:, None]
        inc = np.arctan2(np.hypot(hh[:, 0], hh[:, 1]), hh[:, 2])
        node = np.arctan2(hh[:, 0], -hh[:, 1])
        node = np.where(np.hypot(hh[:, 0], hh[:, 1]) < 1e-15, 0.0, node)
        n_hat = np.stack([np.cos(node), np.sin(node), np.zeros_like(node)], axis=1)
        m_hat = np.cross(hh, n_hat)
        argperi = np.arctan2(np.einsum("ij,ij->i", e_vec, m_hat), np.einsum("ij,ij->i", e_vec, n_hat))
        arglat = np.arctan2(np.einsum("ij,ij->i", r, m_hat), np.einsum("ij,ij->i", r, n_hat))
        nu = arglat - argperi
        ecc_anom = 2.0 * np.arctan2(np.sqrt(1.0 - e) * np.sin(nu / 2), np.sqrt(1.0 + e) * np.cos(nu / 2))
        mean_anom = ecc_anom - e * np.sin(ecc_anom)
    bound = (a > 0) & (e < 1) & np.isfinite(a)
    out = pd.DataFrame({
        "a_au": a, "e": e, "inc_deg": np.degrees(inc), "node_deg": np.degrees(node) % 360.0,
        "argperi_deg": np.degrees(argperi) % 360.0, "mean_anomaly_deg": np.degrees(mean_anom) % 360.0,
        "epoch_jd_tdb": np.broadcast_to(np.asarray(epoch_jd_tdb, np.float64), rn.shape).copy()})
    out.loc[~bound, ELEMENT_COLUMNS[:6]] = np.nan
    return out


class _Problem:
    """Observations, observer states and the model, set up once per fit."""

    def __init__(self, observations: pd.DataFrame, site, epoch_jd_tdb=None):
        obs = pd.DataFrame(observations).copy()
        for col in ("mjd_utc", "ra_deg", "dec_deg"):
            if col not in obs:
                raise ValueError(f"observations: missing column {col!r} (need mjd_utc, ra_deg, dec_deg)")
        obs = obs.dropna(subset=["mjd_utc", "ra_deg", "dec_deg"]).sort_values("mjd_utc").reset_index(drop=True)
        if len(obs) < 3:
            raise ValueError(f"observations: {len(obs)} usable row(s); six elements need at least 3 positions")
        self.site = _resolve_site(site)
        s = self.site
        self.jd = ephemeris.utc_mjd_to_tdb_jd(obs["mjd_utc"].to_numpy(np.float64), s["lat_deg"], s["lon_deg"],
                                              s["height_m"])
        ra, dec = np.radians(obs["ra_deg"].to_numpy(np.float64)), np.radians(obs["dec_deg"].to_numpy(np.float64))
        self.u_obs = _unit(ra, dec)
        self.east, self.north = _east_north(ra, dec)
        sig_ra, sig_dec = _sigmas(obs)
        self.sigma = np.stack([sig_ra, sig_dec], axis=1)  # arcsec
        self.obs_bary, self.sun_taylor = observer_states(self.jd, s)
        self.observations = obs
        # The epoch: the observation nearest the middle of the arc (unless given).
        if epoch_jd_tdb is None:
            epoch_jd_tdb = float(self.jd[np.argmin(np.abs(self.jd - 0.5 * (self.jd[0] + self.jd[-1])))])
        self.epoch = float(epoch_jd_tdb)
        p_e, v_e = ephemeris.earth_barycentric_posvel_au(self.epoch)
        p_s, v_s = ephemeris.observatory_gcrs_posvel_au(self.epoch, s["lat_deg"], s["lon_deg"], s["height_m"])
        p_sun, v_sun = ephemeris.sun_barycentric_posvel_au(self.epoch)
        # The observatory relative to the Sun at the epoch (position, velocity).
        self.g_pos, self.g_vel = (p_e + p_s - p_sun)[0], (v_e + v_s - v_sun)[0]
        k = int(np.argmin(np.abs(self.jd - self.epoch)))
        self.ra0, self.dec0 = float(ra[k]), float(dec[k])

    # -- parameters <-> state
    def state(self, x):
        """Heliocentric ICRS states (n, 3) x 2 of parameter vectors x (n, 6)."""
        x = np.atleast_2d(x)
        dec = self.dec0 + x[:, 1] * ARCSEC
        ra = self.ra0 + x[:, 0] * ARCSEC / np.cos(self.dec0)
        u = _unit(ra, dec)
        east, north = _east_north(ra, dec)
        rho, rho_dot = np.exp(x[:, 4]), x[:, 5]
        u_dot = (x[:, 2, None] * east + x[:, 3, None] * north) * ARCSEC
        pos = self.g_pos + rho[:, None] * u
        vel = self.g_vel + rho_dot[:, None] * u + rho[:, None] * u_dot
        return pos, vel

    def params_from_state(self, pos, vel):
        """The inverse of ``state`` for one heliocentric ICRS state."""
        rel, rel_v = np.asarray(pos, np.float64) - self.g_pos, np.asarray(vel, np.float64) - self.g_vel
        rho = np.linalg.norm(rel)
        u = rel / rho
        ra, dec = np.arctan2(u[1], u[0]), np.arcsin(u[2])
        east, north = _east_north(ra, dec)
        rho_dot = float(u @ rel_v)
        u_dot = (rel_v - rho_dot * u) / rho
        dra = (ra - self.ra0 + np.pi) % (2 * np.pi) - np.pi
        return np.array([dra * np.cos(self.dec0) / ARCSEC, (dec - self.dec0) / ARCSEC, (u_dot @ east) / ARCSEC,
                         (u_dot @ north) / ARCSEC, np.log(rho), rho_dot])

    def elements(self, x) -> pd.DataFrame:
        return state_to_elements(*self.state(x), self.epoch)

    # -- the model
    def offsets_arcsec(self, elements: pd.DataFrame) -> np.ndarray:
        """Observed minus computed (RA cos Dec, Dec) in arcsec, (n orbits, m obs, 2); NaN for unbound rows."""
        ok = np.isfinite(elements[ELEMENT_COLUMNS].to_numpy()).all(axis=1)
        out = np.full((len(elements), len(self.jd), 2), np.nan)
        if not ok.any():
            return out
        table = elements[ok].reset_index(drop=True).assign(orbit_id=np.arange(int(ok.sum())))
        d, _ = _directions_jit(orbit_arrays(table), self.jd, self.obs_bary, self.sun_taylor)
        d = np.asarray(d)  # (m, n, 3)
        along = np.einsum("mnk,mk->nm", d, self.u_obs)
        xi = np.einsum("mnk,mk->nm", d, self.east) / along
        eta = np.einsum("mnk,mk->nm", d, self.north) / along
        out[ok] = -np.stack([xi, eta], axis=-1) / ARCSEC
        return out

    def whitened(self, x) -> np.ndarray:
        """Residuals / sigma, flattened (n_params_sets, 2m)."""
        res = self.offsets_arcsec(self.elements(x)) / self.sigma
        return np.where(np.isfinite(res), res, _UNBOUND_RESIDUAL).reshape(len(res), -1)

    # -- the start
    def attributable_guess(self):
        """Observed direction offset (arcsec) and rate (arcsec/day) at the epoch."""
        ref_e, ref_n = _east_north(np.array(self.ra0), np.array(self.dec0))
        ref_u = _unit(np.array(self.ra0), np.array(self.dec0))
        along = self.u_obs @ ref_u
        xi, eta = (self.u_obs @ ref_e) / along / ARCSEC, (self.u_obs @ ref_n) / along / ARCSEC
        t = self.jd - self.epoch
        deg = min(2, len(np.unique(np.round(t, 3))) - 1)
        cx, ce = np.polyfit(t, xi, deg), np.polyfit(t, eta, deg)
        return np.polyval(cx, 0.0), np.polyval(ce, 0.0), np.polyval(np.polyder(cx), 0.0), np.polyval(np.polyder(ce), 0.0)

    def start_grid(self):
        """Candidate parameter vectors: circular-at-epoch states over ``START_GRID_AU``."""
        x0, y0, xr, yr = self.attributable_guess()
        probe = np.array([[x0, y0, xr, yr, 0.0, 0.0]])
        dec = self.dec0 + y0 * ARCSEC
        ra = self.ra0 + x0 * ARCSEC / np.cos(self.dec0)
        u = _unit(np.array(ra), np.array(dec))
        g = self.g_pos
        ug, gg = float(u @ g), float(g @ g)
        cands = []
        for r in START_GRID_AU:
            disc = ug * ug - gg + r * r
            if disc < 0:
                continue
            for rho in (-ug + np.sqrt(disc), -ug - np.sqrt(disc)):
                if rho <= 1e-3:
                    continue
                pos, vel0 = self.state(probe + np.array([0, 0, 0, 0, np.log(rho), 0.0]))
                # v = vel0 + rho_dot u with v . pos = 0
                denom = float(pos[0] @ u)
                if abs(denom) < 1e-6:
                    continue
                rho_dot = -float(pos[0] @ vel0[0]) / denom
                cands.append([x0, y0, xr, yr, np.log(rho), rho_dot])
        if not cands:
            raise ValueError("orbit fit: no starting orbit on the distance grid")
        return np.array(cands)


def _resolve_site(site) -> dict:
    if isinstance(site, str):
        from ..survey.sites import lookup_site, plain

        found = lookup_site(site)
        if found is None:
            raise ValueError(f"orbit fit: unknown site {site!r} (give lat_deg, lon_deg, height_m or a known MPC code)")
        return plain(found[1])
    if site is None:
        raise ValueError("orbit fit: a site is needed (observations are topocentric)")
    return {k: float(site[k]) for k in ("lat_deg", "lon_deg", "height_m")}


def _sigmas(obs: pd.DataFrame):
    n = len(obs)
    if "sigma_arcsec" in obs:
        s = obs["sigma_arcsec"].to_numpy(np.float64)
        ra, dec = s, s
    elif "ra_sigma_arcsec" in obs and "dec_sigma_arcsec" in obs:
        ra, dec = obs["ra_sigma_arcsec"].to_numpy(np.float64), obs["dec_sigma_arcsec"].to_numpy(np.float64)
    else:
        ra = dec = np.full(n, DEFAULT_SIGMA_ARCSEC)
    ra = np.where(np.isfinite(ra) & (ra > 0), ra, DEFAULT_SIGMA_ARCSEC)
    dec = np.where(np.isfinite(dec) & (dec > 0), dec, DEFAULT_SIGMA_ARCSEC)
    return ra, dec


def _jacobian(problem: _Problem, x):
    """Central differences of the whitened residuals, all 12 offsets in one model call
    (one-sided where one side is unbound)."""
    steps = np.diag(_STEPS)
    both = problem.whitened(np.concatenate([x + steps, x - steps]))
    plus, minus = both[:6], both[6:]
    bad_p = (plus == _UNBOUND_RESIDUAL).any(axis=1)
    bad_m = (minus == _UNBOUND_RESIDUAL).any(axis=1)
    jac = (plus - minus) / (2 * _STEPS[:, None])
    if bad_p.any() or bad_m.any():
        base = problem.whitened(x)[0]
        jac = np.where(bad_p[:, None], (base - minus) / _STEPS[:, None], jac)
        jac = np.where(bad_m[:, None] & ~bad_p[:, None], (plus - base) / _STEPS[:, None], jac)
    return jac.T


def _solve(problem: _Problem, x0):
    from scipy.optimize import least_squares

    return least_squares(lambda x: problem.whitened(x)[0], x0, jac=lambda x: _jacobian(problem, x),
                         method="trf", x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=200)


def _local_minima(cost: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest local minima of a 1-d curve (the global minimum first)."""
    c = np.where(np.isfinite(cost), cost, np.inf)
    left = np.r_[np.inf, c[:-1]]
    right = np.r_[c[1:], np.inf]
    idx = np.flatnonzero((c <= left) & (c <= right) & np.isfinite(c))
    return idx[np.argsort(c[idx])][:k]


def fit_orbit(observations, site, initial=None, *, epoch_jd_tdb=None):
    """Least-squares heliocentric osculating elements from astrometric positions.

    Parameters
    ----------
    observations : DataFrame (or mapping of columns)
        ``mjd_utc`` (UTC MJD of the moment each position refers to: mid-exposure for a
        centroid), ``ra_deg``, ``dec_deg`` (astrometric ICRS) and optionally
        ``sigma_arcsec`` (both axes) or ``ra_sigma_arcsec`` (on the sky, i.e. RA cos Dec) and
        ``dec_sigma_arcsec``; missing or non-positive sigmas are 0.1 arcsec. Rows without a
        position are dropped.
    site : mapping or str
        Observatory (``lat_deg``, ``lon_deg`` east, ``height_m``, WGS84), or a known site
        name or MPC code such as ``"W84"``.
    initial : mapping, optional
        Starting elements (``ELEMENT_COLUMNS``); without them the start is the Vaisala-like
        distance grid (see the module docstring).
    epoch_jd_tdb : float, optional
        Epoch of the fitted elements; default the observation nearest the middle of the arc.

    Returns
    -------
    elements : dict
        ``ELEMENT_COLUMNS`` (J2000 ecliptic, degrees; ``epoch_jd_tdb`` TDB JD).
    residuals_arcsec : ndarray (n, 2)
        Observed minus computed (RA cos Dec, Dec), arcsec, one row per used observation in
        time order.
    covariance : ndarray (6, 6)
        Of (a_au, e, inc_deg, node_deg, argperi_deg, mean_anomaly_deg), from the given sigmas.
    """
    from ..core.runtime import require_x64

    require_x64("orbits.fit.fit_orbit")
    problem = _Problem(observations, site, epoch_jd_tdb)
    if initial is not None:
        from ..astrometry.kepler import heliocentric_state

        row = pd.DataFrame([{c: float(initial[c]) for c in ELEMENT_COLUMNS}]).assign(orbit_id=0)
        pos, vel = heliocentric_state(orbit_arrays(row), np.array([problem.epoch]))
        starts = problem.params_from_state(np.asarray(pos)[0], np.asarray(vel)[0])[None, :]
    else:
        grid = problem.start_grid()
        white = problem.whitened(grid)
        cost = np.where((white == _UNBOUND_RESIDUAL).any(axis=1), np.inf, (white**2).sum(axis=1))
        starts = grid[_local_minima(cost, N_STARTS)]
        if not len(starts):
            raise ValueError("orbit fit: every starting orbit on the distance grid is unbound")
    best = None
    for x0 in starts:
        sol = _solve(problem, x0)
        if best is None or sol.cost < best.cost:
            best = sol
    x = best.x
    elements = problem.elements(x)
    if not np.isfinite(elements[ELEMENT_COLUMNS].to_numpy()).all():
        raise ValueError("orbit fit: the best fit is unbound (e >= 1)")
    residuals = problem.offsets_arcsec(elements)[0]
    jac = _jacobian(problem, x)
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    cov_x = (vt.T / s**2) @ vt
    # Elements' Jacobian with respect to the parameters (angles wrapped).
    steps = np.diag(_STEPS)
    e_p = problem.elements(x + steps)[ELEMENT_COLUMNS[:6]].to_numpy()
    e_m = problem.elements(x - steps)[ELEMENT_COLUMNS[:6]].to_numpy()
    diff = e_p - e_m
    for j in _ANGLES:
        diff[:, j] = (diff[:, j] + 180.0) % 360.0 - 180.0
    jac_e = (diff / (2 * _STEPS[:, None])).T  # (6 elements, 6 params)
    covariance = jac_e @ cov_x @ jac_e.T
    return {c: float(elements[c].iloc[0]) for c in ELEMENT_COLUMNS}, residuals, covariance


def predict_radec(elements, mjd_utc, site):
    """Astrometric ICRS RA, Dec (deg) of fitted elements at UTC MJDs, from ``site``
    (the same model and time conversion as the fit)."""
    from ..astrometry.directions import sky_positions

    s = _resolve_site(site)
    jd = ephemeris.utc_mjd_to_tdb_jd(np.atleast_1d(np.asarray(mjd_utc, np.float64)), s["lat_deg"], s["lon_deg"],
                                     s["height_m"])
    row = pd.DataFrame([{c: float(elements[c]) for c in ELEMENT_COLUMNS}]).assign(orbit_id=0)
    ra, dec = sky_positions(row, jd, s)
    return ra[0], dec[0]


def main(argv=None) -> None:
    """``python -m skystack.orbits.fit OBS.csv --site W84 --time-offset-s 45 --name NAME --out ORBIT.csv``:
    fit the rows of OBS.csv that have a position and write a one-orbit file (``load_orbits``
    reads it), whose comment lines give the command, the residuals and the 1-sd uncertainties."""
    import argparse
    import shlex
    import sys

    from ..core.runtime import configure

    ap = argparse.ArgumentParser(prog="python -m skystack.orbits.fit", description=main.__doc__)
    ap.add_argument("observations", help="CSV with mjd_utc, ra_deg, dec_deg and optional sigma columns")
    ap.add_argument("--site", required=True, help="MPC code or site name (e.g. W84)")
    ap.add_argument("--time-offset-s", type=float, default=0.0,
                    help="seconds added to mjd_utc to get the time each position refers to (EXPTIME/2 when "
                         "mjd_utc is the exposure start)")
    ap.add_argument("--name", default="", help="object name written in the orbit file")
    ap.add_argument("--out", required=True, help="orbit CSV to write")
    ap.add_argument("--note", action="append", default=[], help="a comment line for the orbit file (repeatable)")
    args = ap.parse_args(argv)
    configure()
    obs = pd.read_csv(args.observations, comment="#").dropna(subset=["ra_deg", "dec_deg"]).reset_index(drop=True)
    obs["mjd_utc"] = obs["mjd_utc"] + args.time_offset_s / 86400.0
    elements, res, cov = fit_orbit(obs, args.site)
    sd = np.sqrt(np.diag(cov))
    rms = float(np.sqrt(np.mean(res**2)))
    lines = [
        "# Heliocentric osculating J2000 ecliptic elements fitted by skystack.orbits.fit (two-body Kepler around",
        "# the Sun, light time, topocentric, the search's own model) to the astrometry of the rows with a position.",
        "# Made with: " + " ".join(shlex.quote(a) for a in ["python", "-m", "skystack.orbits.fit",
                                                            *(sys.argv[1:] if argv is None else argv)]),
        (f"# {len(obs)} positions, MJD {obs['mjd_utc'].min():.5f} to {obs['mjd_utc'].max():.5f} UTC (after the "
         f"time offset of {args.time_offset_s:g} s); rms residual {rms:.3f} arcsec per coordinate, max "
         f"{np.abs(res).max():.3f} arcsec"),
        "# 1-sd (from the given sigmas): " + ", ".join(f"{c} {v:.3g}" for c, v in zip(ELEMENT_COLUMNS[:6], sd)),
        *(f"# {n}" for n in args.note),
    ]
    row = {"orbit_id": 0, "name": args.name, **{c: elements[c] for c in ELEMENT_COLUMNS}}
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.write(",".join(row) + "\n")
        fh.write(",".join(repr(float(v)) if isinstance(v, float) else str(v) for v in row.values()) + "\n")
    print("\n".join(lines[3:]))


__all__ = ["fit_orbit", "main", "predict_radec", "state_to_elements"]


if __name__ == "__main__":
    main()
