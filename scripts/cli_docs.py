"""Write the CLI reference, docs/cli.md, from the Typer app with Typer's own `typer MODULE utils docs`.

    python scripts/cli_docs.py [OUT]      (make cli-docs; OUT defaults to docs/cli.md)

tests/test_cli_docs.py renders it into a temporary file and fails when docs/cli.md differs, so a
changed flag or a new command means: run `make cli-docs` and commit the page. Typer renders in a
child process with a fixed terminal (width, TERM, no colour), so the page is the same from any shell
and in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
# Terminal settings that Typer, Rich or Click could read; the child gets fixed values instead.
TERMINAL = ("COLUMNS", "LINES", "TERM", "NO_COLOR", "FORCE_COLOR", "TERMINAL_WIDTH", "TTY_COMPATIBLE")


def render() -> str:
    """The page: a do-not-edit note, then Typer's Markdown for `kdcache` and every command."""
    import typer

    env = {k: v for k, v in os.environ.items() if k not in TERMINAL and not k.startswith("_TYPER")}
    env.update(COLUMNS="100", LINES="50", TERM="dumb", NO_COLOR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-m", "typer", "kdcache.cli", "utils", "docs", "--name", "kdcache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise SystemExit(f"typer utils docs failed (exit {done.returncode}):\n{done.stderr}")
    note = (
        f"<!-- Generated from kdcache/cli.py by `make cli-docs` (scripts/cli_docs.py, typer {typer.__version__}):"
        " do not edit by hand. -->\n\n"
    )
    return note + done.stdout.strip() + "\n"


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else OUT
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
