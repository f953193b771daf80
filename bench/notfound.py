"""A socketmap server that answers every netstring "9:NOTFOUND ,": the ceiling.

Usage: python bench/notfound.py               (stdin/stdout, as spawn(8) runs one)
       python bench/notfound.py --listen PATH (an asyncio server on a unix socket)

It reads netstrings ("LEN:DATA,", socketmap_table(5)) and answers each
complete one "9:NOTFOUND ,", looking at nothing but the lengths, so its
rate is what the transport, the drivers and a minimal Python request loop
allow on this machine: bench/socketmap.py measures greylist-socketmap and
greylistd's socketmap learner beside it. The server form uses asyncio's
streams, as greylistd does, and stops on SIGTERM (exit 0). A framing error
closes the connection (exit 1 on stdin/stdout).
"""

import asyncio
import os
import signal
import sys

REPLY = b"9:NOTFOUND ,"
MAX_LENGTH = 10100   # greylist's MAX_REQUEST_BYTES
READ_SIZE = 16384


def split(buffer: bytes) -> tuple:
    """Return (complete netstrings at the start of buffer, the rest).
    Raises ValueError for a framing error."""
    count = 0
    while True:
        colon = buffer.find(b":", 0, 7)
        if colon < 0:
            if len(buffer) > 6 or not (buffer.isdigit() or not buffer):
                raise ValueError("bad netstring length")
            return count, buffer
        digits = buffer[:colon]
        if not digits.isdigit() or int(digits) > MAX_LENGTH:
            raise ValueError("bad netstring length")
        end = colon + 1 + int(digits)
        if len(buffer) <= end:
            return count, buffer
        if buffer[end:end + 1] != b",":
            raise ValueError("netstring without its comma")
        buffer = buffer[end + 1:]
        count += 1


def pipes() -> int:
    rest = b""
    while True:
        data = os.read(0, READ_SIZE)
        if not data:
            return 1 if rest else 0
        try:
            count, rest = split(rest + data)
        except ValueError:
            return 1
        out = REPLY * count
        while out:
            out = out[os.write(1, out):]


async def serve(path: str) -> int:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rest = b""
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                count, rest = split(rest + data)
                if count:
                    writer.write(REPLY * count)
                    await writer.drain()
        except (ValueError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(connection, path=path, backlog=512)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    return 0


def main(argv: list) -> int:
    if len(argv) == 2 and argv[0] == "--listen":
        return asyncio.run(serve(argv[1]))
    if argv:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2
    return pipes()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
