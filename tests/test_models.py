"""Adapters: uniform calls, block graphs, removable layers, post-surgery fix-ups, reference architectures."""

from __future__ import annotations

import json

import pytest
import torch
import torch_pruning as tp
from helpers import FAMILIES, reference_config

from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs
from slimdiff.models import SkippedLayer, adapter_for, build, build_tiny
from slimdiff.models.base import count_params

#: reference/README.md: exact params, MACs incl. attention (batch 1) within 1 %.
REFERENCE_FIGURES = {
    "ddpm-cifar10-32.unet.json": (35_746_307, 6.22e9, 9, 28),
    "sd-1.5.unet.json": (859_520_964, 401.6e9, 9, 38),
    "dit-xl-2-256.transformer.json": (749_826_464, 118.67e9, 28, 28),
    "sdxl-base-1.0.unet.json": (2_567_463_684, 3.38e12, 7, 28),
}


def _cond(adapter, batch: int):
    if adapter.cond_kind == "class":
        return torch.arange(batch) % 10
    if adapter.cond_kind == "text":
        return torch.randn(batch, 5, adapter.cross_attention_dim)
    return None


@pytest.mark.parametrize("name", FAMILIES)
def test_uniform_call_matches_model(name: str) -> None:
    model = build_tiny(name).eval()
    adapter = adapter_for(model)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999])
    cond = _cond(adapter, 3)
    eps = adapter(x, t, cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    kwargs = {"unet": {}, "sd-unet": {"encoder_hidden_states": cond}, "dit": {"class_labels": cond}}[adapter.family]
    direct = model(x, t, **kwargs).sample
    assert torch.equal(eps, direct[:, :1])


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_condition_is_refused(name: str) -> None:
    adapter = adapter_for(build_tiny(name))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    if adapter.cond_kind == "none":
        with pytest.raises(SlimdiffError, match="unconditional"):
            adapter(x, t, torch.zeros(2, dtype=torch.long))
    else:
        with pytest.raises(SlimdiffError, match="needs"):
            adapter(x, t, None)


def test_unet_block_graph_follows_skip_connections() -> None:
    blocks = adapter_for(build_tiny("tiny-unet")).blocks()
    names = [b.name for b in blocks]
    assert names == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    by_name = {b.name: b for b in blocks}
    # layers_per_block=1: each up block has 2 resnets, consuming skips from the end of the down path.
    assert by_name["up_blocks.0"].inputs == ("mid_block", "down_blocks.2", "down_blocks.1")
    assert by_name["up_blocks.2"].inputs == ("up_blocks.1", "down_blocks.0", "conv_in")


def test_dit_blocks_are_its_transformer_blocks() -> None:
    blocks = adapter_for(build_tiny("tiny-dit")).blocks()
    assert [b.name for b in blocks] == [f"transformer_blocks.{i}" for i in range(4)]
    assert blocks[1].inputs == ("transformer_blocks.0",)


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_each_layer_keeps_model_runnable_and_changes_output(name: str) -> None:
    reference = build_tiny(name).eval()
    adapter = adapter_for(reference)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 600])
    cond = _cond(adapter, 2)
    with torch.no_grad():
        expected = adapter(x, t, cond)
    removable = [layer for layer in adapter.layers() if layer.removable]
    assert removable
    for layer in removable:
        model = build_tiny(name).eval()
        model.load_state_dict(reference.state_dict())
        pruned = adapter_for(model)
        pruned.remove_layer(layer.name)
        assert isinstance(model.get_submodule(layer.name), SkippedLayer)
        assert count_params(model) == count_params(reference) - layer.params
        with torch.no_grad():
            out = pruned(x, t, cond)
        assert out.shape == expected.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, expected), f"removing {layer.name} changed nothing"


def test_non_removable_layer_is_refused_with_reason() -> None:
    adapter = adapter_for(build_tiny("tiny-unet"))
    fixed = next(layer for layer in adapter.layers() if not layer.removable)
    with pytest.raises(SlimdiffError, match="cannot be removed: changes channels"):
        adapter.remove_layer(fixed.name)
    with pytest.raises(SlimdiffError, match="not a layer"):
        adapter.remove_layer("down_blocks.9.resnets.0")


def _sliced_linear(linear: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    bias = linear.bias.detach()[rows] if rows is not None else linear.bias.detach()
    out = torch.nn.Linear(weight.shape[1], weight.shape[0])
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def test_attention_fixup_after_head_dim_pruning_matches_sliced_computation() -> None:
    """Shrinking the head dim of every head must update `scale`; the result equals attention on sliced weights."""
    model = build_tiny("tiny-unet").eval()
    adapter = adapter_for(model)
    attn = model.down_blocks[1].attentions[0]
    heads, head_dim = attn.heads, attn.inner_dim // attn.heads
    keep = torch.cat([torch.arange(h * head_dim, h * head_dim + head_dim // 2) for h in range(heads)])
    x = torch.randn(2, 64, 8, 8)
    tokens = attn.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = (
        torch.nn.functional.linear(tokens, p.weight[keep], p.bias[keep]) for p in (attn.to_q, attn.to_k, attn.to_v)
    )
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, _sliced_linear(getattr(attn, name), rows=keep))
    attn.to_out[0] = _sliced_linear(attn.to_out[0], cols=keep)
    adapter.fix_after_surgery()
    assert attn.heads == heads and attn.inner_dim == len(keep)
    assert attn.scale == pytest.approx((head_dim // 2) ** -0.5)
    split = lambda z: z.view(2, -1, heads, head_dim // 2).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) * (head_dim // 2) ** -0.5).softmax(-1)
    expected = (weights @ split(v)).transpose(1, 2).reshape(2, -1, len(keep))
    captured = {}
    hook = attn.to_out[0].register_forward_pre_hook(lambda module, args: captured.update(attended=args[0]))
    with torch.no_grad():
        attn(x)
    hook.remove()
    assert torch.allclose(captured["attended"], expected, atol=1e-5)


def test_group_norm_fixup_refuses_indivisible_channels() -> None:
    model = build_tiny("tiny-unet")
    adapter = adapter_for(model)
    resnet = model.down_blocks[0].resnets[0]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=adapter.example_inputs(1))
    graph.get_pruning_group(resnet.conv1, tp.prune_conv_out_channels, idxs=[0, 1, 2]).prune()
    with pytest.raises(SlimdiffError, match="not divisible by its 8 groups"):
        adapter.fix_after_surgery()


@pytest.mark.parametrize("name", sorted(REFERENCE_FIGURES))
def test_reference_architectures(name: str) -> None:
    params, macs, n_blocks, n_layers = REFERENCE_FIGURES[name]
    model = build(json.loads(reference_config(name).read_text()), empty=True)
    adapter = adapter_for(model)
    assert count_params(model) == params
    assert count_macs(model).total == pytest.approx(macs, rel=0.01)
    assert len(adapter.blocks()) == n_blocks
    assert len(adapter.layers()) == n_layers
    assert all(p.is_meta for p in model.parameters())


def test_unknown_family_is_refused() -> None:
    with pytest.raises(SlimdiffError, match="unsupported model family 'FluxTransformer2DModel'"):
        build({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(SlimdiffError, match="unknown tiny model"):
        build_tiny("tiny-flux")


@pytest.mark.parametrize("name", FAMILIES)
def test_channel_groups_cover_the_prunable_layers(name: str) -> None:
    model = build_tiny(name)
    adapter = adapter_for(model)
    groups = adapter.channel_groups()
    roots = {group.root for group in groups}
    output = {n for n, m in model.named_modules() if any(m is o for o in adapter.output_modules())}
    assert groups and not roots & output  # the output layer is never prunable
    assert all(group.channels > 0 and group.root in group.members for group in groups)
    attention_groups = [group for group in groups if group.attention]
    assert attention_groups  # q/k/v/out projections are coupled and flagged for per-head pruning
    if name == "tiny-unet":
        qkv = next(g for g in attention_groups if g.root.endswith("mid_block.attentions.0.to_v"))
        assert {f"mid_block.attentions.0.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")} <= set(qkv.members)
        skip = next(g for g in groups if g.root == "conv_in")  # the first skip tensor couples across the U-Net
        assert "conv_out" not in skip.members and len(skip.members) > 5
