"""Range requests on blobs (protocol.ranges), checked against a model and against nginx."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import OCIError
from protocol.ranges import ByteRange, Unsatisfiable, parse_range
from tests.support.procs import free_port, stop_process, tail, wait_for_port


def unsatisfiable(header: str, size: int) -> Unsatisfiable:
    with pytest.raises(Unsatisfiable) as err:
        parse_range(header, size)
    return err.value


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", ByteRange(0, 9)),
        ("bytes=0-0", ByteRange(0, 0)),
        ("bytes=5-", ByteRange(5, 99)),
        ("bytes=99-", ByteRange(99, 99)),
        ("bytes=90-1000", ByteRange(90, 99)),  # end past the size: clamped
        ("bytes=90-99999999999999999999999", ByteRange(90, 99)),
        ("bytes=-3", ByteRange(97, 99)),
        ("bytes=-100", ByteRange(0, 99)),
        ("bytes=-101", ByteRange(0, 99)),  # suffix longer than the blob: all of it, as a 206
        ("Bytes=1-2", ByteRange(1, 2)),  # units are case-insensitive
        ("bytes= 1 - 2 ", ByteRange(1, 2)),
        ("bytes=1-2,", ByteRange(1, 2)),
        ("bytes=,1-2", ByteRange(1, 2)),
        ("bytes=0-1,500-", ByteRange(0, 1)),  # the unsatisfiable one is dropped
        ("bytes=000-001", ByteRange(0, 1)),
        ("bytes=" + "0" * 5000 + "1-" + "0" * 5000 + "2", ByteRange(1, 2)),
    ],
)
def test_single_ranges(header: str, expected: ByteRange) -> None:
    assert parse_range(header, 100) == expected
    assert parse_range(header.encode(), 100) == expected  # as h11 hands it over


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "bytes=,",
        "items=0-1",
        "bytes 0-1",
        "bytes=a-b",
        "bytes=1",
        "bytes=5-4",  # last before first: invalid, so ignored
        "bytes=--1",
        "bytes=-",
        "bytes=+1-2",
        "bytes=1-+2",
        "bytes=1_0-2",
        "bytes=\u0661-\u0662",  # Arabic-Indic digits: str.isdigit() says yes
        "bytes=0-1;x",
        "bytes=0-1,2-3",  # two satisfiable ranges: whole body (no multipart)
        "bytes=0-1,5-4",  # one invalid part makes the header invalid
        "bytes=1-2\x00",
    ],
)
def test_invalid_or_multiple_ranges_mean_the_whole_body(header: str | None) -> None:
    assert parse_range(header, 100) is None


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=100-200", 100),
        ("bytes=99999999999999999999999-", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=-1", 0),
        ("bytes=0-0", 0),
        ("bytes=100-,200-", 100),
    ],
)
def test_unsatisfiable_ranges_are_416_with_the_size(header: str, size: int) -> None:
    err = unsatisfiable(header, size)
    assert err.size == size
    assert err.content_range() == f"bytes */{size}"
    assert isinstance(err, OCIError) and err.status == 416
    assert ("Content-Range", f"bytes */{size}") in err.headers


def test_content_range_and_length() -> None:
    r = ByteRange(10, 19)
    assert r.length == 10
    assert r.content_range(100) == "bytes 10-19/100"


@pytest.mark.parametrize(
    "hostile",
    [
        lambda n: "bytes=" + "0-1," * n,
        lambda n: "bytes=" + "0" * n + "-",
        lambda n: "bytes=-" + "9" * n,
        lambda n: "bytes=" + "," * n,
        lambda n: "bytes=" + "0" * n + "1-" + "0" * n + "2",
    ],
    ids=["many-ranges", "zeros", "nines", "commas", "padded"],
)
def test_hostile_headers_take_linear_time(hostile) -> None:
    """Ten times the input costs about ten times the time, not a hundred: a ratio of
    two runs in the same process (the best of several), not a wall-clock limit that a
    busy machine breaks."""

    def cost(header: str) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            with contextlib.suppress(Unsatisfiable):
                parse_range(header, 100)
            best = min(best, time.perf_counter() - start)
        return best

    small, large = cost(hostile(2_000)), cost(hostile(20_000))
    assert large < 30 * small + 0.0005, (small, large)


# --- a reference model: the set of requested byte positions ----------------------------

_SPEC = re.compile(r"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")


def model(header: str | None, size: int) -> ByteRange | str | None:
    """Positions requested per range, as Python sets; "416" for unsatisfiable."""
    if header is None:
        return None
    header = header.strip(" \t")
    if header[:6].lower() != "bytes=":
        return None
    wanted: list[set[int]] = []
    elements = [e for e in header[6:].split(",") if e.strip(" \t")]
    if not elements:
        return None
    for element in elements:
        m = _SPEC.fullmatch(element)
        if m is None or (m[1] == "" and m[2] == ""):
            return None
        if m[1] == "":
            n = int(m[2])
            wanted.append(set(range(size)[max(0, size - n) :]) if n else set())
        else:
            first = int(m[1])
            last = int(m[2]) if m[2] else size - 1
            if m[2] and last < first:
                return None
            wanted.append({i for i in range(size) if first <= i <= last})
    nonempty = [w for w in wanted if w]
    if not nonempty:
        return "416"
    if len(nonempty) > 1:
        return None
    return ByteRange(min(nonempty[0]), max(nonempty[0]))


NUMBER = st.one_of(st.integers(0, 25).map(str), st.just(""), st.just("007"), st.just("x"))
SPACE = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def range_headers(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from(["bytes", "Bytes", "BYTES", "items", "byte", ""]))
    specs = []
    for _ in range(draw(st.integers(0, 3))):
        first, last = draw(NUMBER), draw(NUMBER)
        dash = draw(st.sampled_from(["-", "-", "-", "", "--"]))
        specs.append(draw(SPACE) + first + draw(SPACE) + dash + draw(SPACE) + last + draw(SPACE))
    equals = draw(st.sampled_from(["=", "=", " =", ""]))
    return draw(SPACE) + unit + equals + ",".join(specs)


@given(header=range_headers(), size=st.integers(0, 20))
def test_parse_range_agrees_with_the_model(header: str, size: int) -> None:
    expected = model(header, size)
    try:
        got: ByteRange | str | None = parse_range(header, size)
    except Unsatisfiable as err:
        assert err.size == size
        got = "416"
    assert got == expected


@given(header=st.text(max_size=200), size=st.integers(0, 1 << 40))
def test_arbitrary_headers_never_crash(header: str, size: int) -> None:
    try:
        r = parse_range(header, size)
    except Unsatisfiable:
        return
    if r is not None:
        assert 0 <= r.start <= r.end < size


# --- against nginx, the reference the mirror's hit path is measured by ----------------

SIZE = 1000
# Where nginx and parse_range agree (the module docstring of protocol.ranges lists where
# they differ on purpose: invalid syntax, several satisfiable ranges, empty blobs).
NGINX_AGREES = [
    "bytes=0-9",
    "bytes=0-0",
    "bytes=990-",
    "bytes=999-",
    "bytes=-10",
    "bytes=-1000",
    "bytes=-5000",
    "bytes=500-99999",
    "bytes=1000-",
    "bytes=1000-1001",
    "bytes=5000-6000",
    "bytes=99999999999999999999-",
    "bytes=-0",
    "Bytes=1-2",
    "BYTES=1-2",
    "bytes=000-001",
    "items=0-1",
    "bytes=0-1,2000-",
    "bytes=2000-,0-1",
    "bytes=-0,0-1",
    "bytes=2000-,3000-",
]


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("nginx")
    (root / "blob").write_bytes(bytes(i % 251 for i in range(SIZE)))
    port = free_port()
    conf = root / "nginx.conf"
    # Workers drop to "nobody" when started as root, who cannot read pytest's tmp dirs.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""
{user}
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        sendfile on;
    }}
}}
"""
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
    except Exception as exc:
        raise RuntimeError(f"nginx did not start:\n{tail(Path(root) / 'error.log')}") from exc
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


def test_parse_range_agrees_with_nginx(nginx: str) -> None:
    with httpx.Client(base_url=nginx) as client:
        for header in NGINX_AGREES:
            r = client.get("/blob", headers={"Range": header})
            try:
                ours = parse_range(header, SIZE)
            except Unsatisfiable as err:
                assert r.status_code == 416, header
                assert r.headers["content-range"] == err.content_range(), header
                continue
            if ours is None:
                assert r.status_code == 200, header
                assert len(r.content) == SIZE
            else:
                assert r.status_code == 206, header
                assert r.headers["content-range"] == ours.content_range(SIZE), header
                assert r.content == bytes(i % 251 for i in range(ours.start, ours.end + 1))
