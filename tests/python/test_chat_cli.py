"""`neuroshard chat` driven in a pseudo-terminal: two turns with history, Ctrl-C in the middle
of an answer (the chat goes on), /reset, /system and /quit."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time

import neuroshard
from conftest import cli_binary


class Terminal:
    """The chat process on a pty, read with a deadline."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        """Everything read up to and including the next `marker` (after what was consumed)."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} within {timeout} s; output so far: {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    chunk = ""
                assert chunk or self.proc.poll() is None, f"chat exited: {self.seen!r}"
                self.seen += chunk
        at = self.seen.index(marker) + len(marker)
        out, self.seen = self.seen[:at], self.seen[at:]
        return out

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def interrupt(self) -> None:
        # What the terminal does on Ctrl-C: SIGINT to the foreground process group.
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def test_terminal_chat_turns_interrupt_and_reset(swarm: neuroshard.LocalSwarm) -> None:
    term = Terminal([cli_binary(), "chat", "--peers", swarm.address, "--max-tokens", "200"])
    try:
        term.read_until("> ")
        term.send("What is the capital of France?")
        first = term.read_until("\n> ")
        assert "Paris" in first, first
        # The second turn sees the first: "its" only makes sense with the history.
        term.send("What language do people speak there?")
        second = term.read_until("\n> ")
        assert "French" in second, second
        # Ctrl-C while an answer streams stops that answer, not the chat.
        term.send("Write a very long story about a dragon who learns to cook.")
        term.read_until(" ")  # the answer has started
        term.interrupt()
        stopped = term.read_until("\n> ")
        assert "(stopped)" in stopped, stopped
        term.send("/reset")
        assert "(new chat)" in term.read_until("\n> ")
        term.send("/system You always answer in one word.")
        assert "system message set" in term.read_until("\n> ")
        term.send("What is the capital of France?")
        assert "Paris" in term.read_until("\n> ")
        term.send("/quit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
