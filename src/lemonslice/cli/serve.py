"""`lemonslice serve`: the OpenAI-compatible server (FastAPI + uvicorn) on one model."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import typer

from ..errors import LemonsliceError
from ._app import app, err
from .run import (_CTK_HELP, _CTV_HELP, _EXACT_HELP, _MEMORY_HELP, _MODEL_HELP, _RAY_HELP, _STAGES_HELP, _TEMPLATE_HELP,
                  _THREADS_HELP)

_KEY_HELP = "Require this key (Authorization: Bearer KEY) on every endpoint but /health."
_KEY_FILE_HELP = "Read the API key from this file (its first line), so it stays out of the process list."


@app.command()
def serve(
    typer_ctx: typer.Context,
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help=_KEY_HELP),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help=_KEY_FILE_HELP),
    parallel: int = typer.Option(1, "--parallel", "-np", help="Sequences that decode together (slots)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a slot; more get a 503."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="Context size in tokens (default: the model's)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help=_TEMPLATE_HELP),
    thinking: bool = typer.Option(True, "--thinking/--no-thinking",
                                  help="Default of chat_template_kwargs.enable_thinking."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Model id in /v1/models (default: the file name)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
    exact: bool = typer.Option(False, "--exact", help=_EXACT_HELP),
    cache_type_k: str = typer.Option("f16", "--cache-type-k", "-ctk", help=_CTK_HELP),
    cache_type_v: str = typer.Option("f16", "--cache-type-v", "-ctv", help=_CTV_HELP),
    stages: Optional[str] = typer.Option(None, "--stages", metavar="SPEC", help=_STAGES_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDR", help=_RAY_HELP),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a chat page at /."""
    import uvicorn

    from ..engine import runtime
    from ..server.app import create_app

    key = _api_key(api_key, api_key_file)
    _check_options(parallel, max_queue, ctx, port, model)
    runtime.setup(exact=True if exact else None, kv_types=(cache_type_k, cache_type_v))
    _check_port(host, port)
    staged = _stages(typer_ctx, model, stages, ray_address, max_memory, threads, exact, (cache_type_k, cache_type_v))

    def load():  # noqa: ANN202
        from ..server.service import ModelService
        from .run import _open_engine, _text_generator

        engine, tok = staged or _open_engine(model, max_memory, threads, text=True, exact=exact,
                                             kv_types=(cache_type_k, cache_type_v))
        template = _text_generator(engine, tok, chat_template).template
        service = ModelService(engine, tok, template=template, parallel=parallel, ctx=ctx, max_queue=max_queue,
                               model_id=alias or model.name)
        err.print(f"ready: http://{host}:{port}/ ({parallel} slot{'s' if parallel > 1 else ''})", highlight=False)
        return service

    err.print(f"listening on http://{host}:{port}/ while the model loads", highlight=False)
    uvicorn.run(create_app(load, api_key=key, default_thinking=thinking), host=host, port=port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)


def _stages(ctx: typer.Context, model: Path, stages: Optional[str], address: Optional[str], max_memory: Optional[str],
            threads: Optional[int], exact: bool, kv_types: tuple[str, str]):  # noqa: ANN202
    """(pipeline, tokenizer) with --stages, started here in the main thread (Ray installs signal
    handlers), before the server listens; else None."""
    if address is not None and stages is None:
        raise LemonsliceError("--ray-address needs --stages")
    if stages is None:
        return None
    from .run import _check_stages, _open_pipeline

    _check_stages(stages, None, False, None)
    return _open_pipeline(ctx, model, stages, address, max_memory, threads, text=True, exact=exact, kv_types=kv_types)


def _api_key(api_key: Optional[str], api_key_file: Optional[Path]) -> Optional[str]:
    if api_key is not None and api_key_file is not None:
        raise LemonsliceError("give one of --api-key and --api-key-file")
    if api_key_file is not None:
        try:
            lines = api_key_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise LemonsliceError(f"{api_key_file} is not UTF-8 text") from None
        api_key = lines[0].strip() if lines else ""
    if api_key is not None and not api_key.strip():
        raise LemonsliceError("the API key is empty")
    return api_key if api_key is None else api_key.strip()


def _check_options(parallel: int, max_queue: int, ctx: Optional[int], port: int, model: Path) -> None:
    if parallel < 1:
        raise LemonsliceError(f"--parallel must be >= 1, got {parallel}")
    if max_queue < 0:
        raise LemonsliceError(f"--max-queue must be >= 0, got {max_queue}")
    if ctx is not None and ctx < 1:
        raise LemonsliceError(f"--ctx must be >= 1, got {ctx}")
    if not 0 < port < 65536:
        raise LemonsliceError(f"--port must be in 1..65535, got {port}")
    if not os.path.exists(model):
        raise LemonsliceError(f"no such file or directory: {model}")


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address is taken or cannot be bound."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise LemonsliceError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
