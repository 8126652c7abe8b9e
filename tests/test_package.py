"""Packaging: passes/ installs as fxtucker.passes, never as a top-level 'passes'."""

import subprocess
import sys
import zipfile

import pytest

import fxtucker


def test_passes_is_a_subpackage_of_fxtucker(tmp_path):
    import fxtucker.passes

    assert fxtucker.passes.decompose_conv is fxtucker.decompose_conv
    assert fxtucker.__version__.count(".") == 2
    # pytest puts the repository root on sys.path; look from elsewhere, as an installed user would
    code = "import importlib.util, fxtucker.passes; assert importlib.util.find_spec('passes') is None"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


@pytest.mark.slow
def test_built_wheel_maps_passes_under_fxtucker(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True,
    )
    (wheel,) = tmp_path.glob("fxtucker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxtucker/passes/decompose_conv.py" in names and "fxtucker/passes/__init__.py" in names
    assert not any(n.startswith("passes/") for n in names)
    # the wheel imports in isolation: fxtucker.passes from the wheel, no top-level passes
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    code = ("import fxtucker.passes, importlib.util, sys; "
            "assert fxtucker.passes.__file__.startswith(sys.argv[1]); assert importlib.util.find_spec('passes') is None")
    # PYTHONPATH comes before site-packages, so the wheel's copy wins over the editable install
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, env=env, cwd=tmp_path)
