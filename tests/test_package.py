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
            "'fxtucker.checkpoint', 'fxtucker.distributed', 'fxtucker.data', 'fxtucker.cli', 'fxtucker.batches', "
            "'fxtucker.optim') if m in sys.modules]; "
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


def test_submodules_the_readme_uses_as_attributes_resolve_after_a_plain_import(tmp_path):
    # `import fxtucker` then fxtucker.models.get_model(...), as the README writes it, in a fresh process
    code = ("import fxtucker; assert fxtucker.models.get_model('resnet20', 10, 1).conv1.in_channels == 1; "
            "assert callable(fxtucker.data.make_loader) and callable(fxtucker.compress)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_every_public_name_is_importable():
    for name in fxtucker.__all__:
        assert getattr(fxtucker, name) is not None, name


def _package_imports():
    """(module, imported module, names) for every ``from fxtucker... import`` in the package."""
    import ast
    import pathlib

    root = pathlib.Path(fxtucker.__file__).parent
    files = [(f"fxtucker.{f.stem}", f) for f in root.glob("*.py")]
    files += [(f"fxtucker.passes.{f.stem}", f) for f in pathlib.Path(fxtucker.passes.__file__).parent.glob("*.py")]
    for name, path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fxtucker":
                yield name, node.module, [a.name for a in node.names]


def test_imports_run_one_way_and_never_reach_private_names():
    import importlib.util

    bad = []
    for module, source, names in _package_imports():
        if source == "fxtucker":  # only submodules, never the package's own re-exports
            bad += [f"{module}: from fxtucker import {n}" for n in names
                    if importlib.util.find_spec(f"fxtucker.{n}") is None]
        bad += [f"{module}: {source}.{n}" for n in names if n.startswith("_")]
        if source.split(".")[-1].startswith("_") and not module.startswith("fxtucker.passes."):
            bad.append(f"{module}: imports the private module {source}")
        if module.startswith("fxtucker.passes.") and source in (
                "fxtucker.train", "fxtucker.compress", "fxtucker.cli", "fxtucker.data", "fxtucker.checkpoint",
                "fxtucker.distributed", "fxtucker.export", "fxtucker.manifest", "fxtucker.pipeline"):
            bad.append(f"{module}: a pass imports {source}")
    assert not bad, bad
