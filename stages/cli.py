"""The ``dfkd`` console script: one sub-command per pipeline stage, each imported only when it runs.

Why lazy: a stage module imports torch and its method's code; ``dfkd --help``, ``dfkd --version`` and ``dfkd
methods`` need none of it, and a stage run under DVC should load (and depend on) only its own stage's code. The
commands, their modules and their one-line help are declared in :data:`dfkd_common.index.COMMANDS`;
:class:`LazyGroup` lists them from there and imports a stage module when its command is invoked (or asked for its
own ``--help``).
"""

from __future__ import annotations

import importlib
from typing import Any

import click
import typer
from typer.core import TyperGroup

from dfkd_common import __version__
from dfkd_common.index import COMMANDS, TITLES, names, online_methods, serving


class LazyGroup(TyperGroup):
    """A typer group whose sub-commands come from :data:`COMMANDS` and are imported on first use."""

    _listing = False  # True while the top-level help is drawn: stand-in commands carry the declared help

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(n for n in super().list_commands(ctx) if n not in COMMANDS)]  # loaded ones once

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module, attr, help_text = COMMANDS[name]
        if self._listing:
            return click.Command(name, help=help_text, short_help=help_text)
        if name not in self.commands:
            self.commands[name] = _load(name, getattr(importlib.import_module(module), attr))
        return self.commands[name]

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def _load(name: str, obj: Any) -> click.Command:
    """A stage's typer app (a group of sub-commands) or command function as a click command named ``name``."""
    if isinstance(obj, typer.Typer):
        cmd = typer.main.get_group(obj)  # a group even with one sub-command (`dfkd pool build`)
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    cmd.name = name
    return _plain_help(cmd)


def _plain_help(cmd: click.Command) -> click.Command:
    """Help as a terminal shows it: docstrings' reST literals (````--test````) as plain text, and an option that
    takes several values named by what it takes (``--bank BANK``), not by its Python type."""
    cmd.help = (cmd.help or "").replace("``", "") or None
    for param in cmd.params:  # options by what they have (typer's option class is not always click's)
        if hasattr(param, "help"):
            param.help = (param.help or "").replace("``", "") or None
        if getattr(param, "multiple", False) and param.metavar is None:
            param.metavar = (param.name or "value").upper()
        elif param.nargs == -1 and param.metavar is None:  # an argument taking several values: its name says it
            param.metavar = (param.name or "value").upper()
            param.display_type_rich = lambda ctx: None  # type: ignore[attr-defined]  # typer appends <list[Path]>
    for sub in getattr(cmd, "commands", {}).values():
        _plain_help(sub)
    return cmd


app = typer.Typer(
    cls=LazyGroup,
    help="dfkd: data-free knowledge distillation. Stages: teacher (train | import) -> synthesize | retrieve -> "
         "augment -> distill -> report, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: a flag shows no type (typer's rich help shows --help <bool>)
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dfkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print dfkd's version and exit.")) -> None:
    """dfkd: data-free knowledge distillation."""


@app.command("methods")
def methods() -> None:
    """List every registry: tasks, model sources, datasets, models, methods, terms, variation models.

    Read from the declared index (:mod:`dfkd_common.index`), so nothing is imported."""
    for kind, title in TITLES.items():
        typer.echo(f"{title}: {', '.join(online_methods() if kind == 'online method' else names(kind))}")
    for task in names("task"):
        if task != "classification":
            typer.echo(f"methods for {task}: {', '.join(serving(task))} (the others classification only)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
