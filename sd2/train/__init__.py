"""Training, for every drafter kind: the distilled rows and their batches (batches.py), the losses
(losses.py), the sparsity mask held exactly (mask.py), checkpoints and resume (checkpoint.py),
accelerate (distributed.py) and the one loop (loop.py). A drafter kind plugs in a ``loop.Task``:
its loss and where its inputs come from. Imports nothing from sd2.stages, sd2.heads or sd2.pipeline."""
