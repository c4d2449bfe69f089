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
