"""diffusers' cache hooks as baselines: the context they need, the MACs they really computed, state reset per run."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from slimdiff.engines import cache_baselines as cb
from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, macs_by_module
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import sample
from tests.helpers import FAMILIES

STEPS = 4


def sampler(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
    """One DDIM run of STEPS steps on 2 images (guided for conditional models: a doubled batch per call)."""
    adapter = adapter_for(model)
    example = adapter.example_inputs(2)
    cond = {"class": example.get("class_labels"), "text": example.get("encoder_hidden_states")}.get(adapter.cond_kind)
    uncond = None if adapter.cond_kind != "text" else torch.zeros_like(cond[:1])
    guidance = 1.0 if cond is None else 2.0
    return lambda: sample(
        adapter,
        n=2,
        steps=STEPS,
        cond=cond,
        guidance_scale=guidance,
        uncond_embedding=uncond,
        seed=0,
        batch_size=2,
        progress=False,
    )


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: build_tiny(name).eval() for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_hook_counts_the_full_cost(models: dict, family: str) -> None:
    model = models[family]
    meter = cb.MacMeter(model)
    with torch.no_grad():
        sampler(model)()
    meter.remove()
    assert meter.full == count_macs(model).total * 2 * (2 if adapter_for(model).cond_kind != "none" else 1) * STEPS
    assert meter.computed == meter.full


def test_a_block_that_does_not_run_costs_nothing(models: dict) -> None:
    model = models["tiny-dit"]
    block = model.transformer_blocks[1]
    meter = cb.MacMeter(model)
    block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        with torch.no_grad():
            model(**adapter_for(model).example_inputs(3))
    finally:
        del block.forward
        meter.remove()
    expected = 1 - macs_by_module(model, ["transformer_blocks.1"])["transformer_blocks.1"] / count_macs(model).total
    assert meter.fraction == pytest.approx(expected, abs=1e-9)
    assert meter.fraction < 1


SKIPPING = [
    ("tiny-dit", "first-block", 4.0),
    ("tiny-dit", "taylorseer-modules", 3),
    ("tiny-dit", "magcache", 4.0),
    ("tiny-dit", "pab", 3),
    ("tiny-dit", "fastercache", 3),
    ("tiny-unet", "taylorseer-modules", 3),
    ("tiny-unet", "pab", 3),
    ("tiny-sd", "taylorseer-modules", 3),
    ("tiny-sd", "pab", 3),
]


@pytest.mark.parametrize(("family", "hook", "value"), SKIPPING)
def test_a_hook_that_skips_costs_less_and_changes_the_output(models: dict, family: str, hook: str, value) -> None:
    model = models[family]
    run = sampler(model)
    with torch.no_grad():
        reference = run()
        with cb.attached(model, hook, value, steps=STEPS, calibrate=run) as hooked:
            first = run()
            first_fraction = hooked.meter.fraction
            hooked.meter.reset()
            second = run()  # the hooks' state is reset at the start of the run: the same output again
            assert hooked.meter.fraction == pytest.approx(first_fraction)
        after = run()
    assert first_fraction < 1
    assert not torch.equal(first, reference)
    assert torch.equal(first, second)
    assert torch.equal(after, reference)  # the model is bare again
    assert not hasattr(model, "_diffusers_hook")


NOTHING = [
    ("tiny-dit", "taylorseer"),  # its default patterns end in `attn`: DiT's are `attn1`
    ("tiny-unet", "taylorseer"),
    ("tiny-sd", "taylorseer"),
    ("tiny-unet", "fastercache"),  # it hooks attention under a top-level `transformer_blocks` only
    ("tiny-sd", "fastercache"),
]


@pytest.mark.parametrize(("family", "hook"), NOTHING)
def test_a_hook_that_caches_nothing_counts_full_cost(models: dict, family: str, hook: str) -> None:
    model = models[family]
    run = sampler(model)
    with torch.no_grad():
        reference = run()
        with cb.attached(model, hook, 2, steps=STEPS) as hooked:
            out = run()
    assert hooked.meter.fraction == 1.0
    assert torch.equal(out, reference)


@pytest.mark.parametrize("family", ["tiny-unet", "tiny-sd"])
@pytest.mark.parametrize("hook", ["first-block", "magcache"])
def test_block_list_hooks_refuse_unets(models: dict, family: str, hook: str) -> None:
    assert "no transformer block list" in cb.refusal(models[family], hook)
    with pytest.raises(SlimdiffError, match="no transformer block list"):
        with cb.attached(models[family], hook, 0.1, steps=STEPS):
            pass
    assert not hasattr(models[family], "_diffusers_hook")


def test_bad_input_is_one_line(models: dict) -> None:
    with pytest.raises(SlimdiffError, match="unknown cache hook 'teacache'; valid: first-block"):
        cb.hook_kind("teacache")
    with pytest.raises(SlimdiffError, match="cache_interval must be ≥ 1"):
        with cb.attached(models["tiny-dit"], "taylorseer-modules", 0, steps=STEPS):
            pass
    with pytest.raises(SlimdiffError, match="target must lie in"):
        cb.tune(models["tiny-dit"], "pab", 1.5, steps=STEPS, run=lambda: None)


@pytest.mark.parametrize(("hook", "target"), [("first-block", 0.8), ("pab", 0.8)])
def test_tune_lands_at_or_under_the_target(models: dict, hook: str, target: float) -> None:
    model = models["tiny-dit"]
    run = sampler(model)
    with torch.no_grad():
        tuned = cb.tune(model, hook, target, steps=STEPS, run=run, trials=6)
    assert tuned.reached
    assert tuned.fraction <= target * 1.03
    assert (tuned.value, tuned.fraction) in tuned.trials
    fitting = [fraction for _, fraction in tuned.trials if fraction <= target * 1.03]
    assert tuned.fraction == max(fitting)  # the setting that keeps the most MACs within the target
