"""The command line's conventions and outputs, checked through the real entry point.

Help, version and metavariables go through Typer's CliRunner on the app every command is
registered on; everything that prints an error or generates runs the installed console
script. Expected values come from llama.cpp (tokenizer, logits), gguf-py (file types),
hand-worked numbers, or the engine's own greedy tokens when what is under test is only
how the CLI reports them.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import typer.main
from typer.testing import CliRunner

from lemonslice.cli import app
from lemonslice.engine import Engine
from lemonslice.eval.perplexity import perplexity, ppl_uncertainty
from lemonslice.slicing import split_gguf
from lemonslice.testing import tiny_qwen35, write_synthetic
from lemonslice.text.prompt import stop_ids
from lemonslice.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
SAMPLING_FLAGS = ("--temperature", "--top-k", "--top-p", "--min-p", "--presence-penalty", "--repeat-penalty",
                  "--seed", "--preset", "--stop")


def cli(*args: object, stdin: str | None = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """The console script; stdin is an empty pipe unless given (None: inherit)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, input=stdin, env=env,
                          timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    return last


def stop_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("stop: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("conv") / "tiny.gguf", tiny_qwen35())


def command_paths() -> list[tuple[str, ...]]:
    """Every command, nested ones (mtp inject) as paths; the groups themselves too."""
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = [()]

    def walk(group, prefix: tuple[str, ...]) -> None:  # noqa: ANN001
        for name, cmd in group.commands.items():
            paths.append((*prefix, name))
            if hasattr(cmd, "commands"):
                walk(cmd, (*prefix, name))

    walk(root, ())
    return paths


def command_of(path: tuple[str, ...]):  # noqa: ANN201
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


# ---- -h, --version, examples, metavariables -------------------------------------------------


def test_every_command_has_h_version_and_an_example():
    runner = CliRunner()
    version = importlib.metadata.version("lemonslice")
    paths = command_paths()
    assert {("run",), ("tokenize",), ("detokenize",), ("mtp", "inject"), ("chat",)} <= set(paths)
    for path in paths:
        short = runner.invoke(app, [*path, "-h"], prog_name="lemonslice")
        long = runner.invoke(app, [*path, "--help"], prog_name="lemonslice")
        assert short.exit_code == 0 and short.output == long.output, (path, short.output)
        usage = next(ln for ln in short.output.splitlines() if "Usage:" in ln)
        assert f"Usage: {' '.join(('lemonslice', *path))} [OPTIONS]" in usage
        # One metavariable style: upper-case names, never Typer's {outdir}.
        assert all(w.strip("[].").isupper() for w in usage.split("[OPTIONS]")[1].split()), usage
        assert "Example:" in short.output and "lemonslice " in short.output.split("Example:")[1], path
        v = runner.invoke(app, [*path, "--version"], prog_name="lemonslice")
        assert (v.exit_code, v.output) == (0, f"lemonslice {version}\n"), path


def test_metavariables_are_upper_case_and_output_is_dash_o():
    for path in command_paths()[1:]:
        cmd = command_of(path)
        params = cmd.get_params(typer.Context(cmd, info_name=path[-1]))
        for p in params:
            if p.param_type_name == "argument" or not getattr(p, "is_flag", False):
                assert p.metavar and re.fullmatch(r"[A-Z][A-Z_-]*(\.\.\.)?", p.metavar), (path, p.name, p.metavar)
            decls = [*p.opts, *p.secondary_opts]
            if "-o" in decls:
                assert "--output" in decls, (path, decls)
    merge = CliRunner().invoke(app, ["merge", "-h"], prog_name="lemonslice").output
    assert "Usage: lemonslice merge [OPTIONS] OUTDIR MODEL" in merge


def test_every_sampling_flag_of_run_has_help():
    cmd = command_of(("run",))
    by_flag = {o: p for p in cmd.get_params(typer.Context(cmd, info_name="run")) for o in p.opts}
    for flag in SAMPLING_FLAGS:
        assert by_flag[flag].help and len(by_flag[flag].help) > 15, flag
    assert by_flag["--temp"] is by_flag["--temperature"] and by_flag["-s"] is by_flag["--seed"]


def test_chat_takes_the_same_sampling_names(tiny):
    cmd = command_of(("chat",))
    by_flag = {o: p for p in cmd.get_params(typer.Context(cmd, info_name="chat")) for o in p.opts}
    assert by_flag["--temp"] is by_flag["--temperature"] and by_flag["-s"] is by_flag["--seed"]
    assert all(by_flag[f].help for f in ("--temperature", "--seed"))
    r = cli("chat", tiny, "--temp", "0.9", "--seed", "-1", "-n", "2", stdin="hello\n")
    assert r.returncode == 0 and re.search(r"^seed: \d+$", r.stderr, re.M), r.stderr


def test_mistyped_option_gets_the_closest_real_one(tiny):
    r = cli("run", tiny, "-p", "hi", "--temperatur", "0.7")
    assert r.returncode == 2 and "No such option: --temperatur. Did you mean --temperature?" in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: No such option: --temperatur. Did you mean --temperature? (see 'lemonslice run -h')"]
    r = cli("run", tiny, "-p", "hi", "--tmp", "0.7")
    assert r.returncode == 2 and "Did you mean --temp?" in r.stderr
    for args in (("run",), ("run", tiny, "-n", "abc"), ("frobnicate",)):
        r = cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stdout == "", (args, r.stderr)


def test_sweep_output_option_and_its_old_spelling(tiny, tmp_path):
    # The old -o/--out spelling still parses (the probe error comes first, before any output).
    r = cli("sweep", tiny, "--out", tmp_path / "o", "--probes", "nosuch")
    assert "nosuch" in one_line_error(r) and "No such option" not in r.stderr
    assert one_line_error(cli("sweep", tiny, "--probes", "math")) == (
        "error: give the results directory: -o/--output OUTDIR")


# ---- llama.cpp's names: --temp, -s, -c/--ctx-size, -f/--file, -p -, stdin, --seed -1 -------


def test_prompt_from_file_stdin_and_dash_is_the_same_prompt(tiny, tmp_path):
    want = cli("run", tiny, "-p", "hello there", "-n", "6")
    assert want.returncode == 0, want.stderr
    f = tmp_path / "prompt.txt"
    f.write_text("hello there\n")  # one trailing newline is dropped, as llama.cpp's -f does
    for args, stdin in ((["-f", f], ""), (["-p", "-"], "hello there\n"), ([], "hello there")):
        r = cli("run", tiny, *args, "-n", "6", stdin=stdin)
        assert (r.returncode, r.stdout) == (0, want.stdout), (args, r.stderr)
    assert one_line_error(cli("run", tiny, "-n", "6")) == "error: no prompt on stdin"
    assert one_line_error(cli("run", tiny, "-p", "x", "-f", f)) == "error: give exactly one of -p/--prompt and -f/--file"


def test_temp_alias_seed_minus_one_and_seed_printed(tiny):
    r = cli("run", tiny, "-p", "hello", "-n", "8", "--temp", "0.9", "--seed", "-1")
    assert r.returncode == 0, r.stderr
    seed = int(re.search(r"^seed: (\d+)$", r.stderr, re.M).group(1))
    # The printed seed reproduces the run, under either spelling of each flag.
    again = cli("run", tiny, "-p", "hello", "-n", "8", "--temperature", "0.9", "-s", str(seed))
    assert (again.stdout, f"seed: {seed}\n" in again.stderr) == (r.stdout, True)
    greedy = cli("run", tiny, "-p", "hello", "-n", "4")
    assert greedy.returncode == 0 and "seed:" not in greedy.stderr
    assert "--seed must be -1 (random) or a number >= 0, got -2" in one_line_error(
        cli("run", tiny, "-p", "hello", "--temp", "0.5", "--seed", "-2"))


def test_ctx_size_limits_the_context(tiny):
    r = cli("run", tiny, "--prompt-ids", "1,2,3", "-c", "7", "-n", "100")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split(":")[1].split()) == 4 and stop_line(r) == "stop: context full (7 tokens)"
    # 0 means the model's context_length (4096 here), which does not bind.
    r = cli("run", tiny, "--prompt-ids", "1,2,3", "--ctx-size", "0", "-n", "5")
    assert len(r.stdout.split(":")[1].split()) == 5 and stop_line(r) == "stop: length (5 tokens)"
    assert "a context of 3 leaves no room" in one_line_error(cli("run", tiny, "--prompt-ids", "1,2,3", "-c", "3"))


# ---- stop reasons ---------------------------------------------------------------------------


def _with_eos(src: Path, dst: Path, eos: int) -> Path:
    """A copy of `src` whose tokenizer.ggml.eos_token_id (a fixed-width uint32) is `eos`."""
    data = bytearray(src.read_bytes())
    key = b"tokenizer.ggml.eos_token_id"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4  # GGUF value type 4: uint32
    data[at + 4:at + 8] = eos.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def test_run_prints_why_it_stopped(tiny, tmp_path):
    tok = Tokenizer.from_gguf(tiny)
    ids = tok.encode("hello there")
    engine = Engine(tiny)
    want = engine.generate(ids, 10)  # greedy; what is under test is the CLI's report of it
    assert not set(want) & stop_ids(tok, engine.store.metadata)

    r = cli("run", tiny, "-p", "hello there", "-n", "4")
    assert stop_line(r) == "stop: length (4 tokens)"

    # End of text: the same model with its EOS id set to the k-th greedy token.
    k = next(i for i in range(1, len(want)) if want[i] not in want[:i])
    eos_model = _with_eos(tiny, tmp_path / "eos.gguf", want[k])
    r = cli("run", eos_model, "-p", "hello there", "-n", "10")
    assert stop_line(r) == "stop: end of text"
    assert r.stdout == tok.decode(want[:k], skip_special=True) + "\n"

    # A stop string: the text up to it is printed, the string is named.
    full = cli("run", tiny, "-p", "hello there", "-n", "10").stdout[:-1]
    at = next(i for i in range(1, len(full) - 1) if re.fullmatch(r"[A-Za-z]{2}", full[i:i + 2]))
    stop = full[at:at + 2]
    r = cli("run", tiny, "-p", "hello there", "-n", "10", "--stop", stop)
    assert r.stdout == full[:full.index(stop)] + "\n"
    assert stop_line(r) == f'stop: stop string "{stop}"'


# ---- tokenize / detokenize ------------------------------------------------------------------


def test_tokenize_and_detokenize_match_llama_cpp(gemma_path):
    from llama_ref import llama_detokenize, llama_tokenize

    text = "Hello <start_of_turn>world, naïve café"
    r = cli("tokenize", gemma_path, text, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ids"] == llama_tokenize(gemma_path, text, add_special=True, parse_special=True)
    assert doc["pieces"][:2] == ["<bos>", "Hello"] and "<start_of_turn>" in doc["pieces"]
    r = cli("tokenize", gemma_path, text, "--no-bos", "--no-parse-special", "--ids")
    ids = [int(t) for t in r.stdout.strip().split(",")]
    assert ids == llama_tokenize(gemma_path, text, add_special=False, parse_special=False)

    r = cli("detokenize", gemma_path, ",".join(map(str, doc["ids"])))
    assert r.stdout == llama_detokenize(gemma_path, doc["ids"], unparse_special=True) + "\n"
    spaced = cli("detokenize", gemma_path, *map(str, doc["ids"]), "--no-special")
    assert spaced.stdout == llama_detokenize(gemma_path, doc["ids"], remove_special=True) + "\n"


def test_tokenize_reads_no_weights(tiny, tmp_path):
    """On a split with every layer file gone, tokenize still answers: only shared.gguf's header is read."""
    split = tmp_path / "split"
    split_gguf(tiny, split)
    for f in split.glob("layer_*.gguf"):
        f.unlink()
    r = cli("tokenize", split, "hello there", "--ids")
    assert r.returncode == 0, r.stderr
    assert r.stdout == cli("tokenize", tiny, "hello there", "--ids").stdout
    assert r.stdout.strip() == ",".join(map(str, Tokenizer.from_gguf(tiny).encode("hello there")))
    assert cli("detokenize", split, r.stdout.strip()).stdout == "hello there\n"
    assert one_line_error(cli("detokenize", split, "1", "512")) == (
        "error: token id 512 is out of range: the vocabulary has ids 0 to 511")
    assert "got 'x'" in one_line_error(cli("detokenize", split, "1,x"))
    # The default listing: one "id -> 'piece'" per token.
    tok = Tokenizer.from_gguf(tiny)
    listing = [ln.split(" -> ") for ln in cli("tokenize", split, "hello there").stdout.splitlines()]
    assert [(int(i), piece) for i, piece in listing] == [
        (i, f"'{tok.token_bytes(i).decode()}'") for i in tok.encode("hello there")]


# ---- inspect, perplexity, errors ------------------------------------------------------------


def test_inspect_names_the_file_type(gemma_path):
    import gguf

    ft = 15  # the bundled file is a Q4_K_M; gguf-py's table names 15 so
    assert gguf.LlamaFileType(ft).name == "MOSTLY_Q4_K_M"
    runner = CliRunner()
    out = runner.invoke(app, ["inspect", str(gemma_path), "--json"])
    hp = json.loads(out.output)["hyperparameters"]
    assert (hp["file_type"], hp["file_type_name"]) == (ft, "Q4_K_M")
    table = runner.invoke(app, ["inspect", str(gemma_path)]).output
    assert re.search(r"file_type\s+│\s+Q4_K_M \(15\)", table), table


class _Stub:
    """After token t, p(t) = 1/2 and each of the other 3 tokens 1/6."""

    def reset(self) -> None:
        pass

    def forward(self, ids, all_logits=False):  # noqa: ANN001, ANN201
        rows = torch.full((len(ids), 4), 1 / 6)
        rows[torch.arange(len(ids)), torch.tensor(ids)] = 1 / 2
        return rows.log() if all_logits else rows.log()[-1:]


def test_perplexity_uncertainty_by_hand():
    """Two scored tokens with probabilities 1/2 and 1/6: NLLs ln 2 and ln 6, mean ln sqrt(12),
    so PPL = sqrt(12); the NLL variance is (ln 3 / 2)^2 and llama.cpp's estimate
    PPL * sqrt(var / (n - 1)) = sqrt(12) * ln(3) / 2 = 1.90285..."""
    # ctx 4 scores position 2 of each window: 2 after 2 (p 1/2), then 1 after 0 (p 1/6).
    r = perplexity(_Stub(), [1, 1, 2, 2, 3, 0, 0, 1, 3], ctx=4, bos_id=0)
    assert math.isclose(r.ppl, math.sqrt(12), rel_tol=1e-6)
    assert math.isclose(r.ppl_err, math.sqrt(12) * math.log(3) / 2, rel_tol=1e-6)
    assert math.isclose(ppl_uncertainty(math.log(2) + math.log(6), math.log(2) ** 2 + math.log(6) ** 2, 2),
                        1.9028524, rel_tol=1e-6)


def test_perplexity_cli_estimate_matches_llama_cpp_logits(tiny, tmp_path):
    """The CLI's "PPL = X +/- Y" against the same formula on llama.cpp's logits, window by window
    (an F32 model: on Q8_0 llama.cpp rounds activations to 8 bits)."""
    from llama_ref import llama_logits_each, llama_tokenize

    tiny = write_synthetic(tmp_path / "tiny-f32.gguf", tiny_qwen35(default_type="F32"))
    text = tmp_path / "prose.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then it runs far away " * 6)
    ctx, chunks = 16, 3
    r = cli("perplexity", tiny, "-f", text, "-c", ctx, "--chunks", chunks)
    assert r.returncode == 0, r.stderr
    assert cli("perplexity", tiny, text, "--ctx", ctx, "--chunks", chunks).stdout == r.stdout
    m = re.search(r"^Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)$", r.stdout, re.M)
    ppl, err = float(m.group(1)), float(m.group(2))

    tokens = llama_tokenize(tiny, text.read_text(), add_special=True, parse_special=False)
    windows = [tokens[w * ctx:(w + 1) * ctx] for w in range(chunks)]
    nll = []
    for ids, logits in zip(windows, llama_logits_each(tiny, windows)):
        logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
        nll += [-logp[j, ids[j + 1]] for j in range(ctx // 2, ctx - 1)]
    nll = np.array(nll)
    want_ppl = math.exp(nll.mean())
    want_err = want_ppl * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (len(nll) - 1))
    assert ppl == pytest.approx(want_ppl, rel=1e-4) and err == pytest.approx(want_err, rel=1e-3)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_perplexity_kl_base_matches_llama_cpp_logits(tmp_path):
    """`perplexity EDITED --kl-base BASE`: mean and max KL(base || edited), top-1 agreement and both
    perplexities, against the same sums over llama.cpp's logits of the two F32 files."""
    from llama_ref import llama_logits_each, llama_tokenize

    base = write_synthetic(tmp_path / "base.gguf", tiny_qwen35(default_type="F32"))
    edited = write_synthetic(tmp_path / "edited.gguf", tiny_qwen35(default_type="F32", seed=7))
    text = tmp_path / "prose.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then it runs far away " * 6)
    ctx, chunks = 16, 3
    r = cli("perplexity", edited, text, "-c", ctx, "--chunks", chunks, "--kl-base", base)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^KL divergence from the base: mean ([\d.]+) \+/- ([\d.]+), max ([\d.]+) nats over (\d+) "
                  r"tokens; same top token ([\d.]+)%$", r.stdout, re.M)
    assert m, r.stdout
    kld, _, kmax, n, top1 = (float(g) for g in m.groups())
    ppl = float(re.search(r"^Final estimate: PPL = ([\d.]+)", r.stdout, re.M).group(1))
    base_ppl = float(re.search(r"^base .*: PPL = ([\d.]+)", r.stdout, re.M).group(1))

    tokens = llama_tokenize(base, text.read_text(), add_special=True, parse_special=False)
    windows = [tokens[w * ctx:(w + 1) * ctx] for w in range(chunks)]
    kl, same, nll_e, nll_b = [], [], [], []
    for ids, le, lb in zip(windows, llama_logits_each(edited, windows), llama_logits_each(base, windows)):
        p, q = _log_softmax(le), _log_softmax(lb)
        for j in range(ctx // 2, ctx - 1):
            kl.append(float((np.exp(q[j]) * (q[j] - p[j])).sum()))
            same.append(le[j].argmax() == lb[j].argmax())
            nll_e.append(-p[j, ids[j + 1]])
            nll_b.append(-q[j, ids[j + 1]])
    assert n == len(kl) == chunks * (ctx // 2 - 1)
    assert kld == pytest.approx(np.mean(kl), rel=1e-3) and kmax == pytest.approx(max(kl), rel=1e-3)
    assert top1 == pytest.approx(100 * np.mean(same), abs=0.01)
    assert ppl == pytest.approx(math.exp(np.mean(nll_e)), rel=1e-4)
    assert base_ppl == pytest.approx(math.exp(np.mean(nll_b)), rel=1e-4)
    assert kld > 0.01  # two different models: the figure is not trivially zero
    same_model = cli("perplexity", base, text, "-c", ctx, "--chunks", chunks, "--kl-base", base)
    assert "mean 0.000000 +/- 0.000000, max 0.000000 nats" in same_model.stdout, same_model.stdout


def test_errors_show_no_python_repr(gemma_path, tmp_path):
    last = one_line_error(cli("mtp", "strip", gemma_path, tmp_path / "out.gguf"))
    assert "need one of qwen35moe, qwen35" in last and "('" not in last and "['" not in last
