"""``dfkd bank info|grid|verify``: look inside a bank (what did the teacher dream?); ``dfkd bank from-dataset``: a
bank of a dataset's real images, the reference every paper reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dfkd_common.bank import bank_info, verify_bank
from dfkd_common.engine import ensure_writable, write_json
from dfkd_common.inspect import bank_summary, save_grid, save_pairs_grid
from stages.common import TrustOpt, allow_code, errors, stage_app

app = stage_app("bank")
#: the most per-round rows ``bank info`` shows before it groups consecutive rounds
ROUND_ROWS = 10
out_console = Console()


@app.command("info")
@errors
def info(
    bank: Path = typer.Argument(..., help="bank (.h5)"),
    teacher: Path | None = typer.Option(None, "--teacher", help="re-score with this teacher"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the summary as JSON"),
    all_rounds: bool = typer.Option(False, "--all-rounds", help="one row per round (default: at most "
                                    f"{ROUND_ROWS} rows, consecutive rounds grouped)"),
    trust_code: list[str] | None = TrustOpt,
) -> None:
    """Size, shape, provenance, per-class and per-round counts, teacher agreement, lineage."""
    allow_code(trust_code)
    ensure_writable(json_out)
    s = bank_summary(bank, teacher)
    head = Table(title=f"bank {bank}", show_header=False)
    shown = {"size": f"{s['size']:,}", "agreement": _pct(s.get("agreement")),
             "mean_confidence": _pct(s.get("mean_confidence"))}
    for key in ("kind", "task", "method", "size", "image_shape", "seed", "created_at", "version", "integrity",
                "teacher_checksum", "parent_checksum", "agreement", "mean_confidence", "agreement_source"):
        if s.get(key) not in (None, ""):
            head.add_row(key, shown.get(key, str(s[key])))
    if s.get("augment"):
        a = s["augment"]
        head.add_row("augmented from", f"{a.get('parent_path')} ({a.get('sources')} of {a.get('parent_rows')} "
                     f"images varied)")
        head.add_row("kept", f"{a.get('kept')} of {a.get('made')} variations ({_pct(a.get('keep_rate'))}); "
                     f"teacher label unchanged for {_pct(a.get('label_agreement'))}")
    out_console.print(head)
    augmented = any("keep_rate" in row for row in s["per_class"])
    pixels = s.get("counted") == "pixels"  # segmentation: counts and shares of the masks' pixels
    classes = Table(title="per class" + (" (pixels of the masks)" if pixels else ""))
    for col in ("class", "name", "pixels" if pixels else "count", *(("share",) if pixels else ()), "agreement",
                "confidence", *(("made", "keep rate") if augmented else ())):
        classes.add_column(col, justify="right")
    for row in s["per_class"]:
        extra = (str(row.get("made", "-")), _pct(row.get("keep_rate"))) if augmented else ()
        share = (_pct(row.get("share")),) if pixels else ()
        classes.add_row(str(row["class"]), row["name"], f"{row['count']:,}", *share,
                        _pct(row.get("agreement")), _pct(row.get("confidence")), *extra)
    out_console.print(classes)
    per_round = s["per_round"] if all_rounds else grouped_rounds(s["per_round"])
    rounds = Table(title="per round" + ("" if per_round is s["per_round"] else
                                        f" ({len(s['per_round'])} rounds, grouped)"))
    for col in ("round", "count", "agreement"):
        rounds.add_column(col, justify="right")
    for row in per_round:
        rounds.add_row(str(row["round"]), f"{row['count']:,}", _pct(row.get("agreement")))
    out_console.print(rounds)
    if s.get("per_source"):
        src = Table(title="per source")
        for col in ("source", "count"):
            src.add_column(col, justify="right")
        for row in s["per_source"]:
            src.add_row(row["source"], str(row["count"]))
        out_console.print(src)
    if json_out:
        write_json(json_out, s)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def grouped_rounds(rows: list[dict[str, Any]], most: int = ROUND_ROWS) -> list[dict[str, Any]]:
    """At most ``most`` rows: consecutive rounds in equal groups (``"0-3"``), counts summed, agreement the mean
    over the group's images (a DAFL bank has 40 rounds: a screen of near-identical rows says less)."""
    if len(rows) <= most:
        return rows
    size = -(-len(rows) // most)
    out = []
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        count = sum(int(r["count"]) for r in part)
        known = [r for r in part if r.get("agreement") is not None]
        agree = (sum(r["agreement"] * r["count"] for r in known) / sum(r["count"] for r in known)
                 if known and sum(r["count"] for r in known) else None)
        out.append({"round": f"{part[0]['round']}-{part[-1]['round']}", "count": count, "agreement": agree})
    return out


@app.command("verify")
@errors
def verify(banks: list[Path] = typer.Argument(..., help="bank(s) (.h5) to check")) -> None:
    """Read every chunk of every dataset and check it against its checksum (and the schema).

    Exit 0: every bank verified; 2: a bank is damaged (one line naming the file and dataset); 3: a bank is
    readable but was written without checksums (before dfkd 0.2), so it cannot be verified.
    """
    unverifiable = 0
    for path in banks:
        result = verify_bank(path)
        if result["checksummed"]:
            out_console.print(f"{path}: OK, {result['rows']} rows, every chunk of "
                              f"{', '.join(result['datasets'])} matches its checksum")
        else:
            unverifiable += 1
            out_console.print(f"{path}: readable, {result['rows']} rows, but written without checksums "
                              "(before dfkd 0.2): its content cannot be verified")
    if unverifiable:
        raise typer.Exit(3)


@app.command("grid")
@errors
def grid(
    bank: Path = typer.Argument(..., help="bank (.h5)"),
    out: Path = typer.Option(..., "--out", help="PNG to write"),
    per_class: int = typer.Option(10, help="samples per class (one row per class); augmented banks: rows"),
    round_index: int | None = typer.Option(None, "--round", help="only images of this round"),
    parent: Path | None = typer.Option(None, "--parent", help="augmented bank: its parent bank, if not where "
                                       "the bank recorded it"),
    by_class: bool = typer.Option(False, "--by-class", help="augmented bank: the class grid instead of sources "
                                  "beside their variations"),
    seed: int = typer.Option(0),
) -> None:
    """A PNG grid: one row per class, ``per_class`` samples each; for an augmented bank, each row a source image
    of its parent bank followed by its kept variations."""
    ensure_writable(out)
    if bank_info(bank)["attrs"].get("kind") == "augmented" and not by_class:
        n = save_pairs_grid(bank, out, parent, per_class, seed)
        out_console.print(f"{n} variations beside their sources -> {out}")
        return
    n = save_grid(bank, out, per_class, round_index, seed)
    out_console.print(f"{n} images -> {out}")


@app.command("from-dataset")
@errors
def from_dataset(
    dataset: str = typer.Option(..., "--dataset", help="a registered dataset (dfkd methods lists them)"),
    out: Path = typer.Option(..., "--out", help="bank (.h5) to write"),
    split: str = typer.Option("train", "--split", help="train or test"),
    data_root: Path | None = typer.Option(None, help="where the dataset's files are (default: ~/.cache/dfkd/data)"),
) -> None:
    """A bank of a dataset's real images with their true targets (kind ``real``): what KD on the real training
    images, the upper reference of every data-free paper, trains from (``dfkd distill --bank``), and a labelled
    test set (``--test``)."""
    from dfkd_common.bank import BankHeader
    from dfkd_common.data import get_dataset

    ensure_writable(out)
    data = get_dataset(dataset).load(split, data_root)
    info = data.info
    header = BankHeader(channels=info.channels, image_size=info.image_size, kind="real", method=f"{dataset}:{split}",
                        dataset=info.to_dict(), params={"dataset": dataset, "split": split})
    block = 4096
    header.write(out, (header.columns(data.images[i : i + block], data.labels[i : i + block], 0)
                       for i in range(0, len(data), block)))
    out_console.print(f"{len(data):,} {split} images of {dataset} with their {info.task} targets -> {out}")


if __name__ == "__main__":
    app()
