"""librdkafka's own log lines, through our logging and without the flood.

Left alone, librdkafka prints every failed connection attempt to stderr (ten to twenty a second while a
broker is down), at ERROR, whatever our log level. A client whose config carries ``"logger":
librdkafka_log()`` hands them to the logger ``flywheel.librdkafka`` instead: the first line of each kind
(facility and text, numbers aside) at INFO, its repeats at DEBUG. What a person must act on is said once by
our own code (an error line, a warning from an error callback), not by these.
"""

from __future__ import annotations

import logging
import re

_NUMBERS = re.compile(r"\d+")


class LibrdkafkaLog:
    """The ``logger`` of a confluent-kafka client: it calls ``log(level, "%s [%s] %s", fac, name, text)``
    from the thread that polls the client."""

    def __init__(self, logger: logging.Logger, max_kinds: int = 1024):
        self.logger = logger
        self.max_kinds = max_kinds
        self._seen: set[str] = set()

    def log(self, level: int, fmt: str, *args: object) -> None:
        kind = _NUMBERS.sub("#", f"{args[0]} {args[-1]}" if args else fmt)
        first = kind not in self._seen
        if first:
            if len(self._seen) >= self.max_kinds:
                self._seen.clear()
            self._seen.add(kind)
        self.logger.log(min(level, logging.INFO) if first else logging.DEBUG, fmt, *args)


def librdkafka_log(name: str = "flywheel.librdkafka") -> LibrdkafkaLog:
    return LibrdkafkaLog(logging.getLogger(name))
