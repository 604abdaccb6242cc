"""Skip tables vs sampling with fewer steps, on a digits teacher: the teacher's own quality-vs-steps curve first.

    OMP_NUM_THREADS=1 python benchmarks/skipping.py --teacher runs/demo/teacher --n 1000 \
        --out benchmarks/results/skipping_demo.json --work runs/bench-skipping-demo
    ... --stage wall      # then: back-to-back wall times at batch 64 and batch 1
    ... --stage grids     # and a grid of 64 samples per row, in <work>/grids/
    ... --stage report --report benchmarks/results/skipping_demo.json

1. The curve: FID/KID (digits features, `--n` samples, seed 0; conditional teachers: classifier-free guidance at
   `--guidance-scale`, the recorded classes or prompts in turn, and class agreement — the share of samples the
   digits classifier assigns to their condition, the CLIP score of this domain) of the teacher with DDIM and
   DPM-Solver++ at each step count in `--ddim-steps` / `--dpm-steps`.
2. For each reference sampler (DDIM at `--refs` steps, `nstar` = the DDIM step count with the best FID on the curve,
   or SAMPLER-STEPS: dpm-20) and each fraction in `--fractions` of its sampling MACs: dip-go (block and layer
   granularity, one search per fraction and `--seeds` seed, as `slimdiff compress skip` runs it), deepcache (layer),
   step-reuse (block and layer), each with every forecast order in `--forecast-orders`, and the free alternatives
   at equal sampling MACs — the same sampler, DDIM and DPM-Solver++ with fraction × steps steps. diffusers' cache
   hooks are measured by `benchmarks/cache_hooks.py`; `--stage report` takes both files.
3. `--stage wall`: wall time of one whole sampling run at batch 64 and at batch 1 (CPU, the threads the process
   has), measured back to back for the reference sampler, each table and DDIM with fewer steps at equal MACs.

Rows are appended to the JSON as they finish; a rerun with the same `--out` skips rows it already has.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, get_args

import torch

from slimdiff.data import load_data
from slimdiff.engines import get_engine, skip
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, load_scheduler_config, read_provenance, read_spec, save
from slimdiff.io import atomic_write_json
from slimdiff.jobs.compression import compress_model
from slimdiff.jobs.conditioning import sampling_inputs
from slimdiff.metrics.cost import count_macs, sampling_latency
from slimdiff.metrics.features import digits_feature_extractor
from slimdiff.metrics.quality import class_agreement, compute_quality, reference_features
from slimdiff.models import adapter_for
from slimdiff.report import markdown_table, save_grid
from slimdiff.training.diffusion import sample

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


class Bench:
    """The teacher, its sampling conditions, the reference features, and the rows measured so far (persisted after
    each one)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.teacher = load(args.teacher, artifacts=False)
        self.adapter = adapter_for(self.teacher)
        self.schedule = load_scheduler_config(args.teacher)
        self.guidance = args.guidance_scale if self.adapter.cond_kind != "none" else 1.0
        self.per_call = count_macs(self.teacher).total * (2 if self.guidance != 1.0 else 1)
        self.inputs = sampling_inputs(args.teacher, self.adapter, args.n)
        self.labels = self._labels()
        self.extractor = digits_feature_extractor()
        size, channels = self.adapter.sample_size, self.adapter.in_channels
        reference = load_data("digits", size=size, channels=channels, split="train")
        self.real = reference_features(reference, self.extractor, split="train")
        self.results: dict[str, Any] = {"rows": []}
        if args.out.is_file():
            self.results = json.loads(args.out.read_text())
        self.results |= {
            "teacher": str(args.teacher),
            "family": self.adapter.family,
            "conditioning": self.adapter.cond_kind,
            "guidance_scale": self.guidance,
            "n": args.n,
            "extractor": self.extractor.name,
            "threads": torch.get_num_threads(),
            "macs_per_step": self.per_call,
        }

    def _labels(self) -> torch.Tensor | None:
        """The digit each sample is conditioned on (sampling_inputs cycles the recorded classes / their prompts)."""
        if self.adapter.cond_kind == "none":
            return None
        if self.adapter.cond_kind == "class":
            return self.inputs.cond
        classes = read_spec(self.args.teacher)["conditioning"]["classes"]
        return torch.tensor([int(classes[i % len(classes)]) for i in range(self.args.n)])

    def done(self, key: str) -> dict[str, Any] | None:
        return next((row for row in self.results["rows"] if row["key"] == key), None)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.results["rows"].append(row)
        atomic_write_json(self.args.out, self.results)
        print(json.dumps({k: v for k, v in row.items() if k != "table"}), flush=True)
        return row

    def samples(self, model: torch.nn.Module, scheduler: str, steps: int, n: int) -> torch.Tensor:
        """The first `n` of the benchmark's samples (seed 0, the conditions in turn)."""
        return sample(
            adapter_for(model),
            n=n,
            steps=steps,
            scheduler=scheduler,
            schedule=self.schedule,
            cond=None if self.inputs.cond is None else self.inputs.cond[:n],
            guidance_scale=self.guidance,
            uncond_embedding=self.inputs.uncond_embedding,
            seed=0,
            batch_size=64,
            progress=False,
        )

    def quality(self, model: torch.nn.Module, scheduler: str, steps: int) -> dict[str, float]:
        """FID/KID (and, for conditional models, class agreement) of `n` samples from seed 0."""
        images = self.samples(model, scheduler, steps, self.args.n)
        values = compute_quality(images, self.real, self.extractor, metrics=("fid", "kid"), seed=0)
        if self.labels is not None:
            values["agreement"] = class_agreement(images, self.labels, self.extractor)
        return values

    def wall(self, model: torch.nn.Module, scheduler: str, steps: int, batch: int = 64) -> float:
        """Seconds of one whole sampling run of `batch` images (median of `--wall-repeats`)."""
        stats = sampling_latency(
            adapter_for(model),
            steps=steps,
            batch_size=batch,
            scheduler=scheduler,
            schedule=self.schedule,
            guidance_scale=self.guidance,
            warmup=1 if batch == 1 else 0,
            repeats=self.args.wall_repeats,
        )
        return stats.median_ms / 1000

    def sampler_row(self, scheduler: str, steps: int) -> dict[str, Any]:
        key = f"{scheduler}-{steps}"
        row = self.done(key)
        if row is None:
            start = time.perf_counter()
            row = {"key": key, "kind": "sampler", "scheduler": scheduler, "steps": steps}
            row |= self.quality(self.teacher, scheduler, steps)
            row |= {"sampling_macs": steps * self.per_call, "eval_seconds": round(time.perf_counter() - start, 1)}
            self.add(row)
        return row

    def skip_config(self, **values: Any) -> skip.SkipConfig:
        return get_engine("skip").make_config(guidance_scale=self.guidance, **values)

    def table_row(self, key: str, model_dir: Path, ref: Ref, fraction: float, how: dict) -> dict[str, Any]:
        model = load(model_dir)
        table = skip.table_of(model)
        costs = skip.unit_costs(model, table.units)
        kept = skip.kept_fraction(table, costs)
        scheduler, ref_steps = ref
        row = {"key": key, "kind": "table", "ref_scheduler": scheduler, "ref_steps": ref_steps, "fraction": fraction}
        row |= how | self.quality(model, scheduler, ref_steps)
        row |= {
            "kept_sampling_macs": kept,
            "sampling_macs": round(kept * self.per_call * ref_steps),
            "table": ["".join("1" if c else "." for c in r) for r in table.effective()],
        }
        return self.add(row)


#: A reference sampler: (scheduler, steps).
Ref = tuple[str, int]
SAMPLER_NAMES = {"ddim": "DDIM", "dpm": "DPM-Solver++", "euler": "Euler", "ddpm": "DDPM"}


def _ref(row: dict[str, Any]) -> Ref:
    """A table row's reference sampler (rows from before other samplers were measured are DDIM's)."""
    return row.get("ref_scheduler", "ddim"), row["ref_steps"]


def ref_prefix(ref: Ref) -> str:
    """The work folder and key prefix of a reference sampler: `ddim50`, `dpm20`."""
    return f"{ref[0]}{ref[1]}"


def parse_ref(text: str) -> Ref:
    """`50` (DDIM) or `dpm-20`."""
    scheduler, _, steps = text.rpartition("-")
    if scheduler and scheduler not in SAMPLER_NAMES or not steps.isdigit():
        raise SystemExit(f"--refs {text!r}: give DDIM steps (50), nstar, or SAMPLER-STEPS (dpm-20, euler-20)")
    return scheduler or "ddim", int(steps)


#: The tables that need no search: whole steps reused (block units), every unit's branch reused at the same steps
#: (layer units: FORA's uniform cache on a DiT; with a forecast order, TaylorSeer's), and DeepCache.
BASELINES = (("step-reuse", "block"), ("step-reuse", "layer"), ("deepcache", "layer"))


def run_tables(bench: Bench, ref: Ref, fractions: list[float]) -> None:
    args = bench.args
    scheduler, ref_steps = ref
    bench.sampler_row(scheduler, ref_steps)
    for fraction in fractions:
        equal = max(1, round(fraction * ref_steps))
        for fewer in dict.fromkeys(("ddim", "dpm", scheduler)):  # the free alternatives, and the reference's own
            bench.sampler_row(fewer, equal)
    for order in args.forecast_orders:
        for method, granularity in BASELINES:
            for fraction in fractions:
                baseline(bench, ref, method, granularity, fraction, order)
        for seed in args.seeds:
            for granularity in args.granularities:
                dip_go(bench, ref, fractions, granularity, seed, order)
    searched_tables(bench, ref)


def _order(order: int) -> str:
    """The key suffix of a forecast order (none for reuse, so rows from before forecasting keep their keys)."""
    return "" if order == 0 else f"-order{order}"


def baseline(bench: Bench, ref: Ref, method: str, granularity: str, fraction: float, order: int) -> None:
    """A step-reuse or DeepCache table at `fraction` (as `slimdiff compress skip --method M` makes it), or the
    reason it cannot keep that little."""
    scheduler, ref_steps = ref
    key = f"{ref_prefix(ref)}-{method}-{granularity}-{fraction}{_order(order)}"
    if bench.done(key):
        return
    config = bench.skip_config(
        method=method,
        granularity=granularity,
        scheduler=scheduler,
        steps=ref_steps,
        target_macs=fraction,
        forecast_order=order,
    )
    out = bench.args.work / ref_prefix(ref) / key
    how = {"method": method, "granularity": granularity, "forecast_order": order}
    try:
        result = compress_model("skip", bench.args.teacher, "digits", out, config, resume=True)
    except SlimdiffError as error:
        head = {"key": key, "kind": "table", "ref_scheduler": scheduler, "ref_steps": ref_steps, "fraction": fraction}
        bench.add(head | how | {"infeasible": str(error)})
        return
    bench.table_row(key, out, ref, fraction, how | {"how": result.record["how"]})


def dip_go(bench: Bench, ref: Ref, fractions: list[float], granularity: str, seed: int, order: int) -> None:
    """One DiP-GO search per fraction (`slimdiff compress skip --method dip-go --target-macs F`), warm-started as
    configured and searched for the forecast order it ships with; the engine keeps step reuse (or its uniform
    forecast) instead where that is more consistent on held-out noises."""
    args = bench.args
    scheduler, ref_steps = ref
    for fraction in fractions:
        key = f"{ref_prefix(ref)}-dip-go-{granularity}-{fraction}" + ("" if seed == 0 else f"-s{seed}") + _order(order)
        if bench.done(key):
            continue
        config = bench.skip_config(
            method="dip-go",
            granularity=granularity,
            scheduler=scheduler,
            steps=ref_steps,
            target_macs=fraction,
            iterations=args.iterations,
            batch_size=args.search_batch,
            noises=args.search_noises,
            start=args.start,
            seed=seed,
            forecast_order=order,
        )
        out = args.work / ref_prefix(ref) / key
        start = time.perf_counter()
        result = compress_model("skip", args.teacher, "digits", out, config, resume=True, log=print)
        how = {
            "method": "dip-go",
            "granularity": granularity,
            "forecast_order": order,
            "seed": seed,
            "start": args.start,
            "search_seconds": round(time.perf_counter() - start, 1),
            "iterations": args.iterations,
            "final_search": result.record["search_history"][-1],
            "selected": result.record["selected"],
            "held_out": result.record["held_out"],
        }
        bench.table_row(key, out, ref, fraction, how)


def searched_tables(bench: Bench, ref: Ref) -> None:
    """Where the engine shipped step reuse instead of the search's table, also measure what the search found: its
    probabilities post-processed to the same budget (a `<key>-searched` row)."""
    for row in list(bench.results["rows"]):
        key = f"{row['key']}-searched"
        if row.get("selected") not in ("step-reuse", "step-reuse-forecast") or _ref(row) != ref or bench.done(key):
            continue
        out = bench.args.work / ref_prefix(ref) / row["key"]
        entry = read_provenance(out).history[-1]
        config = skip.SkipConfig(**entry["config"])
        made = skip.table_of(load(out))
        units = skip.model_units(bench.adapter, config.granularity)
        base = skip.SkipTable.full(
            made.scheduler, made.timesteps, units, config.granularity, made.settings, config.forecast_order
        )
        costs = skip.unit_costs(bench.teacher, base.units)
        probs = torch.tensor(entry["skip_probabilities"])
        table = skip.postprocess(probs, base, costs, config.target_macs, config.tolerance, config.threshold)
        searched = bench.args.work / ref_prefix(ref) / key
        save(bench.teacher, searched, artifacts={"skip_table": table.to_json()})
        how = {k: row[k] for k in ("method", "granularity", "seed", "start", "search_seconds", "held_out")}
        how["forecast_order"] = row.get("forecast_order", 0)
        bench.table_row(key, searched, ref, row["fraction"], how | {"selected": "searched (not shipped)"})


def reference_architecture(config_path: Path, steps: int = 50) -> dict[str, Any]:
    """Sampling MACs of DeepCache (uniform N = 5, branch 0, layer units; U-Nets) and of 20 %-MACs tables (step
    reuse, deepcache) for DDIM-`steps` on a reference architecture (counted on the meta device: random weights, none
    read)."""
    import tempfile

    from diffusers import DDIMScheduler

    from slimdiff.export import load_architecture

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(config_path.read_text())
        model = load_architecture(folder)
    sched = DDIMScheduler(steps_offset=1)
    sched.set_timesteps(steps)
    adapter = adapter_for(model)
    units = skip.model_units(adapter, "layer")
    base = skip.SkipTable.full("DDIMScheduler", sched.timesteps.tolist(), units, "layer")
    costs = skip.unit_costs(model, base.units)
    report = {
        "architecture": config_path.name,
        "sampler": f"DDIM-{steps}",
        "layer_units": len(units),
        "macs_per_call": costs.total,
        "sampling_macs_full": costs.total * steps,
    }
    if adapter.family != "dit":  # DeepCache's cache sits on a U-Net's skip branches
        deepcache = skip.interval_table(
            base, skip.full_steps(steps, steps // 5, "uniform"), skip.deepcache_branches(base)["branch 0"]
        )
        report["deepcache_N5_branch0"] = skip.kept_fraction(deepcache, costs) * costs.total * steps
    engine = get_engine("skip")
    for method in ("step-reuse", "deepcache"):
        config = engine.make_config(method=method, granularity="layer", steps=steps, target_macs=0.2)
        try:
            table, how = skip.baseline_table(adapter, config, base, costs)
            report[f"{method}_0.2"] = {
                "sampling_macs": skip.kept_fraction(table, costs) * costs.total * steps,
                "how": how,
            }
        except SlimdiffError as error:
            report[f"{method}_0.2"] = {"infeasible": str(error)}
    return report


def wall_times(bench: Bench) -> None:
    """Wall time of whole sampling runs at batch 64 and batch 1, measured back to back per table: the reference
    sampler, the table, and the same sampler with fewer steps at equal MACs (so that load on the machine hits all
    three alike)."""
    for row in bench.results["rows"]:
        if row["kind"] != "table" or "infeasible" in row or "wall" in row:
            continue
        (scheduler, ref), equal = _ref(row), max(1, round(row["fraction"] * row["ref_steps"]))
        model = load(bench.args.work / ref_prefix(_ref(row)) / row["key"])
        wall: dict[str, float] = {"macs_speedup": 1 / row["kept_sampling_macs"]}
        for batch in (64, 1):
            times = {
                "ref_s": bench.wall(bench.teacher, scheduler, ref, batch),
                "table_s": bench.wall(model, scheduler, ref, batch),
                "fewer_steps_s": bench.wall(bench.teacher, scheduler, equal, batch),
            }
            wall |= {f"{name}_batch{batch}": value for name, value in times.items()}
            wall[f"table_speedup_batch{batch}"] = times["ref_s"] / times["table_s"]
        row["wall"] = wall
        atomic_write_json(bench.args.out, bench.results)
        print(row["key"], wall, flush=True)


def grids(bench: Bench) -> None:
    """A grid of the first 64 samples of every row (the same noises and conditions as its FID), to look at before
    quoting the number: `<work>/grids/<key>.png`."""
    folder = bench.args.work / "grids"
    for row in bench.results["rows"]:
        path = folder / f"{row['key']}.png"
        if path.is_file() or "infeasible" in row:
            continue
        if row["kind"] == "sampler":
            images = bench.samples(bench.teacher, row["scheduler"], row["steps"], 64)
        else:
            model = load(bench.args.work / ref_prefix(_ref(row)) / row["key"])
            images = bench.samples(model, *_ref(row), 64)
        save_grid(images, path, scale=2)
        print(path, flush=True)


def _wall(row: dict[str, Any], batch: int) -> str:
    wall = row.get("wall")
    if wall is None:
        return "not measured"
    return f"{wall[f'table_speedup_batch{batch}']:.2f}× ({wall['macs_speedup']:.2f}×)"


def _quality(row: dict[str, Any]) -> dict[str, Any]:
    values = {"FID": row["fid"], "KID×100": 100 * row["kid_mean"]}
    return values | ({"agreement": row["agreement"]} if "agreement" in row else {})


def _name(row: dict[str, Any]) -> str:
    if row["kind"] == "hook":
        missed = "" if row["reached"] else ", cheapest found: target missed"
        return f"diffusers {row['hook']} ({row['knob']} = {row['value']:.3g}{missed})"
    name = f"{row['method']} ({row.get('granularity', 'layer')}"  # rows from before granularity was recorded
    if row.get("forecast_order"):
        name += f", forecast order {row['forecast_order']}"
    if row["method"] == "dip-go":
        name += f", seed {row['seed']}" + {
            "step-reuse": ", shipped step reuse",
            "step-reuse-forecast": ", shipped uniform forecast",
            "searched (not shipped)": ", the search's table",
        }.get(row.get("selected"), "")
    return name + ")"


def markdown(paths: list[Path]) -> str:
    """The curve and the tables of one or more result files, as Markdown (wall: the table's speedup over the
    reference sampler, measured at batch 64 / batch 1, with its sampling-MACs speedup in brackets)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        rows |= {row["key"]: row for row in json.loads(path.read_text())["rows"]}
    samplers = sorted((r for r in rows.values() if r["kind"] == "sampler"), key=lambda r: (r["scheduler"], r["steps"]))
    curve = [
        {"sampler": r["scheduler"], "steps": r["steps"], **_quality(r), "sampling GMACs": r["sampling_macs"] / 1e9}
        for r in samplers
    ]
    out = ["### The teacher's curve", "", markdown_table(curve), ""]
    refused = [f"- diffusers {r['hook']}: refused — {r['refused']}" for r in rows.values() if "refused" in r]
    out += [*refused, ""] if refused else []
    compared = [r for r in rows.values() if r["kind"] in ("table", "hook") and "refused" not in r]
    for scheduler, ref in sorted({_ref(r) for r in compared}):
        full = rows.get(f"{scheduler}-{ref}", {})
        ours = [r for r in compared if _ref(r) == (scheduler, ref)]
        table = []
        for fraction in sorted({r["fraction"] for r in ours}, reverse=True):
            equal = max(1, round(fraction * ref))
            for name in dict.fromkeys((f"ddim-{equal}", f"dpm-{equal}", f"{scheduler}-{equal}")):
                if name in rows:
                    r = rows[name]
                    row = {"fraction": fraction, "row": f"{r['scheduler']} {equal} steps", "kept MACs": equal / ref}
                    table.append(row | _quality(r) | {"wall b64": "", "wall b1": ""})
            for r in ours:
                if r["fraction"] != fraction:
                    continue
                row = {"fraction": fraction, "row": _name(r)}
                if "infeasible" in r:
                    if r.get("forecast_order"):
                        continue  # what a table can keep does not depend on the forecast order: said once
                    table.append(row | {"kept MACs": None, "FID": None, "wall b64": "infeasible: " + r["infeasible"]})
                    continue
                row |= {"kept MACs": r["kept_sampling_macs"], **_quality(r)}
                timed = r["kind"] == "table"  # the wall stage times tables; hooks are not timed
                table.append(row | {"wall b64": _wall(r, 64) if timed else "", "wall b1": _wall(r, 1) if timed else ""})
        head = f"### From {SAMPLER_NAMES[scheduler]}-{ref} (FID {full.get('fid', float('nan')):.3f})"
        out += [head, "", markdown_table(table), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, help="teacher model directory (all stages but reference)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16, 25, 50, 100])
    parser.add_argument("--dpm-steps", type=int, nargs="+", default=[4, 6, 8, 12, 16, 25])
    parser.add_argument("--euler-steps", type=int, nargs="*", default=[])
    parser.add_argument(
        "--refs",
        nargs="+",
        default=["50", "nstar"],
        help="reference samplers: DDIM step counts (50), nstar (DDIM's best), or SAMPLER-STEPS (dpm-20, euler-20)",
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.33, 0.25, 0.2])
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="conditional teachers: CFG scale")
    defaults = skip.SkipConfig  # the engine's defaults are the settings this benchmark measures
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="dip-go optimizer steps")
    parser.add_argument("--search-batch", type=int, default=defaults.batch_size, help="dip-go noises per step")
    parser.add_argument("--search-noises", type=int, default=defaults.noises, help="dip-go fixed noises")
    parser.add_argument(
        "--forecast-orders",
        type=int,
        nargs="+",
        choices=skip.FORECAST_ORDERS,
        default=[0],
        help="what skipped units return in every table (0 reuse, 1/2 Taylor forecast): one row per order",
    )
    parser.add_argument(
        "--start", choices=get_args(skip.Start), default="step-reuse", help="dip-go: where the search starts"
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="dip-go search seeds (none: no searches)")
    parser.add_argument("--granularities", nargs="+", choices=skip.GRANULARITIES, default=list(skip.GRANULARITIES))
    parser.add_argument("--wall-repeats", type=int, default=1, help="--stage wall: runs per timing (median)")
    parser.add_argument(
        "--stage", choices=["curve", "tables", "all", "reference", "report", "wall", "grids"], default="all"
    )
    parser.add_argument("--report", type=Path, nargs="+", help="--stage report: result files to print as Markdown")
    parser.add_argument("--reference-config", type=Path, default=REFERENCE / "sd-1.5.unet.json")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-skipping"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/skipping.json"))
    args = parser.parse_args()
    if args.stage == "report":
        print(markdown(args.report))
        return
    if args.stage == "reference":
        report = reference_architecture(args.reference_config)
        atomic_write_json(args.out, report)
        print(json.dumps(report, indent=2))
        return
    bench = Bench(args)
    if args.stage == "wall":
        wall_times(bench)
        return
    if args.stage == "grids":
        grids(bench)
        return
    if args.stage in ("curve", "all"):
        for steps in args.ddim_steps:
            bench.sampler_row("ddim", steps)
        for steps in args.dpm_steps:
            bench.sampler_row("dpm", steps)
        for steps in args.euler_steps:
            bench.sampler_row("euler", steps)
    if args.stage in ("tables", "all"):
        for ref in args.refs:
            if ref == "nstar":
                curve = [r for r in bench.results["rows"] if r["kind"] == "sampler" and r["scheduler"] == "ddim"]
                if not curve:
                    raise SystemExit("--refs nstar needs the curve first (--stage curve or all)")
                bench.results["nstar"] = min(curve, key=lambda r: r["fid"])["steps"]
            run_tables(bench, ("ddim", bench.results["nstar"]) if ref == "nstar" else parse_ref(ref), args.fractions)
    atomic_write_json(args.out, bench.results)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
