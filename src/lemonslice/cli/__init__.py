"""The one command line: `lemonslice <command>`. The only package that prints.

Each module registers its commands on the shared app in `_app`.
"""

from __future__ import annotations

import logging
import signal
import sys

from ..errors import LemonsliceError
from ..gguf.errors import GGUFError
from . import bench, chat, format, lora, mtp, peers, plan, requant, run, serve, ship, surgery, sweep, text  # noqa: F401  (registers commands)
from ._app import app, err

def _on_term(signum, frame):  # noqa: ANN001
    # Turn SIGTERM into an exception so staged output is cleaned up.
    raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_term)
    try:
        app()
    except (LemonsliceError, GGUFError) as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(1)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        err.print(f"error: {e.strerror or e}{where}", markup=False, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
