"""The sharded aggregator's deployment files (issue 15), checked like deploy/'s others.

deploy/kubernetes-sharded/ (a StatefulSet of shards, each with its own volume) and
deploy/compose-sharded.yaml go through the same validators as tests/unit/test_deploy.py
(the Kubernetes API schemas in strict mode, `kubectl kustomize`, the compose-spec schema,
`docker compose config`), every `fedgrad` argument is an option of its subcommand, and
the shard count, the peers, and the nodes' address agree between the files.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.test_deploy import (
    K8S_VERSIONS,
    _argv_problems,
    _compose_binary,
    _flag,
    _health_argv,
    _required,
    _run,
    _subcommand_parsers,
    _yaml_docs,
    render_kustomization,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes-sharded"
COMPOSE = ROOT / "deploy" / "compose-sharded.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, home: Path) -> list[dict[str, Any]]:
    return render_kustomization(K8S, tmp_path_factory.mktemp("kustomize"), home)


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _args(statefulset: dict[str, Any]) -> list[str]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_sharded_manifests_match_the_schema(path: Path, version: str) -> None:
    for doc in _yaml_docs(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_sharded_kustomize_output_matches_the_schema(
    rendered: list[dict[str, Any]], version: str
) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def test_the_shards_statefulset_agrees_with_its_peers_and_the_nodes(
    rendered: list[dict[str, Any]],
) -> None:
    shards = _named(rendered, "StatefulSet", "fedgrad-shard")
    service = _named(rendered, "Service", shards["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    args = _args(shards)
    count = int(_required(args, "--shard").removeprefix("ordinal/"))
    assert _required(args, "--shard") == f"ordinal/{count}"
    assert shards["spec"]["replicas"] == count
    namespace = shards["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    peers = _required(args, "--peers").split(",")
    assert peers == [
        f"fedgrad-shard-{i}.{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
        for i in range(count)
    ]
    # Each shard keeps its checkpoints on its own volume; TLS to the others is configured.
    claims = shards["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["state"]
    assert _required(args, "--checkpoint-dir").startswith("/var/lib/fedgrad")
    for flag in ("--peer-ca", "--peer-cert", "--peer-key", "--tls-client-ca"):
        assert _flag(args, flag), flag
    nodes = _named(rendered, "StatefulSet", "fedgrad-node")
    node_args = _args(nodes)
    assert _required(node_args, "--aggregator") == peers[0]
    assert int(_required(args, "--nodes")) == nodes["spec"]["replicas"]


def test_sharded_compose_matches_the_compose_spec(home: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)
    result = _run([_compose_binary(), "-f", str(COMPOSE), "config", "--quiet"], home)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"


def test_sharded_compose_shards_agree() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    shards = sorted(n for n in services if n.startswith("aggregator-"))
    peers = [f"{name}:50051" for name in shards]
    for i, name in enumerate(shards):
        args = services[name]["command"]
        assert _required(args, "--shard") == f"{i}/{len(shards)}"
        assert _required(args, "--peers") == ",".join(peers)
    assert sum(1 for n in shards if _flag(services[n]["command"], "--save")) == 1
    nodes = [n for n in services if not n.startswith("aggregator-")]
    assert {_required(services[n]["command"], "--aggregator") for n in nodes} == {peers[0]}


def test_every_sharded_argument_is_a_real_option(rendered: list[dict[str, Any]]) -> None:
    parsers = _subcommand_parsers()
    lines: list[tuple[str, list[str]]] = []
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        lines.append((f"compose {name}", service["command"]))
        test = service.get("healthcheck", {}).get("test")
        if test:
            lines.append((f"compose {name} healthcheck", _health_argv(test)))
    for name in ("fedgrad-shard", "fedgrad-node"):
        lines.append((name, _args(_named(rendered, "StatefulSet", name))))
    problems = [
        f"{where}: {p}" for where, argv in lines for p in _argv_problems(parsers[argv[0]], argv[1:])
    ]
    assert not problems, "\n".join(problems)
