"""The shared Typer app, consoles and helpers of every command module."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path
from typing import Iterator

import typer
import typer.main
import typer.rich_utils
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..errors import LemonsliceError

# One example per command (by its name), shown at the end of its -h page.
_EXAMPLES = {
    "": "lemonslice run model.gguf -p 'The capital of France is' -n 32",
    "split": "lemonslice split model.gguf model-split/",
    "merge": "lemonslice merge model-split/ rebuilt.gguf",
    "verify": "lemonslice verify model-split/",
    "inspect": "lemonslice inspect model-split/ --json",
    "convert": "lemonslice convert Qwen3.5-35B-A3B/ qwen35-a3b.gguf --type q8_0",
    "run": "lemonslice run model.gguf -p 'The capital of France is' -n 32 --temp 0.7 --seed 42\n"
           "echo 'Tell me a story' | lemonslice run model-split/ --chat --max-memory 2GB",
    "chat": "lemonslice chat model.gguf --system 'Answer briefly.' --preset instruct-general",
    "serve": "lemonslice serve model.gguf --port 8080 --parallel 4 --api-key-file key.txt",
    "perplexity": "lemonslice perplexity model.gguf wiki.test.raw -c 512 --chunks 20",
    "demo": "lemonslice demo -n 32",
    "surgery": "lemonslice surgery 'repeat 4-7' model.gguf -o rys.gguf",
    "sweep": "lemonslice sweep model.gguf -o pass1/ --block 8 --stride 4",
    "tokenize": "lemonslice tokenize model.gguf 'Hello world' --json",
    "detokenize": "lemonslice detokenize model.gguf 2,9259,1902",
    "mtp": "lemonslice mtp strip with-mtp.gguf base.gguf",
    "inject": "lemonslice mtp inject model.gguf with-mtp.gguf --from Qwen3.5-35B-A3B/ --type q8_0",
    "strip": "lemonslice mtp strip with-mtp.gguf base.gguf",
    "lora": "lemonslice lora merge model-split/ my-adapter/ merged-split/ --layers 30-39",
    "diff": "lemonslice diff model-split/ finetuned-split/\nlemonslice diff model.gguf finetuned.gguf --json",
    "sync": "lemonslice sync finetuned-split/ /srv/models/model-split/",
    "serve-layers": "lemonslice serve-layers model-split/ --host 0.0.0.0 --port 8090",
    "pull": "lemonslice pull http://peer-a:8090 http://peer-b:8090 model-split/",
    "requant": "lemonslice requant model-f16.gguf mixed.gguf --plan 'shared=Q8_0; 0-9=Q4_K_M; 10-29=Q3_K_M'",
    "profile": "lemonslice profile model-split/ --tokens 32 --prompt 512 --json prof.json --png prof.png",
    "plan": "lemonslice plan Qwen3.5-35B-A3B-Q4_K_M.gguf --ram 16GiB --vram 8GiB -c 32768",
    "bench": "lemonslice bench model.gguf --llama --depths 512,2048,8192 --turns 5 --png bench",
}
# Typer's own type labels, shown as upper-case metavariables like the arguments'.
_METAVARS = {"<int>": "N", "<float>": "N", "<str>": "TEXT", "<path>": "PATH", "<list[str]>": "TEXT"}


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"lemonslice {__version__}")
        raise typer.Exit()


def _version_option():  # noqa: ANN202
    """A fresh --version option, made through Typer's public API (its parameter classes
    change between versions); each command needs its own object."""
    probe = typer.Typer()

    @probe.command()
    def _probe(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                            help="Print the version and exit.")) -> None: ...

    opt = typer.main.get_command(probe).params[0]
    opt.expose_value = False
    return opt


def _plain_metavar(p, ctx) -> None:  # noqa: ANN001
    if p.metavar is not None:
        return
    if p.param_type_name == "argument":
        p.metavar = p.name.upper()
    elif getattr(p, "is_flag", False):
        p.metavar = ""
    elif hasattr(p, "display_type_rich"):
        p.metavar = _METAVARS.get(p.display_type_rich(ctx))


class _Conventions:
    """What every command and group shares: -h, --version, upper-case metavariables, an
    example at the end of the help, and one "Did you mean" for a mistyped long option."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        if not self.epilog and (self.name or "") in _EXAMPLES:
            self.epilog = "Example:\n\n" + _EXAMPLES[self.name or ""]

    def get_params(self, ctx):  # noqa: ANN001, ANN201
        params = super().get_params(ctx)
        if getattr(self, "_version", None) is None:
            self._version = _version_option()
            for p in [*params, self._version]:
                _plain_metavar(p, ctx)
        # Before the help option, which click appends last.
        helps = [p for p in params if p is self.get_help_option(ctx)]
        return [p for p in params if p not in helps] + [self._version] + helps

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201
        try:
            return super().parse_args(ctx, args)
        except Exception as e:
            name = getattr(e, "option_name", None)
            if name and name.startswith("--") and hasattr(e, "possibilities"):
                known = [o for p in self.get_params(ctx) if not getattr(p, "hidden", False)
                         for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
                best = get_close_matches(name, known, n=1)
                if best:
                    e.message, e.possibilities = f"No such option: {name}. Did you mean {best[0]}?", None
            raise


class _Command(_Conventions, TyperCommand):
    def collect_usage_pieces(self, ctx):  # noqa: ANN001, ANN201
        # MODEL OUTDIR rather than Typer's {model} {outdir}.
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = p.metavar + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
            else:
                pieces.extend(p.get_usage_pieces(ctx))
        return pieces


class _Group(_Conventions, TyperGroup):
    pass


class _Typer(typer.Typer):
    def command(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if kwargs.get("cls") is None:
            kwargs["cls"] = _Command
        return super().command(*args, **kwargs)


def new_app(**kwargs) -> typer.Typer:  # noqa: ANN003
    """A command group with the conventions above (the app, and `mtp`)."""
    return _Typer(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, add_completion=False,
                  pretty_exceptions_enable=False, **kwargs)


app = new_app(no_args_is_help=True, help="Run and reshape GGUF models one layer at a time.")
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)
log = logging.getLogger("lemonslice")


def _usage_error(e: Exception) -> None:
    """A usage error (a click.ClickException: unknown option, bad value, missing argument) as one
    line, like every other error of the CLI, instead of typer's usage and boxed panel; the exit
    status stays click's 2."""
    if type(e).__name__ == "NoArgsIsHelpError":  # the help was printed already
        return
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
    err.print(f"error: {e.format_message()}{hint}", highlight=False)


# typer prints click's usage errors through this function when rich is installed.
typer.rich_utils.rich_format_error = _usage_error


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@contextmanager
def _progress(label: str) -> Iterator:
    """A byte progress bar on stderr; yields the callback the library calls."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)
        # An optional third argument replaces the label (e.g. "pull 3/9 files").
        yield lambda done, total, label=None: bar.update(task, completed=done, total=total,
                                                          **({"description": label} if label else {}))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise LemonsliceError(f"cannot read size {text!r} (e.g. 2GB, 512MiB)")
    try:
        return int(float(m.group(1)) * _SIZE_UNITS[unit])
    except ValueError:
        raise LemonsliceError(f"cannot read size {text!r} (e.g. 2GB, 512MiB)") from None


def _default_budget() -> tuple[int | None, str]:
    """(weight budget, its origin) without --max-memory: the cgroup limit less what the process
    holds, else 80% of MemAvailable (weights that would crowd out the page cache are streamed)."""
    from ..engine.budget import detect_budget

    return detect_budget()


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec."""
    from ..engine.budget import peak_rss

    peak = peak_rss()
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


_VERIFY_HELP = "Re-hash every file of a split directory against its manifest first; refuse on any problem."


def _check_model(model: Path, verify: bool = False) -> None:
    """Check a split directory against its manifest before a weight is read (sizes and headers;
    with `verify`, every file hashed), printing its warnings. A single GGUF's header is
    validated when it is opened; there is no recorded hash to check it against."""
    from ..slicing.integrity import check_split

    if not model.is_dir():
        if verify:
            raise LemonsliceError(f"--verify checks a split directory against its manifest; {model} is a single file")
        return
    for w in check_split(model, full=verify):
        err.print(f"warning: {w}", highlight=False)
