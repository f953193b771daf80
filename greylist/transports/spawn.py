"""The spawn(8) transport: one connection on stdin and stdout, synchronous.

DESCRIPTION
    Reader takes requests from a blocking binary stream through a push
    decoder (protocols/policy.py): one read(2) of up to READ_SIZE bytes
    serves all the requests it holds. serve() reads requests so, has the
    service
    answer each with the Session of this one connection, writes each
    reply flushed, and returns at end of input. It serves any number of
    requests; after each reply the service takes its after-reply step
    (a cleanup step), so that work never delays an answer.

DIAGNOSTICS
    A protocol violation is logged as a warning; serve() then returns 1
    without a reply, and the caller exits (SMTPD_POLICY_README). A
    request with over-long attributes (RequestTooLong) gets the
    service's too_long() reply, which logs it, and the connection goes
    on. With -vv each request and reply is logged.
"""

from typing import BinaryIO

from greylist.core.message import Session
from greylist.protocols.policy import READ_SIZE, Decoder, ProtocolError, RequestTooLong
from greylist.service import PolicyService


class Reader:
    """Requests from one blocking binary stream with read1() (a
    BufferedReader such as sys.stdin.buffer, or a BytesIO)."""

    def __init__(self, stream: BinaryIO, decoder: Decoder | None = None) -> None:
        self._read1 = stream.read1
        self.decoder = decoder or Decoder()

    def read(self) -> dict[str, str] | None:
        """Return the next request, or None at end of input between
        requests. Raises ProtocolError on malformed input."""
        decoder = self.decoder
        while True:
            attrs = decoder.next()
            if attrs is not None:
                return attrs
            data = self._read1(READ_SIZE)
            if not data:
                decoder.eof()
                return None
            decoder.feed(data)


def serve(instream: BinaryIO, outstream: BinaryIO, service: PolicyService,
          session: Session | None = None) -> int:
    """Answer requests until end of input; return the process exit status.

    service is any service of service.py: its Decoder class decodes the
    protocol, new_session() makes the connection's session and
    reply(request, session) answers, framed. instream must have read1()
    (sys.stdin.buffer, or a BytesIO). The connection's session is new
    unless one is given (tests that replay a connection in parts).
    Returns 0 at end of input, 1 after a protocol violation (logged, no
    reply sent).
    """
    log = service.log
    read1 = instream.read1
    decoder = service.Decoder()
    reply_to = service.reply
    session = session or service.new_session()
    while True:
        try:
            # Reader.read(), inline: one call less per request.
            attrs = decoder.next()
            if attrs is None:
                try:
                    data = read1(READ_SIZE)
                except ConnectionError:
                    # A socket of spawn(8) reset by a client that was
                    # killed (postfix stop) before it read our last reply.
                    log.debug(1, "client went away, exiting")
                    service.close()
                    return 0
                if data:
                    decoder.feed(data)
                    continue
                decoder.eof()
                log.debug(1, "end of input, exiting")
                service.close()
                return 0
            trace = log.verbose >= 2
            if trace:
                log.debug(2, "request: %s" % _shown(attrs))
            reply = reply_to(attrs, session)
            if trace:
                log.debug(2, "reply: %s" % reply.decode("utf-8", "replace").strip())
        except RequestTooLong as exc:
            # Discarded whole: the fail-open reply, and the connection goes on.
            reply = service.too_long(exc)
        except ProtocolError as exc:
            log.warning("%s; disconnecting without a reply" % exc)
            return 1
        try:
            outstream.write(reply)
            outstream.flush()
        except ConnectionError:   # BrokenPipeError, ConnectionResetError
            log.debug(1, "client went away before the reply")
            service.close()
            return 0
        service.after_reply()


def _shown(request) -> str:
    if isinstance(request, dict):
        return " ".join("%s=%s" % item for item in request.items())
    return " ".join(request)
