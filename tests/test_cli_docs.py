"""docs/cli.md is the Typer app's own reference: regenerated here, it must match the committed page."""

import difflib
import subprocess
import sys

import pytest
from helpers import ROOT


def test_docs_cli_md_matches_the_app(tmp_path):
    fresh = tmp_path / "cli.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cli_docs.py"), str(fresh)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    committed = ROOT / "docs" / "cli.md"
    if not committed.exists():
        pytest.fail("docs/cli.md is missing: run make cli-docs", pytrace=False)
    old, new = committed.read_text().splitlines(), fresh.read_text().splitlines()
    if old != new:
        diff = list(difflib.unified_diff(old, new, "docs/cli.md", "the app now", n=0, lineterm=""))
        shown = "\n".join(diff[:40]) + (f"\n... {len(diff) - 40} more diff lines" if len(diff) > 40 else "")
        pytest.fail(f"docs/cli.md is stale: run make cli-docs (and commit it)\n{shown}", pytrace=False)
