"""The README shows the quickstart's real output."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_output_is_real():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], check=True,
                         capture_output=True, text=True).stdout.strip()
    readme = (ROOT / "README.md").read_text()
    assert out.splitlines()[0] == "graph():"
    assert out in readme, "README.md's quickstart output is stale: rerun examples/quickstart.py and paste it"
