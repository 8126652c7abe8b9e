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


def test_import_passes_loads_neither_the_training_loop_nor_the_flow(tmp_path):
    code = ("import fxtucker.passes, sys; loaded = [m for m in ('fxtucker.train', 'fxtucker.compress', "
            "'fxtucker.checkpoint', 'fxtucker.distributed', 'fxtucker.data', 'fxtucker.cli') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_lazy_public_names_resolve_and_keep_functions_over_submodules(tmp_path):
    # Importing the submodule first must not shadow the function of the same name (the import
    # system binds a loaded submodule on its package).
    code = ("import fxtucker.compress, fxtucker.export, fxtucker.report, fxtucker; "
            "assert callable(fxtucker.compress) and fxtucker.compress.__name__ == 'compress'; "
            "assert fxtucker.export.__name__ == 'export' and fxtucker.report.__name__ == 'report'; "
            "from fxtucker import CompressConfig, optimize_for_inference, measure_latency, load; "
            "assert {'compress', 'CompressConfig', 'optimize_for_inference'} <= set(dir(fxtucker))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        fxtucker.nonexistent  # noqa: B018


def test_every_public_name_is_importable():
    for name in fxtucker.__all__:
        assert getattr(fxtucker, name) is not None, name
