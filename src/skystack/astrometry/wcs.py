"""Gnomonic (TAN), TAN-SIP and TPV world coordinate systems in JAX.

A WCS is a ``WcsParams`` pytree of float64 arrays, so one function serves one image or,
through ``jax.vmap``, a stack of images built by ``stack_wcs``. SIP coefficient arrays are
zero-padded to ``MAX_SIP_ORDER`` and TPV ones to ``MAX_TPV_ORDER``, so images with
different orders, or with SIP, TPV or no distortion at all, stack together: a TPV
polynomial is stored as its difference from the identity, so that zeros mean "no TPV"
and leave TAN and SIP images bit for bit as they were.

Conventions follow astropy (wcslib): pixel coordinates are 0-based with pixel centres at
integers (FITS ``CRPIX`` is 1-based and is shifted on reading); world coordinates are ICRS
right ascension and declination in degrees. The chain from pixel to sky is::

    pixel p -> s = SIP(p - CRPIX) -> x = CD s (deg) -> (xi, eta) = TPV(x) -> TAN -> (RA, Dec)

with SIP the identity for TAN and TPV images and TPV the identity for TAN and SIP ones.

SIP: the forward polynomials ``A``/``B`` define the distortion; ``world2pix`` inverts them
by Newton iteration (like astropy's ``all_world2pix``), so any ``AP``/``BP`` inverse
polynomials in a header are not used.

TPV (the DECam, Mosaic3 and 90Prime Community-Pipeline convention, as wcslib implements it
in ``dis.c``): ``xi = P1(x, y)``, ``eta = P2(y, x)`` (note the swapped arguments) with

    P(x, y) = sum_m PV_m T_m(x, y),  T_0..T_39 = 1, x, y, r, x^2, xy, y^2, x^3, x^2 y, x y^2,
              y^3, r^3, x^4, ..., y^4, x^5, ..., y^5, r^5, x^6, ..., y^6, x^7, ..., y^7, r^7

(``r = sqrt(x^2 + y^2)``, ``x, y`` in degrees); absent ``PVi_m`` are 0 (wcslib's default,
so ``PV1_1``/``PV2_1`` must be given). ``world2pix`` inverts it by Newton iteration in
``(x, y)``, starting from the image's *plain* projection (``pixel_matrix``: the gnomonic
projection with an affine approximation of the polynomial, see ``fit_plain``).
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_SIP_ORDER = 5
MAX_TPV_ORDER = 7  # PV_0..PV_39: polynomial degree 7 (and the radial r, r^3, r^5, r^7)
N_TPV_RADIAL = 4  # r, r^3, r^5, r^7
NEWTON_ITERATIONS = 6  # few-pixel distortions converge to 1e-12 px in 3 or 4
# From the plain (affine) solution, the DECam/Mosaic3/90Prime TPV headers of the tests are
# at the rounding floor (~1e-9 px) after 1 or 2 steps, a synthetic header with 250 px of
# radial and cross-term distortion after 3; the rest are spare.
TPV_NEWTON_ITERATIONS = 6
TPV_TOLERANCE_PX = 1e-6  # world2pix gives NaN where the TPV inversion did not converge to this
RAD2DEG = 180.0 / np.pi


def _tpv_terms_table():
    """(kind, p, q) of each TPV term T_m, m = 0..39: x^p y^q ("xy") or r^p ("r")."""
    table = []
    for d in range(MAX_TPV_ORDER + 1):
        table += [("xy", d - j, j) for j in range(d + 1)]
        if d % 2:
            table.append(("r", d, 0))
    return table


TPV_TERMS = _tpv_terms_table()
assert len(TPV_TERMS) == 40 and TPV_TERMS[3] == ("r", 1, 0) and TPV_TERMS[39] == ("r", 7, 0)


class WcsParams(NamedTuple):
    """Parameters of a TAN, TAN-SIP or TPV WCS; leading axes, if any, index images.

    Attributes
    ----------
    crpix0_px : (..., 2)
        Reference pixel, 0-based (FITS ``CRPIX`` - 1).
    crval_deg : (..., 2)
        ICRS RA, Dec of the reference point (the tangent point), degrees.
    lonpole_deg : (...)
        Native longitude of the celestial pole, degrees (180 unless the header says otherwise).
    cd_deg : (..., 2, 2)
        Linear transformation from (distorted) pixel offsets to intermediate world
        coordinates, degrees per pixel (``CD``, or ``CDELT_i * PC_ij``).
    sip_a, sip_b : (..., MAX_SIP_ORDER + 1, MAX_SIP_ORDER + 1)
        SIP coefficients: ``f(u, v) = sum_pq sip_a[p, q] u^p v^q``; zero for plain TAN.
    tpv_a, tpv_b : (..., MAX_TPV_ORDER + 1, MAX_TPV_ORDER + 1)
        TPV polynomial minus the identity, in the monomials of ``x = CD s`` (degrees):
        ``xi - x = sum_pq tpv_a[p, q] x^p y^q + radial``, ``eta - y = sum_pq tpv_b[p, q]
        x^p y^q + radial`` (``tpv_b`` holds ``PV2_m`` with the arguments swapped back);
        zero for TAN and SIP. ``trim_sip`` may cut them down to size 0 (no TPV anywhere).
    tpv_r : (..., 2, N_TPV_RADIAL)
        TPV radial coefficients of ``r, r^3, r^5, r^7`` for xi (row 0) and eta (row 1).
    tpv_plain : (..., 2, 3)
        The affine part the plain projection uses: ``xi - x ~ c0 + c1 x + c2 y`` per row
        (``PV_0``, ``PV_1 - 1``, ``PV_2`` from ``parse_header``; ``fit_plain`` re-fits it at
        the image centre); zero for TAN and SIP.
    """

    crpix0_px: jnp.ndarray
    crval_deg: jnp.ndarray
    lonpole_deg: jnp.ndarray
    cd_deg: jnp.ndarray
    sip_a: jnp.ndarray
    sip_b: jnp.ndarray
    tpv_a: jnp.ndarray
    tpv_b: jnp.ndarray
    tpv_r: jnp.ndarray
    tpv_plain: jnp.ndarray


# ----------------------------------------------------------------------------- header parsing
_SIP_KEY = re.compile(r"^([AB])_(\d+)_(\d+)$")


def _parse_value(raw: str):
    raw = raw.strip()
    if raw.startswith("'"):
        # A FITS string: quotes doubled inside, comment after the closing quote.
        out, i = [], 1
        while i < len(raw):
            if raw[i] == "'":
                if raw[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(raw[i])
            i += 1
        return "".join(out).rstrip()
    raw = raw.split("/", 1)[0].strip()
    if raw in ("T", "F"):
        return raw == "T"
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw.replace("D", "E").replace("d", "e"))
    except ValueError:
        return raw


def header_cards(header) -> dict:
    """Keyword -> value of a FITS header given as text (80-character cards, with or
    without newlines) or as an ``astropy.io.fits.Header``.

    A small reader for the value cards a WCS needs; much faster than building a
    ``fits.Header`` and reading its values, which matters for tens of thousands of images.
    """
    from astropy.io import fits

    if isinstance(header, fits.Header):
        return {k: header[k] for k in header.keys() if k not in ("COMMENT", "HISTORY", "")}
    text = str(header)
    lines = text.splitlines() if "\n" in text else [text[i:i + 80] for i in range(0, len(text), 80)]
    cards = {}
    for line in lines:
        key = line[:8].strip().upper()
        if key == "END":
            break
        if line[8:10] == "= " and key:
            cards.setdefault(key, _parse_value(line[10:]))
    return cards


_PV_KEY = re.compile(r"^PV(\d+)_(\d+)$")
# Distortion keywords of other conventions (WCS Paper IV prior/sequent lookup tables and
# polynomials, HST's detector-to-image tables): astropy applies them, so they are refused.
_FOREIGN_DISTORTION = re.compile(r"^(CPDIS\d+|CQDIS\d+|DP\d+|DQ\d+|CPERR\d+|CQERR\d+|D2IMDIS\d+|D2IMEXT|D2IMERR\d+)$")


def parse_header(header, source: str = "wcs_header", max_sip_order: int = MAX_SIP_ORDER) -> WcsParams:
    """Read a celestial TAN, TAN-SIP or TPV WCS from FITS header text.

    Parameters
    ----------
    header : str or astropy.io.fits.Header
        Header text as written by ``WCS.to_header_string(relax=True)`` (80-character cards,
        with or without newlines), or a header.
    source : str
        Names the header in error messages (file and HDU, image id, ...).
    max_sip_order : int
        SIP arrays are padded to this order (TPV arrays always to ``MAX_TPV_ORDER``).

    Returns
    -------
    WcsParams
        Unbatched parameters (numpy float64 arrays).

    Raises
    ------
    ValueError
        For a projection other than TAN or TPV (ZPN, ZEA, SIN, TNX, ...), swapped axes,
        non-degree units, a missing keyword, a singular CD matrix, a SIP order above
        ``max_sip_order``, ``PVi_m`` cards on a TAN header (astropy reads them as SCAMP's
        TPV distortion), other distortion keywords (``CPDISj``, ``DQi``, ``D2IMDISj``, ...),
        SIP and TPV together, a ``PVi_m`` index above 39, TPV in ``PC``/``CDELT`` form with
        ``CDELTi != 1`` (wcslib then applies the polynomial before ``CDELT``), or a
        degenerate TPV linear part (e.g. ``PV1_1``/``PV2_1`` missing: wcslib takes 0).
    """
    h = header_cards(header)
    ctype = (str(h.get("CTYPE1", "")).strip().upper(), str(h.get("CTYPE2", "")).strip().upper())
    tpv = ctype == ("RA---TPV", "DEC--TPV")
    if not tpv and not (ctype[0].startswith("RA---TAN") and ctype[1].startswith("DEC--TAN")):
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r}; only RA---TAN(-SIP)/DEC--TAN(-SIP) "
                         "or RA---TPV/DEC--TPV is supported")
    if not tpv:
        for suffix in ctype:
            if suffix[8:] not in ("", "-SIP"):
                raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r}: unsupported distortion "
                                 f"{suffix!r} (only SIP, or CTYPE RA---TPV/DEC--TPV)")
    pv_keys = [k for k in h if _PV_KEY.match(k)]
    foreign = [k for k in h if _FOREIGN_DISTORTION.match(k)]
    if foreign:
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r} with unsupported distortion keyword(s) "
                         f"{', '.join(sorted(foreign))}")
    if pv_keys and not tpv:
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r} with unsupported distortion keyword(s) "
                         f"{', '.join(sorted(pv_keys))} (astropy reads PVi_m on a TAN header as SCAMP's TPV "
                         "polynomial; write CTYPE RA---TPV/DEC--TPV to use them)")
    for i in (1, 2):
        unit = str(h.get(f"CUNIT{i}", "deg")).strip().lower()
        if unit not in ("deg", ""):
            raise ValueError(f"{source}: CUNIT{i} = {unit!r}, expected 'deg'")
        for key in (f"CRPIX{i}", f"CRVAL{i}"):
            if key not in h:
                raise ValueError(f"{source}: missing keyword {key}")
    radesys = str(h.get("RADESYS", "ICRS")).strip().upper()
    if radesys not in ("ICRS", "FK5"):
        # FK5 (J2000) is within 0.02 arcsec of ICRS and is treated as ICRS; others are not.
        raise ValueError(f"{source}: RADESYS = {radesys!r}; only ICRS (or FK5 J2000) is supported")

    crpix0 = np.array([float(h["CRPIX1"]) - 1.0, float(h["CRPIX2"]) - 1.0])
    crval = np.array([float(h["CRVAL1"]), float(h["CRVAL2"])])
    if any(f"CD{i}_{j}" in h for i in (1, 2) for j in (1, 2)):
        cd = np.array([[float(h.get(f"CD{i}_{j}", 0.0)) for j in (1, 2)] for i in (1, 2)])
    else:
        cdelt = np.array([float(h.get("CDELT1", 1.0)), float(h.get("CDELT2", 1.0))])
        if tpv and not np.all(cdelt == 1.0):
            # wcslib applies a sequent distortion to PC (p - CRPIX) and scales by CDELT
            # after it, which is not the TPV convention's polynomial in degrees.
            raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r} in PC/CDELT form with CDELT = "
                             f"{cdelt.tolist()}; TPV is supported with CD, or PC and CDELT = 1")
        if any(f"PC{i}_{j}" in h for i in (1, 2) for j in (1, 2)):
            pc = np.array([[float(h.get(f"PC{i}_{j}", float(i == j))) for j in (1, 2)] for i in (1, 2)])
        else:
            rot = np.radians(float(h.get("CROTA2", 0.0)))  # the older AIPS convention
            ratio = cdelt[1] / cdelt[0]
            pc = np.array([[np.cos(rot), -np.sin(rot) * ratio], [np.sin(rot) / ratio, np.cos(rot)]])
        cd = cdelt[:, None] * pc
    if not np.all(np.isfinite(cd)) or abs(np.linalg.det(cd)) == 0.0:
        raise ValueError(f"{source}: CD (or PC x CDELT) matrix {cd.tolist()} is singular or not finite")
    # Zenithal projections put the reference point at the native pole; the default
    # LONPOLE is then 180 deg except exactly at the celestial pole.
    lonpole = float(h.get("LONPOLE", 0.0 if crval[1] >= 90.0 else 180.0))

    size = max_sip_order + 1
    sip = {"A": np.zeros((size, size)), "B": np.zeros((size, size))}
    sip_keys = [k for k in h if _SIP_KEY.match(k) or re.match(r"^(A|B|AP|BP)_ORDER$", k)]
    if tpv and sip_keys:
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r} with SIP keyword(s) "
                         f"{', '.join(sorted(sip_keys)[:4])}: SIP and TPV together are not supported")
    for axis in ("A", "B"):
        order = h.get(f"{axis}_ORDER")
        if order is None:
            continue
        if int(order) > max_sip_order:
            raise ValueError(f"{source}: {axis}_ORDER = {order} exceeds the supported SIP order {max_sip_order}")
    for key in h.keys():
        m = _SIP_KEY.match(key)
        if m:
            p, q = int(m.group(2)), int(m.group(3))
            if p + q > max_sip_order:
                raise ValueError(f"{source}: {key} has order {p + q} > {max_sip_order}")
            sip[m.group(1)][p, q] = float(h[key])
    if ctype[0].endswith("-SIP") and "A_ORDER" not in h:
        raise ValueError(f"{source}: CTYPE says SIP but A_ORDER/B_ORDER are missing")
    tpv_a, tpv_b, tpv_r, plain = _parse_tpv(h, pv_keys, source, ctype) if tpv else _no_tpv()
    return WcsParams(crpix0, crval, np.float64(lonpole), cd, sip["A"], sip["B"], tpv_a, tpv_b, tpv_r, plain)


def _no_tpv():
    size = MAX_TPV_ORDER + 1
    return np.zeros((size, size)), np.zeros((size, size)), np.zeros((2, N_TPV_RADIAL)), np.zeros((2, 3))


def _parse_tpv(h: dict, pv_keys, source: str, ctype):
    """TPV ``PVi_m`` cards as (tpv_a, tpv_b, tpv_r, tpv_plain) (see ``WcsParams``)."""
    tpv_a, tpv_b, tpv_r, _ = _no_tpv()
    pv = np.zeros((2, len(TPV_TERMS)))
    for key in pv_keys:
        i, m = (int(g) for g in _PV_KEY.match(key).groups())
        if i not in (1, 2) or m >= len(TPV_TERMS):
            raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r}: {key} is not a TPV coefficient "
                             "(PV1_0..PV1_39, PV2_0..PV2_39)")
        pv[i - 1, m] = float(h[key])
    if not np.all(np.isfinite(pv)):
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r}: non-finite PVi_m")
    for m, (kind, p, q) in enumerate(TPV_TERMS):
        if kind == "r":
            tpv_r[0, p // 2] = pv[0, m]
            tpv_r[1, p // 2] = pv[1, m]
        else:
            tpv_a[p, q] = pv[0, m]  # xi = P1(x, y): PV1_m x^p y^q
            tpv_b[q, p] = pv[1, m]  # eta = P2(y, x): PV2_m y^p x^q
    tpv_a[1, 0] -= 1.0  # stored as the difference from the identity
    tpv_b[0, 1] -= 1.0
    linear = np.array([[pv[0, 1], pv[0, 2]], [pv[1, 2], pv[1, 1]]])
    if not abs(np.linalg.det(linear)) > 1e-12 * np.sum(linear**2):
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r}: degenerate TPV linear part "
                         f"[[PV1_1, PV1_2], [PV2_2, PV2_1]] = {linear.tolist()} (absent PVi_m are 0)")
    return tpv_a, tpv_b, tpv_r, _affine_part(tpv_a, tpv_b)


def _affine_part(tpv_a, tpv_b):
    """``tpv_plain`` from the constant and linear coefficients (the polynomial's affine part at x = 0)."""
    out = np.zeros(np.shape(tpv_a)[:-2] + (2, 3))
    if np.shape(tpv_a)[-1] == 0:
        return out
    for row, c in enumerate((tpv_a, tpv_b)):
        c = np.asarray(c)
        out[..., row, 0] = c[..., 0, 0]
        if c.shape[-1] > 1:
            out[..., row, 1] = c[..., 1, 0]
            out[..., row, 2] = c[..., 0, 1]
    return out


def stack_wcs(headers: Sequence, sources: Sequence[str] | None = None, max_sip_order: int = MAX_SIP_ORDER) -> WcsParams:
    """Parse many headers into one batched ``WcsParams`` (leading axis = image).

    Parameters
    ----------
    headers : sequence of str or Header
        One WCS header per image (TAN, TAN-SIP and TPV may be mixed).
    sources : sequence of str, optional
        Names for error messages (defaults to ``"header <i>"``).
    max_sip_order : int
        Common SIP padding order.

    Returns
    -------
    WcsParams
        Arrays with leading dimension ``len(headers)`` (numpy float64).
    """
    sources = sources if sources is not None else [f"header {i}" for i in range(len(headers))]
    parts = [parse_header(h, s, max_sip_order) for h, s in zip(headers, sources)]
    if not parts:
        size, t = max_sip_order + 1, MAX_TPV_ORDER + 1
        return WcsParams(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0,)), np.zeros((0, 2, 2)),
                         np.zeros((0, size, size)), np.zeros((0, size, size)), np.zeros((0, t, t)),
                         np.zeros((0, t, t)), np.zeros((0, 2, N_TPV_RADIAL)), np.zeros((0, 2, 3)))
    return WcsParams(*(np.stack(field) for field in zip(*parts)))


def _used_order(a, b, initial: int) -> int:
    """Highest ``p + q`` with a nonzero coefficient in any image (``initial`` if none)."""
    used = (np.asarray(a) != 0) | (np.asarray(b) != 0)
    size = used.shape[-1]
    if size == 0:
        return initial
    orders = np.add.outer(np.arange(size), np.arange(size))
    return int(orders[used.reshape(-1, size, size).any(axis=0)].max(initial=initial))


def trim_sip(params: WcsParams) -> WcsParams:
    """The same WCSs with SIP and TPV arrays cut to the highest order any of them uses (work
    in the polynomials grows with the square of the padded order). Where no image has TPV,
    its arrays become empty and the TPV steps are skipped altogether."""
    order = _used_order(params.sip_a, params.sip_b, 0)
    tpv_order = _used_order(params.tpv_a, params.tpv_b, -1)
    radial = np.asarray(params.tpv_r) != 0
    n_rad = radial.shape[-1]
    n_rad = int(np.flatnonzero(radial.reshape(-1, n_rad).any(axis=0)).max(initial=-1)) + 1 if n_rad else 0
    return params._replace(sip_a=params.sip_a[..., : order + 1, : order + 1],
                           sip_b=params.sip_b[..., : order + 1, : order + 1],
                           tpv_a=params.tpv_a[..., : tpv_order + 1, : tpv_order + 1],
                           tpv_b=params.tpv_b[..., : tpv_order + 1, : tpv_order + 1],
                           tpv_r=params.tpv_r[..., :n_rad])


def take(params: WcsParams, index) -> WcsParams:
    """The WCSs at ``index`` of a batched ``WcsParams`` (numpy or JAX arrays)."""
    return WcsParams(*(f[index] for f in params))


def has_tpv(params: WcsParams) -> bool:
    """Whether the (static) array shapes leave room for a TPV polynomial at all."""
    return params.tpv_a.shape[-1] > 0 or params.tpv_r.shape[-1] > 0


def plain_wcs(params: WcsParams) -> WcsParams:
    """The plain WCSs the search's first cut uses (host arrays): no SIP, and each TPV
    polynomial replaced by its affine part ``tpv_plain``. Their ``pix2world`` is the inverse
    of the projection by ``pixel_matrix``: a gnomonic projection followed by an affine map,
    so straight pixel edges are great-circle arcs on the sky."""
    p = WcsParams(*(np.asarray(f, dtype=np.float64) for f in params))
    out = p._replace(sip_a=np.zeros_like(p.sip_a), sip_b=np.zeros_like(p.sip_b))
    if not np.any(p.tpv_plain):
        return out._replace(tpv_a=np.zeros(p.tpv_a.shape[:-2] + (0, 0)), tpv_b=np.zeros(p.tpv_b.shape[:-2] + (0, 0)),
                            tpv_r=np.zeros(p.tpv_r.shape[:-1] + (0,)))
    lead = p.tpv_plain.shape[:-2]
    tpv_a, tpv_b = np.zeros(lead + (2, 2)), np.zeros(lead + (2, 2))
    for row, c in enumerate((tpv_a, tpv_b)):
        c[..., 0, 0], c[..., 1, 0], c[..., 0, 1] = (p.tpv_plain[..., row, k] for k in range(3))
    return out._replace(tpv_a=tpv_a, tpv_b=tpv_b, tpv_r=np.zeros(p.tpv_r.shape[:-1] + (0,)))


# ----------------------------------------------------------------------------- projection
def _tangent_basis(crval_deg):
    """Unit vectors east, north and radial at the tangent point (ICRS), each (..., 3)."""
    ra, dec = jnp.radians(crval_deg[..., 0]), jnp.radians(crval_deg[..., 1])
    ca, sa, cd, sd = jnp.cos(ra), jnp.sin(ra), jnp.cos(dec), jnp.sin(dec)
    east = jnp.stack([-sa, ca, jnp.zeros_like(ra)], axis=-1)
    north = jnp.stack([-sd * ca, -sd * sa, cd], axis=-1)
    radial = jnp.stack([cd * ca, cd * sa, sd], axis=-1)
    return east, north, radial


def _pole_rotation(lonpole_deg):
    # The standard gnomonic axes (x east, y north) correspond to LONPOLE = 180 deg; other
    # values rotate the projection plane by LONPOLE - 180.
    ang = jnp.radians(lonpole_deg) - jnp.pi
    return jnp.cos(ang), jnp.sin(ang)


def pixel_matrix(params: WcsParams):
    """3x3 matrix taking an ICRS unit vector ``d`` to ``(U w, V w, w)``.

    ``(U, V)`` are the pixel offsets from the reference pixel of the *plain* projection:
    gnomonic, then the inverse of ``CD`` and of the affine part ``tpv_plain`` of the TPV
    polynomial, without SIP or the rest of TPV (exact for plain TAN); ``w = d . radial`` is
    positive in front of the tangent plane. ``undistort`` takes ``(U, V)`` to the true
    offsets. Building the matrix once per image turns the projection of many directions
    into one matrix product.
    """
    east, north, radial = _tangent_basis(params.crval_deg)
    c, s = _pole_rotation(params.lonpole_deg)
    c, s = c[..., None], s[..., None]
    xi = RAD2DEG * (c * east - s * north)  # intermediate world x (deg) per unit w
    eta = RAD2DEG * (c * north + s * east)
    # The plain map from pixel offsets to (xi, eta) is a + (I + K) CD s; with a = K = 0
    # (TAN, SIP) every step below is exact and the matrix is CD^-1 bit for bit.
    plain = params.tpv_plain
    cd_eff = params.cd_deg + jnp.einsum("...ij,...jk->...ik", plain[..., :, 1:3], params.cd_deg)
    cd_inv = jnp.linalg.inv(cd_eff)
    offset = jnp.einsum("...ij,...j->...i", cd_inv, plain[..., :, 0])
    rows_uv = (cd_inv[..., :, 0:1] * xi[..., None, :] + cd_inv[..., :, 1:2] * eta[..., None, :]
               - offset[..., :, None] * radial[..., None, :])
    return jnp.concatenate([rows_uv, radial[..., None, :]], axis=-2)


def _powers(z, order):
    return jnp.stack([z**k for k in range(order + 1)], axis=-1)


def sip_distort(params: WcsParams, u_px, v_px):
    """Apply the SIP forward distortion to pixel offsets: ``(u + f(u, v), v + g(u, v))``."""
    order = params.sip_a.shape[-1] - 1
    up, vp = _powers(u_px, order), _powers(v_px, order)
    f = jnp.einsum("...p,pq,...q->...", up, params.sip_a, vp)
    g = jnp.einsum("...p,pq,...q->...", up, params.sip_b, vp)
    return u_px + f, v_px + g


def _poly_and_jacobian(a, b, u, v, xp=jnp):
    """``f = sum_pq a[p, q] u^p v^q``, ``g`` likewise with ``b`` (terms with p + q <= order),
    and their derivatives ``f_u, f_v, g_u, g_v``: written-out sums, elementwise work that fuses,
    rather than many tiny matrix products. ``xp`` is ``jnp`` or ``np``; an order below 0 (the
    coefficients trimmed away) gives zeros."""
    order = a.shape[-1] - 1
    zero = xp.zeros_like(u)
    f = g = fu = fv = gu = gv = zero
    up, vp = [xp.ones_like(u)], [xp.ones_like(v)]
    for _ in range(order):
        up.append(up[-1] * u)
        vp.append(vp[-1] * v)
    for p in range(order + 1):
        for q in range(order + 1 - p):
            ca, cb = a[..., p, q], b[..., p, q]
            term = up[p] * vp[q]
            f, g = f + ca * term, g + cb * term
            if p:
                du = p * up[p - 1] * vp[q]
                fu, gu = fu + ca * du, gu + cb * du
            if q:
                dv = q * up[p] * vp[q - 1]
                fv, gv = fv + ca * dv, gv + cb * dv
    return f, g, fu, fv, gu, gv


def _sip_and_jacobian(params: WcsParams, u, v):
    """SIP terms f, g and their derivatives at pixel offsets (u, v)."""
    return _poly_and_jacobian(params.sip_a, params.sip_b, u, v)


def sip_undistort(params: WcsParams, big_u_px, big_v_px, n_iter: int = NEWTON_ITERATIONS):
    """Solve ``(u + f(u, v), v + g(u, v)) = (U, V)`` for the pixel offsets ``(u, v)`` (Newton)."""
    def newton(_, uv):
        u, v = uv
        f, g, fu, fv, gu, gv = _sip_and_jacobian(params, u, v)
        ru, rv = big_u_px - u - f, big_v_px - v - g
        j11, j12, j21, j22 = 1.0 + fu, fv, gu, 1.0 + gv
        det = j11 * j22 - j12 * j21
        return u + (j22 * ru - j12 * rv) / det, v + (j11 * rv - j21 * ru) / det

    # A loop rather than unrolled steps keeps the compiled program small.
    return jax.lax.fori_loop(0, n_iter, newton, (big_u_px, big_v_px))


# ----------------------------------------------------------------------------- TPV
def _tpv_and_jacobian(params: WcsParams, x, y, xp=jnp):
    """TPV polynomial minus the identity, ``(f, g) = (xi - x, eta - y)``, and its
    derivatives at intermediate world coordinates ``(x, y)`` (degrees). ``xp`` is ``jnp``
    or ``np`` (coefficients broadcast against ``x``, ``y``)."""
    rc = params.tpv_r
    f, g, fx, fy, gx, gy = _poly_and_jacobian(params.tpv_a, params.tpv_b, x, y, xp)
    if rc.shape[-1]:
        r2 = x * x + y * y
        r = xp.sqrt(r2)
        for k in range(rc.shape[-1]):  # r^n, n = 2k + 1; d(r^n)/dx = n r^(n-2) x
            ca, cb = rc[..., 0, k], rc[..., 1, k]
            rn = r * r2**k
            if k == 0:
                dr = xp.where(r > 0, 1.0 / xp.where(r > 0, r, 1.0), 0.0)  # r is not differentiable at 0
            else:
                dr = (2 * k + 1) * r * r2 ** (k - 1)
            f, g = f + ca * rn, g + cb * rn
            fx, fy = fx + ca * dr * x, fy + ca * dr * y
            gx, gy = gx + cb * dr * x, gy + cb * dr * y
    return f, g, fx, fy, gx, gy


def tpv_distort(params: WcsParams, x_deg, y_deg):
    """Apply the TPV polynomial to intermediate world coordinates: ``(xi, eta)`` in degrees
    (the identity, bit for bit, for TAN and SIP)."""
    if not has_tpv(params):
        return x_deg, y_deg
    f, g, *_ = _tpv_and_jacobian(params, x_deg, y_deg)
    return x_deg + f, y_deg + g


def _cd_inverse(cd):
    det = cd[..., 0, 0] * cd[..., 1, 1] - cd[..., 0, 1] * cd[..., 1, 0]
    return cd[..., 1, 1] / det, -cd[..., 0, 1] / det, -cd[..., 1, 0] / det, cd[..., 0, 0] / det


def tpv_undistort(params: WcsParams, big_u_px, big_v_px, n_iter: int = TPV_NEWTON_ITERATIONS):
    """Pixel offsets ``s`` (before SIP is undone) whose TPV image is the plain position
    ``(U, V)`` of ``pixel_matrix``: solve ``P(CD s) = A(CD (U, V))`` (``A`` the plain affine
    map) for ``x = CD s`` by Newton iteration from ``x = CD (U, V)``.

    Newton converges quadratically from there for a polynomial that is close to affine
    over the image (see ``TPV_NEWTON_ITERATIONS``). After the ``n_iter`` steps, the
    residual ``|P(x) - A(x_lin)|`` is taken back to pixels with ``CD^-1``; points where it
    exceeds ``TPV_TOLERANCE_PX`` come back NaN rather than wrong. TAN and SIP images get ``(U, V)`` back bit for bit.
    """
    if not has_tpv(params):
        return big_u_px, big_v_px
    cd, plain = params.cd_deg, params.tpv_plain
    x_lin = cd[..., 0, 0] * big_u_px + cd[..., 0, 1] * big_v_px
    y_lin = cd[..., 1, 0] * big_u_px + cd[..., 1, 1] * big_v_px
    # The equation x + f(x) = x_lin + plain(x_lin), written so that zeros give 0 exactly.
    ax = plain[..., 0, 0] + plain[..., 0, 1] * x_lin + plain[..., 0, 2] * y_lin
    ay = plain[..., 1, 0] + plain[..., 1, 1] * x_lin + plain[..., 1, 2] * y_lin

    def residual(x, y):
        f, g, fx, fy, gx, gy = _tpv_and_jacobian(params, x, y)
        return (x_lin - x) + (ax - f), (y_lin - y) + (ay - g), fx, fy, gx, gy

    def newton(_, xy):
        x, y = xy
        rx, ry, fx, fy, gx, gy = residual(x, y)
        j11, j12, j21, j22 = 1.0 + fx, fy, gx, 1.0 + gy
        det = j11 * j22 - j12 * j21
        return x + (j22 * rx - j12 * ry) / det, y + (j11 * ry - j21 * rx) / det

    x, y = jax.lax.fori_loop(0, n_iter, newton, (x_lin, y_lin))
    rx, ry, *_ = residual(x, y)
    i11, i12, i21, i22 = _cd_inverse(cd)
    converged = jnp.hypot(i11 * rx + i12 * ry, i21 * rx + i22 * ry) <= TPV_TOLERANCE_PX
    du, dv = x - x_lin, y - y_lin
    return (jnp.where(converged, big_u_px + (i11 * du + i12 * dv), jnp.nan),
            jnp.where(converged, big_v_px + (i21 * du + i22 * dv), jnp.nan))


def undistort(params: WcsParams, big_u_px, big_v_px, n_iter: int = NEWTON_ITERATIONS,
              tpv_iter: int = TPV_NEWTON_ITERATIONS):
    """True pixel offsets ``(u, v)`` from the reference pixel for the plain position
    ``(U, V)`` of ``pixel_matrix``: TPV inverted (``tpv_undistort``), then SIP
    (``sip_undistort``). Each is the identity, bit for bit, where its coefficients are zero."""
    s_u, s_v = tpv_undistort(params, big_u_px, big_v_px, tpv_iter)
    return sip_undistort(params, s_u, s_v, n_iter)


def fit_plain(params: WcsParams, naxis1, naxis2) -> WcsParams:
    """The same WCSs with each TPV image's plain affine map (``tpv_plain``) re-fitted as
    the polynomial's tangent (value and derivatives, radial terms included) at the image
    centre: the plain projection then misses the true one by the polynomial's curvature
    over the image only, which keeps ``max_distortion_px`` small (host arrays; TAN and SIP
    images keep zeros).

    Parameters
    ----------
    params : WcsParams
        One WCS or a stack (leading axis n).
    naxis1, naxis2 : int or array (n,)
        Image sizes, pixels.
    """
    p = WcsParams(*(np.asarray(f, dtype=np.float64) for f in params))
    if not has_tpv(p):
        return p
    uc = (np.asarray(naxis1, dtype=np.float64) - 1.0) / 2.0 - p.crpix0_px[..., 0]
    vc = (np.asarray(naxis2, dtype=np.float64) - 1.0) / 2.0 - p.crpix0_px[..., 1]
    cd = p.cd_deg
    xc = cd[..., 0, 0] * uc + cd[..., 0, 1] * vc
    yc = cd[..., 1, 0] * uc + cd[..., 1, 1] * vc
    f, g, fx, fy, gx, gy = (np.broadcast_to(v, np.shape(xc)) for v in _tpv_and_jacobian(p, xc, yc, xp=np))
    plain = np.stack([np.stack([f - fx * xc - fy * yc, fx, fy], -1), np.stack([g - gx * xc - gy * yc, gx, gy], -1)], -2)
    return p._replace(tpv_plain=plain)


def unit_vector(ra_deg, dec_deg):
    """ICRS unit vectors (..., 3) for RA, Dec in degrees."""
    ra, dec = jnp.radians(ra_deg), jnp.radians(dec_deg)
    return jnp.stack([jnp.cos(dec) * jnp.cos(ra), jnp.cos(dec) * jnp.sin(ra), jnp.sin(dec)], axis=-1)


def _direction2pix(params: WcsParams, direction, n_iter: int = NEWTON_ITERATIONS):
    m = pixel_matrix(params)
    h = jnp.einsum("ij,...j->...i", m, direction)
    w = h[..., 2]
    # Behind the tangent plane the gnomonic projection is undefined: return NaN there.
    w = jnp.where(w > 0, w, jnp.nan)
    u, v = undistort(params, h[..., 0] / w, h[..., 1] / w, n_iter)
    return params.crpix0_px[0] + u, params.crpix0_px[1] + v


def _world2pix(params: WcsParams, ra_deg, dec_deg, n_iter: int = NEWTON_ITERATIONS):
    return _direction2pix(params, unit_vector(ra_deg, dec_deg), n_iter)


def _pix2direction(params: WcsParams, x_px, y_px):
    du, dv = sip_distort(params, x_px - params.crpix0_px[0], y_px - params.crpix0_px[1])
    cd = params.cd_deg
    x_deg, y_deg = tpv_distort(params, cd[0, 0] * du + cd[0, 1] * dv, cd[1, 0] * du + cd[1, 1] * dv)
    xi, eta = x_deg / RAD2DEG, y_deg / RAD2DEG
    c, s = _pole_rotation(params.lonpole_deg)
    d_east, d_north = c * xi + s * eta, c * eta - s * xi
    east, north, radial = _tangent_basis(params.crval_deg)
    d = d_east[..., None] * east + d_north[..., None] * north + radial
    return d / jnp.linalg.norm(d, axis=-1, keepdims=True)


def _pix2world(params: WcsParams, x_px, y_px):
    d = _pix2direction(params, x_px, y_px)
    ra = jnp.degrees(jnp.arctan2(d[..., 1], d[..., 0])) % 360.0
    dec = jnp.degrees(jnp.arctan2(d[..., 2], jnp.hypot(d[..., 0], d[..., 1])))
    return ra, dec


world2pix = jax.jit(_world2pix, static_argnames="n_iter")
world2pix.__doc__ = """ICRS (RA, Dec) in degrees to 0-based pixel (x, y) for one WCS.

Parameters
----------
params : WcsParams
    One (unbatched) WCS; use ``world2pix_batched`` or ``jax.vmap`` for many.
ra_deg, dec_deg : array
    ICRS coordinates, degrees (any matching shapes).
n_iter : int
    Newton iterations inverting the SIP distortion (static); TPV takes
    ``TPV_NEWTON_ITERATIONS``.

Returns
-------
x_px, y_px : array
    0-based pixel coordinates (NaN behind the tangent plane, and where the TPV inversion
    does not converge).
"""
direction2pix = jax.jit(_direction2pix, static_argnames="n_iter")
direction2pix.__doc__ = "Like ``world2pix`` for ICRS unit vectors ``direction`` (..., 3)."
pix2world = jax.jit(_pix2world)
pix2world.__doc__ = """0-based pixel (x, y) to ICRS (RA, Dec) in degrees (RA in [0, 360)) for one WCS."""


def _world2pix_batched(params: WcsParams, ra_deg, dec_deg, n_iter: int = NEWTON_ITERATIONS):
    return jax.vmap(lambda p, r, d: _world2pix(p, r, d, n_iter))(params, ra_deg, dec_deg)


world2pix_batched = jax.jit(_world2pix_batched, static_argnames="n_iter")
world2pix_batched.__doc__ = "``world2pix`` over a stack: params (n, ...), ra/dec (n, ...) -> x, y (n, ...)."
pix2world_batched = jax.jit(jax.vmap(_pix2world))
pix2world_batched.__doc__ = "``pix2world`` over a stack: params (n, ...), x/y (n, ...) -> ra, dec (n, ...)."


def max_distortion_px(params: WcsParams, naxis1, naxis2) -> np.ndarray:
    """Upper bound, over each image, of the distance between a point's true pixel position
    and its plain position (``pixel_matrix``: no SIP, TPV replaced by its affine part).

    Never below the true largest displacement, so a search may reject points farther than
    this from an image's plain footprint before inverting the distortion. The image is the
    box ``-0.5 <= x <= naxis1 - 0.5``, ``-0.5 <= y <= naxis2 - 0.5``; both parts are proven
    bounds (triangle inequality and Taylor's theorem), not samples:

    * SIP: ``sum_pq |A_pq| |u|max^p |v|max^q`` (and the same for B) over the box.
    * TPV: the displacement is ``M N(x)`` with ``M = ((I + K) CD)^-1``, ``N = P - A`` (the
      polynomial minus the plain affine map ``a + (I + K) x``) and ``x = CD s`` ranging
      over the parallelogram ``CD box`` (the box widened by the SIP bound, should an image
      have both), centre ``x_c``, ``|dx| <= Dx``, ``|dy| <= Dy``, ``|x - x_c| <= D``. Each
      radial term ``c r^n`` is split into its tangent at ``x_c`` and a remainder bounded by
      Taylor's theorem with ``||Hessian(r^n)|| <= n (n - 1) (r_c + D)^(n-2)`` (``n >= 3``),
      ``1 / (r_c - D)`` (``n = 1`` when ``r_c > D``; else ``|remainder| <= 2 D``). The rest
      of ``N`` is a polynomial: re-expanded exactly about ``x_c`` (coefficients ``b_jk``)
      it is at most ``sum_jk |b_jk| Dx^j Dy^k``. The two axis bounds go through ``|M|``,
      plus a relative 1e-12 of the terms' absolute sizes for rounding.

    Parameters
    ----------
    params : WcsParams
        One WCS or a stack (leading axis n).
    naxis1, naxis2 : int or array (n,)
        Image sizes, pixels.

    Returns
    -------
    ndarray (n,) or scalar
        Bounds in pixels (0 for plain TAN).
    """
    p = WcsParams(*(np.asarray(f, dtype=np.float64) for f in params))
    crpix = p.crpix0_px
    u_max = np.maximum(np.abs(-0.5 - crpix[..., 0]), np.abs(np.asarray(naxis1) - 0.5 - crpix[..., 0]))
    v_max = np.maximum(np.abs(-0.5 - crpix[..., 1]), np.abs(np.asarray(naxis2) - 0.5 - crpix[..., 1]))
    k = np.arange(p.sip_a.shape[-1])
    up = u_max[..., None] ** k
    vp = v_max[..., None] ** k
    f = np.einsum("...p,...pq,...q->...", up, np.abs(p.sip_a), vp)
    g = np.einsum("...p,...pq,...q->...", up, np.abs(p.sip_b), vp)
    sip = np.hypot(f, g)
    if not has_tpv(p) and not np.any(p.tpv_plain):
        return sip
    return sip + _tpv_bound_px(p, np.asarray(naxis1, dtype=np.float64), np.asarray(naxis2, dtype=np.float64), sip)


def _shift_matrix(c, order):
    """``B[..., p, j] = C(p, j) c^(p - j)`` (0 for ``j > p``): ``sum_p a_p x^p`` re-expanded
    about ``c`` has coefficients ``sum_p a_p B[p, j]`` of ``(x - c)^j``."""
    from math import comb

    out = np.zeros(np.shape(c) + (order + 1, order + 1))
    for p_ in range(order + 1):
        for j in range(p_ + 1):
            out[..., p_, j] = comb(p_, j) * c ** (p_ - j)
    return out


def _tpv_bound_px(p: WcsParams, naxis1, naxis2, widen):
    """The TPV part of ``max_distortion_px`` (see there), in pixels."""
    crpix, cd = p.crpix0_px, p.cd_deg
    lo_u, hi_u = -0.5 - crpix[..., 0] - widen, naxis1 - 0.5 - crpix[..., 0] + widen
    lo_v, hi_v = -0.5 - crpix[..., 1] - widen, naxis2 - 0.5 - crpix[..., 1] + widen
    uc, hu = (lo_u + hi_u) / 2.0, (hi_u - lo_u) / 2.0
    vc, hv = (lo_v + hi_v) / 2.0, (hi_v - lo_v) / 2.0
    xc = cd[..., 0, 0] * uc + cd[..., 0, 1] * vc
    yc = cd[..., 1, 0] * uc + cd[..., 1, 1] * vc
    dx = np.abs(cd[..., 0, 0]) * hu + np.abs(cd[..., 0, 1]) * hv
    dy = np.abs(cd[..., 1, 0]) * hu + np.abs(cd[..., 1, 1]) * hv
    dmax = np.maximum(np.hypot(cd[..., 0, 0] * hu + cd[..., 0, 1] * hv, cd[..., 1, 0] * hu + cd[..., 1, 1] * hv),
                      np.hypot(cd[..., 0, 0] * hu - cd[..., 0, 1] * hv, cd[..., 1, 0] * hu - cd[..., 1, 1] * hv))
    rc = np.hypot(xc, yc)
    order = max(p.tpv_a.shape[-1] - 1, 1)
    lead = np.shape(xc)
    bounds = []
    for row, poly in enumerate((p.tpv_a, p.tpv_b)):
        c = np.zeros(lead + (order + 1, order + 1))
        n = poly.shape[-1]
        c[..., :n, :n] = poly
        c[..., 0, 0] -= p.tpv_plain[..., row, 0]
        c[..., 1, 0] -= p.tpv_plain[..., row, 1]
        c[..., 0, 1] -= p.tpv_plain[..., row, 2]
        remainder = np.zeros(lead)
        crude = np.zeros(lead)
        for kk in range(p.tpv_r.shape[-1]):
            nn = 2 * kk + 1
            coef = p.tpv_r[..., row, kk]
            # the tangent of coef r^n at x_c goes into the polynomial...
            slope = nn * rc ** (nn - 2) if nn > 1 else np.where(rc > 0, 1.0 / np.where(rc > 0, rc, 1.0), 0.0)
            gx, gy = coef * slope * xc, coef * slope * yc
            c[..., 0, 0] += coef * rc**nn - gx * xc - gy * yc
            c[..., 1, 0] += gx
            c[..., 0, 1] += gy
            # ... and the remainder is bounded by the Hessian.
            if nn == 1:
                inner = rc - dmax
                rem = np.where(inner > 0, dmax**2 / (2.0 * np.where(inner > 0, inner, 1.0)), 2.0 * dmax)
            else:
                rem = 0.5 * nn * (nn - 1) * (rc + dmax) ** (nn - 2) * dmax**2
            remainder = remainder + np.abs(coef) * rem
            crude = crude + np.abs(coef) * (rc + dmax) ** nn * 2.0
        b = np.einsum("...pj,...pq,...qk->...jk", _shift_matrix(xc, order), c, _shift_matrix(yc, order))
        kk = np.arange(order + 1)
        dxp, dyp = dx[..., None] ** kk, dy[..., None] ** kk
        poly_bound = np.einsum("...j,...jk,...k->...", dxp, np.abs(b), dyp)
        ax, ay = (np.abs(xc) + dx)[..., None] ** kk, (np.abs(yc) + dy)[..., None] ** kk
        crude = crude + np.einsum("...j,...jk,...k->...", ax, np.abs(c), ay)
        bounds.append(poly_bound + remainder + 1e-12 * crude)
    cd_eff = cd + np.einsum("...ij,...jk->...ik", p.tpv_plain[..., :, 1:3], cd)
    m = np.abs(np.linalg.inv(cd_eff))
    return np.hypot(m[..., 0, 0] * bounds[0] + m[..., 0, 1] * bounds[1], m[..., 1, 0] * bounds[0] + m[..., 1, 1] * bounds[1])


__all__ = [
    "MAX_SIP_ORDER", "MAX_TPV_ORDER", "TPV_TERMS", "WcsParams", "header_cards", "parse_header", "stack_wcs", "take",
    "trim_sip", "has_tpv", "plain_wcs", "fit_plain", "pixel_matrix", "sip_distort", "sip_undistort", "tpv_distort",
    "tpv_undistort", "undistort", "unit_vector", "world2pix", "direction2pix", "pix2world", "world2pix_batched",
    "pix2world_batched", "max_distortion_px",
]
