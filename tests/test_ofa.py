"""OFA-Diffusion: nested sizes from one elastic model, extraction exactness, the sampler, the CLI run and its resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAMILIES, tiny_sd_pipeline, tiny_vae
from safetensors.torch import load_file
from test_channels import small_groups_unet
from test_cli import run_cli

from slimdiff.data import load_data
from slimdiff.engines.base import Calibration
from slimdiff.engines.ofa import (
    ChannelGroupInfo,
    ElasticModel,
    OFAConfig,
    allocate,
    compress,
    draw_subnet,
    extract_all,
    importance_shares,
    layer_importance,
    layer_kind,
    subnet_probabilities,
)
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, read_provenance, save
from slimdiff.models import adapter_for, build_tiny
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import DEFAULT_SCHEDULE

SIZES = (0.4, 0.7)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", size=16)


def _calibration(adapter, digits) -> Calibration:
    if adapter.cond_kind == "text":
        table = torch.randn(10, 8, adapter.cross_attention_dim, generator=torch.Generator().manual_seed(0))
        return Calibration(digits, lambda labels: table[labels], DEFAULT_SCHEDULE)
    cond = (lambda labels: labels) if adapter.cond_kind == "class" else (lambda labels: None)
    return Calibration(digits, cond, DEFAULT_SCHEDULE)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, digits):
    """(name, original model, elastic model, engine result) for one tiny family, compressed once."""
    torch.manual_seed(0)
    model = build_tiny(request.param).eval()
    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(adapter, OFAConfig(sizes=SIZES, importance_samples=4, steps=30), _calibration(adapter, digits))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched
    return request.param, model, result.model, result


def test_extracted_models_compute_what_the_elastic_subnets_compute(family, tmp_path: Path) -> None:
    name, _, elastic, _ = family
    with torch.no_grad():  # stand-in for training: the shared weights move, extraction must follow them
        for parameter in elastic.shared.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    inputs = adapter_for(elastic.shared).example_inputs(3)
    products = extract_all(elastic)
    assert list(products) == [f"macs-{s:g}" for s in SIZES]
    for i, product in enumerate(products.values()):
        elastic.active = i
        with torch.no_grad():
            expected = elastic(**inputs, return_dict=False)[0]
            got = product.model(**inputs, return_dict=False)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        save(product.model, tmp_path / product.summary.split(":")[0])
        reloaded = load(tmp_path / product.summary.split(":")[0])
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs, return_dict=False)[0], expected, rtol=1e-5, atol=1e-6)
    _run_in_pipeline(name, reloaded, tmp_path)


def _run_in_pipeline(name: str, model: torch.nn.Module, tmp_path: Path) -> None:
    from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline

    if name == "tiny-unet":
        images = DDIMPipeline(model, DDIMScheduler())(batch_size=2, num_inference_steps=2, output_type="np").images
    elif name == "tiny-dit":
        pipeline = DiTPipeline(transformer=model, vae=tiny_vae(1), scheduler=DDIMScheduler())
        images = pipeline(class_labels=[1, 7], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    else:
        encoder = make_tiny_clip_text(tmp_path / "clip", hidden_size=32, max_length=16)
        pipeline = tiny_sd_pipeline(model, encoder)
        images = pipeline(["a 3"], num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape[1:3] == (16, 16) and np.isfinite(images).all()


def test_smaller_subnets_are_nested_and_heads_keep_the_same_offsets(family) -> None:
    _, model, elastic, _ = family
    small, large = elastic.subnets
    shapes = {name: t.shape for name, t in [*model.named_parameters(), *model.named_buffers()]}
    shrunk = 0
    for tensor, dims in small.index.items():
        for dim in dims:
            kept_small = small.kept(tensor, dim, shapes[tensor][dim])
            assert kept_small <= large.kept(tensor, dim, shapes[tensor][dim]), f"{tensor} dim {dim}"
            shrunk += len(kept_small) < shapes[tensor][dim]
    assert shrunk > 0
    for module_name, module in model.named_modules():
        if hasattr(module, "to_q") and hasattr(module, "heads"):
            head_dim = module.to_q.out_features // module.heads
            kept = sorted(small.kept(f"{module_name}.to_q.weight", 0, module.to_q.out_features))
            offsets = [{i % head_dim for i in kept if i // head_dim == h} for h in range(module.heads)]
            assert all(o == offsets[0] for o in offsets) and len(offsets[0]) < head_dim


def test_every_size_lands_within_two_percent_of_its_macs(family) -> None:
    _, _, elastic, result = family
    products = extract_all(elastic)
    for size, product in zip(SIZES, products.values(), strict=True):
        assert product.achieved["macs"] == pytest.approx(size, rel=0.02)
        record = result.record["subnets"][f"macs-{size:g}"]
        assert record["searched_fraction"] == pytest.approx(product.achieved["macs"])
        assert record["ladder_ratio"] <= record["keep_ratio"] + 1e-9


def test_kind_normalised_importance_does_not_starve_a_kind_whose_raw_scores_are_small() -> None:
    """Two kinds in one stage, the same pattern of importance, one kind's raw Taylor scores 100× smaller."""
    roots = [f"down_blocks.0.resnets.{i}.conv1" for i in range(3)]
    roots += [f"down_blocks.0.attentions.{i}.to_q" for i in range(3)]
    groups = [ChannelGroupInfo(((r, "out"),), (r,), 64, 1, "stage 0", layer_kind((r,))) for r in roots]
    pattern = [1.0, 2.0, 3.0] * 2
    scale = [1.0] * 3 + [0.01] * 3
    scores = {g.key: torch.full((64,), p * c) for g, p, c in zip(groups, pattern, scale, strict=True)}

    def widths(norm: str) -> list[int]:
        counts = allocate(groups, importance_shares(groups, layer_importance(groups, scores, norm)), 0.5, 0.25)
        return [counts[g.key] for g in groups]

    assert {g.kind for g in groups} == {"conv1", "to_q"}
    raw = widths("none")
    assert raw[3:] == [16, 16, 16]  # the paper's formula on raw scores: the small-scale kind sits at the floor
    assert raw[:3] == [32, 63, 64]  # while the other takes nearly all of the stage's budget
    by_kind = widths("kind")
    assert by_kind[:3] == by_kind[3:] == [16, 32, 48]  # each kind ranked among its own: the same widths
    assert sum(by_kind) == pytest.approx(0.5 * 64 * 6, abs=1)  # and the stage keeps P of its channels


def test_layer_kind_is_the_roots_names_without_their_block_path() -> None:
    assert layer_kind(("up_blocks.1.resnets.0.conv1", "up_blocks.1.resnets.0.time_emb_proj")) == "conv1+time_emb_proj"
    assert layer_kind(("mid_block.attentions.0.to_out.0", "mid_block.resnets.1.conv2")) == "conv2+to_out"


def test_reweighted_sampling_favours_the_smallest_three_to_one_and_is_a_function_of_seed_and_step() -> None:
    draws = [draw_subnet("reweighted", 3, 3.0, 0, step) for step in range(30000)]
    shares = [n / len(draws) for _, n in sorted(Counter(draws).items())]
    assert shares == pytest.approx([1 / 2, 1 / 3, 1 / 6], abs=0.01)
    assert shares[0] / shares[2] == pytest.approx(3, rel=0.06)
    assert subnet_probabilities("reweighted", 3, 5.0) == pytest.approx([5 / 9, 3 / 9, 1 / 9])
    assert draws[:50] == [draw_subnet("reweighted", 3, 3.0, 0, step) for step in range(50)]  # replayable
    assert draws[:50] != [draw_subnet("reweighted", 3, 3.0, 1, step) for step in range(50)]  # seeded
    uniform = Counter(draw_subnet("uniform", 3, 3.0, 0, step) for step in range(30000))
    assert [uniform[i] / 30000 for i in range(3)] == pytest.approx([1 / 3] * 3, abs=0.01)
    sandwich = [draw_subnet("sandwich", 3, 3.0, 0, step) for step in range(9)]
    assert sandwich[0::3] == [2, 2, 2] and sandwich[1::3] == [0, 0, 0]  # largest, smallest, one at random
    elastic = ElasticModel(torch.nn.Linear(1, 1), [None, None, None], "reweighted", 3.0, 0)
    elastic.draw_subnet_for_step(7)
    assert elastic.active == draws[7]


class _Interrupted(Exception):
    pass


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "diffusion_pytorch_model.safetensors")


def test_cli_run_makes_one_loadable_model_per_size_and_resumes_exactly(tmp_path: Path, monkeypatch, capsys) -> None:
    from diffusers import DDIMPipeline, DDIMScheduler

    torch.manual_seed(0)
    save(build_tiny("tiny-unet"), tmp_path / "m")
    args = ["compress", "ofa", tmp_path / "m", "--sizes", "0.3,0.5,0.75", "--steps", "4", "--batch-size", "8"]
    fast = ["--importance-samples", "4", "--checkpoint-every", "2"]
    code, out, err = run_cli(monkeypatch, capsys, *args, *fast, "--out", tmp_path / "a")
    assert code == 0, err
    names = ["macs-0.3", "macs-0.5", "macs-0.75"]
    assert "3 models from one 4-step run" in out
    for name in names:
        model = load(tmp_path / "a" / name)
        provenance = read_provenance(tmp_path / "a" / name)
        assert provenance.engine == "ofa" and provenance.history[-1]["product"] == name
        assert provenance.metrics["macs_fraction"] == pytest.approx(float(name.split("-")[1]), rel=0.02)
        images = DDIMPipeline(model, DDIMScheduler())(batch_size=1, num_inference_steps=2, output_type="np").images
        assert np.isfinite(images).all()

    # the same run, killed after its step-2 checkpoint, then rerun: it continues and ends identical
    original_draw = ElasticModel.draw_subnet_for_step

    def draw_then_die(self: ElasticModel, step: int) -> None:
        if step == 2:
            raise _Interrupted
        original_draw(self, step)

    monkeypatch.setattr(ElasticModel, "draw_subnet_for_step", draw_then_die)
    with pytest.raises(_Interrupted):
        run_cli(monkeypatch, capsys, *args, *fast, "--out", tmp_path / "b")
    assert not (tmp_path / "b" / names[0]).exists()
    monkeypatch.setattr(ElasticModel, "draw_subnet_for_step", original_draw)
    code, _, err = run_cli(monkeypatch, capsys, *args, *fast, "--out", tmp_path / "b", "--resume")
    assert code == 0, err
    for name in names:
        a, b = _tensors(tmp_path / "a" / name), _tensors(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"

    # continuing the shared run with other settings is refused before any work
    other = ["--sampling", "uniform", "--out", tmp_path / "b", "--resume"]
    code, _, err = run_cli(monkeypatch, capsys, *args, *fast, *other)
    assert code == 2 and "other settings (sampling)" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sizes", "0.3,1.5"], "sizes: 1.5 is not a fraction"),
        (["--sizes", "0.5,0.5"], "repeats a size"),
        (
            ["--sampling", "greedy"],
            "sampling ('--sampling'): must be one of reweighted, uniform, sandwich, got 'greedy'",
        ),
        (["--unit", "latency"], "unit ('--unit'): must be one of macs, params, got 'latency'"),
        (["--allocation", "even"], "allocation ('--allocation'): must be one of importance, uniform, got 'even'"),
        (
            ["--importance-norm", "max"],
            "importance_norm ('--importance-norm'): must be one of kind, none, sqrt, rank, got 'max'",
        ),
        (["--smallest-weight", "0.5"], "smallest_weight=0.5 is invalid"),
    ],
)
def test_bad_settings_are_refused_with_the_valid_values(flags, message, tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "compress", "ofa", tmp_path, "--out", tmp_path / "o", *flags)
    assert code == 2 and message in err
    with pytest.raises(SlimdiffError):
        OFAConfig(sizes=(0.3, 1.5)).validate()


def test_a_size_below_the_smallest_subnet_is_refused(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet").eval())
    with pytest.raises(SlimdiffError, match="the smallest subnet"):
        compress(adapter, OFAConfig(sizes=(0.05,), importance_samples=1), _calibration(adapter, digits))


def test_small_group_subnets_lose_whole_group_norm_groups() -> None:
    """16 GroupNorm groups over widths 32/48/64: every subnet's norms keep whole groups of the shared model's (but
    the four over concatenations whose groups straddle the parts), so each subnet's norm output on its channels is
    the shared norm's there."""
    model = small_groups_unet()
    adapter = adapter_for(model)
    data = Calibration(load_data("digits", size=8, channels=3), lambda labels: None, DEFAULT_SCHEDULE)
    result = compress(adapter, OFAConfig(sizes=SIZES, importance_samples=2, steps=2), data)
    elastic = result.model
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    x = torch.randn(2, 128, 2, 2, generator=torch.manual_seed(1))
    for i, subnet in enumerate(elastic.subnets):
        extracted = elastic.extract(i)
        exact = 0
        for name, norm in norms.items():
            small = extracted.get_submodule(name)
            keep = sorted(subnet.kept(f"{name}.weight", 0, norm.num_channels))
            size = norm.num_channels // norm.num_groups
            if len(keep) != size * len({c // size for c in keep}):  # not whole groups: a regrouped norm over a
                continue  # concatenation whose parts do not split into its groups
            assert small.num_groups * size == len(keep)
            inputs = x[:, : norm.num_channels]
            with torch.no_grad():  # same statistics over the same values; only the summation order may differ
                torch.testing.assert_close(small(inputs[:, keep]), norm(inputs)[:, keep], rtol=0, atol=1e-6)
            exact += 1
        assert exact >= len(norms) - 4
        assert any(extracted.get_submodule(n).num_groups < m.num_groups for n, m in norms.items())  # groups dropped


def test_allocation_keeps_whole_group_norm_units() -> None:
    group = ChannelGroupInfo((("a", "out"),), ("a",), 48, 1, "stage 0", "conv1", unit=6)
    for ratio in (0.05, 0.3, 0.52, 0.61, 1.0):
        kept = allocate([group], {group.key: 1.0}, ratio, floor=0.0)[group.key]
        assert kept % 6 == 0 and 6 <= kept <= 48 and abs(kept - max(ratio * 48, 6)) <= 3
