"""Student comparison report: the table users paste into papers and the figure they glance at.

Users of this field compare methods by accuracy *and* cost (Fast, NAYER and CPNet sell speed), so the figure has
three panels: each method's final accuracy as a fraction of the teacher's on a zoomed scale (mean and seed spread
when several runs of one method are given), accuracy against wall time (the bank's synthesis or retrieval plus
distillation), and the learning curves. Several metrics files with the same ``name`` are seeds of one method.

The figure compared is the task's headline metric (classification: test accuracy), read from each metrics file's
``task`` (files written before tasks existed: classification); students of different tasks are not compared.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dfkd_common.engine import atomic_path, write_json
from dfkd_common.errors import DfkdError
from dfkd_common.extras import need
from dfkd_common.tasks import Task, get_task


def group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs by method name, in first-seen order (seeds of one method share a name)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r.get("name", "?")), []).append(r)
    return out


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def total_seconds(r: dict[str, Any]) -> float:
    """Wall time of a student end to end: its bank's stage (if recorded) plus distillation (online: both)."""
    return float(r.get("seconds") or 0.0) + float(r.get("bank_seconds") or 0.0)


def rows_task(rows: list[dict[str, Any]]) -> Task:
    """The one task every row's metrics file names (classification where none is named)."""
    names = {str(r.get("task") or "classification") for r in rows} or {"classification"}
    if len(names) > 1:
        raise DfkdError(f"students of different tasks cannot be compared in one report: {', '.join(sorted(names))}")
    return get_task(names.pop())


def markdown_table(rows: list[dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    task = rows_task(rows)
    key = task.headline
    lines = [
        f"| student | runs | bank images | final {task.headline_label} (%) | x teacher | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    if teacher and teacher.get(key) is not None:
        arch = teacher.get("arch", "")
        lines.append(f"| teacher ({arch}) | | real data | {100 * teacher[key]:.2f} | 1.000 | |")
    for name, runs in group(rows).items():
        acc_m, acc_s = spread([100 * r[key] for r in runs])
        ratios = [r["ratio_to_teacher"] for r in runs if r.get("ratio_to_teacher") is not None]
        ratio = ""
        if ratios:
            rm, rs = spread(ratios)
            ratio = f"{rm:.3f}" + (f" +- {rs:.3f}" if len(ratios) > 1 else "")
        acc = f"{acc_m:.2f}" + (f" +- {acc_s:.2f}" if len(runs) > 1 else "")
        secs = statistics.fmean(total_seconds(r) for r in runs)
        lines.append(f"| {name} | {len(runs)} | {runs[0].get('bank_size', '')} | {acc} | {ratio} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def student_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One row per student run, for DVC's plots of the report's views (``dvc.yaml``: final headline metric as a
    fraction of the teacher's, and against wall time)."""
    return [{"student": str(r.get("name", "?")), key: round(100 * float(r[key]), 2),
             "x_teacher": None if r.get("ratio_to_teacher") is None else round(float(r["ratio_to_teacher"]), 4),
             "wall_time_s": round(total_seconds(r), 1)} for r in rows]


def headline(rows: list[dict[str, Any]], teacher: dict[str, Any] | None, key: str) -> dict[str, float]:
    """Each student's headline metric (%, the mean over its runs) and the teacher's, by name: a flat metrics file
    whose keys are the students' names, so ``dvc exp show --keep`` shows each as one short column (the README's
    seed-study commands)."""
    out = {"teacher": round(100 * float(teacher[key]), 2)} if teacher and teacher.get(key) is not None else {}
    out.update({name: round(statistics.fmean(100 * float(r[key]) for r in runs), 2)
                for name, runs in group(rows).items()})
    return out


#: line styles cycled with 10 colours, so 40 curves stay distinguishable (15 students shared 10 colours)
STYLES = ("-", "--", ":", "-.")


def style(i: int) -> dict[str, Any]:
    """Colour and line style of the i-th method, the same in every panel."""
    import matplotlib.pyplot as plt

    return {"color": plt.get_cmap("tab10")(i % 10), "ls": STYLES[(i // 10) % len(STYLES)]}


def quantized_table(rows: list[dict[str, Any]]) -> str:
    """Quantized models (``dfkd quantize``'s metrics with their details): bits, calibration, fine-tuning, the
    headline against the same model in fp32 on the same split, and the file's size."""
    task = rows_task(rows)
    key = task.headline
    lines = [f"| quantized model | of | bits | calibration | fine-tuning | {task.headline_label} | fp32 | x fp32 "
             "| KiB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        x = f"{r['x_fp32']:.4f}x" if r.get("x_fp32") is not None else "-"
        sources = ", ".join(Path(s["path"]).name if s.get("path") else s["kind"]
                            for s in r.get("calibration_sources", []))
        ft = f"{r['finetune_epochs']} epochs" if r.get("finetune_epochs") else "none"
        lines.append(f"| {r['name']} | {Path(r['model']).stem} | W{r['weight_bits']}A{r['act_bits']} | {sources} | "
                     f"{ft} | {100 * r[key]:.2f} | {100 * r['fp32_' + key]:.2f} | {x} | "
                     f"{r['bytes'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], out_dir: Path, teacher: dict[str, Any] | None = None,
                 quantized: list[dict[str, Any]] | None = None) -> str:
    matplotlib = need("matplotlib", "dfkd report's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    task = rows_task(rows)
    key = task.headline
    md = (f"# Students (final-epoch {task.headline_label} on the real test split; +- is the sd over runs)\n\n"
          + markdown_table(rows, teacher))
    if quantized:
        md += ("\n# Quantized models (int8 ONNX Runtime, `dfkd quantize`; accuracy on the real test split)\n\n"
               + quantized_table(quantized))
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(md)
    write_json(out_dir / "report.json", {"teacher": teacher, "students": [
        {k: v for k, v in r.items() if k != "history"} for r in rows], "quantized": quantized or []})
    write_json(out_dir / "students.json", student_rows(rows, key))
    write_json(out_dir / "headline.json", headline(rows, teacher, key))

    groups = group(rows)
    t_acc = (teacher or {}).get(key)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.2))
    # 1: x teacher, zoomed, per method with its spread
    names = list(groups)
    for i, name in enumerate(names):
        vals = [r["ratio_to_teacher"] if r.get("ratio_to_teacher") is not None else r[key]
                for r in groups[name]]
        m, s = spread(vals)
        ax1.errorbar([m], [i], xerr=[s], fmt="o", color=style(i)["color"], capsize=4)
        ax1.scatter(vals, [i] * len(vals), s=12, color=style(i)["color"], alpha=0.5)
    ax1.set_yticks(range(len(names)), names)
    ax1.invert_yaxis()
    if t_acc:
        ax1.axvline(1.0, color="k", ls="--", lw=1)
    ax1.set_xlabel(f"final {task.headline_label} / teacher's" if t_acc else f"final {task.headline_label}")
    ax1.set_title(f"{task.headline_label} (dots: runs; bar: mean +- sd)")
    ax1.grid(axis="x", alpha=0.3)
    # 2: accuracy against wall time
    for i, name in enumerate(names):
        xs = [total_seconds(r) for r in groups[name]]
        ys = [100 * r[key] for r in groups[name]]
        ax2.scatter(xs, ys, color=style(i)["color"], marker="os^D"[(i // 10) % 4], label=name)
        ax2.annotate(name, (statistics.fmean(xs), statistics.fmean(ys)), fontsize=8, xytext=(4, 4),
                     textcoords="offset points")
    if t_acc:
        ax2.axhline(100 * t_acc, color="k", ls="--", lw=1, label="teacher")
    ax2.set_xscale("log")
    ax2.set_xlabel("wall time: bank + distillation (s, log)")
    ax2.set_ylabel(f"final {task.headline_label} (%)")
    ax2.set_title(f"{task.headline_label} against cost")
    ax2.grid(alpha=0.3)
    # 3: learning curves (first run of each method), legend outside the axes
    for i, name in enumerate(names):
        hist = groups[name][0].get("history") or []
        if hist:
            ax3.plot([h["epoch"] for h in hist], [100 * h[key] for h in hist], label=name, lw=1.4, **style(i))
    accs = [100 * h[key] for r in rows for h in (r.get("history") or [])]
    if accs:
        lo = sorted(accs)[len(accs) // 10]  # the first epochs' low values would flatten the rest
        ax3.set_ylim(max(0.0, lo - 2), 100)
    ax3.set_xlabel("epoch")
    ax3.set_ylabel(f"{task.headline_label} (%)")
    ax3.set_title("learning curves")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(out_dir / "report.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return md
