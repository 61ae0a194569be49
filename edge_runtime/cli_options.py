"""Click options generated from a pydantic settings model: one flag per field.

The field's description is the help text, its name in kebab-case is the flag, and its type
gives the click type (``Literal`` -> a choice, ``bool`` -> ``--x/--no-x``, ``Path`` -> a
path). Numeric bounds and the default are shown in ``--help``; the value itself is checked
by the model, and ``validate_options`` turns a bad one into one line that names the flag.
An option not given is None, so the model's default (or the config file and environment,
see ``settings.load_settings``) applies.
"""

from __future__ import annotations

import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import PydanticUndefined

from .cli_support import OptionError
from .settings import describe_validation_error, field_range, flag_for

Model = TypeVar("Model", bound=BaseModel)


class SettingOption(click.Option):
    """An option that sets settings field ``field_name``; hidden aliases stay out of --help."""

    def __init__(
        self,
        *args,
        field_name: str,
        extra_help: str = "",
        hidden_aliases: tuple[str, ...] = (),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.field_name = field_name
        self.extra_help = extra_help
        self.hidden_aliases = hidden_aliases

    def get_help_record(self, ctx: click.Context):
        shown = self.opts
        self.opts = [opt for opt in shown if opt not in self.hidden_aliases]
        try:
            record = super().get_help_record(ctx)
        finally:
            self.opts = shown
        if record is None or not self.extra_help:
            return record
        names, text = record
        return names, f"{text}  [{self.extra_help}]".strip()


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def repeatable(annotation: Any) -> bool:
    """A ``list`` or ``dict`` field: its flag may be given several times (``dict`` fields
    take ``KEY=VALUE``; the model's validator splits them)."""
    return typing.get_origin(_plain(annotation)) in (list, dict)


def click_type(annotation: Any) -> Any:
    """The click type for a field annotation; ``bool`` for a flag pair. A repeatable
    field's type is that of its items (``dict`` fields take strings)."""
    annotation = _plain(annotation)
    if typing.get_origin(annotation) is dict:
        return click.STRING
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(choice) for choice in typing.get_args(annotation)])
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return click.Choice([str(member.value) for member in annotation])
    if annotation is bool:
        return bool
    if annotation is int:
        return click.INT
    if annotation is float:
        return click.FLOAT
    if annotation in (str, SecretStr):
        return click.STRING
    if annotation is Path:
        return click.Path(path_type=Path)
    raise TypeError(f"no command-line type for {annotation!r}; exclude the field or add one")


def _extra_help(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    extras = []
    allowed = field_range(model, name)
    if allowed:
        extras.append(allowed)
    default = field.default
    if default is not PydanticUndefined and default is not None:
        if default is True:
            extras.append(f"default: {flag_for(name)}")
        elif default is not False:
            extras.append(f"default: {default.value if isinstance(default, Enum) else default}")
    return "; ".join(extras)


def settings_options(
    model: type[BaseModel],
    *,
    exclude: tuple[str, ...] = (),
    decls: dict[str, tuple[str, ...]] | None = None,
    click_types: dict[str, Any] | None = None,
    hidden_aliases: dict[str, tuple[str, ...]] | None = None,
    required: tuple[str, ...] = (),
):
    """A decorator adding one option per field of ``model`` (but ``exclude``).

    ``decls`` gives a field other spellings (e.g. ``("-o", "--output")``), ``click_types``
    a narrower type, ``hidden_aliases`` old spellings still accepted but not shown, and
    ``required`` the fields click itself must insist on. The callback receives each value
    under the field's name, None when not given.
    """
    decls = decls or {}
    click_types = click_types or {}
    hidden_aliases = hidden_aliases or {}
    options = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        kind = click_types.get(name) or click_type(field.annotation)
        flags = list(decls.get(name, (flag_for(name),))) + list(hidden_aliases.get(name, ()))
        attrs: dict[str, Any] = {"default": None, "required": name in required}
        if kind is bool:
            long = [flag for flag in flags if flag.startswith("--")][0]
            flags = [f"{long}/--no-{long[2:]}"] + [f for f in flags if f != long]
            attrs["is_flag"] = True
        else:
            attrs["type"] = kind
            attrs["multiple"] = repeatable(field.annotation)
        options.append(
            click.option(
                *flags,
                name,
                cls=SettingOption,
                field_name=name,
                help=field.description,
                extra_help=_extra_help(model, name),
                hidden_aliases=hidden_aliases.get(name, ()),
                **attrs,
            )
        )

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def option_labels(ctx: click.Context | None = None) -> dict[str, str]:
    """Field name -> the flag that sets it, for the running command's generated options."""
    command = (ctx or click.get_current_context()).command
    return {
        param.field_name: max(
            (opt for opt in param.opts if opt not in param.hidden_aliases), key=len
        )
        for param in command.params
        if isinstance(param, SettingOption)
    }


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (click hands the rest on as None, or as an empty tuple
    for a repeatable one); a repeatable option's values come as a list."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in values.items()
        if value is not None and value != ()
    }


def validate_options(
    model: type[Model], values: dict[str, Any], labels: dict[str, str] | None = None
) -> Model:
    """``model(**values)``; a bad value is one line naming its flag (exit code 2).

    Raises:
        OptionError: a value the model refuses, e.g. ``--max-degradation 5: Input should
            be less than or equal to 1 (allowed: 0 <= x <= 1)``.
    """
    labels = option_labels() if labels is None else labels
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = describe_validation_error(
            exc, "unknown option", model, lambda name: labels.get(name, flag_for(name))
        )
        raise OptionError(f"{problems}; see --help for the allowed values") from None
