"""A free TCP port on the loopback interface, for the tests that start servers (the app, Redis, workers)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; a server started next may still lose it to another
    process, which the tests that start one retry)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
