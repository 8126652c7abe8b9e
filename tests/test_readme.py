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


def test_readme_pipeline_steps_are_real():
    import torch

    from fxtucker import pipeline

    x = torch.randn(1, 1, 28, 28)
    readme = (ROOT / "README.md").read_text()
    for built in (pipeline.decomposition((x,)), pipeline.pruning((x,), 0.01, relative=True),
                  pipeline.deployment((x,), ranks=0.5, backend="onnxruntime"), pipeline.deployment((x,), ranks=0.5)):
        assert f"\n{built!r}\n" in readme, f"README.md's pipeline block is stale: {built!r}"
