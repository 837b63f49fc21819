"""RYS sweeps: score probe suites on every "repeat block (i, j)" playlist of one loaded model.

Candidate (i, j) runs layers 0..j and then i..N-1, so layers i..j (inclusive, as in
`--layers "repeat i-j"`) run twice: RYS's `rys_27-30` is (27, 30). Blocks of `block`
layers start at start, start + stride, ... and end at most at layer `end`; the baseline
(every layer once) is scored first. Every candidate is a runtime playlist of the same
Engine: no GGUF is written.

OUTDIR holds

* ``sweep.json``: the validated declarative config (model fingerprint, blocks, probes with
  their sha256, limit, thinking, generation length, chat template hash). A rerun with the
  same config resumes; a different one is refused.
* ``results.json``: every finished configuration (scores, deltas against the baseline,
  per-category means, each item's reply and score), rewritten atomically after each one,
  and ``results.csv``, the same rows flattened.
* ``heatmap_<probe>.png``: score minus baseline over (start i, end j), once all are done.

Format v1 labelled blocks half-open (``8-16`` for layers 8..15); an OUTDIR in it is
converted to the inclusive v2 notation when a sweep resumes there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..engine import Engine
from ..errors import LemonsliceError
from ..slicing.atomic import write_text
from .generate import ChatPrompter, greedy, stop_ids
from .heatmap import draw_heatmaps
from .probes import ProbeItem, ProbeSuite

__all__ = [
    "CONFIG_FILE", "CSV_FILE", "DEFAULT_MAX_NEW_TOKENS", "RESULTS_FILE", "Candidate", "SweepConfig",
    "SweepError", "compact_playlist", "load_results", "make_config", "repeat_playlist", "run_sweep",
]

log = logging.getLogger(__name__)

CONFIG_FORMAT = "lemonslice-sweep-v2"
RESULTS_FORMAT = "lemonslice-sweep-results-v2"
# v1 labelled blocks half-open ("8-16" = layers 8..15); v2 is inclusive like --layers.
_V1_CONFIG_FORMAT, _V1_RESULTS_FORMAT = "lemonslice-sweep-v1", "lemonslice-sweep-results-v1"
CONFIG_FILE = "sweep.json"
RESULTS_FILE = "results.json"
CSV_FILE = "results.csv"
BASELINE = "baseline"

# Replies the scorers read are short without thinking; with it, the reasoning comes first.
DEFAULT_MAX_NEW_TOKENS = {"math": 24, "exact": 24, "eq": 48}
THINKING_MAX_NEW_TOKENS = 1024

Progress = Callable[[int, int, str], None]  # (items done, items in total, current configuration)


class SweepError(LemonsliceError):
    """A sweep cannot start or resume (bad options, a foreign OUTDIR, a damaged results file)."""


def repeat_playlist(n_layer: int, start: int, end: int) -> list[int]:
    """Layers 0..end, then start..n_layer-1: the block start..end (inclusive) runs twice."""
    return list(range(end + 1)) + list(range(start, n_layer))


def compact_playlist(playlist: Sequence[int]) -> str:
    """[0, 1, 2, 1, 2, 3] -> "0-2,1-3" (inclusive runs of consecutive layers)."""
    runs: list[list[int]] = []
    for layer in playlist:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class Candidate:
    name: str  # "baseline" or "<i>-<j>", layers i..j inclusive
    start: int | None
    end: int | None
    playlist: tuple[int, ...]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_MODEL_KEYS = {"name": str, "arch": str, "n_layer": int, "weight_bytes": int}
_PROBE_KEYS = {"name": str, "source": str, "sha256": str, "scorer": str, "items": int}


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep computes; two runs with equal configs produce the same results."""

    model: Mapping[str, Any]  # name, arch, n_layer, weight_bytes
    block: int
    stride: int
    start: int  # blocks lie within layers start..end, inclusive
    end: int
    probes: tuple[Mapping[str, Any], ...]  # name, source, sha256, scorer, items (after --limit)
    limit: int | None
    thinking: bool
    max_new_tokens: int | None
    chat_template_sha256: str
    format: str = CONFIG_FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "probes", tuple(dict(p) for p in self.probes))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SweepError(msg)

        need(self.format == CONFIG_FORMAT, f"format must be {CONFIG_FORMAT!r}, got {self.format!r}")
        for key, kind in _MODEL_KEYS.items():
            v = self.model.get(key)
            need(isinstance(v, kind) and not isinstance(v, bool), f"model.{key} must be a {kind.__name__}")
        need(set(self.model) == set(_MODEL_KEYS), f"model must have exactly the keys {', '.join(_MODEL_KEYS)}")
        n = self.model["n_layer"]
        for key in ("block", "stride", "start", "end"):
            need(_is_int(getattr(self, key)), f"{key} must be an integer")
        need(n >= 1, "model.n_layer must be >= 1")
        need(self.block >= 1, f"--block must be >= 1, got {self.block}")
        need(self.stride >= 1, f"--stride must be >= 1, got {self.stride}")
        need(0 <= self.start <= self.end < n, f"--range must satisfy 0 <= i <= j < {n}, got {self.start}-{self.end}")
        need(self.end - self.start + 1 >= self.block,
             f"--range {self.start}-{self.end} is shorter than a block of {self.block} layers")
        need(self.limit is None or (_is_int(self.limit) and self.limit >= 1), "--limit must be >= 1")
        need(isinstance(self.thinking, bool), "thinking must be true or false")
        need(self.max_new_tokens is None or (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
             "--max-new-tokens must be >= 1")
        need(isinstance(self.chat_template_sha256, str) and len(self.chat_template_sha256) == 64,
             "chat_template_sha256 must be a sha256 hex digest")
        need(len(self.probes) >= 1, "at least one probe suite is needed")
        for p in self.probes:
            ok = set(p) == set(_PROBE_KEYS) and all(
                isinstance(p[k], t) and not isinstance(p[k], bool) for k, t in _PROBE_KEYS.items())
            need(ok, f"each probe must have exactly the keys {', '.join(_PROBE_KEYS)} with the right types")
            need(p["items"] >= 1, f"probe {p['name']!r} has no items")
        names = [p["name"] for p in self.probes]
        need(len(set(names)) == len(names), "probe names must differ")

    def candidates(self) -> list[Candidate]:
        """The baseline, then every block i..j = i + block - 1 with start <= i and j <= end."""
        n = self.model["n_layer"]
        out = [Candidate(BASELINE, None, None, tuple(range(n)))]
        for i in range(self.start, self.end - self.block + 2, self.stride):
            j = i + self.block - 1
            out.append(Candidate(f"{i}-{j}", i, j, tuple(repeat_playlist(n, i, j))))
        return out

    def max_new_tokens_for(self, scorer: str) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return THINKING_MAX_NEW_TOKENS if self.thinking else DEFAULT_MAX_NEW_TOKENS[scorer]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["probes"] = list(d["probes"])
        return {"format": d.pop("format"), **d}

    @classmethod
    def from_json(cls, data: Any) -> "SweepConfig":
        if not isinstance(data, dict):
            raise SweepError("a sweep config must be a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        missing = sorted(fields - set(data))
        if unknown or missing:
            raise SweepError(f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}")
        if not isinstance(data["model"], dict) or not isinstance(data["probes"], list):
            raise SweepError("model must be an object and probes a list")
        if not all(isinstance(p, dict) for p in data["probes"]):
            raise SweepError("each probe must be an object")
        return cls(**{**data, "probes": tuple(data["probes"])})


def model_info(engine: Engine) -> dict[str, Any]:
    """What identifies the model in a config: its file name, architecture, layers and size."""
    return {
        "name": engine.store.path.name,
        "arch": str(engine.args.arch),
        "n_layer": int(engine.args.n_layer),
        "weight_bytes": int(engine.store.nbytes(None) + sum(engine.store.nbytes(i) for i in range(engine.args.n_layer))),
    }


def make_config(
    engine: Engine, suites: Sequence[ProbeSuite], prompter: ChatPrompter, *, block: int, stride: int,
    layer_range: tuple[int, int] | None, limit: int | None, max_new_tokens: int | None,
) -> SweepConfig:
    start, end = layer_range if layer_range is not None else (0, engine.args.n_layer - 1)
    probes = tuple(
        {"name": s.name, "source": s.source, "sha256": s.sha256, "scorer": s.scorer, "items": len(s.limited(limit))}
        for s in suites
    )
    return SweepConfig(
        model=model_info(engine), block=block, stride=stride, start=start, end=end, probes=probes,
        limit=limit, thinking=prompter.thinking, max_new_tokens=max_new_tokens,
        chat_template_sha256=prompter.fingerprint,
    )


# ---- OUTDIR: config, results, CSV ---------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{path} is not valid JSON: {e}") from None


def _first_difference(saved: Any, new: Any, where: str = "") -> str:
    """The first field that differs, e.g. "model.name: saved "a.gguf", now "b.gguf"."""
    if isinstance(saved, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in saved if k not in new)]:
            if saved.get(key) != new.get(key):
                return _first_difference(saved.get(key), new.get(key), f"{where}.{key}" if where else key)
    if isinstance(saved, list) and isinstance(new, list) and len(saved) == len(new):
        for i, (a, b) in enumerate(zip(saved, new)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where}: saved {json.dumps(saved)[:80]}, now {json.dumps(new)[:80]}"


def _open_outdir(outdir: Path, config: SweepConfig) -> list[dict[str, Any]]:
    """Create OUTDIR with sweep.json, or check that it holds this sweep; the finished rows."""
    if outdir.exists() and not outdir.is_dir():
        raise SweepError(f"{outdir} exists and is not a directory")
    config_path = outdir / CONFIG_FILE
    if not config_path.exists():
        leftovers = [p for p in outdir.iterdir() if ".lemonslice-tmp-" not in p.name] if outdir.exists() else []
        if leftovers:
            raise SweepError(f"{outdir} is not empty and has no {CONFIG_FILE}; choose a new -o directory")
        outdir.mkdir(parents=True, exist_ok=True)
        write_text(config_path, json.dumps(config.to_json(), indent=1) + "\n")
        return []
    _upgrade_v1(outdir)
    try:
        saved = SweepConfig.from_json(_read_json(config_path))
    except SweepError as e:
        raise SweepError(f"{config_path}: {e}") from None
    if saved != config:
        diff = _first_difference(saved.to_json(), config.to_json())
        raise SweepError(
            f"{outdir} holds a different sweep ({diff}); use a new -o directory to run this one"
        )
    return load_results(outdir, config)


def _upgrade_v1(outdir: Path) -> None:
    """Rewrite a v1 OUTDIR (half-open block labels) in the inclusive v2 notation.

    results.json goes first and is converted only while it says v1, so a conversion killed
    before sweep.json is rewritten is simply finished by the next run."""
    config_path, results_path = outdir / CONFIG_FILE, outdir / RESULTS_FILE
    cfg = _read_json(config_path)
    if not isinstance(cfg, dict) or cfg.get("format") != _V1_CONFIG_FORMAT:
        return
    if not _is_int(cfg.get("end")):
        raise SweepError(f"{config_path}: end must be an integer")
    cfg = {**cfg, "format": CONFIG_FORMAT, "end": cfg["end"] - 1}
    config = SweepConfig.from_json(cfg)
    if results_path.exists():
        data = _read_json(results_path)
        if isinstance(data, dict) and data.get("format") == _V1_RESULTS_FORMAT and isinstance(data.get("rows"), list):
            rows = []
            for row in data["rows"]:
                if isinstance(row, dict) and _is_int(row.get("start")) and _is_int(row.get("end")):
                    row = {**row, "end": row["end"] - 1, "config": f"{row['start']}-{row['end'] - 1}"}
                rows.append(row)
            data = {**data, "format": RESULTS_FORMAT, "rows": rows}
            write_text(results_path, json.dumps(data, ensure_ascii=False))
            _save(outdir, config, load_results(outdir, config))
    write_text(config_path, json.dumps(config.to_json(), indent=1) + "\n")
    log.warning("%s: converted from half-open block labels (8-16 was layers 8..15) to inclusive ones (8-15)", outdir)


def load_results(outdir: Path, config: SweepConfig) -> list[dict[str, Any]]:
    """The finished rows in OUTDIR's results.json, checked against the config's candidates."""
    path = outdir / RESULTS_FILE
    if not path.exists():
        return []
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT or not isinstance(data.get("rows"), list):
        raise SweepError(f"{path} is not a {RESULTS_FORMAT} file")
    by_name = {c.name: c for c in config.candidates()}
    names = [p["name"] for p in config.probes]
    seen: set[str] = set()
    for row in data["rows"]:
        cand = by_name.get(row.get("config")) if isinstance(row, dict) else None
        ok = (
            cand is not None and row["config"] not in seen and row.get("playlist") == list(cand.playlist)
            and isinstance(row.get("scores"), dict) and sorted(row["scores"]) == sorted(names)
        )
        if not ok:
            raise SweepError(f"{path} has a row that does not belong to {outdir / CONFIG_FILE}")
        seen.add(row["config"])
    return data["rows"]


def _csv_text(rows: Sequence[dict[str, Any]], probes: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["config", "start", "end", "n_layers", "playlist",
                *[c for p in probes for c in (p, f"{p}_delta")], "seconds", "finished_at"])
    for r in rows:
        cells = [r["config"], r["start"] if r["start"] is not None else "", r["end"] if r["end"] is not None else "",
                 r["n_layers"], compact_playlist(r["playlist"])]
        for p in probes:
            delta = r["delta"].get(p)
            cells += [f"{r['scores'][p]:.6g}", "" if delta is None else f"{delta:.6g}"]
        w.writerow([*cells, f"{r['seconds']:.1f}", r["finished_at"]])
    return buf.getvalue()


def _save(outdir: Path, config: SweepConfig, rows: list[dict[str, Any]]) -> None:
    # results.json is the record a resume reads; the CSV is rebuilt from it every time.
    probes = [p["name"] for p in config.probes]
    base = next((r["scores"] for r in rows if r["config"] == BASELINE), None)
    head = {"format": RESULTS_FORMAT, "model": config.model, "baseline": base}
    # One row per line: readable with grep/jq, and still one JSON document.
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    write_text(outdir / RESULTS_FILE, json.dumps(head, ensure_ascii=False)[:-1] + f', "rows": [\n{body}\n]}}\n')
    write_text(outdir / CSV_FILE, _csv_text(rows, probes))


# ---- running ------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _score_candidate(
    engine: Engine, cand: Candidate, suites: Sequence[tuple[ProbeSuite, tuple[ProbeItem, ...]]],
    prompts: Mapping[tuple[str, str], tuple[list[int], bool]], prompter: ChatPrompter, stop: frozenset[int],
    config: SweepConfig, tick: Callable[[], None],
) -> dict[str, Any]:
    engine.set_playlist(cand.playlist)
    t0 = time.perf_counter()
    scores: dict[str, float] = {}
    categories: dict[str, dict[str, float]] = {}
    items_out: dict[str, list[dict[str, Any]]] = {}
    for suite, items in suites:
        max_new = config.max_new_tokens_for(suite.scorer)
        rows = []
        for item in items:
            ids, opened = prompts[suite.name, item.id]
            gen = greedy(engine, ids, prompter.tokenizer, max_new, stop, done=item.done, opened_think=opened)
            rows.append({"id": item.id, "category": item.category, "score": item.score(gen.answer),
                         "reply": gen.text, "tokens": len(gen.ids), "stop": gen.stop})
            tick()
        scores[suite.name] = _mean([r["score"] for r in rows])
        cats = sorted({r["category"] for r in rows if r["category"] is not None})
        categories[suite.name] = {c: _mean([r["score"] for r in rows if r["category"] == c]) for c in cats}
        items_out[suite.name] = rows
    return {
        "config": cand.name, "start": cand.start, "end": cand.end, "n_layers": len(cand.playlist),
        "playlist": list(cand.playlist), "scores": scores, "delta": {}, "categories": categories,
        "seconds": time.perf_counter() - t0,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "items": items_out,
    }


def run_sweep(
    engine: Engine, suites: Sequence[ProbeSuite], prompter: ChatPrompter, config: SweepConfig, outdir: Path,
    *, progress: Progress | None = None, on_resume: Callable[[int, int], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every candidate not yet in OUTDIR (baseline first); returns all rows in order.

    Each finished candidate is written to results.json/.csv at once (atomic rename), so a
    killed sweep loses at most the candidate it was running. `progress` hears of every item,
    `on_resume` of the candidates already done, `on_row` of each finished one.
    """
    outdir = Path(outdir)
    names = [s.name for s in suites]
    if names != [p["name"] for p in config.probes]:
        raise SweepError("the probe suites do not match the sweep config")
    rows = _open_outdir(outdir, config)
    cands = config.candidates()
    finished = {r["config"] for r in rows}
    todo = [c for c in cands if c.name not in finished]
    if on_resume is not None and finished:
        on_resume(len(finished), len(cands))
    limited = [(s, s.limited(config.limit)) for s in suites]
    # Prompts do not depend on the playlist: tokenize each once.
    prompts = {(s.name, it.id): prompter.ids(it.prompt) for s, items in limited for it in items}
    stop = stop_ids(prompter.tokenizer, engine.store.metadata)
    per_cand = sum(len(items) for _, items in limited)
    total, done, label = per_cand * len(todo), 0, ""

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    original = list(engine.playlist)
    try:
        for cand in todo:
            label = cand.name
            if progress is not None:
                progress(done, total, label)
            row = _score_candidate(engine, cand, limited, prompts, prompter, stop, config, tick)
            rows.append(row)
            rows.sort(key=lambda r: [c.name for c in cands].index(r["config"]))
            _fill_deltas(rows)
            _save(outdir, config, rows)
            log.info("%s: %s (%.1f s)", cand.name,
                     ", ".join(f"{k} {v:.4g}" for k, v in row["scores"].items()), row["seconds"])
            if on_row is not None:
                on_row(row)
    finally:
        engine.set_playlist(original)
    if not todo:
        _fill_deltas(rows)
        _save(outdir, config, rows)
    draw_heatmaps(outdir, config, rows)
    return rows


def _fill_deltas(rows: list[dict[str, Any]]) -> None:
    base = next((r["scores"] for r in rows if r["config"] == BASELINE), None)
    for r in rows:
        r["delta"] = {} if base is None else {k: v - base[k] for k, v in r["scores"].items()}
