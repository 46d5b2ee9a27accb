"""Local ports for the tests that configure a ClearML server which is not there."""

import socket


def closed_port() -> int:
    """A local port nothing listens on: where a ClearML server is configured but absent."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
