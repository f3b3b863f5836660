"""`--broker embedded`: an in-process MQTT 3.1.1 broker (amqtt) so a demo needs no broker set-up.

For production and the tests use mosquitto (examples/mosquitto/): it is several times faster
on fan-in, persists sessions across restarts, and enforces TLS, passwords and ACLs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from edge_sdk.protocol.transport import BrokerSettings


class EmbeddedBroker:
    """amqtt on a daemon thread with its own event loop, bound to loopback (not 0.0.0.0) by default."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port(host)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-mqtt-broker", daemon=True)
        self._broker = None

    @property
    def settings(self) -> BrokerSettings:
        return BrokerSettings(host=self.host, port=self.port)

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def start() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
