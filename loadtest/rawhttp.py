"""A lean HTTP/1.1 client for load generation: keep-alive connections over asyncio streams, requests
written as pre-encoded bytes, responses read by Content-Length. A generator that shares the cores with
the server must cost as little as it can: this one spends a small fraction of what a general client
(httpx) spends per request, so more of the machine is left to the server under test.

Only what `POST /rank` load needs: one host, Content-Length bodies (no chunked responses), no TLS.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class RawClient:
    def __init__(self, url: str, max_connections: int = 64) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    def request_bytes(self, path: str, body: bytes) -> bytes:
        """A whole POST request, ready to write (build once, send many times)."""
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request on an idle connection (or a new one); (status, body).
        Raises OSError / asyncio.IncompleteReadError when the connection fails. A kept-alive connection
        the server closed while it sat idle (its keep-alive timeout) is retried once on a new one, as
        HTTP clients do: nothing had been answered on it."""
        async with self._slots:
            if self._idle:
                reader, writer = self._idle.pop()
                try:
                    return await self._exchange(reader, writer, request)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                        raise  # the server had begun to answer: not a stale connection
            reader, writer = await asyncio.open_connection(self.host, self.port)
            return await self._exchange(reader, writer, request)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> tuple[int, bytes]:
        try:
            writer.write(request)
            status_line = await reader.readuntil(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            length, close = 0, False
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, body

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
