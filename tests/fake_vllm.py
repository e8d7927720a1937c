"""A stand-in for ``vllm serve`` in the default suite: an http.server in a thread with the endpoints sd2
uses (/health, /v1/models, /tokenize, /detokenize, /v1/completions on token ids with return_token_ids),
answering with sd2's own HF generator at batch size 1 on a tiny model, so its greedy answers equal
``backend: hf`` at ``batch_size: 1`` token for token. ``die_after=k``: after its k-th answer it drops
every connection and stops listening, as a killed server does; ``errors=k``: its first k completion
requests get HTTP 500 while /health stays fine."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeVllm:
    def __init__(self, model_folder: Path, served_name: str | None = None, tokenizer_folder: Path | None = None,
                 die_after: int | None = None, max_model_len: int = 512, root: str | None = None, errors: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = root or str(model_folder)      # what /v1/models reports as loaded (``root``)
        self.name = served_name or self.folder
        self.tok = AutoTokenizer.from_pretrained(tokenizer_folder or model_folder)
        self.model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
        self.die_after, self.max_model_len = die_after, max_model_len
        self.errors = errors               # the first this many completion requests get HTTP 500, /health stays fine
        self.bodies: list[dict] = []       # every completion request received
        self.answered = 0
        self.dead = False
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def kill(self) -> None:
        self.dead = True
        threading.Thread(target=lambda: (self.httpd.shutdown(), self.httpd.server_close()), daemon=True).start()

    def complete(self, body: dict) -> dict | None:
        from sd2.stages.distill.generate import HFGenerator, Sampling

        with self.lock:
            if self.dead:
                return None
            self.bodies.append(body)
            stops = tuple(body.get("stop_token_ids") or ())
            s = Sampling(float(body["temperature"]), top_p=float(body["top_p"]), max_new_tokens=int(body["max_tokens"]),
                         stop_ids=stops)
            g = HFGenerator(self.model, self.tok.pad_token_id, s, 1).generate([body["prompt"]], seed=body["seed"])[0]
            self.answered += 1
            if self.die_after is not None and self.answered >= self.die_after:
                self.kill()
        return {"model": self.name, "choices": [{
            "index": 0, "text": self.tok.decode(g.ids), "finish_reason": "stop" if g.stopped else "length",
            "stop_reason": None if not g.stopped or g.ids[-1] == self.tok.eos_token_id else g.ids[-1],
            "token_ids": g.ids, "prompt_token_ids": body["prompt"]}]}


def _handler(server: FakeVllm):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _drop(self) -> None:
            self.close_connection = True      # no answer at all: the client sees the connection close

        def do_GET(self):
            if server.dead:
                return self._drop()
            if self.path == "/health":
                return self._send(200, {})
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [
                    {"id": server.name, "object": "model", "root": server.folder, "max_model_len": server.max_model_len}]})
            self._send(404, {"error": self.path})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if server.dead:
                return self._drop()
            if self.path == "/tokenize":
                ids = server.tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
                return self._send(200, {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len})
            if self.path == "/detokenize":
                ok = all(t < len(server.tok) for t in body["tokens"])
                return self._send(200, {"prompt": server.tok.decode(body["tokens"]) if ok else ""})
            if self.path == "/v1/completions":
                if len(body["prompt"]) + int(body["max_tokens"]) > server.max_model_len:
                    return self._send(400, {"error": {"message": "longer than max_model_len"}})
                with server.lock:
                    fail, server.errors = server.errors > 0, max(server.errors - 1, 0)
                if fail:
                    return self._send(500, {"error": {"message": "engine hiccup"}})
                answer = server.complete(body)
                return self._drop() if answer is None else self._send(200, answer)
            self._send(404, {"error": self.path})

    return Handler
