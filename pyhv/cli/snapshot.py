"""`pyhv snapshot create DIR NAME|QMP-SOCKET`: save a running VM through its monitor (QMP `x-pyhv-snapshot-create`);
`pyhv run --restore DIR` resumes it in a new process (pyhv/machine/snapshot.py)."""
from __future__ import annotations

import argparse
import json
import os

from pyhv.errors import PyhvError


def cmd_snapshot(args: argparse.Namespace) -> int:
    from pyhv.cli.top import qmp_path
    from pyhv.monitor.client import QmpClient, QmpError
    path = qmp_path(args.target, args.state_dir)
    try:
        client = QmpClient(path, timeout=args.timeout)
    except OSError as e:
        raise PyhvError(f"pyhv snapshot: cannot connect to {path}: {e.strerror or e}") from None
    try:
        result = client.execute("x-pyhv-snapshot-create", path=os.path.abspath(args.dir))
    except QmpError as e:
        raise PyhvError(f"pyhv snapshot: {e.desc}") from None
    finally:
        client.sock.close()
    print(json.dumps(result) if args.json else
          f"snapshot written to {args.dir}: {result['memory_bytes'] / 2**20:.0f} MiB of memory, "
          f"{result['seconds']:.2f} s ({result['paused_seconds']:.2f} s paused)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`pyhv snapshot create`'s options (the caller adds the common ones)."""
    p = sub.add_parser("snapshot", help="save a running VM to a directory (restore: pyhv run --restore DIR)",
                       description=__doc__)
    p.add_argument("action", choices=("create",), help="create: pause, save, resume")
    p.add_argument("dir", help="the snapshot directory (created; memory.raw and state.json inside)")
    p.add_argument("target", metavar="NAME|QMP-SOCKET", help="a domain name or a `--qmp` socket path")
    p.add_argument("--state-dir", help="where domains are kept (default: $XDG_STATE_HOME/pyhv)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the monitor (default 120)")
    p.set_defaults(handler=cmd_snapshot)
    return p
