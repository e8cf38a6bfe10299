"""Contact sheet: a PNG grid with one row per label, a few example images each, boxes drawn."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import UserError
from ..io import atomic_path
from ..labels import NO_FINDING, PATHOLOGIES

_COLOURS = ["#ff4040", "#40c0ff", "#ffd040", "#60ff60", "#ff60ff", "#ff9020", "#a0a0ff", "#ffffff"]


def _find_images(root: Path) -> dict[str, Path]:
    paths = {p.name: p for p in root.glob("images/*.png")}
    paths.update({p.name: p for p in root.glob("images_*/images/*.png")})
    return paths


def contact_sheet(root: str | os.PathLike, out_png: str | os.PathLike, per_label: int = 6, tile: int = 128,
                  labels: tuple[str, ...] | None = None) -> Path:
    """Write a grid of ``per_label`` examples per label (rows) from an NIH-format folder ``root``."""
    root = Path(root)
    entry = root / "Data_Entry_2017_v2020.csv"
    if not entry.exists():
        raise UserError(f"no Data_Entry_2017_v2020.csv in {root}; pass a folder written by `xray phantom`")
    if per_label < 1:
        raise UserError(f"per_label is {per_label}; expected at least 1")
    rows = [line.split(",") for line in entry.read_text().splitlines()[1:] if line.strip()]
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    bbox_file = root / "BBox_List_2017.csv"
    if bbox_file.exists():
        for line in bbox_file.read_text().splitlines()[1:]:
            p = line.split(",")
            if len(p) >= 6:
                lab = "Infiltration" if p[1] == "Infiltrate" else p[1]
                boxes.setdefault(p[0], []).append((lab, [float(t) for t in p[2:6]]))
    images = _find_images(root)
    wanted = labels or (NO_FINDING,) + PATHOLOGIES
    picks = {lab: [r[0] for r in rows if lab in r[1].split("|") and r[0] in images][:per_label] for lab in wanted}
    picks = {k: v for k, v in picks.items() if v}
    if not picks:
        raise UserError(f"no images of labels {', '.join(wanted)} in {root}")
    label_w = 110
    sheet = Image.new("RGB", (label_w + per_label * tile, len(picks) * tile), "black")
    draw = ImageDraw.Draw(sheet)
    for r, (lab, names) in enumerate(picks.items()):
        draw.text((4, r * tile + tile // 2 - 6), lab, fill="white")
        for c, name in enumerate(names):
            im = Image.open(images[name]).convert("L")
            scale = tile / im.size[0]
            x0, y0 = label_w + c * tile, r * tile
            sheet.paste(im.resize((tile, tile), Image.BILINEAR).convert("RGB"), (x0, y0))
            for k, (blab, (x, y, w, h)) in enumerate(boxes.get(name, [])):
                s = scale * im.size[0] / 1024.0  # boxes are in 1024-px coordinates
                colour = "#ff4040" if blab == lab else _COLOURS[1 + k % (len(_COLOURS) - 1)]
                draw.rectangle([x0 + x * s, y0 + y * s, x0 + (x + w) * s, y0 + (y + h) * s], outline=colour)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        sheet.quantize(colors=64, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
    return out
