"""A local stand-in for the few Hugging Face Hub endpoints that `sd2 publish` calls.

Read from huggingface_hub 1.33's source (hf_api.py, _commit_api.py), with hf_xet disabled:
- ``create_repo``    POST   /api/repos/create                  -> {"url"}; 409 when it exists
- ``upload_folder``  POST   /api/validate-yaml                 (README.md front matter)
                     POST   /api/models/{repo}/preupload/{rev} -> every file "regular" (inline, no LFS/xet)
                     POST   /api/models/{repo}/commit/{rev}    ndjson: header + base64 "file" entries
- ``delete_repo``    DELETE /api/repos/delete
Bound to 127.0.0.1 on an ephemeral port; ``with HubStub(...) as hub:`` starts and stops it.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    def __init__(self, token: str, deny_create: bool = False, fail_commit: int | None = None):
        self.token = token
        self.deny_create = deny_create        # answer create with 403 (no write access to the namespace)
        self.fail_commit = fail_commit        # answer commit with this HTTP status
        self.repos: dict[str, dict] = {}      # repo id -> {"private": bool, "files": {path: bytes}, "commits": int}
        self.calls: list[tuple[str, str]] = []
        self.headers_seen: list[dict] = []
        self._server = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubStub":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                stub._handle(self, "POST")

            def do_DELETE(self):
                stub._handle(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- request handling ---------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path.split("?")[0]
        self.calls.append((method, path))
        self.headers_seen.append(dict(h.headers))
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(h, 401, {"error": "Invalid credentials in Authorization header"})
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if self.deny_create:
                return self._send(h, 403, {"error": f"You don't have the rights to create a model under the namespace \"{data.get('organization')}\""})
            if repo in self.repos:
                return self._send(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
            self.repos[repo] = {"private": data.get("visibility") == "private" or bool(data.get("private")),
                                "files": {}, "commits": 0}
            return self._send(h, 200, {"url": f"{self.url}/{repo}", "name": repo})
        if method == "DELETE" and path == "/api/repos/delete":
            data = json.loads(body)
            repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if self.repos.pop(repo, None) is None:
                return self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return self._send(h, 200, {})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(h, 200, {"errors": [], "warnings": []})
        parts = path.strip("/").split("/")  # api, models, org, name, preupload|commit, rev
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo = f"{parts[2]}/{parts[3]}"
            if repo not in self.repos:
                return self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._send(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                     for f in files], "commitOid": "0" * 40})
            if parts[4] == "commit":
                if self.fail_commit:
                    return self._send(h, self.fail_commit, {"error": "simulated commit failure"})
                staged = {}
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] != "header":
                        return self._send(h, 400, {"error": f"the stub does not take {item['key']} entries"})
                self.repos[repo]["files"].update(staged)  # one commit lands whole
                self.repos[repo]["commits"] += 1
                oid = f"{self.repos[repo]['commits']:040x}"
                return self._send(h, 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid,
                                           "pullRequestUrl": None})
        return self._send(h, 404, {"error": f"the stub does not serve {method} {path}"})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
