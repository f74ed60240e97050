"""``dfkd distill``: train a student from a bank (or, with ``--online M``, from a bank grown during training)."""

from __future__ import annotations

from pathlib import Path

import typer

from dfkd_common.engine import ensure_writable
from dfkd_common.runs.student_run import Paths, StudentRun, resolve_run, run
from stages.common import DeviceOpt, ParamsOpt, SetOpt, TrustOpt, allow_code, console, errors, join_world


@errors
def main(
    teacher: Path = typer.Option(..., "--teacher", help="teacher checkpoint"),
    banks: list[Path] | None = typer.Option(None, "--bank", help="image bank (.h5) to distill from (--online: "
                                            "optional initial bank); repeat to train on several at once"),
    online: str | None = typer.Option(None, "--online", help="keep synthesising with METHOD against the student"),
    bank_out: Path | None = typer.Option(None, "--bank-out", help="with --online: the grown bank to write "
                                         "(default: <out>.bank.h5 beside the student)"),
    out: Path = typer.Option(..., "--out", help="student checkpoint to write"),
    metrics: Path | None = typer.Option(None, "--metrics", help="final metrics JSON"),
    plots: Path | None = typer.Option(None, "--plots", help="per-epoch metrics JSON (dvc plots)"),
    name: str | None = typer.Option(None, "--name", help="params profile under distill: (e.g. the method)"),
    student: str | None = typer.Option(None, "--student", help="student architecture"),
    epochs: int | None = typer.Option(None, help="epochs (default: the params section's)"),
    seed: int | None = typer.Option(None, help="seed of this run (default: the params section's, else the file's "
                                    "top-level one)"),
    test: Path | None = typer.Option(None, "--test", help="labelled test set: a folder of class folders, or a bank "
                                     "(.h5) with labels (default: the teacher dataset's test split)"),
    params_file: Path = ParamsOpt,
    sets: list[str] | None = SetOpt,
    device: str = DeviceOpt,
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Distill a student from a bank and evaluate it on real test data (the teacher dataset's test split, or
    ``--test``; for a teacher imported for data not here, its agreement with the teacher on held-out bank images).

    With ``--online M`` the student trains on images that method M keeps making against it (rounds appended to
    the bank between epochs, or fresh generator batches for DFAD); the grown bank is written to ``--bank-out``.
    Rerunning an interrupted command resumes it (student, optimiser, synthesizer and bank).
    """
    cfg: StudentRun = resolve_run(params_file, name, sets, online=online, student=student, epochs=epochs,
                                  seed=seed, test=str(test) if test else None)
    allow_code(trust_code, params_file, cfg.student)  # the student named for this run is the user's to run
    ensure_writable(out, metrics, plots, bank_out)
    join_world()
    run(cfg, Paths(teacher, out, list(banks or []), bank_out, metrics, plots), online, name, device, say=console.print)


if __name__ == "__main__":
    typer.run(main)
