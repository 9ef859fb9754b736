"""A stand-in of a Hugging Face-style hub on loopback, for ``habla publish`` tests: model repositories kept in
memory, written by commits, read back with ``huggingface_hub``'s own client.

What it serves (the hub's HTTP API as ``huggingface_hub`` 2.4 calls it; read, not copied):

* ``POST /api/validate-yaml`` ``{"content"}``: a README's metadata; 400 unless its ``license`` is a hub licence id.
* ``POST /api/repos/create`` ``{"name", "organization"?, "type"?, "private"?}``: a new repository; ``409`` when it
  exists (``create_repo(exist_ok=True)`` reads that as success).
* ``POST /api/models/<repo>/preupload/<rev>`` ``{"files": [{"path", "size", "sample"}]}``: every file is
  ``"uploadMode": "regular"`` (its content travels in the commit; no LFS or Xet storage here).
* ``POST /api/models/<repo>/commit/<rev>``: NDJSON, a ``header`` line (``summary``) then ``file`` lines
  (``path``, ``content`` in base64); answered ``{"commitUrl", "commitOid"}``.
* ``GET /api/models/<repo>[/revision/<rev>]``: the model's info (``id``, ``sha``, ``siblings``, ``private``);
  ``GET /api/models/<repo>/tree/<rev>``: its files; ``HEAD``/``GET /<repo>/resolve/<rev>/<path>``: a file, with
  the ``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers ``hf_hub_download`` checks.

Writes need ``Authorization: Bearer <TOKEN>`` (401 otherwise); ``commits`` records every commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

TOKEN = "hf_standin_token_not_a_secret"
# Licence ids the hub's metadata validation accepts (a few of its list: huggingface.co/docs/hub/repositories-licenses).
LICENSES = ("apache-2.0", "mit", "cc0-1.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "other")


class HubStandin:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private", "files": {path: bytes}, "sha"}
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                standin._get(self, head=True)

            def do_GET(self):
                standin._get(self, head=False)

            def do_POST(self):
                standin._post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------ answers

    @staticmethod
    def _send(handler, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head=False):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json" if isinstance(body, (dict, list)) else "text/plain")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(data)

    def _authorized(self, handler) -> bool:
        if handler.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._send(handler, 401, {"error": "Invalid credentials in Authorization header"})
        return False

    @staticmethod
    def _repo_and_rest(parts: list[str]) -> tuple[str, list[str]]:
        return "/".join(parts[:2]), parts[2:]

    def _post(self, handler) -> None:
        path = unquote(urlsplit(handler.path).path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        if not self._authorized(handler):
            return
        if path == "/api/validate-yaml":  # the card's metadata, checked before a commit that holds a README.md
            front = json.loads(body).get("content", "")
            try:
                meta = yaml.safe_load(front.split("---")[1]) if front.startswith("---") else {}
            except (yaml.YAMLError, IndexError):
                meta = None
            if not isinstance(meta, dict) or meta.get("license") not in LICENSES:
                error = f"license {meta.get('license') if isinstance(meta, dict) else None!r} is not a hub licence id"
                return self._send(handler, 400, {"errors": [{"message": error}]})
            return self._send(handler, 200, {"warnings": []})
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = "/".join(filter(None, [request.get("organization"), request["name"]]))
            with self.lock:
                if repo in self.repos:
                    return self._send(
                        handler, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
                    )
                self.repos[repo] = {"private": bool(request.get("private")), "files": {}, "sha": "0" * 40}
            return self._send(handler, 200, {"url": f"{self.url}/{repo}", "name": repo})
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "models"]:
            return self._send(handler, 404, {"error": "not found"})
        repo, rest = self._repo_and_rest(parts[2:])
        if repo not in self.repos:
            return self._send(handler, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if rest[:1] == ["preupload"]:
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._send(handler, 200, {"files": answer})
        if rest[:1] == ["commit"]:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {}
            for line in lines:
                if line["key"] == "file":
                    value = line["value"]
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] not in ("header",):
                    return self._send(handler, 400, {"error": f"unsupported operation {line['key']}"})
            with self.lock:
                state = self.repos[repo]
                state["files"].update(files)
                sha = hashlib.sha1(repr(sorted((k, v) for k, v in state["files"].items())).encode()).hexdigest()
                state["sha"] = sha
                self.commits.append({"repo": repo, "summary": header.get("summary"), "files": sorted(files)})
            return self._send(handler, 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha})
        return self._send(handler, 404, {"error": "not found"})

    def _get(self, handler, head: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo, rest = self._repo_and_rest(parts[2:])
            state = self.repos.get(repo)
            if state is None:
                return self._send(handler, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"},
                                  head)  # fmt: skip
            if rest[:1] == ["tree"]:
                tree = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for p, d in sorted(state["files"].items())]  # fmt: skip
                return self._send(handler, 200, tree, head=head)
            info = {"id": repo, "modelId": repo, "sha": state["sha"], "private": state["private"],
                    "siblings": [{"rfilename": p} for p in sorted(state["files"])]}  # fmt: skip
            return self._send(handler, 200, info, head=head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            state = self.repos.get(repo)
            if state is None or name not in state["files"]:
                code = "RepoNotFound" if state is None else "EntryNotFound"
                return self._send(handler, 404, {"error": "not found"}, {"X-Error-Code": code}, head)
            data = state["files"][name]
            headers = {"X-Repo-Commit": state["sha"], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            return self._send(handler, 200, data, headers, head)
        return self._send(handler, 404, {"error": "not found"}, head=head)
