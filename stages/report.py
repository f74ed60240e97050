"""``dfkd report``: compare students (markdown table + PNG bar/curve plot) from their metrics files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from dfkd_common.engine import details_path, ensure_writable
from dfkd_common.errors import DfkdError
from dfkd_common.report import write_report
from stages.common import console, errors


@errors
def main(
    metrics: list[Path] = typer.Argument(..., help="student metrics JSON files (from dfkd distill --metrics)"),
    out_dir: Path = typer.Option(Path("artifacts/reports"), "--out-dir"),
    teacher_metrics: Path | None = typer.Option(None, "--teacher-metrics"),
    quantized: list[Path] | None = typer.Option(None, "--quantized", help="quantized models' metrics JSON (from "
                                                "dfkd quantize --metrics): a table of their own; repeatable"),
) -> None:
    """Write report.md, report.json, report.png, students.json (the plots' rows) and headline.json (each
    student's headline metric, for dvc exp show) under OUT_DIR."""
    ensure_writable(out_dir / "report.md")
    rows = []
    for path in metrics:
        if not path.is_file():
            raise DfkdError(f"metrics file not found: {path}")
        row = {**_read(details_path(path)), **_read(path)} if details_path(path).is_file() else _read(path)
        plots = path.with_name(path.stem.replace("metrics", "plots") + ".json")
        row["history"] = json.loads(plots.read_text()) if plots.is_file() and plots != path else []
        banks = row.get("bank")
        if banks not in (None, "None"):  # the banks' own stage times count toward the student's cost
            times = []
            for bank in map(Path, banks if isinstance(banks, list) else [str(banks)]):  # several: --bank repeated
                bank_metrics = bank.with_name(bank.name.removesuffix(".h5") + ".metrics.json")
                if bank_metrics.is_file():
                    times.append(float(_read(bank_metrics).get("seconds") or 0.0))
            if times:
                row["bank_seconds"] = sum(times)
        rows.append(row)
    teacher = None
    if teacher_metrics:
        details = details_path(teacher_metrics)
        teacher = {**(_read(details) if details.is_file() else {}), **_read(teacher_metrics)}
    q_rows = [_quantized_row(p) for p in quantized or []]
    md = write_report(rows, out_dir, teacher, q_rows)
    console.print(md, highlight=False)


def _quantized_row(path: Path) -> dict[str, Any]:
    """A quantized model's metrics with their details (one line for a file ``dfkd quantize`` did not write)."""
    row = {"name": path.name.removesuffix(".metrics.json"), **_read(details_path(path)), **_read(path)}
    if "weight_bits" not in row:
        raise DfkdError(f"{path} is not the metrics of a quantized model (dfkd quantize --metrics)")
    row.pop("finetune_history", None)
    return row


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DfkdError(f"metrics file not found: {path}")
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError):
        raise DfkdError(f"{path} is not a JSON object") from None


if __name__ == "__main__":
    typer.run(main)
