"""Summarise an NIH-format folder, a ChestMNIST file (or its folder) or a prepared cache: counts per
label, split sizes, missing images."""

from __future__ import annotations

import argparse
from pathlib import Path

from xray.errors import UserError
from xray.labels import ANY_FINDING, NO_FINDING, PATHOLOGIES

HELP = "counts per label, split sizes and missing images of a data folder or cache"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="NIH-format folder, prepared cache, or a ChestMNIST .npz (or the folder holding it)")
    p.add_argument("--show-missing", type=int, default=10, metavar="K", help="list at most K missing images (default: 10)")


def _table(counts: dict[str, int], total: int) -> list[str]:
    width = max(map(len, counts))
    return [f"  {k:<{width}} {v:>8} {100 * v / max(total, 1):6.2f} %" for k, v in counts.items()]


def summarise(path: str | Path, show_missing: int = 10) -> str:
    """The text `xray info` prints."""
    from xray import cache, chestmnist, nih  # here, not at the top: pandas, +0.5 s on `xray --help` (measured)

    p = Path(path).expanduser()
    if chestmnist.holds_chestmnist(p):
        return _summarise_chestmnist(p)
    if not p.is_dir():
        raise UserError(f"{p} is not a folder; pass an NIH-format folder, a prepared cache or a ChestMNIST .npz")
    if (p / cache.MANIFEST_FILE).is_file():
        m = cache.read_manifest(p)
        n = m["n_images"]
        lines = [f"prepared cache {p} of {m['source_root']} ({m['csv']}): {n} images at {m['image_size']} px",
                 "labels:", *_table(m["counts"], n),
                 "splits:", *_table({s: m["splits"][s] for s in ("train", "val", "trainval", "test")}, n),
                 f"bad images (skipped): {len(m['bad_images'])}"]
        lines += [f"  {b['image']}: {b['reason']}" for b in m["bad_images"][:show_missing]]
        if m.get("present_only"):
            lines.append(f"absent images (listed, not on disk; --present-only): {m.get('n_absent', 0)}")
            lines += [f"  {name}" for name in m.get("absent_examples", [])[:show_missing]]
        if m.get("n_unlisted"):
            lines.append(f"image files on disk not listed in {m['csv']} (left out): {m['n_unlisted']}")
            lines += [f"  {name}" for name in m.get("unlisted_examples", [])[:show_missing]]
        return "\n".join(lines)
    csv = nih.find_csv(p)
    labels = nih.read_labels(csv)
    files = nih.find_images(p)
    splits = nih.split(p, labels)
    n = len(labels)
    counts = {c: int(labels[c].sum()) for c in nih.LABEL_COLUMNS}
    counts[ANY_FINDING] = n - counts[NO_FINDING]
    missing = [name for name in labels.index if name not in files]
    official = (p / "test_list.txt").is_file() and (p / "train_val_list.txt").is_file()
    lines = [f"NIH-format folder {p} ({csv.name}): {n} images, {labels['patient_id'].nunique()} patients",
             "labels:", *_table(counts, n),
             f"splits ({'official lists' if official else 'hash of patient id'}):",
             *_table({s: len(splits[s]) for s in ("train", "val", "trainval", "test")}, n),
             f"missing images: {len(missing)} of {n}"]
    lines += [f"  {name}" for name in missing[:show_missing]]
    if len(missing) > show_missing:
        lines.append(f"  ... and {len(missing) - show_missing} more")
    return "\n".join(lines)


def _summarise_chestmnist(p: Path) -> str:
    from xray import chestmnist  # here, not at the top: pandas, +0.5 s on `xray --help` (measured)

    files = [p] if p.is_file() else [p / f for f in chestmnist.FILES.values() if (p / f).is_file()]
    lines = []
    for f in files:
        layout = chestmnist.read_layout(f)
        table = chestmnist.label_table(f)
        n = len(table)
        counts = {c: int(table[c].sum()) for c in (*PATHOLOGIES, NO_FINDING)}
        counts[ANY_FINDING] = n - counts[NO_FINDING]
        px = next(iter(layout.values()))[1]
        lines += [f"ChestMNIST file {f}: {n} images at {px} px (no patient ids, boxes or DICOM)",
                  "labels:", *_table(counts, n),
                  "splits (official):", *_table({s: layout[s][0] for s in chestmnist.SPLITS}, n)]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    print(summarise(args.dir, args.show_missing))
    return 0
