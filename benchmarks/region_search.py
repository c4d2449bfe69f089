"""B-region-search: trial orbits for 90% completeness: random sampling, a covering, a covering plus refinement.

Goal: the covering plus refinement finds 90% of the region's objects with true SNR >= 10 with at
least 10x fewer trial orbits than random sampling (the published method). The factor measured
is reported whether or not it reaches 10.

Survey and region. The demo survey's exposures (``sim.survey`` demo preset: 120 exposures over
3 years from Palomar, each with its mean PSF sigma) and the box ``config/experiments/demo.yaml``
searches: around 2060 Chiron (``resources/known_objects.csv``), half-widths a 0.004 AU,
e 1e-5, i 0.012, node 0.012, argument of perihelion 0.004 and mean anomaly 0.03 deg. With
``--region kbo``, the KBO box of ``benchmarks/covering.py`` instead (a = 39.5 AU; a 0.05 AU,
e 0.002, 0.02 deg in the angles; its coverings are ~50x larger, the run ~7 minutes).

Objects. ``--objects`` orbits drawn uniformly from the box, each with a true-orbit SNR drawn
uniformly in [``--snr-min``, ``--snr-max``] (default [10, 20]); completeness is the share of the
objects with true SNR >= 10 that are found. A trial orbit whose track loses ``loss`` of the
matched-filter SNR (``covering.covering_loss``: exact predicted tracks, Gaussian PSF overlap
``mean_i exp(-d_i^2 / 4 sigma_i^2)``) collects ``SNR_true * (1 - loss)``.

1. Random sampling: N orbits drawn uniformly from the box. Found when the best one keeps
   ``SNR_true * (1 - loss) >= 7``. The N drawn are nested (the first N of one sequence, N
   growing by sqrt 2), so completeness rises with N; N for 90% is interpolated in log N between
   the two evaluated N around it.
2. The covering alone (``covering_lattice``, tiles chosen automatically) at max_snr_loss L:
   found when ``SNR_true * (1 - loss to its best trial) >= 7``. L <= 0.3 finds every object of
   SNR >= 10 by construction; its count for 90% is the covering's size at the largest L of
   ``--losses`` that still finds 90% (so it is quantised by that grid; likewise strategy 3).
   Coverings larger than ``--max-build`` are not built: their size is Steiner's estimate
   (``covering_plan``) and the objects are scored against the covering's lattice points nearest
   them (``nearest_trials``; an upper bound on the loss).
3. The covering plus refinement: a sparser covering (L of ``--refine-losses``); an object is a
   candidate when its best trial keeps ``SNR_true * (1 - loss) >=`` the candidate threshold
   (5 by default; 6, the demo's search threshold, also reported), and that trial is refined
   (``refine.refine_orbit``) on the object's synthetic SNR function (``refine.synthetic_snr_fn``'s
   ``SNR_true * mean_i exp(-|p_i(x) - p_i(true)|^2 / 4 sigma_i^2)``). Found when the refined SNR
   is >= 7. Also reported: the refined / true SNR and the rms offset (arcsec) of the refined
   track from the true one over the exposures (medians over the refined candidates).
   The synthetic SNR function is NOISELESS: it measures whether the climb reaches the peak
   from the covering's trials, not how well the orbit is determined in noise (that is measured
   on images elsewhere), so refined/true SNR ~ 1 and a tiny track rms are expected.

For comparison, random sampling followed by the same refinement (the first candidate threshold,
at the nested N whose candidates first reach 90%; its N for 90% is interpolated as in 1.) is
reported too: the covering's gain over the published method is partly the covering and partly
the refinement, and that row separates them.

The SNR function refined is ``synthetic_snr_fn``'s formula written with the object's data as
arguments, so that ``refine_orbit`` compiles its gradient and Hessian once for all objects
(``synthetic_snr_fn`` closes over its arrays, and each object would be compiled anew: ~11 CPU s
each). The two are checked to agree on the first object.

CPU seconds (``time.process_time``, all threads) are given for building the coverings, for
evaluating the objects' losses against the trials (benchmark bookkeeping, not the search) and
for refinement. With 200 objects a completeness near 90% has a binomial error of ~2%.

    python -m benchmarks.region_search [--region chiron|kbo] [--objects 200]
        [--losses 0.3 0.5 0.6 0.7 0.8 0.9] [--refine-losses 0.7 0.8 0.9 0.95 0.98]
        [--candidate-thresholds 5 6] [--max-random 1048576] [--max-build 1e6] [--seed 0]

Prints a Markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from skystack.core.runtime import configure, device_summary

CHIRON = "2060 Chiron"
#: config/experiments/demo.yaml's chiron-family region.
CHIRON_BOX = {"a_au": 0.004, "e": 0.00001, "inc_deg": 0.012, "node_deg": 0.012, "argperi_deg": 0.004,
              "mean_anomaly_deg": 0.03}
SNR_THRESHOLD = 7.0
#: Completeness is reported for objects at least this bright (true-orbit SNR).
SNR_REPORT_MIN = 10.0
COMPLETENESS_GOAL = 0.9
FACTOR_GOAL = 10.0
#: Trial orbits per ``covering_loss`` call (memory: their directions are held, 120 x 3 floats each).
LOSS_CHUNK_TRIALS = 131072


def _cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def _snr_of_elements(x, epoch_jd_tdb, geom, p_true_arcsec, sigma_arcsec, peak_snr):
    """``synthetic_snr_fn``'s combined SNR of elements x (6,), with the object's data as
    arguments (one compilation of ``refine_orbit``'s derivatives for every object)."""
    import jax.numpy as jnp

    from skystack.orbits.covering import _track

    d = _track(x[None, :], epoch_jd_tdb, geom)[0] - p_true_arcsec
    return peak_snr * jnp.mean(jnp.exp(-jnp.sum(d * d, axis=-1) / (4.0 * sigma_arcsec * sigma_arcsec)))


def _region(cv, name: str):
    """(label, reference orbit, half-widths) of ``--region``."""
    if name == "kbo":
        from benchmarks.covering import BOX as KBO_BOX
        from benchmarks.covering import REFERENCE as KBO_REFERENCE

        return "the KBO box of benchmarks/covering.py", dict(KBO_REFERENCE), dict(KBO_BOX)
    from skystack.orbits.table import load_known_objects

    known = load_known_objects(cv.REPO / "resources" / "known_objects.csv")
    row = known[known["name"] == CHIRON].iloc[0]
    return f"demo.yaml's box around {CHIRON}", {k: float(row[k]) for k in cv.ELEMENT_COLUMNS}, dict(CHIRON_BOX)


def _survey(cv, region: str) -> dict:
    ex = cv.survey_exposures({"preset": "demo"})
    jd, site, sigma = ex["jd_tdb"].to_numpy(), cv.exposure_site(ex), ex["psf_sigma_arcsec"].to_numpy()
    label, reference, box = _region(cv, region)
    return {"jd": jd, "site": site, "sigma": sigma, "label": label, "reference": reference, "box": box,
            "metric": cv.track_metric(reference, jd, site, sigma)}


def _best_loss(cv, survey, trials, objects, loss=None, best=None):
    """Each object's loss against its best trial of ``trials`` (and that trial's orbit_id),
    folded into a previous (loss, best) when given: the best of the union."""
    n = len(objects)
    loss = np.full(n, np.inf) if loss is None else loss.copy()
    best = np.full(n, -1, dtype=np.int64) if best is None else best.copy()
    for s in range(0, len(trials), LOSS_CHUNK_TRIALS):
        lo, b = cv.covering_loss(trials.iloc[s:s + LOSS_CHUNK_TRIALS], objects, survey["jd"], survey["site"],
                                 survey["sigma"], return_best=True)
        better = lo < loss
        loss[better], best[better] = lo[better], b[better]
    return loss, best


def _found(snr_true, loss, threshold):
    return snr_true * (1.0 - loss) >= threshold


def _completeness(found, bright) -> float:
    return float(np.mean(found[bright]))


def _interp_n(curve, key: str, goal: float):
    """N at which completeness ``key`` reaches ``goal``, interpolated in log N between the two
    evaluated N around it (None when not reached)."""
    prev = None
    for point in curve:
        c = point[key]
        if c >= goal:
            if prev is None or prev[key] >= c or c == goal:
                return float(point["n_trials"])
            f = (goal - prev[key]) / (c - prev[key])
            return float(math.exp(math.log(prev["n_trials"]) + f * math.log(point["n_trials"] / prev["n_trials"])))
        prev = point
    return None


def refine_candidates(cv, survey, objects, snr_true, start_trials, which) -> dict:
    """Refine the start trial of each object in ``which`` on its synthetic SNR function.

    Returns per object (NaN where not refined): snr_after, rms_arcsec (refined track against the
    true one over the exposures), steps, converged; and the CPU seconds."""
    import jax.numpy as jnp

    from skystack.orbits.refine import refine_orbit

    n = len(objects)
    out = {"snr_after": np.full(n, np.nan), "rms_arcsec": np.full(n, np.nan), "steps": np.full(n, -1),
           "converged": np.zeros(n, dtype=bool)}
    sigma = jnp.asarray(survey["sigma"])
    t0 = time.process_time()
    for i in np.flatnonzero(which):
        truth = objects.iloc[[i]]
        geom = cv.track_geometry(truth.iloc[0], survey["jd"], survey["site"])  # the true track's tangent planes
        p_true = cv.track_positions(truth, geom)[0]
        args = (jnp.asarray(float(truth.iloc[0]["epoch_jd_tdb"])), cv._device(geom), jnp.asarray(p_true), sigma,
                jnp.asarray(float(snr_true[i])))
        res = refine_orbit(start_trials.iloc[i], _snr_of_elements, args=args)
        refined = truth.copy()
        refined[cv.REGION_ELEMENTS] = [[res.elements[k] for k in cv.REGION_ELEMENTS]]
        d = cv.track_positions(refined, geom)[0] - p_true
        out["snr_after"][i] = res.snr_after
        out["rms_arcsec"][i] = float(np.sqrt(np.mean(np.sum(d * d, axis=-1))))
        out["steps"][i] = res.steps
        out["converged"][i] = res.converged
    out["cpu_s"] = time.process_time() - t0
    return out


def _check_against_synthetic(cv, survey, objects, snr_true, start_trials, i: int) -> float:
    """Largest relative difference between ``_snr_of_elements`` and ``synthetic_snr_fn`` for
    object i, at its start trial and at the truth."""
    import jax.numpy as jnp

    from skystack.orbits.refine import synthetic_snr_fn

    truth = objects.iloc[i]
    snr_fn, _ = synthetic_snr_fn(truth, survey["jd"], survey["site"], survey["sigma"], peak_snr=float(snr_true[i]))
    geom = cv.track_geometry(truth, survey["jd"], survey["site"])
    p_true = cv.track_positions(objects.iloc[[i]], geom)[0]
    args = (jnp.asarray(float(truth["epoch_jd_tdb"])), cv._device(geom), jnp.asarray(p_true),
            jnp.asarray(survey["sigma"]), jnp.asarray(float(snr_true[i])))
    worst = 0.0
    for row in (start_trials.iloc[i], truth):
        x = jnp.asarray([float(row[k]) for k in cv.REGION_ELEMENTS])
        a, b = float(snr_fn(x)), float(_snr_of_elements(x, *args))
        worst = max(worst, abs(a - b) / abs(a))
    return worst


def run_random(cv, survey, objects, snr_true, bright, args) -> dict:
    """Nested random trial sets, N growing by sqrt 2 from ``--min-random``: completeness at each N."""
    reference = survey["reference"]
    trials, t_draw = _cpu(lambda: cv.sample_region(reference, survey["box"], int(args.max_random), seed=args.seed + 1))
    loss = best = None
    curve, done, t_loss, step = [], 0, 0.0, 0
    while done < len(trials):
        n = min(round(args.min_random * 2.0 ** (step / 2)), len(trials))
        step += 1
        t0 = time.process_time()
        loss, best = _best_loss(cv, survey, trials.iloc[done:n], objects, loss, best)
        t_loss += time.process_time() - t0
        done = n
        curve.append({"n_trials": n, "completeness": _completeness(_found(snr_true, loss, SNR_THRESHOLD), bright),
                      "candidates": _completeness(_found(snr_true, loss, args.candidate_thresholds[0]), bright),
                      "median_loss": float(np.median(loss)), "loss": loss.copy(), "best": best.copy()})
        print(json.dumps({"random": _public(curve[-1])}), flush=True)
        if curve[-1]["completeness"] >= args.stop_random:
            break
    return {"curve": curve, "trials": trials, "cpu_draw_s": t_draw, "cpu_loss_s": t_loss,
            "n_90": _interp_n(curve, "completeness", COMPLETENESS_GOAL),
            "n_90_candidates": _interp_n(curve, "candidates", COMPLETENESS_GOAL)}


def _public(point: dict) -> dict:
    """A random-sampling curve point without its per-object arrays."""
    return {k: v for k, v in point.items() if k not in ("loss", "best")}


def _random_refined(cv, survey, objects, snr_true, bright, rnd, c_head: float):
    """Refine the best random trials at the first N whose candidates (trial SNR >= c_head)
    reach 90%: how much of the covering's gain the refinement alone brings."""
    for point in rnd["curve"]:
        if point["candidates"] >= COMPLETENESS_GOAL:
            break
    else:
        return None
    starts = rnd["trials"].set_index("orbit_id").loc[point["best"]].reset_index()
    cand = _found(snr_true, point["loss"], c_head)
    ref = refine_candidates(cv, survey, objects, snr_true, starts, cand)
    ok = np.nan_to_num(ref["snr_after"], nan=-np.inf) >= SNR_THRESHOLD
    ratio = ref["snr_after"][cand] / snr_true[cand]
    return {"n_trials": int(point["n_trials"]), "completeness": _completeness(cand & ok, bright),
            "n_refined": int(cand.sum()), "median_snr_ratio": _median(ratio),
            "min_snr_ratio": float(np.min(ratio)) if cand.any() else None,
            "median_rms_arcsec": _median(ref["rms_arcsec"][cand]),
            "max_rms_arcsec": float(np.max(ref["rms_arcsec"][cand])) if cand.any() else None,
            "cpu_refine_s": ref["cpu_s"]}


def run_covering(cv, survey, objects, loss_max: float, args) -> dict:
    """The covering at ``loss_max`` (tiles as ``covering_lattice`` chooses them) and each object's
    best trial. Built when its estimated size is at most ``--max-build``; else its size is
    Steiner's estimate and the objects are scored against the lattice points nearest them
    (``nearest_trials``: trials of the covering, so the loss is an upper bound)."""
    reference, metric, box = survey["reference"], survey["metric"], survey["box"]
    t0 = time.process_time()
    tiles, safety, _ = cv.choose_tiles(reference, box, metric, loss_max, seed=args.seed)
    plan = cv.covering_plan(reference, box, metric, loss_max, tiles=tiles, safety_factor=safety)
    built = plan["estimate"] <= args.max_build
    if built:
        trials, summary = cv.covering_lattice(reference, box, metric, loss_max, int(4 * args.max_build), tiles=tiles,
                                              safety_factor=safety)
        n_trials = int(summary["n_trials"])
    t_build = time.process_time() - t0
    t0 = time.process_time()
    if not built:
        trials, _ = cv.nearest_trials(plan, objects)
        n_trials = round(plan["estimate"])
    loss, best = _best_loss(cv, survey, trials, objects)
    t_loss = time.process_time() - t0
    return {"max_snr_loss": loss_max, "n_trials": n_trials, "built": bool(built), "n_tiles": int(plan["n_tiles"]),
            "safety_factor": float(safety), "lattice": plan["lattice"],
            "cpu_build_s": t_build if built else None, "cpu_plan_s": None if built else t_build,
            "cpu_loss_s": t_loss, "max_loss": float(loss.max()), "loss": loss,
            "starts": trials.set_index("orbit_id").loc[best].reset_index()}


def _median(values) -> float | None:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def _count(row) -> str:
    """A covering's size: counted when built, else Steiner's estimate."""
    return f"{row['n_trials']:,}" if row["built"] else f"~{row['n_trials']:,} (estimate)"


def _build_cpu(row) -> str:
    return f"{row['cpu_build_s']:.1f}" if row["built"] else f"(plan {row['cpu_plan_s']:.1f})"


def _at(row) -> str:
    return f" (L = {row['max_snr_loss']:g})" if row else ""


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", choices=("chiron", "kbo"), default="chiron",
                    help="demo.yaml's box around 2060 Chiron, or benchmarks/covering.py's KBO box")
    ap.add_argument("--objects", type=int, default=200, help="objects drawn uniformly from the box")
    ap.add_argument("--snr-min", type=float, default=10.0, help="true-orbit SNR drawn uniformly from here ...")
    ap.add_argument("--snr-max", type=float, default=20.0, help="... to here")
    ap.add_argument("--losses", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8, 0.9],
                    help="max_snr_loss of the coverings searched alone")
    ap.add_argument("--refine-losses", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.95, 0.98],
                    help="max_snr_loss of the coverings whose best trials are refined")
    ap.add_argument("--candidate-thresholds", type=float, nargs="+", default=[5.0, 6.0],
                    help="trial SNR above which a trial is refined (the first is the headline)")
    ap.add_argument("--min-random", type=float, default=1024, help="first random-sampling N (then x sqrt 2)")
    ap.add_argument("--max-random", type=float, default=2**20, help="largest random-sampling N")
    ap.add_argument("--stop-random", type=float, default=0.97, help="stop doubling N at this completeness")
    ap.add_argument("--max-build", type=float, default=1e6,
                    help="build coverings up to this many trials (larger: estimated, scored on nearest points)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.candidate_thresholds = sorted(args.candidate_thresholds)
    configure()
    from skystack.orbits import covering as cv

    survey, t_setup = _cpu(lambda: _survey(cv, args.region))
    objects = cv.sample_region(survey["reference"], survey["box"], args.objects, seed=args.seed)
    snr_true = np.random.default_rng(args.seed + 2).uniform(args.snr_min, args.snr_max, args.objects)
    bright = snr_true >= SNR_REPORT_MIN
    c_head = args.candidate_thresholds[0]

    # 1. Random sampling.
    rnd = run_random(cv, survey, objects, snr_true, bright, args)

    # 2. and 3. Coverings (built once per L, shared by the two strategies).
    coverings = {}
    for loss_max in sorted(set(args.losses) | set(args.refine_losses)):
        coverings[loss_max] = run_covering(cv, survey, objects, loss_max, args)
        c = coverings[loss_max]
        print(json.dumps({"covering": {k: v for k, v in c.items() if k not in ("loss", "starts")}}), flush=True)
    alone = []
    for loss_max in sorted(args.losses):
        c = coverings[loss_max]
        alone.append({"max_snr_loss": loss_max, "n_trials": c["n_trials"], "built": c["built"],
                      "max_loss": c["max_loss"],
                      "completeness": _completeness(_found(snr_true, c["loss"], SNR_THRESHOLD), bright),
                      "cpu_build_s": c["cpu_build_s"], "cpu_plan_s": c["cpu_plan_s"], "cpu_loss_s": c["cpu_loss_s"]})
    refined_rows, check = [], None
    for loss_max in sorted(args.refine_losses):
        c = coverings[loss_max]
        cand = {t: _found(snr_true, c["loss"], t) for t in args.candidate_thresholds}
        ref = refine_candidates(cv, survey, objects, snr_true, c["starts"], cand[c_head])
        ok = np.nan_to_num(ref["snr_after"], nan=-np.inf) >= SNR_THRESHOLD
        done = cand[c_head]
        row = {"max_snr_loss": loss_max, "n_trials": c["n_trials"], "built": c["built"], "max_loss": c["max_loss"],
               "candidates": {str(t): _completeness(cand[t], bright) for t in args.candidate_thresholds},
               "completeness": {str(t): _completeness(cand[t] & ok, bright) for t in args.candidate_thresholds},
               "n_refined": int(done.sum()),
               "converged": float(np.mean(ref["converged"][done])) if done.any() else None,
               "median_steps": _median(ref["steps"][done]),
               "median_snr_ratio": _median(ref["snr_after"][done] / snr_true[done]),
               "min_snr_ratio": float(np.min(ref["snr_after"][done] / snr_true[done])) if done.any() else None,
               "median_rms_arcsec": _median(ref["rms_arcsec"][done]),
               "max_rms_arcsec": float(np.max(ref["rms_arcsec"][done])) if done.any() else None,
               "cpu_build_s": c["cpu_build_s"], "cpu_plan_s": c["cpu_plan_s"], "cpu_loss_s": c["cpu_loss_s"],
               "cpu_refine_s": ref["cpu_s"],
               "cpu_refine_per_object_s": ref["cpu_s"] / max(int(done.sum()), 1)}
        refined_rows.append(row)
        print(json.dumps({"refined": row}), flush=True)
        if check is None and done.any():
            check = _check_against_synthetic(cv, survey, objects, snr_true, c["starts"], int(np.flatnonzero(done)[0]))

    # Random sampling plus the same refinement, at the first N whose candidates reach 90%.
    rr = _random_refined(cv, survey, objects, snr_true, bright, rnd, c_head)

    # Trial orbits for 90% per strategy.
    n_random = rnd["n_90"]
    ok_alone = [r for r in alone if r["completeness"] >= COMPLETENESS_GOAL]
    best_alone = min(ok_alone, key=lambda r: r["n_trials"]) if ok_alone else None
    n_alone = best_alone["n_trials"] if best_alone else None
    ok_ref = [r for r in refined_rows if r["completeness"][str(c_head)] >= COMPLETENESS_GOAL]
    best_ref = min(ok_ref, key=lambda r: r["n_trials"]) if ok_ref else None
    n_ref = best_ref["n_trials"] if best_ref else None
    factor = n_random / n_ref if (n_random and n_ref) else None
    factor_alone = n_random / n_alone if (n_random and n_alone) else None

    others = ", ".join(f"{t:g}" for t in args.candidate_thresholds[1:]) or "-"
    head = (f"Demo survey ({len(survey['jd'])} exposures, PSF sigma {survey['sigma'].min():.2f}-"
            f"{survey['sigma'].max():.2f} arcsec), {survey['label']} {survey['box']}; {args.objects} objects, "
            f"true SNR uniform in [{args.snr_min:g}, {args.snr_max:g}], found at SNR >= {SNR_THRESHOLD:g}, "
            f"completeness of the {int(bright.sum())} with true SNR >= {SNR_REPORT_MIN:g}; candidate threshold "
            f"{c_head:g} (in brackets: {others}). Refinement on a NOISELESS synthetic SNR function. "
            f"{device_summary()}; setup {t_setup:.1f} CPU s. The refined SNR function agrees with synthetic_snr_fn "
            f"to {_fmt(check, '.1e')} (relative).")
    columns = ("| strategy | setting | trial orbits | completeness | CPU s (build / loss / refine) |"
               " refined/true SNR (median, min) | refined track rms arcsec (median, max) |")
    lines = [head, "", columns, "|" + "---|" * 7]
    for p in rnd["curve"]:
        lines.append(f"| random sampling | uniform in the box | {p['n_trials']:,} | {p['completeness']:.3f} |"
                     " - | - | - |")
    lines.append(f"| random sampling | (loss CPU s for all N: {rnd['cpu_loss_s']:.1f}) | | | | | |")
    for r in alone:
        lines.append(f"| covering alone | L = {r['max_snr_loss']:g} (max loss {r['max_loss']:.2f}) | {_count(r)} |"
                     f" {r['completeness']:.3f} | {_build_cpu(r)} / {r['cpu_loss_s']:.1f} / - | - | - |")
    for r in refined_rows:
        comp = " (".join([f"{r['completeness'][str(c_head)]:.3f}"] + [
            f"{r['completeness'][str(t)]:.3f} at {t:g})" for t in args.candidate_thresholds[1:]])
        lines.append(f"| covering + refinement | L = {r['max_snr_loss']:g} (max loss {r['max_loss']:.2f}) |"
                     f" {_count(r)} | {comp} | {_build_cpu(r)} / {r['cpu_loss_s']:.1f} / "
                     f"{r['cpu_refine_s']:.1f} | {_fmt(r['median_snr_ratio'], '.4f')}, "
                     f"{_fmt(r['min_snr_ratio'], '.4f')}"
                     f" | {_fmt(r['median_rms_arcsec'], '.2g')}, {_fmt(r['max_rms_arcsec'], '.2g')} |")
    if rr:
        lines.append(f"| random sampling + refinement | uniform, candidates >= {c_head:g} | {rr['n_trials']:,} | "
                     f"{rr['completeness']:.3f} | - / - / {rr['cpu_refine_s']:.1f} | "
                     f"{_fmt(rr['median_snr_ratio'], '.4f')}, {_fmt(rr['min_snr_ratio'], '.4f')} | "
                     f"{_fmt(rr['median_rms_arcsec'], '.2g')}, {_fmt(rr['max_rms_arcsec'], '.2g')} |")
    not_reached = f"> {rnd['curve'][-1]['n_trials']:,} (not reached: raise --max-random)"
    lines += ["", "| strategy | trial orbits for 90% (SNR >= 10) | random / strategy |", "|---|---|---|",
              f"| random sampling | {_fmt(n_random, ',.0f') if n_random else not_reached} | 1 |",
              (f"| covering alone{_at(best_alone)} | {_count(best_alone) if best_alone else '-'} | "
               f"{_fmt(factor_alone, '.2f')} |"),
              (f"| covering + refinement{_at(best_ref)}, candidates >= {c_head:g} | "
               f"{_count(best_ref) if best_ref else '-'} | "
               f"{_fmt(factor, '.2f')} "
               f"(goal >= {FACTOR_GOAL:g}: {'met' if factor and factor >= FACTOR_GOAL else 'missed'}) |")]
    if rr:
        n_rr = rnd["n_90_candidates"]
        lines.append(f"| random sampling + refinement, candidates >= {c_head:g} | {_fmt(n_rr, ',.0f')}"
                     f" | {_fmt(n_random / n_rr if n_random and n_rr else None, '.2f')} |")
    if best_ref:
        lines += ["", (f"At the covering + refinement setting for 90% (L = {best_ref['max_snr_loss']:g}): median "
                       f"refined/true SNR {_fmt(best_ref['median_snr_ratio'], '.4f')} (goal >= 0.95, noiseless), "
                       "median "
                       f"refined track rms {_fmt(best_ref['median_rms_arcsec'], '.2g')} arcsec over "
                       f"{best_ref['n_refined']} refined candidates; refinement "
                       f"{best_ref['cpu_refine_per_object_s']:.2f} CPU s per object (its one compilation included).")]
    table = "\n".join(lines)
    summary = (f"{args.region}: 90% of SNR>=10 with random {_fmt(n_random, '.3g')}, covering {_fmt(n_alone, '.3g')}, "
               f"covering+refinement {_fmt(n_ref, '.3g')} (random+refinement {_fmt(rnd['n_90_candidates'], '.3g')}) "
               f"trial orbits: factor {_fmt(factor, '.3g')} (goal {FACTOR_GOAL:g}); refined/true SNR "
               f"{_fmt(best_ref and best_ref['median_snr_ratio'], '.4f')} (noiseless)")
    result = {"objects": args.objects, "snr_range": [args.snr_min, args.snr_max],
            "region": args.region, "box": survey["box"],
            "reference": survey["reference"], "cpu_setup_s": t_setup,
            "random": {"curve": [_public(p) for p in rnd["curve"]],
                       "n_90": n_random, "n_90_with_refinement": rnd["n_90_candidates"],
                       "cpu_draw_s": rnd["cpu_draw_s"], "cpu_loss_s": rnd["cpu_loss_s"], "refined": rr},
            "covering_alone": alone, "covering_refined": refined_rows,
            "n_90": {"random": n_random, "covering": n_alone, "covering_refined": n_ref},
            "factor_random_over_covering_refined": factor, "factor_random_over_covering": factor_alone,
            "synthetic_snr_fn_max_rel_diff": check, "summary": summary}
    print(json.dumps(result))
    print()
    print(table)
    return {**result, "table": table}


if __name__ == "__main__":
    main()
