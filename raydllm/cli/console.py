"""CLI layer: what the terminal shows while a command runs Ray. Quiet by default: everything Ray, DeepSpeed,
MLflow and the worker processes print goes to a log file in the run's folder; the terminal gets raydllm's own
lines (progress, warnings that matter, results, errors). `raydllm -v` leaves the terminal to the libraries.

How: file descriptors 1 and 2 point at the log file (so C-level writes and child processes land there too), and
sys.stdout / sys.stderr become `LogStream`s that write to it. Ray forwards the output of its worker processes
to the driver through sys.stdout / sys.stderr, one line at a time with a "(ActorName pid=N) " prefix; a
forwarded line whose text starts with "[raydllm" (a training run's progress line, a worker's warning the user
must see) is echoed to the terminal as well, once. The terminal itself is reached through duplicates of the
original descriptors: `terminal_out` for results, `terminal_err` for progress, warnings and errors.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

MARK = "[raydllm"  # a line that starts with this is for the user, wherever it was printed
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\([^)]*\)\s?")  # "(RayTrainWorker pid=123) " on lines Ray forwards from workers
_RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_PACKAGE = str(Path(__file__).resolve().parents[1])


class LogStream:
    """A text stream into the log file that also echoes, once each, lines meant for the user."""

    def __init__(self, log, echo):
        self.log, self.echo = log, echo
        self.pending = ""
        self.seen: set[str] = set()

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = _RAY_REPEATED.sub("", _RAY_PREFIX.sub("", _ANSI.sub("", line).lstrip()))
            if shown.startswith(MARK) and shown not in self.seen:
                self.seen.add(shown)
                self.echo.write(_user_line(shown) + "\n")
                self.echo.flush()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # flush, fileno, encoding, buffer, ...: the log file's
        return getattr(self.log, name)


def _user_line(text: str) -> str:
    """'[raydllm] warning: x' -> 'raydllm: warning: x'; a progress line ('[raydllm  12s] step ...') as it is."""
    return "raydllm: " + text.removeprefix("[raydllm] ") if text.startswith("[raydllm] ") else text


class UserFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return _user_line(message) if message.startswith(MARK) else \
            f"raydllm: {record.levelname.lower()}: {message}"


class UserLines(logging.Filter):
    """raydllm's own warnings (and worse) also go to the terminal; everything else only to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("raydllm") and record.levelno >= logging.WARNING


class Console:
    """Where the command's own output goes. `quiet(log_path)` sends everything else to the log file."""

    def __init__(self):
        self._terminal: tuple | None = None  # (out, err) while quiet
        self.log_path: Path | None = None
        self._saved = None

    @property
    def terminal_out(self):
        return self._terminal[0] if self._terminal else sys.stdout

    @property
    def terminal_err(self):
        return self._terminal[1] if self._terminal else sys.stderr

    def show_warnings(self) -> None:
        """raydllm's own warnings (a cut answer, a grace period inside the warm-up) as one line on the terminal;
        other libraries' warnings to wherever stderr goes (the log file, when quiet)."""
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if str(Path(filename).resolve()).startswith(_PACKAGE):
                self.terminal_err.write(f"raydllm: warning: {message}\n")
                self.terminal_err.flush()
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def quiet(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        log.write(f"\n==== raydllm {' '.join(sys.argv[1:])} (pid {os.getpid()})\n")
        saved_fds = os.dup(1), os.dup(2)
        self._terminal = (os.fdopen(os.dup(saved_fds[0]), "w", buffering=1),
                          os.fdopen(os.dup(saved_fds[1]), "w", buffering=1))
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        self._saved = (saved_fds, sys.stdout, sys.stderr, log)
        sys.stdout = LogStream(log, self._terminal[1])
        sys.stderr = LogStream(log, self._terminal[1])
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        to_log = logging.StreamHandler(sys.stderr)
        to_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        to_terminal = logging.StreamHandler(self.terminal_err)
        to_terminal.addFilter(UserLines())
        to_terminal.setFormatter(UserFormatter())
        root.addHandler(to_log)
        root.addHandler(to_terminal)
        root.setLevel(logging.INFO)
        self.log_path = log_path
        self.note(f"log: {log_path}")

    def note(self, text: str) -> None:
        self.terminal_err.write(f"raydllm: {text}\n")
        self.terminal_err.flush()

    def restore(self) -> None:
        """The terminal back on descriptors 1 and 2 (after Ray has shut down, so its last words go to the log)."""
        if self._saved is None:
            return
        (out_fd, err_fd), stdout, stderr, log = self._saved
        self._saved = None
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = stdout, stderr
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        for stream in self._terminal:
            stream.close()
        self._terminal = None
        self.log_path = None
        log.close()
