"""Command-line options made from `Settings` fields: name, type, default and help live in one place.

An option `--some-name` sets the field `some_name`. Its default is None, so an option left out
leaves the value to `Settings.load` (field default < `COTMON_SOME_NAME` < the option); its help
is the field's description followed by that variable and the field's default. Commands pass the
collected values to `Settings.load` as overrides.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import click

from monitor.settings import ENV_PREFIX, Settings

F = TypeVar("F", bound=Callable[..., Any])


def setting_option(name: str, *flags: str, **click_args: Any) -> Callable[[F], F]:
    """A click option for the setting `name`, spelled `--name-with-dashes` unless `flags` say
    otherwise; `click_args` refine it (a path that must exist, a metavar)."""
    field = Settings.model_fields[name]
    described = field.description or ""
    click_args.setdefault("type", _click_type(field.annotation))
    click_args.setdefault("help", f"{described} [{_origin(name, field.default)}]")
    return click.option(*(flags or ("--" + name.replace("_", "-"),)), name, default=None, **click_args)


def setting_options(*names: str, refined: Mapping[str, Mapping[str, Any]] | None = None) -> Callable[[F], F]:
    """`setting_option` for each of `names`, listed in `--help` in that order; `refined[name]`:
    that option's click arguments."""

    def add(f: F) -> F:
        for name in reversed(names):
            f = setting_option(name, **(refined or {}).get(name, {}))(f)
        return f

    return add


def _origin(name: str, default: Any) -> str:
    env = ENV_PREFIX + name.upper()
    unset = default is None or default == ()
    return f"env {env}" if unset else f"env {env}, default {default}"


def _click_type(annotation: Any) -> Any:
    """The click parameter type of a settings field; strings (and comma-separated tuples, which
    the settings split) stay text."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in get_args(annotation)])
    if annotation is Path:
        return click.Path(path_type=Path)
    if annotation in (int, float, bool):
        return annotation
    return None
