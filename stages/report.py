"""``dfkd report``: compare students (markdown table + PNG bar/curve plot) from their metrics files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dfkd_common.engine import ensure_writable
from dfkd_common.errors import DfkdError
from dfkd_common.report import write_report
from stages.common import console, errors


@errors
def main(
    metrics: list[Path] = typer.Argument(..., help="student metrics JSON files (from dfkd distill --metrics)"),
    out_dir: Path = typer.Option(Path("artifacts/reports"), "--out-dir"),
    teacher_metrics: Path | None = typer.Option(None, "--teacher-metrics"),
) -> None:
    """Write report.md, report.json and report.png under OUT_DIR."""
    ensure_writable(out_dir / "report.md")
    rows = []
    for path in metrics:
        if not path.is_file():
            raise DfkdError(f"metrics file not found: {path}")
        try:
            row = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DfkdError(f"{path} is not valid JSON") from None
        plots = path.with_name(path.stem.replace("metrics", "plots") + ".json")
        row["history"] = json.loads(plots.read_text()) if plots.is_file() and plots != path else []
        rows.append(row)
    teacher = json.loads(teacher_metrics.read_text()) if teacher_metrics else None
    md = write_report(rows, out_dir, teacher)
    console.print(md, highlight=False)


if __name__ == "__main__":
    typer.run(main)
