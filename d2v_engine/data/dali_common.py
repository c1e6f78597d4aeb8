"""What the DALI image and audio loaders share: our sampler decides, DALI decodes.

Why `fn.external_source` and not `fn.readers.file` with its own shard_id/num_shards: the reader
shuffles with a buffer seeded per shard, so the samples of a step would depend on the world size
and a resumed run would have to replay the reader from the start. Here the samples of every
micro-batch come from loader.GlobalBatchSampler (seeded by the run seed, each rank a disjoint
slice of each global batch, epochs reshuffled), and every random draw (crop box, flip, audio
offset) comes from the same per-sample numpy generators the torch fallback uses. So the two
loaders read the same samples with the same augmentation parameters, a run's data position is its
step alone (exact resume), and ranks never overlap. DALI does what costs: decoding (on the GPU
with device="mixed"), resizing, normalizing, batching, with prefetch_queue_depth batches in
flight while the step runs.

Threads: DALI's CPU threads and the mixed decoder's each go where DALI_AFFINITY_MASK says, entry i
for thread i. Given this rank's CPUs (d2v_engine.runtime.cpu_setup pinned the rank to them), the loader
writes them there, one physical core per thread first, and builds with set_affinity=True, so
both thread pools stay on the rank's own cores. Without it DALI's default pins the decoder's
threads to the CPUs NVML calls close to the GPU that the thread may use, and where those do not
overlap (a rank pinned off its GPU's node) warns once per thread and leaves them unpinned. A
mask the user exported is theirs: it is kept (and set_affinity applies it); with pinning off
(D2V_PIN_CPUS=0) DALI keeps its defaults.

The file bytes are read and their headers checked in the Python callback (it runs in the
process's own thread when DALI prefetches). A file that fails there is a bad file before DALI
sees it; one that only the decoder rejects fails the whole DALI batch, so the loader decodes the
in-flight samples one by one to find it, then fails naming it or rebuilds the pipeline without it.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import importlib.util
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from d2v_engine.data.common import BadSample
from d2v_engine.data.loader import BatchPlan, GlobalBatchSampler
from d2v_engine.errors import ConfigError, DataError
from d2v_engine.seeding import STREAM_DATA, mix_seed


_FORK_GUARD = []


def _guard_forked_children() -> None:
    """A process forked after DALI ran (a DataLoader worker, a multiprocessing pool) inherits the
    parent's uncollected garbage, DALI pipelines and buffers among it; the child's garbage
    collector freeing those crashes or hangs it (DALI's threads and allocator state did not
    survive the fork). gc.freeze() in the child leaves everything inherited to the parent: the
    child still collects its own garbage."""
    if not _FORK_GUARD:
        os.register_at_fork(after_in_child=gc.freeze)
        _FORK_GUARD.append(True)


def dali_available() -> bool:
    """True when nvidia.dali can be imported (any CUDA flavour; CPU pipelines need no GPU)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def affinity_mask(cpus: list[int], num_threads: int) -> str:
    """DALI_AFFINITY_MASK for `num_threads` threads over `cpus` (in order, repeated when there
    are more threads): DALI gives thread i entry i, and a thread past the list NVML's choice."""
    return ",".join(str(cpus[i % len(cpus)]) for i in range(max(num_threads, len(cpus))))


def sample_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The generator the torch loader hands dataset.load() for this sample (loader._Keyed)."""
    return np.random.default_rng(mix_seed(seed, step, position, STREAM_DATA))


@dataclass
class Prepared:
    """One micro-batch made ready for DALI: per-sample inputs of the good samples, the bad ones."""

    micro: list  # the sampler's (index, step, position) of every sample, bad ones included
    keys: list  # (index, step, position) of the good samples
    inputs: list  # per external_source output: one numpy array per good sample
    bad: list = field(default_factory=list)  # paths of skipped files, as strings
    extra: dict = field(default_factory=dict)  # what the batch dict gets besides "source"
    error: Exception | None = None  # a DataError to raise when this batch is consumed

    @property
    def step(self) -> int:
        return self.micro[0][1]

    @property
    def first_position(self) -> int:
        return self.micro[0][2]

    @property
    def empty(self) -> bool:
        return not self.keys


class DaliLoader:
    """Iterates this rank's micro-batches like loader.make_loader: dicts with "source",
    "padding_mask", "position", "step", "bad_files" (+ "label"). Subclasses say how a sample is
    prepared (prepare_sample), the DALI graph (graph) and how outputs become tensors (finish)."""

    num_inputs = 1
    input_dtypes: tuple = ()

    def __init__(self, dataset, plan: BatchPlan, rank: int, seed: int, start_step: int,
                 max_steps: int, num_threads: int = 0, skip_bad: bool = False,
                 device: torch.device | str = "cpu", prefetch: int = 2,
                 cpus: list[int] | None = None):
        import nvidia.dali  # noqa: F401  (fails here, not mid-run, when DALI is missing)
        _guard_forked_children()

        self.dataset, self.plan, self.seed = dataset, plan, seed
        self.skip_bad = skip_bad
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise ConfigError("DALI loader asked for a CUDA device but CUDA is not available")
        self.num_threads = max(1, num_threads or torch.get_num_threads())
        self.prefetch = max(1, prefetch)
        self.cpus = list(cpus) if cpus else None
        self.sampler = GlobalBatchSampler(len(dataset), plan, rank, seed, start_step, max_steps)
        self.known_bad: dict[str, str] = {}  # path -> reason, found by the decoder
        self._planned = None
        self._replay: collections.deque = collections.deque()
        self._in_flight: collections.deque = collections.deque()
        self._pipe = None

    def __len__(self) -> int:
        return len(self.sampler)

    # ------------------------------------------------------------ subclass hooks
    def prepare_sample(self, index: int, rng: np.random.Generator) -> tuple[list, dict]:
        """(one array per external_source output, per-sample facts) or raises BadSample."""
        raise NotImplementedError

    def plan_batch(self, prepared: Prepared, facts: list[dict]) -> None:
        """Batch-level decisions (audio: the common length) made before feeding; may edit inputs."""

    def graph(self, inputs: list, gpu: bool):
        """The DALI graph from the external_source nodes; returns the output node(s)."""
        raise NotImplementedError

    def finish(self, prepared: Prepared, outputs: list) -> dict:
        """Batch dict from the DALI outputs of a prepared micro-batch."""
        raise NotImplementedError

    def path_of(self, index: int) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------ feeding
    def _prepare(self, micro: list) -> Prepared:
        prepared = Prepared(list(micro), [], [[] for _ in range(self.num_inputs)])
        facts = []
        for index, sample_step, position in micro:
            path = self.path_of(index)
            try:
                if path in self.known_bad:
                    raise BadSample(path, self.known_bad[path])
                arrays, fact = self.prepare_sample(index, sample_rng(self.seed, sample_step,
                                                                     position))
            except DataError as e:
                if not (self.skip_bad and isinstance(e, BadSample)):
                    prepared.error = e
                    return prepared
                prepared.bad.append(str(e.path))
                continue
            prepared.keys.append((index, sample_step, position))
            for column, array in zip(prepared.inputs, arrays):
                column.append(array)
            facts.append(fact)
        if prepared.keys:
            self.plan_batch(prepared, facts)
        return prepared

    def _feed(self):
        """external_source callback: the next micro-batch with at least one good sample."""
        while True:
            if self._replay:
                prepared = self._replay.popleft()
            else:
                micro = next(self._planned)  # StopIteration ends the pipeline's epoch
                prepared = self._prepare(micro)
            self._in_flight.append(prepared)
            if prepared.error is not None:
                raise StopIteration  # nothing more is fed; the error is raised when consumed
            if not prepared.empty:
                return prepared.inputs

    def _build(self, feed, batch_size: int, gpu: bool, prefetch: int):
        from nvidia.dali import fn, pipeline_def

        # DALI's threads read the mask when they start, during build: it must be in place now.
        if self.cpus:
            os.environ["DALI_AFFINITY_MASK"] = affinity_mask(self.cpus, self.num_threads)

        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None,
                      prefetch_queue_depth=prefetch, seed=self.seed & 0x7FFFFFFF,
                      exec_dynamic=True, set_affinity="DALI_AFFINITY_MASK" in os.environ)
        def pipeline():
            nodes = fn.external_source(source=feed, num_outputs=self.num_inputs, batch=True,
                                       dtype=list(self.input_dtypes), no_copy=False)
            out = self.graph(list(nodes), gpu)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        pipe = pipeline()
        with warnings.catch_warnings():  # eval graphs leave the crop inputs unused on purpose
            warnings.filterwarnings("ignore", message=".*outputs at the indices.*not used")
            pipe.build()
        return pipe

    # ------------------------------------------------------------ bad-file recovery
    def _decodes(self, prepared: Prepared, i: int) -> str | None:
        """None when sample i of `prepared` goes through the loader's own graph alone (the same
        backend: a failure only the GPU decoder or a GPU slice meets is found too), else the
        reason."""
        single = [[column[i]] for column in prepared.inputs]
        try:
            self._build(lambda: single, 1, gpu=self.gpu, prefetch=1).run()
        except Exception as e:  # noqa: BLE001  DALI raises RuntimeError with C++ context lines
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()
                     and "Critical error" not in ln and "C++ context" not in ln]
            return (lines[0] if lines else type(e).__name__)[:200]
        return None

    def _recover(self, error: Exception) -> None:
        """A DALI batch failed: find the undecodable files among the samples in flight; fail
        naming the first, or (skip) remember them and re-feed the in-flight batches without them."""
        self._pipe = None  # a failed pipeline cannot run again
        found = []
        for prepared in self._in_flight:
            if prepared.error is None:
                for i, (index, _, _) in enumerate(prepared.keys):
                    reason = self._decodes(prepared, i)
                    if reason is not None:
                        found.append((self.path_of(index), reason))
        if not found:
            first = next((ln for ln in str(error).splitlines() if ln.strip()), repr(error))
            raise DataError(f"DALI pipeline failed and no single file is to blame: {first}")
        if not self.skip_bad:
            path, reason = found[0]
            raise DataError(f"cannot read {path}: {reason} (data.on_bad_file=skip skips such "
                            "files)")
        self.known_bad.update(found)
        # Prepared again from the same sampler keys, so the random draws are the same ones.
        redo = [self._prepare(prepared.micro) for prepared in self._in_flight]
        self._replay.extendleft(reversed(redo))
        self._in_flight.clear()

    # ------------------------------------------------------------ iteration
    def _fed(self, prepared: Prepared) -> bool:
        return prepared.error is None and not prepared.empty

    def _without_source(self, prepared: Prepared) -> dict:
        if prepared.error is not None:
            raise prepared.error
        return {"position": torch.zeros(0, dtype=torch.long), "step": prepared.step,
                "bad_files": prepared.bad}

    def __iter__(self):
        self._planned = iter(self.sampler)
        self._replay.clear()
        self._in_flight.clear()
        self._pipe, done = None, False
        while True:
            # Micro-batches with no good sample (or a fatal error) were never fed to DALI.
            while self._in_flight and not self._fed(self._in_flight[0]):
                yield self._without_source(self._in_flight.popleft())
            if done:
                # Freed now, not at some later collection: a DALI pipeline still alive when a
                # torch DataLoader forks its workers would be shut down again in each worker.
                self._pipe = None
                return
            if self._pipe is None:
                self._pipe = self._build(self._feed, self.plan.micro_batch, self.gpu,
                                         self.prefetch)
            stream = self._copy_stream()
            try:
                # On the GPU the outputs come back ordered on our copy stream, not host-synchronous
                # (pipe.run() without a stream waits on the host for them).
                outputs = self._pipe.run(stream) if stream is not None else self._pipe.run()
            except StopIteration:
                done = True
                continue
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001  a decoder rejected a file
                self._recover(e)
                continue
            while not self._fed(self._in_flight[0]):
                yield self._without_source(self._in_flight.popleft())
            prepared = self._in_flight.popleft()
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                batch = self.finish(prepared, list(outputs))  # copies on the copy stream
            if stream is not None:
                batch["cuda_ready"] = torch.cuda.Event()
                batch["cuda_ready"].record(stream)  # what the consumers wait for, on the device
            batch["position"] = torch.tensor([k[2] for k in prepared.keys], dtype=torch.long)
            batch["step"] = prepared.step
            batch["bad_files"] = prepared.bad
            yield batch

    # ------------------------------------------------------------ outputs
    def _copy_stream(self) -> torch.cuda.Stream | None:
        """The side stream DALI's GPU outputs are returned and copied to torch on (None on the
        CPU): the compute stream never waits for them on the host, only on the device, behind the
        batch's "cuda_ready" event (d2v_engine.run.mask_ahead)."""
        if not self.gpu:
            return None
        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def to_torch(self, tensor_list, dtype: torch.dtype) -> torch.Tensor:
        """A dense DALI TensorList (CPU or GPU) as a torch tensor on this loader's device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = tensor_list.as_tensor()
        shape = list(dense.shape())
        out = torch.empty(shape, dtype=to_torch_type[dense.dtype],
                          device=self.device if self.gpu else "cpu")
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.gpu else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out if out.dtype == dtype else out.to(dtype)


@contextlib.contextmanager
def one_torch_thread():
    """For the loaders' per-sample torch work on the CPU: torch's intra-op threads fork and join
    around every small op and contend with DALI's decoding threads for the same cores (images
    here: 436 images/s with 2 torch threads, 530-650 with 1). The loader runs between steps in
    the training thread, so the step keeps its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
