"""docs/checkpoints.md's zoo table, from the results tests/test_checkpoint_files.py recorded.

Each zoo case that passes writes one row to .cache/checkpoint-zoo/results/ (family, file layout, stored
dtype, variant, the transformers version that wrote the checkpoint, the result). This script renders them
as a markdown table between the table markers of docs/checkpoints.md:
    .venv/bin/python -m pytest -q tests/test_checkpoint_files.py      (with -m slow too, for every row)
    .venv/bin/python scripts/checkpoint_zoo/table.py [--write docs/checkpoints.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / ".cache" / "checkpoint-zoo" / "results"
BEGIN, END = "<!-- zoo table: scripts/checkpoint_zoo/table.py writes it -->", "<!-- end of zoo table -->"
VARIANTS = {"": "", "without_pooler": "encoder saved without its pooler", "position_ids": "old position_ids buffers"}


def table() -> str:
    rows = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results in {RESULTS}: run tests/test_checkpoint_files.py first")
    lines = [
        "| family | file layout | stored dtype | also | written by | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["family"], r["layout"], r["dtype"], r["variant"])):
        cells = [row["family"], row["layout"], row["dtype"], VARIANTS[row["variant"]], row["writer"], row["result"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", type=Path, help="replace the table between the markers of this file")
    args = parser.parse_args()
    rendered = table()
    if args.write is None:
        print(rendered)
        return
    text = args.write.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    partial = args.write.with_name(args.write.name + ".partial")
    partial.write_text(f"{head}{BEGIN}\n{rendered}\n{END}{tail}")
    partial.rename(args.write)


if __name__ == "__main__":
    main()
