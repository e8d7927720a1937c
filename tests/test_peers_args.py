"""benchmarks/peers.py refuses a bad ``--head`` before any model loads (newcomer check)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def peers(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("spec, message", [
    ("fspad", "expected NAME=FOLDER"),
    ("fspad={missing}", "folder not found"),
    ("fspad={model}", "is not an sd2 head folder"),
    ("fspad={noweights}", "has no model.safetensors"),
])
def test_bad_head_is_refused_before_any_model_loads(tmp_path, tiny_target, target, spec, message):
    from sd2.heads import io

    noweights = io.save(io.build("fspad", target), tmp_path / "head")
    (noweights / io.WEIGHTS).unlink()
    spec = spec.format(missing=tmp_path / "nope", model=tiny_target, noweights=noweights)
    res = peers("--head", spec)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_a_head_name_given_twice_is_refused(tmp_path, target):
    from sd2.heads import io

    a = io.save(io.build("fspad", target), tmp_path / "a")
    res = peers("--head", f"h={a}", "--head", f"h={a}")
    assert res.returncode == 2 and "the name 'h' is given twice" in res.stderr


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tests.tiny import learnable_target

    return learnable_target(tmp_path_factory.mktemp("tgt") / "target")
