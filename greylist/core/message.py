"""Per-connection message state of the SMTPD policy protocol.

DESCRIPTION
    Requests of one message share Postfix's "instance" attribute. A
    Session belongs to one connection (one smtpd process under spawn(8),
    one socket in the daemon) and remembers, for the message in
    progress, whether a recipient was deferred (then no later recipient of
    the same message counts the client as retrying), whether a recipient
    was accepted because the client proved
    itself and whether the X-Greylist header was sent. A new instance
    starts over. Sessions are never shared between connections, so one
    connection cannot reset another's message.

    This module is part of the pure core: no I/O, no clock, no logging.
"""


class Session:
    """The message state of one connection."""

    __slots__ = ("instance", "accepted", "proven", "header_sent", "deferred")

    def __init__(self) -> None:
        self.instance: str | None = None
        self.accepted = False
        # Whether a recipient proved the client; accepted without it: by
        # a correspondent pair, which a forged sender can name.
        self.proven = False
        self.header_sent = False
        self.deferred = False

    def begin(self, instance: str | None) -> None:
        """Note the instance of a request; a new one starts a new message."""
        if instance != self.instance:
            self.instance, self.accepted, self.header_sent = instance, False, False
            self.proven = self.deferred = False

    @property
    def message_accepted(self) -> bool:
        """Whether a recipient of this message (with an instance) was accepted."""
        return self.instance is not None and self.accepted
