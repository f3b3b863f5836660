"""Local MQTT brokers: `--broker embedded` (amqtt, in process, so a demo needs no set-up) and a mosquitto
process on loopback (the simulator's default where mosquitto is installed, and the tests').

Given the device ids, the local mosquitto admits only generated logins (a random password per device and
one for the aggregator) under the shipped topic ACL, so another local process can neither read nor forge
updates nor take the aggregator's session. amqtt has no equivalent here: it admits anyone.

For production use mosquitto with TLS, passwords and ACLs (examples/mosquitto/): it is several
times faster on fan-in than amqtt, persists sessions across restarts, and runs outside the
aggregator's process. amqtt shares the simulator's process and GIL and, under load, loses
messages ("messages not broadcasted") and connections, so it is the fallback only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from edge_sdk.files import write_atomic
from edge_sdk.protocol.transport import BrokerSettings

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
AGGREGATOR_USER = "aggregator"
TOPIC_ACL = """user aggregator
topic readwrite fedpeft/#

pattern read fedpeft/+/config
pattern read fedpeft/+/task
pattern read fedpeft/+/result
pattern read fedpeft/+/global/#
pattern read fedpeft/+/notice/%u
pattern readwrite fedpeft/+/clients/%u/status
pattern write fedpeft/+/clients/%u/update
"""
"""Usernames are client ids: the aggregator reads and writes everything, a device reads what the aggregator
announces and writes only its own status and updates (examples/mosquitto/acl holds the same rules)."""


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

    def login(self, _user: str) -> BrokerSettings:
        """The settings `_user` connects with: anonymous, since amqtt here admits anyone."""
        return self.settings

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


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with QoS 1 queues raised (its default 1000 silently drops)."""

    def __init__(self, folder: Path, config: str | None = None, port: int | None = None,
                 devices: Sequence[str] | None = None) -> None:
        """`config` replaces the generated settings (the port is then the caller's business). With `devices`,
        only they and the aggregator log in, each with a generated password, under `TOPIC_ACL`."""
        if config is not None and devices is not None:
            raise ValueError("Give either config (your own settings, logins included) or devices (generated logins).")
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.passwords: dict[str, str] = {}
        user = "user root\n" if os.geteuid() == 0 else ""
        access = "allow_anonymous true\n"
        if devices is not None:
            access = self._write_logins([AGGREGATOR_USER, *devices])
        self.config = folder / "mosquitto.conf"
        self.config.write_text(user + (config or (
            f"listener {self.port} 127.0.0.1\n{access}"
            "max_queued_messages 100000\nmax_queued_bytes 0\nmax_inflight_messages 20\nmax_packet_size 4194304\n"
            "set_tcp_nodelay true\npersistence true\n"
            f"persistence_location {folder}/\nlog_dest file {folder}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def settings(self) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=self.port)

    def login(self, user: str) -> BrokerSettings:
        """The settings `user` (a device id or `AGGREGATOR_USER`) connects with; anonymous on an open broker."""
        if not self.passwords:
            return self.settings
        if user not in self.passwords:
            raise KeyError(f"{user!r} has no login on this broker; list it in devices=.")
        return replace(self.settings, username=user, password=self.passwords[user])

    def _write_logins(self, users: list[str]) -> str:
        """A random password per user, hashed by mosquitto_passwd, and the ACL; returns the config lines."""
        if len(set(users)) != len(users) or any(not u or ":" in u or u.isspace() for u in users):
            raise ValueError(f"Device ids must be distinct, non-empty and free of ':'; got {users[:5]}...")
        if not Path(MOSQUITTO_PASSWD).exists():
            raise RuntimeError("mosquitto_passwd is missing: apt-get install mosquitto "
                               "(scripts/system-packages.sh does).")
        self.passwords = {user: secrets.token_urlsafe(18) for user in users}
        passwords, acl = self.folder.resolve() / "passwords", self.folder.resolve() / "acl"
        write_atomic(passwords, "".join(f"{user}:{password}\n" for user, password in self.passwords.items()).encode())
        subprocess.run([MOSQUITTO_PASSWD, "-U", str(passwords)], check=True, capture_output=True)
        acl.write_text(TOPIC_ACL)
        return (f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n"
                "use_username_as_clientid true\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (scripts/system-packages.sh does).")
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s.")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM saves the persistence database (sessions, queued and retained messages)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def local_broker(folder: Path, devices: Sequence[str] | None = None) -> Mosquitto | EmbeddedBroker:
    """A broker on loopback for one process's federation: mosquitto where installed (with `devices`, only they
    and the aggregator log in), else the embedded amqtt, which admits anyone (logged as a warning)."""
    if Path(MOSQUITTO).exists():
        return Mosquitto(folder, devices=devices)
    logging.getLogger("fedpeft.broker").warning(
        "mosquitto is not installed: the embedded broker admits any local process "
        "(apt-get install mosquitto for generated logins and an ACL)")
    return EmbeddedBroker()
