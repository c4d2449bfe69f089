"""Gnomonic (TAN) and TAN-SIP world coordinate systems in JAX.

A WCS is a ``WcsParams`` pytree of float64 arrays, so one function serves one image or,
through ``jax.vmap``, a stack of images built by ``stack_wcs``. SIP coefficient arrays are
zero-padded to ``MAX_SIP_ORDER`` so images with different orders (or none) stack together.

Conventions follow astropy (wcslib): pixel coordinates are 0-based with pixel centres at
integers (FITS ``CRPIX`` is 1-based and is shifted on reading); world coordinates are ICRS
right ascension and declination in degrees. The SIP forward polynomials ``A``/``B`` define
the distortion; ``world2pix`` inverts them by Newton iteration (like astropy's
``all_world2pix``), so any ``AP``/``BP`` inverse polynomials in a header are not used.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_SIP_ORDER = 5
NEWTON_ITERATIONS = 6  # few-pixel distortions converge to 1e-12 px in 3 or 4
RAD2DEG = 180.0 / np.pi


class WcsParams(NamedTuple):
    """Parameters of a TAN(-SIP) WCS; leading axes, if any, index images.

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
    """

    crpix0_px: jnp.ndarray
    crval_deg: jnp.ndarray
    lonpole_deg: jnp.ndarray
    cd_deg: jnp.ndarray
    sip_a: jnp.ndarray
    sip_b: jnp.ndarray


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


def parse_header(header, source: str = "wcs_header", max_sip_order: int = MAX_SIP_ORDER) -> WcsParams:
    """Read a celestial TAN or TAN-SIP WCS from FITS header text.

    Parameters
    ----------
    header : str or astropy.io.fits.Header
        Header text as written by ``WCS.to_header_string(relax=True)`` (80-character cards,
        with or without newlines), or a header.
    source : str
        Names the header in error messages (file and HDU, image id, ...).
    max_sip_order : int
        SIP arrays are padded to this order.

    Returns
    -------
    WcsParams
        Unbatched parameters (numpy float64 arrays).

    Raises
    ------
    ValueError
        For a projection other than TAN, swapped axes, non-degree units, a missing
        keyword, a singular CD matrix or a SIP order above ``max_sip_order``.
    """
    h = header_cards(header)
    ctype = (str(h.get("CTYPE1", "")).strip().upper(), str(h.get("CTYPE2", "")).strip().upper())
    if not (ctype[0].startswith("RA---TAN") and ctype[1].startswith("DEC--TAN")):
        raise ValueError(f"{source}: CTYPE1/2 = {ctype[0]!r}/{ctype[1]!r}; only RA---TAN(-SIP)/DEC--TAN(-SIP) is supported")
    for suffix in ctype:
        if suffix[8:] not in ("", "-SIP"):
            raise ValueError(f"{source}: unsupported distortion {suffix!r} (only SIP)")
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
    return WcsParams(crpix0, crval, np.float64(lonpole), cd, sip["A"], sip["B"])


def stack_wcs(headers: Sequence, sources: Sequence[str] | None = None, max_sip_order: int = MAX_SIP_ORDER) -> WcsParams:
    """Parse many headers into one batched ``WcsParams`` (leading axis = image).

    Parameters
    ----------
    headers : sequence of str or Header
        One WCS header per image.
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
        size = max_sip_order + 1
        return WcsParams(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0,)), np.zeros((0, 2, 2)),
                         np.zeros((0, size, size)), np.zeros((0, size, size)))
    return WcsParams(*(np.stack(field) for field in zip(*parts)))


def trim_sip(params: WcsParams) -> WcsParams:
    """The same WCSs with SIP arrays cut to the highest order any of them uses (work in the
    SIP polynomials grows with the square of the padded order)."""
    used = (np.asarray(params.sip_a) != 0) | (np.asarray(params.sip_b) != 0)
    size = used.shape[-1]
    orders = np.add.outer(np.arange(size), np.arange(size))
    order = int(orders[used.reshape(-1, size, size).any(axis=0)].max(initial=0))
    return params._replace(sip_a=params.sip_a[..., : order + 1, : order + 1],
                           sip_b=params.sip_b[..., : order + 1, : order + 1])


def take(params: WcsParams, index) -> WcsParams:
    """The WCSs at ``index`` of a batched ``WcsParams`` (numpy or JAX arrays)."""
    return WcsParams(*(f[index] for f in params))


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

    ``(U, V)`` are the pixel offsets from the reference pixel *before* undoing SIP
    distortion (exact for plain TAN), and ``w = d . radial`` is positive in front of the
    tangent plane. Building it once per image turns the projection of many directions
    into one matrix product.
    """
    east, north, radial = _tangent_basis(params.crval_deg)
    c, s = _pole_rotation(params.lonpole_deg)
    c, s = c[..., None], s[..., None]
    xi = RAD2DEG * (c * east - s * north)  # intermediate world x (deg) per unit w
    eta = RAD2DEG * (c * north + s * east)
    cd_inv = jnp.linalg.inv(params.cd_deg)
    rows_uv = cd_inv[..., :, 0:1] * xi[..., None, :] + cd_inv[..., :, 1:2] * eta[..., None, :]
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


def _sip_and_jacobian(params: WcsParams, u, v):
    """SIP terms f, g and their derivatives, as written-out sums over the coefficients with
    p + q <= order (elementwise work that fuses, rather than many tiny matrix products)."""
    order = params.sip_a.shape[-1] - 1
    a, b = params.sip_a, params.sip_b
    up = [jnp.ones_like(u)] + [None] * order
    vp = [jnp.ones_like(v)] + [None] * order
    for k in range(1, order + 1):
        up[k], vp[k] = up[k - 1] * u, vp[k - 1] * v
    zero = jnp.zeros_like(u)
    f = g = fu = fv = gu = gv = zero
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
    u, v = sip_undistort(params, h[..., 0] / w, h[..., 1] / w, n_iter)
    return params.crpix0_px[0] + u, params.crpix0_px[1] + v


def _world2pix(params: WcsParams, ra_deg, dec_deg, n_iter: int = NEWTON_ITERATIONS):
    return _direction2pix(params, unit_vector(ra_deg, dec_deg), n_iter)


def _pix2direction(params: WcsParams, x_px, y_px):
    du, dv = sip_distort(params, x_px - params.crpix0_px[0], y_px - params.crpix0_px[1])
    cd = params.cd_deg
    xi = (cd[0, 0] * du + cd[0, 1] * dv) / RAD2DEG
    eta = (cd[1, 0] * du + cd[1, 1] * dv) / RAD2DEG
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
    Newton iterations inverting the SIP distortion (static).

Returns
-------
x_px, y_px : array
    0-based pixel coordinates (NaN behind the tangent plane).
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
    """Upper bound of the SIP displacement ``|(f, g)|`` over each image, in pixels.

    ``sum_pq |A_pq| |u|max^p |v|max^q`` (and the same for B) over the image area: never
    below the true largest displacement, so a search may reject points farther than this
    from an image's plain-gnomonic footprint before inverting SIP.

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
    return np.hypot(f, g)


__all__ = [
    "MAX_SIP_ORDER", "WcsParams", "header_cards", "parse_header", "stack_wcs", "take", "trim_sip", "pixel_matrix", "sip_distort", "sip_undistort",
    "unit_vector", "world2pix", "direction2pix", "pix2world", "world2pix_batched", "pix2world_batched",
    "max_distortion_px",
]
