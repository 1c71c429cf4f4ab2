"""The bundled demo files (easyppo/configs/demo_data), and small slices of them for fast tests."""

from __future__ import annotations

import pathlib

DEMO_DATA = pathlib.Path(__file__).resolve().parents[2] / "easyppo" / "configs" / "demo_data"


def first_rows(src: pathlib.Path, dst: pathlib.Path, rows: int) -> str:
    """Writes the first ``rows`` lines of the JSONL file ``src`` to ``dst``; returns ``dst`` as a string."""
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:rows]))
    return str(dst)
