#!/usr/bin/env python3
"""Draws loss curves from one or more metrics.jsonl files into an SVG (standard library only).

    tools/plot_metrics.py runs/demo/metrics.jsonl -o runs/demo/loss.svg
    tools/plot_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl --x elapsed_s --y val_loss -o cmp.svg

Every record with the x key and a y key becomes a point; each (file, y key) pair is one line. The
x key may be any numeric field (step, tokens_seen, elapsed_s, grad_evals, ...); records without it are
skipped. Labels default to the run directory's name.
"""
import argparse
import json
import math
import os
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def load(path, xkey, ykeys):
    series = {y: [] for y in ykeys}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print(f"{path}:{n}: skipping a line that is not JSON", file=sys.stderr)
                continue
            if xkey not in rec:
                continue
            for y in ykeys:
                v = rec.get(y)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    series[y].append((float(rec[xkey]), float(v)))
    return series


def nice_ticks(lo, hi, count=6):
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=mag * 10)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def fmt(v):
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="metrics.jsonl files")
    ap.add_argument("--x", default="step", help="x-axis key (default: step)")
    ap.add_argument("--y", default="loss,val_loss", help="comma-separated y keys (default: loss,val_loss)")
    ap.add_argument("--labels", default="", help="comma-separated labels, one per file")
    ap.add_argument("--title", default="", help="plot title")
    ap.add_argument("--logx", action="store_true", help="logarithmic x axis")
    ap.add_argument("-o", "--output", required=True, help="output .svg")
    args = ap.parse_args()
    ykeys = [y for y in args.y.split(",") if y]
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in args.files]
    if len(labels) != len(args.files):
        sys.exit("plot_metrics: --labels needs one label per file")

    lines = []
    for f, label in zip(args.files, labels):
        for y, pts in load(f, args.x, ykeys).items():
            if pts:
                lines.append((f"{label} {y}", y, pts))
    if not lines:
        sys.exit(f"plot_metrics: no records with '{args.x}' and any of {ykeys} in {args.files}")

    tx = (lambda v: math.log10(max(v, 1e-12))) if args.logx else (lambda v: v)
    xs = [tx(x) for _, _, pts in lines for x, _ in pts]
    ys = [y for _, _, pts in lines for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x1 = x0 + 1
    W, H, L, R, T, B = 900, 540, 80, 220, 50, 60
    px = lambda x: L + (tx(x) - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    for t in nice_ticks(y0, y1):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 8}" y="{py(t) + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    for t in nice_ticks(x0, x1):
        xv = 10 ** t if args.logx else t
        X = L + (t - x0) / (x1 - x0) * (W - L - R)
        out.append(f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>')
        out.append(f'<text x="{X:.1f}" y="{H - B + 18}" text-anchor="middle">{fmt(xv)}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 15}" text-anchor="middle">{args.x}</text>')
    out.append(f'<text x="20" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 20 {(T + H - B) / 2})">{", ".join(ykeys)}</text>')
    if args.title:
        out.append(f'<text x="{W / 2}" y="28" text-anchor="middle" font-size="16">{args.title}</text>')
    for i, (name, y, pts) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)
        if len(pts) > 1:
            dash = ' stroke-dasharray="6,3"' if y.startswith("val") else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        if y.startswith("val") or len(pts) == 1:
            for x, v in pts:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"/>')
        ly = T + 16 + 18 * i
        out.append(f'<line x1="{W - R + 12}" x2="{W - R + 36}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - R + 42}" y="{ly}">{name} ({pts[-1][1]:.3f})</text>')
    out.append("</svg>")
    with open(args.output, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {args.output}: {len(lines)} line(s)")


if __name__ == "__main__":
    main()
