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
    bank = load_bank(path, images=False)  # images are read in blocks, only to re-score them
    attrs = bank.attrs
    ds = bank.dataset
    names = list(ds.get("class_names") or [])
    logits: torch.Tensor | None = None
    source = None
    if teacher is not None:
        engine = Engine.create("auto", amp=False, channels_last=False)
        model, meta = load_model(teacher, engine.device)
        bank.check_compatible(meta.dataset)
        logits = torch.cat([predict(model, block, engine) for block in bank.image_blocks()]) if len(bank) \
            else torch.zeros(0, meta.dataset.num_classes)
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
    pixels = bank.task.name == "segmentation"  # a mask's targets are pixels: counts and shares of them
    total = int((labels != 255).sum()) if pixels else len(bank)
    for c in range(num_classes):
        m = labels == c
        per_class.append({
            "class": c,
            "name": names[c] if c < len(names) else str(c),
            "count": int(m.sum()),
            **({"share": int(m.sum()) / total if total else None} if pixels else {}),
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
        "counted": "pixels" if pixels else "images",
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


#: the smallest side a tile is drawn at (a 32x32 image is enlarged 2x, an 8x8 one 6x) so its content is visible
MIN_TILE = 56


def teacher_view(bank: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row: the teacher's probability of the row's label and its predicted class, from the stored
    ``teacher_logits`` (None when the bank has none)."""
    logits = bank.extra.get("teacher_logits")
    if logits is None or logits.ndim != 2 or not len(bank):
        return None
    prob = torch.softmax(logits.float(), dim=1)
    labels = bank.labels.clamp(min=0)
    return prob.gather(1, labels[:, None]).squeeze(1), prob.argmax(1)


def save_grid(path: str | Path, out: str | Path, per_class: int = 10, round_index: int | None = None,
              seed: int = 0) -> int:
    """Write a PNG with one row per class of up to ``per_class`` random samples; returns images shown.

    The grid explains itself: a title (bank, method, kind, which rounds, what the captions are), each row named
    by its class, each tile captioned with the teacher's confidence in the row's class where the bank stored the
    teacher's logits (a red caption names the class the teacher sees instead), and a class with fewer images
    than columns shows empty cells, never black images. Only the images shown are read (any bank size)."""
    bank = load_bank(path, images=False)
    if bank.task.name == "segmentation":
        return save_mask_grid(bank, path, out, per_class, round_index, seed)
    rng = np.random.default_rng(seed)
    keep = torch.ones(len(bank), dtype=torch.bool)
    if round_index is not None:
        keep &= bank.rounds == round_index
    num_classes = int(bank.dataset.get("num_classes") or (int(bank.labels.max()) + 1 if len(bank) else 1))
    names = list(bank.dataset.get("class_names") or [])
    name = [names[k] if k < len(names) else str(k) for k in range(num_classes)]
    view = teacher_view(bank)
    tiles: list[torch.Tensor | None] = []
    captions: list[tuple[str, bool] | None] = []
    shown = 0
    picks = []
    for k in range(num_classes):
        idx = torch.nonzero(keep & (bank.labels == k)).flatten().numpy()
        picks.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else [])
    flat = [int(r) for pick in picks for r in pick]
    pixels = dict(zip(flat, bank.read_images(flat), strict=True))
    for k, pick in enumerate(picks):
        for i in range(per_class):
            if i >= len(pick):
                tiles.append(None)
                captions.append(None)
                continue
            row = int(pick[i])
            tiles.append(pixels[row])
            if view is None:
                captions.append(None)
            else:
                p, pred = float(view[0][row]), int(view[1][row])
                captions.append((f"{100 * p:.0f}%" + ("" if pred == k else f" {name[pred]}"), pred != k))
        shown += len(pick)
    rounds = bank.rounds[keep]
    which = (f"round {round_index}" if round_index is not None else
             f"rounds {int(rounds.min())}-{int(rounds.max())}" if len(rounds) else "no rows")
    title = [f"{Path(path).name}: {bank.attrs.get('method') or '?'} ({bank.attrs.get('kind') or '?'}), "
             f"{int(keep.sum()):,} images, {which}",
             f"rows: class; {per_class} random samples each" + (
                 "; caption: teacher's confidence in the row's class (red: it sees another)" if view is not None
                 else "; no teacher logits stored: dfkd bank info --teacher T re-scores")]
    image = render_grid(tiles, per_class, title, row_labels=name, captions=captions if view is not None else None)
    _save_png(image, out)
    return shown


def palette(num_classes: int) -> torch.Tensor:
    """uint8 (K + 1, 3) colours: class 0 (background, by convention) black, the others matplotlib's tab20 in turn,
    and the last row grey for the ignore index."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    colours = [(0, 0, 0)] + [tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i in range(num_classes - 1)]
    return torch.tensor([*colours, (128, 128, 128)], dtype=torch.uint8)


def save_mask_grid(bank: Any, path: str | Path, out: str | Path, count: int = 10, round_index: int | None = None,
                   seed: int = 0) -> int:
    """A segmentation bank's grid: ``count`` random rows, each image beside its mask (the teacher's, coloured by
    class), four pairs a row, and a legend row of the class colours under them; returns images shown."""
    rng = np.random.default_rng(seed)
    keep = torch.ones(len(bank), dtype=torch.bool) if round_index is None else bank.rounds == round_index
    idx = torch.nonzero(keep).flatten().numpy()
    rows = sorted(int(r) for r in (rng.choice(idx, size=min(count, len(idx)), replace=False) if len(idx) else []))
    num_classes = int(bank.dataset.get("num_classes") or 1)
    names = list(bank.dataset.get("class_names") or [str(k) for k in range(num_classes)])
    colours = palette(num_classes)
    tiles: list[torch.Tensor | None] = []
    captions: list[tuple[str, bool] | None] = []
    for image, mask in zip(bank.read_images(rows), (bank.labels[r] for r in rows), strict=True):
        rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        index = torch.where(mask.long() == 255, num_classes, mask.long().clamp(max=num_classes))
        tiles += [rgb, colours[index].permute(2, 0, 1).contiguous()]
        captions += [None, None]
    ncol = 8
    while len(tiles) % ncol:
        tiles.append(None)
        captions.append(None)
    h, w = (tiles[0].shape[1:] if tiles and tiles[0] is not None else (16, 16))
    for k in range(num_classes):  # the legend: a swatch per class, named under it
        tiles.append(colours[k].view(3, 1, 1).expand(3, h, w).contiguous())
        captions.append((names[k] if k < len(names) else str(k), False))
    title = [f"{Path(path).name}: {bank.attrs.get('method') or '?'} ({bank.attrs.get('kind') or '?'}), "
             f"{int(keep.sum()):,} images" + (f", round {round_index}" if round_index is not None else ""),
             f"{len(rows)} random images, each beside its mask (the teacher's classes; grey: ignored); last: legend"]
    image = render_grid(tiles, ncol, title, col_labels=["image", "mask"] * (ncol // 2), captions=captions)
    _save_png(image, out)
    return len(rows)


def render_grid(tiles: list[torch.Tensor | None], ncol: int, title: list[str], row_labels: list[str] | None = None,
                col_labels: list[str] | None = None, captions: list[tuple[str, bool] | None] | None = None) -> Any:
    """uint8 (C, H, W) tiles (None: an empty cell, drawn as an outlined blank) in rows of ``ncol``, under a
    ``title`` (one line each), with optional row labels on the left, column labels on top and a caption under
    each tile (text, whether to draw it as a warning). Small images are enlarged (nearest) to :data:`MIN_TILE`."""
    from PIL import Image, ImageDraw

    c, h, w = next(t.shape for t in tiles if t is not None) if any(t is not None for t in tiles) else (1, 8, 8)
    scale = max(1, -(-MIN_TILE // max(h, w)))
    th, tw = h * scale, w * scale
    font, small = _font(14), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str, f: Any) -> int:
        return int(probe.textlength(text, font=f))

    pad, line, cap = 6, 18, (14 if captions else 0)
    left = (max(text_w(t, font) for t in row_labels) + 2 * pad) if row_labels else pad
    top = pad + line * len(title) + (line if col_labels else 0) + pad
    rows = -(-len(tiles) // ncol)
    width = max(left + ncol * (tw + pad) + pad, max(text_w(t, font) for t in title) + 2 * pad)
    height = top + rows * (th + cap + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title):
        draw.text((pad, pad + i * line), text, fill=(0, 0, 0), font=font)
    for j, text in enumerate(col_labels or []):
        draw.text((left + j * (tw + pad), top - line - pad // 2), text, fill=(60, 60, 60), font=small)
    for r in range(rows):
        y = top + r * (th + cap + pad)
        if row_labels and r < len(row_labels):
            draw.text((pad, y + th // 2 - 8), row_labels[r], fill=(0, 0, 0), font=font)
        for j in range(ncol):
            i = r * ncol + j
            if i >= len(tiles):
                break
            x = left + j * (tw + pad)
            tile = tiles[i]
            if tile is None:
                draw.rectangle((x, y, x + tw - 1, y + th - 1), outline=(200, 200, 200))
                continue
            arr = tile.permute(1, 2, 0).numpy()
            im = Image.fromarray(arr[..., 0], mode="L") if c == 1 else Image.fromarray(arr, mode="RGB")
            canvas.paste(im.convert("RGB").resize((tw, th), Image.NEAREST), (x, y))
            if captions and captions[i] is not None:
                text, warn = captions[i]  # type: ignore[misc]
                draw.text((x, y + th + 1), text, fill=(200, 0, 0) if warn else (60, 60, 60), font=small)
    return canvas


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one bitmap size
        return ImageFont.load_default()


def _save_png(image: Any, out: str | Path) -> None:
    from dfkd_common.engine import atomic_path

    with atomic_path(out, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def save_pairs_grid(path: str | Path, out: str | Path, parent: str | Path | None = None, rows: int = 10,
                    seed: int = 0) -> int:
    """A PNG of an augmented bank: each row a source image of the parent bank, then its kept variations.

    Sources are drawn with at least one kept variation, cycling through the classes so every class shows. The
    parent is ``parent`` or the path the bank recorded, and must match the checksum the bank recorded (a grid
    must never pair variations with the wrong sources). A header names the columns (source, then variations
    1..k), each row is named by its class, and a variation the filter dropped is an empty cell. Returns the
    variations shown.
    """
    from dfkd_common.errors import DfkdError

    bank = load_bank(path, images=False)
    if bank.attrs.get("kind") != "augmented" or "parent_index" not in bank.extra:
        raise DfkdError(f"{path} is not an augmented bank (kind {bank.attrs.get('kind')}): no sources to show")
    stats = bank.attrs.get("augment") if isinstance(bank.attrs.get("augment"), dict) else {}
    parent_path = Path(parent or stats.get("parent_path") or "")
    if not parent_path.is_file():
        raise DfkdError(f"the parent bank of {path} is not at {parent_path or '(unrecorded)'}: give --parent PATH")
    if bank.attrs.get("parent_checksum") and file_checksum(parent_path) != bank.attrs["parent_checksum"]:
        raise DfkdError(f"{parent_path} is not the bank {path} was made from (checksum differs)")
    src = load_bank(parent_path, images=False)
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
    names = list(bank.dataset.get("class_names") or [])
    tiles: list[torch.Tensor | None] = []
    labels, shown = [], 0
    for p in order:
        kept = torch.nonzero(pidx == p).flatten()[:k]
        tiles.append(src.read_images([p])[0])
        tiles.extend(bank.read_images(kept.numpy()))
        tiles.extend(None for _ in range(k - len(kept)))
        label = int(src.labels[p])
        labels.append(names[label] if 0 <= label < len(names) else str(label))
        shown += len(kept)
    if not tiles:
        raise DfkdError(f"{path} holds no variations")
    title = [f"{Path(path).name}: variations of {parent_path.name} ({bank.attrs.get('method') or '?'}), "
             f"{len(bank):,} kept of {stats.get('made', '?')} made",
             "rows: a source image (its class on the left), then its variations the teacher kept; an empty cell: "
             "a variation the filter dropped"]
    image = render_grid(tiles, k + 1, title, row_labels=labels,
                        col_labels=["source", *(f"variation {i + 1}" for i in range(k))])
    _save_png(image, out)
    return shown
