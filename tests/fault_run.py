"""`sd2 run` in a subprocess, with one pause point armed, for the kill -9 tests (tests/test_faults.py).

    python fault_run.py POINT MARKER RECIPE OUT

POINT is none, distill (after the first shard is on disk), finetune (after the checkpoint of step 2)
or evaluate (with every model loaded, before the first measurement). At that point the process writes
MARKER and sleeps, so the test's SIGKILL lands at a known place; the kill itself is real. The hooks wrap
sd2's own functions from outside: sd2 has no test hooks in its code.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402,F401  offline environment
import torch  # noqa: E402

torch.set_num_threads(1)  # the parent test's thread count: bit-identical results need the same reduction order

point, marker, recipe, out = sys.argv[1:5]


def pause():
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def after(module, name, when):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            pause()
        return result
    setattr(module, name, wrapped)


def before(module, name):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        pause()
        return real(*args, **kwargs)
    setattr(module, name, wrapped)


if point == "distill":
    from sd2.stages.distill import shards

    after(shards, "write", lambda folder, i, *a, **k: i == 0)
elif point == "finetune":
    from sd2.train import checkpoint

    after(checkpoint, "save", lambda out_dir, acc, model, opt, sched, step, *a, **k: step == 2)
elif point == "evaluate":
    from sd2.stages.evaluate import measure

    before(measure, "measure")

from sd2.pipeline.cli import main  # noqa: E402

sys.argv = ["sd2", "run", recipe, "--out", out]
main()
