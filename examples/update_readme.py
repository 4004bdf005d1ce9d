"""Rewrite README.md's generated blocks from the code: every block between

    <!-- generated: uncurl options --markdown COMMAND -->  ...  <!-- end generated -->

is replaced by that command's output (tests/test_options.py fails until they agree).

    make readme
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from typer.testing import CliRunner

from uncurl.cli import app

BLOCK = re.compile(r"(<!-- generated: uncurl (.+?) -->\n)(.*?)(<!-- end generated -->)", re.S)


def regenerate(text: str) -> str:
    def fill(m: re.Match) -> str:
        res = CliRunner().invoke(app, shlex.split(m.group(2)))
        if res.exit_code != 0:
            sys.exit(f"uncurl {m.group(2)} failed: {res.output}")
        return m.group(1) + res.output.strip() + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    old = path.read_text()
    new = regenerate(old)
    path.write_text(new)
    print(f"{path}: {'updated' if new != old else 'already up to date'}")
