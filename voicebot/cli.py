"""The `voicebot` command line: serve, simulate, call, twilio configure/check, db upgrade."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from voicebot.settings import SettingsError, load_settings


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from voicebot.workers import serve

    settings = load_settings()
    _configure_logging(settings.log_level)
    # N worker processes, each building the app from the environment; SIGTERM drains.
    return serve(host=args.host, port=args.port, workers=max(1, args.workers),
                 grace_s=settings.drain_grace_s, log_level=settings.log_level,
                 ws_max_size=settings.max_message_bytes, redis_url=settings.redis_url,
                 sqlite_url=settings.database_url if settings.sqlite_path else None,
                 redis_namespace=settings.redis_namespace)


def cmd_simulate(args: argparse.Namespace) -> int:
    from voicebot.simulate import run_simulation

    settings = load_settings()
    _configure_logging("WARNING" if not args.verbose else settings.log_level)
    return asyncio.run(run_simulation(settings, args.wavs, url=args.url, pace=args.pace,
                                      digits=args.dtmf))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db.migrate import upgrade_to_head

    settings = load_settings()
    _configure_logging(settings.log_level)
    upgrade_to_head(settings.database_url)
    print(f"database is at head: {settings.database_url.split('@')[-1]}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    import json

    from pipeline.caller_memory import InvalidNumber
    from voicebot.forget import forget_caller

    settings = load_settings()
    _configure_logging("WARNING")
    try:
        result = asyncio.run(forget_caller(settings, args.number))
    except InvalidNumber as exc:
        print(f"voicebot: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 1 if result.get("errors") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicebot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes (share state through REDIS_URL)")
    serve.set_defaults(func=cmd_serve)

    simulate = sub.add_parser("simulate", help="play WAV files into the server as a Twilio caller")
    simulate.add_argument("wavs", nargs="+", help="WAV files, one per caller turn")
    simulate.add_argument("--url", help="ws://host:port/twilio/media (default: in-process app)")
    simulate.add_argument("--pace", type=float, default=1.0,
                          help="speed-up factor for the caller's audio (1 = real time)")
    simulate.add_argument("--dtmf", default="", help="digits to press after the last turn")
    simulate.add_argument("-v", "--verbose", action="store_true")
    simulate.set_defaults(func=cmd_simulate)

    db = sub.add_parser("db", help="database commands")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="bring the database schema to head")
    upgrade.set_defaults(func=cmd_db_upgrade)
    forget = sub.add_parser("forget", help="erase a caller's memory and transcripts")
    forget.add_argument("number", help="the caller's number, e.g. +15551234567")
    forget.set_defaults(func=cmd_forget)

    from voicebot.cli_twilio import add_parsers as add_twilio_parsers

    add_twilio_parsers(sub)
    from voicebot.cli_stats import add_parsers as add_stats_parsers

    add_stats_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"voicebot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
