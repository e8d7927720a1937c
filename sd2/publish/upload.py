"""Upload a finished folder to the Hugging Face Hub with huggingface_hub's ``create_repo`` and ``upload_folder``.

- The token comes from ``huggingface_hub.get_token()`` (``HF_TOKEN`` or the ``hf auth login`` file).
  It is passed to the API and nowhere else: never printed, logged or written. Errors are reworded
  from the HTTP status and the server's own message, with the token scrubbed out, never from the
  library's exception text (which can quote request details).
- Nothing remote is left half-written. All local checks run before the repo is created;
  ``upload_folder`` makes one commit, which lands whole or not at all; and when this call created
  the repo and the upload then fails, it deletes the repo again and says so.
- The endpoint is read from ``HF_ENDPOINT`` at call time (huggingface_hub reads it once, at import).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sd2.core.errors import Sd2Error

log = logging.getLogger("sd2")


@dataclass
class Uploaded:
    url: str
    created: bool          # the repo was created by this call
    commit: str | None


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise Sd2Error(f"--repo-id {repo_id!r} is not a valid Hub repo id: {e}") from None
    if repo_id.count("/") != 1:
        raise Sd2Error(f"--repo-id {repo_id!r} must be 'org/name' (or 'user/name')")


def get_token() -> str:
    from huggingface_hub import get_token as hf_get_token

    token = hf_get_token()
    if not token:
        raise Sd2Error("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`, "
                       "then publish again (or use --dry-run --out DIR to build the folder without uploading)")
    return token


def upload(folder: Path, repo_id: str, private: bool = False, exist_ok: bool = False) -> Uploaded:
    from huggingface_hub import HfApi, constants

    check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not any(folder.glob("*.safetensors")):
        raise Sd2Error(f"{folder} is not a complete export (README.md and *.safetensors expected)")
    if constants.is_offline_mode():
        raise Sd2Error("huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
                       "unset it to publish, or use --dry-run --out DIR")
    token = get_token()
    url = endpoint()
    api = HfApi(endpoint=url, token=token)
    created = _create(api, repo_id, private, exist_ok, token, url)
    try:
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="Upload drafter with sd2 publish")
    except BaseException as e:
        undo = _undo(api, repo_id, token, url) if created else (
            f"the existing repo {repo_id} is unchanged (an upload is one commit, which did not land)")
        if isinstance(e, KeyboardInterrupt):
            raise Sd2Error(f"upload to {repo_id} interrupted; {undo}") from None
        raise Sd2Error(f"upload to {repo_id} failed: {describe(e, token, url)}; {undo}") from None
    return Uploaded(url=f"{url}/{repo_id}", created=created, commit=getattr(info, "oid", None))


def _create(api, repo_id: str, private: bool, exist_ok: bool, token: str, url: str) -> bool:
    """Create the repo; True if this call created it. An existing repo is an error without exist_ok."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=False)
        return True
    except HfHubHTTPError as e:
        status = _status(e)
        if status == 409:
            if exist_ok:
                log.info("repo %s exists; uploading a new commit to it (--exist-ok)", repo_id)
                return False
            raise Sd2Error(f"the repo {repo_id} already exists on {url}; pass --exist-ok to upload a new commit to it, "
                           f"or choose another --repo-id") from None
        raise Sd2Error(f"cannot create the repo {repo_id}: {describe(e, token, url)}") from None
    except Exception as e:  # network errors are not HfHubHTTPError
        raise Sd2Error(f"cannot create the repo {repo_id}: {describe(e, token, url)}") from None


def _undo(api, repo_id: str, token: str, url: str) -> str:
    try:
        api.delete_repo(repo_id, repo_type="model")
        return f"the repo {repo_id}, created by this call, was deleted again, so nothing is left half-written"
    except Exception as e:
        return (f"the repo {repo_id} was created by this call and could not be deleted again "
                f"({describe(e, token, url)}): delete it by hand (`hf repo delete {repo_id}`)")


def _status(e) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def describe(e: BaseException, token: str | None, url: str) -> str:
    """A user-facing reason for a failed Hub call, with no request details and no token."""
    import httpx

    status = _status(e)
    if status is not None:
        try:
            body = e.response.json()
            server = str(body.get("error") or body.get("message") or "") if isinstance(body, dict) else ""
        except Exception:
            server = ""
        server = f" (the Hub says: {_scrub(server, token)[:300]})" if server else ""
        if status == 401:
            return (f"the token was refused (HTTP 401){server}; it may be invalid or expired: "
                    f"set a valid HF_TOKEN or run `hf auth login`")
        if status == 403:
            return (f"permission denied (HTTP 403){server}; the token needs write access to that namespace "
                    f"(a write or fine-grained token with repo write permission)")
        if status == 404:
            return f"not found (HTTP 404){server}; check the organisation in --repo-id"
        return f"HTTP {status}{server}"
    if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError, OSError)):
        return (f"cannot reach {url} ({type(e).__name__}); check the network or HF_ENDPOINT, "
                f"or use --dry-run --out DIR to build the folder now and upload it later")
    return f"{type(e).__name__}: {_scrub(str(e), token).splitlines()[0] if str(e) else ''}"


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
