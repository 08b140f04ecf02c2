"""`geomesh-dns`: the command-line entry point of the GeoDNS server.

Parses and validates the flags (`geodns.config`), sets up structured logging, then serves in
this process or, with `--workers N`, supervises N worker processes (`geodns.supervisor`). A bad flag,
state file or GeoIP database stops it with exit status 2 and one line naming the problem.
"""

from __future__ import annotations

import logging
import sys

from geodns.config import Config
from geomesh import logs
from geomesh.errors import ValidationError

log = logging.getLogger("geodns")


def main(argv: list[str] | None = None) -> int:
    try:
        config = Config.from_args(argv)
    except ValidationError as exc:
        print(f"geomesh-dns: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    from geodns import server, supervisor

    try:
        if config.workers > 1:
            supervisor.Supervisor(config).run()
        else:
            server.run(config)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"geomesh-dns: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
