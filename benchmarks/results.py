"""Where benchmark tables go: printed, and appended to benchmarks/RESULTS.md under the command that made them.

``report(lines, save=not args.no_save)`` from any script in this folder (run as ``python benchmarks/X.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def report(lines: list[str], save: bool = True) -> str:
    """Print the table ``lines`` and, if ``save``, append it to RESULTS.md after the command line that ran."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if save:
        command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
        with RESULTS.open("a") as f:
            f.write(f"\n`{command}`\n\n{text}")
    return text
