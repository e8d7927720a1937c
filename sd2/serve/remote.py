"""A running vLLM server (``vllm serve``, OpenAI-compatible): its address, and the check that it serves
the model sd2 expects, before any of its answers is kept.

The check (``identify``), against vLLM 0.32's endpoints:
- ``GET /v1/models``: a served model whose ``id`` (``--served-model-name``, else the model as given
  to ``vllm serve``) or ``root`` (the model it loaded) names the expected model: its reference as
  the recipe gives it (Hub id or folder), or the same folder; and its ``max_model_len``;
- ``POST /tokenize`` of a probe text (the chat template's rendering of a short exchange, mixed
  scripts, digits, whitespace, and every special token) without added special tokens: the ids must
  equal the local tokenizer's;
- ``POST /detokenize`` of the local tokenizer's last id and the one after it: equal to the local
  decoding, so the vocabularies have the same size (vLLM decodes an unknown id as "").
A difference raises ``Refused`` naming the server and what differs; a server that does not answer
raises ``Unreachable``. The requests go through httpx (a dependency of huggingface_hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sd2.core.errors import Sd2Error

PROBE = ("Grüße, 世界! Ünïcödé 🙂 12345 3.14159 +-*/=<>\n\n\tdef f(x):\n        return x ** 2  # done\n"
         "  two  spaces, a tab\t, \"quotes\" and 'apostrophes'.")
CHECK_TIMEOUT_S = 30.0


class Refused(Sd2Error):
    """A server that serves another model or tokenizer than the recipe's."""


class Unreachable(Sd2Error):
    """A server that does not answer (connection refused, timeout, an HTTP error on a check)."""


@dataclass(frozen=True)
class Served:
    url: str                       # normalised base URL, no /v1
    model: str                     # the served model id (the ``model`` of every request)
    max_model_len: int | None      # the longest prompt + answer it takes, in tokens


def normalise(url: str) -> str:
    """``http(s)://host:port`` with any trailing ``/`` and ``/v1`` removed. Raises ValueError naming
    the URL when it is not an http(s) address with a host."""
    text = str(url).strip().rstrip("/")
    if text.endswith("/v1"):
        text = text[:-3]
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not a server address; write it as http://HOST:PORT (what `vllm serve` "
                         f"prints as 'Starting vLLM server on ...')")
    return text


def expected_names(ref: str, *aliases: str | None) -> set[str]:
    """The names a server may serve the model under: the reference and its aliases (label, Hub id)."""
    return {str(n) for n in (ref, *aliases) if n}


def _names_model(card: dict, names: set[str]) -> bool:
    for value in (card.get("id"), card.get("root")):
        if not value:
            continue
        if value in names:
            return True
        try:
            if any(Path(value).resolve() == Path(n).resolve() for n in names if Path(n).is_dir()):
                return True
        except (OSError, ValueError):
            continue
    return False


def _get(client, url: str, path: str, json: dict | None = None) -> dict:
    import httpx

    try:
        r = client.post(url + path, json=json, timeout=CHECK_TIMEOUT_S) if json is not None \
            else client.get(url + path, timeout=CHECK_TIMEOUT_S)
    except httpx.HTTPError as e:
        raise Unreachable(f"{url} does not answer ({type(e).__name__}: {e})") from None
    if r.status_code >= 500:
        raise Unreachable(f"{url}{path} answered HTTP {r.status_code}: {r.text[:300]}")
    if r.status_code != 200:
        raise Refused(f"{url}{path} answered HTTP {r.status_code} ({r.text[:300]}); sd2 checks a server with vLLM's "
                      f"/v1/models, /tokenize and /detokenize: serve the model with `vllm serve`")
    try:
        return r.json()
    except ValueError:
        raise Refused(f"{url}{path} did not answer JSON; is it a vLLM server (`vllm serve`)?") from None


def probe_text(tokenizer) -> str:
    """A text whose tokenization tells tokenizers apart: the chat template's rendering of a short
    exchange (when there is a template), PROBE, and every special token."""
    text = ""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"},
                                                  {"role": "assistant", "content": "Hello."}], tokenize=False)
        except Exception:   # a template that needs other roles or fields: the plain probe still tells a lot
            text = ""
    return text + PROBE + "".join(tokenizer.all_special_tokens)


def identify(client, url: str, names: set[str], tokenizer) -> Served:
    """Check that the server at ``url`` serves the model called one of ``names`` with ``tokenizer``
    (module docstring). ``client``: an ``httpx.Client``. Returns what it serves; raises Refused or
    Unreachable, each naming the server."""
    cards = _get(client, url, "/v1/models").get("data") or []
    card = next((c for c in cards if _names_model(c, names)), None)
    if card is None:
        served = ", ".join(f"{c.get('id')!r} (loaded from {c.get('root')!r})" for c in cards) or "no model"
        want = sorted(names)[0]
        raise Refused(f"{url} serves {served}, not the recipe's model {' or '.join(map(repr, sorted(names)))}: "
                      f"start it with `vllm serve {want}`, or, where the same model has another name there, "
                      f"add `--served-model-name {want}`")
    model = str(card["id"])
    text = probe_text(tokenizer)
    local = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    remote = list(_get(client, url, "/tokenize", {"model": model, "prompt": text,
                                                 "add_special_tokens": False}).get("tokens") or [])
    if remote != local:
        k = next((i for i, (a, b) in enumerate(zip(remote, local)) if a != b), min(len(remote), len(local)))
        raise Refused(f"{url} ({model!r}) tokenizes a probe text differently from the recipe's tokenizer: "
                      f"{len(remote)} tokens against {len(local)}, first difference at token {k} "
                      f"(server {remote[k:k + 3]}, recipe {local[k:k + 3]}); it serves another tokenizer")
    n = len(tokenizer)
    for i in (n - 1, n):
        theirs = _get(client, url, "/detokenize", {"model": model, "tokens": [i]}).get("prompt", "")
        ours = tokenizer.decode([i], skip_special_tokens=False) if i < n else ""
        if theirs != ours:
            raise Refused(f"{url} ({model!r}) decodes token id {i} as {theirs!r}, the recipe's tokenizer "
                          f"({n} tokens) as {ours!r}: the vocabularies differ")
    limit = card.get("max_model_len")
    return Served(url, model, int(limit) if limit is not None else None)
