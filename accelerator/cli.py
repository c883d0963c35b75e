"""Command line: `accelerator serve | import | send | pull | find | jobs | peers | storage | --version`."""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import warnings
from collections.abc import Sequence

from accelerator import __version__
from protocol.errors import AcceleratorError

log = logging.getLogger("accelerator")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # odd-but-readable files are not our news
    warnings.filterwarnings("ignore", module="pydicom")
    try:
        return args.run(args)
    except AcceleratorError as exc:
        print(f"accelerator: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelerator",
        description="Move DICOM studies between sites with the Orthanc Transfers Accelerator protocol.",
    )
    parser.add_argument("--version", action="version", version=f"accelerator {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("config", nargs="?", help="configuration file or folder (default: embedded defaults)")
    serve.add_argument("--upgrade", action="store_true", help="upgrade an index of an older schema in place")
    serve.add_argument("--verbose", action="store_true", help="debug logging and an access log")
    serve.set_defaults(run=_serve)

    imp = commands.add_parser(
        "import", help="upload DICOM files, folders and ZIP archives to a running daemon",
        description="Upload every DICOM file found (folders are walked, ZIP archives read member by "
                    "member), then print the studies that received instances and the files skipped.")
    imp.add_argument("paths", nargs="+", metavar="PATH",
                     help="files, folders (walked recursively) or ZIP archives")
    imp.add_argument("--jobs", type=int, default=4, help="parallel uploads (default: %(default)s)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    _connection_arguments(imp)
    imp.set_defaults(run=_import)

    from accelerator import commands as remote

    remote.add_arguments(commands, [_connection_arguments])
    from accelerator import storage_commands

    storage_commands.add_arguments(commands, [_connection_arguments])
    from accelerator import replicate_command

    replicate_command.add_arguments(commands, [_connection_arguments])
    return parser


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8042", help="daemon URL (default: %(default)s)")
    parser.add_argument("--username", default="", help="HTTP Basic user of the daemon")
    parser.add_argument("--password", default="", help="HTTP Basic password of the daemon")


def _tune_malloc() -> None:
    """Keep the daemon's memory bounded by what it holds: with glibc, worker threads each get a
    malloc arena and freed multi-megabyte buckets stay in the heap (the mmap threshold grows),
    so RSS climbs far above the live data. Two arenas and a fixed 1 MiB mmap threshold return
    bucket buffers to the system as soon as they are freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    m_arena_max, m_mmap_threshold = -8, -3
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 1 << 20)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    _tune_malloc()
    from accelerator.api.app import create_app, open_store
    from accelerator.api.server import uvicorn_config
    from accelerator.config import load_config

    config = load_config(args.config)
    for key in config.unknown_keys:
        log.warning("ignoring unknown configuration option %r", key)
    store = open_store(config, upgrade=args.upgrade)
    log.info(
        "storage %s, index %s, listening on %s:%d",
        config.storage_directory, store.index.path, config.http_bind_address or "0.0.0.0", config.http_port,
    )
    server = uvicorn.Server(uvicorn_config(config, create_app(config, store), verbose=args.verbose))
    server.run()
    return 0


def _import(args: argparse.Namespace) -> int:
    from accelerator.importer import import_paths

    summary = import_paths(
        args.paths, url=args.url, auth=(args.username, args.password) if args.username else None,
        jobs=max(1, args.jobs), progress=not args.no_progress,
    )
    print(summary.describe())
    return 1 if summary.failed else 0
