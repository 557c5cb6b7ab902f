"""A minimal fake Hugging Face hub on 127.0.0.1 for offline tests (stdlib only).

Serves, read-only, the model repos of a directory laid out like the hub cache (models--org--name/{refs,
snapshots,blobs}) with what huggingface_hub 2.4 asks for; blobs named by a sha256 are LFS files:
* GET /api/models/<repo>[/revision/<rev>][?blobs=true]: ModelInfo JSON (id, sha, siblings with size,
  blobId and, for LFS files, lfs = {size, sha256, pointerSize}).
* GET /api/models/<repo>/tree/<rev>[/<path>][?recursive=true]: the tree listing (list_repo_tree, which
  verify_repo_checksums and snapshot_download call), one page: [{type: "file", oid (git sha1; for an LFS file the
  pointer's), size, path, lfs = {oid (sha256), size, pointerSize} for LFS files}, {type: "directory", oid, size: 0,
  path}], the children of <path> (recursive: all below it).
* HEAD|GET /<repo>/resolve/<rev>/<file>: 200 with ETag (git sha1), X-Repo-Commit, Content-Length; for an LFS
  file a 302 as on the hub: X-Linked-Etag (sha256), X-Linked-Size, X-Repo-Commit and a Location on
  "localhost", another origin than 127.0.0.1 like the hub's CDN, so the client reads the 302's metadata.
* GET /api/models/<repo>/refs: the branches (list_repo_refs), one per file in refs/.
* GET /__cdn__/<repo>/<etag>: the blob; "Range: bytes=N-" answers 206 (how downloads resume).
No X-Xet-* header is sent: the client downloads over plain HTTP even with hf_xet installed. Errors carry
the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound).

Faults: hub.faults.append(Fault("503", match="/resolve/", times=2)) fails the first 2 requests whose path
(with query) contains `match` (and whose method is `method`, if set), then clears. Kinds: "429" (with
Retry-After), any other status ("500", "503"); "reset": headers and half the body, then a TCP RST;
"truncate": full Content-Length, half the body, then a clean close; "stall": nothing for `seconds`, then
a close; "drip": the headers (full Content-Length), then one byte every `seconds` (a transfer that never
stalls long enough for a read timeout but would take days); "redirect": a 302 to the same URL (a redirect loop);
"corrupt": the whole body with one byte flipped (a blob that fails its hash). On a HEAD, reset/truncate close before
sending anything. For refused connections, point the client at closed_endpoint().
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Fault:
    kind: str  # "429", "500", "503" (any status), "reset", "truncate", "stall", "drip", "redirect" or "corrupt"
    match: str = ""  # substring of the request path (with query); "" matches every request
    times: int = 1  # how many matching requests fail before the fault clears
    method: str | None = None  # "GET" or "HEAD"; None: either
    seconds: float = 30.0  # stall: how long to send nothing before closing; drip: the pause between bytes
    retry_after: int = 1  # 429: the Retry-After header


def closed_endpoint() -> str:
    """An endpoint on a port nobody listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:  # the small file git stores in place of an LFS file
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class FakeHub:
    def __init__(self, cache_root: str | Path, port: int = 0):
        self.root, self._port = Path(cache_root), port  # port 0: any free port
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, faulted or not
        self.request_headers: list[dict[str, str]] = []  # their headers (lower-case names), same order
        self._lock, self._closing = threading.Lock(), threading.Event()

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), _Handler)  # daemon threads, one per connection
        self._server.hub, self.port = self, self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._closing.set()  # wake stalled handlers
        self._server.server_close()

    def _take_fault(self, method: str, path: str, headers: dict) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            self.request_headers.append(headers)
            for fault in self.faults:
                if fault.match in path and fault.method in (None, method):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def resolve(self, repo: str, rev: str) -> tuple[str, dict[str, Path]] | str:
        """(commit, {file name: blob path}) of ``repo`` at a branch or commit, else the error code."""
        folder = self.root / ("models--" + repo.replace("/", "--"))
        if not folder.is_dir():
            return "RepoNotFound"
        ref = folder / "refs" / rev
        commit = ref.read_text().strip() if ref.is_file() else rev
        snapshot = folder / "snapshots" / commit
        if "/" in rev or not snapshot.is_dir():
            return "RevisionNotFound"
        return commit, {p.relative_to(snapshot).as_posix(): p.resolve() for p in snapshot.rglob("*") if not p.is_dir()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the hub: a pooled connection can be the one that breaks
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK waits
    timeout = 10  # an idle keep-alive connection (and its thread) ends after 10 s

    def log_message(self, *args) -> None:  # quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # the client went away, or _cut reset the connection
            pass

    def do_GET(self) -> None:
        hub = self.server.hub
        fault = hub._take_fault(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        self.fault = fault.kind if fault else None
        self.drip = fault.seconds if fault else 0.0
        if self.fault == "redirect":  # to the very same URL: a loop
            return self._send(302, {"Location": self.path}, b"")
        if self.fault == "stall":
            hub._closing.wait(fault.seconds)
            self.close_connection = True
            return
        if self.fault and self.fault.isdigit():
            headers = {"Retry-After": str(fault.retry_after)} if self.fault == "429" else {}
            return self._json(int(self.fault), {"error": f"injected {self.fault}"}, headers)
        if self.command == "HEAD" and self.fault in ("reset", "truncate"):
            return self._cut(b"")
        url, path = urlsplit(self.path), unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+(?:/[^/]+)?)/tree/([^/]+)(?:/(.+))?", path):
            return self._tree(m[1], m[2], m[3] or "", parse_qs(url.query).get("recursive", [""])[0].lower() == "true")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path):
            return self._refs(m[1])
        if m := re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path):
            return self._model_info(m[1], m[2] or "main", "blobs" in parse_qs(url.query))
        if m := re.fullmatch(r"/([^/]+(?:/[^/]+)?)/resolve/([^/]+)/(.+)", path):
            return self._resolve(*m.groups())
        if m := re.fullmatch(r"/__cdn__/(.+)/([0-9a-f]{40}|[0-9a-f]{64})", path):
            blob = hub.root / ("models--" + m[1].replace("/", "--")) / "blobs" / m[2]
            if blob.is_file():
                return self._bytes(blob.read_bytes(), {"ETag": f'"{m[2]}"'})
        self._json(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    do_HEAD = do_GET  # _send leaves the body out

    def _refs(self, repo: str) -> None:
        """list_repo_refs: every branch (a file in refs/) with its commit; no tags or converts."""
        folder = self.server.hub.root / ("models--" + repo.replace("/", "--"))
        if not folder.is_dir():
            return self._json(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        branches = [{"name": p.name, "ref": f"refs/heads/{p.name}", "targetCommit": p.read_text().strip()}
                    for p in sorted((folder / "refs").iterdir()) if p.is_file()]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def _model_info(self, repo: str, rev: str, blobs: bool) -> None:
        found = self.server.hub.resolve(repo, rev)
        if isinstance(found, str):
            return self._json(404, {"error": found}, {"X-Error-Code": found})
        commit, files = found
        siblings = []
        for name, blob in sorted(files.items()):
            sib, size = {"rfilename": name}, blob.stat().st_size
            if blobs and len(blob.name) == 64:  # LFS: blobId is the git sha1 of the pointer file
                pointer = _lfs_pointer(blob.name, size)
                lfs = {"size": size, "sha256": blob.name, "pointerSize": len(pointer)}
                sib.update(size=size, blobId=_git_sha1(pointer), lfs=lfs)
            elif blobs:
                sib.update(size=size, blobId=blob.name)
            siblings.append(sib)
        self._json(200, {"_id": repo, "id": repo, "modelId": repo, "sha": commit, "private": False,
                         "disabled": False, "gated": False, "tags": [], "siblings": siblings})

    def _tree(self, repo: str, rev: str, folder: str, recursive: bool) -> None:
        found = self.server.hub.resolve(repo, rev)
        if isinstance(found, str):
            return self._json(404, {"error": found}, {"X-Error-Code": found})
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for name, blob in sorted(found[1].items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):  # its folders (or the first)
                sub = prefix + "/".join(parts[:depth])  # a stand-in oid: the hub's is the git tree's
                entries.setdefault(sub, {"type": "directory", "oid": _git_sha1(sub.encode()), "size": 0, "path": sub})
            if len(parts) > 1 and not recursive:
                continue
            size = blob.stat().st_size
            entry = {"type": "file", "oid": blob.name, "size": size, "path": name}
            if len(blob.name) == 64:  # LFS: oid is the git sha1 of the pointer file
                pointer = _lfs_pointer(blob.name, size)
                entry.update(oid=_git_sha1(pointer), lfs={"oid": blob.name, "size": size, "pointerSize": len(pointer)})
            entries[name] = entry
        self._json(200, list(entries.values()))

    def _resolve(self, repo: str, rev: str, name: str) -> None:
        found = self.server.hub.resolve(repo, rev)
        if isinstance(found, str):
            return self._json(404, {"error": found}, {"X-Error-Code": found})
        commit, files = found
        if name not in files:  # with the commit, as on the hub (the client records the absence)
            return self._json(404, {"error": name}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        etag, size = files[name].name, files[name].stat().st_size
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
        if len(etag) == 64:  # LFS: the ETag is the pointer's, redirect to the "CDN"
            headers.update({"ETag": f'"{_git_sha1(_lfs_pointer(etag, size))}"', "X-Linked-Etag": f'"{etag}"',
                            "X-Linked-Size": str(size),
                            "Location": f"http://localhost:{self.server.hub.port}/__cdn__/{repo}/{etag}"})
            return self._send(302, headers, b"")
        self._bytes(files[name].read_bytes(), headers)

    def _bytes(self, data: bytes, headers: dict) -> None:
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and int(m[1]) < len(data):
            start, end = int(m[1]), int(m[2] or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, headers, data[start:end + 1])
        self._send(200, headers, data)

    def _json(self, status: int, obj: dict | list, headers: dict | None = None) -> None:
        self._send(status, {**(headers or {}), "Content-Type": "application/json"}, json.dumps(obj).encode())

    def _send(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.fault in ("reset", "truncate"):
            return self._cut(body[: len(body) // 2])
        if self.fault == "corrupt" and body:
            body = body[:-1] + bytes([body[-1] ^ 0x01])
        if self.fault == "drip":
            return self._drip(body)
        self.wfile.write(body)

    def _drip(self, body: bytes) -> None:
        """One byte of ``body`` every ``self.drip`` seconds, until the body is sent or the hub closes."""
        hub = self.server.hub
        for i in range(len(body)):
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
            if hub._closing.wait(self.drip):
                break
        self.close_connection = True

    def _cut(self, partial: bytes) -> None:
        """Send ``partial``, then end the connection: cleanly (FIN) for "truncate", with a RST for "reset"."""
        self.wfile.write(partial)
        self.close_connection = True
        if self.fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.wfile.close()
            self.connection.close()  # no shutdown() first: with linger 0, close() sends a RST
            raise ConnectionAbortedError  # unwind to handle()
