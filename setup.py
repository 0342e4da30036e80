"""Map the top-level source folders onto the `bagel` namespace.

The folders model/, platform/ and pipelines/ become bagel.model,
bagel.platform and bagel.pipelines, with every sub-folder that holds Python
files as a sub-package. platform/ has no __init__.py on purpose: a regular
package there would shadow the standard library module `platform` for anything
started from the repository root (torch imports it).
"""

from pathlib import Path

from setuptools import setup

SOURCE_FOLDERS = {"model": "bagel.model", "platform": "bagel.platform", "pipelines": "bagel.pipelines"}
PACKAGE_DATA = ["*.yaml", "*.json", "*.txt", "*.md", "*.tpl"]


def find_packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder, package in SOURCE_FOLDERS.items():
        for path in [Path(folder), *sorted(p for p in Path(folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in path.parts:
                continue
            if not any(path.glob("*.py")) and not any(path.glob("*.yaml")):
                continue
            relative = path.relative_to(folder).parts
            name = ".".join([package, *relative])
            packages.append(name)
            package_dir[name] = path.as_posix()
    return packages, package_dir


packages, package_dir = find_packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={name: PACKAGE_DATA for name in packages},
)
