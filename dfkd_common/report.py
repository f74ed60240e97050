"""Student comparison report: the table users paste into papers and the plot they glance at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfkd_common.engine import atomic_path, write_json
from dfkd_common.extras import need


def markdown_table(rows: list[dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    lines = [
        "| student | bank images | final test acc | ratio to teacher | distill time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    if teacher:
        lines.append(f"| teacher ({teacher.get('arch', '')}) | real data | {100 * teacher['test_acc']:.2f} | 1.000 | |")
    for r in rows:
        ratio = r.get("ratio_to_teacher")
        lines.append(
            f"| {r.get('name', '?')} | {r.get('bank_size', '')} | {100 * r['test_acc']:.2f} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | {r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], out_dir: Path, teacher: dict[str, Any] | None = None) -> str:
    matplotlib = need("matplotlib", "dfkd report's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    md = "# Students (final-epoch accuracy on the real test split)\n\n" + markdown_table(rows, teacher)
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(md)
    write_json(out_dir / "report.json", {"teacher": teacher, "students": [
        {k: v for k, v in r.items() if k != "history"} for r in rows]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.get("name", "?") for r in rows]
    ax1.bar(names, [100 * r["test_acc"] for r in rows], color="tab:blue")
    if teacher:
        ax1.axhline(100 * teacher["test_acc"], color="k", ls="--", label="teacher")
        ax1.legend()
    ax1.set_ylabel("final test accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.tick_params(axis="x", rotation=30)
    for r in rows:
        hist = r.get("history") or []
        if hist:
            ax2.plot([h["epoch"] for h in hist], [100 * h["test_acc"] for h in hist], label=r.get("name"))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_dir / "report.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return md
