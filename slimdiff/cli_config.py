"""Command-line options derived from a config dataclass, so that every engine gets its `slimdiff compress NAME`.

A field becomes `--field-name` (or `metadata["flag"]`), with the field's type, default and `metadata["help"]`.
Supported field types: `int`, `float`, `str`, `bool` (a `--flag/--no-flag` pair), a `Literal` of strings (listed
in the help; checked by the config's `validate`), `X | None`, and `tuple[X, ...]` / `list[X]` (comma-separated).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import click

from slimdiff.errors import SlimdiffError

if TYPE_CHECKING:
    from slimdiff.engines import Engine

_SCALARS: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}

#: What a command does with an output that already holds something (`slimdiff.io.output_dir`).
RESUME_HELP = "Continue the run already in --out (from its latest checkpoint or saved state)."
OVERWRITE_HELP = "Replace what --out holds: the new result is built beside it and swapped in when done."


class CommaSeparated(click.ParamType):
    """`0.3,0.5,0.75` → a tuple of one scalar type."""

    name = "list"

    def __init__(self, item: click.ParamType) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, (tuple, list)):
            return tuple(value)
        return tuple(self.item.convert(part.strip(), param, ctx) for part in str(value).split(",") if part.strip())


def _unwrap_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is Union:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _option(field: dataclasses.Field, tp: Any) -> click.Option:
    """The click option for one config field."""
    flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
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
        name = flag.removeprefix("--")
        return click.Option([f"--{name}/--no-{name}", field.name], default=default, show_default=True, help=help_text)
    if origin is Literal:
        choices = typing.get_args(tp)
        help_text = help_text or "One of " + ", ".join(map(str, choices)) + "."
        param_type: click.ParamType = click.STRING
    elif origin in (tuple, list):
        item = typing.get_args(tp)[0]
        if item not in _SCALARS:
            raise TypeError(f"unsupported list item type {item!r} for field {field.name}")
        param_type = CommaSeparated(_SCALARS[item])
        default = ",".join(map(str, default)) if default else None
    elif tp in _SCALARS:
        param_type = _SCALARS[tp]
    else:
        raise TypeError(f"unsupported config field type {tp!r} for field {field.name}")
    return click.Option(
        [flag, field.name], type=param_type, default=default, required=required, show_default=True, help=help_text
    )


def config_options(config_class: type) -> list[click.Option]:
    """One option per field of `config_class`, in field order."""
    hints = typing.get_type_hints(config_class)
    return [_option(f, hints[f.name]) for f in dataclasses.fields(config_class) if f.init]


def engine_command(engine: Engine) -> click.Command:
    """`slimdiff compress ENGINE MODEL_DIR --out DIR --data D [config fields]`."""
    fields = [f.name for f in dataclasses.fields(engine.config) if f.init]
    reserved = {"model_dir", "out", "data", "resume", "overwrite"} & set(fields)
    if reserved:
        raise SlimdiffError(f"engine '{engine.name}' config may not define {sorted(reserved)} (the command has them)")

    def callback(model_dir: Path, out: Path, data: str, resume: bool, overwrite: bool, **values: Any) -> None:
        from slimdiff.jobs.compression import compress_model

        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
        try:
            config = engine.make_config(**values)
        except TypeError as error:  # a field the dataclass itself rejects
            raise SlimdiffError(f"compress {engine.name}: {error}") from None
        result = compress_model(
            engine.name, model_dir, data, out, config, resume=resume, overwrite=overwrite, log=click.echo
        )
        click.echo(f"{result.summary or 'compressed'} in {result.seconds:.0f} s → {out}")

    params: list[click.Parameter] = [
        click.Argument(["model_dir"], type=click.Path(path_type=Path)),
        click.Option(["--out"], type=click.Path(path_type=Path), required=True, help="Output directory."),
        click.Option(
            ["--data"],
            default="digits",
            show_default=True,
            help="Calibration data: 'digits' (bundled) or an image folder (class subfolders).",
        ),
        click.Option(["--resume"], is_flag=True, help=RESUME_HELP),
        click.Option(["--overwrite"], is_flag=True, help=OVERWRITE_HELP),
        *config_options(engine.config),
    ]
    return click.Command(engine.name, callback=callback, params=params, help=engine.help, short_help=engine.help)
