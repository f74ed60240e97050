"""What every stage command shares: its options, the error boundary, console output, the process group."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed
import typer
from rich.console import Console
from rich.markup import escape

import stages
from dfkd_common.dist import World
from dfkd_common.dist import current as current_world
from dfkd_common.dist import init as init_world
from dfkd_common.errors import DfkdError
from dfkd_common.jobs import OutputLock
from dfkd_common.models import user_code
from dfkd_common.params import read_trust

#: what a collective's failure says (gloo's path prefix is stripped from the message shown)
_COLLECTIVE = re.compile(r"\[[^\]]*(gloo|nccl|c10d)[^\]]*\]\s*", re.IGNORECASE)
console = Console()  # progress and results: stdout
err_console = Console(stderr=True)  # errors only, one line each
F = TypeVar("F", bound=Callable[..., Any])

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file; the stage reads its own section")
SetOpt = typer.Option(None, "--set", help="override a param: dotted.key=value (YAML value); repeatable")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
TrustOpt = typer.Option(None, "--trust-code", metavar="MODULE", help="import the model code of MODULE (a module, a "
                        ".py file or its stem) that a checkpoint names; repeatable")


def allow_code(trusted: list[str] | None, params_file: Path | None = None, *arches: str | None) -> None:
    """What user model code this run may import: ``--trust-code``, the params file's ``trust_code``, and the
    architectures the user named for this run (``--arch``, ``--student``; see
    :mod:`dfkd_common.models.user_code`)."""
    user_code.trust(*(trusted or []), *(read_trust(params_file) if params_file is not None else []))
    for arch in arches:
        if arch:
            user_code.trust_reference(arch)


def stage_app(name: str) -> typer.Typer:
    """The typer app of a stage with sub-commands, its help the one ``dfkd --help`` lists for it (the index's)."""
    from dfkd_common.index import COMMANDS

    return typer.Typer(help=COMMANDS[name][2], no_args_is_help=True, add_completion=False, rich_markup_mode=None)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Warnings as one line each (``note:`` for artifacts that cannot be verified), not file:line noise."""
    kind = "note" if category.__name__ == "UnverifiedWarning" else "warning"
    err_console.print(f"[yellow]{kind}:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class _Notices(logging.Handler):
    """The library's notices (logger ``dfkd``: where params came from, a resumed run, what a test folder needed)
    as plain lines on the console, each distinct line once, from the process that prints (rank 0)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text in self.seen or os.environ.get("RANK", "0") != "0":
            return
        self.seen.add(text)
        console.print(escape(text), highlight=False, soft_wrap=True)


def show_notices() -> None:
    """Route the library's notices to the console (once per process; every stage command does it)."""
    logger = logging.getLogger("dfkd")
    if not any(isinstance(h, _Notices) for h in logger.handlers):
        logger.addHandler(_Notices())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _error(text: str) -> None:
    # escaped: messages hold user text and brackets (pip install 'dfkd[offline]') that are not markup
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def errors(fn: F) -> F:
    """Turn user-facing errors into one line on stderr and exit code 2 (no traceback wall).

    :class:`DfkdError` is the library's own; an ``OSError`` that escapes it (a path the OS refuses: missing
    directory, permission, read-only or full file system) is the environment's, printed as its path and cause.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        show_notices()
        starting = signal.getsignal(signal.SIGINT)
        if starting is stages._interrupted_while_starting:  # from here an interrupt is handled below, resumably
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return fn(*args, **kwargs)
        except DfkdError as exc:
            _error(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _error(f"{where}{exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]}")
            raise typer.Exit(2) from None
        except (torch.distributed.DistError, RuntimeError) as exc:
            # another rank stopped (gloo: "Connection reset by peer", NCCL: a watchdog) or a collective timed out
            if not isinstance(exc, torch.distributed.DistError) and not (
                    current_world().distributed and _COLLECTIVE.search(str(exc))):
                raise
            _error(f"rank {current_world().rank}: another process of this run failed or stopped answering "
                   f"({_COLLECTIVE.sub('', (str(exc).splitlines() or ['?'])[0])[:160].strip()}); rerun the same "
                   "command to resume")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print(escape(stages.INTERRUPTED), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        finally:
            if starting is stages._interrupted_while_starting:  # the command is done: exit at once again
                signal.signal(signal.SIGINT, starting)

    return wrapper  # type: ignore[return-value]


def join_world() -> World:
    """Join the torchrun process group if there is one (see :mod:`dfkd_common.dist`); only rank 0 prints."""
    world = init_world()
    console.quiet = not world.main
    if world.distributed:  # torchrun stops the survivors of a failed rank with SIGTERM: say so in one line
        signal.signal(signal.SIGTERM, _stopped)
    return world


def _stopped(signum: int, frame: Any) -> None:
    raise DfkdError(f"rank {current_world().rank} stopped by torchrun: another process of this run failed (torchrun "
                    "names it below); rerun the same command to resume")


def primary_lock(path: Path, world: World) -> contextlib.AbstractContextManager[Any]:
    """The output's lock, held by rank 0 (the rank that writes it); the other ranks hold nothing."""
    return OutputLock(path) if world.main else contextlib.nullcontext()
