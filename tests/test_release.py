"""What can be checked here of the release workflow (.github/workflows/release.yaml), which
cannot run here: actionlint accepts it, it pushes the images the chart's default values name,
from the Dockerfiles `make images` builds, and the chart packages with the version it tags."""

from __future__ import annotations

import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from testinfra import controlplane, images
from tools import chart

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "release.yaml"


def chart_metadata() -> dict[str, str]:
    metadata: dict[str, str] = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    return metadata


def test_actionlint_accepts_the_workflows() -> None:
    try:
        actionlint = controlplane.built_binary("actionlint")
    except controlplane.MissingBinary as error:
        pytest.fail(str(error), pytrace=False)
    workflows = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
    assert WORKFLOW in workflows
    result = subprocess.run(
        [str(actionlint), "-no-color", *map(str, workflows)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_pushes_the_images_the_chart_names() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow[True]["push"]["tags"] == ["v*.*.*"]  # YAML 1.1 reads the key `on` as True
    matrix = workflow["jobs"]["images"]["strategy"]["matrix"]["include"]
    pushed = {entry["dockerfile"]: entry["repository"] for entry in matrix}
    chart_references = images.chart_image_references()
    expected = {
        str(image.dockerfile.relative_to(REPO)): chart_references[image.name].rsplit(":", 1)[0]
        for image in images.product_images()
    }
    assert pushed == expected
    build = next(
        step
        for step in workflow["jobs"]["images"]["steps"]
        if "build-push-action" in step.get("uses", "")
    )
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    # The tag is the checked version, which the chart's images default to (appVersion).
    assert build["with"]["tags"] == "${{ matrix.repository }}:${{ needs.version.outputs.version }}"


def test_chart_version_app_version_and_packages_agree() -> None:
    """The workflow refuses a tag unless these agree: keep them agreeing between releases."""
    metadata = chart_metadata()
    versions = {
        tomllib.loads((REPO / folder / "pyproject.toml").read_text())["project"]["version"]
        for folder in ("exporter", "operator")
    }
    assert versions == {metadata["version"], metadata["appVersion"]}


def test_helm_package(tmp_path: Path) -> None:
    """What the workflow pushes as the OCI artifact: `helm package` of the chart."""
    chart.helm("package", str(chart.CHART), "--destination", str(tmp_path))
    metadata = chart_metadata()
    package = tmp_path / f"prosody-operator-{metadata['version']}.tgz"
    assert [path.name for path in tmp_path.iterdir()] == [package.name]
    with tarfile.open(package) as tar:
        names = tar.getnames()
        member = tar.extractfile("prosody-operator/Chart.yaml")
        assert member is not None
        packaged = yaml.safe_load(member.read())
    assert packaged["appVersion"] == metadata["appVersion"]
    for name in ("values.yaml", "values.schema.json", "templates/NOTES.txt", "README.md"):
        assert f"prosody-operator/{name}" in names
