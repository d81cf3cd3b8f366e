"""Runs the real `iris` binary and the mock upstream example as child
processes on port 0, for the SDK compatibility suite.

The binaries come from $IRIS_BIN and $IRIS_MOCK_UPSTREAM_BIN (scripts/sdk-test
sets both), else from target/debug of this checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# Tiny real images both SDK suites use (see tests/sdk/README.md).
IMAGES = REPO / "tests" / "sdk" / "images"
STARTUP_TIMEOUT_S = 15.0


def key_hash(key: str) -> str:
    """The `sha256:` form Iris keeps in its config instead of the key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _binary(env_var: str, default: str) -> str:
    # Absolute: the servers run in a scratch directory.
    path = os.path.abspath(os.environ.get(env_var) or REPO / "target" / "debug" / default)
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"{path} is not built: run scripts/sdk-test, or set ${env_var}"
        )
    return path


def _die_with_parent() -> None:
    """Child-side: on Linux, ask the kernel to stop this child if pytest dies,
    so a killed test run leaves no servers behind."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(
            pr_set_pdeathsig, signal.SIGTERM
        )
    except OSError:
        pass


class Process:
    """A child server whose stderr goes to a file (a pipe nobody drains
    would fill up and block the server once it logs enough)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str]):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, **env},
            cwd=workdir,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """Polls the log until a line matches, failing early if the process exits."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                match = pattern.search(line)
                if match:
                    return match
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log()}"
                )
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start in time:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class MockUpstream:
    """examples/mock_upstream.rs: answers chat completions, steered by
    `x-mock-*` request headers that Iris forwards (`x-mock-echo: 1` answers
    with the request body the upstream received)."""

    def __init__(self, workdir: Path):
        self.process = Process(
            "mock_upstream",
            [_binary("IRIS_MOCK_UPSTREAM_BIN", "examples/mock_upstream"), "127.0.0.1:0"],
            workdir,
            {},
        )
        try:
            match = self.process.wait_for_line(
                re.compile(r"listening on (http://127\.0\.0\.1:\d+/v1)")
            )
        except Exception:
            self.process.stop()
            raise
        self.base_url = match.group(1)
        self.origin = self.base_url.removesuffix("/v1")

    def chat_requests(self) -> int:
        """How many chat completion requests reached the upstream so far."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.origin + "/mock/stats", timeout=5) as response:
            return json.load(response)["chat_requests"]

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Client:
    name: str
    key: str
    models: list[str] | None = None  # None: every model
    # `[clients.budget]`, e.g. {"requests_per_minute": 60}; None: no limits.
    budget: dict[str, float] | None = None
    # A `[[teams]]` name (the team itself goes in `extra_toml`).
    team: str | None = None
    # The key's policy: RFC 3339, and CIDRs; None: never, anywhere.
    expires_at: str | None = None
    allowed_networks: list[str] | None = None


@dataclass
class Model:
    name: str
    upstream_model: str | None = None
    # Per million tokens, e.g. {"input": 2.5, "output": 10.0}; None: free.
    price: dict[str, float] | None = None
    # "chat" (the default) or "embeddings".
    endpoint: str | None = None
    # `cache = true`: answers kept in the response cache (with `[cache]` in
    # the config's `extra_toml`).
    cache: bool = False


# The default setup. `sdk-model` is renamed upstream, so a response's `model`
# (the mock echoes what it received) proves the rename reached the upstream.
DEFAULT_MODELS = [
    Model("sdk-model", upstream_model="upstream-sdk-model"),
    Model("other-model"),
    # Real upstreams name models like this; the SDKs put the id in the path.
    Model("vendor/slashed-model"),
]
DEFAULT_CLIENTS = [
    Client("sdk", "iris-sdk-test-key"),
    Client("restricted", "iris-sdk-restricted-key", models=["other-model"]),
]


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@dataclass
class Iris:
    """A running `iris serve` with a generated config."""

    upstream: MockUpstream
    workdir: Path
    models: list[Model] = field(default_factory=lambda: list(DEFAULT_MODELS))
    clients: list[Client] = field(default_factory=lambda: list(DEFAULT_CLIENTS))
    # TOML added to the mock's `[[upstreams]]` table, e.g. `inline_images = true`.
    upstream_toml: str = ""
    # TOML appended to the config, e.g. `[images]` settings.
    extra_toml: str = ""
    process: Process | None = None
    base_url: str = ""
    origin: str = ""

    def config(self) -> str:
        lines = [
            "[server]",
            'listen = "127.0.0.1:0"',
            "shutdown_grace_ms = 2000",
            "",
            "[store]",
            'kind = "memory"',
            "",
            "[[upstreams]]",
            'name = "mock"',
            f"base_url = {_toml_str(self.upstream.base_url)}",
            'api_key = "upstream-secret-key"',
            "stream_usage = true",
            "timeout_ms = 10000",
            self.upstream_toml,
        ]
        for model in self.models:
            lines += ["", "[[models]]", f"name = {_toml_str(model.name)}", 'upstream = "mock"']
            if model.upstream_model:
                lines.append(f"upstream_model = {_toml_str(model.upstream_model)}")
            if model.endpoint:
                lines.append(f"endpoint = {_toml_str(model.endpoint)}")
            if model.cache:
                lines.append("cache = true")
            if model.price:
                prices = ", ".join(f"{name} = {value!r}" for name, value in model.price.items())
                lines.append(f"price = {{ {prices} }}")
        for client in self.clients:
            lines += [
                "",
                "[[clients]]",
                f"name = {_toml_str(client.name)}",
                f"key = {_toml_str(key_hash(client.key))}",
            ]
            if client.models is not None:
                lines.append("models = [" + ", ".join(map(_toml_str, client.models)) + "]")
            if client.team is not None:
                lines.append(f"team = {_toml_str(client.team)}")
            if client.expires_at is not None:
                lines.append(f"expires_at = {_toml_str(client.expires_at)}")
            if client.allowed_networks is not None:
                lines.append("allowed_networks = [" + ", ".join(map(_toml_str, client.allowed_networks)) + "]")
            if client.budget:
                lines.append("[clients.budget]")
                lines += [f"{name} = {limit!r}" for name, limit in client.budget.items()]
        return "\n".join(lines) + "\n\n" + self.extra_toml + "\n"

    def start(self) -> "Iris":
        config_path = self.workdir / "iris.toml"
        config_path.write_text(self.config())
        # JSON logs: the listen address is a field, with no colour codes around it.
        self.process = Process(
            "iris",
            [_binary("IRIS_BIN", "iris"), "serve", "--config", str(config_path)],
            self.workdir,
            {"IRIS_LOG": "info", "IRIS_LOG_FORMAT": "json"},
        )
        try:
            self.origin = "http://" + self._listen_addr()
            self._wait_ready()
        except Exception:
            self.process.stop()
            raise
        self.base_url = self.origin + "/v1"
        return self

    def _listen_addr(self) -> str:
        assert self.process is not None
        match = self.process.wait_for_line(re.compile(r"iris is serving"))
        return json.loads(match.string)["listen"]

    def _wait_ready(self) -> None:
        assert self.process is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                with opener.open(self.origin + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"iris never became ready:\n{self.process.log()}")
            time.sleep(0.05)

    def key(self, client: str | None = None) -> str:
        """The key of the client named `client`, else of the first one."""
        return next(c.key for c in self.clients if client in (None, c.name))

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="iris-sdk-"))
