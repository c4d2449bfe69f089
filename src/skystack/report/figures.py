"""Figures for detections and for the Snakemake report."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.io import atomic_path


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: most jobs that import the
    stages draw nothing, and pyplot is a large part of a job's start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


#: Per-epoch stamps shown in a detection figure's strip (evenly spread over the images).
STRIP_STAMPS = 12


def _linear_limits(image: np.ndarray):
    """Linear stretch from the 1st to the 99.5th percentile: one hot pixel does not set it."""
    if not np.isfinite(image).any():
        return 0.0, 1.0
    lo, hi = np.nanpercentile(image, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _marker(ax, centre: float) -> None:
    """Tick marks at the predicted position that leave the object itself visible."""
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        ax.plot([centre + 1.5 * dx, centre + 3.5 * dx], [centre + 1.5 * dy, centre + 3.5 * dy], color="tab:red", lw=1)


def detection_figure(stamp: np.ndarray, light_curve: pd.DataFrame, title: str, path, *, stamps=None,
                     stamp_mjd=None, slices: dict | None = None) -> None:
    """What a person vets a detection by: the sigma-clipped coadd along the orbit with the
    predicted position marked (linear stretch), the light curve, a strip of per-epoch stamps
    (same stretch as each other) and, for a refined orbit, SNR slices through its elements."""
    n_strip = 0 if stamps is None else min(STRIP_STAMPS, len(stamps))
    n_slices = len(slices or {})
    rows = 1 + (n_strip > 0) + (n_slices > 0)
    heights = [3.2] + [1.1] * (n_strip > 0) + [1.9] * (n_slices > 0)
    fig = _pyplot().figure(figsize=(11, 0.6 + sum(heights)))
    grid = fig.add_gridspec(rows, 12, height_ratios=heights, wspace=0.9, hspace=0.5)
    ax0, ax1 = fig.add_subplot(grid[0, :4]), fig.add_subplot(grid[0, 5:])
    lo, hi = _linear_limits(stamp)
    ax0.imshow(stamp, origin="lower", cmap="gray_r", vmin=lo, vmax=hi, interpolation="nearest")
    _marker(ax0, (stamp.shape[0] - 1) / 2)
    ax0.set_title("sigma-clipped coadd along the orbit (nmgy/px)", fontsize=9)
    ax0.set_xticks([]), ax0.set_yticks([])
    for band, g in light_curve.groupby("band"):
        ax1.errorbar(g["mjd_mid_utc"], g["flux_nmgy"], yerr=g["flux_sd_nmgy"], fmt="o", ms=3, label=band, alpha=0.7)
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_xlabel("MJD (UTC)")
    ax1.set_ylabel("flux (nmgy)")
    ax1.legend(fontsize=8)
    row = 1
    if n_strip:
        pick = np.unique(np.linspace(0, len(stamps) - 1, n_strip).round().astype(int))
        slo, shi = _linear_limits(np.asarray(stamps)[pick])
        for i, j in enumerate(pick):
            ax = fig.add_subplot(grid[row, i])
            ax.imshow(stamps[j], origin="lower", cmap="gray_r", vmin=slo, vmax=shi, interpolation="nearest")
            _marker(ax, (stamps[j].shape[0] - 1) / 2)
            ax.set_xticks([]), ax.set_yticks([])
            if stamp_mjd is not None:
                ax.set_title(f"{stamp_mjd[j]:.1f}", fontsize=7)
        row += 1
    if n_slices:
        per = max(1, 12 // n_slices)
        for i, (name, (offsets, snr)) in enumerate(slices.items()):
            ax = fig.add_subplot(grid[row, i * per:(i + 1) * per])
            ax.plot(offsets, snr, "k-", lw=1)
            ax.axvline(0, color="tab:red", lw=0.7)
            ax.set_xlabel(f"d {name}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.locator_params(axis="x", nbins=3)
            if i == 0:
                ax.set_ylabel("SNR", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def snr_histogram(snr: np.ndarray, threshold: float, path) -> None:
    """Combined SNR of every orbit tried, against the N(0, 1) expected from noise alone."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    snr = np.asarray(snr)
    lo, hi = min(-6.0, float(np.nanmin(snr, initial=0))), max(12.0, float(np.nanmax(snr, initial=0)))
    bins = np.linspace(lo, hi, 80)
    ax.hist(snr, bins=bins, histtype="step", label=f"{len(snr)} orbits")
    x = np.linspace(lo, hi, 400)
    width = bins[1] - bins[0]
    ax.plot(x, len(snr) * width * np.exp(-x * x / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
    ax.axvline(threshold, color="r", lw=1, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_ylim(0.5, None)
    ax.set_xlabel("combined SNR")
    ax.set_ylabel("orbits")
    ax.legend()
    _save(fig, path)


def completeness(truth: pd.DataFrame, path) -> None:
    """Fraction of injected objects detected against their expected combined SNR."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    if truth.empty:
        ax.text(0.5, 0.5, "no injected objects (survey not simulated)", ha="center", transform=ax.transAxes)
        _save(fig, path)
        return
    truth = truth.assign(detected=truth["detected"].astype(bool))
    ax.scatter(truth["expected_combined_snr"], truth["detected"].astype(float), s=14)
    bins = np.arange(0, max(30, truth["expected_combined_snr"].max() + 5), 5)
    idx = np.digitize(truth["expected_combined_snr"], bins)
    frac = [truth["detected"][idx == i].mean() if (idx == i).any() else np.nan for i in range(1, len(bins))]
    ax.step(bins[:-1], frac, where="post", color="k", label="fraction detected")
    ax.set_xlabel("expected combined SNR (injected)")
    ax.set_ylabel("detected")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    _save(fig, path)


def snr_versus_parameter(values: np.ndarray, snr: np.ndarray, truth_value: float, xlabel: str, path) -> None:
    """Combined SNR along a one-parameter orbit grid, the true value marked."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    if len(values) == 0:
        ax.text(0.5, 0.5, "no orbit grid in this experiment\n(orbits.source: grid searches one)",
                ha="center", va="center", transform=ax.transAxes)
    order = np.argsort(values)
    ax.plot(np.asarray(values)[order], np.asarray(snr)[order], "o-", ms=3)
    ax.axvline(truth_value, color="r", lw=1, label="reference")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("combined SNR")
    ax.legend()
    _save(fig, path)


def catalog_figure(catalog: pd.DataFrame, path) -> None:
    """Position and flux uncertainty against magnitude (r, else the first band), stars and
    galaxies apart; an empty catalog gives a figure that says so."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.6))
    bands = [c[5:-5] for c in catalog.columns if c.startswith("flux_") and c.endswith("_nmgy") and "_sd_" not in c]
    band = "r" if "r" in bands else (bands[0] if bands else None)
    if band is None or len(catalog) == 0:
        for ax in axes:
            ax.text(0.5, 0.5, "no sources", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle("0 sources", fontsize=10)
        _save(fig, path)
        return
    star = catalog["p_star"].to_numpy(float) >= 0.5
    pos_sd = np.hypot(catalog["ra_sd"].to_numpy(float), catalog["dec_sd"].to_numpy(float))
    rel_sd = catalog[f"flux_{band}_sd_nmgy"].to_numpy(float) / catalog[f"flux_{band}_nmgy"].to_numpy(float)
    mag = catalog[f"mag_{band}"].to_numpy(float)
    for mask, label, marker in ((star, "stars", "*"), (~star, "galaxies", "o")):
        axes[0].scatter(mag[mask], pos_sd[mask], s=12, marker=marker, label=f"{label} ({mask.sum()})")
        axes[1].scatter(mag[mask], rel_sd[mask], s=12, marker=marker)
    axes[0].set(xlabel=f"{band} (AB mag)", ylabel="position sd (arcsec)", yscale="log")
    axes[1].set(xlabel=f"{band} (AB mag)", ylabel=f"{band} flux sd / flux", yscale="log")
    conv = catalog["converged"].astype(bool).mean()
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{len(catalog)} sources, {100 * conv:.0f}% converged", fontsize=10)
    _save(fig, path)


def deconvolution_figure(stamps: np.ndarray, psfs: np.ndarray, deconvolved: np.ndarray, diag: pd.DataFrame,
                         path, n_show: int = 4) -> None:
    """Observed stamp, PSF and deconvolved stamp for the first few galaxies."""
    n = min(n_show, len(stamps))
    fig, axes = _pyplot().subplots(max(n, 1), 3, figsize=(7, 2.3 * max(n, 1)), squeeze=False)
    for i in range(n):
        for ax, img, title in zip(axes[i], (stamps[i], psfs[i], deconvolved[i]), ("observed", "PSF", "deconvolved")):
            lo, hi = np.nanpercentile(img, [1, 99.5])
            ax.imshow(img, origin="lower", cmap="gray_r", vmin=lo, vmax=hi)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title if i == 0 else "", fontsize=9)
        axes[i, 0].set_ylabel(f"stamp {i}, {int(diag['iterations'].iloc[i])} it", fontsize=8)
    if n == 0:
        axes[0, 1].text(0.5, 0.5, "no stamps", ha="center", va="center")
    _save(fig, path)
