"""Memory budgets: the limit this process runs under, and the per-tensor residency plan for it.

The plan is made once, from the tensors' sizes alone (no weight is read): the shared weights
stay resident (a separate LM head makes the token embedding a per-row read), then every
non-expert tensor of every playlist entry, the ones read most bytes per token first, while
the budget holds them plus the scratch a streamed layer needs. What is left of the budget
goes to the routed-expert cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import LemonsliceError

# Memory beyond the weights a run needs under a detected limit: activations, caches for a
# modest context, allocator slack, plus a twentieth of the limit. Measured in a 4 GiB cgroup:
# with anonymous memory within ~0.7 GiB of the limit, reclaiming the libraries' page cache
# stalled decode 10-20x; 0.75 GiB clear ran at full speed.
RESERVE = 320 << 20
RESERVE_FRACTION = 20


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _memory_cgroups(proc: Path, root: Path) -> list[tuple[Path, Path, bool]]:
    """(controller root, this process's cgroup dir, is v2) for each memory hierarchy it is in."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            out.append((root, root / rel.lstrip("/"), True))
        elif "memory" in controllers.split(","):
            out.append((root / "memory", root / "memory" / rel.lstrip("/"), False))
    return out


def cgroup_limit(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's memory limit from its cgroup (v2 memory.max, v1 memory.limit_in_bytes),
    the smallest along its path; None when unlimited or unknown."""
    limits = []
    for base, d, v2 in _memory_cgroups(proc, root):
        name = "memory.max" if v2 else "memory.limit_in_bytes"
        while True:
            n = _read_int(d / name)
            # v1 spells "no limit" as a huge number near 2^63.
            if n is not None and n < 1 << 60:
                limits.append(n)
            if d == base or base not in d.parents:
                break
            d = d.parent
    return min(limits) if limits else None


def cgroup_usage(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the process's memory cgroup holds now (page cache included)."""
    for _, d, v2 in _memory_cgroups(proc, root):
        return _read_int(d / ("memory.current" if v2 else "memory.usage_in_bytes"))
    return None


def cgroup_room() -> int | None:
    """What this process's memory cgroup may still charge (its limit less its usage); None
    without a limit."""
    limit, usage = cgroup_limit(), cgroup_usage()
    return None if limit is None or usage is None else max(0, limit - usage)


def _kib_field(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    return _kib_field("/proc/meminfo", "MemAvailable")


def rss() -> int:
    """This process's resident set now, in bytes."""
    return _kib_field("/proc/self/status", "VmRSS") or 0


def peak_rss() -> int | None:
    """This process's peak resident set (VmHWM), in bytes."""
    return _kib_field("/proc/self/status", "VmHWM")


def detect_budget() -> tuple[int | None, str]:
    """(weight budget, where it came from) when no budget is given: the cgroup limit when there
    is one, else 80% of the memory available now, less what the process holds and a reserve."""
    limit = cgroup_limit()
    if limit is not None:
        # The cgroup's usage now counts the interpreter and the libraries' page cache it must keep.
        held = max(rss(), cgroup_usage() or 0)
        return max(0, limit - held - RESERVE - limit // RESERVE_FRACTION), f"cgroup limit {human(limit)}"
    avail = available_memory()
    if avail is None:
        return None, "no limit found"
    return avail * 8 // 10, "80% of available memory"


def human(n: int) -> str:
    """Bytes for messages: 1.5 GiB, 300.0 MiB, 12.0 KiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---- the per-tensor plan ----------------------------------------------------------------


@dataclass(frozen=True)
class EntryTensors:
    """One distinct playlist entry: its non-expert tensors, how often it runs per token, and
    the bytes of one of its routed experts (0 for a dense block)."""

    entry: Any
    tensors: dict[str, int]  # name -> bytes
    count: int
    expert_bytes: int
    experts_per_token: int


@dataclass(frozen=True)
class TensorPlan:
    budget: int
    shared_bytes: int  # resident shared tensors
    resident: frozenset[tuple[Any, str]]  # (entry, tensor name) kept resident
    resident_bytes: int  # of those
    streamed_bytes_per_token: int  # non-expert bytes read per token
    scratch: int  # the largest streamed layer part plus expert reads in flight
    expert_cache: int  # bytes for cached experts
    expert_bytes_per_token: int  # routed-expert bytes one token uses (all read on misses)
    minimum: int  # the smallest budget that runs at all

    def lines(self, human: Callable[[int], str]) -> list[str]:
        """A readable account of the plan (`inspect --budget`)."""
        return [
            f"budget: {human(self.budget)} (at least {human(self.minimum)} to run at all)",
            f"resident: {human(self.shared_bytes)} shared + {human(self.resident_bytes)} of layer tensors "
            f"({len(self.resident)} tensors)",
            f"read per token: {human(self.streamed_bytes_per_token)} of layer tensors + the routed experts "
            f"that miss the cache (at most {human(self.expert_bytes_per_token)})",
            f"expert cache: {human(self.expert_cache)}; scratch: {human(self.scratch)}",
        ]


def plan_tensors(budget: int, shared_bytes: int, entries: Sequence[EntryTensors], in_flight: int) -> TensorPlan:
    """Place non-expert tensors by bytes read per token (size x uses per token), then give the
    rest of `budget` to the expert cache. `in_flight`: bytes of expert reads under way at once."""
    layer_max = max((sum(x.tensors.values()) for x in entries), default=0)
    minimum = shared_bytes + layer_max + in_flight
    if budget < minimum:
        raise LemonsliceError(f"a weight budget of {human(budget)} cannot run this model: one token needs at least "
                              f"{human(minimum)} ({human(shared_bytes)} shared, {human(layer_max)} for a layer, "
                              f"{human(in_flight)} of expert reads)")
    units = sorted(((n * x.count, n, x.entry, name) for x in entries for name, n in x.tensors.items()),
                   key=lambda u: (-u[0], -u[1]))
    total = sum(u[1] for u in units)
    room = budget - shared_bytes - in_flight
    # All resident needs no streaming scratch; otherwise hold back room for the largest layer.
    reserve = 0 if total <= room else layer_max
    resident, used = set(), 0
    for _, n, entry, name in units:
        if used + n <= room - reserve:
            resident.add((entry, name))
            used += n
    streamed = [(x, sum(n for name, n in x.tensors.items() if (x.entry, name) not in resident)) for x in entries]
    scratch = max((s for _, s in streamed), default=0)
    return TensorPlan(
        budget=budget, shared_bytes=shared_bytes, resident=frozenset(resident), resident_bytes=used,
        streamed_bytes_per_token=sum(s * x.count for x, s in streamed), scratch=scratch + in_flight,
        expert_cache=max(0, budget - shared_bytes - used - scratch - in_flight),
        expert_bytes_per_token=sum(x.expert_bytes * x.experts_per_token * x.count for x in entries),
        minimum=minimum,
    )


def env_int(name: str, default: int) -> int:
    """An integer tuning knob from the environment (for benchmarks)."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise LemonsliceError(f"{name} must be an integer, got {os.environ[name]}") from None
