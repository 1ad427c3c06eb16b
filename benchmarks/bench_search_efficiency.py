"""How fast do the study samplers find the Pareto front? Sampler efficiency on an exhaustively known space.

The layer-removal space on the embedded ``tiny`` teacher is small enough to score every point: its
cost (params, MACs) with the study Evaluator and the zero-cost proxy (output MSE against the
teacher, no training). With that table the exact Pareto front and its hypervolume are known, and
each sampler (nsga2, tpe, gp, random, bruteforce) is replayed in an in-memory Optuna study for
several seeds, looking the figures up instead of computing them. After every trial the
hypervolume of what the study has seen so far is compared with the exact one (both normalised over
all enumerated points). A last section runs one real study through ``run_study`` (SQLite storage)
and reports the framework's own share of the trial time.

Writes results/search_efficiency.{json,md,png}; the scored table is cached in
results/search_efficiency_table_<teacher>_<space>.json and reused (``--recompute`` redoes it).

    python benchmarks/bench_search_efficiency.py
    python benchmarks/bench_search_efficiency.py --objectives macs,output_mse --seeds 5 --variant tpe:n_startup_trials=40
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"

warnings.filterwarnings("ignore")

TABLE_METRICS = ("params", "macs", "macs_conv_linear", "output_mse", "latent_stat_shift")
CHECKPOINTS = (0.05, 0.10, 0.20, 0.40)
TARGET_HV, TARGET_AT = 0.95, 0.20
DEFAULT_VARIANTS = ["nsga2:population_size=50", "tpe:n_startup_trials=20", "tpe:n_startup_trials=40"]
REPEAT_STREAK = 200  # the runner's CHEAP_STREAK: a worker stops after this many repeats/rejections in a row


# -- the scored table --------------------------------------------------------------------------
def _cfg(args, **extra):
    from hybridsd_nas.study import study_from_dict

    d = {"name": "search-efficiency", "teacher": args.teacher, "space": args.space,
         "objectives": [m for m in args.objectives], "proxy": {"data_images": args.data_images, "seed": args.proxy_seed}}
    d.update(extra)
    return study_from_dict(d, "bench_search_efficiency")


def build_table(args, path: Path) -> dict[str, Any]:
    """Cost and zero-cost figures of every point of the space, cached in ``path`` (resumable)."""
    import torch
    from tqdm.auto import tqdm

    from hybridsd_nas.study import Evaluator

    ev = Evaluator(_cfg(args))
    points = list(ev.space.enumerate(ev.arch))
    settings = {"teacher": args.teacher, "space": ev.space.name, "space_version": ev.space.version,
                "space_options": ev.space.options, "proxy": ev.settings.as_dict(), "points": len(points)}
    rows: dict[str, Any] = {}
    if path.is_file() and not args.recompute:
        old = json.loads(path.read_text())
        if old.get("settings") == json.loads(json.dumps(settings)):
            rows = {r["key"]: r for r in old["rows"]}
            if len(rows) >= len(points):
                print(f"table: {len(rows)} points from {_rel(path)} (cached; --recompute to redo)")
                return old | {"scored_now": 0}
            print(f"table: resuming, {len(rows)} of {len(points)} points already in {_rel(path)}")
        else:
            print(f"table: {_rel(path)} was made with other settings; recomputing")
    meta = {"machine": _machine(), "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32",
            "device": "cpu", "threads": torch.get_num_threads(),
            "how": ("cost: Evaluator.cost (meta-device count, no weights; resolution and batch of the config defaults); "
                    "zero-cost: Evaluator.proxy(candidate, prefilter=None, quality=False), i.e. run_proxy(zero_cost_only=True): "
                    "the student inherits the teacher's weights, output MSE and latent-stat shift against the teacher on "
                    "16 fixed noisy latents drawn from the distillation data (data_images Fashion-MNIST training images)")}
    todo = [pt for pt in points if pt.candidate.key not in rows]
    t_all = time.perf_counter()

    def save():
        out = {"settings": settings, "meta": meta, "rows": [rows[pt.candidate.key] for pt in points if pt.candidate.key in rows]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=0) + "\n")
        tmp.replace(path)
        return out

    for i, pt in enumerate(tqdm(todo, desc="scoring the space", unit="point", dynamic_ncols=True)):
        cand = pt.candidate
        t0 = time.perf_counter()
        cost = ev.cost(cand)
        t1 = time.perf_counter()
        res = ev.proxy(cand, None, False)
        t2 = time.perf_counter()
        if res.get("status") != "ok":
            raise RuntimeError(f"proxy of {cand.key} returned {res.get('status')}: {res.get('reason')}")
        rows[cand.key] = {"key": cand.key, "params_choice": dict(pt.params),
                          **{m: cost[m] for m in ("params", "macs", "macs_conv_linear")},
                          **{m: float(res["zero_cost"][m]) for m in ("output_mse", "latent_stat_shift")},
                          "cost_seconds": round(t1 - t0, 4), "proxy_seconds": round(t2 - t1, 4)}
        if (i + 1) % 50 == 0:
            save()
    meta["seconds_this_run"] = round(time.perf_counter() - t_all, 1)
    meta["points_this_run"] = len(todo)
    return save() | {"scored_now": len(todo)}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _machine() -> str:
    import torch

    from hybridsd_nas.cost.latency import device_label

    return device_label(torch.device("cpu"))


# -- replaying a sampler -----------------------------------------------------------------------
class Replay:
    """The objective of an in-memory study: the space's suggestion, the figures looked up."""

    def __init__(self, space, arch, table: dict[str, Any], objectives: list[str], directions: list[str], scale, exact_hv: float,
                 target_distinct: int, max_trials: int, front_keys: set[str], max_seconds: float | None = None, bar=None):
        self.space, self.arch, self.table, self.front_keys = space, arch, table, front_keys
        self.front_found_at: list[int] = []  # evaluation count at which each exact-front member was first seen
        self.objectives, self.directions, self.scale, self.exact = objectives, directions, scale, exact_hv
        self.target_distinct, self.max_trials = target_distinct, max_trials
        self.seen: dict[str, list[float]] = {}
        self.front: list[list[float]] = []
        self.hv = 0.0
        self.by_trial: list[float] = []     # hv fraction after trial i
        self.distinct: list[int] = []       # distinct candidates evaluated after trial i
        self.invalid = 0
        self.streak = 0
        self.stopped = "budget"
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.bar = bar

    def __call__(self, trial):
        import optuna

        from hybridsd_nas.core.errors import InvalidCandidateError

        try:
            pt = self.space.suggest(trial, self.arch)
        except InvalidCandidateError:
            self.invalid += 1
            self._after(False)
            raise optuna.TrialPruned("invalid candidate") from None
        key = pt.candidate.key
        vals = [float(self.table[key][m]) for m in self.objectives]
        new = key not in self.seen
        if new:
            self.seen[key] = vals
            if key in self.front_keys:
                self.front_found_at.append(len(self.seen))
            self._update(vals)
        self._after(new)
        return vals[0] if len(vals) == 1 else vals

    def _update(self, vals: list[float]) -> None:
        import numpy as np

        from hybridsd_nas.study import hypervolume, nondominated

        pts = np.array(self.front + [vals])
        mask = nondominated(pts, self.directions)
        if not mask[-1]:
            return
        self.front = [list(p) for p, m in zip(pts, mask) if m]
        self.hv = hypervolume(np.array(self.front), self.directions, self.scale)

    def _after(self, new: bool) -> None:
        self.by_trial.append(self.hv / self.exact)
        self.distinct.append(len(self.seen))
        self.streak = 0 if new else self.streak + 1

    def callback(self, study, trial) -> None:
        if self.bar is not None:
            self.bar.n = len(self.seen)
            self.bar.set_postfix(trials=len(self.by_trial), hv=f"{self.hv / self.exact:.4f}", refresh=False)
            self.bar.update(0)
        if len(self.seen) >= self.target_distinct:
            self.stopped = "budget"
            study.stop()
        elif len(self.by_trial) >= self.max_trials:
            self.stopped = "max_trials"
            study.stop()
        elif self.streak >= REPEAT_STREAK:
            self.stopped = "repeats"
            study.stop()
        elif self.deadline is not None and time.perf_counter() >= self.deadline:
            self.stopped = "time"
            study.stop()

    def by_evaluation(self) -> list[float]:
        """hv fraction after the e-th distinct candidate (index e-1)."""
        out: list[float] = []
        for d, h in zip(self.distinct, self.by_trial):
            if d > len(out):
                out.append(h)
        return out


def replay(args, label: str, sampler: str, options: dict[str, Any], seed: int, space, arch, table, directions, scale, exact_hv,
           n_points: int, front_keys: set[str]) -> dict[str, Any]:
    import optuna
    from tqdm.auto import tqdm

    from hybridsd_nas.study import make_sampler

    cfg = _cfg(args, sampler={"name": sampler, "seed": seed, **options})
    full = sampler == "bruteforce" and not args.bruteforce_budget_only
    target = n_points if full else math.ceil(args.budget * n_points)
    max_trials = (10 * (space.raw_size(arch) or n_points)) if full else math.ceil(args.max_trials_factor * n_points)
    if sampler == "gp" and args.gp_max_trials:
        max_trials = min(max_trials, args.gp_max_trials)
    bar = tqdm(total=target, desc=f"{label} seed {seed}", unit="eval", leave=False, dynamic_ncols=True, mininterval=1.0)
    obj = Replay(space, arch, table, list(args.objectives), directions, scale, exact_hv, target, max_trials, front_keys,
                 max_seconds=args.max_seconds_per_run, bar=bar)
    study = optuna.create_study(directions=directions, sampler=make_sampler(cfg))
    t0 = time.perf_counter()
    study.optimize(obj, n_trials=max_trials, callbacks=[obj.callback], gc_after_trial=False, show_progress_bar=False)
    secs = time.perf_counter() - t0
    bar.close()
    if len(obj.seen) >= target:
        obj.stopped = "whole space" if full else "budget"
    elif obj.stopped == "budget":  # no stop rule of ours fired: the sampler ended the study (bruteforce's grid is done)
        obj.stopped = "sampler finished"
    by_eval = obj.by_evaluation()
    reach = next((i + 1 for i, h in enumerate(by_eval) if h >= TARGET_HV - 1e-12), None)
    reach_99 = next((i + 1 for i, h in enumerate(by_eval) if h >= 0.99 - 1e-12), None)
    reach_full = next((i + 1 for i, h in enumerate(by_eval) if h >= 1 - 1e-9), None)
    reach_t = next((i + 1 for i, h in enumerate(obj.by_trial) if h >= TARGET_HV - 1e-12), None)
    return {"label": label, "sampler": sampler, "options": options, "seed": seed, "trials": len(obj.by_trial),
            "distinct": len(obj.seen), "invalid": obj.invalid, "stopped": obj.stopped, "seconds": round(secs, 2),
            "final_hv_fraction": round(obj.hv / exact_hv, 5),
            "evaluations_to_95": reach, "trials_to_95": reach_t, "evaluations_to_99": reach_99, "evaluations_to_100": reach_full,
            "front_found": len(obj.front_found_at), "front_size": len(front_keys), "front_found_at": obj.front_found_at,
            "hv_by_evaluation": [round(h, 5) for h in by_eval], "hv_by_trial": [round(h, 5) for h in obj.by_trial]}


def _at(curve: list[float], n: int) -> tuple[float, bool]:
    """Value after the n-th step, or the last value when the run ended earlier (flagged)."""
    if not curve:
        return 0.0, False
    if n <= len(curve):
        return curve[n - 1], True
    return curve[-1], False


def summarise(runs: list[dict[str, Any]], n_points: int) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "checkpoints": {}}
    for axis, key in (("evaluations", "hv_by_evaluation"), ("trials", "hv_by_trial")):
        cp = {}
        for f in CHECKPOINTS:
            n = math.ceil(f * n_points)
            vals = [_at(r[key], n) for r in runs]
            cp[f"{round(f * 100)}%"] = {"n": n, "mean": round(statistics.fmean(v for v, _ in vals), 4),
                                        "min": round(min(v for v, _ in vals), 4), "max": round(max(v for v, _ in vals), 4),
                                        "runs_short_of_n": sum(not ok for _, ok in vals)}
        out["checkpoints"][axis] = cp
    reach = [r["evaluations_to_95"] for r in runs]
    out["evaluations_to_95"] = reach
    out["evaluations_to_95_mean"] = round(statistics.fmean(reach), 1) if all(x is not None for x in reach) else None
    out["evaluations_to_95_worst"] = max(reach) if all(x is not None for x in reach) else None
    out["trials_to_95"] = [r["trials_to_95"] for r in runs]
    out["evaluations_to_99"] = [r["evaluations_to_99"] for r in runs]
    out["evaluations_to_100"] = [r["evaluations_to_100"] for r in runs]
    out["front_recall"] = {}
    for f in CHECKPOINTS:
        n = math.ceil(f * n_points)
        rec = [sum(a <= n for a in r["front_found_at"]) / r["front_size"] for r in runs]
        out["front_recall"][f"{round(f * 100)}%"] = {"n": n, "mean": round(statistics.fmean(rec), 3), "min": round(min(rec), 3),
                                                     "sem": round(statistics.stdev(rec) / math.sqrt(len(rec)), 3) if len(rec) > 1 else None,
                                                     "runs_short_of_n": sum(r["distinct"] < n for r in runs)}
    limit = math.ceil(TARGET_AT * n_points)
    ok = [x is not None and x <= limit for x in reach]
    out["target"] = {"rule": f">= {TARGET_HV:.0%} of the exact hypervolume within {TARGET_AT:.0%} of the evaluations "
                             f"({limit} distinct candidates)",
                     "seeds_meeting": sum(ok), "seeds": len(ok), "met_every_seed": all(ok),
                     "met_on_mean": out["checkpoints"]["evaluations"][f"{round(TARGET_AT * 100)}%"]["mean"] >= TARGET_HV}
    out["trials_mean"] = round(statistics.fmean(r["trials"] for r in runs), 1)
    out["distinct_mean"] = round(statistics.fmean(r["distinct"] for r in runs), 1)
    out["duplicate_share"] = round(1 - sum(r["distinct"] for r in runs) / max(sum(r["trials"] for r in runs), 1), 3)
    out["stopped"] = sorted({r["stopped"] for r in runs})
    out["seconds_per_seed_mean"] = round(statistics.fmean(r["seconds"] for r in runs), 2)
    out["sampler_ms_per_trial"] = round(1000 * sum(r["seconds"] for r in runs) / max(sum(r["trials"] for r in runs), 1), 2)
    return out


# -- the framework's overhead in a real study ---------------------------------------------------
def overhead(args) -> dict[str, Any]:
    import optuna

    from hybridsd_nas.study import evaluated, run_study

    with tempfile.TemporaryDirectory(prefix="bench-search-eff-") as d:
        url = f"sqlite:///{Path(d) / 'study.db'}"
        cfg = _cfg(args, name="search-efficiency-overhead", trials=args.overhead_trials, storage=url,
                   artifacts=str(Path(d) / "artifacts"), sampler={"name": args.overhead_sampler, "seed": 0})
        t0 = time.perf_counter()
        summary = run_study(cfg, progress=False)
        wall = time.perf_counter() - t0
        study = optuna.load_study(study_name=cfg.name, storage=url)
        trials = study.get_trials(deepcopy=False)

        def stats(sel) -> dict[str, Any]:
            tm = [t.user_attrs["timings"] for t in sel if "timings" in t.user_attrs]
            if not tm:
                return {"trials": 0}
            ratio = [x["overhead_seconds"] / x["trial_seconds"] for x in tm if x["trial_seconds"] > 0]
            ov = [x["overhead_seconds"] * 1000 for x in tm]
            walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in sel if t.datetime_complete and t.datetime_start]
            outside = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["timings"]["trial_seconds"]
                       for t in sel if t.datetime_complete and t.datetime_start and "timings" in t.user_attrs]
            return {"trials": len(tm),
                    "overhead_fraction_median": round(statistics.median(ratio), 4),
                    "overhead_fraction_mean": round(statistics.fmean(ratio), 4),
                    "overhead_ms_median": round(statistics.median(ov), 1), "overhead_ms_mean": round(statistics.fmean(ov), 1),
                    "overhead_ms_max": round(max(ov), 1),
                    "trial_seconds_median": round(statistics.median(x["trial_seconds"] for x in tm), 4),
                    "cost_seconds_median": round(statistics.median(x.get("cost_seconds", 0.0) for x in tm), 4),
                    "proxy_seconds_median": round(statistics.median(x.get("proxy_seconds", 0.0) for x in tm), 4),
                    "optuna_wall_seconds_median": round(statistics.median(walls), 4) if walls else None,
                    "outside_objective_ms_median": round(1000 * statistics.median(outside), 1) if outside else None}

        ev_trials = [t for t in trials if evaluated(t)]
        work = sum(t.user_attrs.get("timings", {}).get(k, 0.0) for t in trials
                   for k in ("cost_seconds", "proxy_seconds", "artifact_seconds"))
        return {"config": {"teacher": cfg.teacher, "space": cfg.space, "objectives": [o.metric for o in cfg.objectives],
                           "sampler": cfg.sampler, "seed": cfg.seed, "trials": cfg.trials, "proxy": cfg.proxy,
                           "storage": "sqlite (temporary directory)", "progress": False},
                "run_study": {k: summary[k] for k in ("evaluated", "stopped", "front_size")} | {"trials_run": len(summary["trials_run"])},
                "evaluated_trials": stats(ev_trials),
                "all_trials": stats(trials),
                "states": {s: sum((t.user_attrs.get("status") or t.state.name.lower()) == s for t in trials)
                           for s in sorted({t.user_attrs.get("status") or t.state.name.lower() for t in trials})},
                "run_study_wall_seconds": round(wall, 2),
                "run_study_outside_work_fraction": round(1 - work / wall, 4),
                "note": ("overhead_seconds is the study objective's figure (hybridsd_nas.study.objective): trial_seconds (time inside the objective) minus cost counting, "
                         "the proxy and the artifact upload; it does not include the sampler's relative sampling, the storage "
                         "write of the result, or the worker loop between trials (stale-trial check, counts, Pareto front for "
                         "the progress bar). run_study_outside_work_fraction is 1 - (cost + proxy + artifact seconds) / the "
                         "wall time of the whole run_study call, process start-up of the Evaluator and pipeline load included.")}


# -- output ------------------------------------------------------------------------------------
def plot(path: Path, results: dict[str, Any], n_points: int, front_size: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def curves(runs, key):
        if key == "front":
            n = max(len(r["hv_by_evaluation"]) for r in runs)
            return np.array([[sum(a <= e for a in r["front_found_at"]) / front_size for e in range(1, n + 1)] for r in runs])
        n = max(len(r[key]) for r in runs)
        return np.array([r[key] + [r[key][-1]] * (n - len(r[key])) for r in runs])

    defaults = [k for k, v in results.items() if not v["options"]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {k: colours[i % len(colours)] for i, k in enumerate(defaults)}
    style = {}
    for k, v in results.items():
        if v["options"]:
            same = [x for x in results if results[x]["sampler"] == v["sampler"] and results[x]["options"]]
            style[k] = (colour.get(v["sampler"], "grey"), ("--", "-.", ":", (0, (5, 1)))[same.index(k) % 4])
        else:
            style[k] = (colour[k], "-")
    variant_samplers = {v["sampler"] for v in results.values() if v["options"]}
    panels = [("hv_by_evaluation", defaults, "distinct candidates evaluated (% of the space)",
               "hypervolume / exact", "make_sampler defaults, by evaluations"),
              ("hv_by_evaluation", [k for k, v in results.items() if v["sampler"] in variant_samplers],
               "distinct candidates evaluated (% of the space)", "hypervolume / exact", "option variants, by evaluations"),
              ("hv_by_trial", defaults, "trials (% of the space size)", "hypervolume / exact", "make_sampler defaults, by trials"),
              ("front", list(results), "distinct candidates evaluated (% of the space)",
               f"share of the exact front found ({front_size} points)", "exact-front members found")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, (key, labels, xl, yl, sub) in zip(axes.flat, panels, strict=True):
        for label in labels:
            runs = results[label]["runs"]
            a = curves(runs, key)
            x = 100 * np.arange(1, a.shape[1] + 1) / n_points
            c, ls = style[label]
            ax.plot(x, a.mean(0), color=c, ls=ls, lw=1.5, label=f"{label} ({len(runs)} seeds)")
            if not results[label]["options"]:  # bands for make_sampler's defaults only, to stay readable
                ax.fill_between(x, a.min(0), a.max(0), color=c, alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_xlim(100 / n_points, 100 if key != "hv_by_trial" else 200)
        ticks = [0.2, 0.5, 1, 2, 5, 10, 20, 40, 100]
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.axvline(100 * TARGET_AT, color="k", ls=":", lw=0.8)
        if key == "front":
            ax.set_ylim(0, 1.01)
        else:
            ax.axhline(TARGET_HV, color="k", ls="--", lw=0.8)
            ax.set_ylim(0.5, 1.005)
            ax.text(100 / n_points * 1.1, TARGET_HV + 0.004, f"{TARGET_HV:.0%}", fontsize=8)
        ax.text(100 * TARGET_AT * 0.97, 0.51 if key != "front" else 0.01, f"{TARGET_AT:.0%}", fontsize=8, ha="right")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(sub, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left" if key == "front" else "center right")
    fig.suptitle(title + "\nmean over seeds; band = min to max over seeds (drawn for make_sampler's defaults); log x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rec: dict[str, Any]) -> str:
    m, ex = rec["meta"], rec["exact"]
    n = ex["points"]
    L = [f"# Search efficiency: how fast each sampler finds the Pareto front ({m['teacher']} teacher, {m['space']} space)", "",
         f"Objectives: {', '.join(f'{o} ({d})' for o, d in zip(m['objectives'], m['directions']))}. "
         f"The space has {n} distinct candidates ({ex['raw_size']} raw choice combinations); the exact Pareto front, "
         f"found by scoring every point, has {ex['front_size']} points. Hypervolumes are normalised over all {n} points "
         f"(best 0, worst 1, reference point 1.1); the exact hypervolume is {ex['hypervolume']:.5f}.", "",
         "## Hypervolume found, as a fraction of the exact one", "",
         f"By **evaluations** (distinct candidates scored, what the study trial budget counts). Mean over seeds, min in "
         f"brackets; {', '.join(f'{round(f * 100)}% = {math.ceil(f * n)}' for f in CHECKPOINTS)} evaluations.", "",
         "| sampler | seeds | " + " | ".join(f"{round(f * 100)}%" for f in CHECKPOINTS)
         + " | evaluations to 95% (mean / worst) | 95% within 20%? | trials run (mean) | repeats | sampler ms / trial |",
         "|---|---|" + "---|" * len(CHECKPOINTS) + "---|---|---|---|---|"]
    for label, res in rec["samplers"].items():
        s = res["summary"]
        cells = []
        for f in CHECKPOINTS:
            c = s["checkpoints"]["evaluations"][f"{round(f * 100)}%"]
            short = "*" if c["runs_short_of_n"] else ""
            cells.append(f"{c['mean']:.3f} ({c['min']:.3f}){short}")
        reach = s["evaluations_to_95"]
        if all(x is not None for x in reach):
            r95 = f"{s['evaluations_to_95_mean']:.0f} / {s['evaluations_to_95_worst']}"
        else:
            got = [x for x in reach if x is not None]
            r95 = f"{len(reach) - len(got)} of {len(reach)} seeds never" + (f"; others {min(got)}-{max(got)}" if got else "")
        t = s["target"]
        verdict = ("**yes**, every seed" if t["met_every_seed"] else
                   f"on the mean only ({t['seeds_meeting']}/{t['seeds']} seeds)" if t["met_on_mean"] else
                   f"**no** ({t['seeds_meeting']}/{t['seeds']} seeds)")
        L.append(f"| {label} | {len(s['seeds'])} | " + " | ".join(cells) + f" | {r95} | {verdict} | {s['trials_mean']:.0f} | "
                 f"{s['duplicate_share']:.0%} | {s['sampler_ms_per_trial']:.1f} |")
    L += ["", "\\* at least one seed ended before that many evaluations (the last value is used; see `stopped` in the JSON).",
          "", f"By **trials** (every suggestion, repeats of an already-scored candidate included; "
              f"{', '.join(f'{round(f * 100)}% = {math.ceil(f * n)}' for f in CHECKPOINTS)} trials):", "",
          "| sampler | " + " | ".join(f"{round(f * 100)}%" for f in CHECKPOINTS) + " | trials to 95% (per seed) |",
          "|---|" + "---|" * len(CHECKPOINTS) + "---|"]
    for label, res in rec["samplers"].items():
        s = res["summary"]
        cells = [f"{s['checkpoints']['trials'][f'{round(f * 100)}%']['mean']:.3f} ({s['checkpoints']['trials'][f'{round(f * 100)}%']['min']:.3f})"
                 for f in CHECKPOINTS]
        L.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join('never' if x is None else str(x) for x in s['trials_to_95'])} |")
    L += ["", f"Finding the whole front ({ex['front_size']} points): share of the exact front's members evaluated by "
              "x% of the evaluations (mean, min in brackets), and evaluations to 99% and to 100% of the exact hypervolume per seed.", "",
          "| sampler | " + " | ".join(f"front found at {round(f * 100)}%" for f in CHECKPOINTS) + " | evaluations to 99% | to 100% |",
          "|---|" + "---|" * len(CHECKPOINTS) + "---|---|"]
    for label, res in rec["samplers"].items():
        s = res["summary"]
        fr = s["front_recall"]
        cells = [f"{fr[f'{round(f * 100)}%']['mean']:.0%} ({fr[f'{round(f * 100)}%']['min']:.0%})"
                 + ("*" if fr[f"{round(f * 100)}%"]["runs_short_of_n"] else "") for f in CHECKPOINTS]
        fmt = lambda xs: ", ".join("-" if x is None else str(x) for x in xs)  # noqa: E731
        L.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(s['evaluations_to_99'])} | {fmt(s['evaluations_to_100'])} |")
    L += ["", "(- : not reached within the run's budget; * : at least one seed ended before that many evaluations, so the "
              "share is what it had found by its end.)", "",
          f"![hypervolume fraction vs evaluations]({rec['files']['png']})", ""]
    if rec.get("recommendation"):
        L += ["## Sampler settings", "", rec["recommendation"], ""]
    ov = rec.get("overhead")
    if ov:
        e, a = ov["evaluated_trials"], ov["all_trials"]
        L += ["## Framework overhead in a real study", "",
              f"One study through `run_study`: {ov['config']['space']} on {ov['config']['teacher']}, objectives "
              f"{' + '.join(ov['config']['objectives'])}, sampler {ov['config']['sampler']} (seed {ov['config']['seed']}), "
              f"{ov['config']['trials']} evaluated trials, SQLite storage in a temporary directory, progress bar off "
              f"({ov['run_study']['trials_run']} trials run in all; statuses {ov['states']}).", "",
              "| trials | n | overhead / trial time, median | mean | overhead ms, median | mean | max | trial s, median | cost s | proxy s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for name, x in (("new candidates", e), ("all (repeats included)", a)):
            if x.get("trials"):
                L.append(f"| {name} | {x['trials']} | {x['overhead_fraction_median']:.1%} | {x['overhead_fraction_mean']:.1%} | "
                         f"{x['overhead_ms_median']:.1f} | {x['overhead_ms_mean']:.1f} | {x['overhead_ms_max']:.1f} | "
                         f"{x['trial_seconds_median']:.3f} | {x['cost_seconds_median']:.3f} | {x['proxy_seconds_median']:.3f} |")
        L += ["", f"Outside the objective (Optuna's relative sampling and the storage write of the result, from the trial's "
                  f"datetime_start/complete): {e.get('outside_objective_ms_median')} ms median per new-candidate trial, not part of "
                  "overhead_seconds.", "",
              f"Whole `run_study` call: {ov['run_study_wall_seconds']:.1f} s, of which "
                  f"{ov['run_study_outside_work_fraction']:.0%} is outside cost counting and the proxy. {ov['note']}", ""]
    L += ["## How measured", ""]
    L += [f"- {x}" for x in rec["how_measured"]]
    L += ["", f"Rerun: `{rec['command']}`", ""]
    return "\n".join(L)


def parse_variant(s: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = s.partition(":")
    opts: dict[str, Any] = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        opts[k.strip()] = int(v)
    return name.strip(), opts


def label_of(name: str, opts: dict[str, Any]) -> str:
    return name + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="tiny")
    p.add_argument("--space", default="layer-removal")
    p.add_argument("--objectives", default="macs,output_mse", help=f"comma-separated, from {', '.join(TABLE_METRICS)}")
    p.add_argument("--samplers", default="nsga2,tpe,gp,random,bruteforce", help="samplers at make_sampler's default options")
    p.add_argument("--variant", action="append", default=None,
                   help="extra sampler settings, e.g. tpe:n_startup_trials=40 or nsga2:population_size=50 (repeatable; "
                        f"'none' for no extra ones; default {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--bruteforce-seeds", type=int, default=3, help="seeds for bruteforce (a sanity check: the whole grid each)")
    p.add_argument("--gp-seeds", type=int, default=3, help="seeds for gp (its sampling takes seconds per trial after a few hundred trials)")
    p.add_argument("--gp-max-trials", type=int, default=160, help="trial cap of a gp run (0: the common cap)")
    p.add_argument("--budget", type=float, default=0.4, help="distinct candidates to evaluate, as a fraction of the space")
    p.add_argument("--max-trials-factor", type=float, default=2.0, help="trial cap, as a multiple of the space size")
    p.add_argument("--max-seconds-per-run", type=float, default=240.0,
                   help="wall-clock cap of one sampler run (one seed); a run stopped by it is marked 'time'")
    p.add_argument("--bruteforce-budget-only", action="store_true", help="stop bruteforce at --budget too (default: the whole grid)")
    p.add_argument("--data-images", type=int, default=256, help="ProxySettings.data_images for the zero-cost proxy")
    p.add_argument("--proxy-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 threads on a busy 2-core machine ran 15x slower)")
    p.add_argument("--recompute", action="store_true", help="score the space again instead of reusing the cached table")
    p.add_argument("--overhead-trials", type=int, default=30, help="trials of the real run_study (0: skip)")
    p.add_argument("--overhead-sampler", default="tpe")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.objectives = [m.strip() for m in args.objectives.split(",") if m.strip()]
    bad = [m for m in args.objectives if m not in TABLE_METRICS]
    if bad:
        p.error(f"--objectives: {bad[0]!r} is not one of {', '.join(TABLE_METRICS)}")
    variants = [(s.strip(), {}) for s in args.samplers.split(",") if s.strip()]
    extra = DEFAULT_VARIANTS if args.variant is None else \
        [v for v in args.variant if v != "none"]
    variants += [parse_variant(v) for v in extra]

    import numpy as np
    import optuna
    import torch

    from hybridsd_nas.study import HV_NOTE, METRICS, hypervolume, nondominated, normaliser

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. the table
    table_path = out / f"search_efficiency_table_{args.teacher}_{args.space}.json"
    t0 = time.perf_counter()
    tab = build_table(args, table_path)
    table_now = {"seconds": round(time.perf_counter() - t0, 1), "scored": tab.pop("scored_now", 0)}
    rows = {r["key"]: r for r in tab["rows"]}
    from hybridsd_nas.arch import describe
    from hybridsd_nas.spaces import load_space

    arch, space = describe(args.teacher), load_space(args.space)
    n_points = len(rows)

    # 2. the exact front
    directions = [METRICS[m][1] for m in args.objectives]
    keys = list(rows)
    allv = np.array([[rows[k][m] for m in args.objectives] for k in keys], float)
    scale = normaliser(allv, directions)
    exact_hv = hypervolume(allv, directions, scale)
    mask = nondominated(allv, directions)
    front = sorted(([keys[i], *allv[i].tolist()] for i in np.flatnonzero(mask)), key=lambda r: r[1])
    front_keys = {r[0] for r in front}
    print(f"exact front: {len(front)} of {n_points} points, hypervolume {exact_hv:.5f} (normalised over all points)")

    # 3. the samplers
    results: dict[str, Any] = {}
    for name, opts in variants:
        label = label_of(name, opts)
        n_seeds = args.gp_seeds if (name == "gp" and args.gp_seeds is not None) else args.seeds
        if name == "bruteforce":
            n_seeds = args.bruteforce_seeds
        runs = []
        for seed in range(n_seeds):
            r = replay(args, label, name, opts, seed, space, arch, rows, directions, scale, exact_hv, n_points, front_keys)
            runs.append(r)
            print(f"{label:32s} seed {seed}: {r['trials']:5d} trials, {r['distinct']:4d} distinct, final {r['final_hv_fraction']:.4f}, "
                  f"95% after {r['evaluations_to_95']} evaluations / {r['trials_to_95']} trials, 99% after {r['evaluations_to_99']}, "
                  f"whole front after {r['evaluations_to_100']}, {r['seconds']:.1f} s ({r['stopped']})",
                  flush=True)
        results[label] = {"sampler": name, "options": opts, "summary": summarise(runs, n_points), "runs": runs}

    # 5. overhead
    ov = overhead(args) if args.overhead_trials > 0 else None
    if ov:
        e = ov["evaluated_trials"]
        print(f"overhead: median {e['overhead_fraction_median']:.1%}, mean {e['overhead_fraction_mean']:.1%} of the trial time "
              f"({e['overhead_ms_median']:.1f} ms median) over {e['trials']} evaluated trials")

    files = {"json": "search_efficiency.json", "md": "search_efficiency.md", "png": "search_efficiency.png",
             "table": table_path.name}
    cmd = "python benchmarks/bench_search_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tm = tab["meta"]
    rec = {
        "meta": {"teacher": args.teacher, "space": args.space, "objectives": args.objectives, "directions": directions,
                 "machine": _machine(), "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                 "optuna": optuna.__version__, "python": platform.python_version(), "dtype": "float32",
                 "seeds": args.seeds, "gp_seeds": args.gp_seeds, "gp_max_trials": args.gp_max_trials,
                 "bruteforce_seeds": args.bruteforce_seeds, "max_seconds_per_run": args.max_seconds_per_run,
                 "budget_fraction_of_space": args.budget, "max_trials_factor": args.max_trials_factor,
                 "repeat_streak_stop": REPEAT_STREAK, "proxy_settings": tab["settings"]["proxy"],
                 "table_made_on": tm.get("machine"), "table_torch": tm.get("torch"),
                 "table_seconds_per_point_median": round(statistics.median(r["cost_seconds"] + r["proxy_seconds"] for r in rows.values()), 3),
                 "seconds_total_this_run": None},
        "exact": {"points": n_points, "raw_size": space.raw_size(arch), "front_size": len(front), "hypervolume": exact_hv,
                  "hypervolume_note": HV_NOTE.replace("the trials compared", f"all {n_points} enumerated points"),
                  "front": [{"key": r[0], **dict(zip(args.objectives, r[1:]))} for r in front],
                  "objective_ranges": {m: [float(allv[:, i].min()), float(allv[:, i].max())] for i, m in enumerate(args.objectives)}},
        "samplers": results,
        "overhead": ov,
        "files": files,
        "command": cmd.strip(),
        "how_measured": [
            f"Table: every distinct candidate of `{args.space}` on `{args.teacher}` (`space.enumerate`), scored once: "
            f"{tm['how']}. ProxySettings default except data_images={args.data_images} (seed {args.proxy_seed}). "
            f"Made on {tm.get('machine')}, torch {tm.get('torch')}, float32, CPU; median "
            f"{statistics.median(r['cost_seconds'] for r in rows.values()):.3f} s cost + "
            f"{statistics.median(r['proxy_seconds'] for r in rows.values()):.3f} s zero-cost proxy per point. "
            f"Cached in `results/{table_path.name}`; reruns reuse it unless `--recompute`.",
            "Exact front: non-dominated rows of the whole table (`results.nondominated`); exact hypervolume with "
            "`results.hypervolume`, every figure normalised with one `results.normaliser` built over all points (the "
            "same scale for the samplers' running hypervolume, so the fractions are comparable and reach exactly 1 "
            "only when the whole front is found).",
            "Samplers: `optuna.create_study(directions=..., sampler=make_sampler(cfg))` in memory, cfg from "
            "`study_from_dict` with the sampler's name, seed and options (`make_sampler`'s defaults unless a variant "
            "names them). The objective calls `space.suggest(trial, arch)` and looks the figures up by candidate key; "
            "an invalid combination raises `TrialPruned`; a repeat of an already-scored candidate returns its figures "
            "again (as `run_study` does for duplicates) and counts as a trial but not as an evaluation.",
            f"Budget: until {args.budget:.0%} of the space ({math.ceil(args.budget * n_points)} distinct candidates) is "
            f"evaluated, capped at {args.max_trials_factor:g} x the space size in trials or {REPEAT_STREAK} repeats in a row "
            "(the runner's own stop rule); bruteforce runs its whole grid (it enumerates raw choice combinations, "
            "several of which are the same candidate when the innermost stage is dropped).",
            "Running hypervolume: after every trial, of the distinct candidates seen so far, over the exact hypervolume. "
            "'At x% of the evaluations' is the value right after the ceil(x * space size)-th distinct candidate; "
            "'by trials' after the ceil(x * space size)-th trial. Evaluations to 95%: the first evaluation count at which "
            "the fraction is >= 0.95.",
            f"Seeds: 0..{args.seeds - 1} for every sampler but bruteforce (0..{args.bruteforce_seeds - 1}) and gp; gp: seeds 0..{args.gp_seeds - 1} and at most "
            f"{args.gp_max_trials or 'the common cap of'} trials per run, because its sampling time grows with the trial "
            "count (a run without the trial cap, `--samplers gp --gp-seeds 1 --gp-max-trials 0 --max-seconds-per-run 300 "
            "--variant none`, reached 384 trials and 88 candidates in 300 s), so its 20% and 40% columns are marked as runs "
            "that ended early. Every run is also capped at "
            f"{args.max_seconds_per_run:g} s of wall time (stopped 'time'). The sampler ms / trial column is the replay's "
            f"wall time per trial on {_machine()}: lookups, so it is the sampler's own cost. Samplers with the same seed "
            "share their random start-up trials, hence identical early curves.",
            f"Torch threads: {args.threads} (the table and the overhead study); with 2 threads on this 2-core machine while "
            "another process used a core, the proxy ran about 15x slower.",
        ],
    }
    if ov:
        rec["how_measured"].append(
            f"Overhead: `run_study` with `sqlite:///<tmp>/study.db`, {args.overhead_trials} evaluated trials, "
            f"sampler {args.overhead_sampler} seed 0, the same proxy settings, progress off, in this process after the "
            "replays (pipeline and data caches warm). From each trial's `user_attrs['timings']`: overhead_seconds / "
            "trial_seconds and overhead_seconds (hybridsd_nas.study.objective: everything in the objective except cost counting, the proxy "
            "and the artifact upload).")
    rec["recommendation"] = recommend(results)
    rec["meta"]["seconds_total_this_run"] = round(time.perf_counter() - t_start, 1)
    rec["meta"]["table_this_run"] = table_now
    rec["how_measured"].append(
        f"Run time: {rec['meta']['seconds_total_this_run']:.0f} s for this run, "
        + (f"{table_now['scored']} table points scored in it ({table_now['seconds']:.0f} s)" if table_now["scored"]
           else f"the table read from the cache ({table_now['seconds']:.0f} s)")
        + (f"; the run that made the table scored {tm['points_this_run']} points in {tm['seconds_this_run']:.0f} s"
           if tm.get("seconds_this_run") else "") + ".")
    (out / files["json"]).write_text(_dumps(_compact(rec)))
    title = (f"{args.teacher} / {args.space}: {n_points} candidates, objectives {' + '.join(args.objectives)}, "
             f"exact front {len(front)} points")
    plot(out / files["png"], results, n_points, len(front), title)
    (out / files["md"]).write_text(markdown(rec))
    print(markdown(rec))
    print(f"wrote {out / files['json']}, {out / files['md']}, {out / files['png']} in {rec['meta']['seconds_total_this_run']:.0f} s")
    return 0


def _steps(curve: list[float]) -> list[list[float]]:
    """[[n, value], ...] at each n (1-based) where the curve changes: the whole curve, far smaller."""
    out: list[list[float]] = []
    for i, v in enumerate(curve):
        if not out or v != out[-1][1]:
            out.append([i + 1, v])
    return out


def _dumps(obj: Any) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    import re

    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def _compact(rec: dict[str, Any]) -> dict[str, Any]:
    rec = dict(rec, samplers={k: dict(v, runs=[dict(r) for r in v["runs"]]) for k, v in rec["samplers"].items()})
    for v in rec["samplers"].values():
        for r in v["runs"]:
            for key in ("hv_by_evaluation", "hv_by_trial"):
                r[key + "_steps"] = _steps(r.pop(key))
    rec["curves_note"] = ("hv_by_evaluation_steps / hv_by_trial_steps: [n, hypervolume fraction] where the running fraction "
                          "changes after the n-th distinct candidate / trial; it holds until the next entry and until the "
                          "run's distinct / trials count")
    return rec


def recommend(results: dict[str, Any]) -> str:
    """Which setting to prefer: ranked by meeting the target in every seed, then the mean share of the exact
    front found by 20% of the evaluations, then the worst seed's evaluations to 99% of the hypervolume."""
    def key(item):
        s = item[1]["summary"]
        r99 = s["evaluations_to_99"]
        worst99 = max(r99) if all(x is not None for x in r99) else math.inf
        return (0 if s["target"]["met_every_seed"] else 1, -s["front_recall"]["20%"]["mean"], worst99)

    ranked = sorted(((k, v) for k, v in results.items() if v["sampler"] != "bruteforce"), key=key)
    if not ranked:
        return ""
    best, s = ranked[0][0], ranked[0][1]["summary"]
    close = ""
    if len(ranked) > 1:
        second, s2 = ranked[1][0], ranked[1][1]["summary"]
        a, b = s["front_recall"]["20%"], s2["front_recall"]["20%"]
        if a["sem"] is not None and b["sem"] is not None:
            diff, se = a["mean"] - b["mean"], math.hypot(a["sem"], b["sem"])
            close = (f" Its lead over {second} ({diff:+.1%} of the front by 20%) is "
                     + ("within two standard errors" if diff < 2 * se else "more than two standard errors")
                     + f" ({se:.1%}) over {len(s['seeds'])} seeds.")
    lines = [f"Ranked by (95% within 20% in every seed, mean share of the exact front found by 20% of the evaluations, "
             f"worst seed's evaluations to 99% of the hypervolume): {', '.join(k for k, _ in ranked)}. "
             f"First: **{best}** ({s['front_recall']['20%']['mean']:.0%} of the front found by 20%, "
             f"99% of the hypervolume after {', '.join('-' if x is None else str(x) for x in s['evaluations_to_99'])} evaluations)."
             + close]
    rnd = results.get("random")
    if rnd is not None and rnd["summary"]["target"]["met_every_seed"]:
        c = rnd["summary"]["checkpoints"]["evaluations"]["20%"]
        lines.append(f"Random sampling meets the 95%-within-20% target as well (mean {c['mean']:.3f}, min {c['min']:.3f} at 20%): "
                     "on this space the hypervolume is carried by a few corner points of the front, so the target does not "
                     "separate the samplers; the share of the front found and the evaluations to 99% / 100% do.")
    gp = [v for v in results.values() if v["sampler"] == "gp"]
    if gp:
        g = gp[0]["runs"]
        per = statistics.fmean(r["seconds"] / max(r["trials"], 1) for r in g)
        lines.append(f"gp: {per:.2f} s of sampling per trial on average over its {statistics.fmean(r['trials'] for r in g):.0f}-trial "
                     f"runs (the replay's own work is lookups), and {gp[0]['summary']['duplicate_share']:.0%} of its trials repeat a "
                     "candidate already scored.")
    return " ".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
