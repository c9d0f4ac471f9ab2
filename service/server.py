"""`din serve`: run the ranking service under uvicorn (one process: the batcher is per process).

Flags are generated from `Settings`, so `--redis-url` is always `DIN_REDIS_URL`; a flag beats the
environment. The bundle is loaded and verified before uvicorn starts, so a corrupt bundle is one
clear line on stderr and exit code 2, never a traceback.

Shutdown (SIGTERM): /readyz answers 503 shutting_down at once while requests are still served for
DIN_SHUTDOWN_DRAIN_S (load balancers notice and stop sending), then uvicorn stops listening and
finishes the requests in flight, the lifespan stops the batcher, the private redis-server (if any)
shuts down with its data flushed, and the process exits 0. A second signal, or SIGINT, skips the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import types
import typing
from typing import Any

from pydantic import ValidationError

from service.config import Settings


def _flag_type(annotation: Any) -> tuple[str, Any]:
    """('bool' | 'value', argparse type) for a Settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0] if len(args) == 1 else str
    if annotation is bool:
        return "bool", None
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", typing.get_args(annotation)
    return "value", str  # pydantic converts and validates, with the same rules as for the environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"DIN_{name.upper()}"
        default = "unset" if info.default is None else str(info.default)
        help_ = f"{info.description} [env {env}; default {default}]".replace("%", "%%")  # argparse formats it
        kind, extra = _flag_type(info.annotation)
        if kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        elif kind == "choice":
            parser.add_argument(flag, choices=extra, default=argparse.SUPPRESS, help=help_)
        else:
            metavar = name.upper()
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS, metavar=metavar, help=help_)


def _settings_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        parts.append(f"--{field.replace('_', '-')} / DIN_{field.upper()}: {err.get('msg')}")
    return "; ".join(parts)


def _ignore(signum: int, frame: types.FrameType | None) -> None:
    pass


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with a drain before its graceful shutdown on the first SIGTERM."""

        def __init__(self, config: uvicorn.Config, *, drain_s: float, on_drain: Any) -> None:
            super().__init__(config)
            self.drain_s = drain_s
            self.on_drain = on_drain
            self._drain: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            if sig == signal.SIGTERM and self._drain is None and self.drain_s > 0 and self.started:
                self.on_drain()  # not ready from now on; still serving
                self._drain = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
                self._drain.daemon = True
                self._drain.start()
                return
            if self._drain is not None:
                self._drain.cancel()  # a second signal: stop now
            super().handle_exit(sig, frame)

    return DrainingServer


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"din serve: invalid settings: {_settings_error(e)}", file=sys.stderr)
        return 2

    # Imported here: `din serve --help` stays instant.
    import uvicorn

    from contracts.errors import BundleError, ConfigError, RedisServerError
    from service.app import create_app
    from service.live import load_measured
    from service.log import configure_logging
    from service.protocol import uvicorn_options
    from service.security import load_api_keys
    from service.store.client import redis_endpoint

    configure_logging(settings.log_level, settings.log_json)
    try:
        load_api_keys(settings)  # an unreadable keys file stops here, like a bad bundle
        ranker, memory = load_measured(settings)
    except (BundleError, ConfigError) as e:
        print(f"din serve: {e}", file=sys.stderr)
        return 2

    with contextlib.ExitStack() as stack:
        try:
            redis_cfg = settings.redis
            endpoint = stack.enter_context(redis_endpoint(redis_cfg))
        except RedisServerError as e:
            print(f"din serve: cannot start the private redis-server: {e}", file=sys.stderr)
            return 2
        if endpoint.private:
            where = redis_cfg.private_data_dir.resolve()
            print(f"din serve: private redis-server at {endpoint.url} (data in {where})", file=sys.stderr)
            settings = settings.model_copy(update={"redis_url": endpoint.url})
        app = create_app(settings, ranker=ranker, ranker_memory=memory)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            workers=1,
            lifespan="on",
            log_config=None,  # our handlers (configure_logging) format uvicorn's records too
            access_log=False,  # the app logs each request itself, with its request id
            timeout_graceful_shutdown=10,
            # the head's deadline and size limit, the keep-alive timeout (service.protocol)
            **uvicorn_options(settings),
        )
        server_class = _draining_server_class()
        uv = server_class(config, drain_s=settings.shutdown_drain_s, on_drain=app.state.din.begin_shutdown)
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal under the
        # handlers it found. Found handlers that ignore it let us stop the private redis-server and
        # exit 0 (a clean stop) instead of dying by the signal with a child left behind.
        previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            uv.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0 if uv.started else 1
