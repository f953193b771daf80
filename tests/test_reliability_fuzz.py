"""Fuzzing the request parser and the whole request loop.

- hypothesis on Reader.read(): any bytes give requests within the caps
  (attribute count, line length) or ProtocolError, nothing else;
- hypothesis on serve() with a real store: hostile request streams get
  well-formed UTF-8 replies, or one warning and a disconnect;
- the real program as a process: no traceback, zero bytes on stderr;
- memory stays bounded: endless lines, endless attributes, many requests;
- a coverage-guided run with atheris (tests/reliability/atheris_fuzz.py)
  where atheris is installed.
"""

import dataclasses
import io
import os
import pathlib
import random
import shutil
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from greylist.config import Config, ConfigError, parse_setting
from greylist.log import Log
from greylist.protocols.policy import MAX_ATTRIBUTES, MAX_LINE_BYTES, READ_SIZE, ProtocolError
from greylist.transports.spawn import Reader, serve
from greylist.stores.lmdb import LmdbStore
from tests.conftest import policy_service
from tests.reliability import (FULL, ROOT, SEED, SIZES, command, environment, home,
                               read_log, record_figures, request, settings as write_settings)
from tests.reliability.hostile import check_answer, stream

HYPOTHESIS = dict(derandomize=not FULL, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])


def scratch() -> pathlib.Path:
    """A fresh directory on a memory file system where there is one."""
    import tempfile
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else None
    path = pathlib.Path(tempfile.mkdtemp(prefix="greylist-fuzz-", dir=base))
    os.chmod(path, 0o755)
    return path


LINES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"request=smtpd_access_policy", b"protocol_state=RCPT",
                     b"client_address=192.0.2.1", b"recipient=a@b", b"sender=",
                     b"=x", b"x", b"a=b\0c", b"", b"x=" + b"y" * (MAX_LINE_BYTES - 2),
                     b"x=" + b"y" * (MAX_LINE_BYTES - 1)]),
    st.builds(lambda n: b"k=v\n" * n, st.integers(0, MAX_ATTRIBUTES + 2)))


@settings(max_examples=SIZES["hypothesis_parser_inputs"], **HYPOTHESIS)
@given(st.one_of(st.binary(max_size=2000),
                 st.lists(LINES, max_size=30).map(lambda ls: b"\n".join(ls))))
def test_parser_returns_bounded_requests_or_protocol_error(data):
    stream_ = io.BytesIO(data)
    reader = Reader(stream_)
    for _ in range(len(data) + 1):
        start = stream_.tell()
        try:
            attrs = reader.read()
        except ProtocolError:
            # The parser stops reading soon after the offending line: it
            # holds at most the caps and one read more.
            assert stream_.tell() - start <= ((MAX_ATTRIBUTES + 1) * (MAX_LINE_BYTES + 1)
                                              + READ_SIZE)
            return
        if attrs is None:
            assert stream_.tell() == len(data)
            return
        assert len(attrs) <= MAX_ATTRIBUTES
        for name, value in attrs.items():
            raw = (name + "=" + value).encode("utf-8", "surrogateescape")
            assert len(raw) <= MAX_LINE_BYTES and b"\n" not in raw and b"\0" not in raw
            assert value != ""
    raise AssertionError("Reader.read made no progress")


@pytest.fixture(scope="module")
def loop():
    """A real store, the shipped default settings, and one Policy per
    settings: like one process, whose lifetime serves many connections."""
    directory = scratch()
    cfg = Config()._replace(database=str(directory / "db"),
                              log=str(directory / "log"), delay_s=1)
    (directory / "log").touch()
    store = LmdbStore(cfg.database)
    yield directory, cfg, store, {}
    store.close()
    shutil.rmtree(directory, ignore_errors=True)


def run_loop(loop, data: bytes, cfg: Config | None = None) -> tuple[int, bytes, list[str]]:
    """serve() data; return (status, output, the log lines it wrote).

    The database persists between examples, so an example replayed while
    shrinking may meet its triple again: hypothesis then reports the
    failure as flaky, with the original error.
    """
    directory, default, store, policies = loop
    cfg = cfg or default
    if cfg not in policies:
        policies[cfg] = policy_service(store, cfg, Log("greylist", cfg.log, 0))
    logfile = directory / "log"
    before = logfile.stat().st_size
    out = io.BytesIO()
    status = serve(io.BytesIO(data), out, policies[cfg])
    with open(logfile, "rb") as handle:
        handle.seek(before)
        lines = handle.read().decode("utf-8").splitlines()
    return status, out.getvalue(), lines


@settings(max_examples=SIZES["hypothesis_loop_inputs"], **HYPOTHESIS)
@given(st.randoms(use_true_random=False))
def test_request_loop_answers_hostile_streams_or_disconnects(loop, rng):
    data, clean = stream(rng)
    status, out, lines = run_loop(loop, data)
    check_answer(status, out, lines, data.count(b"\n\n") if clean else None)


@settings(max_examples=SIZES["hypothesis_loop_inputs"], **HYPOTHESIS)
@given(st.binary(max_size=3000))
def test_request_loop_survives_arbitrary_bytes(loop, data):
    status, out, lines = run_loop(loop, b"request=smtpd_access_policy\n" + data)
    check_answer(status, out, lines, None)


def test_the_program_answers_hostile_streams_with_nothing_on_stderr(tmp_path):
    rng = random.Random(SEED)
    inputs = [stream(rng) for _ in range(SIZES["process_fuzz_inputs"])]
    directory = home(tmp_path / "fuzz")
    canary = pathlib.Path("/tmp/greylist-pwned")

    def one(index: int) -> tuple[int, int]:
        cf = write_settings(directory, "f%d.cf" % index, log="f%d.log" % index)
        data, clean = inputs[index]
        done = subprocess.run(command(cf), input=data, capture_output=True, timeout=60,
                              env=environment())
        assert done.stderr == b"", (index, done.stderr[-500:])
        check_answer(done.returncode, done.stdout, read_log(directory / ("f%d.log" % index)
                                                             ).splitlines(),
                     data.count(b"\n\n") if clean else None)
        return done.returncode, len(data)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(len(inputs))))
    assert not canary.exists(), "input reached a shell"
    record_figures("process-fuzz", inputs=len(inputs),
                   disconnected=sum(status == 1 for status, _ in results),
                   bytes=sum(n for _, n in results), stderr_bytes=0, tracebacks=0,
                   seconds=round(time.monotonic() - started, 1))


def status_field(pid: int, field: str) -> int:
    with open("/proc/%d/status" % pid, encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s" % field)


def feed(cf: pathlib.Path, chunks, limit_bytes: int, address_space: int | None = None
         ) -> tuple[int, int, int]:
    """Feed chunks until the process stops reading or limit_bytes were sent.

    With address_space (bytes), the process may not map more than that:
    a parser that buffered the input would fail. Returns (exit status,
    bytes accepted, VmPeak in KiB after the first request or 0).
    """
    proc = subprocess.Popen(command(cf), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment())
    sent, peak = 0, 0
    try:
        if address_space:
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (address_space, address_space))
        for chunk in chunks:
            if sent >= limit_bytes:
                break
            try:
                proc.stdin.write(chunk)
                proc.stdin.flush()
            except BrokenPipeError:
                break
            sent += len(chunk)
            if not peak and address_space is None:
                proc.stdout.readline()
                proc.stdout.readline()
                peak = status_field(proc.pid, "VmPeak")
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.wait(timeout=60)
        assert proc.stderr.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return proc.returncode, sent, peak


def endless(piece: bytes, size: int = 1 << 16):
    """Chunks of piece; bounded at 4 GiB, far past any limit that feed() sets."""
    chunk = piece * max(1, size // len(piece))
    for _ in range((1 << 32) // len(chunk)):
        yield chunk


@pytest.mark.parametrize("kind", ["endless-line", "endless-attributes"])
def test_memory_stays_bounded_on_endless_input(tmp_path, kind):
    directory = home(tmp_path / "mem")
    cf = write_settings(directory)
    ok = request("192.0.2.1", "a@example.org", "b@example.net")
    base_status, _, peak_kib = feed(cf, [ok], len(ok))
    assert base_status == 0 and peak_kib > 0
    # 32 MiB more address space than one request needs; 64 MiB offered.
    limit, headroom = 64 << 20, 32 << 20
    piece = b"a" if kind == "endless-line" else b"name=value\n"
    status, sent, _ = feed(cf, endless(piece), limit, peak_kib * 1024 + headroom)
    log = read_log(directory / "log").splitlines()
    assert status == 1 and log[-1].endswith("disconnecting without a reply"), log[-3:]
    assert "MemoryError" not in "\n".join(log)
    # It stopped reading long before the 64 MiB; the pipe buffers some.
    assert sent < 1 << 20
    record_figures("memory-" + kind, offered_bytes=limit, accepted_bytes=sent,
                   address_space_limit_kib=peak_kib + headroom // 1024)


def test_memory_does_not_grow_with_the_number_of_requests(tmp_path):
    directory = home(tmp_path / "many")
    cf = write_settings(directory)
    total = SIZES["memory_requests"]
    rng = random.Random(SEED)
    proc = subprocess.Popen(command(cf), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment())
    samples = {}
    try:
        for i in range(total):
            n = rng.randrange(200)
            state = "RCPT" if i % 2 else rng.choice(["CONNECT", "MAIL", "DATA"])
            proc.stdin.write(request("10.1.%d.1" % n, "s%d@example.org" % n,
                                     "r%d@example.net" % n, state=state,
                                     instance="%x.%d" % (i // 3, i), helo_name="h" * (i % 500)))
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line.startswith(b"action=") and proc.stdout.readline() == b"\n"
            if i + 1 in (total // 5, total):
                samples[i + 1] = status_field(proc.pid, "VmRSS")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0 and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    growth = samples[total] - samples[total // 5]
    assert growth < 4096, samples
    record_figures("memory-requests", requests=total, rss_kib=samples, growth_kib=growth)


def test_atheris_coverage_guided_run(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "rcpt").write_bytes((ROOT / "tests" / "data" / "rcpt.txt").read_bytes())
    runs = SIZES["atheris_inputs"]
    started = time.monotonic()
    store = scratch()
    try:
        script = ROOT / "tests" / "reliability" / "atheris_fuzz.py"
        done = subprocess.run([sys.executable, str(script), "-runs=%d" % runs,
                               "-seed=%d" % SEED, "-max_len=20000", "-rss_limit_mb=1024",
                               "-timeout=20", "-artifact_prefix=%s/" % tmp_path, str(corpus)],
                              capture_output=True, text=True, timeout=3600,
                              env=environment(GREYLIST_ATHERIS_DIR=str(store)))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done %d runs" % runs in done.stderr, done.stderr[-1000:]
    record_figures("atheris", inputs=runs, seconds=round(time.monotonic() - started, 1),
                   corpus_files=len(list(corpus.iterdir())), crashes=0)


def domain_defer_text() -> str:
    text = "Greylisted for $seconds_left s by $recipient_domain"
    try:
        return parse_setting("greylist_defer_text", text)[1]
    except ConfigError:
        pytest.skip("greylist_defer_text has no $recipient_domain placeholder")


RECIPIENT_BYTES = st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b
                                                               and b"\0" not in b)


@settings(max_examples=SIZES["hypothesis_loop_inputs"] // 10, **HYPOTHESIS)
@given(RECIPIENT_BYTES)
def test_defer_text_with_recipient_domain_never_replies_invalid_utf8(loop, domain):
    # Found by atheris and hypothesis: $recipient_domain copies request
    # bytes into the reply. smtpd (smtputf8_enable = yes) answers a reply
    # that is not UTF-8 with smtpd_policy_service_default_action, 451.
    cfg = loop[1]._replace(defer_text=domain_defer_text())
    data = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
            b"sender=a%d@example.org\nrecipient=b@" % random.getrandbits(64) + domain + b"\n\n")
    status, out, lines = run_loop(loop, data, cfg)
    check_answer(status, out, lines, 1)


def test_defer_text_with_recipient_domain_and_a_latin1_domain_is_utf8(loop):
    cfg = loop[1]._replace(defer_text=domain_defer_text())
    data = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
            b"sender=a@example.org\nrecipient=b@m\xfcller.example\n\n")
    status, out, lines = run_loop(loop, data, cfg)
    assert status == 0 and out.startswith(b"action=DEFER_IF_PERMIT")
    out.decode("utf-8")
