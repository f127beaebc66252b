"""The KubeRay manifests in cluster/k8s/ and the Dockerfile that builds their image, checked for what the
project itself controls: the entrypoint is a `chatvec` command line the CLI accepts, every path it names
is put into the image by the Dockerfile from a file in the tree, the versions agree (Ray in the image and
rayVersion, the pins and pyproject.toml's ranges, the image tag and the package version), and each
manifest claims the KubeRay version its fields need. No Docker engine or Kubernetes is needed."""

from __future__ import annotations

import fnmatch
import re
import shlex
import warnings
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

from chatvec.cli.main import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "cluster" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The first KubeRay release that knows each feature the manifests may use.
KUBERAY_SINCE = {
    "RayCronJob": (1, 6, 0),
    "spec.timeZone": (1, 7, 0),
    "backoffLimit": (1, 2, 0),
    "rayClusterSpec.authOptions": (1, 5, 1),
}


# -- reading the files ---------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one document expected"
    return docs[0]


def job_spec(manifest: dict) -> dict:
    """The RayJob spec: the manifest's own, or the RayCronJob's template."""
    return manifest["spec"]["jobTemplate"] if manifest["kind"] == "RayCronJob" else manifest["spec"]


def containers(manifest: dict) -> list[dict]:
    cluster = job_spec(manifest)["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


class Dockerfile:
    """The instructions that matter here: ARG defaults, FROM, WORKDIR, COPY and RUN."""

    def __init__(self, path: Path) -> None:
        text = re.sub(r"\\\n", " ", path.read_text())
        self.args: dict[str, str] = {}
        self.base = ""
        self.copies: list[tuple[list[str], str]] = []  # (sources, absolute destination in the image)
        self.runs: list[str] = []
        workdir = PurePosixPath("/")
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            op, _, rest = line.partition(" ")
            rest = self.expand(rest.strip())
            op = op.upper()
            if op == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                self.args.setdefault(name, value)
            elif op == "FROM":
                self.base = rest
            elif op == "WORKDIR":
                workdir = workdir / rest
            elif op == "COPY":
                words = [w for w in shlex.split(rest) if not w.startswith("--")]
                dest = words[-1]
                absolute = str(workdir / dest) + ("/" if dest.endswith("/") or dest in (".", "./") else "")
                self.copies.append((words[:-1], absolute))
            elif op == "RUN":
                self.runs.append(rest)

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), m.group(0)), text)

    def source_of(self, image_path: str) -> Path | None:
        """The file in the tree that the image has at ``image_path`` (the last COPY wins). As in Docker,
        a folder's contents go into the destination folder, a file into it under its own name."""
        found = None
        for sources, dest in self.copies:
            for src in sources:
                if (ROOT / src).is_dir():
                    prefix = dest.rstrip("/") + "/"
                    if image_path.startswith(prefix):
                        found = ROOT / src / image_path[len(prefix) :]
                elif dest.endswith("/"):
                    if image_path == dest + PurePosixPath(src).name:
                        found = ROOT / src
                elif image_path == dest:
                    found = ROOT / src
        return found

    def pins(self) -> dict[str, str]:
        """name -> version of every `name==version` that a RUN line installs."""
        pins = {}
        for run in self.runs:
            for name, version in re.findall(r"\b([A-Za-z][\w.-]*)(?:\[[\w,-]+\])?==([\w.+-]+)", run):
                pins[name.lower()] = version
        return pins


DOCKERFILE = Dockerfile(ROOT / "Dockerfile")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def check_entrypoint(entrypoint: str) -> tuple[str, dict]:
    """Parse a `chatvec ...` command line the way the CLI would; returns the subcommand and its
    parameters, raising click's error for anything the CLI would refuse."""
    argv = shlex.split(entrypoint)
    assert argv and argv[0] == "chatvec", f"{entrypoint!r} does not run chatvec"
    ctx = cli.make_context("chatvec", argv[1:])
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args; 9 folds it into args
        warnings.simplefilter("ignore", DeprecationWarning)
        rest = [*getattr(ctx, "protected_args", []), *ctx.args]
    name, command, args = cli.resolve_command(ctx, rest)
    if command is None:
        raise click.UsageError(f"no such command {rest[:1]}")
    sub = command.make_context(name, args, parent=ctx)
    return name, sub.params


def declared_kuberay(path: Path) -> tuple[int, ...]:
    m = re.search(r"^# Requires: KubeRay >= (\d+)\.(\d+)\.(\d+)", path.read_text(), re.M)
    assert m, f"{path.name} does not say which KubeRay it requires ('# Requires: KubeRay >= X.Y.Z')"
    return tuple(int(g) for g in m.groups())


def needed_kuberay(manifest: dict) -> tuple[int, ...]:
    used = []
    if manifest["kind"] == "RayCronJob":
        used.append("RayCronJob")
        if "timeZone" in manifest["spec"]:
            used.append("spec.timeZone")
    spec = job_spec(manifest)
    if "backoffLimit" in spec:
        used.append("backoffLimit")
    if "authOptions" in spec["rayClusterSpec"]:
        used.append("rayClusterSpec.authOptions")
    return max((KUBERAY_SINCE[u] for u in used), default=(1, 0, 0))


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# -- the tests -------------------------------------------------------------------------------------------------
def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} >= {"nightly-raycronjob.yaml", "nightly-rayjob.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_entrypoint_is_a_chatvec_command_line_the_cli_accepts(path):
    name, params = check_entrypoint(job_spec(load(path))["entrypoint"])
    assert name == "nightly"
    assert params["sweep_file"] and params["config_path"]


@pytest.mark.parametrize(
    "line, error",
    [
        ("chatvec nightly /app/examples/paper.yaml --confg /app/ray_config.yaml", click.NoSuchOption),
        ("chatvec nightly --config /app/ray_config.yaml", click.MissingParameter),
        ("chatvec nighly /app/examples/paper.yaml", click.UsageError),
        ("chatvec nightly /app/examples/paper.yaml --workers -1", click.BadParameter),
    ],
)
def test_a_command_line_the_cli_refuses_is_caught(line, error):
    with pytest.raises(error):
        check_entrypoint(line)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_path_the_entrypoint_names_is_put_into_the_image_from_the_tree(path):
    from chatvec.core.config import load_config
    from chatvec.runs.sweep import load_sweep

    _name, params = check_entrypoint(job_spec(load(path))["entrypoint"])
    sources = {}
    for key in ("sweep_file", "config_path"):
        image_path = params[key]
        assert image_path.startswith("/"), f"{key} {image_path!r}: use an absolute path in the image"
        source = DOCKERFILE.source_of(image_path)
        assert source is not None, f"the Dockerfile copies nothing to {image_path}"
        assert source.is_file(), f"{image_path} would come from {source.relative_to(ROOT)}, which is not in the tree"
        sources[key] = source
    # the shipped files are ones chatvec accepts
    load_config(str(sources["config_path"]))
    load_sweep(str(sources["sweep_file"]))


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignored = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    sources = [src for srcs, _dest in DOCKERFILE.copies for src in srcs]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the tree"
        name = src.rstrip("/")
        assert not any(fnmatch.fnmatch(name, pat) for pat in ignored), f"COPY {src} is excluded by .dockerignore"
    # the package's own folders all reach the image, so the install finds every package it declares
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copied = {src.rstrip("/") for src in sources}
    for folder in sorted(folders):
        assert folder in copied, f"the Dockerfile does not copy {folder}/"


def test_dockerfile_installs_the_vllm_extra_and_pins_what_must_match():
    from packaging.requirements import Requirement

    install = " ".join(DOCKERFILE.runs)
    assert re.search(r"pip install[^&]*[\"']?\.\[vllm\]", install), "chatvec must be installed with its vllm extra"
    assert "vllm" in PYPROJECT["project"]["optional-dependencies"]
    pins = DOCKERFILE.pins()
    assert {"ray", "vllm", "torch"} <= set(pins), pins
    ranges = {
        Requirement(r).name.lower(): Requirement(r).specifier
        for r in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["vllm"]
    }
    for name in ("ray", "vllm", "torch"):
        assert ranges[name].contains(pins[name]), f"{name}=={pins[name]} is outside pyproject.toml's {ranges[name]}"


def test_ray_is_the_same_in_the_base_image_the_pin_and_every_manifest():
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", DOCKERFILE.base)
    assert m, f"base image {DOCKERFILE.base!r}: expected rayproject/ray:<version>-py3XX-gpu"
    ray_version = m.group(1)
    assert DOCKERFILE.pins()["ray"] == ray_version
    for path in MANIFESTS:
        assert job_spec(load(path))["rayClusterSpec"]["rayVersion"] == ray_version, path.name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_container_runs_the_image_of_this_version(path):
    version = PYPROJECT["project"]["version"]
    images = {c["image"] for c in containers(load(path))}
    assert images == {f"YOUR_REGISTRY/chatvec:{version}"}
    assert f"docker build -t YOUR_REGISTRY/chatvec:{version}" in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_claims_the_kuberay_its_fields_need(path):
    manifest = load(path)
    assert declared_kuberay(path) == needed_kuberay(manifest)


def test_the_kuberay16_variant_is_the_same_job_without_timezone():
    current = load(K8S / "nightly-raycronjob.yaml")
    older = load(K8S / "nightly-raycronjob-kuberay1.6.yaml")
    assert "timeZone" in current["spec"] and "timeZone" not in older["spec"]
    del current["spec"]["timeZone"]
    assert older == current


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_how_to_start_it_and_what_to_alert_on(path):
    text, manifest = path.read_text(), load(path)
    rel = path.relative_to(ROOT).as_posix()
    if "generateName" in manifest["metadata"]:
        assert f"kubectl create -f {rel}" in text and "kubectl apply -f" not in text.split("apiVersion:")[0]
    else:
        assert f"kubectl apply -f {rel}" in text or f"kubectl create -f {rel}" in text
    assert "jobDeploymentStatus" in text and "DeadlineExceeded" in text


def test_the_docs_tell_the_same_story():
    page = (ROOT / "docs" / "sweeps.md").read_text()  # nightly runs on Kubernetes
    assert "kubectl create -f cluster/k8s/nightly-rayjob.yaml" in page
    assert "kubectl apply -f cluster/k8s/nightly-rayjob.yaml" not in page
    for needed in (
        "jobDeploymentStatus",
        "DeadlineExceeded",
        "helm upgrade",
        "KubeRay >= 1.7",
        "nightly-raycronjob-kuberay1.6.yaml",
    ):
        assert needed in page, needed
