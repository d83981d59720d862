"""A one-line progress bar on stderr (a line every few seconds when stderr is not a TTY)."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.last_line = 0.0
        self.width = 0

    @staticmethod
    def bar(fraction: float, width: int = 20) -> str:
        fraction = min(1.0, max(0.0, fraction))
        filled = int(fraction * width)
        return "[" + "#" * filled + "-" * (width - filled) + "]"

    def update(self, phase: str, fraction: float | None, detail: str) -> None:
        if not self.enabled:
            return
        bar = f"{self.bar(fraction)} " if fraction is not None else ""
        text = f"{phase} {bar}{detail}"
        if self.tty:
            columns = shutil.get_terminal_size((120, 20)).columns
            text = text[: columns - 1]
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()
        elif time.monotonic() - self.last_line >= 5.0:
            self.last_line = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (phase changes, warnings)."""
        if not self.enabled:
            return
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0
