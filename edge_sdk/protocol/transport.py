"""One MQTT connection for either side: persistent session, TCP_NODELAY, TLS and passwords, reconnects.

paho-mqtt does the protocol; this adds what a federation needs around it: a network thread that
reconnects with exponential backoff and jitter (so a fleet does not stampede a restarted broker),
subscriptions restored on every connect, and Nagle switched off on the client socket.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

log = logging.getLogger("fedpeft.mqtt")
QOS = 1


class BrokerUnavailableError(ConnectionError):
    """The broker could not be reached or refused the connection in time."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate; `tls_ca` switches TLS on."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls_ca: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30

    @classmethod
    def from_url(cls, url: str, **kwargs) -> BrokerSettings:
        """`mqtt://host:port` (or `mqtts://host:port`, which needs `tls_ca`)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"Broker URL {url!r} must look like mqtt://host:port or mqtts://host:port.")
        if parts.scheme == "mqtts" and not kwargs.get("tls_ca"):
            raise ValueError(f"{url} uses TLS: give the CA certificate that signed the broker's certificate.")
        default_port = 8883 if parts.scheme == "mqtts" or kwargs.get("tls_ca") else 1883
        return cls(host=parts.hostname, port=parts.port or default_port, **kwargs)


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect `attempt` (0-based): exponential, capped, with equal jitter."""
    ceiling = min(cap, base * 2 ** min(attempt, 30))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


Handler = Callable[[mqtt.MQTTMessage], None]


class MqttConnection:
    """A paho client on its own network thread; `on_message` runs on that thread.

    `manual_ack=True` leaves QoS 1 acknowledgements to the caller (`ack`), so a message is
    acknowledged only once it has been handled durably: the broker redelivers what was not.
    """

    def __init__(
        self,
        client_id: str,
        settings: BrokerSettings,
        on_message: Handler,
        subscriptions: Sequence[str] = (),
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.client_id, self.settings = client_id, settings
        self._subscriptions = list(subscriptions)
        self._on_message, self._on_connect = on_message, on_connect
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
            protocol=mqtt.MQTTv311, manual_ack=manual_ack,
        )
        self._client.max_inflight_messages_set(64)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca:
            self._client.tls_set(ca_certs=str(settings.tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will:
            self._client.will_set(will[0], will[1], qos=QOS, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = lambda _c, _u, message: self._on_message(message)

        self._client.on_socket_open = lambda _c, _u, sock: _no_delay(sock)
        # With a write-registration callback set, paho never writes to the socket from the publishing
        # thread; only the network thread does (concurrent writes would corrupt a TLS stream).
        self._client.on_socket_register_write = lambda _c, _u, _sock: None
        self._client.connect_async(settings.host, settings.port, keepalive=settings.keepalive)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._disconnected = threading.Event()
        self._closing = False
        self.refused: str | None = None
        self.unreachable: str | None = None
        """Why the last connection attempt failed before the broker could answer (refused, no route, TLS)."""
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{client_id}", daemon=True)

    def start(self, timeout: float = 30.0) -> MqttConnection:
        """Start the network thread and wait for the first successful connection."""
        self._thread.start()
        if not self._connected.wait(timeout):
            self.stop()
            why = (f"it refused: {self.refused}" if self.refused else
                   f"last attempt: {self.unreachable}" if self.unreachable else "no answer")
            raise BrokerUnavailableError(
                f"Could not connect to the MQTT broker at {self.settings.host}:{self.settings.port} within "
                f"{timeout:.0f} s ({why}). Check the address, TLS CA and credentials, and that the broker runs."
            )
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a QoS 1 publish; paho sends it now or, while disconnected, right after the next reconnect."""
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS  # queued for the reconnect, not failed
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailableError(f"Publishing to {topic} failed: {mqtt.error_string(info.rc)}.")
        return info

    def publish_all(self, messages: Sequence[tuple[str, bytes, bool]], timeout: float) -> None:
        """Publish (topic, payload, retain) messages and wait until the broker acknowledged each.

        A broker outage in between only delays the return: paho re-sends unacknowledged QoS 1
        messages of the persistent session after reconnecting.
        """
        infos = [self.publish(topic, payload, retain) for topic, payload, retain in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise BrokerUnavailableError(f"The broker did not acknowledge a publish within {timeout:.0f} s.")

    def subscribe(self, topic: str) -> None:
        """Subscribe now (when connected) and after every reconnect."""
        self._subscriptions.append(topic)
        if self.connected:
            self._client.subscribe(topic, qos=QOS)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving `topic`, now and after reconnects."""
        if topic in self._subscriptions:
            self._subscriptions.remove(topic)
        if self.connected:
            self._client.unsubscribe(topic)

    def ack(self, message: mqtt.MQTTMessage) -> None:
        """Acknowledge a message received with `manual_ack=True`."""
        self._client.ack(message.mid, message.qos)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and end the network thread."""
        self._closing = True
        self._client.disconnect()
        if self._connected.is_set() and threading.current_thread() is not self._thread:
            self._disconnected.wait(timeout)
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _network_loop(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            if self._client.socket() is None:
                if self._closing:
                    break
                try:
                    self._client.reconnect()
                except (OSError, ssl.SSLError) as err:
                    self.unreachable = (f"connection refused, nothing listens on port {self.settings.port}"
                                        if isinstance(err, ConnectionRefusedError) else str(err) or type(err).__name__)
                    delay = backoff_delay(attempt)
                    attempt += 1
                    log.info("%s: broker unreachable (%s); retrying in %.1f s", self.client_id, err, delay)
                    self._stopping.wait(delay)
                    continue
            self._client.loop(timeout=0.2)
            if self._connected.is_set():
                attempt = 0
            elif self._client.socket() is None and not self._stopping.is_set():
                self._stopping.wait(backoff_delay(attempt))
                attempt += 1

    def _handle_connect(self, client: mqtt.Client, _userdata, _flags, reason, _properties) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            log.warning("%s: broker refused the connection: %s", self.client_id, reason)
            client.disconnect()
            return
        self.refused = None
        self._disconnected.clear()
        for topic in self._subscriptions:
            client.subscribe(topic, qos=QOS)
        self._connected.set()
        if self._on_connect:
            self._on_connect()

    def _handle_disconnect(self, _client, _userdata, _flags, reason, _properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected.set()
        if was_connected and not self._closing:
            log.warning("%s: lost the broker (%s); reconnecting", self.client_id, reason)


def _no_delay(sock: socket.socket) -> None:
    """Disable Nagle: without it each small request/reply waits ~40 ms for a delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass
