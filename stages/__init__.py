"""Thin typer commands over :mod:`dfkd_common`, one module per pipeline stage (imported when their command runs).

Ctrl-C at any moment ends a command with one line and exit 130. Once a stage's command runs, its error boundary
(:func:`stages.common.errors`) turns the interrupt into that line and leaves the resumable state as the last
checkpoint wrote it. Before that (the interpreter importing typer, then torch and the stage's modules, which takes
seconds), nothing has been written, so the process that *is* the command installs a handler here, first thing,
that prints the same line and exits at once instead of a KeyboardInterrupt traceback. A program that merely
imports ``stages`` (the test suite) keeps its own handler.
"""

import os
import signal
import sys
from pathlib import Path

#: what an interrupted command says (stderr), wherever the interrupt lands
INTERRUPTED = "interrupted: rerun the same command to resume"


def _interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write(f"{INTERRUPTED}\n")
    sys.stderr.flush()
    os._exit(130)


def _is_the_command() -> bool:
    """This process is ``dfkd`` (the console script) or ``python -m stages.X`` (also under torchrun)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return Path(sys.argv[0]).name == "dfkd" or module == "stages" or module.startswith("stages.")


if _is_the_command():
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import dfkd_common as _dfkd_common  # noqa: E402, F401  (installs the torchvision guard before any stage imports it)
