"""`slimdiff demo --latent` in its smoke mode: the latent teacher, every latent recipe, the measured report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from slimdiff.demo.latent import LATENT_ROWS, run_latent_demo
from slimdiff.latent_teacher import digits_split
from slimdiff.recipe_spec import load_recipe

# The smoke demo trains a teacher and runs six recipes and their measurements: minutes on a loaded CPU.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo-latent")
    return out, run_latent_demo(out, echo=lambda _: None, smoke=True)


def test_latent_recipes_load() -> None:
    for row in LATENT_ROWS:
        recipe = load_recipe(Path("slimdiff/recipes") / row.recipe)
        assert recipe.steps


def test_latent_demo_trains_the_teacher_and_writes_captioned_data(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    StableDiffusionPipeline.from_pretrained(out / "teacher")
    rows = [json.loads(line) for line in (out / "digits-captioned" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(digits_split()["train"][1]) and rows[0]["text"].startswith("a photo of the digit ")
    assert (out / "digits-captioned" / rows[0]["file_name"]).is_file()


def test_latent_demo_measures_every_row(demo_run: tuple[Path, dict]) -> None:
    out, result = demo_run
    results = json.loads((out / "results.json").read_text())
    teacher = results["teacher_curve"]["ddim-5"]
    assert math.isfinite(teacher["fid"]) and 0.0 <= teacher["agreement"] <= 1.0
    assert [row["key"] for row in results["rows"]] == [row.key for row in LATENT_ROWS]
    assert [row["key"] for row in results["rows"] if "error" in row] == []
    full = 2 * results["teacher_unet_macs_per_call"] * 5 + results["vae_decoder_macs"]
    for row in results["rows"]:
        for product in row["products"].values():
            measured = product["ddim-5"]
            assert math.isfinite(measured["fid"]) and 0.0 <= measured["agreement"] <= 1.0
            assert results["vae_decoder_macs"] < measured["sampling_macs"] < full
            other = product["dpm-4"]  # a skip table is made for DDIM-5: another sampler is refused and recorded
            if "skip" in row["key"]:
                assert "skip table" in other["error"] and "DPMSolverMultistepScheduler" in other["error"]
            else:
                assert math.isfinite(other["fid"]) and other["sampling_macs"] < full
    assert set(results["rows"][2]["products"]) == {"macs-0.3", "macs-0.5", "macs-0.75"}
    assert "| channels |" in Path(result["report"]).read_text()


def test_latent_demo_rerun_reuses_everything(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    before = json.loads((out / "results.json").read_text())
    run_latent_demo(out, echo=lambda _: None, smoke=True)
    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == before["rows"]
    assert "0 encoded" in after["encoding"][-1]["log"][0] and len(after["encoding"]) == 2
