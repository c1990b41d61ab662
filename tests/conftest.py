"""Shared fixtures: a loopback HTTP server like the archive hosts, a workflow copy."""

from __future__ import annotations

import collections
import http.server
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ArchiveServer:
    """Serves files from ``root`` on 127.0.0.1, with misbehaving routes for tests.

    * ``/files/<name>``: the file, with a correct Content-Length;
    * ``/cut/<name>``: announces the full length, sends half, closes (a cut transfer);
    * ``/flaky/<k>/<name>``: HTTP 503 for the first ``k`` requests, then the file;
    * anything else, or a missing file: HTTP 404.
    """

    root: Path
    port: int = 0
    hits: collections.Counter = field(default_factory=collections.Counter)

    def url(self, name: str, route: str = "files") -> str:
        return f"http://127.0.0.1:{self.port}/{route}/{name}"


def _handler(server: ArchiveServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 -- the http.server API
            server.hits[self.path] += 1
            match = re.fullmatch(r"/(files|cut|flaky/(\d+))/([^/]+)", self.path)
            path = server.root / match.group(3) if match else None
            if path is None or not path.is_file():
                self.send_error(404, "Not Found")
                return
            payload = path.read_bytes()
            if match.group(2) and server.hits[self.path] <= int(match.group(2)):
                self.send_error(503, "Service Unavailable")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if match.group(1) == "cut":
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                self.wfile.write(payload)

    return Handler


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where torch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[ArchiveServer]:
    """A started :class:`ArchiveServer` serving ``tmp_path / "served"``."""
    root = tmp_path / "served"
    root.mkdir()
    state = ArchiveServer(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def prepared_digits(root: Path, n: int) -> Path:
    """The first ``n`` digits as a prepared custom dataset (uint8, 64:8:20 split)."""
    from sklearn.datasets import load_digits

    from neural_kernels.data.prepared import prepare_dataset

    bunch = load_digits()
    images = np.rint(bunch.images[:n] * (255 / 16)).astype(np.uint8)
    np.savez(root / "digits.npz", images=images, labels=bunch.target[:n])
    prepare_dataset("custom", root / "digits", npz=root / "digits.npz")
    return root / "digits"


def copy_workflow(root: Path) -> Path:
    """A copy of the workflow (Snakefile, workflow/, config/, report inputs) in ``root``."""
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    shutil.copytree(REPO / "workflow", root / "workflow")
    shutil.copytree(REPO / "config", root / "config")
    shutil.copytree(REPO / "report/templates", root / "report/templates")
    shutil.copy(REPO / "report/thesis.yaml", root / "report/thesis.yaml")
    return root


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow to run snakemake in, isolated from the repository."""
    return copy_workflow(tmp_path)
