"""The images `make images` builds (testinfra/images.py), read from the OCI archives a node
imports, and run under podman (runc) confined as the chart's securityContext confines a pod:
numeric user 65532, read-only root filesystem, all capabilities dropped, no new privileges,
the default seccomp profile."""

from __future__ import annotations

import json
import re
import signal
import tomllib
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest

from testinfra import images
from testinfra.images import Confinement, Image
from testinfra.procs import MissingPrerequisite
from tools import chart

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)")
PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", re.DOTALL)
# Certificates this machine added to its CA bundle (update-ca-certificates' local folder).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
DIST_INFO = re.compile(r"^opt/venv/lib/python3\.\d+/site-packages/([^/]+)-([^/-]+)\.dist-info/")
# What `python -m venv` puts in every venv; not a dependency.
VENV_TOOLS = {"pip", "setuptools"}
EXPORTER, OPERATOR = images.product_images()
# The sidecar's and the operator's securityContext in the chart (Confinement's defaults).
CHART_CONFINEMENT = Confinement()
PRODUCTS = {
    EXPORTER: ("exporter", "requirements/exporter.txt"),
    OPERATOR: ("operator", "requirements/operator.txt"),
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def pins(requirements: Path) -> dict[str, str]:
    found = {}
    for line in requirements.read_text().splitlines():
        if match := PIN.match(line.strip()):
            found[canonical(match[1])] = match[2]
    return found


def built(image: Image) -> Image:
    try:
        images.require_archive(image)
    except images.ImageError as error:
        pytest.fail(str(error), pytrace=False)
    return image


def run(
    image: Image,
    args: list[str],
    confinement: Confinement = CHART_CONFINEMENT,
    entrypoint: str | None = None,
) -> tuple[int, str, str]:
    try:
        result = images.run_container(built(image), args, confinement, entrypoint=entrypoint)
    except (images.ImageError, MissingPrerequisite) as error:
        pytest.fail(str(error), pytrace=False)
    return result.returncode, result.stdout, result.stderr


@cache
def contents(image: Image) -> dict[str, bytes]:
    """Every regular file of the image, as the archive's layers hold it."""
    return dict(images.archive_files(built(image)))


# --- what the archives hold ---------------------------------------------------------------------


@pytest.mark.parametrize("image", PRODUCTS, ids=lambda image: image.name)
def test_dockerfile_installs_the_pins_the_tests_ran_with(image: Image) -> None:
    requirements = PRODUCTS[image][1]
    text = image.dockerfile.read_text()
    assert f"-r /src/{requirements}" in text and "-c /src/requirements/constraints.txt" in text
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.MULTILINE), "users' base"
    pinned = pins(REPO / requirements)
    assert pinned, requirements
    constraints = pins(REPO / "requirements/constraints.txt")
    for name, pinned_version in pinned.items():
        assert version(name) == pinned_version, f"{name}: tests ran {version(name)}"
        assert constraints[name] == pinned_version, name


@pytest.mark.parametrize("image", PRODUCTS, ids=lambda image: image.name)
def test_image_holds_exactly_the_pinned_distributions(image: Image) -> None:
    folder, requirements = PRODUCTS[image]
    installed = {
        canonical(match[1]): match[2]
        for path in contents(image)
        if (match := DIST_INFO.match(path))
    }
    project = tomllib.loads((REPO / folder / "pyproject.toml").read_text())["project"]
    assert installed.pop(canonical(project["name"])) == project["version"]
    constraints = pins(REPO / "requirements/constraints.txt")
    dependencies = {name: v for name, v in installed.items() if name not in VENV_TOOLS}
    # Every direct pin, and nothing the constraints do not pin at that version.
    assert pins(REPO / requirements).items() <= dependencies.items()
    assert {name: constraints.get(name) for name in dependencies} == dependencies


@pytest.mark.parametrize(
    ("image", "entrypoint", "ports"),
    [
        (EXPORTER, ["prosody-exporter"], {"9755/tcp"}),
        (OPERATOR, ["prosody-operator"], {"9443/tcp", "8080/tcp"}),
    ],
    ids=lambda value: value.name if isinstance(value, Image) else None,
)
def test_image_config_is_what_the_chart_relies_on(
    image: Image, entrypoint: list[str], ports: set[str]
) -> None:
    """The chart runs these with runAsNonRoot (verifiable only with a numeric USER) and the
    image's own entrypoint (it sets only env); EXPOSE documents the default ports."""
    config = images.archive_config(built(image))["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == entrypoint
    assert set(config["ExposedPorts"]) == ports
    assert not any(variable.startswith(("PIP_CERT=", "SSL_CERT")) for variable in config["Env"])


def test_archives_carry_the_images_a_default_helm_install_runs() -> None:
    """A node imports the archives under the names they carry: those the chart, rendered by helm
    with its default values, gives the operator's container and the sidecar it injects."""
    try:
        objects = chart.render_objects("prosody-operator", "prosody-operator")
    except MissingPrerequisite as error:
        pytest.fail(str(error), pytrace=False)
    deployment = next(item for item in objects if item["kind"] == "Deployment")
    operator = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in operator["env"]}
    assert images.archive_references(built(OPERATOR)) == [operator["image"]]
    assert images.archive_references(built(EXPORTER)) == [env["PROSODY_OPERATOR_EXPORTER_IMAGE"]]


@pytest.mark.parametrize("image", PRODUCTS, ids=lambda image: image.name)
def test_no_copy_of_the_build_hosts_ca_bundle_inside(image: Image) -> None:
    """pip in the build trusted the host's CA bundle (a build secret); no layer may keep it: not
    the bundle, not one of the certificates this machine added, not the secret's mount point.
    (On a machine that added none, only the first and last checks have something to find.)"""
    host_bundle = images.HOST_CA_BUNDLE.read_bytes() if images.HOST_CA_BUNDLE.exists() else None
    local_certificates = [
        body.encode()
        for path in sorted(LOCAL_CA_DIR.rglob("*.crt"))
        for body in PEM.findall(path.read_text())
    ]
    leaked = [
        path
        for path, content in contents(image).items()
        if content == host_bundle
        or path.startswith("run/secrets/")
        or any(certificate in content for certificate in local_certificates)
    ]
    assert not leaked


# --- the images run, confined -------------------------------------------------------------------

# Run inside a container (its python3) instead of the entrypoint: starts the image's command,
# waits for it to answer on `probe` (an http:// URL, or xmpp:PORT: Prosody's stream header, which
# it sends only once its event loop runs, signal handlers set), tries to write to each of
# `paths`, stops it with SIGTERM and prints what happened as JSON.
PROBE = r"""
import json, os, signal, socket, subprocess, sys, time, urllib.error, urllib.request
command, probe, paths = json.loads(sys.argv[1])
HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams'>")
server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
answer, deadline = None, time.monotonic() + 60
while answer is None and server.poll() is None and time.monotonic() < deadline:
    try:
        if probe.startswith("xmpp:"):
            with socket.create_connection(("127.0.0.1", int(probe[5:])), timeout=2) as client:
                client.sendall(HEADER.encode())
                answer = client.recv(4096).decode(errors="replace")
        else:
            answer = urllib.request.urlopen(probe, timeout=2).status
    except urllib.error.HTTPError as error:
        answer = error.code
    except OSError:
        time.sleep(0.2)
writable = {}
for path in paths:
    try:
        with open(os.path.join(path, ".probe"), "w"):
            pass
        writable[path] = True
    except OSError:
        writable[path] = False
server.send_signal(signal.SIGTERM)
try:
    output = server.communicate(timeout=20)[0]
except subprocess.TimeoutExpired:
    server.kill()
    output = server.communicate()[0]
print(json.dumps({"uid": os.getuid(), "answer": answer, "writable": writable,
                  "exit": server.returncode, "output": output[-3000:]}))
"""


def probe(
    image: Image, command: list[str], target: str, paths: list[str], confinement: Confinement
) -> dict[str, object]:
    arguments = ["-c", PROBE, json.dumps([command, target, paths])]
    code, out, err = run(image, arguments, confinement, entrypoint="python3")
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def assert_one_line(stderr: str, naming: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and naming in lines[0], stderr


def test_exporter_help_runs_confined() -> None:
    code, out, err = run(EXPORTER, ["--help"])
    assert code == 0, err
    assert "usage: prosody-exporter" in out and "--allow-cidrs" in out


def test_exporter_invalid_setting_exits_2_with_one_line() -> None:
    confinement = Confinement(env=(("PROSODY_EXPORTER_INTERVAL", "soon"),))
    code, _, err = run(EXPORTER, [], confinement)
    assert code == 2
    assert_one_line(err, "PROSODY_EXPORTER_INTERVAL")


def test_exporter_serves_on_a_read_only_root_as_65532() -> None:
    """No Prosody behind it: /healthz answers 200 (the loop runs), writes nowhere, and the
    exporter stops cleanly on SIGTERM."""
    command = ["prosody-exporter", "--upstream-url", "http://127.0.0.1:9/metrics"]
    result = probe(
        EXPORTER,
        command,
        "http://127.0.0.1:9755/healthz",
        ["/", "/tmp", "/opt/venv"],
        Confinement(),
    )
    assert result["uid"] == 65532
    assert result["answer"] == 200, result["output"]
    assert result["writable"] == {"/": False, "/tmp": False, "/opt/venv": False}
    # uvicorn shuts down, then re-raises the signal it caught: exit status -SIGTERM.
    assert "Application shutdown complete" in str(result["output"])
    assert result["exit"] in (0, -signal.SIGTERM), result["output"]


def test_operator_without_a_cluster_exits_1_with_one_line() -> None:
    """No service account token and no kubeconfig: one line saying so, not kopf retrying its
    startup handler forever."""
    code, _, err = run(OPERATOR, [])
    assert code == 1, err
    assert_one_line(err, "no Kubernetes API")


def test_operator_invalid_setting_exits_2_with_one_line() -> None:
    confinement = Confinement(env=(("PROSODY_OPERATOR_MANUAL_INTERVAL", "0"),))
    code, _, err = run(OPERATOR, [], confinement)
    assert code == 2
    assert_one_line(err, "PROSODY_OPERATOR_MANUAL_INTERVAL")


@pytest.mark.parametrize(
    ("image", "series"),
    [(images.PROSODY_0_12, "0.12"), (images.PROSODY_13, "13.0")],
    ids=["0.12", "13"],
)
def test_prosody_image_runs_its_version_as_101(image: Image, series: str) -> None:
    """Laid out like the official image; the pods run it as its own user (runAsUser 101) with
    a writable data directory, without capabilities."""
    config = images.archive_config(built(image))["config"]
    assert config["User"] == "101:101"
    assert config["Cmd"] == ["prosody", "-F"]
    files = contents(image)
    assert "etc/prosody/prosody.cfg.lua" in files
    assert 'Include "conf.d/*.cfg.lua"' in files["etc/prosody/prosody.cfg.lua"].decode()
    confinement = Confinement(user=None, read_only=False)
    result = probe(image, config["Cmd"], "xmpp:5222", ["/var/lib/prosody", "/etc"], confinement)
    assert result["uid"] == 101
    assert "<stream:stream" in str(result["answer"]), result["output"]
    assert f"Prosody version {series}." in str(result["output"])
    assert result["writable"] == {"/var/lib/prosody": True, "/etc": False}
    assert "Shutdown complete" in str(result["output"])
    assert result["exit"] == 0, result["output"]
