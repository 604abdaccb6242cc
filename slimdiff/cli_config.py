"""Command-line options derived from a settings dataclass: every job's command and every engine's
`slimdiff compress NAME` is built from its config, so a flag is always spelled as its field.

A field becomes `--field-name`, with the field's type, default and `metadata["help"]`; `metadata["flag"]`, when
given, is an older spelling still accepted beside it. Supported field types: `int`, `float`, `str`, `bool` (a
`--flag/--no-flag` pair), a `Literal` of strings (listed in the help; checked by the config's `validate`),
`X | None`, and `tuple[X, ...]` / `list[X]` of those scalars (comma-separated). Values are checked by the config's
`validate`, so the command line and a recipe refuse a bad value with the same line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import click

from slimdiff.errors import SlimdiffError
from slimdiff.settings import flag_of

if TYPE_CHECKING:
    from slimdiff.engines import Engine

_SCALARS: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}


def resume_option() -> click.Option:
    """`--resume`: continue the run already in --out (`slimdiff.io.output_dir`)."""
    return click.Option(
        ["--resume"],
        is_flag=True,
        help="Continue the run already in --out (from its latest checkpoint or saved state).",
    )


def overwrite_option() -> click.Option:
    """`--overwrite`: replace what --out holds (`slimdiff.io.output_dir`, `slimdiff.io.check_output_file`)."""
    return click.Option(
        ["--overwrite"],
        is_flag=True,
        help="Replace what --out holds: the new result is built beside it and swapped in when done.",
    )


class CommaSeparated(click.ParamType):
    """`0.3,0.5,0.75` → a tuple of one scalar type."""

    name = "list"

    def __init__(self, item: click.ParamType) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, (tuple, list)):
            return tuple(value)
        try:
            return tuple(self.item.convert(part.strip(), param, ctx) for part in str(value).split(",") if part.strip())
        except click.BadParameter:
            flag = param.opts[0] if param is not None and param.opts else "the value"
            self.fail(f"{flag} must be comma-separated {self.item.name}s, got '{value}'", param, ctx)


def _unwrap_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is Union:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _scalar(tp: Any, name: str) -> click.ParamType:
    """The click type of a scalar field type (a `Literal` is a string its config's `validate` checks)."""
    if typing.get_origin(tp) is Literal:
        return click.STRING
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config field type {tp!r} for field {name}")
    return _SCALARS[tp]


def _option(field: dataclasses.Field, tp: Any) -> click.Option:
    """The click option for one config field."""
    flags = [flag_of(field), *[f for f in [field.metadata.get("flag")] if f and f != flag_of(field)]]
    help_text = field.metadata.get("help", "")
    default = (
        field.default
        if field.default is not dataclasses.MISSING
        else field.default_factory()
        if field.default_factory is not dataclasses.MISSING
        else None
    )
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        name = flags[0].removeprefix("--")
        return click.Option([f"--{name}/--no-{name}", field.name], default=default, show_default=True, help=help_text)
    if origin is Literal:
        help_text = help_text or "One of " + ", ".join(map(str, typing.get_args(tp))) + "."
    if origin in (tuple, list):
        param_type: click.ParamType = CommaSeparated(_scalar(typing.get_args(tp)[0], field.name))
        default = ",".join(map(str, default)) if default else None
    else:
        param_type = _scalar(tp, field.name)
    return click.Option(
        [*flags, field.name], type=param_type, default=default, required=required, show_default=True, help=help_text
    )


def config_options(config_class: type) -> list[click.Option]:
    """One option per field of `config_class`, in field order."""
    hints = typing.get_type_hints(config_class)
    return [_option(f, hints[f.name]) for f in dataclasses.fields(config_class) if f.init]


def make_settings(config_class: type, values: dict[str, Any], command: str) -> Any:
    """The validated `config_class` from parsed option values (an option left unset keeps the field's default)."""
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None}
    try:
        config = config_class(**values)
    except TypeError as error:  # a field the dataclass itself rejects
        raise SlimdiffError(f"{command}: {error}") from None
    config.validate()
    return config


def settings_command(
    name: str,
    config_class: type,
    run: Callable[..., None],
    params: Sequence[click.Parameter] = (),
    *,
    groups: Mapping[str, type] | None = None,
    help: str,
) -> click.Command:
    """A command whose options are `params` plus one per field of `config_class` and of each class in `groups`;
    `run(config, **params, **groups)` gets the validated settings, the other parameters' values, and one validated
    instance per group (e.g. `data=DataConfig(...)` for every command that reads images)."""
    groups = dict(groups or {})
    own = {p.name for p in params}
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    grouped = {group: {f.name for f in dataclasses.fields(cls) if f.init} for group, cls in groups.items()}
    taken = [own, fields, *grouped.values()]
    clashes = sorted({n for i, a in enumerate(taken) for b in taken[i + 1 :] for n in a & b})
    if clashes:
        raise SlimdiffError(f"command '{name}' defines {clashes} twice (its settings have them)")

    def callback(**values: Any) -> None:
        settings = make_settings(config_class, {k: v for k, v in values.items() if k in fields}, name)
        made = {
            group: make_settings(groups[group], {k: v for k, v in values.items() if k in names}, name)
            for group, names in grouped.items()
        }
        run(settings, **{k: v for k, v in values.items() if k in own}, **made)

    options = [*params, *config_options(config_class), *(o for cls in groups.values() for o in config_options(cls))]
    return click.Command(name, callback=callback, params=options, help=help, short_help=help)


def engine_command(engine: Engine) -> click.Command:
    """`slimdiff compress ENGINE MODEL_DIR --out DIR --data D [--device, --dtype] [config fields]`."""
    from slimdiff.data.config import DataConfig
    from slimdiff.settings import DeviceConfig

    def run(
        config: Any, model_dir: Path, out: Path, resume: bool, overwrite: bool, data: DataConfig, place: DeviceConfig
    ) -> None:
        from slimdiff.jobs.compression import compress_model

        result = compress_model(
            engine.name, model_dir, data, out, config, place=place, resume=resume, overwrite=overwrite, log=click.echo
        )
        click.echo(f"{result.summary or 'compressed'} in {result.seconds:.0f} s → {out}")

    params: list[click.Parameter] = [
        click.Argument(["model_dir"], type=click.Path(path_type=Path)),
        click.Option(["--out"], type=click.Path(path_type=Path), required=True, help="Output directory."),
        resume_option(),
        overwrite_option(),
    ]
    groups = {"data": DataConfig, "place": DeviceConfig}
    return settings_command(engine.name, engine.config, run, params, groups=groups, help=engine.help)
