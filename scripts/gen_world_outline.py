"""Generate status_page/static/world.json, the world outline the status page draws its map on.

Source: the npm package `world-atlas` (ISC licence, Mike Bostock), file `land-110m.json`: Natural
Earth's 1:110m land polygons (public domain) as TopoJSON. This script decodes the TopoJSON arcs,
projects them equirectangularly onto a 360 x 180 box (x = longitude + 180, y = 90 - latitude),
drops points closer than 0.4 degrees to the previous one and writes one SVG path. The output is
committed, so the page needs no network and no npm at run time; re-run this only to regenerate it:

    npm install --prefix /tmp/world world-atlas@2
    .venv/bin/python scripts/gen_world_outline.py /tmp/world/node_modules/world-atlas/land-110m.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "status_page" / "static" / "world.json"
MIN_STEP = 0.4  # degrees


def decode_arcs(topo: dict) -> list[list[tuple[float, float]]]:
    """TopoJSON delta-encoded, quantized arcs -> lists of (lon, lat)."""
    (sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * sx + tx, y * sy + ty))
        arcs.append(points)
    return arcs


def ring(arcs: list[list[tuple[float, float]]], indexes: list[int]) -> list[tuple[float, float]]:
    """A ring from arc indexes (~i means arc i reversed); shared end points are not repeated."""
    out: list[tuple[float, float]] = []
    for i in indexes:
        points = arcs[i] if i >= 0 else list(reversed(arcs[~i]))
        out.extend(points[1:] if out else points)
    return out


def simplify(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    kept = [points[0]]
    for p in points[1:]:
        if abs(p[0] - kept[-1][0]) + abs(p[1] - kept[-1][1]) >= MIN_STEP:
            kept.append(p)
    return kept


def svg_path(topo: dict) -> str:
    arcs = decode_arcs(topo)
    parts = []
    for geometry in topo["objects"]["land"]["geometries"]:
        polygons = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
        for polygon in polygons:
            for indexes in polygon:
                points = simplify(ring(arcs, indexes))
                if len(points) < 3:
                    continue
                # a ring that crosses the antimeridian jumps across the map: move, do not draw, there
                path = ""
                for k, (lon, lat) in enumerate(points):
                    jump = k == 0 or abs(lon - points[k - 1][0]) > 180
                    path += f"{'M' if jump else 'L'}{lon + 180:.1f} {90 - lat:.1f}"
                parts.append(path + "Z")
    return "".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("land_110m", type=Path, help="world-atlas's land-110m.json")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    topo = json.loads(args.land_110m.read_text())
    args.out.write_text(json.dumps({
        "source": "Natural Earth 1:110m land (public domain), via the npm package world-atlas (ISC)",
        "projection": "equirectangular: x = longitude + 180, y = 90 - latitude",
        "width": 360, "height": 180, "path": svg_path(topo)}) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
