"""Every benchmark in one command; JSON and a Markdown table under benchmarks/results/.

    python -m benchmarks.run_all [--quick] [--only tile_cache intersections ...]

Each benchmark's own figures are kept whole in the JSON; the table shows the headline
number of each against its goal, with the device it ran on.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"

#: benchmark -> (arguments for a full run, for a quick run)
RUNS = {
    "tile_cache": ([], ["--images", "4", "--patches", "50000"]),
    "intersections": ([], ["--exposures", "40", "--orbits", "4000", "--repeat", "1", "--reference-orbits", "4"]),
    "end_to_end": (["--repeat", "3"], ["--config", "config/experiments/tiny.yaml", "--workdir",
                                       "benchmarks/out/end_to_end_tiny"]),
    "end_to_end_diffuse": (["--exposures", "128", "--orbits", "100000"], ["--exposures", "16", "--orbits", "10000"]),
    "workflow_scale": ([], ["--images", "1e4", "--fixed-orbits", "1e4"]),
    "deconvolve": ([], ["--quick"]),
    "catalog_speed": ([], ["--n-sources", "64"]),
    "catalog_accuracy": ([], ["--n-sources", "120"]),
    "catalog_calibration": ([], ["--n-sources", "64"]),
    "catalog_pairs": ([], ["--pairs", "12"]),
    "covering": ([], ["--losses", "0.2", "--widths", "1", "--check", "200"]),
    "region_search": ([], ["--objects", "40", "--losses", "0.5", "0.7", "--refine-losses", "0.9"]),
}


def _markdown(results: dict, host: str) -> str:
    lines = [f"Benchmarks on {host}", "", "| benchmark | result |", "|---|---|"]
    for name, res in results.items():
        summary = res.get("summary") or ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool))[:300]
        lines.append(f"| {name} | {summary} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run, not figures to quote")
    ap.add_argument("--only", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    args = ap.parse_args(argv)
    results = {}
    for name in args.only:
        full, quick = RUNS[name]
        t0 = time.time()
        module = importlib.import_module(f"benchmarks.{name}")
        results[name] = module.main(quick if args.quick else full)
        results[name]["wall_s"] = round(time.time() - t0, 1)
    host = f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})"
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (OUT / f"{stamp}.json").write_text(json.dumps({"host": host, "quick": args.quick, "results": results}, indent=1))
    (OUT / f"{stamp}.md").write_text(_markdown(results, host))
    print(_markdown(results, host))
    return results


if __name__ == "__main__":
    main()
