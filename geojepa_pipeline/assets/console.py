"""The terminal of ``geojepa materialize``: the assets' own messages for people, every Dagster event to a log file.

Dagster's console logger prints each engine event (step start, output handled, IO manager...) with a
130-character prefix: on a clean run that was 74 DEBUG lines out of 132. ``geojepa_console`` prints,
by ``verbosity``:

- ``normal``: warnings as ``  warning: step: message``; on a terminal, what an asset says
  (``context.log.info``: progress, results) as one live line, rewritten in place; no engine events;
- ``quiet``: nothing (the CLI still prints its one-line error);
- ``verbose``: every record, events included, as Dagster would.

Every record also goes, in full, to ``log_file`` (the traceback of a failure included), and the
warnings of the process are kept in ``WARNINGS`` for the CLI's summary. The UI's event log is
Dagster's own storage: it keeps everything whatever the console shows.
"""

from __future__ import annotations

import logging
import sys
import time

import dagster as dg

VERBOSITIES = ("quiet", "normal", "verbose")
WARNINGS: list[str] = []  # "step: message" of every warning an asset logged in this process
_ENGINE_MESSAGES = ("Dependencies for step ",)  # engine messages Dagster logs without an event
_live = {"shown": False}  # whether the terminal's last line is a live status line


def _clear_live() -> None:
    if _live["shown"]:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()
        _live["shown"] = False


def say(message: str) -> None:
    """Print one line of the CLI's own (a stage began or ended) below any live status line."""
    _clear_live()
    print(message, flush=True)


def _show_live(text: str) -> None:
    import shutil

    width = shutil.get_terminal_size((100, 20)).columns
    sys.stderr.write("\r\x1b[K" + text[: max(width - 1, 10)])
    sys.stderr.flush()
    _live["shown"] = True


class _ConsoleHandler(logging.Handler):
    def __init__(self, verbosity: str, log_file: str | None):
        super().__init__(logging.DEBUG)
        self.verbosity = verbosity
        self.log_file = log_file

    def emit(self, record: logging.LogRecord) -> None:
        meta = record.__dict__.get("dagster_meta", {})
        message = str(meta.get("orig_message", record.getMessage()))
        step = meta.get("step_key") or ""
        event = meta.get("dagster_event")
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        full = f"{stamp} {record.levelname} {meta.get('run_id', '')[:8]} {step} - {message}"
        error = getattr(getattr(event, "event_specific_data", None), "error", None)
        if self.log_file:  # opened per record (a few hundred a run): Dagster never closes a run's loggers
            with open(self.log_file, "a", encoding="utf-8") as fh:
                fh.write(full + "\n" + (error.to_string() if error is not None else ""))
        if event is None and message.startswith(_ENGINE_MESSAGES):
            event = "engine"  # Dagster's word on a step it skips: the failure itself is the CLI's one line
        if record.levelno >= logging.WARNING and event is None:
            WARNINGS.append(f"{step}: {message}" if step else message)
        line = f"  {step + ': ' if step else ''}{message}"
        if self.verbosity == "verbose":
            print(full, file=sys.stderr, flush=True)
        elif self.verbosity != "normal" or event is not None or record.levelno < logging.INFO:
            return
        elif record.levelno >= logging.WARNING:
            _clear_live()
            print(f"  warning: {step + ': ' if step else ''}{message}", file=sys.stderr, flush=True)
        elif sys.stderr.isatty():  # a pipe or a file gets the full log instead (GEOJEPA_HOME/logs)
            _show_live(line)


@dg.logger(
    config_schema={"verbosity": dg.Field(str, default_value="normal", description=f"one of {', '.join(VERBOSITIES)}"),
                   "log_file": dg.Field(dg.Noneable(str), default_value=None, description="append every record here")},
    description="geojepa materialize's terminal: the assets' messages, not Dagster's engine events (verbose: everything).",
)
def geojepa_console(init_context) -> logging.Logger:
    verbosity = init_context.logger_config["verbosity"]
    if verbosity not in VERBOSITIES:
        raise dg.DagsterInvalidConfigError(f"verbosity {verbosity!r}: use one of {', '.join(VERBOSITIES)}", [], None)
    logger = logging.Logger("geojepa.console", level=logging.DEBUG)
    logger.addHandler(_ConsoleHandler(verbosity, init_context.logger_config["log_file"]))
    return logger
