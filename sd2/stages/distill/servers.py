"""distill.backend: vllm-server: the answers come from vLLM servers the user started (``vllm serve``).

The generator has the HF and vLLM backends' interface (``generate(prompts, seed, progress)`` on token
prompts, returning ``Generated``), so the chat template, the multi-turn carrying and the loss mask
are chat.py's, shared with them. Token ids in, token ids out: each prompt is sent to
``/v1/completions`` as its list of token ids, with the in-process vLLM backend's sampling settings
(``sampling_kwargs``) and vLLM's other sampling fields set to "off" (a server otherwise fills them
from the model's generation_config), and the answer is read back as vLLM's ``token_ids``
(``return_token_ids``), never re-tokenized from text.

Before any request every server is checked (sd2.serve.remote.identify): another model or tokenizer is
refused (Sd2Error naming the server and what differs); a server that does not answer is left out
with a warning.

Scheduling and failure: the prompts of a ``generate`` call form one queue; every live server runs
``requests_per_server`` workers taking the next prompt, so a faster server takes more. A request that
fails on its server (connection refused or reset, timeout, HTTP 5xx) goes back into the queue; the
server is dropped for the rest of the run when ``/health`` then fails too, or at its
``MAX_STRIKES``-th failure, and the others take its requests. Nothing of a failed request is kept,
so with greedy decoding the answers are those of a run without the failure. When every server is
down, ``generate`` raises an Sd2Error naming each with its failure; the stage has written every
finished shard by then, so a rerun resumes. HTTP 4xx (a request the server refuses, e.g. longer
than its ``max_model_len``) raises at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sd2.core.errors import Sd2Error
from sd2.serve.remote import Refused, Served, Unreachable, identify
from sd2.stages.distill.generate import Generated, Sampling
from sd2.stages.distill.vllm_backend import sampling_kwargs, to_generated

MAX_STRIKES = 3
HEALTH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0      # a host that does not accept the connection in this long counts as failed
# vLLM sampling fields sd2 does not use, set to "off" (a server fills unset ones from generation_config)
OFF = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


class ServerFailed(Exception):
    """A request its server did not answer (transport error, timeout, HTTP 5xx): it goes to another."""


@dataclass
class _Server:
    served: Served
    alive: bool = True
    strikes: int = 0
    answers: int = 0
    failure: str = ""


def completion_body(model: str, prompt: list[int], sampling: Sampling, seed: int) -> dict:
    """The ``/v1/completions`` request for one token prompt under ``sampling`` (JSON-ready)."""
    kw = sampling_kwargs(sampling, seed)
    kw.pop("detokenize")                       # an engine setting, not a field of the request
    return {"model": model, "prompt": [int(t) for t in prompt], **kw, **OFF, "return_token_ids": True,
            "stream": False}


async def complete(client, served: Served, body: dict, stop_ids: tuple[int, ...]) -> Generated:
    """One completion from ``served`` (an ``httpx.AsyncClient`` sends it). Raises ServerFailed when the
    server did not answer, Sd2Error when it refused the request or answered without token ids."""
    import httpx

    try:
        r = await client.post(served.url + "/v1/completions", json=body)
    except httpx.HTTPError as e:
        raise ServerFailed(f"{type(e).__name__}: {e}".rstrip(": ")) from None
    if r.status_code >= 500:
        raise ServerFailed(f"HTTP {r.status_code}: {r.text[:200]}")
    if r.status_code != 200:
        raise Sd2Error(f"distill: {served.url} refused a request of {len(body['prompt'])} prompt tokens + "
                       f"{body['max_tokens']} new (HTTP {r.status_code}): {r.text[:400]}")
    try:
        choice = r.json()["choices"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise ServerFailed(f"an unreadable answer ({type(e).__name__})") from None
    if choice.get("finish_reason") not in ("stop", "length"):      # "abort" or an error: not an answer
        raise ServerFailed(f"the request ended with finish_reason {choice.get('finish_reason')!r}")
    ids = choice.get("token_ids")
    if ids is None:
        raise Refused(f"distill: {served.url} answered without token ids (`return_token_ids`, vLLM 0.10.2 and "
                      f"later): sd2 keeps token ids, never re-tokenized text; upgrade the server's vLLM")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != body["prompt"]:
        raise Refused(f"distill: {served.url} changed the prompt's token ids ({len(body['prompt'])} sent, "
                      f"{len(echoed)} echoed)")
    return to_generated(ids, choice.get("finish_reason"), choice.get("stop_reason"), stop_ids)


class ServerGenerator:
    """Answers token prompts on vLLM servers (module docstring). ``urls``: normalised base URLs;
    ``names``: what the model may be served as (sd2.serve.remote.expected_names); ``tokenizer``: the
    recipe's, which the servers must share. Raises Refused (another model or tokenizer) or Sd2Error
    (no server answers) before any request."""

    def __init__(self, urls: list[str], names: set[str], tokenizer, sampling: Sampling, requests_per_server: int,
                 timeout_s: float, log):
        import httpx

        self.sampling, self.per_server, self.timeout_s, self.log = sampling, requests_per_server, timeout_s, log
        self.servers: list[_Server] = []
        self.down: list[str] = []          # the servers that did not answer the check, with why
        with httpx.Client() as client:
            for url in urls:
                try:
                    self.servers.append(_Server(identify(client, url, names, tokenizer)))
                except Unreachable as e:
                    self.down.append(str(e))
                    log.warning("distill: %s; distilling on the other servers", e)
        if not self.servers:
            raise Sd2Error("distill: no vLLM server answers: " + "; ".join(self.down) + ". Start them "
                           "(docs/distill.md, 'Distilling on vLLM servers') and rerun")
        log.info("distill: %d vLLM server(s) serve %s: %s", len(self.servers), self.servers[0].served.model,
                 ", ".join(s.served.url for s in self.servers))

    def generate(self, prompts: list[list[int]], seed: int = 0, progress=None) -> list[Generated]:
        if not prompts:
            return []
        self._check_room(prompts)
        return asyncio.run(self._generate(prompts, seed, progress))

    def answers(self) -> dict[str, int]:
        """Answers kept from each server so far."""
        return {s.served.url: s.answers for s in self.servers}

    def _check_room(self, prompts: list[list[int]]) -> None:
        longest = max(len(p) for p in prompts)
        for s in self.servers:
            limit = s.served.max_model_len
            if s.alive and limit is not None and longest + self.sampling.max_new_tokens > limit:
                raise Sd2Error(f"distill: {s.served.url} takes {limit} tokens per request (max_model_len), and a "
                               f"prompt of {longest} tokens + max_new_tokens {self.sampling.max_new_tokens} is "
                               f"longer; start it with a larger --max-model-len, or set distill.max_prompt_tokens "
                               f"or a smaller max_new_tokens")

    async def _generate(self, prompts, seed, progress) -> list[Generated]:
        import httpx

        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(prompts)):
            queue.put_nowait(i)
        run = _Run(prompts, seed, progress, [None] * len(prompts), queue)
        live = [s for s in self.servers if s.alive]
        limits = httpx.Limits(max_connections=self.per_server * len(live), max_keepalive_connections=None)
        timeout = httpx.Timeout(self.timeout_s, connect=min(CONNECT_TIMEOUT_S, self.timeout_s))
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            # interleaved, so a call with fewer prompts than workers still spreads them over the servers
            tasks = [asyncio.create_task(self._worker(client, s, run)) for _ in range(self.per_server) for s in live]
            await run.finished.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if run.error is not None:
            raise run.error
        return run.out

    async def _worker(self, client, server: _Server, run: "_Run") -> None:
        while server.alive:
            i = await run.queue.get()
            if not server.alive:
                run.queue.put_nowait(i)
                return
            body = completion_body(server.served.model, run.prompts[i], self.sampling, run.seed)
            try:
                g = await complete(client, server.served, body, self.sampling.stop_ids)
            except ServerFailed as e:
                run.queue.put_nowait(i)
                await self._strike(client, server, str(e))
                if not any(s.alive for s in self.servers):
                    run.fail(self._all_down())
                continue
            except Sd2Error as e:
                run.fail(e)
                return
            run.out[i] = g
            server.answers += 1
            run.left -= 1
            if run.progress is not None:
                run.progress.update(1)
            if run.left == 0:
                run.finished.set()

    async def _strike(self, client, server: _Server, why: str) -> None:
        server.strikes += 1
        if not server.alive:
            return
        healthy = False
        if server.strikes < MAX_STRIKES:
            try:
                healthy = (await client.get(server.served.url + "/health", timeout=HEALTH_TIMEOUT_S)).status_code == 200
            except Exception:  # any failure to answer /health is the answer
                healthy = False
        if healthy or not server.alive:
            return
        server.alive, server.failure = False, why
        others = [s.served.url for s in self.servers if s.alive]
        self.log.warning("distill: %s failed (%s) after %d answers; its unfinished requests go to %s",
                         server.served.url, why, server.answers, ", ".join(others) or "no other server")

    def _all_down(self) -> Sd2Error:
        failed = [f"{s.served.url} ({s.failure})" for s in self.servers] + [f"{d} at the start" for d in self.down]
        return Sd2Error("distill: every vLLM server failed: " + "; ".join(failed) + ". The shards finished so far "
                        "are kept: restart the servers and rerun the same command to resume")


class _Run:
    """One ``generate`` call's shared state (one event loop, so no locks)."""

    def __init__(self, prompts, seed, progress, out, queue):
        self.prompts, self.seed, self.progress, self.out, self.queue = prompts, seed, progress, out, queue
        self.left = len(prompts)
        self.error: Exception | None = None
        self.finished = asyncio.Event()

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.finished.set()
