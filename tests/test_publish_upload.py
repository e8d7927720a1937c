"""sd2 publish's upload path against a local stand-in for the Hub (tests/hub_stub.py; the real Hub is
unreachable here): the repo created and every file committed, clear errors that leave nothing half
written, offline mode, and the token never in any output."""

from __future__ import annotations

import logging
import socket

import pytest
from hub_stub import HubStub
from publish_run import REPO, TOKEN

from sd2.core.errors import Sd2Error


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)      # read at import: patch the constant too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)         # conftest sets HF_HUB_OFFLINE=1 for loading
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    return monkeypatch


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    from sd2.publish import publish

    out = tmp_path_factory.mktemp("exp") / "folder"
    publish(run_dir, REPO, dry_run=True, out=out, say=lambda s: None)
    return out


def _no_leak(*texts):
    for t in texts:
        assert TOKEN not in t


def test_upload_creates_repo_and_commits_every_file(hub_env, run_dir, exported, capsys, caplog):
    from sd2.publish import publish

    caplog.set_level(logging.DEBUG)
    with HubStub(TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        lines = []
        res = publish(run_dir, REPO, private=True, say=lines.append)
        assert res.created and res.url == f"{hub.url}/{REPO}" and res.folder is None
        repo = hub.repos[REPO]
        assert repo["private"] and repo["commits"] == 1
        assert set(repo["files"]) == set(p.name for p in exported.iterdir())
        for name in ("model.safetensors", "README.md", "sparsity.json", "tokenizer.json"):
            assert repo["files"][name] == (exported / name).read_bytes(), name
        kinds = [p.split("/")[-2] if "/api/models/" in p else p for _, p in hub.calls]
        assert kinds[0] == "/api/repos/create" and "preupload" in kinds and kinds[-1] == "commit"
        # with --exist-ok a second publish is a new commit on the same repo
        publish(exported, REPO, exist_ok=True, say=lines.append)
        assert repo["commits"] == 2
    out = capsys.readouterr()
    _no_leak(out.out, out.err, caplog.text, "\n".join(lines))
    assert not any(TOKEN in p.read_text(errors="ignore") for p in exported.iterdir() if p.is_file())


def _fails(fn, match):
    with pytest.raises(Sd2Error, match=match) as e:
        fn()
    _no_leak(str(e.value))
    return str(e.value)


def test_upload_errors_are_clear_and_leave_nothing_half_written(hub_env, exported, tmp_path, capsys, caplog):
    from sd2.publish import publish

    caplog.set_level(logging.DEBUG)
    quiet = lambda s: None  # noqa: E731
    with HubStub(TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        # an existing repo, without --exist-ok: refused before any upload, the repo untouched
        hub.repos[REPO] = {"private": False, "files": {"README.md": b"old"}, "commits": 1}
        _fails(lambda: publish(exported, REPO, say=quiet), r"already exists.*--exist-ok")
        assert hub.repos[REPO]["files"] == {"README.md": b"old"} and not any("commit" in p for _, p in hub.calls)
        # the commit fails after this call created the repo: the repo is deleted again
        hub.fail_commit = 403
        msg = _fails(lambda: publish(exported, "sd2-org/other", say=quiet), r"permission denied \(HTTP 403\)")
        assert "deleted again" in msg and "sd2-org/other" not in hub.repos
        # ... but an existing repo (--exist-ok) is never deleted; its files stay as they were
        msg = _fails(lambda: publish(exported, REPO, exist_ok=True, say=quiet), "HTTP 403")
        assert "unchanged" in msg and hub.repos[REPO]["files"] == {"README.md": b"old"}
        hub.fail_commit = None
        # a refused token (401)
        hub_env.setenv("HF_TOKEN", "hf_wrong")
        _fails(lambda: publish(exported, "sd2-org/third", say=quiet), r"token was refused \(HTTP 401\)")
        hub_env.setenv("HF_TOKEN", TOKEN)
        # no write access to the namespace (403 on create)
        hub.deny_create = True
        _fails(lambda: publish(exported, "sd2-org/fourth", say=quiet), r"cannot create .*permission denied")
        assert set(hub.repos) == {REPO}
        # no token at all: nothing is sent
        n_calls = len(hub.calls)
        hub_env.delenv("HF_TOKEN")
        _fails(lambda: publish(exported, "sd2-org/fifth", say=quiet), r"no Hugging Face token.*hf auth login")
        assert len(hub.calls) == n_calls
        for headers in hub.headers_seen:                      # the token travels only in the Authorization header
            assert all(TOKEN not in v for k, v in headers.items() if k.lower() != "authorization")
    # an unreachable network: a closed local port
    hub_env.setenv("HF_TOKEN", TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    _fails(lambda: publish(exported, "sd2-org/sixth", say=quiet), r"cannot reach http://127\.0\.0\.1")
    # an invalid repo id is refused before anything else
    _fails(lambda: publish(exported, "not a repo", say=quiet), "not a valid Hub repo id")
    out = capsys.readouterr()
    _no_leak(out.out, out.err, caplog.text)
    assert {p.name for p in exported.iterdir()} >= {"README.md", "model.safetensors"}   # the local folder is intact


def test_offline_mode_is_a_clear_error(hub_env, exported):
    from huggingface_hub import constants

    from sd2.publish import publish

    hub_env.setattr(constants, "HF_HUB_OFFLINE", True)
    _fails(lambda: publish(exported, REPO, say=lambda s: None), "offline mode")
