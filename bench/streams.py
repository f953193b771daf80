"""Deterministic, seeded streams of Postfix 3.7 RCPT policy requests.

DESCRIPTION
    build_plan(scenario, requests, seed, processes) returns a Plan: the
    requests of each phase (warm-up A, warm-up B, timed) split over K
    connections, and for every request the identity of its triple, so
    that the harness can check each answer (see oracle in run.py).

    Every request carries all the attributes that Postfix 3.7's smtpd
    sends for check_policy_service (smtpd_check.c, attr_clnt_request()),
    in its order (tests/data/rcpt.txt), with empty values sent as
    "name=" as smtpd sends them.

    Scenarios:
      new      every triple never seen before (unique recipient per
               triple, so no program's key normalisation merges two),
               and no (client, sender) either: each message has a sender
               of its own (greylist passes a new recipient of a sender
               whose client group has tried it for the delay, so a
               repeated sender would not be a new triple to it), and no
               null sender.
      repeat   warm-up: W triples sent once (deferred), again after the
               delay (passed); timed: N requests for those known,
               passed triples, drawn with a skew (some senders write
               often): read-heavy.
      mixed    warm-up: W passed triples and P pending first attempts;
               timed, drawn by message: known triples (40% of draws),
               retries of the pending first attempts after the delay
               (13%), first attempts of new messages with 1-5
               recipients (47%), 43% of which are retried a few messages
               later (early retry) and 29% a quarter of the stream later
               (late retry). By request that is about 22% known, 7%
               retries after the warm-up, 45% first attempts, 19% early
               and 7% late retries (Plan.counts has the exact figures).
               20% IPv6 clients; senders plain, +ext, VERP, SRS, BATV,
               null and mixed case; some retries come from another
               address of the same /24 or /64 (sending pools).

    Addresses: clients in 198.18.0.0/15 (RFC 2544 benchmarking) and
    2001:db8::/32 (RFC 3849), names under .example (RFC 2606), so that
    no shipped whitelist of a peer matches.
"""

import ipaddress
import random
from dataclasses import dataclass, field

SCENARIOS = ("new", "repeat", "mixed")

FIRST = ("anna", "ben", "carla", "david", "eva", "frank", "greta", "hans", "ines",
         "jan", "karin", "lars", "maria", "nils", "olga", "paul", "rita", "sven",
         "tina", "uwe", "vera", "walter", "yusuf", "zoe", "li", "mohamed", "sofia",
         "lucas", "emma", "noah")
LAST = ("smith", "mueller", "garcia", "rossi", "martin", "novak", "kowalski",
        "jensen", "silva", "nguyen", "ivanov", "dubois", "schmidt", "weber",
        "meyer", "fischer", "wagner", "becker", "hoffmann", "schulz", "tanaka",
        "kim", "ali", "costa", "bianchi", "moreau", "petrov", "berg", "lund", "horvat")
WORDS = ("alpha", "bravo", "cargo", "delta", "echo", "fjord", "globe", "harbor",
         "iris", "jade", "kilo", "lumen", "metro", "nova", "orbit", "pixel", "quartz",
         "river", "sierra", "terra", "ultra", "vivid", "willow", "xenon", "yonder",
         "zephyr", "amber", "birch", "cobalt", "dune")
ROLE = ("info", "news", "noreply", "billing", "support", "sales", "hr", "team",
        "orders", "alerts", "newsletter", "service")
LOCAL_DOMAINS = ("example.net", "corp.example.com", "mail.example.org",
                 "students.example.edu")
CIPHERS = (("TLSv1.3", "TLS_AES_256_GCM_SHA384", "256"),
           ("TLSv1.3", "TLS_AES_128_GCM_SHA256", "128"),
           ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", "256"),
           ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", "128"),
           ("", "", "0"))


@dataclass(frozen=True, slots=True)
class Client:
    address: str
    name: str          # "unknown" when not verified
    reverse: str
    helo: str
    ipv6: bool
    pool: tuple        # sibling addresses in the same /24 or /64


@dataclass(slots=True)
class Message:
    client: Client
    sender: str
    recipients: list           # of str
    triples: list              # triple ids, one per recipient


@dataclass
class Plan:
    scenario: str
    seed: int
    processes: int
    triples: list = field(default_factory=list)   # id -> (client, sender, rcpt)
    warm_a: list = field(default_factory=list)    # per connection: [(tid, bytes)]
    warm_b: list = field(default_factory=list)
    timed: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)    # message kinds in the timed phase

    def timed_requests(self) -> int:
        return sum(len(c) for c in self.timed)


class Generator:
    """Realistic senders, clients and recipients from one seeded PRNG."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rcpt_counter = 0
        self.sender_counter = 0
        self.instance_counter = 0
        self.ip4_counter = self.rng.randrange(1 << 16)
        self.ip6_counter = self.rng.randrange(1 << 16)
        self.triples: list = []
        self.triple_ids: dict = {}

    # Population.

    def client(self, ipv6: bool) -> Client:
        rng = self.rng
        if ipv6:
            self.ip6_counter += 1
            net = ipaddress.IPv6Address("2001:db8::") + (self.ip6_counter << 64)
            hosts = [str(net + rng.choice((rng.randrange(1, 256),
                                           rng.randrange(1 << 64))))
                     for _ in range(3)]
        else:
            # A /24 inside 198.18.0.0/15: 512 networks, hosts 1..254.
            self.ip4_counter += 1
            base = (198 << 24) | (18 << 16) | ((self.ip4_counter % 512) << 8)
            hosts = [str(ipaddress.IPv4Address(base + rng.randrange(1, 255)))
                     for _ in range(3)]
        domain = "%s-%s.example" % (rng.choice(WORDS), rng.choice(WORDS))
        host = "%s%d.%s" % (rng.choice(("mail", "mx", "smtp", "out", "mta")),
                            rng.randrange(1, 40), domain)
        verified = rng.random() < 0.85
        return Client(hosts[0], host if verified else "unknown",
                      host if rng.random() < 0.95 else "unknown",
                      host if rng.random() < 0.9 else "[%s]" % hosts[0]
                      if not ipv6 else "[IPv6:%s]" % hosts[0],
                      ipv6, tuple(hosts))

    def sender(self, kind: str, recipient: str, unique: bool = False) -> str:
        rng = self.rng
        domain = "%s.example" % rng.choice(WORDS)
        user = "%s.%s" % (rng.choice(FIRST), rng.choice(LAST))
        token = ""
        if unique:
            # Letters, not digits: digit tokens are VERP counters to the
            # normalisers, which would merge them. VERP senders normalise
            # to the list's address, and the null sender is one sender.
            self.sender_counter += 1
            token = "." + _letters(self.sender_counter)
            user += token
            if kind in ("null", "verp"):
                kind = "plain"
        if kind == "plain":
            # (The draws in the order of earlier versions: same streams.)
            return "%s@%s" % (user if rng.random() < 0.6 else rng.choice(ROLE) + token,
                              domain)
        if kind == "upper":
            return "%s@%s" % (user.title(), domain.upper())
        if kind == "ext":
            return "%s+%s%d@%s" % (user, rng.choice(("news", "list", "shop", "tag")),
                                   rng.randrange(1000), domain)
        if kind == "verp":
            rl, _, rd = recipient.partition("@")
            if rng.random() < 0.5:  # Mailman
                return "%s-bounces+%s=%s@lists.%s" % (rng.choice(WORDS), rl, rd, domain)
            return "bounce-%d-%d-%s=%s@em.%s" % (rng.randrange(10 ** 6),
                                                 rng.randrange(10 ** 8), rl, rd, domain)
        if kind == "srs":
            return "SRS0=%s=%s=%s=%s@fwd.%s" % (
                "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   "0123456789+/") for _ in range(4)),
                "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(2)),
                "%s.example" % rng.choice(WORDS), user, domain)
        if kind == "batv":
            return "prvs=%d%03d%s=%s@%s" % (rng.randrange(10), rng.randrange(1000),
                                            "%06x" % rng.randrange(1 << 24), user, domain)
        if kind == "null":
            return ""
        raise ValueError(kind)

    def sender_kind(self, mixed: bool) -> str:
        r = self.rng.random()
        if not mixed:
            return "plain" if r < 0.9 else "ext"
        for kind, p in (("plain", 0.55), ("ext", 0.10), ("verp", 0.12), ("srs", 0.06),
                        ("batv", 0.07), ("null", 0.05)):
            if r < p:
                return kind
            r -= p
        return "upper"

    def recipient(self) -> str:
        # Unique per new triple: a counter in the local part, written as
        # letters-and-digits like real mailboxes ("anna.smith42").
        self.rcpt_counter += 1
        rng = self.rng
        return "%s.%s%d@%s" % (rng.choice(FIRST), rng.choice(LAST), self.rcpt_counter,
                               rng.choice(LOCAL_DOMAINS))

    def triple_id(self, client: str, sender: str, recipient: str) -> int:
        ident = (client, sender.lower(), recipient.lower())
        tid = self.triple_ids.get(ident)
        if tid is None:
            tid = self.triple_ids[ident] = len(self.triples)
            self.triples.append(ident)
        return tid

    def message(self, mixed: bool, max_rcpts: int = 1, unique: bool = False) -> Message:
        rng = self.rng
        client = self.client(ipv6=mixed and rng.random() < 0.2)
        n = 1
        if max_rcpts > 1 and rng.random() < 0.25:
            n = rng.randrange(2, max_rcpts + 1)
        recipients = [self.recipient() for _ in range(n)]
        sender = self.sender(self.sender_kind(mixed), recipients[0], unique)
        return self.bind(Message(client, sender, recipients, []))

    def bind(self, msg: Message) -> Message:
        msg.triples = [self.triple_id(msg.client.address, msg.sender, r)
                       for r in msg.recipients]
        return msg

    def retry(self, msg: Message, pool_move: bool) -> Message:
        """The same message again, in a new session (maybe from a pool sibling)."""
        client = msg.client
        if pool_move:
            sibling = self.rng.choice([a for a in client.pool if a != client.address]
                                      or [client.address])
            client = Client(sibling, client.name, client.reverse, client.helo,
                            client.ipv6, client.pool)
        return self.bind(Message(client, msg.sender, list(msg.recipients), []))

    # Wire format.

    def encode(self, msg: Message) -> list:
        """Return [(triple id, request bytes)] for the RCPTs of one session."""
        rng = self.rng
        self.instance_counter += 1
        instance = "%x.%x.%x.%d" % (rng.randrange(1000, 60000), 1700000000 +
                                    self.instance_counter, rng.randrange(1 << 20), 0)
        proto, cipher, bits = rng.choice(CIPHERS)
        client = msg.client
        server = "2001:db8:ffff::25" if client.ipv6 else "198.51.100.25"
        size = str(rng.choice((0, rng.randrange(800, 250000))))
        port = str(rng.randrange(1024, 65536))
        out = []
        queue_id = ""
        for i, (tid, rcpt) in enumerate(zip(msg.triples, msg.recipients)):
            if i == 1:
                # smtpd opens the queue file at the first accepted RCPT.
                queue_id = "%010X" % rng.randrange(1 << 40)
            attrs = (
                ("request", "smtpd_access_policy"),
                ("protocol_state", "RCPT"),
                ("protocol_name", "ESMTP" if proto or rng.random() < 0.9 else "SMTP"),
                ("client_address", client.address),
                ("client_name", client.name),
                ("client_port", port),
                ("reverse_client_name", client.reverse),
                ("server_address", server),
                ("server_port", "25"),
                ("helo_name", client.helo),
                ("sender", msg.sender),
                ("recipient", rcpt),
                ("recipient_count", "0"),
                ("queue_id", queue_id),
                ("instance", instance),
                ("size", size),
                ("etrn_domain", ""),
                ("stress", ""),
                ("sasl_method", ""),
                ("sasl_username", ""),
                ("sasl_sender", ""),
                ("ccert_subject", ""),
                ("ccert_issuer", ""),
                ("ccert_fingerprint", ""),
                ("ccert_pubkey_fingerprint", ""),
                ("encryption_protocol", proto),
                ("encryption_cipher", cipher),
                ("encryption_keysize", bits),
                ("policy_context", ""),
            )
            data = "".join("%s=%s\n" % kv for kv in attrs) + "\n"
            out.append((tid, data.encode("utf-8")))
        return out


def _spread(messages: list, generator: Generator, k: int) -> list:
    """Encode messages and deal them round-robin to k connections."""
    conns: list = [[] for _ in range(k)]
    for i, msg in enumerate(messages):
        conns[i % k].extend(generator.encode(msg))
    return conns


def _letters(number: int) -> str:
    """number written in letters a-z (bijective base 26)."""
    text = ""
    while number:
        number, digit = divmod(number - 1, 26)
        text = chr(ord("a") + digit) + text
    return text


def build_plan(scenario: str, requests: int, seed: int, processes: int,
               warm: int | None = None) -> Plan:
    """Return the plan of a scenario; see the module description."""
    if scenario not in SCENARIOS:
        raise ValueError("unknown scenario %r" % scenario)
    gen = Generator(seed)
    rng = gen.rng
    plan = Plan(scenario, seed, processes)
    if scenario == "new":
        messages, total = [], 0
        while total < requests:
            msg = gen.message(mixed=True, max_rcpts=min(5, requests - total), unique=True)
            messages.append(msg)
            total += len(msg.recipients)
        plan.timed = _spread(messages, gen, processes)
        plan.counts = {"first attempts": total}
    elif scenario == "repeat":
        w = warm if warm is not None else min(5000, requests)
        known, total = [], 0
        while total < w:
            msg = gen.message(mixed=False)
            known.append(msg)
            total += 1
        plan.warm_a = _spread(known, gen, processes)
        plan.warm_b = _spread(known, gen, processes)
        # Skewed draw: a fifth of the triples get half the traffic.
        hot = known[:max(1, len(known) // 5)]
        timed = [rng.choice(hot) if rng.random() < 0.5 else rng.choice(known)
                 for _ in range(requests)]
        plan.timed = _spread([gen.retry(m, False) for m in timed], gen, processes)
        plan.counts = {"known": requests}
    else:
        _mixed(plan, gen, requests, warm)
    plan.triples = gen.triples
    return plan


def _mixed(plan: Plan, gen: Generator, requests: int, warm: int | None) -> None:
    rng = gen.rng
    w = warm if warm is not None else max(1, min(3000, requests // 4))
    known = [gen.message(mixed=True) for _ in range(w)]
    pending = [gen.message(mixed=True, max_rcpts=3)
               for _ in range(max(1, requests // 20))]
    plan.warm_a = _spread(known + pending, gen, plan.processes)
    plan.warm_b = _spread(known, gen, plan.processes)
    timed: list = []
    later: dict = {}          # message position -> retries due there
    counts = {"known": 0, "retry after warm-up": 0, "first attempt": 0,
              "early retry": 0, "late retry": 0}
    total = 0
    pending_iter = iter(pending)
    while total < requests:
        due = later.pop(len(timed), None)
        if due:
            for kind, msg in due:
                timed.append(msg)
                counts[kind] += len(msg.recipients)
                total += len(msg.recipients)
            continue
        r = rng.random()
        if r < 0.40:
            msg, kind = gen.retry(rng.choice(known), False), "known"
        elif r < 0.533 and (nxt := next(pending_iter, None)) is not None:
            msg, kind = gen.retry(nxt, rng.random() < 0.2), "retry after warm-up"
        else:
            msg, kind = gen.message(mixed=True, max_rcpts=5), "first attempt"
            s = rng.random()
            if s < 0.43:
                pos = len(timed) + 1 + rng.randrange(3, 40)
                later.setdefault(pos, []).append(
                    ("early retry", gen.retry(msg, rng.random() < 0.1)))
            elif s < 0.72:
                pos = len(timed) + 1 + max(4, requests // 4 + rng.randrange(requests // 8 + 1))
                later.setdefault(pos, []).append(
                    ("late retry", gen.retry(msg, rng.random() < 0.2)))
        timed.append(msg)
        counts[kind] += len(msg.recipients)
        total += len(msg.recipients)
    plan.timed = _spread(timed, gen, plan.processes)
    plan.counts = counts
