"""The source folder platform/ must not shadow the standard library module `platform`."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_from_repo_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_stdlib_platform_not_shadowed():
    result = run_from_repo_root("-c", "import platform; print(platform.system())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"Linux", "Darwin", "Windows"}


def test_platform_folder_is_no_regular_package():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_torch_imports_from_repo_root():
    result = run_from_repo_root("-c", "import torch, platform; print(platform.machine())")
    assert result.returncode == 0, result.stderr


def test_module_entry_point_help():
    result = run_from_repo_root("-m", "bagel.platform", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: bagel" in result.stdout


def test_namespace_maps_source_folders():
    result = run_from_repo_root(
        "-c",
        "import bagel.model, bagel.pipelines, bagel.platform.cli as c; "
        "print(bagel.model.__file__); print(c.__file__)",
    )
    assert result.returncode == 0, result.stderr
    model_file, cli_file = result.stdout.split()
    assert Path(model_file).parent.name == "model"
    assert Path(cli_file).parent.name == "platform"
