"""A stand-in for the Hugging Face hub on localhost: the endpoints huggingface_hub 2.x calls to plan and download a
model (model info with file sizes, HEAD and ranged GET of a file), gated and private repos, and faults on demand (a
connection dropped after N bytes, a slow transfer). Point HF_ENDPOINT at ``url``; it counts the bytes it serves."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth", ".onnx")
PIECE = 64 << 10


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    private: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens granted access (a gated licence accepted, a private read)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        return digest.hexdigest()

    def etag(self, name: str) -> str:
        """The LFS sha256 for weights, the git blob id for the rest: what the hub sends and the cache names blobs."""
        data = self.files[name]
        if name.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry = {"rfilename": name, "size": len(data),
                 "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"size": len(data), "sha256": self.etag(name), "pointerSize": 134}
        return entry


class HubServer:
    """Serves the repos added with ``add_model`` until the ``with`` block ends."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.served: collections.Counter[tuple[str, str]] = collections.Counter()  # body bytes per (repo, file)
        self.ranges: list[tuple[str, str, int]] = []  # (repo, file, first byte) of each GET of a file
        self.served_from: collections.Counter[tuple[str, str, int]] = collections.Counter()  # per (repo, file, first)
        self.drop_after: dict[tuple[str, str], int] = {}  # the next GET of that file dies after this many bytes
        self.fail: dict[tuple[str, str], int] = {}  # every GET of that file answers this status
        self.bytes_per_s: float | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add_model(self, hub_id: str, directory: Path | None = None, files: dict[str, bytes] | None = None,
                  gated: bool = False, private: bool = False, tokens: tuple[str, ...] = ()) -> Repo:
        contents = dict(files or {})
        if directory is not None:
            contents |= {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        self.repos[hub_id] = Repo(contents, gated, private, set(tokens))
        return self.repos[hub_id]

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def count(self, hub_id: str, name: str, start: int, size: int) -> None:
        with self._lock:
            self.served[(hub_id, name)] += size
            self.served_from[(hub_id, name, start)] += size


MODEL_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
RANGE = re.compile(r"^bytes=(\d+)-$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if match := MODEL_API.match(path):
            self._model_info(match["repo"], match["rev"] or "main")
        elif match := RESOLVE.match(path):
            self._file(match["repo"], match["rev"], match["file"], body)
        else:
            self._error(404, "NotFound", "no such endpoint")

    def _token(self) -> str | None:
        auth = self.headers.get("authorization") or ""
        return auth.removeprefix("Bearer ").strip() or None

    def _repo(self, hub_id: str) -> Repo | None:
        repo = self.server_hub.repos.get(hub_id)
        if repo is None or (repo.private and self._token() not in repo.tokens):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _model_info(self, hub_id: str, revision: str) -> None:
        repo = self._repo(hub_id)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return
        info = {"_id": hub_id, "id": hub_id, "modelId": hub_id, "sha": repo.commit, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "library_name": "transformers", "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z", "siblings": [repo.sibling(n) for n in sorted(repo.files)]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

    def _file(self, hub_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(hub_id)
        if repo is None:
            return
        if repo.gated and self._token() not in repo.tokens:
            status = 403 if self._token() else 401
            self._error(status, "GatedRepo", f"Access to model {hub_id} is restricted")
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return
        if name not in repo.files:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit})
            return
        data, etag = repo.files[name], repo.etag(name)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS_SUFFIXES):
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        start = 0
        if body and (match := RANGE.match(self.headers.get("Range") or "")):
            start = int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if body and (hub_id, name) in self.server_hub.fail:
            self._error(self.server_hub.fail[(hub_id, name)], "", "failing on purpose")
            return
        if body:
            self.server_hub.ranges.append((hub_id, name, start))
        self._send(206 if start else 200, data[start:], headers, body, (hub_id, name, start))

    def _error(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                    **(extra or {})}, body=self.command != "HEAD")

    def _send(self, status: int, data: bytes, headers: dict, body: bool, counted: tuple[str, str, int] | None = None):
        hub = self.server_hub
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        drop = hub.drop_after.pop(counted[:2], None) if counted else None
        sent = 0
        while sent < len(data):
            piece = data[sent:sent + PIECE]
            if drop is not None and sent + len(piece) > drop:
                piece = piece[:drop - sent]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                break
            sent += len(piece)
            if counted:
                hub.count(*counted, len(piece))
            if drop is not None and sent >= drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if hub.bytes_per_s:
                time.sleep(len(piece) / hub.bytes_per_s)
