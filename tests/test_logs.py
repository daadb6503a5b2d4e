"""The log handler that writes lines in batches (logs.BatchingStreamHandler)."""

from __future__ import annotations

import io
import logging
import threading
import time

from transaction_service.logs import BatchingStreamHandler, TextFormatter


class Recording(io.StringIO):
    """A stream that records each write separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.wrote = threading.Event()

    def write(self, text: str) -> int:
        self.writes.append(text)
        self.wrote.set()
        return super().write(text)


def logger_with(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test-batching-{id(handler)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler.setFormatter(TextFormatter())
    return logger


def test_info_lines_are_written_together_later_and_in_order() -> None:
    stream = Recording()
    handler = BatchingStreamHandler(stream)
    logger = logger_with(handler)
    for i in range(5):
        logger.info("line %d", i)
    assert stream.wrote.wait(30), "the writer thread never wrote the kept lines"
    # Wait until the batch is out (the writer thread writes it in one go).
    deadline = time.monotonic() + 30
    while stream.getvalue().count("\n") < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["0", "1", "2", "3", "4"]
    assert len(stream.writes) < 5  # batched, not one write per line
    handler.close()


def test_a_warning_is_written_at_once_after_what_was_kept_before_it() -> None:
    stream = Recording()
    handler = BatchingStreamHandler(stream)
    handler.DELAY = 3600  # the writer thread would wait an hour: only the warning writes
    logger = logger_with(handler)
    logger.info("first")
    logger.warning("second")
    text = stream.getvalue()
    assert text.index("first") < text.index("second")
    handler.close()


def test_flush_and_close_write_everything_kept() -> None:
    stream = Recording()
    handler = BatchingStreamHandler(stream)
    handler.DELAY = 3600
    logger = logger_with(handler)
    logger.info("kept until flushed")
    handler.flush()
    assert "kept until flushed" in stream.getvalue()
    logger.info("kept until closed")
    handler.close()
    assert "kept until closed" in stream.getvalue()


def test_a_batch_that_reaches_its_size_is_written_at_once() -> None:
    stream = Recording()
    handler = BatchingStreamHandler(stream)
    handler.DELAY = 3600
    logger = logger_with(handler)
    for i in range(handler.MAX_LINES):
        logger.info("line %d", i)
    assert stream.getvalue().count("\n") == handler.MAX_LINES
    handler.close()
