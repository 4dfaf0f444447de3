"""Write docs/ERRORS.md (bad input -> message, exit code) from the cases in tests/error_cases.py.

    python scripts/errors_doc.py          # write the table
    python scripts/errors_doc.py --check  # exit 1 if the file is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from error_cases import CASES, render  # noqa: E402


def main() -> int:
    doc = ROOT / "docs" / "ERRORS.md"
    text = render()
    if "--check" in sys.argv[1:]:
        current = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        if current != text:
            print(f"{doc} is out of date: run python scripts/errors_doc.py", file=sys.stderr)
            return 1
        return 0
    doc.write_text(text, encoding="utf-8")
    print(f"wrote {doc} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
