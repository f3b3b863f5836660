"""Real mosquitto brokers for the tests: free loopback port, generated config, persistence, stop/restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from aggregator.broker import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with QoS 1 queues raised (its default 1000 silently drops)."""

    def __init__(self, folder: Path, config: str | None = None, port: int | None = None) -> None:
        """`config` replaces the generated settings (the port is then the caller's business)."""
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        user = "user root\n" if os.geteuid() == 0 else ""
        self.config = folder / "mosquitto.conf"
        self.config.write_text(user + (config or (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 100000\nmax_queued_bytes 0\nmax_inflight_messages 100\n"
            "set_tcp_nodelay true\npersistence true\n"
            f"persistence_location {folder}/\nlog_dest file {folder}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError("mosquitto is not installed: run 'bash scripts/test.sh' (it installs it) or apt-get install mosquitto.")
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
