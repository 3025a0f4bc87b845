"""Wait until the rendezvous host of a multi-node job resolves, before torchrun starts.

On Kubernetes every node of a job starts at its own time. A headless service gets the
DNS record of node 0 only once that pod has an IP address, and a node that looks it up
earlier gets "Name or service not known". Waiting here, with a log line per retry,
turns that race into a delay instead of a failed pod.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def resolve(host: str) -> list[str]:
    """Return the addresses of ``host``; raise ``socket.gaierror`` when it does not resolve."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


def wait_for_host(
    host: str,
    timeout_s: float,
    resolver: Callable[[str], list[str]] = resolve,
    first_delay_s: float = 1.0,
    max_delay_s: float = 15.0,
) -> list[str]:
    """Retry resolving ``host`` with doubling delays until it resolves; return its addresses.

    Raises TimeoutError naming the host when it does not resolve within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    attempt = 1
    while True:
        try:
            addresses = resolver(host)
        except (socket.gaierror, UnicodeError) as error:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"rendezvous host {host!r} did not resolve within {timeout_s:.0f} s ({error}); check that node 0 "
                    "is running and that the endpoint names its service, or raise --rdzv-timeout"
                ) from error
            logger.info("rendezvous host %s does not resolve yet (try %d: %s); retrying in %.0f s", host, attempt, error, delay)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, max_delay_s)
            attempt += 1
            continue

        if attempt > 1:
            logger.info("rendezvous host %s resolves to %s after %d tries", host, ", ".join(addresses), attempt)
        return addresses
