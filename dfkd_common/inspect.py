"""Bank inspection: the summary behind ``dfkd bank info`` and the PNG behind ``dfkd bank grid``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_common.bank import load_bank
from dfkd_common.checkpoint import file_checksum, load_model
from dfkd_common.engine import Engine
from dfkd_common.evaluation import predict


def bank_summary(path: str | Path, teacher: str | Path | None = None) -> dict[str, Any]:
    """Counts per class/round/source plus teacher agreement with stored labels and mean confidence.

    Agreement uses a re-scoring ``teacher`` when given, else the stored ``teacher_logits``, else is omitted.
    """
    bank = load_bank(path)
    attrs = bank.attrs
    ds = bank.dataset
    names = list(ds.get("class_names") or [])
    logits: torch.Tensor | None = None
    source = None
    if teacher is not None:
        engine = Engine.create("auto", amp=False, channels_last=False)
        model, meta = load_model(teacher, engine.device)
        bank.check_compatible(meta.dataset)
        logits = predict(model, bank.images, engine)
        source = "teacher " + str(teacher)
        names = names or list(meta.dataset.class_names)
    elif "teacher_logits" in bank.extra:
        logits = bank.extra["teacher_logits"].float()
        source = "stored teacher_logits"
    labels = bank.labels
    agree = conf = None
    if logits is not None and len(bank):
        prob = torch.softmax(logits, 1)
        conf = prob.max(1).values
        agree = (bank.task.predict(logits) == labels).float()
    num_classes = int(ds.get("num_classes") or (int(labels.max()) + 1 if len(bank) else 0))
    augment = attrs.get("augment") if isinstance(attrs.get("augment"), dict) else None
    made = {int(r["class"]): r for r in (augment or {}).get("per_class", [])}
    per_class = []
    for c in range(num_classes):
        m = labels == c
        per_class.append({
            "class": c,
            "name": names[c] if c < len(names) else str(c),
            "count": int(m.sum()),
            "agreement": float(agree[m].mean()) if agree is not None and m.any() else None,
            "confidence": float(conf[m].mean()) if conf is not None and m.any() else None,
            **({"made": made[c]["made"], "keep_rate": made[c]["keep_rate"]} if c in made else {}),
        })
    per_round = []
    for r in torch.unique(bank.rounds).tolist():
        m = bank.rounds == r
        per_round.append({"round": int(r), "count": int(m.sum()),
                          "agreement": float(agree[m].mean()) if agree is not None else None})
    per_source = []
    if "source" in bank.extra:
        src_names = list(attrs.get("source_names") or [])
        src = bank.extra["source"].long()
        for s in torch.unique(src).tolist():
            per_source.append({"source": src_names[s] if s < len(src_names) else str(s),
                               "count": int((src == s).sum())})
    integrity = ("Fletcher-32 checksum per chunk, verified on every read" if bank.checksummed else
                 "no checksums (written before dfkd 0.2): cannot be verified")
    lineage_ok = None
    if teacher is not None and attrs.get("teacher_checksum"):
        lineage_ok = file_checksum(teacher) == attrs["teacher_checksum"]
    return {
        "path": str(path),
        "kind": attrs.get("kind"),
        "task": bank.task.name,
        "method": attrs.get("method"),
        "size": len(bank),
        "image_shape": list(bank.image_shape),
        "seed": attrs.get("seed"),
        "created_at": attrs.get("created_at"),
        "version": attrs.get("version"),
        "integrity": integrity,
        "params": attrs.get("params"),
        "teacher_checksum": attrs.get("teacher_checksum"),
        "parent_checksum": attrs.get("parent_checksum"),
        "teacher_matches_checksum": lineage_ok,
        "agreement": float(agree.mean()) if agree is not None else None,
        "mean_confidence": float(conf.mean()) if conf is not None else None,
        "agreement_source": source,
        "per_class": per_class,
        "per_round": per_round,
        "per_source": per_source,
        **({"augment": {k: v for k, v in augment.items() if k != "per_class"}} if augment else {}),
    }


def save_grid(path: str | Path, out: str | Path, per_class: int = 10, round_index: int | None = None,
              seed: int = 0) -> int:
    """Write a PNG with one row per class of up to ``per_class`` random samples; returns images shown."""
    bank = load_bank(path)
    rng = np.random.default_rng(seed)
    keep = torch.ones(len(bank), dtype=torch.bool)
    if round_index is not None:
        keep &= bank.rounds == round_index
    num_classes = int(bank.dataset.get("num_classes") or (int(bank.labels.max()) + 1 if len(bank) else 1))
    c, h, w = bank.image_shape
    tiles, shown = [], 0
    for k in range(num_classes):
        idx = torch.nonzero(keep & (bank.labels == k)).flatten().numpy()
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for i in range(per_class):
            tiles.append(bank.images[int(pick[i])] if i < len(pick) else torch.zeros(c, h, w, dtype=torch.uint8))
        shown += len(pick)
    names = list(bank.dataset.get("class_names") or [])
    write_grid(tiles, per_class, out, [names[k] if k < len(names) else str(k) for k in range(num_classes)])
    return shown


def write_grid(tiles: list[torch.Tensor], nrow: int, out: str | Path, row_labels: list[str] | None = None) -> None:
    """uint8 (C, H, W) tiles as a PNG grid of ``nrow`` columns, small images enlarged, rows optionally named."""
    from PIL import Image
    from torchvision.utils import make_grid

    from dfkd_common.engine import atomic_path

    c, h, w = tiles[0].shape
    grid = make_grid(torch.stack(tiles), nrow=nrow, padding=2, pad_value=128)
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = max(1, 256 // max(h, w))
    img = img.resize((img.width * scale // 2 or 1, img.height * scale // 2 or 1), Image.NEAREST) if scale > 2 else img
    if row_labels:
        img = label_rows(img, row_labels)
    with atomic_path(out, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def label_rows(img: Any, labels: list[str]) -> Any:
    """The image with a left margin naming each of its equally tall rows (class names on a class grid)."""
    from PIL import Image, ImageDraw, ImageFont

    if not labels:
        return img
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    width = max(int(draw.textlength(t, font=font)) for t in labels) + 8
    out = Image.new(img.mode, (img.width + width, img.height), 255 if img.mode == "L" else (255, 255, 255))
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    row = img.height / len(labels)
    for i, text in enumerate(labels):
        draw.text((4, int(i * row + row / 2 - 6)), text, fill=0 if img.mode == "L" else (0, 0, 0), font=font)
    return out


def save_pairs_grid(path: str | Path, out: str | Path, parent: str | Path | None = None, rows: int = 10,
                    seed: int = 0) -> int:
    """A PNG of an augmented bank: each row a source image of the parent bank, then its kept variations.

    Sources are drawn with at least one kept variation, cycling through the classes so every class shows. The
    parent is ``parent`` or the path the bank recorded, and must match the checksum the bank recorded (a grid
    must never pair variations with the wrong sources). Returns the variations shown.
    """
    from dfkd_common.errors import DfkdError

    bank = load_bank(path)
    if bank.attrs.get("kind") != "augmented" or "parent_index" not in bank.extra:
        raise DfkdError(f"{path} is not an augmented bank (kind {bank.attrs.get('kind')}): no sources to show")
    stats = bank.attrs.get("augment") if isinstance(bank.attrs.get("augment"), dict) else {}
    parent_path = Path(parent or stats.get("parent_path") or "")
    if not parent_path.is_file():
        raise DfkdError(f"the parent bank of {path} is not at {parent_path or '(unrecorded)'}: give --parent PATH")
    if bank.attrs.get("parent_checksum") and file_checksum(parent_path) != bank.attrs["parent_checksum"]:
        raise DfkdError(f"{parent_path} is not the bank {path} was made from (checksum differs)")
    src = load_bank(parent_path)
    k = int((bank.attrs.get("params") or {}).get("k", 1))  # read_attrs decodes params from JSON
    pidx = bank.extra["parent_index"].long()
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for p in torch.unique(pidx).tolist():
        by_class.setdefault(int(bank.labels[pidx == p][0]), []).append(int(p))
    for v in by_class.values():
        rng.shuffle(v)
    order: list[int] = []
    while len(order) < rows and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(order) < rows:
                order.append(by_class[c].pop())
    c, h, w = src.image_shape
    blank = torch.full((c, h, w), 0, dtype=torch.uint8)
    tiles, shown = [], 0
    for p in order:
        kept = torch.nonzero(pidx == p).flatten()[:k]
        tiles.append(src.images[p])
        tiles.extend(bank.images[int(i)] for i in kept)
        tiles.extend(blank for _ in range(k - len(kept)))
        shown += len(kept)
    if not tiles:
        raise DfkdError(f"{path} holds no variations")
    write_grid(tiles, k + 1, out)
    return shown
