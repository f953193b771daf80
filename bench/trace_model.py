"""The sender model of bench/trace.py: a seeded week of inbound SMTP traffic.

DESCRIPTION
    build(seed, quick) returns a Trace: the messages of every sender class,
    each with its first-attempt time, envelope sender, recipients (1-5),
    retry schedule, give-up time and the rule that picks the sending host
    of each attempt. The harness (trace.py) turns each attempt into SMTPD
    policy requests and asks the program under test; what happens next
    (which recipients are retried, when) depends on its answers, so the
    trace is adaptive, but every random choice is drawn from a generator
    keyed by (seed, message, attempt number), so that attempt k of a
    message uses the same host and the same retry jitter whichever
    program answers: all programs see the same trace.

    Sender classes (README.md "Run L" has the table and the sources):

      provider pools   Gmail, Microsoft 365, Amazon SES, Mimecast, Mailchimp,
                       SendGrid: each attempt comes from a host of the
                       provider's pool, another /24 or /16 with a class-
                       specific probability; hosts have verified names in
                       the provider's style. Address ranges are the
                       providers' published SPF ranges, hard-coded here
                       (no network access when this was written; they
                       drift, so they are representative, not complete).
      single-host MTAs Postfix, Exim, Sendmail, Exchange: one address per
                       sending host, its documented retry schedule and
                       queue lifetime.
      spam             one-shot bots (never retry), early-retry bots
                       (retry within seconds, below any delay tried here
                       except greylist.pl's 60 s) and address-rotating bots
                       (retry on an MTA-like schedule, each attempt from
                       another host of one access ISP, whose verified
                       names are dynamic-looking and share the ISP's
                       domain).

    Addresses of single-host MTAs are in 198.18.0.0/15 (RFC 2544) and
    2001:db8::/32 (RFC 3849), access ISPs in 100.64.0.0/10 (RFC 6598),
    names under .example (RFC 2606); only the provider pools use real
    ranges and real domains, because recognising them is what is measured.
"""

import hashlib
import ipaddress
import math
import random
from dataclasses import dataclass, field

START = 1709510400           # Monday 2024-03-04 00:00:00 UTC
DAY = 86400
WEEK = 7 * DAY

LOCAL_DOMAINS = ("example.net", "corp.example.com")
FIRST = ("anna", "ben", "carla", "david", "eva", "frank", "greta", "hans", "ines",
         "jan", "karin", "lars", "maria", "nils", "olga", "paul", "rita", "sven",
         "tina", "uwe", "vera", "walter", "yusuf", "zoe", "li", "mohamed", "sofia",
         "lucas", "emma", "noah", "heidi", "dave", "oscar", "petra", "quinn", "ruth")
LAST = ("smith", "mueller", "garcia", "rossi", "martin", "novak", "kowalski",
        "jensen", "silva", "nguyen", "ivanov", "dubois", "schmidt", "weber",
        "meyer", "fischer", "wagner", "becker", "hoffmann", "schulz", "tanaka",
        "kim", "ali", "costa", "bianchi", "moreau", "petrov", "berg", "lund", "horvat")
WORDS = ("alpha", "bravo", "cargo", "delta", "echo", "fjord", "globe", "harbor",
         "iris", "jade", "kilo", "lumen", "metro", "nova", "orbit", "pixel", "quartz",
         "river", "sierra", "terra", "ultra", "vivid", "willow", "xenon", "yonder",
         "zephyr", "amber", "birch", "cobalt", "dune", "sirasi", "tundra", "vesta")


def rng_for(seed: int, *parts) -> random.Random:
    """A generator keyed by seed and parts (stable across runs and programs)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


# --------------------------------------------------------------------------
# Hosts and pools

@dataclass(frozen=True, slots=True)
class Host:
    address: str
    name: str            # verified name, or "unknown"
    reverse: str         # PTR name, or "unknown"
    helo: str


def _host_in(net: ipaddress._BaseNetwork, rng: random.Random) -> ipaddress._BaseAddress:
    size = net.num_addresses
    if net.version == 4 and size >= 4:
        offset = rng.randrange(1, size - 1)
        if (int(net.network_address) + offset) & 0xff in (0, 255):
            offset = rng.randrange(1, size - 1)
    else:
        offset = rng.randrange(1, min(size, 1 << 16))
    return net.network_address + offset


def _nets(specs) -> list:
    return [(ipaddress.ip_network(n), w) for n, w in specs]


def _weighted(rng: random.Random, items: list):
    total = sum(w for _, w in items)
    x = rng.random() * total
    for item, w in items:
        x -= w
        if x < 0:
            return item
    return items[-1][0]


class Pool:
    """A provider's sending pool: address ranges, a reverse-name rule, and
    how likely a retry is to come from the same /24 (/64) as the attempt
    before it (p_same)."""

    def __init__(self, name: str, v4: list, namer, p_same: float, v6: list = (),
                 source: str = "") -> None:
        self.name = name
        self.v4 = _nets(v4)
        self.v6 = _nets(v6)
        self.namer = namer
        self.p_same = p_same
        self.source = source

    def pick(self, rng: random.Random, prev: Host | None, ipv6: bool,
             subset: list | None = None) -> Host:
        nets = subset if subset is not None else (self.v6 if ipv6 else self.v4)
        if prev is not None and rng.random() < self.p_same:
            addr = ipaddress.ip_address(prev.address)
            bits = 64 if addr.version == 6 else 24
            net = ipaddress.ip_network("%s/%d" % (addr, bits), strict=False)
            for _ in range(4):
                new = _host_in(net, rng)
                if new != addr:
                    break
        else:
            new = _host_in(_weighted(rng, nets), rng)
        name = self.namer(new)
        return Host(str(new), name, name, name)


def _pick(options: tuple, *parts) -> str:
    return options[stable_int(*parts) % len(options)]


# Gmail: _spf.google.com includes _netblocks.google.com (ip4 ... 209.85.128.0/17
# ...) and _netblocks2.google.com (ip6 2001:4860:4000::/36, 2607:f8b0:4000::/36,
# 2a00:1450:4000::/36 ...). Gmail's outbound MTAs, mail-*.google.com, sit in
# 209.85.128.0/17, one two-letter cluster per /24 (mail-wm1-f54.google.com is
# 209.85.128.54); over IPv6 in a few /64s (2607:f8b0:4864:20::62b is
# mail-pl1-x62b.google.com).
GOOGLE_CLUSTERS = ("wm1", "wr1", "ed1", "ej1", "lf1", "lj1", "pl1", "pj1", "qk1", "qt1",
                   "yb1", "yw1", "oi1", "ot1", "io1", "il1", "vs1", "vk1", "ua1", "pf1",
                   "pg1", "qv1", "oa1", "ob1", "ua1", "vi1", "wm2", "ej2")


def google_name(addr) -> str:
    if addr.version == 4:
        c, d = addr.packed[2], addr.packed[3]
        return "mail-%s-f%d.google.com" % (_pick(GOOGLE_CLUSTERS, "g", c), d)
    low = int(addr) & 0xffff
    return "mail-%s-x%x.google.com" % (_pick(GOOGLE_CLUSTERS, "g6", low >> 8), low)


GMAIL = Pool("Gmail", [("209.85.128.0/17", 1)], google_name, p_same=0.3,
             v6=[("2607:f8b0:4864:20::/64", 1), ("2a00:1450:4864:20::/64", 1),
                 ("2001:4860:4864:20::/64", 1)],
             source="_spf.google.com -> _netblocks.google.com, _netblocks2.google.com")

# Microsoft 365: spf.protection.outlook.com: ip4:40.92.0.0/15 ip4:40.107.0.0/16
# ip4:52.100.0.0/15 ip4:52.102.0.0/16 ip4:52.103.0.0/17 ip4:104.47.0.0/17
# ip6:2a01:111:f400::/48 ip6:2a01:111:f403::/49 ... . Consumer outlook.com /
# hotmail mail leaves from 40.92.0.0/15 and 52.103.0.0/17 (names such as
# mail-oln040092066048.outbound.protection.outlook.com, the address zero-padded),
# tenants from the rest (mail-db5eur01on0044, mail-eopbgr10051,
# mail-he1eur01on0047 ... .outbound.protection.outlook.com, postgrey #49).
EOP_REGIONS = ("db5eur01", "he1eur01", "vi1eur05", "am6eur05", "eur02", "eur03",
               "dm6nam11", "bn8nam12", "co1nam11", "nam10", "nam12", "sy4aus01",
               "sg2apc01", "pr0p264", "fra01", "ve1eur03")


def outlook_name(addr) -> str:
    if addr.version == 6:
        low = int(addr) & 0xffff
        return "mail-%son2%04d.outbound.protection.outlook.com" % (
            _pick(EOP_REGIONS, "o6", int(addr) >> 64), low % 10000)
    a, b, c, d = addr.packed
    if a == 40 and b in (92, 93):
        return "mail-oln%03d%03d%03d%03d.outbound.protection.outlook.com" % (a, b, c, d)
    if a == 40 and b == 107:
        return "mail-eopbgr%d%03d.outbound.protection.outlook.com" % (c, d)
    if a == 52 and b == 103:
        return "mail-%solkn%d.outbound.protection.outlook.com" % (
            _pick(EOP_REGIONS, "ok", c), 2000 + d)
    return "mail-%son%04d.outbound.protection.outlook.com" % (
        _pick(EOP_REGIONS, "o4", b, c), (c * 256 + d) % 10000)


M365_CONSUMER = _nets([("40.92.0.0/15", 4), ("52.103.0.0/17", 1)])
M365_TENANT = _nets([("40.107.0.0/16", 2), ("52.100.0.0/15", 4), ("52.102.0.0/16", 1),
                     ("104.47.0.0/17", 1)])
M365 = Pool("Microsoft 365", [("40.107.0.0/16", 1)], outlook_name, p_same=0.1,
            v6=[("2a01:111:f400::/48", 1), ("2a01:111:f403::/49", 1)],
            source="spf.protection.outlook.com")

# Amazon SES: amazonses.com's SPF: ip4:54.240.0.0/18 ip4:23.251.224.0/19
# ip4:69.169.224.0/20 ip4:199.255.192.0/22 ip4:199.127.232.0/22 ... . Hosts
# a<3rd>-<4th>.smtp-out[.<region>].amazonses.com (a10-219.smtp-out.amazonses.com
# is 54.240.10.219, postgrey #37; a4-10.smtp-out.eu-west-1.amazonses.com is
# 54.240.4.10, postgrey #79). Which region uses which block is illustrative.
SES_REGIONS = {
    "us-east-1": _nets([("54.240.8.0/21", 3), ("23.251.224.0/21", 1), ("69.169.224.0/21", 1)]),
    "us-west-2": _nets([("54.240.24.0/21", 2), ("23.251.232.0/21", 1)]),
    "eu-west-1": _nets([("54.240.0.0/21", 2), ("23.251.240.0/21", 1)]),
}


def ses_name(addr, region: str = "us-east-1") -> str:
    a, b, c, d = addr.packed
    zone = "" if region == "us-east-1" else region + "."
    prefix = "a" if a == 54 else "e"
    return "%s%d-%d.smtp-out.%samazonses.com" % (prefix, c, d, zone)


SES = Pool("Amazon SES", [("54.240.0.0/18", 1)], ses_name, p_same=0.6,
           source="amazonses.com SPF (ip4:54.240.0.0/18, 23.251.224.0/19, 69.169.224.0/20)")

# Mimecast: eu._netblocks.mimecast.com and us._netblocks.mimecast.com (a
# representative part); reverse names eu-smtp-delivery-151.mimecast.com style.
MIMECAST_REGIONS = {
    "eu": _nets([("195.130.217.0/24", 1), ("91.220.42.0/24", 1), ("146.101.78.0/24", 1),
                 ("207.82.80.0/24", 1), ("185.58.84.0/22", 2)]),
    "us": _nets([("205.139.110.0/24", 1), ("205.139.111.0/24", 1), ("216.205.24.0/24", 1),
                 ("207.211.30.0/24", 1), ("170.10.128.0/22", 2)]),
}


def mimecast_name(addr, region: str = "eu") -> str:
    a, b, c, d = addr.packed
    if (a, b) in ((185, 58), (205, 139)):
        return "%s-smtp-delivery-%d.mimecast.com" % (region, d)
    return "%s-smtp-%d.mimecast.com" % (region, (c * 256 + d) % 1000 + 1000)


MIMECAST = Pool("Mimecast", [("185.58.84.0/22", 1)], mimecast_name, p_same=0.3,
                source="eu._netblocks.mimecast.com, us._netblocks.mimecast.com")

# Mailchimp: servers.mcsv.net: ip4:205.201.128.0/20 ip4:198.2.128.0/18
# ip4:148.105.8.0/21 (postgrey's whitelist_clients lists the first two and
# 148.105.0.0/16, 2018-09-23). Hosts mail<N>.<site><M>.mcsv.net and, in the
# older 205.201 block, mail<N>.atl<M>.rsgsv.net.
MC_SITES = ("atl", "sea", "suw", "wdc")


def mailchimp_name(addr) -> str:
    a, b, c, d = addr.packed
    if a == 205:
        return "mail%d.atl%d.rsgsv.net" % (d, c - 127)
    return "mail%d.%s%d.mcsv.net" % (d, _pick(MC_SITES, "mc", c), c % 64 + 1)


MAILCHIMP = Pool("Mailchimp", [("205.201.128.0/20", 1), ("198.2.128.0/18", 3),
                                ("148.105.8.0/21", 1)], mailchimp_name, p_same=0.3,
                 source="servers.mcsv.net SPF; postgrey whitelist_clients 2018-09-23")

# SendGrid: sendgrid.net SPF: ip4:167.89.0.0/17 ip4:149.72.0.0/16
# ip4:168.245.0.0/17 ip4:198.37.144.0/20 ip4:192.254.112.0/20 ip4:50.31.32.0/19
# ... . Shared IPs carry names of eight random letters under
# outbound-mail.sendgrid.net; dedicated IPs of a customer carry the customer's
# white-label name (o11.sgmail.github.com is 167.89.101.202, postgrey #41).


def sendgrid_name(addr) -> str:
    h = stable_int("sg", str(addr))
    letters = "".join(chr(97 + (h >> (5 * i)) % 26) for i in range(8))
    return "%s.outbound-mail.sendgrid.net" % letters


SENDGRID = Pool("SendGrid", [("167.89.0.0/17", 3), ("149.72.0.0/16", 2), ("168.245.0.0/17", 1),
                             ("198.37.144.0/20", 1), ("192.254.112.0/20", 1), ("50.31.32.0/19", 1)],
                sendgrid_name, p_same=0.3, source="sendgrid.net SPF")


# --------------------------------------------------------------------------
# Access ISPs (where the bots are): 100.64.0.0/10 split in six, each with its
# naming style; verified names unless the ISP publishes none.

def _dashed(a) -> str:
    return "-".join(str(x) for x in a.packed)


ISPS = (
    # (domain, network, namer, weight)
    ("dsl1.example", "100.64.0.0/13", lambda a: "%s.dyn.dsl1.example" % _dashed(a), 3),
    ("cable2.example", "100.72.0.0/13", lambda a: "c-%s.hsd1.cable2.example" % _dashed(a), 3),
    ("t-ip3.example", "100.80.0.0/13",
     lambda a: "p%08x.dip0.t-ip3.example" % int(a), 2),
    ("fiber4.example", "100.88.0.0/13",
     lambda a: "%s.fiber4.example" % ".".join(str(x) for x in reversed(a.packed)), 2),
    # opaque names: neither the address's digits nor a dyn/pool-style label
    ("isp5.example", "100.96.0.0/13",
     lambda a: "host-%07x.isp5.example" % (stable_int("p5", str(a)) % (1 << 28)), 1),
    ("mobile6.example", "100.104.0.0/13", None, 3),   # no reverse names
)


class Isp:
    def __init__(self, domain: str, net: str, namer) -> None:
        self.domain = domain
        self.net = ipaddress.ip_network(net)
        self.namer = namer

    def host(self, rng: random.Random) -> Host:
        addr = _host_in(self.net, rng)
        name = self.namer(addr) if self.namer else "unknown"
        helo = name if self.namer and rng.random() < 0.3 else \
            rng.choice(("localhost", "user", "[%s]" % addr, "mail.%s.example" % rng.choice(WORDS)))
        return Host(str(addr), name, name, helo)


ISP_LIST = [(Isp(d, n, f), w) for d, n, f, w in ISPS]


# --------------------------------------------------------------------------
# Retry schedules. next_attempt(t0, t, k, ms, hs, rng) returns when the
# sender tries again after its k-th attempt (at t) was deferred, or None
# when it never tries again; attempts later than t0 + giveup are not made.

class Schedule:
    name = "?"
    giveup = 5 * DAY
    source = ""

    def host_state(self, rng: random.Random) -> dict:
        return {}

    def next_attempt(self, t0: int, t: int, k: int, ms: dict, hs: dict,
                     rng: random.Random) -> int | None:
        raise NotImplementedError


def _next_run(x: float, phase: int, period: int) -> int:
    """The first queue run at or after x (runs at phase + n * period)."""
    n = math.ceil((x - phase) / period)
    return int(phase + n * period)


class PostfixSchedule(Schedule):
    """qmgr(8): a deferred message's next try is now + its age, clamped to
    [minimal_backoff_time, maximal_backoff_time]; the deferred queue is
    scanned every queue_run_delay. Postfix >= 2.4 defaults 300s/300s/4000s,
    maximal_queue_lifetime 5d (postconf(5))."""

    name = "Postfix"

    def __init__(self, queue_run_delay=300, minimal=300, maximal=4000, lifetime=5 * DAY):
        self.q, self.min, self.max, self.giveup = queue_run_delay, minimal, maximal, lifetime
        self.source = ("postconf(5): queue_run_delay=%ds, minimal_backoff_time=%ds, "
                       "maximal_backoff_time=%ds, maximal_queue_lifetime=%dd"
                       % (self.q, self.min, self.max, lifetime // DAY))

    def host_state(self, rng):
        return {"phase": rng.randrange(self.q)}

    def next_attempt(self, t0, t, k, ms, hs, rng):
        backoff = min(self.max, max(self.min, t - t0))
        return _next_run(t + backoff, hs["phase"], self.q) + rng.randint(0, 2)


class EximSchedule(Schedule):
    """Exim's default retry rule "* * F,2h,15m; G,16h,1h,1.5; F,4d,6h" (spec
    chapter 32, Retry configuration); the try happens at the first queue run
    after the retry time, queue runners every 30 min (Debian's
    /etc/default/exim4 QUEUEINTERVAL='30m')."""

    name = "Exim"
    giveup = 4 * DAY

    def __init__(self, queue_interval=1800):
        self.q = queue_interval
        self.source = ("exim default retry rule F,2h,15m; G,16h,1h,1.5; F,4d,6h; "
                       "queue runner every %d min" % (queue_interval // 60))

    def host_state(self, rng):
        return {"phase": rng.randrange(self.q)}

    def next_attempt(self, t0, t, k, ms, hs, rng):
        elapsed = t - t0
        if elapsed < 2 * 3600:
            retry = t + 15 * 60
        elif elapsed < 16 * 3600:
            interval = ms.get("g", 3600 / 1.5) * 1.5
            ms["g"] = interval
            retry = t + interval
        else:
            retry = t + 6 * 3600
        return _next_run(retry, hs["phase"], self.q) + rng.randint(0, 2)


class SendmailSchedule(Schedule):
    """sendmail -q15m or -q30m (op.me, "Queue interval"): every queue run
    tries every queued message (MinQueueAge 0); Timeout.queuereturn 5d."""

    name = "Sendmail"
    giveup = 5 * DAY
    source = "sendmail -q15m / -q30m queue runs, Timeout.queuereturn=5d"

    def host_state(self, rng):
        period = rng.choice((900, 1800))
        return {"period": period, "phase": rng.randrange(period)}

    def next_attempt(self, t0, t, k, ms, hs, rng):
        return _next_run(t + 1, hs["phase"], hs["period"]) + rng.randint(0, 2)


class ExchangeSchedule(Schedule):
    """Exchange Server transport: TransientFailureRetryCount 6 at
    TransientFailureRetryInterval 5 min, then MessageRetryInterval 15 min;
    MessageExpirationTimeout 2 d (Set-TransportService defaults)."""

    name = "Exchange"
    giveup = 2 * DAY
    source = ("TransientFailureRetryCount=6 x TransientFailureRetryInterval=5min, then "
              "MessageRetryInterval=15min, MessageExpirationTimeout=2d")

    def next_attempt(self, t0, t, k, ms, hs, rng):
        return t + (300 if k <= 6 else 900) + rng.randint(0, 5)


class BackoffSchedule(Schedule):
    """Provider queues: `flat` first intervals drawn from [lo, hi], then each
    interval `factor` times the last (+-15%), at most `cap`."""

    def __init__(self, name, lo, hi, factor, cap, giveup, source, flat=1):
        self.name, self.lo, self.hi, self.factor, self.cap = name, lo, hi, factor, cap
        self.giveup, self.source, self.flat = giveup, source, flat

    def next_attempt(self, t0, t, k, ms, hs, rng):
        if k <= self.flat:
            interval = rng.uniform(self.lo, self.hi)
        else:
            interval = min(self.cap, ms["iv"] * self.factor * rng.uniform(0.85, 1.15))
        ms["iv"] = interval
        return int(t + interval)


class NoRetry(Schedule):
    name = "one-shot"
    giveup = 0
    source = "never retries"

    def next_attempt(self, t0, t, k, ms, hs, rng):
        return None


class EarlyRetry(Schedule):
    name = "early-retry"
    giveup = DAY
    source = "1-3 retries, 5-50 s apart, from the same address"

    def next_attempt(self, t0, t, k, ms, hs, rng):
        if "n" not in ms:
            ms["n"] = rng.randint(1, 3)
        if k > ms["n"]:
            return None
        return t + rng.randint(5, 50)


class RotatingRetry(Schedule):
    name = "rotating"
    giveup = DAY
    source = "2-8 retries, 5-30 min apart, each from another host of one access ISP"

    def next_attempt(self, t0, t, k, ms, hs, rng):
        if "n" not in ms:
            ms["n"] = rng.randint(2, 8)
        if k > ms["n"]:
            return None
        return t + rng.randint(300, 1800)


PROVIDER_SCHEDULES = {
    "Gmail": BackoffSchedule(
        "Gmail", 300, 600, 2.0, 3600, 2 * DAY,
        "first retry 5-10 min (a Gmail retry 6m48s later from the next address, "
        "tradebooster.com log), then doubling to 1 h (assumed); Gmail's delay DSN: "
        "'Gmail will retry for 47 more hours' -> 48 h"),
    "Microsoft 365": BackoffSchedule(
        "Microsoft 365", 300, 900, 1.5, 3600, DAY,
        "Exchange Online: deferred messages stay in the queue 1 day; the first few "
        "retries within 15 min, later ones up to 60 min apart (Microsoft Learn, quoted "
        "by it-bibouroku.hateblo.jp; cloudsteady.jp: about every 15 min for 24 h)",
        flat=3),
    "Amazon SES": BackoffSchedule(
        "Amazon SES", 240, 420, 1.5, 1800, 14 * 3600,
        "retry 5m38s later from the next host (postgrey #37), growing (assumed) to "
        "30 min; gives up after 14 h (SESv2 MaxDeliverySeconds upper bound 50400 s)"),
    "Mimecast": BackoffSchedule(
        "Mimecast", 300, 900, 1.5, 3600, 5 * DAY,
        "no published schedule found: assumed 5-15 min, growing to 1 h, 5 d "
        "(RFC 5321 4.5.4.1 give-up of 4-5 days)"),
    "Mailchimp": BackoffSchedule(
        "Mailchimp", 900, 1200, 1.5, 7200, 2 * DAY,
        "'only retry after 15 minutes' (postgrey PR #64), 'very conservative "
        "intervals' (docker-mailserver #2040); growth to 2 h and 48 h give-up assumed"),
    "SendGrid": BackoffSchedule(
        "SendGrid", 600, 3600, 1.0, 3600, 3 * DAY,
        "intervals of 10-54 min seen from SendGrid hosts (postgrey #41); 'SendGrid "
        "continues to retry resending 400 messages for up to 72 hours' (SMTP errors "
        "and troubleshooting)", flat=10**6),
}

MTA_SCHEDULES = {
    "Postfix": PostfixSchedule(),
    "Exim": EximSchedule(),
    "Sendmail": SendmailSchedule(),
    "Exchange": ExchangeSchedule(),
}

SPAM_SCHEDULES = {
    "one-shot spam": NoRetry(),
    "early-retry spam": EarlyRetry(),
    "rotating spam": RotatingRetry(),
}


# --------------------------------------------------------------------------
# Messages

@dataclass(slots=True)
class Message:
    id: int
    cls: str
    kind: str                  # provider, mta or spam
    t0: int
    sender: str
    rcpts: list
    schedule: Schedule
    hostrule: object           # callable(k, prev, rng) -> Host
    hs: dict = field(default_factory=dict)   # the sending host's state (queue phase)
    tls: bool = True
    size: int = 20000


@dataclass(slots=True)
class Trace:
    seed: int
    quick: bool
    start: int
    arrival_span: int
    horizon: int
    messages: list
    classes: list              # (name, kind, schedule source, pool source)
    users: list


def _arrival(rng: random.Random, span: int, diurnal: bool) -> int:
    """A first-attempt time in [0, span): business hours weigh more (UTC)."""
    while True:
        t = rng.randrange(span)
        if not diurnal:
            return t
        hour = (t % DAY) // 3600
        weekend = (t // DAY) % 7 >= 5
        w = 1.0 if 8 <= hour < 18 else (0.4 if 6 <= hour < 22 else 0.15)
        if weekend:
            w *= 0.4
        if rng.random() < w:
            return t


def _zipf_pick(rng: random.Random, n: int, s: float = 1.1) -> int:
    """An index in [0, n) with P(i) ~ 1/(i+1)^s."""
    weights = _ZIPF.get((n, s))
    if weights is None:
        acc, weights = 0.0, []
        for i in range(n):
            acc += 1.0 / (i + 1) ** s
            weights.append(acc)
        _ZIPF[(n, s)] = weights
    x = rng.random() * weights[-1]
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if weights[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


_ZIPF: dict = {}


def _rcpt_count(rng: random.Random) -> int:
    return _weighted(rng, [(1, 55), (2, 20), (3, 12), (4, 8), (5, 5)])


class _Senders:
    """A class's sender population: each sender has a few usual
    recipients; senders are drawn with a Zipf skew (some write often)."""

    def __init__(self, rng: random.Random, users: list, n: int, make) -> None:
        self.items = []
        for i in range(n):
            usual = [users[_zipf_pick(rng, len(users), 0.8)] for _ in range(rng.randint(1, 4))]
            self.items.append((make(rng, i), usual))

    def draw(self, rng: random.Random):
        return self.items[_zipf_pick(rng, len(self.items))]


def _recipients(rng: random.Random, users: list, usual: list, n: int) -> list:
    out: list = []
    while len(out) < n:
        pool = usual if rng.random() < 0.6 else users
        r = pool[rng.randrange(len(pool))]
        if r not in out:
            out.append(r)
    rng.shuffle(out)
    return out


def _person(rng: random.Random) -> str:
    return "%s.%s" % (rng.choice(FIRST), rng.choice(LAST))


def _org(rng: random.Random) -> str:
    return "%s%s.example" % (rng.choice(WORDS), rng.choice(WORDS))


FULL_COUNTS = {"Gmail": 700, "Microsoft 365": 600, "Amazon SES": 400, "Mimecast": 300,
               "Mailchimp": 400, "SendGrid": 400, "Postfix": 400, "Exim": 300,
               "Sendmail": 150, "Exchange": 200, "one-shot spam": 3000,
               "early-retry spam": 1000, "rotating spam": 1000}
QUICK_FACTOR = 1 / 25
QUICK_SPAN = 6 * 3600


def build(seed: int = 1, quick: bool = False) -> Trace:
    span = QUICK_SPAN if quick else WEEK
    rng = rng_for(seed, "population")
    users = ["%s@%s" % (_person(rng), LOCAL_DOMAINS[i % 2 if i % 5 else 1]) for i in range(300)]
    users = list(dict.fromkeys(users))
    messages: list = []
    classes: list = []

    def count(cls: str) -> int:
        return max(3, round(FULL_COUNTS[cls] * (QUICK_FACTOR if quick else 1)))

    def add(cls, kind, t0, sender, rcpts, schedule, hostrule, hs=None, tls=True):
        messages.append(Message(len(messages), cls, kind, t0, sender, rcpts, schedule,
                                hostrule, hs or {}, tls, rng.randrange(2000, 400000)))

    # ---- provider pools
    # Gmail: consumer gmail.com and Google Workspace domains; 25% of messages
    # over IPv6 (the receiving MX has an AAAA record).
    cls = "Gmail"
    senders = _Senders(rng, users, max(5, count(cls) * 3 // 5), lambda r, i: (
        "%s%d@gmail.com" % (_person(r), r.randint(1, 99)) if r.random() < 0.6
        else "%s@%s" % (r.choice(FIRST), _org(r))))
    for _ in range(count(cls)):
        sender, usual = senders.draw(rng)
        v6 = rng.random() < 0.25
        add(cls, "provider", _arrival(rng, span, True), sender,
            _recipients(rng, users, usual, _rcpt_count(rng)), PROVIDER_SCHEDULES[cls],
            _PoolRule(GMAIL, v6))

    cls = "Microsoft 365"
    senders = _Senders(rng, users, max(5, count(cls) * 3 // 5), lambda r, i: (
        "%s@%s" % (_person(r), r.choice(("outlook.com", "hotmail.com"))) if r.random() < 0.25
        else "%s@%s" % (_person(r), _org(r))))
    for _ in range(count(cls)):
        sender, usual = senders.draw(rng)
        consumer = sender.endswith(("@outlook.com", "@hotmail.com"))
        v6 = not consumer and rng.random() < 0.25
        add(cls, "provider", _arrival(rng, span, True), sender,
            _recipients(rng, users, usual, _rcpt_count(rng)), PROVIDER_SCHEDULES[cls],
            _PoolRule(M365, v6, None if v6 else (M365_CONSUMER if consumer else M365_TENANT)))

    # Amazon SES: one envelope sender per message (<id>-000000@amazonses.com or
    # the tenant's custom MAIL FROM, postgrey #37, #48), 1-2 recipients.
    cls = "Amazon SES"
    tenants = [(_org(rng), rng.choice(list(SES_REGIONS))) for _ in range(max(3, count(cls) // 10))]
    for _ in range(count(cls)):
        org, region = tenants[_zipf_pick(rng, len(tenants))]
        mid = "%016x-%08x-%04x-%04x-%04x-%012x-000000" % tuple(
            rng.getrandbits(b) for b in (64, 32, 16, 16, 16, 48))
        domain = "amazonses.com" if rng.random() < 0.6 else "bounce." + org
        n = 1 if rng.random() < 0.8 else 2
        add(cls, "provider", _arrival(rng, span, False), "%s@%s" % (mid, domain),
            _recipients(rng, users, users, n), PROVIDER_SCHEDULES[cls],
            _PoolRule(SES, False, SES_REGIONS[region], lambda a, z=region: ses_name(a, z)))

    # Mimecast: customers' own mail relayed by Mimecast's gateways.
    cls = "Mimecast"
    senders = _Senders(rng, users, max(5, count(cls) * 3 // 5), lambda r, i: (
        "%s@%s" % (_person(r), _org(r)), r.choice(list(MIMECAST_REGIONS))))
    for _ in range(count(cls)):
        (sender, region), usual = senders.draw(rng)
        add(cls, "provider", _arrival(rng, span, True), sender,
            _recipients(rng, users, usual, _rcpt_count(rng)), PROVIDER_SCHEDULES[cls],
            _PoolRule(MIMECAST, False, MIMECAST_REGIONS[region],
                      lambda a, z=region: mimecast_name(a, z)))

    # Mailchimp: campaigns; one message per recipient with its own bounce
    # address (postgrey PR #64), 1-30 recipients of a campaign within 15 min.
    cls = "Mailchimp"
    n_left = count(cls)
    while n_left > 0:
        t_campaign = _arrival(rng, span, True)
        account = rng.randrange(10**7, 10**8)
        shard = rng.randint(1, 21)
        for _ in range(min(n_left, rng.randint(1, 30))):
            n_left -= 1
            sender = "bounce-mc.us%d_%d.%d-%010x@mail%d.%s%d.mcsv.net" % (
                shard, account, rng.randrange(10**6, 10**7), rng.getrandbits(40),
                rng.randint(1, 250), rng.choice(MC_SITES), rng.randint(1, 200))
            add(cls, "provider", min(span - 1, t_campaign + rng.randrange(900)), sender,
                [users[_zipf_pick(rng, len(users), 0.5)]], PROVIDER_SCHEDULES[cls],
                _PoolRule(MAILCHIMP, False))

    # SendGrid: one message per recipient (VERP: bounces+<uid>-<hash>-<rcpt>@em.<brand>);
    # 60% of customers on shared IPs, 40% on 2-4 dedicated white-labelled ones.
    cls = "SendGrid"
    customers = []
    for i in range(max(3, count(cls) // 10)):
        org = _org(rng)
        dedicated = None
        if rng.random() < 0.4:
            dedicated = []
            for j in range(rng.randint(2, 4)):
                addr = _host_in(_weighted(rng, SENDGRID.v4), rng)
                name = "o%d.em.%s" % (j + 1, org)
                dedicated.append(Host(str(addr), name, name, name))
        customers.append((org, rng.randrange(10**6, 10**8), dedicated))
    for _ in range(count(cls)):
        org, uid, dedicated = customers[_zipf_pick(rng, len(customers))]
        rcpt = users[_zipf_pick(rng, len(users), 0.5)]
        sender = "bounces+%d-%04x-%s@em1234.%s" % (uid, rng.getrandbits(16),
                                                   rcpt.replace("@", "="), org)
        rule = _FixedSetRule(dedicated) if dedicated else _PoolRule(SENDGRID, False)
        add(cls, "provider", _arrival(rng, span, False), sender, [rcpt],
            PROVIDER_SCHEDULES[cls], rule)

    # ---- single-host MTAs: one address per host; 5% no verified name, 15%
    # a hosting provider's generic name; 10% IPv6.
    mta_nets = {"Postfix": "198.18.0.0/16", "Exim": "198.19.0.0/17",
                "Sendmail": "198.19.128.0/18", "Exchange": "198.19.192.0/18"}
    for cls, schedule in MTA_SCHEDULES.items():
        net = ipaddress.ip_network(mta_nets[cls])
        hosts = []
        for i in range(max(3, count(cls) // 3)):
            org = _org(rng)
            if rng.random() < 0.1:
                addr = ipaddress.ip_network("2001:db8::/32").network_address + \
                    (rng.getrandbits(32) << 64) + rng.randrange(1, 1 << 16)
            else:
                addr = _host_in(net, rng)
            roll = rng.random()
            if roll < 0.05:
                name = "unknown"
                reverse = rng.choice(("unknown", "host.%s" % org))
                helo = "mail.%s" % org
            elif roll < 0.20 and addr.version == 4:
                name = rng.choice((
                    "static-%s.hosting.example" % _dashed(addr),
                    "vps%d.cloudhost.example" % rng.randrange(10000, 99999),
                    "server%d.webhoster.example" % rng.randrange(1, 999)))
                reverse, helo = name, name
            else:
                name = "%s.%s" % (rng.choice(("mail", "mx1", "smtp", "mta", "out")), org)
                reverse, helo = name, name
            host = Host(str(addr), name, reverse, helo)
            hosts.append((host, org, schedule.host_state(rng_for(seed, "hs", cls, i))))
        senders = []
        for i in range(max(5, count(cls) // 2)):
            host, org, hs = hosts[_zipf_pick(rng, len(hosts), 0.9)]
            usual = [users[_zipf_pick(rng, len(users), 0.8)] for _ in range(rng.randint(1, 4))]
            local = rng.choice((_person(rng), rng.choice(("info", "office", "sales", "support"))))
            senders.append(("%s@%s" % (local, org), host, hs, usual))
        for _ in range(count(cls)):
            sender, host, hs, usual = senders[_zipf_pick(rng, len(senders))]
            add(cls, "mta", _arrival(rng, span, True), sender,
                _recipients(rng, users, usual, _rcpt_count(rng)), schedule,
                _FixedRule(host), hs=hs, tls=rng.random() < 0.8)

    # ---- spam: bots behind access ISPs; forged senders, 1-5 recipients,
    # some of them guessed.
    guessed = ["%s@%s" % (n, d) for d in LOCAL_DOMAINS for n in
               ("info", "sales", "admin", "office", "contact", "jobs")]
    for cls, schedule in SPAM_SCHEDULES.items():
        for _ in range(count(cls)):
            isp = _weighted(rng, ISP_LIST)
            bot = isp.host(rng)
            forged = rng.random()
            if forged < 0.2:
                sender = "%s%d@gmail.com" % (_person(rng), rng.randint(1, 999))
            elif forged < 0.3:
                sender = "%s@%s" % (_person(rng), rng.choice(("outlook.com", "yahoo.example")))
            else:
                sender = "%s@%s" % (rng.choice(FIRST + WORDS), _org(rng))
            n = _rcpt_count(rng)
            rcpts = _recipients(rng, users + guessed, guessed, n)
            rule = _RotatingRule(isp, bot) if cls == "rotating spam" else _FixedRule(bot)
            add(cls, "spam", _arrival(rng, span, False), sender, rcpts, schedule, rule,
                tls=False)

    messages.sort(key=lambda m: (m.t0, m.id))
    for i, m in enumerate(messages):
        m.id = i
    for name, sched in list(PROVIDER_SCHEDULES.items()):
        pool = {"Gmail": GMAIL, "Microsoft 365": M365, "Amazon SES": SES,
                "Mimecast": MIMECAST, "Mailchimp": MAILCHIMP, "SendGrid": SENDGRID}[name]
        classes.append((name, "provider", sched.source, pool.source, pool.p_same))
    for name, sched in MTA_SCHEDULES.items():
        classes.append((name, "mta", sched.source, "one host", None))
    for name, sched in SPAM_SCHEDULES.items():
        classes.append((name, "spam", sched.source, "access ISPs in 100.64.0.0/10", None))
    horizon = span + (6 * 3600 if quick else 5 * DAY + DAY)
    return Trace(seed, quick, START, span, horizon, messages, classes, users)


class _PoolRule:
    """Attempt k's host: from the pool (or a subset of its networks)."""

    def __init__(self, pool: Pool, ipv6: bool, subset=None, namer=None) -> None:
        self.pool, self.ipv6, self.subset, self.namer = pool, ipv6, subset, namer

    def __call__(self, k: int, prev: Host | None, rng: random.Random) -> Host:
        host = self.pool.pick(rng, prev, self.ipv6, self.subset)
        if self.namer is not None:
            name = self.namer(ipaddress.ip_address(host.address))
            host = Host(host.address, name, name, name)
        return host


class _FixedSetRule:
    """A customer's dedicated addresses: any of them, per attempt."""

    def __init__(self, hosts: list) -> None:
        self.hosts = hosts

    def __call__(self, k, prev, rng):
        return self.hosts[rng.randrange(len(self.hosts))]


class _FixedRule:
    def __init__(self, host: Host) -> None:
        self.host = host

    def __call__(self, k, prev, rng):
        return self.host


class _RotatingRule:
    """First attempt from the bot, each retry from another host of its ISP."""

    def __init__(self, isp: Isp, first: Host) -> None:
        self.isp, self.first = isp, first

    def __call__(self, k, prev, rng):
        return self.first if k == 0 else self.isp.host(rng)
