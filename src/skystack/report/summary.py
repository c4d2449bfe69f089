"""What a finished run produced: ``python -m skystack.report.summary --configfile config/experiments/demo.yaml``."""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..core.config import load_config

#: The demo experiment (``make run``; the workflow's config when no --configfile is given).
DEMO_CONFIG = Path("config") / "experiments" / "demo.yaml"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summarize(config: dict, root: Path = Path(".")) -> list[str]:
    """Lines naming the run's outputs, with a few numbers from each."""
    results = root / config["results_dir"] / config["experiment"]
    cache = root / config["cache_dir"] / config["experiment"]
    lines = [f"skystack: experiment {config['experiment']!r}, results in {_rel(results)}/"]
    images = results / "images.parquet"
    if images.exists():
        idx = pd.read_parquet(images, columns=["image_id", "mjd_mid_utc", "is_difference", "partition"])
        lines.append(f"  {_rel(images)}: {len(idx)} images ({int(idx['is_difference'].sum())} difference) "
                     f"from {idx['mjd_mid_utc'].round(6).nunique()} exposures, {idx['partition'].nunique()} partitions")
    tiles = sorted(cache.glob("partition_*.tiles"))
    if tiles:
        size_mb = sum(t.stat().st_size for t in tiles) / 2**20
        lines.append(f"  {_rel(cache)}/: {len(tiles)} tile caches, {size_mb:.1f} MiB")
    for name, what in (("catalog.parquet", "sources"), ("detections.parquet", "moving-object detections"),
                       ("deconvolved/diagnostics.parquet", "deconvolved stamps")):
        path = results / name
        if path.exists():
            lines.append(f"  {_rel(path)}: {len(pd.read_parquet(path))} {what}")
    detections = results / "detections.parquet"
    if detections.exists():
        det = pd.read_parquet(detections)
        for _, d in det.head(5).iterrows():
            lines.append(f"    orbit {d['orbit_id']:>8d}  a={d['a_au']:8.3f} AU  e={d['e']:.3f}  "
                         f"SNR={d['snr']:5.1f} over {d['n_images']} images  {d.get('name', '')}")
    recovered = results / "report" / "recovered.parquet"
    if recovered.exists():
        rec = pd.read_parquet(recovered)
        if len(rec):
            lines.append(f"  injected objects recovered: {int(rec['detected'].sum())} of {len(rec)}")
    figures = sorted((results / "report").glob("*.png")) + sorted((results / "detections").glob("*.png"))
    if figures:
        lines.append(f"  figures: {_rel(results / 'report')}/ and {_rel(results / 'detections')}/ ({len(figures)} PNG)")
    report = root / report_path(config)
    if report.exists():
        lines.append(f"  report: {_rel(report)} (open in a browser)")
    lines.append("  logs: " + _rel(root / "logs" / config["experiment"]) + "/")
    return lines


def _html_table(header, rows) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table border='1' cellpadding='3' style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"


def run_summary_html(experiment: str, *, images_path, rejected_path, detections_path, plan_path, recovered_path,
                     catalog_path=None, snr_threshold: float) -> str:
    """The run at a glance (the Snakemake report's first page): images indexed and refused,
    the catalog's size, the orbit plan (for a region search: trial orbits and the loss the
    covering guarantees), the detections with their SNR, and the completeness on injected
    objects."""
    import json
    from html import escape

    idx = pd.read_parquet(images_path)
    rejected = pd.read_parquet(rejected_path) if rejected_path and Path(rejected_path).exists() else pd.DataFrame()
    parts = [f"<h2>skystack run: experiment {escape(experiment)}</h2>",
             f"<p>{len(idx)} images indexed ({int(idx['is_difference'].sum())} difference) from "
             f"{idx['mjd_mid_utc'].round(6).nunique()} exposures in bands {', '.join(sorted(idx['band'].unique()))}; "
             f"{len(rejected)} refused.</p>"]
    if len(rejected) and "reason" in rejected:
        reasons = rejected["reason"].astype(str).str.split(":").str[0].value_counts().head(8)
        parts.append(_html_table(["refused because", "files"], reasons.items()))
    if catalog_path and Path(catalog_path).exists():
        cat = pd.read_parquet(catalog_path)
        stars = int((cat["p_star"] >= 0.5).sum()) if "p_star" in cat else 0
        parts.append(f"<p>Catalog: {len(cat)} sources ({stars} likely stars, {len(cat) - stars} galaxies).</p>")
    plan = json.loads(Path(plan_path).read_text())
    if plan.get("regions"):
        parts.append(_html_table(
            ["region", "trial orbits", "max SNR loss guaranteed", "for orbits on", "exposures", "images",
             "filter sigma (arcsec)"],
            [(r["name"], f"{r['n_trials']:,}", r["max_snr_loss"],
              f">= {r['min_exposures']} exposures" if r.get("min_exposures") else "the whole box",
              r["n_exposures"], r["n_images"], f"{r['filter_sigma_arcsec_median']:.2f}") for r in plan["regions"]]))
    else:
        parts.append(f"<p>Orbits searched: {plan['n_total']:,} ({plan['n_listed']:,} listed, "
                     f"{plan['n_random']:,} random).</p>")
    det = pd.read_parquet(detections_path)
    cols = [c for c in ("orbit_id", "name", "snr", "snr_trial", "n_images", "a_au", "e", "inc_deg", "flux_nmgy")
            if c in det]
    if plan.get("regions"):
        parts.append(f"<p>{len(det)} detections (candidates at search SNR &ge; {snr_threshold:g}, refined on the "
                     f"full-resolution images; snr is the refined SNR, snr_trial the trial's):</p>")
    else:
        parts.append(f"<p>{len(det)} detections at SNR &ge; {snr_threshold:g}:</p>")
    parts.append(_html_table(cols, [[f"{v:.7g}" if isinstance(v, float) else v for v in r]
                                    for r in det[cols].itertuples(index=False)]))
    rec = pd.read_parquet(recovered_path) if Path(recovered_path).exists() else pd.DataFrame()
    if len(rec):
        bright = rec["expected_combined_snr"] >= 10
        parts.append(f"<p>Injected objects recovered: {int(rec['detected'].sum())} of {len(rec)} "
                     f"({int(rec.loc[bright, 'detected'].sum())} of {int(bright.sum())} with expected SNR &ge; 10).</p>")
    return "<html><body>" + "\n".join(parts) + "</body></html>"


def report_path(config: dict) -> str:
    """Where ``make run`` writes the Snakemake report (figures with captions, one HTML file)."""
    return str(Path(config["results_dir"]) / config["experiment"] / "report.html")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configfile", nargs="+", default=[str(DEMO_CONFIG)],
                        help="the run's config files, as given to snakemake (default: the demo)")
    parser.add_argument("--report-path", action="store_true", help="print only where the HTML report goes")
    args = parser.parse_args(argv)
    # As the workflow sees it: the schema's defaults under the --configfile files, nothing else.
    config = load_config(*args.configfile)
    if args.report_path:
        print(report_path(config))
        return 0
    print("\n".join(summarize(config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
