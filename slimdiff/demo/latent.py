"""`slimdiff demo --latent`: the demo on a latent text-to-image pipeline (`run_latent_demo`).

The latent teacher (`slimdiff.latent_teacher`: a tiny Stable Diffusion pipeline on the digits at 32 px), the digits
written as a captioned image folder, the latent recipes (`slimdiff/recipes/latent-*.yaml`), FID and class agreement
of guided samples beside the teacher at equal sampling MACs (VAE decoder included), and a Markdown report.
`LatentBench` is shared with `benchmarks/latent.py`, which measures the same rows at more samplers.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from slimdiff import latent_teacher
from slimdiff.artifacts import full_compute, sampling_plan
from slimdiff.data import load_data
from slimdiff.demo.pixel import RECIPES, products
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, load_scheduler_config
from slimdiff.io import atomic_write_bytes, atomic_write_json
from slimdiff.jobs.conditioning import decoder_for, load_text_encoder, load_vae, training_data
from slimdiff.jobs.recipe_runner import run_recipe
from slimdiff.jobs.sampling import refuse_other_sampler
from slimdiff.latent_teacher import GUIDANCE, NUM_DIGITS, caption, write_captioned_digits
from slimdiff.metrics.cost import count_macs, sampling_macs
from slimdiff.metrics.features import digits_feature_extractor
from slimdiff.metrics.quality import class_agreement, compute_quality, reference_features
from slimdiff.models import adapter_for
from slimdiff.recipe_spec import CompressStep, EvalStep, FinetuneStep, load_recipe
from slimdiff.report import markdown_table, save_grid
from slimdiff.training.diffusion import sample

#: (sampler, steps) the latent benchmark measures every model at; the demo measures at the first.
LATENT_SAMPLERS: tuple[tuple[str, int], ...] = (("ddim", 25), ("ddim", 13), ("dpm", 10))


@dataclasses.dataclass(frozen=True)
class LatentRow:
    """One benchmark row: a latent recipe on the teacher (or on another row's model), with engine overrides."""

    key: str
    recipe: str
    base: str | None = None
    compress: tuple[tuple[str, Any], ...] = ()


LATENT_ROWS: tuple[LatentRow, ...] = (
    LatentRow("channels", "latent-channels.yaml"),
    LatentRow("layers", "latent-layers.yaml"),
    LatentRow("ofa", "latent-ofa.yaml"),
    LatentRow("skip-0.5", "latent-skip.yaml"),
    LatentRow("skip-0.25", "latent-skip.yaml", compress=(("target_macs", 0.25),)),
    LatentRow("channels-skip", "latent-channels-skip.yaml", base="channels"),
)


def vae_decoder_macs(model_dir: Path, latent_shape: tuple[int, ...]) -> int:
    """MACs of decoding one latent with the pipeline's VAE (torch's FLOP counter / 2)."""
    vae, _ = load_vae(model_dir)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(torch.zeros(1, *latent_shape))
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class LatentBenchSettings:
    """Where and how `LatentBench` runs: the teacher pipeline, the captioned data, the rows' work folder, the results
    JSON, samples per measurement, the samplers, and `smoke` (a few steps of every recipe, for tests)."""

    teacher: Path
    data: Path
    work: Path
    out: Path
    n: int = 500
    samplers: tuple[tuple[str, int], ...] = LATENT_SAMPLERS
    smoke: bool = False


class LatentBench:
    """The latent teacher, the prompts, the reference features, and the results so far (persisted after each row)."""

    def __init__(self, args: LatentBenchSettings) -> None:
        self.args = args
        self.teacher = Path(args.teacher)
        teacher = load(self.teacher, artifacts=False)
        adapter = adapter_for(teacher)
        self.schedule = load_scheduler_config(self.teacher)
        self.teacher_call = count_macs(teacher).total
        self.vae_macs = vae_decoder_macs(self.teacher, (adapter.in_channels, adapter.sample_size, adapter.sample_size))
        digits = [i % NUM_DIGITS for i in range(args.n)]
        encoder = load_text_encoder(self.teacher, adapter)
        self.cond = encoder.encode([caption(k) for k in digits])
        self.uncond = encoder.uncond()
        self.labels = torch.tensor(digits)
        self.extractor = digits_feature_extractor()
        reference = load_data("digits", size=adapter.sample_size * 4, channels=3, split="train")
        self.real = reference_features(reference, self.extractor, split="train")
        self.results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
        self.results |= {
            "teacher": str(self.teacher),
            "n": args.n,
            "guidance_scale": GUIDANCE,
            "extractor": self.extractor.name,
            "threads": torch.get_num_threads(),
            "teacher_unet_macs_per_call": self.teacher_call,
            "vae_decoder_macs": self.vae_macs,
        }
        self.results.setdefault("teacher_curve", {})
        self.results.setdefault("encoding", [])

    def save(self) -> None:
        atomic_write_json(self.args.out, self.results)

    def row(self, key: str) -> dict[str, Any] | None:
        return next((row for row in self.results["rows"] if row["key"] == key), None)

    def quality(self, model_dir: Path, scheduler: str, steps: int, grid: Path | None = None) -> dict[str, float]:
        """FID and class agreement of `n` guided samples (seed 0, the digits' prompts in turn)."""
        model = load(model_dir)
        refuse_other_sampler(model, scheduler, steps, self.schedule)
        t0 = time.perf_counter()
        images = sample(
            adapter_for(model),
            n=self.args.n,
            steps=steps,
            scheduler=scheduler,
            schedule=self.schedule,
            cond=self.cond,
            guidance_scale=GUIDANCE,
            uncond_embedding=self.uncond,
            seed=0,
            batch_size=100,
            decode=decoder_for(model_dir),
            progress=False,
        )
        seconds = time.perf_counter() - t0
        if grid is not None:
            save_grid(images[:100], grid, scale=2)
        fid = compute_quality(images, self.real, self.extractor, metrics=("fid",), seed=0)["fid"]
        return {"fid": fid, "agreement": class_agreement(images, self.labels, self.extractor), "seconds": seconds}

    def unet_sampling_macs(self, model_dir: Path, steps: int) -> float:
        """The guided U-Net MACs of one image's sampling run (a skip table's computed fraction included)."""
        model = load(model_dir)
        plan = sampling_plan(model)
        with full_compute(model):
            per_call = count_macs(model)
        computed = None if plan is None else plan.computed
        return sampling_macs(per_call, steps, guidance=True, computed_fraction_per_step=computed).total

    def teacher_at(self, scheduler: str, steps: int) -> dict[str, float]:
        """The teacher's quality with `steps` steps of `scheduler` (cached in the results)."""
        key = f"{scheduler}-{steps}"
        if key not in self.results["teacher_curve"]:
            self.results["teacher_curve"][key] = self.quality(self.teacher, scheduler, steps)
            self.save()
        return self.results["teacher_curve"][key]

    def measure(self, name: str, model_dir: Path) -> dict[str, Any]:
        """Quality and sampling MACs of one model at every sampler, beside the teacher at equal MACs."""
        teacher_step = 2 * self.teacher_call
        measured: dict[str, Any] = {"model": str(model_dir)}
        for scheduler, steps in self.args.samplers:
            label = f"{scheduler}-{steps}"
            try:
                grid = self.args.work / "grids" / f"{name}-{label}.png"
                grid.parent.mkdir(parents=True, exist_ok=True)
                values = self.quality(model_dir, scheduler, steps, grid=grid)
            except SlimdiffError as error:  # a skip table made for another sampler: recorded, not fatal
                measured[label] = {"error": str(error).splitlines()[0]}
                continue
            unet = self.unet_sampling_macs(model_dir, steps)
            equal = max(1, round(unet / teacher_step))
            measured[label] = {
                **values,
                "sampling_macs": unet + self.vae_macs,
                "teacher_equal_macs_steps": equal,
                "teacher_equal_macs": self.teacher_at(scheduler, equal),
            }
        return measured

    def encoding(self) -> None:
        """Time loading the latent training set (encoded on the first run, read from the cache after)."""
        lines: list[str] = []
        model = load(self.teacher, artifacts=False)
        t0 = time.perf_counter()
        training_data(adapter_for(model), str(self.args.data), seed=0, model_dir=self.teacher, log=lines.append)
        entry = {"run": len(self.results["encoding"]) + 1, "seconds": time.perf_counter() - t0, "log": lines}
        self.results["encoding"].append(entry)
        self.save()
        print(json.dumps(entry), flush=True)

    def run_row(self, row: LatentRow) -> None:
        """Run `row`'s recipe (its eval steps dropped: every model is measured here alike) and measure its products."""
        if self.row(row.key) is not None:
            print(f"{row.key}: done, skipped", flush=True)
            return
        base_row = None if row.base is None else self.row(row.base)
        if row.base is not None and (base_row is None or "error" in base_row):
            self.results["rows"].append({"key": row.key, "error": f"needs the finished {row.base} row"})
            self.save()
            return
        recipe = load_recipe(RECIPES / row.recipe)
        recipe.model = str(self.teacher) if base_row is None else base_row["products"][""]["model"]
        recipe.data, recipe.out = str(self.args.data), str(self.args.work / row.key)
        recipe.steps = [step for step in recipe.steps if not isinstance(step, EvalStep)]
        for step in recipe.steps:
            if isinstance(step, CompressStep) and row.compress:
                step.config = dataclasses.replace(step.config, **dict(row.compress))
            if isinstance(step, FinetuneStep) and step.finetune.teacher == "model":
                step.finetune.teacher = str(self.teacher)
            if self.args.smoke:
                _smoke(step)
        print(f"{row.key}: {row.recipe} on {recipe.model}", flush=True)
        t0 = time.perf_counter()
        try:
            summaries = run_recipe(recipe, progress=False)
        except Exception as error:  # noqa: BLE001 — an engine failing on the latent teacher is a result, recorded
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            traceback.print_exc()
            self.results["rows"].append({"key": row.key, "recipe": row.recipe, "error": message})
            self.save()
            return
        seconds = time.perf_counter() - t0
        made = products(Path(summaries[-1]["out"]))
        result = {
            "key": row.key,
            "recipe": row.recipe,
            "compress": dict(row.compress),
            "seconds": seconds,
            "steps": [{k: s.get(k) for k in ("step", "seconds", "out") if k in s} for s in summaries],
            "products": {name: self.measure(f"{row.key}{name and '-' + name}", path) for name, path in made.items()},
        }
        self.results["rows"].append(result)
        self.save()
        print(json.dumps({"key": row.key, "seconds": seconds}), flush=True)


def _smoke(step: CompressStep | FinetuneStep | Any) -> None:
    """Cut a recipe step down to a few optimizer steps on small batches (the demo's smoke mode)."""
    if isinstance(step, FinetuneStep):
        step.finetune = dataclasses.replace(step.finetune, steps=2, batch_size=4, checkpoint_every=2, warmup_steps=1)
    elif isinstance(step, CompressStep) and step.engine == "ofa":
        step.config = dataclasses.replace(step.config, steps=2, batch_size=4, warmup=1, checkpoint_every=2)
    elif isinstance(step, CompressStep) and step.engine == "skip":
        step.config = dataclasses.replace(step.config, iterations=2, noises=2, batch_size=2, steps=5)
    elif isinstance(step, CompressStep) and step.engine == "channels":
        step.config = dataclasses.replace(step.config, calibration_size=4, timestep_stride=250)


def latent_table(results: dict[str, Any], samplers: tuple[tuple[str, int], ...]) -> list[dict[str, Any]]:
    """One line per model and sampler: FID, class agreement, sampling MACs, and the teacher at equal MACs."""
    lines = []
    curve = results["teacher_curve"]
    for scheduler, steps in samplers:
        label = f"{scheduler}-{steps}"
        if label in curve:
            t = curve[label]
            full = (2 * results["teacher_unet_macs_per_call"] * steps + results["vae_decoder_macs"]) / 1e6
            lines.append(_line("teacher", label, t["fid"], t["agreement"], full, ""))
    for row in results["rows"]:
        if "error" in row:
            lines.append(_line(row["key"], "", None, None, None, f"failed: {row['error']}"))
            continue
        for product, measured in row["products"].items():
            name = f"{row['key']} {product}".strip()
            for scheduler, steps in samplers:
                label = f"{scheduler}-{steps}"
                m = measured.get(label, {})
                if "error" not in m and "fid" in m:
                    t = m["teacher_equal_macs"]
                    beside = (
                        f"{scheduler}-{m['teacher_equal_macs_steps']}: FID {t['fid']:.3g}, agr. {t['agreement']:.3f}"
                    )
                    lines.append(_line(name, label, m["fid"], m["agreement"], m["sampling_macs"] / 1e6, beside))
                else:
                    lines.append(_line(name, label, None, None, None, "n/a: " + m.get("error", "not measured")))
    return lines


def _line(model: str, sampler: str, fid: float | None, agreement: float | None, macs: float | None, beside: str):
    return {
        "model": model,
        "sampler": sampler,
        "FID": "" if fid is None else f"{fid:.3g}",
        "class agreement": "" if agreement is None else f"{agreement:.3f}",
        "sampling MMACs": "" if macs is None else f"{macs:.1f}",
        "teacher at equal MACs": beside,
    }


def run_latent_bench(
    settings: LatentBenchSettings, rows: Sequence[str], echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Encoding cost, the teacher at every sampler, then `rows` (resumable: finished rows are skipped); the table."""
    write_captioned_digits(settings.data)
    bench = LatentBench(settings)
    bench.encoding()
    for scheduler, steps in settings.samplers:
        bench.teacher_at(scheduler, steps)
    for row in LATENT_ROWS:
        if row.key in rows:
            bench.run_row(row)
    lines = latent_table(bench.results, settings.samplers)
    echo(markdown_table(lines))
    return lines


def ensure_latent_teacher(teacher_dir: Path, smoke: bool, echo: Callable[[str], None] = print) -> Path:
    """Train the latent teacher into `teacher_dir` unless a pipeline is there (an interrupted run resumes)."""
    if (teacher_dir / "model_index.json").is_file():
        echo(f"[1/3] latent teacher: cached in {teacher_dir}")
        return teacher_dir
    echo(f"[1/3] latent teacher: training a tiny Stable Diffusion pipeline on the digits into {teacher_dir}")
    latent_teacher.train(latent_teacher.parse_args(["--out", str(teacher_dir), "--resume", *(["--smoke"] * smoke)]))
    return teacher_dir


def run_latent_demo(out: str | Path, echo: Callable[[str], None] = print, *, smoke: bool = False) -> dict[str, Any]:
    """Latent teacher → every engine on captioned digits → FID + class agreement → `report.md`; returns the rows.

    `smoke` runs everything with a few steps (teacher, fine-tunes, searches) and few samples, for tests."""
    out = Path(out)
    teacher = ensure_latent_teacher(out / "teacher", smoke, echo)
    settings = LatentBenchSettings(
        teacher=teacher,
        data=out / "digits-captioned",
        work=out,
        out=out / "results.json",
        n=20 if smoke else 500,
        samplers=(("ddim", 5), ("dpm", 4)) if smoke else LATENT_SAMPLERS[:1],
        smoke=smoke,
    )
    echo(f"[2/3] {len(LATENT_ROWS)} latent recipes, one per engine and a composition (resumable)")
    lines = run_latent_bench(settings, [row.key for row in LATENT_ROWS], echo=lambda _: None)
    table = markdown_table(lines)
    samplers = ", ".join(f"{scheduler} {steps} steps" for scheduler, steps in settings.samplers)
    notes = (
        f"FID: {settings.n} samples, digits features, against the digits train split; class agreement: the share of "
        f"samples the digits classifier reads as the prompted digit; guidance {GUIDANCE:g}, {samplers}; sampling "
        "MACs: one image, guided U-Net calls + VAE decoder."
    )
    report = out / "report.md"
    atomic_write_bytes(report, f"# slimdiff demo --latent\n\n{table}\n\n{notes}\n".encode())
    echo(f"[3/3] measured {settings.n} samples per model ({samplers}, guidance {GUIDANCE:g})")
    echo(table)
    echo(f"      report: {report}")
    return {"rows": lines, "report": str(report)}
