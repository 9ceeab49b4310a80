"""Rewrite README.md's engine tables (between the serving-table markers) from the serving table,
weightlock/engines/serving_table.py; tests/test_serving_table.py fails while the two disagree.

    .venv/bin/python scripts/serving_table.py [README]
"""

from __future__ import annotations

import sys
from pathlib import Path

from weightlock.engines.serving_table import replace_readme_section


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "README.md"
    text = path.read_text(encoding="utf-8")
    new = replace_readme_section(text)
    if new == text:
        print(f"{path}: the engine tables are up to date")
    else:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: the engine tables were rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
