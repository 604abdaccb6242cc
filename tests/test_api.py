"""The top-level API resolves to the real objects."""

import pytest

import slimdiff
from slimdiff.export import load


def test_public_names_resolve() -> None:
    assert slimdiff.load is load
    for name in slimdiff.__all__:
        assert getattr(slimdiff, name) is not None
    with pytest.raises(AttributeError):
        slimdiff.compress_everything  # noqa: B018
