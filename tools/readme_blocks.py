"""Print the N-th fenced shell block of the README's ``## Quickstart`` section (1-based).

Used by .ci/run (block 2 is the test command) and by tests that check the README.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def quickstart_blocks(text: str) -> list[str]:
    match = re.search(r"^## Quickstart\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if not match:
        raise SystemExit("README has no '## Quickstart' section")
    blocks = re.findall(r"^```(?:sh|bash|shell)\s*\n(.*?)^```", match.group(1), re.MULTILINE | re.DOTALL)
    return [b.strip() for b in blocks]


def main() -> None:
    path, index = Path(sys.argv[1]), int(sys.argv[2])
    blocks = quickstart_blocks(path.read_text())
    if not 1 <= index <= len(blocks):
        raise SystemExit(f"Quickstart has {len(blocks)} shell blocks, not {index}")
    print(blocks[index - 1])


if __name__ == "__main__":
    main()
