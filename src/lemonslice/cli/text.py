"""Text commands: `lemonslice tokenize` and `lemonslice detokenize`.

Both read only the tokenizer metadata (a GGUF's header, or a split's shared.gguf): no
weight is read, so they answer in about the time the vocabulary takes to build.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import LemonsliceError
from ._app import app

_MODEL_HELP = "A .gguf file or a split directory (only its tokenizer metadata is read)."


def _tokenizer(model: Path):  # noqa: ANN202
    from ..gguf.constants import SHARED_FILE
    from ..slicing.manifest import load_manifest
    from ..text.tokenizer import Tokenizer

    if model.is_dir():
        load_manifest(model)  # a directory must be a split; its shared.gguf carries the vocabulary
        return Tokenizer.from_gguf(model / SHARED_FILE)
    return Tokenizer.from_gguf(model)


def _piece(tok, tid: int) -> str:  # noqa: ANN001
    return tok.token_bytes(tid, special=True).decode("utf-8", "replace")


@app.command()
def tokenize(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    text: Optional[str] = typer.Argument(
        None, metavar="TEXT", help="Text to tokenize; '-' or none with a piped stdin reads it from stdin."),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Add BOS (and EOS) when the vocabulary asks for them."),
    parse_special: bool = typer.Option(
        True, "--parse-special/--no-parse-special",
        help="Turn control-token text such as <start_of_turn> into its id rather than spelling it out."),
    ids_only: bool = typer.Option(False, "--ids", help="Print only the ids, comma-separated (for --prompt-ids)."),
    as_json: bool = typer.Option(False, "--json", help="Print {\"ids\": [...], \"pieces\": [...]}."),
) -> None:
    """Print the token ids of TEXT as llama.cpp's tokenizer gives them, one 'id -> piece' per line."""
    if text is None or text == "-":
        if text is None and sys.stdin.isatty():
            raise LemonsliceError("give TEXT, or '-' and the text on stdin")
        text = sys.stdin.read()
    tok = _tokenizer(model)
    ids = tok.encode(text, add_special=bos, parse_special=parse_special)
    # print(), not the rich console: pieces are shown byte for byte (no emoji codes, no wrapping).
    if as_json:
        print(json.dumps({"ids": ids, "pieces": [_piece(tok, i) for i in ids]}, ensure_ascii=False))
    elif ids_only:
        print(",".join(map(str, ids)))
    else:
        for i in ids:
            print(f"{i:>6} -> '{_piece(tok, i)}'")


@app.command()
def detokenize(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    ids: list[str] = typer.Argument(..., metavar="IDS", help="Token ids: '1,2,3', '1 2 3' or several arguments."),
    special: bool = typer.Option(
        True, "--special/--no-special", help="Print control tokens such as <bos> as their text, or leave them out."),
) -> None:
    """Print the text of token ids."""
    words = [w for w in re.split(r"[\s,]+", " ".join(ids).strip().strip("[]")) if w]
    try:
        values = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not re.fullmatch(r"[+-]?\d+", w))
        raise LemonsliceError(f"IDS must be integers separated by commas or spaces; got {bad!r}") from None
    if not values:
        raise LemonsliceError("no token ids given")
    tok = _tokenizer(model)
    bad_ids = [i for i in values if not 0 <= i < tok.n_vocab]
    if bad_ids:
        raise LemonsliceError(f"token id {bad_ids[0]} is out of range: the vocabulary has ids 0 to {tok.n_vocab - 1}")
    print(tok.decode(values, skip_special=not special))
