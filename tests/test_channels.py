"""Diff-Pruning engine: budget precision, slice-exact surgery, identity at ratio 0, export, every family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, tiny_vae

from slimdiff.data import load_data
from slimdiff.engines import Calibration
from slimdiff.engines.channel_surgery import calibration_batch, channel_scores, prune_copy, verify_slices
from slimdiff.engines.channels import ChannelPruningConfig, accumulate_gradients, compress
from slimdiff.errors import SlimdiffError
from slimdiff.export import load, load_architecture, save
from slimdiff.metrics.cost import count_macs
from slimdiff.models import adapter_for, build_tiny
from slimdiff.models.base import count_params
from slimdiff.training.diffusion import DEFAULT_SCHEDULE, make_scheduler, training_target


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", size=16)


def _cond_for(adapter):
    if adapter.cond_kind == "class":
        return lambda labels: labels
    if adapter.cond_kind == "text":
        return lambda labels: torch.randn(len(labels), 5, adapter.cross_attention_dim, generator=torch.manual_seed(0))
    return lambda labels: None


def _data(adapter, digits) -> Calibration:
    return Calibration(digits, _cond_for(adapter), DEFAULT_SCHEDULE)


def _fast(**kwargs) -> ChannelPruningConfig:
    return ChannelPruningConfig(calibration_size=4, timestep_stride=100, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_prunes_every_family_to_the_macs_budget_and_round_trips(name: str, digits, tmp_path: Path) -> None:
    model = build_tiny(name).eval()
    adapter = adapter_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(adapter, _fast(importance="diff-pruning", target_macs=0.5), _data(adapter, digits))
    assert result.achieved["macs"] == pytest.approx(0.5, rel=0.02)
    assert count_macs(result.model).total == result.pruned["macs"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the source is untouched
    inputs = adapter_for(result.model).example_inputs(2)
    with torch.no_grad():
        expected = result.model(**inputs).sample
    assert torch.isfinite(expected).all()
    save(result.model, tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "pruned")(**inputs).sample, expected)


@pytest.mark.parametrize("target", [0.25, 0.7])
def test_macs_budget_is_met_within_two_percent(target: float, digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    result = compress(adapter, _fast(importance="magnitude", target_macs=target), _data(adapter, digits))
    assert result.achieved["macs"] == pytest.approx(target, rel=0.02)


@pytest.mark.parametrize(
    ("name", "target"), [("tiny-unet", 0.2), ("tiny-unet", 0.6), ("tiny-unet", 0.9), ("tiny-dit", 0.2)]
)
def test_params_budget_is_met_within_two_percent(name: str, target: float, digits) -> None:
    adapter = adapter_for(build_tiny(name))
    result = compress(adapter, _fast(importance="random", target_params=target), _data(adapter, digits))
    assert result.achieved["params"] == pytest.approx(target, rel=0.02)
    assert count_params(result.model) == result.pruned["params"]


@pytest.mark.parametrize("name", FAMILIES)
def test_global_widths_meet_the_budget_with_uneven_slices_of_the_original(name: str, digits) -> None:
    model = build_tiny(name).eval()
    adapter = adapter_for(model)
    config = _fast(importance="diff-pruning", target_macs=0.5, widths="global")
    result = compress(adapter, config, _data(adapter, digits))
    assert result.achieved["macs"] == pytest.approx(0.5, rel=0.02)
    assert result.record["widths"] == "global"
    uniform = compress(adapter, _fast(importance="diff-pruning", target_macs=0.5), _data(adapter, digits))

    def widths(m: torch.nn.Module) -> dict[str, int]:
        return {n: x.weight.shape[0] for n, x in m.named_modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear))}

    ranked, even, original = widths(result.model), widths(uniform.model), widths(model)
    assert ranked != even  # the global ranking gives other widths than one ratio everywhere
    assert all(0 < ranked[n] <= original[n] for n in ranked)
    inputs = adapter_for(result.model).example_inputs(2)
    with torch.no_grad():
        assert torch.isfinite(result.model(**inputs).sample).all()
    verify_slices(model, prune_copy(model, 0.3, "magnitude", global_ranking=True))  # uneven, yet slices of the original


def test_pruned_unet_runs_in_the_ddim_pipeline(digits, tmp_path: Path) -> None:
    from diffusers import DDIMPipeline, DDIMScheduler

    adapter = adapter_for(build_tiny("tiny-unet"))
    result = compress(adapter, _fast(importance="magnitude", target_macs=0.4), _data(adapter, digits))
    save(result.model, tmp_path / "pruned")

    def images(model: torch.nn.Module) -> np.ndarray:
        pipeline = DDIMPipeline(model, DDIMScheduler())
        return pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images

    loaded = images(load(tmp_path / "pruned"))
    assert loaded.shape == (2, 16, 16, 1)
    np.testing.assert_array_equal(loaded, images(result.model.eval()))  # what the pruned model samples in memory
    assert not np.allclose(loaded, images(adapter.model), atol=1e-3)  # and not the original's images


def test_residual_pruned_dit_runs_in_the_dit_pipeline(tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    model = build_tiny("tiny-dit", in_channels=4, out_channels=4).eval()
    pruned = prune_copy(model, 0.5, "magnitude").model
    assert pruned.pos_embed.proj.out_channels == model.pos_embed.proj.out_channels // 2
    save(pruned, tmp_path / "pruned")
    pipeline = DiTPipeline(transformer=load(tmp_path / "pruned"), vae=tiny_vae(4), scheduler=DDIMScheduler())
    out = pipeline(class_labels=[1, 7], num_inference_steps=2, guidance_scale=2.0, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()


def test_residual_pruned_dit_with_odd_heads_loads_weightless_at_its_pruned_width(tmp_path: Path) -> None:
    """`slimdiff info` reads the architecture only: the position table must come back at the pruned width."""
    model = build_tiny("tiny-dit", num_attention_heads=3).eval()  # 3 heads of 16: width 48
    pruned = prune_copy(model, 0.5, "magnitude").model
    save(pruned, tmp_path / "pruned")
    meta = load_architecture(tmp_path / "pruned")
    assert meta.pos_embed.pos_embed.shape == pruned.pos_embed.pos_embed.shape != model.pos_embed.pos_embed.shape
    assert count_macs(meta).total == count_macs(pruned).total


@pytest.mark.parametrize("name", FAMILIES)
def test_ratio_zero_is_the_identity(name: str) -> None:
    model = build_tiny(name).eval()
    pruned = prune_copy(model, 0.0, "magnitude").model
    inputs = adapter_for(model).example_inputs(2)
    with torch.no_grad():
        assert torch.equal(pruned(**inputs).sample, model(**inputs).sample)


def test_kept_weights_are_slices_of_the_original() -> None:
    model = build_tiny("tiny-sd").eval()
    pruned = prune_copy(model, 0.4, "magnitude")
    layer = pruned.model.down_blocks[0].resnets[0].conv1
    keep_out = pruned.kept[("down_blocks.0.resnets.0.conv1", "out")]
    keep_in = pruned.kept.get(("down_blocks.0.resnets.0.conv1", "in"), list(range(32)))
    assert len(keep_out) < 32
    assert torch.equal(layer.weight, model.down_blocks[0].resnets[0].conv1.weight[keep_out][:, keep_in])


def test_head_pruning_keeps_head_dim_and_updates_heads() -> None:
    model = build_tiny("tiny-dit").eval()
    result = prune_copy(model, 0.5, "magnitude", attention="heads")
    pruned = result.model
    attn = pruned.transformer_blocks[0].attn1
    assert attn.heads == 2 and attn.inner_dim == 32 and attn.scale == pytest.approx(16**-0.5)
    verify_slices(model, result)  # every kept weight is the original's at the kept indices
    for projection in ("to_q", "to_k", "to_v"):  # whole heads were kept: two of the original's four, all 16 dims
        kept = result.kept[(f"transformer_blocks.0.attn1.{projection}", "out")]
        heads = sorted({i // 16 for i in kept})
        assert len(heads) == 2 and sorted(kept) == [h * 16 + d for h in heads for d in range(16)]
    with torch.no_grad():
        assert torch.isfinite(pruned(**adapter_for(pruned).example_inputs(1)).sample).all()


def test_head_dim_pruning_keeps_heads_and_updates_scale() -> None:
    pruned = prune_copy(build_tiny("tiny-dit").eval(), 0.5, "magnitude", attention="head-dim").model
    attn = pruned.transformer_blocks[0].attn1
    assert attn.heads == 4 and attn.inner_dim == 32 and attn.scale == pytest.approx(8**-0.5)


def test_diff_pruning_threshold_drops_the_noisy_timesteps(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    every = accumulate_gradients(adapter, _data(adapter, digits), _fast(target_macs=0.5, thr=0.0))
    early = accumulate_gradients(adapter, _data(adapter, digits), _fast(target_macs=0.5, thr=0.9))
    assert every == list(range(0, 1000, 100))
    assert early[0] == 0 and len(early) < len(every)
    assert all(p.grad is not None for p in adapter.model.parameters() if p.requires_grad)


def _grads(adapter) -> list[torch.Tensor]:
    return [p.grad.clone() for p in adapter.model.parameters() if p.requires_grad]


def test_sweep_gradients_are_the_sum_over_kept_timesteps_whatever_the_pass_size(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    data = _data(adapter, digits)
    kept = accumulate_gradients(adapter, data, _fast(target_macs=0.5, thr=0.9, batch_size=4))
    whole = _grads(adapter)
    assert accumulate_gradients(adapter, data, _fast(target_macs=0.5, thr=0.9, batch_size=3)) == kept
    # the reference: Σ over the kept timesteps of the batch-mean loss's gradient, in one pass each
    adapter.model.zero_grad(set_to_none=True)
    scheduler = make_scheduler("ddpm", DEFAULT_SCHEDULE)
    x0, labels = calibration_batch(digits, 4, 0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for step in kept:
        t = torch.full((4,), step)
        out = adapter(scheduler.add_noise(x0, noise, t), t, data.cond_for(labels))
        F.mse_loss(out, training_target(scheduler, x0, noise, t)).backward()
    reference = _grads(adapter)
    accumulate_gradients(adapter, data, _fast(target_macs=0.5, thr=0.9, batch_size=3))
    # float sums in another order: within 1e-5 of the largest gradient entry (some entries are float noise, ~1e-10)
    atol = 1e-5 * max(want.abs().max().item() for want in reference)
    for got, one_pass, want in zip(_grads(adapter), whole, reference, strict=True):
        assert torch.allclose(one_pass, want, rtol=0, atol=atol)
        assert torch.allclose(got, want, rtol=0, atol=atol)


def test_importances_choose_different_channels(digits) -> None:
    model = build_tiny("tiny-unet")
    adapter = adapter_for(model)
    accumulate_gradients(adapter, _data(adapter, digits), _fast(target_macs=0.5))
    kept = {
        importance: tuple(sorted((key, tuple(v)) for key, v in prune_copy(model, 0.25, importance).kept.items()))
        for importance in ("diff-pruning", "magnitude", "random")
    }
    assert len(set(kept.values())) == 3


def test_bad_configs_are_refused() -> None:
    with pytest.raises(SlimdiffError, match="exactly one budget"):
        ChannelPruningConfig(target_macs=0.5, target_params=0.5).validate()
    with pytest.raises(
        SlimdiffError,
        match=r"importance \('--importance'\): must be one of diff-pruning, taylor, magnitude, random, got 'l2'",
    ):
        ChannelPruningConfig(importance="l2", target_macs=0.5).validate()
    with pytest.raises(
        SlimdiffError, match=r"invalid setting widths \('--widths'\): must be one of uniform, global, got 'per-layer'"
    ):
        ChannelPruningConfig(widths="per-layer", target_macs=0.5).validate()
    with pytest.raises(SlimdiffError, match=r"budget 1.5 must be a fraction"):
        ChannelPruningConfig(target_macs=1.5).validate()
    with pytest.raises(SlimdiffError, match=r"batch_size \(0\) must be ≥ 1"):
        ChannelPruningConfig(target_macs=0.5, batch_size=0).validate()


def test_unreachable_budget_is_reported(digits) -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    with pytest.raises(
        SlimdiffError,
        match=r"cannot reach 0.05 of the original macs: the smallest reachable is 0\.\d{3} .*keep most: .*conv_out",
    ):
        compress(adapter, _fast(importance="magnitude", target_macs=0.05), _data(adapter, digits))


def test_dit_residual_stream_is_pruned_consistently() -> None:
    # One set of residual channels everywhere: patch embedding, position table, every block's inputs and outputs,
    # each of the six adaLN-Zero chunks, both chunks of the final modulation, and the output layer's input.
    model = build_tiny("tiny-dit").eval()
    pruned = prune_copy(model, 0.5, "magnitude")
    width = model.pos_embed.proj.out_channels
    residual = pruned.kept[("pos_embed.proj", "out")]
    assert len(residual) == width // 2 and pruned.model.inner_dim == width // 2
    for i in range(len(model.transformer_blocks)):
        block = f"transformer_blocks.{i}"
        for name, side in [
            ("attn1.to_q", "in"),
            ("attn1.to_out.0", "out"),
            ("ff.net.0.proj", "in"),
            ("ff.net.2", "out"),
        ]:
            assert pruned.kept[(f"{block}.{name}", side)] == residual
        assert pruned.kept[(f"{block}.norm1.linear", "out")] == [c + width * k for k in range(6) for c in residual]
        assert pruned.model.transformer_blocks[i].norm1.norm.normalized_shape == (width // 2,)
    assert pruned.kept[("proj_out_1", "out")] == [c + width * k for k in range(2) for c in residual]
    assert pruned.kept[("proj_out_2", "in")] == residual
    assert torch.equal(pruned.model.pos_embed.pos_embed, model.pos_embed.pos_embed[..., residual])


@pytest.mark.parametrize(
    ("name", "attention"), [("tiny-unet", "heads"), ("tiny-sd", "head-dim"), ("tiny-dit", "heads")]
)
def test_weightless_trial_prunes_what_the_real_copy_prunes(name: str, attention: str) -> None:
    model = build_tiny(name, **({"num_attention_heads": 3} if name == "tiny-dit" else {})).eval()
    scores = channel_scores(model, "magnitude", attention=attention)
    root = adapter_for(model).channel_groups()[0].root
    trial = dict(attention=attention, boosted={root: 0.6})
    meta, real = prune_copy(model, 0.3, scores, weightless=True, **trial), prune_copy(model, 0.3, scores, **trial)
    assert all(p.is_meta for p in meta.model.parameters()) and not any(p.is_meta for p in real.model.parameters())
    assert (meta.macs, meta.params, meta.kept) == (real.macs, real.params, real.kept)
    assert [p.shape for p in meta.model.parameters()] == [p.shape for p in real.model.parameters()]
    assert prune_copy(model, 0.3, "magnitude", **trial).kept == real.kept  # replayed scores = scoring the copy


def test_search_on_weightless_copies_gives_what_searching_real_copies_gives(digits, monkeypatch) -> None:
    """The search as it was before weightless trials: every trial a real copy (with its grads), scored anew."""
    from slimdiff.engines import channels

    model = build_tiny("tiny-dit", num_attention_heads=3).eval()
    adapter = adapter_for(model)
    config = _fast(importance="diff-pruning", target_macs=0.5)
    ours = compress(adapter, config, _data(adapter, digits))
    real_copy = channels.prune_copy

    def real_trial(model, ratio, scores, *, weightless=False, **kwargs):
        return real_copy(model, ratio, config.importance, seed=config.seed, **kwargs)

    monkeypatch.setattr(channels, "prune_copy", real_trial)
    theirs = compress(adapter, config, _data(adapter, digits))
    assert (ours.ratio, ours.pruned) == (theirs.ratio, theirs.pruned)
    expected = theirs.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in ours.model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# GroupNorms lose whole groups
# ----------------------------------------------------------------------------------------------------------------
def small_groups_unet(sample_size: int = 8) -> torch.nn.Module:
    """The issue's U-Net: 16 GroupNorm groups over widths 32/48/64 (groups of 2, 3 and 4 channels; 5 and 7 over
    two skip concatenations), attention at two levels."""
    torch.manual_seed(0)
    return build_tiny(
        "tiny-unet",
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=[32, 48, 64],
        layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=16,
        attention_head_dim=8,
    ).eval()


def test_group_norms_lose_whole_groups_and_their_output_on_the_kept_channels_is_unchanged() -> None:
    model = small_groups_unet()
    pruned = prune_copy(model, 0.5, "magnitude")
    verify_slices(model, pruned)
    source = dict(model.named_modules())
    x = torch.randn(2, 128, 4, 4, generator=torch.manual_seed(1))
    exact = 0
    for name, norm in pruned.model.named_modules():
        if not isinstance(norm, torch.nn.GroupNorm) or name in pruned.regrouped:
            continue
        original, keep = source[name], pruned.kept[(name, "out")]
        size = original.num_channels // original.num_groups
        assert norm.num_groups == len(keep) // size < original.num_groups  # whole groups gone, the size kept
        inputs = x[:, : original.num_channels]
        with torch.no_grad():
            expected = original(inputs)[:, keep]
            # the same statistics over the same values; only the summation order may differ (a few float ulps)
            torch.testing.assert_close(norm(inputs[:, keep]), expected, rtol=0, atol=1e-6)
        exact += 1
    # every norm but the four over concatenations whose groups straddle the parts (64 + 48 in groups of 7, 48 + 32
    # in groups of 5), which no choice of channels keeps exact
    assert exact == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) - 4
    assert sorted(pruned.regrouped) == [
        "up_blocks.0.resnets.2.norm1",
        "up_blocks.1.resnets.0.norm1",
        "up_blocks.1.resnets.2.norm1",
        "up_blocks.2.resnets.0.norm1",
    ]
    for name in pruned.regrouped:  # regrouped: groups at least as large as before, dividing the channels
        norm, original = pruned.model.get_submodule(name), source[name]
        assert norm.num_channels % norm.num_groups == 0
        assert norm.num_channels // norm.num_groups >= original.num_channels // original.num_groups


def test_slice_check_refuses_a_group_norm_that_lost_part_of_a_group() -> None:
    model = small_groups_unet()
    pruned = prune_copy(model, 0.5, "magnitude")
    name = "down_blocks.2.resnets.1.norm2"  # groups of 4 channels, inside one resnet
    keep = pruned.kept[(name, "out")]
    pruned.kept[(name, "out")] = [keep[0] + 1, *keep[1:], 63] if keep[0] + 1 not in keep else keep[::-1]
    with pytest.raises(SlimdiffError, match=f"GroupNorm '{name}' did not keep whole groups"):
        verify_slices(model, pruned)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_small_group_unet_reaches_its_macs_budget_and_loads_and_samples(target: float, tmp_path: Path) -> None:
    from diffusers import DDIMPipeline, DDIMScheduler

    model = small_groups_unet(sample_size=24)
    adapter = adapter_for(model)
    data = Calibration(load_data("digits", size=24, channels=3), lambda labels: None, DEFAULT_SCHEDULE)
    result = compress(adapter, _fast(importance="diff-pruning", target_macs=target), data)
    assert result.achieved["macs"] == pytest.approx(target, rel=0.02)
    assert len(result.record["regrouped_norms"]) == 4
    save(result.model, tmp_path / "pruned")
    pipeline = DDIMPipeline(load(tmp_path / "pruned"), DDIMScheduler())
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 24, 24, 3) and np.isfinite(images).all()
