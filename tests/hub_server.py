"""A Hugging Face Hub on localhost, for the tests of the online path.

The real Hub cannot be reached from the test machines, and a test must download nothing. Yet `--model org/name`
online is what most users run: `huggingface_hub` asks `HEAD /{repo}/resolve/{revision}/{file}` for a file's commit
and ETag, then `GET`s it into its cache. `FakeHub` answers those two requests from checkpoint folders the tests
build, with the headers and error codes the Hub sends (`X-Repo-Commit`, `ETag`, `X-Error-Code: RepoNotFound`,
`RevisionNotFound`, `EntryNotFound`, `GatedRepo`), so `siglip embed` runs against it through huggingface_hub's own
HTTP code, unpatched: point `HF_ENDPOINT` at `FakeHub.endpoint`. Every request is logged, so a test can say which
files were fetched; `fail` makes a file's downloads fail as flaky networks do.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit hash → {filename: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag → commit hash
    gated: bool = False


@dataclass(frozen=True)
class Request:
    method: str
    repo_id: str
    revision: str
    filename: str


@dataclass(frozen=True)
class Sent:
    repo_id: str
    filename: str
    start: int  # the first byte sent: 0, or where a resumed download went on


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.sent: list[Sent] = []  # files sent to the end
        # filename → how its downloads fail: an HTTP status (500, 503, ...) for every request, or "truncated" for a
        # GET whose body stops halfway (the connection dropped mid-download).
        self.fail: dict[str, int | str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the port: the Hub is then unreachable, as on an offline machine."""
        self._server.shutdown()
        self._server.server_close()

    def publish(self, repo_id: str, checkpoint_dir: str | Path, *, ref: str = "main", gated: bool = False) -> str:
        """Commit the files of `checkpoint_dir` to `repo_id` under branch or tag `ref`; return the commit hash."""
        files = {p.name: p.read_bytes() for p in sorted(Path(checkpoint_dir).iterdir()) if p.is_file()}
        commit = hashlib.sha1(json.dumps(sorted((name, hashlib.sha256(data).hexdigest())
                                                for name, data in files.items())).encode()).hexdigest()  # fmt: skip
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[commit] = files
        repo.refs[ref] = commit
        repo.gated = gated
        return commit

    def downloaded(self, repo_id: str) -> list[str]:
        """The files of `repo_id` whose content was sent to the end (whole, or the rest of a resumed download)."""
        return [sent.filename for sent in self.sent if sent.repo_id == repo_id]

    def asked(self, repo_id: str) -> set[str]:
        """Every filename of `repo_id` the Hub was asked about, found or not."""
        return {r.filename for r in self.requests if r.repo_id == repo_id}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def log_message(self, format: str, *args: object) -> None:  # quiet: the request log is `hub.requests`
            pass

        def _answer(self, *, send_body: bool) -> None:
            # /{org}/{name}/resolve/{revision}/{filename}; the revision is quoted when it holds a slash
            parts = urlsplit(self.path).path.lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "EntryNotFound", "not a file URL")
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), "/".join(parts[4:])
            hub.requests.append(Request(self.command, repo_id, revision, filename))
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found")
            if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
                return self._error(401, "GatedRepo", "Access to this model is restricted")
            commit = repo.refs.get(revision, revision if revision in repo.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id", commit=None)
            data = repo.commits[commit].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", commit=commit)
            failure = hub.fail.get(filename)
            if isinstance(failure, int):
                return self._error(failure, None, "Internal Error", commit=commit)
            etag, size = f'"{hashlib.sha256(data).hexdigest()}"', len(data)
            start = _range_start(self.headers.get("Range")) if send_body else 0  # a resumed download
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if send_body:
                if failure == "truncated":
                    self.wfile.write(data[start : start + (size - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])
                hub.sent.append(Sent(repo_id, filename, start))

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code is not None:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _range_start(header: str | None) -> int:
    """The first byte asked for by `Range: bytes=N-` (how huggingface_hub resumes a download), else 0."""
    if header and header.startswith("bytes=") and header.endswith("-"):
        return int(header[len("bytes=") : -1])
    return 0
