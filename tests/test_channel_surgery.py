"""The shared channel surgery (one recording/replaying importance for channels and OFA) and the one `Literal` check
every engine config inherits."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import torch_pruning as tp
from test_channels import _data, small_groups_unet

from slimdiff.data import load_data
from slimdiff.engines import engine_names, get_engine
from slimdiff.engines.channel_surgery import ChannelScores, prune_copy, verify_slices
from slimdiff.engines.channels import channel_scores
from slimdiff.engines.ofa import taylor_importance
from slimdiff.errors import SlimdiffError
from slimdiff.models import adapter_for
from slimdiff.settings import CompareSettings, flag_of, literal_choices


def test_one_importance_records_and_replays_for_both_engines() -> None:
    model = small_groups_unet()
    adapter = adapter_for(model)
    channels = channel_scores(model, "magnitude")  # the channels engine: one pass of a torch-pruning scorer
    ofa, groups = taylor_importance(adapter, _data(adapter, load_data("digits", size=8, channels=3)), 3, seed=0)
    assert type(channels) is type(ofa) is ChannelScores
    assert (channels.passes, ofa.passes) == (1, 3)  # OFA averages its single-sample passes
    assert {g.key for g in groups} == set(ofa.means) and set(ofa.means) <= set(channels.means)  # one group key
    # recorded: each group's scores are the scorer's on the full-width group (the mean over the passes)
    magnitude = tp.importance.GroupMagnitudeImportance(p=1)
    for key, group in channels.groups.items():
        torch.testing.assert_close(channels.means[key], magnitude(group).double(), rtol=0, atol=0)
    assert all(ofa.totals[key].allclose(ofa.means[key] * 3) for key in ofa.means)
    # replayed: every copy, real or weightless, prunes the same channels by either engine's scores
    for scores in (channels, ofa):
        real, meta = prune_copy(model, 0.4, scores), prune_copy(model, 0.4, scores, weightless=True)
        assert real.kept == meta.kept and (real.macs, real.params) == (meta.macs, meta.params)
        assert real.kept != prune_copy(model, 0.4, "random", seed=1).kept  # the scores decide what goes
        verify_slices(model, real)
    assert prune_copy(model, 0.4, channels).kept == prune_copy(model, 0.4, "magnitude").kept


def _literal_fields(config_class: type) -> list[tuple[str, tuple]]:
    hints = typing.get_type_hints(config_class)
    return [
        (f.name, literal_choices(hints[f.name]))
        for f in dataclasses.fields(config_class)
        if literal_choices(hints[f.name]) is not None
    ]


@pytest.mark.parametrize("engine", engine_names())
def test_every_engine_refuses_a_value_outside_a_literal_field_in_one_line_naming_the_flag(engine: str) -> None:
    config_class = get_engine(engine).config
    fields = _literal_fields(config_class)
    assert fields, f"{engine} has no choice field"
    flags = {f.name: flag_of(f) for f in dataclasses.fields(config_class)}
    for name, choices in fields:
        with pytest.raises(SlimdiffError) as refused:
            config_class(**{name: "bogus"}).validate()  # refused before any other check (e.g. a missing budget)
        expected = f"invalid setting {name} ('{flags[name]}'): must be one of {', '.join(choices)}, got 'bogus'"
        assert str(refused.value) == expected


def test_a_tuple_of_choices_is_checked_item_by_item() -> None:
    with pytest.raises(SlimdiffError, match=r"curve_schedulers \('--curve-schedulers'\): must be one of ddpm, ddim"):
        CompareSettings(curve_schedulers=("ddim", "heun")).validate()
    CompareSettings(curve_schedulers=("ddim", "dpm")).validate()
