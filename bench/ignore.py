"""A postscreen callout server that answers every request "action=ignore": the ceiling.

Usage: python bench/ignore.py               (stdin/stdout, as spawn(8) runs one)
       python bench/ignore.py --listen PATH (an asyncio server on a unix socket)

It reads postscreen policy callout requests (name=value lines ended by an
empty line, Wietse Venema's design) and answers each "action=ignore"
followed by an empty line, looking at nothing but the empty lines, so its
rate is what the transport, the drivers and a minimal Python request loop
allow on this machine: bench/postscreen.py measures greylist-postscreen
and greylistd's callout beside it. The server form uses asyncio's
streams, as greylistd does, and stops on SIGTERM (exit 0). A request
longer than MAX_REQUEST bytes closes the connection (exit 1 on
stdin/stdout).
"""

import asyncio
import os
import signal
import sys

REPLY = b"action=ignore\n\n"
END = b"\n\n"
MAX_REQUEST = 10100   # greylist's MAX_REQUEST_BYTES
READ_SIZE = 16384


def split(buffer: bytes) -> tuple:
    """Return (how many requests end in buffer, the unfinished rest).
    Raises ValueError when the rest is longer than a request may be."""
    count = buffer.count(END)
    rest = buffer[buffer.rfind(END) + 2:] if count else buffer
    if len(rest) > MAX_REQUEST:
        raise ValueError("request too long")
    return count, rest


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
