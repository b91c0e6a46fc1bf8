"""Run the app under uvicorn with a graceful drain: the first SIGTERM/SIGINT turns /readyz to 503 and refuses new
work with 503 while queued and running requests finish (up to the drain timeout); then uvicorn stops and the
process exits 0. A second signal stops at once."""

from __future__ import annotations

import ipaddress
import logging
import threading

import uvicorn

from sdrt.serve.app import ServeConfig, create_app

log = logging.getLogger("sdrt.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service
        self._drain_started = False

    def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler; the signal is not re-raised at exit
        if self._drain_started:
            self.should_exit = self.force_exit = True
            return
        self._drain_started = True
        log.info("signal %s: draining (new work gets 503; up to %g s for queued and running work)",
                 sig, self.service.config.drain_timeout)
        threading.Thread(target=self._drain, name="sdrt-drain", daemon=True).start()

    def _drain(self) -> None:
        finished = self.service.drain()
        log.info("drained (%s); stopping", "all work finished" if finished else "timed out; the rest was cancelled")
        self.should_exit = True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> int:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(host) and not config.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use it "
                    "(pass --api-key or set SDRT_API_KEY)", host)
    app = create_app(config)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                        timeout_graceful_shutdown=10, server_header=False)
    DrainingServer(uv, app.state.service).run()
    return 0
