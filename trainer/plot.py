"""Loss curves of a PT run, as a PNG.

    python -m trainer.plot OUT_DIR [--out OUT_DIR/loss.png]

Reads OUT_DIR/logs/train.jsonl and draws, against the step, the total loss, the NTP loss and each task's
embedding loss (one panel), and every (task, layer) smooth-L1 and InfoNCE term (a second panel). Drawn with
PIL: no plotting library needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from recipes.manifest import ordered_tasks
from store import StoreError, refuse_inside_store

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (120, 120, 255)]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _panel(draw: ImageDraw.ImageDraw, box, series: dict[str, list[tuple[float, float]]], title: str,
           xlabel: str = "step") -> None:
    x0, y0, x1, y1 = box
    left, bottom, top = x0 + 60, y1 - 30, y0 + 24
    right = x1 - 170
    draw.text((x0 + 60, y0 + 4), title, fill=(0, 0, 0))
    pts = [p for s in series.values() for p in s]
    if not pts:
        draw.text((left, (top + bottom) // 2), "no data", fill=(0, 0, 0))
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def px(x, y):
        return left + (x - xmin) / (xmax - xmin) * (right - left), bottom - (y - ymin) / (ymax - ymin) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for k in range(5):  # y ticks
        y = ymin + k * (ymax - ymin) / 4
        _, yy = px(xmin, y)
        draw.line((left - 4, yy, left, yy), fill=(0, 0, 0))
        draw.text((x0 + 4, yy - 6), f"{y:.3g}", fill=(0, 0, 0))
        draw.line((left, yy, right, yy), fill=(230, 230, 230))
    for k in range(5):  # x ticks
        x = xmin + k * (xmax - xmin) / 4
        xx, _ = px(x, ymin)
        draw.line((xx, bottom, xx, bottom + 4), fill=(0, 0, 0))
        draw.text((xx - 10, bottom + 6), f"{x:.0f}", fill=(0, 0, 0))
    draw.text(((left + right) // 2 - 10, bottom + 16), xlabel, fill=(0, 0, 0))
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = [px(x, y) for x, y in s]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        elif line:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=color)
        draw.line((right + 10, top + 8 + 14 * i, right + 30, top + 8 + 14 * i), fill=color, width=3)
        draw.text((right + 34, top + 2 + 14 * i), name, fill=(0, 0, 0))


def plot(records: list[dict], out: Path) -> Path:
    tasks = ordered_tasks(k.split("/")[0] for r in records for k in r if k.count("/") == 2 and k.endswith("/sl1"))
    main = {k: [(r["step"], r[k]) for r in records if k in r] for k in ["loss", "ntp", *tasks]}
    terms = sorted({k for r in records for k in r if k.count("/") == 2})
    detail = {k: [(r["step"], r[k]) for r in records if k in r] for k in terms}
    img = Image.new("RGB", (1000, 760), (255, 255, 255))
    d = ImageDraw.Draw(img)
    _panel(d, (0, 0, 1000, 380), main, "total, next-token and per-task embedding losses")
    _panel(d, (0, 380, 1000, 760), detail, "per (task, layer): smooth-L1 (sl1) and InfoNCE (nce)")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir", type=Path, help="a trainer.pt output dir (or a train.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default OUT_DIR/loss.png)")
    a = p.parse_args(argv)
    log = a.output_dir if a.output_dir.suffix == ".jsonl" else a.output_dir / "logs" / "train.jsonl"
    if not log.is_file():
        p.error(f"{log} not found: is {a.output_dir} a trainer.pt output dir?")
    out = a.out or (log.parent.parent / "loss.png")
    try:
        refuse_inside_store(out, "--out")
    except StoreError as e:
        p.error(str(e))
    print(f"wrote {plot(read_log(log), out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
