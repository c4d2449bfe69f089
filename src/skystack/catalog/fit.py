"""Fit the sources of one region: per-source variational inference, batched.

Each source is fitted twice, as a star and as a galaxy, by trust-region Newton on the
negative ELBO (``elbo.py``), many sources at once (``vmap``) on square patches (one per
image the source falls on, padded to a fixed image count) whose side follows the PSF and the
source's size (``patch_sizes_px``; one batch of compiled calls per size).
Neighbours within a region are handled by block-coordinate passes, as in Celeste: in each
pass every source is fitted with all other sources (region members and the halo at their
current estimates, the ring beyond at its given values, held fixed) rendered into its
patches as part of the background. Sources that share light get different colours of the
blend graph, and each colour is fitted with the colours before it already updated
(Gauss-Seidel); passes go on, for the sources that still move or whose neighbours do, until
no estimate moves by more than ``pass_tol_sd`` standard deviations. Isolated sources need
one pass. The halo, sources of
other regions near the region's edge, is fitted with the region but reported by its own
region, so that a source's neighbours are never frozen at their detection values.

Model mismatch: after the last pass each source's residuals are compared with the noise,
weighted by its own light (``_Scene.mismatch_chi2``, ``fit_chi2`` in the output); above 1 the
covariances are scaled by it and the type log-odds divided by it (a tempered posterior).

Type: ``q(star) = p(star) Z_star / sum_a p(a) Z_a`` where ``ln Z_a`` is the type's ELBO
plus the Laplace volume of its point-estimated parameters (position, shape). Without that
volume a galaxy, having four more free parameters, would always fit a little better.

Uncertainties: mean-field VI underestimates variances, so the reported standard
deviations come from the inverse of the negative ELBO's Hessian over all mean parameters of
the source (position, reference flux, colours and, for galaxies, shape): the Laplace /
linear-response covariance. That covariance is conditional on the neighbours' current
estimates; in a blend the flux, east and north variances are then scaled by the ratio of
marginal to conditional variance from the Gauss-Newton information of the whole blend group
(``blend_inflation``). Per-type results are combined as a two-component mixture.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from astropy.wcs.utils import proj_plane_pixel_scales

from . import elbo as E
from .data import ImageData, sky_to_pixel_jacobian
from .optimize import minimize_batch
from .priors import (
    MAG_TO_LN,
    NMGY_ZERO_MAG,
    color_names,
    merged_priors,
    reference_band_index,
    sort_bands,
    type_prior_arrays,
)

log = logging.getLogger(__name__)

LN_SD_INIT = np.log(0.1)
PAIR_REACH_PX = 12.0      # light of a source further than this outside a patch is ignored


# ----------------------------------------------------------------------------- objectives
@lru_cache(maxsize=None)
def _negative_elbo(layout: E.Layout, size_px: int):
    """The per-source objective for a type and patch size (cached: one jit per shape)."""

    def neg_elbo(x, patches, prior):
        return -E.elbo(x, patches, prior, layout, size_px)

    def value_grad_hess(x, patches, prior):
        f, g, h = E.elbo_value_grad_hess(x, patches, prior, layout, size_px)
        return -f, -g, -h

    neg_elbo.value_grad_hess = value_grad_hess
    return neg_elbo


@lru_cache(maxsize=None)
def _renderer(layout_s: E.Layout, layout_g: E.Layout, size_px: int):
    """Expected counts of sources (type mixture) on patches, batched over pairs."""

    def one(x_s, x_g, p_star, geom, band):
        out = []
        for x, lay in ((x_s, layout_s), (x_g, layout_g)):
            m, v = E.band_log_moments(x, lay)
            out.append(jnp.exp(m[band] + 0.5 * v[band]) * E.unit_profile(x, geom, lay, size_px))
        return p_star * out[0] + (1.0 - p_star) * out[1]

    return jax.jit(jax.vmap(one))


# ----------------------------------------------------------------------------- set-up
def _initial_vectors(table: pd.DataFrame, bands, ref, lay_s: E.Layout, lay_g: E.Layout, prior_s, prior_g):
    """Starting parameter vectors (star, galaxy) and type probabilities from a table."""
    n = len(table)
    ref_col = f"flux_{bands[ref]}_nmgy" if f"flux_{bands[ref]}_nmgy" in table else "flux_r_nmgy"
    f_ref = np.clip(np.nan_to_num(table[ref_col].to_numpy(float), nan=0.1), 1e-3, None)
    fluxes = np.stack([table[f"flux_{b}_nmgy"].to_numpy(float) if f"flux_{b}_nmgy" in table
                       else np.full(n, np.nan) for b in bands], -1)
    fluxes[:, ref] = f_ref
    xs = np.zeros((n, lay_s.size))
    xg = np.zeros((n, lay_g.size))
    for x, lay, prior in ((xs, lay_s, prior_s), (xg, lay_g, prior_g)):
        with np.errstate(invalid="ignore", divide="ignore"):  # a faint candidate's flux may be <= 0 in a band
            colors = np.log(fluxes[:, 1:] / fluxes[:, :-1]) if lay.n_colors else np.zeros((n, 0))
        colors = np.where(np.isfinite(colors), np.clip(colors, -3, 3), prior["color_mean"])
        x[:, lay.mu_ref] = np.log(f_ref)
        x[:, lay.colors] = colors
        x[:, lay.ln_sd_ref] = LN_SD_INIT
        x[:, lay.ln_sd_colors] = LN_SD_INIT
    radius = table["gal_radius_arcsec"].to_numpy(float) if "gal_radius_arcsec" in table else np.full(n, 1.0)
    q = table["gal_axis_ratio"].to_numpy(float) if "gal_axis_ratio" in table else np.full(n, 0.8)
    angle = np.radians(table["gal_angle_deg"].to_numpy(float)) if "gal_angle_deg" in table else np.zeros(n)
    fdev = table["gal_frac_dev"].to_numpy(float) if "gal_frac_dev" in table else np.full(n, 0.5)
    radius = np.clip(np.nan_to_num(radius, nan=1.0), 0.2, 20.0)
    q = np.clip(np.nan_to_num(q, nan=0.8), 0.1, 0.98)
    fdev = np.clip(np.nan_to_num(fdev, nan=0.5), 0.05, 0.95)
    angle = np.nan_to_num(angle)
    s = lay_g.shape.start
    xg[:, s] = np.log(fdev / (1 - fdev))
    xg[:, s + 1] = -np.log(q) * np.cos(2 * angle)
    xg[:, s + 2] = -np.log(q) * np.sin(2 * angle)
    xg[:, s + 3] = np.log(radius)
    if "p_star" in table:
        p = np.clip(np.nan_to_num(table["p_star"].to_numpy(float), nan=0.5), 0.0, 1.0)
    elif "is_star" in table:
        p = np.where(table["is_star"].to_numpy(bool), 0.9, 0.1)
    else:
        p = np.full(n, 0.5)
    return xs, xg, p


def _cut(padded: np.ndarray, pad: int, ix0: int, iy0: int, size: int) -> np.ndarray:
    return padded[iy0 + pad: iy0 + pad + size, ix0 + pad: ix0 + pad + size]


class _Scene:
    """Geometry of every source in every image, and the fixed-shape patch arrays."""

    def __init__(self, table, images: list[ImageData], bands, size_px: int, max_images: int | None):
        self.size = size_px
        half = size_px // 2
        ra, dec = table["ra"].to_numpy(float), table["dec"].to_numpy(float)
        fit_rows = np.flatnonzero(table["_fit"].to_numpy(bool))
        self.fit_rows = fit_rows
        self.xy, self.jac, self.near = [], [], []
        for im in images:
            xy, jac = sky_to_pixel_jacobian(im.wcs, ra, dec, shape_yx=im.shape)
            ny, nx = im.shape
            near = ((xy[:, 0] > -half - PAIR_REACH_PX) & (xy[:, 0] < nx - 1 + half + PAIR_REACH_PX)
                    & (xy[:, 1] > -half - PAIR_REACH_PX) & (xy[:, 1] < ny - 1 + half + PAIR_REACH_PX))
            self.xy.append(xy)
            self.jac.append(jac)
            self.near.append(near)
        k_psf = max(im.psf_at(*((np.array(im.shape[::-1]) - 1) / 2)).n_components for im in images)
        self.k_psf = k_psf
        # Which images each fitted source is fitted on: its position inside the image.
        slots = []
        for s in fit_rows:
            mine = [n for n, im in enumerate(images)
                    if -0.5 <= self.xy[n][s, 0] < im.shape[1] - 0.5 and -0.5 <= self.xy[n][s, 1] < im.shape[0] - 0.5]
            if max_images is not None:
                mine = mine[:max_images]
            slots.append(mine)
        self.slots = slots
        n_slot = max([len(m) for m in slots] + [1])
        n_slot = int(4 * np.ceil(n_slot / 4))
        self.n_slot = n_slot
        S, P = len(fit_rows), size_px
        band_index = {b: i for i, b in enumerate(bands)}
        self.band_index = band_index
        g = dict(origin=np.zeros((S, n_slot, 2)), jac=np.broadcast_to(np.eye(2), (S, n_slot, 2, 2)).copy(),
                 psf_amp=np.zeros((S, n_slot, k_psf)), psf_mean=np.zeros((S, n_slot, k_psf, 2)),
                 psf_cov=np.broadcast_to(np.eye(2), (S, n_slot, k_psf, 2, 2)).copy(),
                 counts_per_nmgy=np.ones((S, n_slot)), band=np.zeros((S, n_slot), np.int32),
                 data=np.zeros((S, n_slot, P, P)), weight=np.zeros((S, n_slot, P, P)),
                 bg=np.ones((S, n_slot, P, P)), var=np.ones((S, n_slot, P, P)),
                 gain=np.ones((S, n_slot)), poisson=np.ones((S, n_slot), bool), read_e2=np.zeros((S, n_slot)),
                 source_var_per_adu=np.zeros((S, n_slot)))
        self.corner = np.zeros((S, n_slot, 2), int)
        self.n_images = np.array([len(m) for m in slots])
        padded = {}
        for i, (s, mine) in enumerate(zip(fit_rows, slots)):
            for j, n in enumerate(mine):
                im = images[n]
                if n not in padded:
                    pad = P + 1
                    padded[n] = (pad, np.pad(im.pixels, pad, constant_values=np.nan),
                                 np.pad(im.sky_map(), pad), np.pad(im.variance_map(), pad, constant_values=1.0))
                pad, pix, sky, var = padded[n]
                x, y = self.xy[n][s]
                ix0, iy0 = int(np.floor(x + 0.5)) - half, int(np.floor(y + 0.5)) - half
                self.corner[i, j] = ix0, iy0
                mix = im.psf_at(x, y).padded(k_psf)
                g["origin"][i, j] = ix0 - x, iy0 - y
                g["jac"][i, j] = self.jac[n][s]
                g["psf_amp"][i, j], g["psf_mean"][i, j], g["psf_cov"][i, j] = mix.amp, mix.mean_px, mix.cov_px2
                g["counts_per_nmgy"][i, j] = im.counts_per_nmgy
                g["band"][i, j] = band_index[im.band]
                d = _cut(pix, pad, ix0, iy0, P).astype(float)
                ok = np.isfinite(d)
                g["data"][i, j] = np.where(ok, d, 0.0)
                g["weight"][i, j] = ok
                g["bg"][i, j] = np.where(ok, _cut(sky, pad, ix0, iy0, P), 1.0)
                g["var"][i, j] = np.where(ok, _cut(var, pad, ix0, iy0, P), 1.0)
                g["gain"][i, j] = im.gain
                g["poisson"][i, j] = not im.sky_subtracted
                g["read_e2"][i, j] = im.gain**2 * im.read_noise_var
                g["source_var_per_adu"][i, j] = 0.0 if im.noise_includes_sources else 1.0 / im.gain
        self.sky = g["bg"].copy()
        self.arrays = g
        self._pairs(table, images)

    def _pairs(self, table, images):
        """(fitted source slot, other source) pairs whose light reaches the slot's patch."""
        half = self.size // 2
        rows_i, rows_j, rows_t, origin, n_of = [], [], [], [], []
        for i, (s, mine) in enumerate(zip(self.fit_rows, self.slots)):
            for j, n in enumerate(mine):
                cand = np.flatnonzero(self.near[n])
                cand = cand[cand != s]
                if cand.size == 0:
                    continue
                ix0, iy0 = self.corner[i, j]
                xy = self.xy[n][cand]
                close = ((xy[:, 0] > ix0 - PAIR_REACH_PX) & (xy[:, 0] < ix0 + 2 * half + PAIR_REACH_PX)
                         & (xy[:, 1] > iy0 - PAIR_REACH_PX) & (xy[:, 1] < iy0 + 2 * half + PAIR_REACH_PX))
                for t in cand[close]:
                    rows_i.append(i), rows_j.append(j), rows_t.append(t), n_of.append(n)
                    origin.append((ix0 - self.xy[n][t, 0], iy0 - self.xy[n][t, 1]))
        self.pair_i, self.pair_j, self.pair_t = np.array(rows_i, int), np.array(rows_j, int), np.array(rows_t, int)
        self.n_pairs = len(rows_i)
        if not self.n_pairs:
            return
        m = self.n_pairs
        k = self.k_psf
        geom = dict(origin=np.array(origin), jac=np.zeros((m, 2, 2)), psf_amp=np.zeros((m, k)),
                    psf_mean=np.zeros((m, k, 2)), psf_cov=np.zeros((m, k, 2, 2)), counts_per_nmgy=np.zeros(m))
        band = np.zeros(m, np.int32)
        for q, (t, n) in enumerate(zip(rows_t, n_of)):
            im = images[n]
            mix = im.psf_at(*self.xy[n][t]).padded(k)
            geom["jac"][q] = self.jac[n][t]
            geom["psf_amp"][q], geom["psf_mean"][q], geom["psf_cov"][q] = mix.amp, mix.mean_px, mix.cov_px2
            geom["counts_per_nmgy"][q] = im.counts_per_nmgy
            band[q] = self.band_index[im.band]
        self.pair_geom, self.pair_band = geom, band

    def background(self, xs, xg, p_star, renderer) -> np.ndarray:
        """Sky plus every other source's expected counts on each fitted patch (ADU)."""
        bg = self.sky.copy()
        if not self.n_pairs:
            return bg
        out = self._pair_counts(xs, xg, p_star, renderer)
        add = np.zeros_like(bg)
        np.add.at(add, (self.pair_i, self.pair_j), out)
        w = self.arrays["weight"] > 0
        return np.where(w, bg + add, bg)

    def _own_counts(self, xs, xg, p_star, renderer) -> np.ndarray:
        """Each fitted source's own expected counts on its patches (S, n_slot, P, P), ADU."""
        g = self.arrays
        S, n_slot, P = len(self.fit_rows), self.n_slot, self.size
        m = S * n_slot
        m_pad = int(2 ** np.ceil(np.log2(max(m, 16))))
        idx = np.r_[np.arange(m), np.zeros(m_pad - m, int)]
        keys = ("origin", "jac", "psf_amp", "psf_mean", "psf_cov", "counts_per_nmgy")
        geom = {k: jnp.asarray(g[k].reshape((m,) + g[k].shape[2:])[idx]) for k in keys}
        src = np.repeat(self.fit_rows, n_slot)[idx]
        return np.asarray(renderer(jnp.asarray(xs[src]), jnp.asarray(xg[src]), jnp.asarray(p_star[src]), geom,
                                   jnp.asarray(g["band"].reshape(m)[idx])))[:m].reshape(S, n_slot, P, P)

    def _pair_counts(self, xs, xg, p_star, renderer) -> np.ndarray:
        """Per (slot, other source) pair, the other source's expected counts on the patch."""
        m = self.n_pairs
        m_pad = int(2 ** np.ceil(np.log2(max(m, 16))))
        idx = np.r_[np.arange(m), np.zeros(m_pad - m, int)]
        geom = {k: jnp.asarray(v[idx]) for k, v in self.pair_geom.items()}
        t = self.pair_t[idx]
        return np.asarray(renderer(jnp.asarray(xs[t]), jnp.asarray(xg[t]), jnp.asarray(p_star[t]), geom,
                                   jnp.asarray(self.pair_band[idx])))[:m]

    def _noise_variance(self, expected) -> np.ndarray:
        """Pixel noise variance (ADU^2) for the expected counts of every patch."""
        g = self.arrays
        gain = g["gain"][..., None, None]
        var_p = np.maximum(expected, 0.0) / gain + g["read_e2"][..., None, None] / gain**2
        var_g = g["var"] + g["source_var_per_adu"][..., None, None] * np.maximum(expected, 0.0)
        return np.maximum(np.where(g["poisson"][..., None, None], var_p, var_g), 1e-12)

    def mismatch_chi2(self, xs, xg, p_star, renderer) -> np.ndarray:
        """Per fitted source, the mean of (residual / noise)^2 over its patches weighted by its
        own expected counts over the noise variance: about 1 where the model describes the sky,
        above where the PSF, the profile or a neighbour does not (the residual is then
        systematic where the source's light is)."""
        g = self.arrays
        own = self._own_counts(xs, xg, p_star, renderer)
        bg = self.background(xs, xg, p_star, renderer)
        var = self._noise_variance(bg + own)
        resid = g["data"] - bg - own
        w = g["weight"] * np.maximum(own, 0.0) / var
        num = (w * resid**2 / var).sum(axis=(1, 2, 3))
        den = w.sum(axis=(1, 2, 3))
        return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)

    def blend_information(self, xs, xg, p_star, renderer):
        """Gauss-Newton Fisher blocks of each fitted source's (ln flux, east, north) from this
        scene's patches: per fitted source its own 3x3 block and, per pair with another
        source, the 3x3 cross block (rows: the fitted source's parameters), as table rows.

        Derivatives of the expected counts: ln flux by the counts themselves, east and north
        by central differences of the renderer (both types' positions moved together)."""
        w = self.arrays["weight"]
        own = [self._own_counts(a, b, p_star, renderer) for a, b in _position_steps(xs, xg)]
        var = self._noise_variance(self.background(xs, xg, p_star, renderer) + own[0])
        t_own = np.stack([own[0], *_central_differences(own)], axis=-1)  # (S, slot, P, P, 3)
        info = np.einsum("sjyxp,sjyxq->spq", t_own * (w / var)[..., None], t_own)
        if not self.n_pairs:
            return self.fit_rows, info, np.zeros(0, int), np.zeros(0, int), np.zeros((0, 3, 3))
        other = [self._pair_counts(a, b, p_star, renderer) for a, b in _position_steps(xs, xg)]
        t_other = np.stack([other[0], *_central_differences(other)], axis=-1)  # (pairs, P, P, 3)
        i, j = self.pair_i, self.pair_j
        cross = np.einsum("myxp,myxq->mpq", t_own[i, j] * (w[i, j] / var[i, j])[..., None], t_other)
        return self.fit_rows, info, self.fit_rows[i], self.pair_t, cross


#: Step (arcsec) of the central differences of the expected counts in position.
POSITION_STEP_ARCSEC = 0.01


def _position_steps(xs, xg):
    """The parameter vectors as fitted, then moved by +-POSITION_STEP_ARCSEC east, then north
    (east and north lead both types' vectors)."""
    out = [(xs, xg)]
    for axis in (0, 1):
        for sign in (1.0, -1.0):
            a, b = xs.copy(), xg.copy()
            a[:, axis] += sign * POSITION_STEP_ARCSEC
            b[:, axis] += sign * POSITION_STEP_ARCSEC
            out.append((a, b))
    return out


def _central_differences(counts):
    """d counts / d east, d north (per arcsec) from ``_position_steps``' renders."""
    h = 2 * POSITION_STEP_ARCSEC
    return (counts[1] - counts[2]) / h, (counts[3] - counts[4]) / h


# ----------------------------------------------------------------------------- fitting
def _fit_type(layout, scene: _Scene, x0, bg, prior, *, tol, max_iter, batch_size, vector_width, progress=None,
              subset=None, threads=None):
    """Batched TR-Newton fits of the scene's fitted sources (those at positions ``subset``, by
    default all) as one type; fixed chunk shapes."""
    fun = _negative_elbo(layout, scene.size)
    subset = np.arange(len(scene.fit_rows)) if subset is None else np.asarray(subset, int)
    S = len(subset)
    # A scene smaller than a batch gets the smallest power of two that holds it: padding costs
    # as much as a source, and powers of two keep the number of compilations small.
    batch_size = min(batch_size, max(8, 1 << max(S - 1, 0).bit_length()))
    prior_j = {k: jnp.asarray(v) for k, v in prior.items()}
    prior_b = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch_size,) + a.shape), prior_j)
    arrays = dict(scene.arrays, bg=bg)

    def fit_batch(start):
        idx = subset[start:start + batch_size]
        n_real = idx.size
        idx = np.r_[idx, np.full(batch_size - n_real, idx[0])]
        patches = {k: jnp.asarray(v[idx]) for k, v in arrays.items()}
        if n_real < batch_size:
            w = np.array(arrays["weight"][idx])
            w[n_real:] = 0.0
            patches["weight"] = jnp.asarray(w)
        x_start = x0[np.r_[np.arange(start, start + n_real), np.full(batch_size - n_real, start)]]
        res = minimize_batch(fun, jnp.asarray(x_start), (patches, prior_b), tol=tol, max_iter=max_iter,
                             radius0=0.5, max_radius=5.0, vector_width=vector_width)
        return (np.asarray(res.x)[:n_real], -np.asarray(res.value)[:n_real], np.asarray(res.hess)[:n_real],
                np.asarray(res.iterations)[:n_real], np.asarray(res.converged)[:n_real])

    # Batches are independent and each keeps about one core busy on a CPU (its operations are
    # small), so they run side by side, one per core; results do not depend on it.
    starts = list(range(0, S, batch_size))
    workers = min(len(starts), threads or _cpu_workers()) if jax.default_backend() == "cpu" else 1
    results = []
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        for start, res in zip(starts, pool.map(fit_batch, starts)):
            results.append(res)
            if progress is not None:
                progress(min(start + batch_size, S), S)
    out_x, out_f, out_h, out_it, out_conv = (list(r) for r in zip(*results)) if results else ([],) * 5
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,))  # noqa: E731
    return cat(out_x), cat(out_f), cat(out_h), cat(out_it), cat(out_conv)


def _cpu_workers() -> int:
    """Cores this process may use (the affinity mask, as Slurm sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _safe_inverse(h: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric matrix with eigenvalues floored (non-converged fits)."""
    w, v = np.linalg.eigh(h)
    floor = max(1e-10 * np.max(np.abs(w)), 1e-12)
    w = np.where(w > floor, w, np.maximum(np.abs(w), floor))
    return (v / w) @ v.T


def _laplace(layout: E.Layout, x, elbo_value, hess):
    """Log evidence with the point parameters' Laplace volume, and the mean-parameter covariance."""
    inv_full = _safe_inverse(hess)
    pt = layout.point_index
    block = inv_full[np.ix_(pt, pt)]
    sign, logdet = np.linalg.slogdet(block)
    log_z = elbo_value + 0.5 * (pt.size * np.log(2 * np.pi) + logdet)
    mi = layout.mean_index
    cov = _safe_inverse(hess[np.ix_(mi, mi)])
    return log_z, cov


#: Floor of the eigenvalues of a blend's normalised information matrix (it is assembled from
#: each source's own patches, so it can miss positive definiteness by a little): bounds how
#: much a blend can inflate a variance.
MIN_BLEND_EIGENVALUE = 0.05


def blend_inflation(n_rows: int, blocks: list) -> np.ndarray:
    """Per table row, how much its flux, east and north variances grow when its blend's other
    sources are free: (n_rows, 3) factors, 1 for sources without fitted neighbours.

    Each source's Laplace covariance is conditional on its neighbours' current estimates; where
    their light overlaps, their fluxes and positions trade against each other and the marginal
    variances are larger. With the Gauss-Newton information ``F`` of every blend group's
    (ln flux, east, north) (``_Scene.blend_information``), a source's factors are its marginal
    variances, the diagonal of ``(F^-1)_aa``, over its conditional ones, that of ``(F_aa)^-1``.
    """
    own = np.zeros((n_rows, 3, 3))
    fitted = np.zeros(n_rows, bool)
    cross = {}
    for rows, info, a_rows, b_rows, blocks_ab in blocks:
        own[rows] = info
        fitted[rows] = True
        for a, b, c in zip(a_rows, b_rows, blocks_ab):
            cross.setdefault((int(a), int(b)), []).append(c)
    factor = np.ones((n_rows, 3))
    usable = fitted & (np.einsum("nii->n", own) > 0) & np.all(np.diagonal(own, axis1=1, axis2=2) > 0, axis=1)
    edges = {}
    for (a, b), cs in cross.items():
        if a != b and usable[a] and usable[b]:
            edges.setdefault((min(a, b), max(a, b)), {})[(a, b)] = np.sum(cs, axis=0)
    if not edges:
        return factor
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = np.array(list(edges), int)
    graph = coo_matrix((np.ones(len(keys)), (keys[:, 0], keys[:, 1])), shape=(n_rows, n_rows))
    _, label = connected_components(graph, directed=False)
    edge_group = label[keys[:, 0]]
    for group in np.unique(edge_group):
        members = np.flatnonzero(label == group)
        pos = {r: k for k, r in enumerate(members)}
        big = np.zeros((3 * len(members),) * 2)
        for k, r in enumerate(members):
            big[3 * k:3 * k + 3, 3 * k:3 * k + 3] = own[r]
        for key in map(tuple, keys[edge_group == group]):
            a, b = key
            sides = edges[key]
            # Each side sees the overlap on its own patches: their mean (rows: a's parameters).
            sides = [m for m in (sides.get((a, b)), None if (b, a) not in sides else sides[(b, a)].T)
                     if m is not None]
            ab = np.mean(sides, axis=0)
            ia, ib = 3 * pos[a], 3 * pos[b]
            big[ia:ia + 3, ib:ib + 3] = ab
            big[ib:ib + 3, ia:ia + 3] = ab.T
        scale = 1.0 / np.sqrt(np.diagonal(big))
        corr = big * scale[:, None] * scale[None, :]
        w, vec = np.linalg.eigh(0.5 * (corr + corr.T))
        marginal = (vec / np.maximum(w, MIN_BLEND_EIGENVALUE)) @ vec.T * scale[:, None] * scale[None, :]
        for k, r in enumerate(members):
            block = corr[3 * k:3 * k + 3, 3 * k:3 * k + 3]
            wb, vb = np.linalg.eigh(block)
            s = scale[3 * k:3 * k + 3]
            conditional = (vb / np.maximum(wb, MIN_BLEND_EIGENVALUE)) @ vb.T * s[:, None] * s[None, :]
            m = marginal[3 * k:3 * k + 3, 3 * k:3 * k + 3]
            factor[r] = np.maximum(np.diagonal(m) / np.diagonal(conditional), 1.0)
    return factor


def _type_summary(layout: E.Layout, x, cov):
    """Means and variances of reported quantities for one type of one source."""
    nb = layout.n_bands
    signs = layout.band_signs
    ln_mean = x[layout.mu_ref] + signs @ x[layout.colors]
    ln_var_q = np.exp(2 * x[layout.ln_sd_ref]) + (signs**2) @ np.exp(2 * x[layout.ln_sd_colors])
    flux = np.exp(ln_mean + 0.5 * ln_var_q)
    # Mean-vector order: east, north, mu_ref, colours, shape.
    t = np.zeros((nb, cov.shape[0]))
    t[:, 2] = 1.0
    t[:, 3:3 + layout.n_colors] = signs
    ln_var = np.einsum("bi,ij,bj->b", t, cov, t)
    out = {"east": (x[0], cov[0, 0]), "north": (x[1], cov[1, 1])}
    for b in range(nb):
        out[f"flux{b}"] = (flux[b], flux[b] ** 2 * ln_var[b])
    for k in range(layout.n_colors):
        out[f"color{k}"] = (x[3 + k], cov[3 + k, 3 + k])
    return out


def _mix(p, a, b):
    """Mean and variance of a two-component mixture with weight p on a."""
    (ma, va), (mb, vb) = a, b
    mean = p * ma + (1 - p) * mb
    return mean, p * va + (1 - p) * vb + p * (1 - p) * (ma - mb) ** 2


#: New sources are not taken from the residuals closer than this many PSF FWHMs to a fitted
#: source, where a residual cannot be told from an error of that source's profile.
RESIDUAL_MIN_SEPARATION_FWHM = 0.5
#: Patch sides the region's patch size is rounded up to (one compilation per size).
PATCH_SIZES_PX = (15, 19, 23, 27, 31, 39, 47, 55, 63)
#: Floor of the type probabilities: a mismatch between the model and the sky (PSF, profile,
#: a neighbour) can make one type fit much better than the other without the sky's source
#: being of that type, so no catalog entry is more certain than this.
P_STAR_FLOOR = 1e-3


def patch_sizes_px(images: list[ImageData], table: pd.DataFrame, min_px: int = 15) -> np.ndarray:
    """Per source, the odd patch side (px) that holds it: 1.5 PSF FWHM (twice its half-light
    radius) plus 1.5 starting half-light radii (0 for a star candidate) on each side of the
    centre, at the coarsest PSF (px) and finest pixel scale among the images, rounded up to one of ``PATCH_SIZES_PX`` (one
    compilation per size) and at least ``min_px``."""
    # Twice the half-light radius: the FWHM for a Gaussian, not inflated by a Moffat's wings as
    # the second moment is.
    fwhm_px = max(2.0 * im.psf_r50_px() for im in images)
    scale = min(float(np.mean(proj_plane_pixel_scales(im.wcs))) * 3600.0 for im in images)
    n = len(table)
    radius = table["gal_radius_arcsec"].to_numpy(float) if "gal_radius_arcsec" in table else np.zeros(n)
    if "is_star" in table:
        radius = np.where(table["is_star"].to_numpy(bool), 0.0, radius)
    r_px = np.nan_to_num(radius, nan=0.0) / scale
    side = np.maximum(2 * np.ceil(1.5 * fwhm_px + 1.5 * r_px).astype(int) + 1, min_px)
    buckets = np.array(PATCH_SIZES_PX + (max(PATCH_SIZES_PX[-1], min_px + (min_px + 1) % 2),))
    return buckets[np.searchsorted(buckets, np.minimum(side, buckets[-1]))]


def fit_region(sources: pd.DataFrame, neighbours: pd.DataFrame | None, images: list[ImageData],
               priors: dict | None = None, *, tol: float = 1e-5, max_iter: int = 50, n_passes: int = 12,
               pass_tol_sd: float = 0.05,
               patch_px: int | None = 15, batch_size: int = 64, vector_width: int | None = None,
               max_images: int | None = None, region: int = -1, progress=None,
               halo: pd.DataFrame | None = None, threads: int | None = None, detect_residuals: bool = True,
               residual_trials_factor: float = 1.0, margin_arcsec: float = 15.0) -> pd.DataFrame:
    """Catalog of the sources of one region.

    Parameters
    ----------
    sources : candidates to fit: ``ra``, ``dec`` (deg), ``flux_r_nmgy`` at least; optional
        ``flux_<band>_nmgy``, ``p_star`` or ``is_star``, ``gal_radius_arcsec``,
        ``gal_axis_ratio``, ``gal_angle_deg``, ``gal_frac_dev`` as starting values
    neighbours : sources of other regions near this one (same columns), rendered at their
        given values and held fixed; may be None or empty
    images : every image overlapping the region (all bands, all epochs)
    priors : overrides of ``priors.DEFAULT_PRIORS``
    tol : Newton-decrement tolerance (nats) of the trust-region Newton iterations
    max_iter : iteration limit per fit; sources not converged by then are flagged
    n_passes : most block-coordinate passes over the region (1 when no source overlaps another);
        after the first, only sources that moved, or whose neighbours moved, by more than
        ``pass_tol_sd`` are refitted, and the passes end when none did
    pass_tol_sd : a change of ln flux, east or north below this many standard deviations
        (the type mixture's weighted change) counts as converged
    patch_px : smallest side (odd, px) of the square patch fitted around a source in each
        image; the side used per source is :func:`patch_sizes_px` (from the PSF and its size)
    batch_size : sources per compiled call (fixed, so one compilation serves all)
    vector_width : sources fitted side by side within a call (None: 1 on CPU, the whole
        batch on accelerators)
    max_images : use at most this many images per source (None: all)
    region : region id written to the output
    progress : optional callable taking a message, called after each batch of sources
    halo : sources of other regions near this one that are fitted with the region (so that
        the region's sources see their neighbours' current estimates, not their starting
        values) but not reported; ``neighbours`` then are the ring beyond them
    threads : batches fitted side by side on a CPU (None: one per core of the process's
        affinity mask); the results do not depend on it
    detect_residuals : after the passes, search the residual images (pixels minus the model of
        every source) with the joint matched filter (``detect.residual_candidates``), add the
        point-source candidates found there, and refit them with the sources their light
        reaches: a source on the flank of a brighter one, whose matched-filter peak the first
        detection could not separate, is then fitted instead of being absorbed by it. A new
        source belongs to the region whose input source is nearest it (the halo's are fitted
        here but reported by their own region), and is taken only within ``margin_arcsec`` of
        that source, where every detected source near it is in the model
    residual_trials_factor : the residual search's threshold counts the beams of this many
        regions (the survey's number), so that all regions together admit at most
        ``detect.MF_MAX_NOISE_PEAKS`` noise peaks
    margin_arcsec : the margin within which ``halo`` was chosen (sources of other regions within
        it of the region's; ``neighbours`` within twice it)

    Returns
    -------
    DataFrame, one row per source of ``sources`` in input order, then one per source found in the
    residuals (``found_in_residuals``; see ``catalog.OUTPUT_COLUMNS``).
    The reported standard deviations are the Laplace ones times ``sqrt(fit_chi2)`` where the
    fit's residuals exceed the noise (``fit_chi2 > 1``), and the type log-odds are divided by it
    (a tempered posterior), then floored at ``P_STAR_FLOOR``.
    """
    if patch_px is not None and patch_px % 2 == 0:
        raise ValueError("patch_px must be odd")
    bands = sort_bands(im.band for im in images)
    n_fit = len(sources)
    if n_fit == 0 or not images:
        return empty_catalog(bands)
    halo = halo if halo is not None else sources.iloc[:0]
    neighbours = neighbours if neighbours is not None else sources.iloc[:0]
    n_src, n_halo = len(sources), len(halo)
    table = pd.concat([sources.assign(_fit=True, _new=False), halo.assign(_fit=True, _new=False),
                       neighbours.assign(_fit=False, _new=False)], ignore_index=True)
    ref = reference_band_index(bands)
    lay_s, lay_g = E.Layout(len(bands), ref, False), E.Layout(len(bands), ref, True)
    prior_s = type_prior_arrays(priors, bands, "star")
    prior_g = type_prior_arrays(priors, bands, "galaxy")
    p_prior = float(merged_priors(priors)["p_star"])
    if vector_width is None:
        vector_width = 1 if jax.default_backend() == "cpu" else batch_size
    fit = _RegionFit(table, images, bands, lay_s, lay_g, prior_s, prior_g, p_prior, patch_px=patch_px or 15,
                     max_images=max_images, fit_kw=dict(tol=tol, max_iter=max_iter, batch_size=batch_size,
                                                        vector_width=vector_width, threads=threads))
    _warn_masked_patches(sources, fit.scenes)
    fit.run_passes(fit.fitted.copy(), n_passes, pass_tol_sd, progress)
    if detect_residuals:
        new = fit.residual_sources(n_src, n_halo, margin_arcsec, trials_factor=residual_trials_factor)
        if len(new):
            members = new["_owner"].to_numpy() == "member"
            n_mine = int(members.sum())
            (progress or log.info)(f"region {region}: {len(new)} source(s) found in the residuals of the fit "
                                   f"({n_mine} of the region, {len(new) - n_mine} of its halo); refitting them with "
                                   "the sources their light reaches")
            new = new.drop(columns="_owner").assign(_fit=True, _new=True)
            parts = [table.iloc[:n_src], new[members], table.iloc[n_src:n_src + n_halo], new[~members],
                     table.iloc[n_src + n_halo:]]
            old_rows = [np.arange(n_src), None, np.arange(n_src, n_src + n_halo), None,
                        np.arange(n_src + n_halo, len(table))]
            fit.extend(parts, old_rows)
            n_src += int(members.sum())
            table = fit.table
            reached = np.asarray(fit.partners @ fit.is_new.astype(float)).ravel() > 0
            fit.run_passes(fit.fitted & (fit.is_new | reached), n_passes, pass_tol_sd, progress)
    return fit.catalog(table.iloc[:n_src], n_src, region)


class _RegionFit:
    """The state of one region's fit: the table of sources (fitted, halo, fixed ring), their
    per-type parameter vectors and results, type log-odds, and the scenes (one per patch size)."""

    def __init__(self, table, images, bands, lay_s, lay_g, prior_s, prior_g, p_prior, *, patch_px, max_images, fit_kw):
        self.images, self.bands, self.lay_s, self.lay_g = images, bands, lay_s, lay_g
        self.prior_s, self.prior_g, self.p_prior = prior_s, prior_g, p_prior
        self.patch_px, self.max_images, self.fit_kw = patch_px, max_images, fit_kw
        ref = reference_band_index(bands)
        self.xs, self.xg, self.p_star = _initial_vectors(table, bands, ref, lay_s, lay_g, prior_s, prior_g)
        n = len(table)
        self.res_s, self.res_g = _Results(n, lay_s.size), _Results(n, lay_g.size)
        self.log_odds = np.zeros(n)
        self._set_table(table)

    def _set_table(self, table) -> None:
        self.table = table
        self.fitted = table["_fit"].to_numpy(bool)
        self.is_new = table["_new"].to_numpy(bool)
        # One scene per patch size: each fits its own sources, all see every source's current light.
        self.sizes = patch_sizes_px(self.images, table, self.patch_px)
        self.scenes = [_Scene(table.assign(_fit=self.fitted & (self.sizes == size)), self.images, self.bands,
                              int(size), self.max_images) for size in np.unique(self.sizes[self.fitted])]
        self.partners = _partners(len(table), self.scenes)
        # Gauss-Seidel over colours of the blend graph: sources of one colour never share light, so
        # they are fitted together, and each colour sees the ones fitted before it in the pass
        # (twice Jacobi's convergence rate on a pair).
        self.colour = _colours(self.partners, table["dec"].to_numpy(float), table["ra"].to_numpy(float), self.fitted)
        self.blended = any(sc.n_pairs for sc in self.scenes)

    def run_passes(self, active, n_passes: int, pass_tol_sd: float, progress) -> None:
        """Block-coordinate passes over the ``active`` rows until no estimate moves by more than
        ``pass_tol_sd`` (one pass where no source shares light with another)."""
        passes = n_passes if self.blended else 1
        self.multi_pass = passes > 1
        lay_s, lay_g, xs, xg, p_star = self.lay_s, self.lay_g, self.xs, self.xg, self.p_star
        n_rows = len(self.table)
        for n_pass in range(1, passes + 1):
            moved = np.zeros(n_rows)
            for c in range(int(self.colour.max()) + 1 if self.fitted.any() else 0):
                for sc in self.scenes:
                    def report(kind, size=sc.size, n_pass=n_pass):
                        if progress is None:
                            return None
                        return lambda done, total: progress(f"pass {n_pass}/{passes}, {kind} model ({size} px "
                                                            f"patches): {done}/{total} sources")

                    local = np.flatnonzero(active[sc.fit_rows] & (self.colour[sc.fit_rows] == c))
                    if local.size == 0:
                        continue
                    renderer = _renderer(lay_s, lay_g, sc.size)
                    rows = sc.fit_rows[local]
                    bg = sc.background(xs, xg, p_star, renderer)
                    rs = _fit_type(lay_s, sc, xs[rows], bg, self.prior_s, progress=report("star"), subset=local,
                                   **self.fit_kw)
                    rg = _fit_type(lay_g, sc, xg[rows], bg, self.prior_g, progress=report("galaxy"), subset=local,
                                   **self.fit_kw)
                    self.res_s.store(rows, rs)
                    self.res_g.store(rows, rg)
                    for k, row in enumerate(rows):
                        lz_s, _ = _laplace(lay_s, rs[0][k], rs[1][k], rs[2][k])
                        lz_g, _ = _laplace(lay_g, rg[0][k], rg[1][k], rg[2][k])
                        self.log_odds[row] = lz_s - lz_g + np.log(self.p_prior / (1 - self.p_prior))
                    p_new = _sigmoid(self.log_odds[rows])
                    for res, x, lay, weight in ((self.res_s, xs, lay_s, p_new), (self.res_g, xg, lay_g, 1.0 - p_new)):
                        moved[rows] += weight * _change_in_sd(lay, x[rows], res.x[rows], res.hess[rows])
                        x[rows] = res.x[rows]
                    p_star[rows] = p_new
            # A source is refitted while it or a source whose light reaches its patches still moves.
            still = moved > pass_tol_sd
            active = self.fitted & (still | (self.partners @ still.astype(float) > 0))
            if not active.any():
                break

    def residual_sources(self, n_src: int, n_halo: int, margin_arcsec: float, trials_factor: float = 1.0
                         ) -> pd.DataFrame:
        """Candidates found in the residuals of the fit so far (``detect.residual_candidates``) on
        cutouts of the images around the fitted sources, each with its ``_owner``: "member" where
        the nearest source of the input table is the region's own, "halo" where it is a halo
        source (another region reports it; this one fits it as a neighbour). Peaks nearest the
        fixed ring, farther than ``margin_arcsec`` from the nearest input source (the cutouts'
        corners hold sources of other regions that are not in the model), or within
        ``RESIDUAL_MIN_SEPARATION_FWHM`` of a source are left out, and so are peaks with a twin at
        their reflection through the nearest brighter source (``detect.residual_candidates``)."""
        from .detect import candidate_columns, residual_candidates

        table = self.table
        cutouts = []
        ra, dec = table["ra"].to_numpy(float), table["dec"].to_numpy(float)
        fitted = self.fitted
        for im in self.images:
            xy, _ = sky_to_pixel_jacobian(im.wcs, ra[fitted], dec[fitted], shape_yx=im.shape)
            ok = np.all(np.isfinite(xy), axis=1)
            if not ok.any():
                continue
            reach = int(np.ceil(max(self.sizes[fitted]))) + 1
            ny, nx = im.shape
            x0, y0 = (max(int(np.floor(v.min())) - reach, 0) for v in (xy[ok, 0], xy[ok, 1]))
            x1 = min(int(np.ceil(xy[ok, 0].max())) + reach + 1, nx)
            y1 = min(int(np.ceil(xy[ok, 1].max())) + reach + 1, ny)
            if x1 - x0 < 8 or y1 - y0 < 8:
                continue
            cutouts.append(im.cutout(x0, x1, y0, y1))
        if not cutouts:
            return pd.DataFrame(columns=list(candidate_columns(self.bands)) + ["_owner"])
        # Rendered on squares twice the fitted side: a model cut at the patch leaves its wings.
        big = np.array(PATCH_SIZES_PX)[np.minimum(np.searchsorted(PATCH_SIZES_PX, 2 * self.sizes),
                                                  len(PATCH_SIZES_PX) - 1)]
        models = model_images(table, self.xs, self.xg, self.p_star, cutouts, self.lay_s, self.lay_g, big)
        min_images = 3 if len(self.images) >= 3 else 1
        new, _ = residual_candidates(cutouts, models, min_images=min_images, trials_factor=trials_factor,
                                     parents=self._brighter_neighbour)
        if not len(new):
            return new.assign(_owner=pd.Series(dtype=str))
        # Ownership by the input table's positions, which every region holding the source shares.
        from scipy.spatial import cKDTree

        from ..core.bisection import chord, unit_vectors

        tree = cKDTree(unit_vectors(ra, dec))
        gap, nearest = tree.query(unit_vectors(new["ra"].to_numpy(float), new["dec"].to_numpy(float)))
        owner = np.where(nearest < n_src, "member", np.where(nearest < n_src + n_halo, "halo", "ring"))
        fwhm_arcsec = float(np.median([2.0 * im.psf_r50_px() * float(np.mean(proj_plane_pixel_scales(im.wcs))) * 3600.0
                                       for im in self.images]))
        now_ra, now_dec, _ = self._positions_and_fluxes()
        close, _ = cKDTree(unit_vectors(now_ra, now_dec)).query(
            unit_vectors(new["ra"].to_numpy(float), new["dec"].to_numpy(float)),
            distance_upper_bound=chord(RESIDUAL_MIN_SEPARATION_FWHM * fwhm_arcsec))
        keep = (owner != "ring") & (gap <= chord(margin_arcsec)) & ~np.isfinite(close)
        return new[keep].assign(_owner=owner[keep]).reset_index(drop=True)

    def _positions_and_fluxes(self):
        """Current (ra, dec) (deg) and reference-band flux (nmgy) of every row (type mixture)."""
        ra, dec = self.table["ra"].to_numpy(float), self.table["dec"].to_numpy(float)
        p = self.p_star
        east = p * self.xs[:, 0] + (1 - p) * self.xg[:, 0]
        north = p * self.xs[:, 1] + (1 - p) * self.xg[:, 1]
        flux = p * np.exp(self.xs[:, self.lay_s.mu_ref]) + (1 - p) * np.exp(self.xg[:, self.lay_g.mu_ref])
        now_dec = dec + north / 3600.0
        return (ra + east / 3600.0 / np.cos(np.radians(dec))) % 360.0, now_dec, flux

    def _brighter_neighbour(self, peaks: pd.DataFrame):
        """Per residual peak, the centre (ra, dec) of the nearest source brighter than it in the
        reference band within a patch's reach (``PAIR_REACH_PX`` beyond the largest patch); NaN
        where none."""
        from scipy.spatial import cKDTree

        from ..core.bisection import chord, unit_vectors

        ra, dec, flux = self._positions_and_fluxes()
        peak_flux = np.nan_to_num(peaks[f"flux_{self.bands[reference_band_index(self.bands)]}_nmgy"].to_numpy(float))
        out_ra, out_dec = np.full(len(peaks), np.nan), np.full(len(peaks), np.nan)
        scale = min(float(np.mean(proj_plane_pixel_scales(im.wcs))) * 3600.0 for im in self.images)
        pts = unit_vectors(peaks["ra"].to_numpy(float), peaks["dec"].to_numpy(float))
        rows = unit_vectors(ra, dec)
        for k, near in enumerate(cKDTree(rows).query_ball_point(pts, chord((max(self.sizes) + PAIR_REACH_PX) * scale))):
            near = [j for j in near if flux[j] > peak_flux[k]]
            if near:
                j = near[int(np.argmin(np.sum((rows[near] - pts[k]) ** 2, axis=1)))]
                out_ra[k], out_dec[k] = ra[j], dec[j]
        return out_ra, out_dec

    def extend(self, parts, old_rows) -> None:
        """Rebuild the table from ``parts`` (data frames; ``old_rows[k]`` the rows of the present
        table each holds, None for new sources), keeping the fitted state of the old rows."""
        table = pd.concat(parts, ignore_index=True)
        ref = reference_band_index(self.bands)
        xs, xg, p = _initial_vectors(table, self.bands, ref, self.lay_s, self.lay_g, self.prior_s, self.prior_g)
        res_s, res_g = _Results(len(table), self.lay_s.size), _Results(len(table), self.lay_g.size)
        log_odds = np.zeros(len(table))
        at = 0
        for part, old in zip(parts, old_rows):
            new_rows = np.arange(at, at + len(part))
            at += len(part)
            if old is None or not len(part):
                continue
            xs[new_rows], xg[new_rows], p[new_rows] = self.xs[old], self.xg[old], self.p_star[old]
            log_odds[new_rows] = self.log_odds[old]
            for mine, theirs in ((res_s, self.res_s), (res_g, self.res_g)):
                mine.x[new_rows], mine.elbo[new_rows] = theirs.x[old], theirs.elbo[old]
                mine.hess[new_rows] = theirs.hess[old]
                mine.iterations[new_rows], mine.converged[new_rows] = theirs.iterations[old], theirs.converged[old]
        self.xs, self.xg, self.p_star, self.res_s, self.res_g, self.log_odds = xs, xg, p, res_s, res_g, log_odds
        self._set_table(table)

    def catalog(self, sources, n: int, region: int) -> pd.DataFrame:
        """The output table of the first ``n`` rows (the region's sources)."""
        n_rows = len(self.table)
        chi2 = np.ones(n_rows)
        n_images = np.zeros(n_rows, int)
        overlaps = []
        for sc in self.scenes:
            renderer = _renderer(self.lay_s, self.lay_g, sc.size)
            chi2[sc.fit_rows] = sc.mismatch_chi2(self.xs, self.xg, self.p_star, renderer)
            n_images[sc.fit_rows] = sc.n_images
            if self.multi_pass:
                overlaps.append(sc.blend_information(self.xs, self.xg, self.p_star, renderer))
        blend = blend_inflation(n_rows, overlaps)  # (rows, [flux, east, north])
        temper = np.maximum(chi2, 1.0)
        p_final = P_STAR_FLOOR + (1 - 2 * P_STAR_FLOOR) * _sigmoid(self.log_odds / temper)
        res_s, res_g = self.res_s, self.res_g
        out = _assemble(sources, self.bands, self.lay_s, self.lay_g, res_s.head(n), res_g.head(n), p_final[:n],
                        self.p_prior, n_images[:n], region, chi2[:n],
                        np.maximum(res_s.iterations, res_g.iterations)[:n], blend[:n])
        out["found_in_residuals"] = self.is_new[:n]
        return out


def model_images(table: pd.DataFrame, xs, xg, p_star, images: list[ImageData], lay_s: E.Layout, lay_g: E.Layout,
                 sizes_px) -> list[np.ndarray]:
    """Per image, the expected counts (ADU, sky excluded) of every source of ``table`` (the type
    mixture at parameters ``xs``, ``xg``, ``p_star``), each rendered on a square of side
    ``sizes_px`` (one of ``PATCH_SIZES_PX``) around it, clipped to the image; one compiled call
    per side for all images."""
    bands = sort_bands(im.band for im in images)
    band_index = {b: i for i, b in enumerate(bands)}
    ra, dec = table["ra"].to_numpy(float), table["dec"].to_numpy(float)
    sizes_px = np.asarray(sizes_px, int)
    k = max(im.psf_at(*((np.array(im.shape[::-1]) - 1) / 2)).n_components for im in images)
    out = [np.zeros(im.shape) for im in images]
    pairs = {int(size): [] for size in np.unique(sizes_px)}   # per side: (image, row, xy, jac)
    for n, im in enumerate(images):
        ny, nx = im.shape
        xy, jac = sky_to_pixel_jacobian(im.wcs, ra, dec, shape_yx=im.shape)
        half = sizes_px // 2
        near = np.flatnonzero((xy[:, 0] > -half) & (xy[:, 0] < nx - 1 + half) & (xy[:, 1] > -half)
                              & (xy[:, 1] < ny - 1 + half))
        for r in near:
            pairs[int(sizes_px[r])].append((n, r, xy[r], jac[r]))
    for size, todo in pairs.items():
        for start in range(0, len(todo), RENDER_CHUNK):
            _paste(out, images, todo[start:start + RENDER_CHUNK], size, k, band_index, xs, xg, p_star, lay_s, lay_g)
    return out


#: (source, image) pairs rendered per compiled call of ``model_images`` (a fixed shape, padded).
RENDER_CHUNK = 512


def _paste(out, images, todo, size, k, band_index, xs, xg, p_star, lay_s, lay_g) -> None:
    """Render the (image, row, xy, jac) pairs ``todo`` on squares of side ``size`` and add them
    to the images' arrays ``out``."""
    m = len(todo)
    m_pad = RENDER_CHUNK if m > RENDER_CHUNK // 4 else int(2 ** np.ceil(np.log2(max(m, 16))))
    geom = dict(origin=np.zeros((m_pad, 2)), jac=np.broadcast_to(np.eye(2), (m_pad, 2, 2)).copy(),
                psf_amp=np.zeros((m_pad, k)), psf_mean=np.zeros((m_pad, k, 2)),
                psf_cov=np.broadcast_to(np.eye(2), (m_pad, k, 2, 2)).copy(), counts_per_nmgy=np.zeros(m_pad))
    band = np.zeros(m_pad, np.int32)
    rows = np.zeros(m_pad, int)
    corner = np.zeros((m, 2), int)
    for q, (n, r, xy, jac) in enumerate(todo):
        im = images[n]
        mix = im.psf_at(*xy).padded(k)
        corner[q] = np.floor(xy + 0.5).astype(int) - size // 2
        geom["origin"][q], geom["jac"][q] = corner[q] - xy, jac
        geom["psf_amp"][q], geom["psf_mean"][q], geom["psf_cov"][q] = mix.amp, mix.mean_px, mix.cov_px2
        geom["counts_per_nmgy"][q], band[q], rows[q] = im.counts_per_nmgy, band_index[im.band], r
    counts = np.asarray(_renderer(lay_s, lay_g, size)(
        jnp.asarray(xs[rows]), jnp.asarray(xg[rows]), jnp.asarray(p_star[rows]),
        {key: jnp.asarray(v) for key, v in geom.items()}, jnp.asarray(band)))[:m]
    for (n, _, _, _), (x0, y0), patch in zip(todo, corner, counts):
        ny, nx = images[n].shape
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, nx), min(y0 + size, ny)
        if xa < xb and ya < yb:
            out[n][ya:yb, xa:xb] += patch[ya - y0:yb - y0, xa - x0:xb - x0]


def _partners(n_rows: int, scenes: list):
    """Sparse (rows x rows) matrix: entry (a, t) where source t's light reaches a's patches."""
    from scipy.sparse import csr_matrix

    a = np.concatenate([sc.fit_rows[sc.pair_i] for sc in scenes if sc.n_pairs] or [np.zeros(0, int)])
    t = np.concatenate([sc.pair_t for sc in scenes if sc.n_pairs] or [np.zeros(0, int)])
    return csr_matrix((np.ones(len(a)), (a, t)), shape=(n_rows, n_rows))


def _colours(partners, dec_deg, ra_deg, fitted) -> np.ndarray:
    """Greedy colouring of the fitted sources' blend graph (sources sharing light get different
    colours), in (dec, ra) order so that it does not depend on the table's order."""
    graph = (partners + partners.T).tocsr()
    colour = np.full(len(dec_deg), -1)
    for row in np.lexsort((ra_deg, dec_deg)):
        if not fitted[row]:
            continue
        near = graph.indices[graph.indptr[row]:graph.indptr[row + 1]]
        taken = set(colour[near][colour[near] >= 0].tolist())
        colour[row] = next(c for c in range(len(taken) + 1) if c not in taken)
    return colour


def _change_in_sd(layout: E.Layout, before, after, hess) -> np.ndarray:
    """Per source, the largest change of east, north and reference ln flux between two passes,
    in units of the Laplace standard deviation (diagonal of the inverse Hessian)."""
    which = np.array([0, 1, layout.mu_ref])
    out = np.zeros(len(before))
    for k in range(len(before)):
        sd = np.sqrt(np.maximum(np.diagonal(_safe_inverse(hess[k]))[which], 1e-300))
        out[k] = np.max(np.abs(after[k][which] - before[k][which]) / sd)
    return out


class _Results:
    """Per-row results of one type's fits: parameters, ELBO, Hessian, iterations, convergence."""

    def __init__(self, n_rows: int, size: int):
        self.x = np.zeros((n_rows, size))
        self.elbo = np.zeros(n_rows)
        self.hess = np.zeros((n_rows, size, size))
        self.iterations = np.zeros(n_rows, int)
        self.converged = np.zeros(n_rows, bool)

    def store(self, rows, result) -> None:
        x, f, h, it, conv = result
        self.x[rows], self.elbo[rows], self.hess[rows], self.converged[rows] = x, f, h, conv
        self.iterations[rows] += it

    def head(self, n: int):
        return self.x[:n], self.elbo[:n], self.hess[:n], self.iterations[:n], self.converged[:n]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))


#: Below this fraction of usable (unmasked, unsaturated) pixels in its patches a source's fit
#: is said to be weakly constrained.
MIN_USABLE_FRACTION = 0.5


def _warn_masked_patches(sources: pd.DataFrame, scenes: list) -> None:
    """Warn about sources whose patches are mostly masked (a saturated core and bleed trail,
    bad columns, the image edge): their fluxes and types rest on the few pixels left, so they
    are fitted and kept, and said so."""
    n = len(sources)
    frac = np.ones(n)
    size = np.zeros(n, int)
    for sc in scenes:
        rows = sc.fit_rows
        mine = rows < n
        n_pix = sc.n_images[mine] * sc.size**2
        usable = sc.arrays["weight"][mine].sum(axis=(1, 2, 3))
        frac[rows[mine]] = np.where(n_pix > 0, usable / np.maximum(n_pix, 1), 0.0)
        size[rows[mine]] = sc.size
    weak = np.flatnonzero(frac < MIN_USABLE_FRACTION)
    if weak.size:
        ra, dec = sources["ra"].to_numpy(float), sources["dec"].to_numpy(float)
        shown = ", ".join(f"({ra[i]:.5f}, {dec[i]:.5f}): {100 * frac[i]:.0f}% of {size[i]} px" for i in weak[:5])
        log.warning("%d source(s) have under %.0f%% usable pixels in their patches (masked, saturated or off "
                    "the image), so their fluxes, shapes and types are weakly constrained: %s%s", weak.size,
                    100 * MIN_USABLE_FRACTION, shown, " ..." if weak.size > 5 else "")


def _assemble(sources, bands, lay_s, lay_g, rs, rg, p_star, p_prior, n_images, region, chi2,
              iterations, blend) -> pd.DataFrame:
    n = len(sources)
    colors = color_names(bands)
    rows = []
    ra0, dec0 = sources["ra"].to_numpy(float), sources["dec"].to_numpy(float)
    for i in range(n):
        p = float(p_star[i])
        _, cov_s = _laplace(lay_s, rs[0][i], rs[1][i], rs[2][i])
        _, cov_g = _laplace(lay_g, rg[0][i], rg[1][i], rg[2][i])
        inflate = max(float(chi2[i]), 1.0)  # residuals above the noise: the model is off by that much
        cov_s, cov_g = cov_s * inflate, cov_g * inflate
        ss, sg = _type_summary(lay_s, rs[0][i], cov_s), _type_summary(lay_g, rg[0][i], cov_g)
        for summary in (ss, sg):  # the blend's other sources free (``blend_inflation``)
            for key in [f"flux{b}" for b in range(len(bands))] + ["east", "north"]:
                mean, var = summary[key]
                summary[key] = (mean, var * blend[i, {"east": 1, "north": 2}.get(key, 0)])
        mixed = {k: _mix(p, ss[k], sg[k]) for k in ss}
        east, north = mixed["east"][0], mixed["north"][0]
        dec = dec0[i] + north / 3600.0
        ra = (ra0[i] + east / 3600.0 / np.cos(np.radians(dec0[i]))) % 360.0
        row = {"ra": ra, "dec": dec, "ra_sd": np.sqrt(mixed["east"][1]), "dec_sd": np.sqrt(mixed["north"][1]),
               "p_star": p}
        for b, name in enumerate(bands):
            f, v = mixed[f"flux{b}"]
            row[f"flux_{name}_nmgy"] = f
            row[f"flux_{name}_sd_nmgy"] = np.sqrt(v)
            row[f"mag_{name}"] = NMGY_ZERO_MAG - 2.5 * np.log10(f) if f > 0 else np.nan
        for k, name in enumerate(colors):
            c, v = mixed[f"color{k}"]
            row[f"color_{name}"] = c / MAG_TO_LN
            row[f"color_{name}_sd"] = np.sqrt(v) / MAG_TO_LN
        lf, u1, u2, ln_r = rg[0][i][lay_g.shape]
        row["gal_frac_dev"] = 1.0 / (1.0 + np.exp(-lf))
        row["gal_axis_ratio"] = float(np.exp(-np.hypot(u1, u2)))
        row["gal_angle_deg"] = float(np.degrees(0.5 * np.arctan2(u2, u1)) % 180.0)
        row["gal_radius_arcsec"] = float(np.exp(ln_r))
        row["n_images"] = int(n_images[i])
        conv_s, conv_g = bool(rs[4][i]), bool(rg[4][i])
        row["converged"] = (conv_s or p < 0.01) and (conv_g or p > 0.99)
        row["iterations"] = int(iterations[i])
        e_s, e_g = rs[1][i], rg[1][i]
        row["elbo"] = float(np.logaddexp(np.log(p_prior) + e_s, np.log(1 - p_prior) + e_g))
        row["fit_chi2"] = float(chi2[i])
        row["region"] = int(region)
        rows.append(row)
    return pd.DataFrame(rows, columns=output_columns(bands))


def output_columns(bands) -> list[str]:
    """Column order of a catalog for the given bands."""
    bands = sort_bands(bands)
    cols = ["ra", "dec", "ra_sd", "dec_sd", "p_star"]
    for b in bands:
        cols += [f"flux_{b}_nmgy", f"flux_{b}_sd_nmgy", f"mag_{b}"]
    for c in color_names(bands):
        cols += [f"color_{c}", f"color_{c}_sd"]
    return cols + ["gal_frac_dev", "gal_axis_ratio", "gal_angle_deg", "gal_radius_arcsec", "n_images",
                   "converged", "iterations", "elbo", "fit_chi2", "region", "found_in_residuals"]


def empty_catalog(bands) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=bool if c == "found_in_residuals" else float)
                         for c in output_columns(bands)})
