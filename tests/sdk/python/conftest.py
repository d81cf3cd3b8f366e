"""Shared fixtures: one mock upstream and one Iris for the whole session, and
OpenAI clients pointed at that Iris. A test needing another config (budgets,
image settings) starts its own Iris through `start_iris`. `image_host`
serves tests/sdk/images on 127.0.0.2, the address vision tests allow."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from iris_harness import IMAGES, Iris, MockUpstream, new_workdir

# The SDK's HTTP client honours proxy variables; the servers are on loopback.
os.environ["NO_PROXY"] = ",".join(
    filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY")])
)

_started: list[Iris] = []


@pytest.fixture(scope="session")
def workdir() -> Iterator:
    path = new_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mock_upstream(workdir) -> Iterator[MockUpstream]:
    upstream = MockUpstream(workdir)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def start_iris(workdir, mock_upstream) -> Iterator[Callable[..., Iris]]:
    """Starts an Iris against the session's mock upstream; keyword arguments
    are `Iris` fields (models, clients, upstream_toml, extra_toml). Stopped
    at session end."""
    count = 0

    def start(**fields) -> Iris:
        nonlocal count
        count += 1
        instance_dir = workdir / f"iris-{count}"
        instance_dir.mkdir()
        iris = Iris(upstream=mock_upstream, workdir=instance_dir, **fields).start()
        _started.append(iris)
        return iris

    yield start
    for iris in _started:
        iris.stop()
    _started.clear()


@pytest.fixture(scope="session")
def iris(start_iris) -> Iris:
    """Iris with the default models and clients (see iris_harness)."""
    return start_iris()


class ImageHost:
    """A plain HTTP server on 127.0.0.2, port 0, serving the files of
    tests/sdk/images (`url("cat.png")`); records each path it served."""

    def __init__(self, directory: Path):
        host = self
        self.paths: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                host.paths.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest's output clean
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), handler)
        self.origin = "http://127.0.0.2:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.origin}/{name}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost(IMAGES)
    yield host
    host.stop()


@pytest.fixture
def make_client(iris) -> Callable[..., openai.OpenAI]:
    """An OpenAI client for `iris`; no retries unless asked, so an error
    surfaces at once."""

    def make(key: str | None = None, *, target: Iris | None = None, **options) -> openai.OpenAI:
        target = target or iris
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 20)
        return openai.OpenAI(base_url=target.base_url, api_key=key or target.key(), **options)

    return make


@pytest.fixture
def client(make_client) -> openai.OpenAI:
    return make_client()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, show the end of each Iris log: the cause is often there."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for index, iris in enumerate(_started):
            tail = "\n".join(iris.log().splitlines()[-30:])
            report.sections.append((f"iris #{index + 1} log (last lines)", tail))
