"""The side channel of the vLLM engine: readouts from the worker to the serving process over ZMQ.

vLLM has no output field a worker can add per-token data to (`ModelRunnerOutput` is closed;
`kv_transfer_params` only comes at the end of a request), so the worker that publishes (tensor
parallel rank 0 on the last pipeline stage) PUSHes each step's `encode_batch` frames to an
`ipc://` socket the serving process binds and PULLs from. The publisher never waits for the GPU
in the step: the values are copied to pinned host memory without blocking, and a thread waits
for the copy's CUDA event before sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import structlog
import torch

from monitor.engine.vllm_rows import RowSlice, ShippedRows, decode_batch, encode_batch


class ReadoutPublisher:
    """Worker side: `ship(slices, values)` from inside a step; a thread sends when the copy is done."""

    def __init__(self, address: str):
        import zmq

        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 2000)
        self._socket.connect(address)
        self._queue: queue.SimpleQueue[tuple[Sequence[RowSlice], torch.Tensor, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_loop, name="cotmon-readouts", daemon=True)
        self._thread.start()

    def ship(self, slices: Sequence[RowSlice], values: torch.Tensor) -> None:
        """Queue `values` [rows, n] (any device) for the frontend; returns without a device sync."""
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        else:
            host = values.detach().to(torch.float32).clone()
        self._queue.put((list(slices), host, event))

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            slices, host, event = item
            if event is not None:
                event.synchronize()
            self._socket.send_multipart(encode_batch(slices, host.numpy()), copy=False)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._socket.close()
        self._context.term()


class Mailbox:
    """One session's readouts as they arrive, for the coroutine that assembles its steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.rows: deque[ShippedRows] = deque()
        self.arrived = asyncio.Event()

    def deliver(self, rows: ShippedRows) -> None:
        """Called on the event loop's thread."""
        self.rows.append(rows)
        self.arrived.set()


class ReadoutInbox:
    """Serving side: binds `address`, receives batches on a thread, routes slices by session key.

    Slices for keys nobody registered (a session that already ended) are dropped.
    """

    def __init__(self, address: str):
        import zmq

        self.address = address
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._boxes: dict[str, Mailbox] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._log = structlog.get_logger("cotmon.engine.vllm")
        self._thread = threading.Thread(target=self._receive_loop, name="cotmon-inbox", daemon=True)
        self._thread.start()

    def register(self, key: str) -> Mailbox:
        """A mailbox for `key` on the running event loop; register before the request starts."""
        box = Mailbox(asyncio.get_running_loop())
        with self._lock:
            self._boxes[key] = box
        return box

    def unregister(self, key: str) -> None:
        with self._lock:
            self._boxes.pop(key, None)

    def _receive_loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._closing.is_set():
            if not dict(poller.poll(100)):
                continue
            frames = self._socket.recv_multipart()
            try:
                batch = decode_batch(frames)
            except ValueError as exc:
                self._log.error("readout_batch_unreadable", error=str(exc))
                continue
            for rows in batch:
                with self._lock:
                    box = self._boxes.get(rows.key)
                if box is not None:
                    with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits any more
                        box.loop.call_soon_threadsafe(box.deliver, rows)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self._socket.close()
        self._context.term()
