"""Threads that send the model's responses: ``ResponseSender.send`` is an IPC round trip to
tritonserver (tens of microseconds) during which the stub's GIL is released, so several threads
overlap their round trips while the response thread builds the next responses. A request's
responses all go through one thread (chosen by its id), so they leave in order and nothing
follows its FINAL."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_STOP = object()


class ResponseSenders:
    def __init__(self, num_threads: int, final_flag: int, log: Callable[[str, str], None]) -> None:
        if num_threads < 1:
            raise ValueError(f"response_threads must be >= 1, got {num_threads}")
        self._final_flag = final_flag
        self._log = log
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(num_threads)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"multilora-sender-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()

    def send(self, request_key: int, state: Any, response: Any, flags: int) -> None:
        """Queue ``response`` for ``state.sender``; after a FINAL, the state lets go of its
        request and sender (in the sending thread, once sent)."""
        self._queues[request_key % len(self._queues)].put((state, response, flags))

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, then stop the threads."""
        for q in self._queues:
            q.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            state, response, flags = item
            try:
                state.sender.send(response, flags=flags)
            except Exception as error:  # e.g. the client is gone; nothing else to do for it
                self._log("warn", f"request {state.request_id}: sending a response failed: {error}")
            if flags & self._final_flag:
                state.request = state.sender = None
