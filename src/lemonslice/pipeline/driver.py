"""The driver: a model's playlist cut into stages, each a Ray actor, behind an Engine look-alike.

`Pipeline` is what the text layer takes for an engine (`forward(ids)` -> logits of the last
position, `n_past`, `reset`, `store.metadata`, `args`, `residency.io_counters()`), so
`TextGenerator`, sampling and `run` work unchanged. Only hidden states [T, E] float32 cross
stages, through Ray's object store: a stage's output ref is handed to the next stage without
the driver waiting. A prompt is cut into prefill chunks that follow each other down the
stages, so stage 1 works on chunk 2 while stage 2 works on chunk 1; a stage runs its calls in
the order they were submitted. Each stage goes on a node that holds its files.

Failures end the run with one line naming the stage and its host: a dead stage's refs fail
as soon as Ray knows (RayActorError), and every wait is bounded by `timeout`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, NodeDiedError, RayError,
                            RayTaskError)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..engine import WeightStore
from ..engine.compute import PREFILL_CHUNK
from ..errors import LemonsliceError
from .stage import Stage
from .stages import StageFiles, assign_nodes, layer_bytes, resolve_stages, stage_files

__all__ = ["Pipeline", "connect"]

log = logging.getLogger(__name__)

# Seconds each node has to say which model files it holds.
PROBE_TIMEOUT = 30.0


def connect(address: str | None) -> bool:
    """Connect this process to Ray: a cluster at `address` ('auto': the one this host joined), or
    a new local one without it. True when this call connected (the caller then shuts it down)."""
    if ray.is_initialized():
        return False
    # No usage report from a run: nothing here reaches the network unless the cluster is remote.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own notices would mix with the run's output; its failures reach us as exceptions.
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LemonsliceError(f"cannot reach a Ray cluster at {address or 'a new local instance'}: {first}") from None
    _notices_to_log()
    return True


def _notices_to_log() -> None:
    """Ray's driver prints the cluster's notices (such as why a worker died) to stdout, where `run`
    streams its text; they go to this module's log instead (the failure itself is raised)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is not None and hasattr(worker, "print_to_stdstream"):
        worker.print_to_stdstream = lambda data, ignore_prefix=False: log.info("ray: %s", " ".join(data["lines"]))


def _present(directory: str, sizes: dict[str, int]) -> tuple[str, list[str]]:
    """(node id, the files of `sizes` this node holds with those sizes): run on each node."""
    here = []
    for name, size in sizes.items():
        try:
            if os.path.getsize(os.path.join(directory, name)) == size:
                here.append(name)
        except OSError:
            pass
    return ray.get_runtime_context().get_node_id(), here


class _Store:
    """What the text layer and `run` read of an engine's store: the model's metadata (from the
    driver's own shared.gguf header), and the stages' weight counters."""

    def __init__(self, files: WeightStore, pipeline: "Pipeline"):
        self.files, self._pipeline = files, pipeline
        self.metadata, self.path, self.manifest = files.metadata, files.path, files.manifest

    @property
    def peak_resident_bytes(self) -> int:
        return sum(r["peak_resident_bytes"] for r in self._pipeline.reports())

    @property
    def resident_bytes(self) -> int:
        return sum(r["resident_bytes"] for r in self._pipeline.reports())


class _Residency:
    """The stages' residency counters, added up (no per-tensor plan: each stage has its own)."""

    tensor_plan = None

    def __init__(self, pipeline: "Pipeline"):
        self._pipeline = pipeline

    def io_counters(self) -> dict[str, float]:
        if self._pipeline.failed:  # asked while a failure unwinds: keep that failure's error
            return {}
        total: dict[str, float] = {}
        for r in self._pipeline.reports():
            for k, v in r["io"].items():
                total[k] = total.get(k, 0) + v
        return total


class _RemoteState:
    """The default sequence's state as a Session sees it: its caches live in the stages, so there
    is nothing to checkpoint, and a fresh object each time keeps a Session from restoring one."""

    def __init__(self, n_past: int):
        self.caches: list[Any] = []
        self.n_past = n_past


class RemoteSequence:
    """One more sequence of a Pipeline (a server slot's): its caches live in the stages, so a
    Session keeps no checkpoint of it and only builds on a prompt that extends it."""

    checkpointable = False

    def __init__(self, seq: int):
        self.seq, self.n_past = seq, 0
        self.caches: list[Any] = []


def _reason(e: BaseException) -> str:
    """A dead stage's cause in a few words (Ray's own message runs to many lines)."""
    text = str(e)
    if "node has died" in text or isinstance(e, NodeDiedError):
        return "its node died"
    if "worker process has died" in text or isinstance(e, ActorDiedError):
        return "its worker process died"
    if isinstance(e, ActorUnavailableError):
        return "it cannot be reached"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class Pipeline:
    """A model's playlist cut into stages that run as Ray actors; an Engine look-alike.

    `stages` is a --stages spec ('0-19,20-39', or 'N' stages balanced by bytes) or ranges [a, b).
    `address` names a Ray cluster ('auto', 'host:port'); without it a local Ray starts here and
    `close` shuts it down. Each stage checks only its own files (hashing them too with `verify`)
    and opens them within `max_memory` (per stage; None: each stage's own default budget) with
    `threads` torch threads. Every answer a stage owes is waited for at most `timeout` seconds.
    """

    def __init__(self, model: str | os.PathLike[str], stages: str | Sequence[tuple[int, int]], *,
                 address: str | None = None, max_memory: int | None = None, threads: int | None = None,
                 exact: bool = False, kv_types: tuple[str, str] = ("f16", "f16"),
                 prefill_chunk: int = PREFILL_CHUNK, timeout: float = 600.0, verify: bool = False):
        if prefill_chunk < 1:
            raise LemonsliceError("prefill_chunk must be >= 1")
        # The driver reads manifest.json and shared.gguf's header (metadata, tokenizer): no weight.
        self.files = WeightStore(model)
        self.args, self.family = self.files.args, self.files.family
        self.playlist = list(range(self.args.n_layer))
        spec = stages if isinstance(stages, str) else ",".join(f"{a}-{b - 1}" for a, b in stages)
        self.ranges = resolve_stages(spec, layer_bytes(self.files, self.playlist))
        self.prefill_chunk, self.timeout = prefill_chunk, timeout
        self.store, self.residency = _Store(self.files, self), _Residency(self)
        self.nodes: list[dict[str, str]] = []  # per stage: host, ip, node_id
        self.opened: list[dict[str, Any]] = []  # per stage: its report when it opened
        self._actors: list[Any] = []
        self._seq, self._n_past, self.failed = 0, 0, False
        self._others = 0  # sequences handed out by new_state
        self._owned = connect(address)
        options = {"max_memory": max_memory, "threads": threads, "exact": exact, "kv_types": tuple(kv_types),
                   "prefill_chunk": prefill_chunk, "playlist": self.playlist, "verify": verify}
        try:
            self._start(str(Path(model).resolve()), options)
        except BaseException:
            self.close()
            raise

    # ---- stages -------------------------------------------------------------------------

    def _start(self, model: str, options: dict[str, Any]) -> None:
        """Place each stage on a node that holds its files, start its actor and open its engine."""
        remote = ray.remote(Stage)
        env = {k: v for k, v in os.environ.items() if k.startswith("LEMONSLICE_")}
        for i, (r, node) in enumerate(zip(self.ranges, self._place())):
            self.nodes.append(node)
            opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0,
                                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node["node_id"], soft=False)}
            if env:  # the stage's process reads the same LEMONSLICE_* settings as this one
                opts["runtime_env"] = {"env_vars": env}
            self._actors.append(remote.options(**opts).remote(i, len(self.ranges), model, r, options))
        refs = [a.open.remote() for a in self._actors]
        self.opened = [self._get(ref, list(enumerate(refs))) for ref in refs]

    def _place(self) -> list[dict[str, str]]:
        """Per stage, the node to run it: one holding all of its files (the least used of those)."""
        nodes = {n["NodeID"]: {"host": n["NodeManagerHostname"], "ip": n["NodeManagerAddress"], "node_id": n["NodeID"]}
                 for n in ray.nodes() if n.get("Alive")}
        if not nodes:
            raise LemonsliceError("the Ray cluster has no live node")
        need = [stage_files(self.files, self.playlist, r) for r in self.ranges]
        return [nodes[n] for n in assign_nodes(self.ranges, need, self._holdings(list(nodes), need))]

    def _holdings(self, nodes: list[str], need: list[StageFiles]) -> dict[str, set[str]]:
        """Node id -> the stages' files it holds with the manifest's sizes, in the cluster's order.
        A lone node gets every stage without asking: each stage checks its own files when it opens."""
        names = {k: v for f in need for k, v in f.sizes.items()}
        if len(nodes) == 1:
            return {nodes[0]: set(names)}
        probe = ray.remote(num_cpus=0)(_present)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote(need[0].directory, names) for n in nodes]
        try:
            here = dict(ray.get(refs, timeout=PROBE_TIMEOUT))
        except RayError as e:
            raise LemonsliceError(f"cannot ask the Ray nodes which model files they hold: {_reason(e)}") from None
        return {n: set(here.get(n, ())) for n in nodes}

    def _label(self, i: int) -> str:
        a, b = self.ranges[i]
        n = self.nodes[i] if i < len(self.nodes) else {"host": "?", "ip": "?", "node_id": "?"}
        return (f"stage {i + 1} of {len(self.ranges)} (positions {a}-{b - 1}) on {n['host']} "
                f"({n['ip']}, node {n['node_id'][:12]})")

    # ---- waiting ------------------------------------------------------------------------

    def _get(self, ref: Any, chain: list[tuple[int, Any]]) -> Any:
        """ray.get of `ref` within the timeout. `chain`: (stage, ref) of every call in flight, in
        submission order; on a failure the first of them that failed names the stage."""
        try:
            return ray.get(ref, timeout=self.timeout)
        except RayError as e:
            self.failed = True
            error = self._failure(chain, e)
        self._kill()
        raise error

    def _failure(self, chain: list[tuple[int, Any]], e: RayError) -> LemonsliceError:
        """One line for a failed wait: the earliest call in `chain` that failed, else the first
        still pending after a timeout."""
        for stage, ref in chain:
            if not ray.wait([ref], timeout=0)[0]:
                continue
            try:
                ray.get(ref, timeout=0)
            except RayTaskError as te:
                cause = te.cause
                if isinstance(cause, LemonsliceError):
                    return LemonsliceError(str(cause))
                text = str(cause).strip().splitlines()
                return LemonsliceError(f"{self._label(stage)} failed: {type(cause).__name__}"
                                       f"{': ' + text[0] if text else ''}")
            except RayError as de:
                return LemonsliceError(f"{self._label(stage)} died ({_reason(de)}); the run is over")
        if isinstance(e, GetTimeoutError):
            late = next((s for s, r in chain if not ray.wait([r], timeout=0)[0]), chain[-1][0] if chain else 0)
            return LemonsliceError(f"{self._label(late)} did not answer within {self.timeout:g} s; the run is over")
        return LemonsliceError(f"the pipeline failed: {_reason(e)}")

    def _all(self, method: str) -> list[Any]:
        """`method` of every stage, answered."""
        self._usable()
        refs = [getattr(a, method).remote() for a in self._actors]
        chain = list(enumerate(refs))
        return [self._get(r, chain) for r in refs]

    def _usable(self) -> None:
        if self.failed or not self._actors:
            raise LemonsliceError("the pipeline is closed" if not self.failed else "the pipeline failed earlier")

    # ---- the Engine look-alike ----------------------------------------------------------

    @property
    def n_past(self) -> int:
        return self._n_past

    @property
    def state(self) -> _RemoteState:
        return _RemoteState(self._n_past)

    @property
    def streaming(self) -> bool:
        return any(r["streaming"] for r in self.opened)

    @property
    def weight_bytes(self) -> int:
        """The weight bytes the stages run with (shared tensors counted where they are used)."""
        return sum(r["weight_bytes"] for r in self.opened)

    def reset(self) -> None:
        """Forget the default sequence: the stages drop its state (not waited for)."""
        old, self._seq, self._n_past = self._seq, self._seq + 1, 0
        if not self.failed:
            for a in self._actors:
                a.drop.remote(old)

    def new_state(self) -> RemoteSequence:
        """A sequence of its own, for `forward_batch` (the stages make its caches on first use)."""
        self._others += 1
        return RemoteSequence(-self._others)  # negative: apart from the default sequence's ids

    def release_state(self, state: RemoteSequence) -> None:
        """The stages forget `state` (not waited for)."""
        if not self.failed:
            for a in self._actors:
                a.drop.remote(state.seq)

    def forward_batch(self, states: Sequence[RemoteSequence], inputs: Sequence[Sequence[int]], *,
                      logits: str | None = "last") -> list[torch.Tensor]:
        """One step of several sequences down the stages; the last stage's logits per sequence.
        The sequences go in as many groups as there are stages, each group's calls chained
        without waiting, so stage 1 runs group 2 while stage 2 runs group 1 (every row gets the
        bits it would get in one batch: the kernels do not mix rows)."""
        if logits != "last":
            raise LemonsliceError("a pipeline's batched step returns the last position's logits")
        self._usable()
        n = len(states)
        k = min(n, len(self._actors))
        bounds = [n * g // k for g in range(k + 1)]
        finals, chain = [], []
        for g in range(k):
            xs: Any = [[int(t) for t in ids] for ids in inputs[bounds[g]:bounds[g + 1]]]
            seqs = [s.seq for s in states[bounds[g]:bounds[g + 1]]]
            for i, actor in enumerate(self._actors):
                xs = actor.forward_many.remote(seqs, xs, "last" if i == len(self._actors) - 1 else "hidden")
                chain.append((i, xs))
            finals.append(xs)
        out = [o for ref in finals for o in self._get(ref, chain)]
        for s, ids in zip(states, inputs):
            s.n_past += len(ids)
        return [torch.from_numpy(np.array(o)) for o in out]

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `ids` to the sequence; logits [T, V] of every new position, or [1, V] of the last.
        Prefill chunks follow each other down the stages, a few in flight at once."""
        ids = [int(t) for t in ids]
        if not ids:
            raise LemonsliceError("no token ids given")
        self._usable()
        C, window = self.prefill_chunk, len(self._actors) + 1
        pending: list[tuple[Any, list[tuple[int, Any]]]] = []
        outs = []
        for k in range(0, len(ids), C):
            if len(pending) >= window:
                outs.append(self._collect(pending))
            x: Any = ids[k:k + C]
            chain = []
            for i, actor in enumerate(self._actors):
                last = i == len(self._actors) - 1
                out = ("all" if all_logits else "last" if k + C >= len(ids) else "none") if last else "hidden"
                x = actor.forward.remote(self._seq, x, out)
                chain.append((i, x))
            pending.append((x, chain))
        while pending:
            outs.append(self._collect(pending))
        self._n_past += len(ids)
        got = [o for o in outs if o is not None]
        return torch.from_numpy(np.concatenate(got) if len(got) > 1 else np.array(got[0]))

    def _collect(self, pending: list[tuple[Any, list[tuple[int, Any]]]]) -> Any:
        """The oldest chunk's answer; the calls of every chunk in flight name a failure."""
        final, _ = pending[0]
        value = self._get(final, [c for _, chain in pending for c in chain])
        pending.pop(0)
        return value

    def reports(self) -> list[dict[str, Any]]:
        """Each stage's report now: host, pid, positions, weight bytes by kind, files opened,
        peak RSS, I/O counters."""
        return self._all("report")

    def pids(self) -> list[int]:
        """Each stage's worker process id."""
        return self._all("ping")

    # ---- the end ------------------------------------------------------------------------

    def _kill(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  (already dead, or Ray already gone)
                pass

    def close(self) -> None:
        """Kill the stages; shut down the local Ray this pipeline started. Safe to call twice."""
        if ray.is_initialized():
            self._kill()
        self._actors = []
        self.files.close()
        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
