"""Sampling through diffusers schedulers: seeded, batched, conditioned, guided; the training target."""

from __future__ import annotations

import pytest
import torch
from helpers import ddim_error_gain

from slimdiff.errors import SlimdiffError
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import DEFAULT_SCHEDULE, SAMPLERS, make_scheduler, sample, task_loss, training_target


@pytest.mark.parametrize("scheduler", sorted(SAMPLERS))
def test_samplers_are_seeded_and_finite(scheduler: str) -> None:
    adapter = adapter_for(build_tiny("tiny-unet").eval())
    first = sample(adapter, n=3, steps=4, scheduler=scheduler, seed=7, progress=False)
    again = sample(adapter, n=3, steps=4, scheduler=scheduler, seed=7, progress=False)
    other = sample(adapter, n=3, steps=4, scheduler=scheduler, seed=8, progress=False)
    assert first.shape == (3, 1, 16, 16) and torch.isfinite(first).all()
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_deterministic_sampler_does_not_depend_on_batching() -> None:
    adapter = adapter_for(build_tiny("tiny-unet").eval())
    whole = sample(adapter, n=4, steps=3, scheduler="ddim", seed=0, batch_size=4, progress=False)
    split = sample(adapter, n=4, steps=3, scheduler="ddim", seed=0, batch_size=3, progress=False)
    again = sample(adapter, n=4, steps=3, scheduler="ddim", seed=0, batch_size=3, progress=False)
    assert torch.equal(split, again)  # the same batching is the same computation: bit-identical
    # another batching sums in another order on the CPU: one call's batching noise, carried to the final images by
    # DDIM's gain, times 4 for the network's response to the input differences it carries (images in [-1, 1])
    sched = make_scheduler("ddim")
    sched.set_timesteps(3)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[0]
    with torch.no_grad():
        call_noise = (adapter(x, t, None) - torch.cat([adapter(x[:3], t, None), adapter(x[3:], t, None)])).abs().max()
    tolerance = 4 * ddim_error_gain(sched) * float(call_noise)
    assert (whole - split).abs().max() <= tolerance
    assert (whole[:1] - whole[1:2]).abs().max() > 100 * max(tolerance, 1e-6)  # far below what tells samples apart


def test_class_guidance_changes_samples_and_uses_null_class() -> None:
    adapter = adapter_for(build_tiny("tiny-dit").eval())
    labels = torch.tensor([1, 2])
    plain = sample(adapter, n=2, steps=3, cond=labels, progress=False)
    guided = sample(adapter, n=2, steps=3, cond=labels, guidance_scale=3.0, progress=False)
    assert not torch.allclose(plain, guided)
    seen = []
    hook = adapter.model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["class_labels"].clone()), with_kwargs=True
    )
    sample(adapter, n=2, steps=1, cond=labels, guidance_scale=3.0, progress=False)
    hook.remove()
    assert seen[0].tolist() == [1, 2, 1000, 1000]


def test_text_guidance_needs_the_empty_prompt() -> None:
    adapter = adapter_for(build_tiny("tiny-sd").eval())
    cond = torch.randn(2, 5, 32)
    with pytest.raises(SlimdiffError, match="empty prompt"):
        sample(adapter, n=2, steps=2, cond=cond, guidance_scale=2.0, progress=False)
    out = sample(
        adapter, n=2, steps=2, cond=cond, guidance_scale=2.0, uncond_embedding=torch.zeros(1, 5, 32), progress=False
    )
    assert out.shape == (2, 1, 16, 16)


def test_bad_sampling_arguments() -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    with pytest.raises(SlimdiffError, match="unknown scheduler 'heun'; valid: ddpm, ddim, dpm, euler"):
        sample(adapter, n=1, steps=1, scheduler="heun", progress=False)
    with pytest.raises(SlimdiffError, match="must be ≥ 1"):
        sample(adapter, n=0, steps=1, progress=False)
    with pytest.raises(SlimdiffError, match="got 3 conditions for 2 samples"):
        sample(adapter_for(build_tiny("tiny-dit")), n=2, steps=1, cond=torch.tensor([1, 2, 3]), progress=False)


def test_training_target_follows_prediction_type() -> None:
    x0, noise, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([10, 900])
    assert torch.equal(training_target(make_scheduler("ddpm"), x0, noise, t), noise)
    v_sched = make_scheduler("ddpm", {"prediction_type": "v_prediction"})
    alpha = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    assert torch.allclose(training_target(v_sched, x0, noise, t), expected, atol=1e-6)


def test_min_snr_weighting_caps_the_low_noise_timesteps() -> None:
    scheduler = make_scheduler("ddpm", DEFAULT_SCHEDULE)
    pred, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)  # per-sample MSE 1
    t = torch.tensor([10, 900])  # SNR ≫ 5 at t=10, ≪ 5 at t=900
    assert task_loss(pred, target, t, scheduler, None) == 1.0
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.stack([torch.clamp(s, max=5.0) / s for s in snr]).mean()
    weighted = task_loss(pred, target, t, scheduler, 5.0)
    assert torch.allclose(weighted, expected) and expected < 0.6  # t=10 weighs 5/SNR ≪ 1, t=900 weighs 1
    assert torch.allclose(task_loss(pred, target, t, scheduler, 1e9), torch.tensor(1.0))


def test_sampling_keeps_no_autograd_graph() -> None:
    """Sampling called with gradients on (a user's script, the latent benchmark) records no graph: a graph would hold
    every step's activations for the whole trajectory (gigabytes for a latent model at batch 100)."""
    adapter = adapter_for(build_tiny("tiny-unet"))
    assert torch.is_grad_enabled() and any(p.requires_grad for p in adapter.model.parameters())
    images = sample(adapter, n=2, steps=2, batch_size=2, decode=lambda x: x * 2, progress=False)
    assert images.grad_fn is None and not images.requires_grad
