"""transfer/: URL checks (pure), the scheme registry, credentials and local copies."""
from __future__ import annotations

import os

import pytest

from pilotfish import dataroots
from pilotfish.errors import ValidationError
from pilotfish.transfer import (SCHEMES, Limits, TransferError, check_job_url, check_url,
                                scheme_for)
from pilotfish.transfer.credentials import Credentials

GOOD = [
    ("/data/x", "file", "", None, None, "/data/x"),
    ("file:///a/b", "file", "", None, None, "/a/b"),
    ("local:///a/b", "local", "", None, None, "/a/b"),
    ("scp://me@Host.Example:2222/~/x.dat", "scp", "host.example", 2222, "me", "/~/x.dat"),
    ("sftp://h/a%20b", "sftp", "h", None, None, "/a b"),
    ("https://h/a%20b?x=1", "https", "h", None, None, "/a b"),
    ("http://[::1]:8080/f", "http", "[::1]", 8080, None, "/f"),
    ("gsiftp://gridftp.example.org/p/f", "gsiftp", "gridftp.example.org", None, None, "/p/f"),
    ("globus://ddb59aef-6d04-11e5-ba46-22000b92c6ec/~/f", "globus",
     "ddb59aef-6d04-11e5-ba46-22000b92c6ec", None, None, "/~/f"),
]


@pytest.mark.parametrize("raw, scheme, host, port, user, path", GOOD)
def test_good_urls_parse(raw, scheme, host, port, user, path):
    u = check_url(raw)
    assert (u.scheme, u.host, u.port, u.user, u.path) == (scheme, host, port, user, path)
    assert str(u) == raw


BAD = [
    ("weird://x/y", "unknown scheme 'weird'; supported schemes: " + ", ".join(SCHEMES)),
    ("scp://u:pw@h/x", "credentials inside a URL are refused"),
    ("https://u:p%40ss@h/x", "credentials inside a URL are refused"),
    ("scp://-oProxyCommand=sh/x", "host '-oProxyCommand=sh' starts with '-'"),
    ("sftp://-oProxyCommand=touch%20x@h/x", "starts with '-'"),
    ("scp://-l@h/x", "user '-l' starts with '-'"),
    ("scp://h%20-oX/x", "is not a host name"),
    ("sftp://h/a/%2e%2e/b", "'..' part"),
    ("sftp://h/a%2F..%2Fetc", "'..' part"),
    ("http://h/%2E%2E/etc/passwd", "'..' part"),
    ("scp://h/a/../b", "'..' part"),
    ("http://h/a\nb", "NUL, line breaks"),
    ("http://h/a%00b", "NUL or a control character"),
    ("http://h/a%0ab", "NUL or a control character"),
    ("scp://h", "names no file"),
    ("scp:///x", "must name a host"),
    ("scp://h:99999/x", "not in 1..65535"),
    ("scp://h/x?cmd", "a ?query is not part"),
    ("file://otherhost/x", "names no host"),
    ("relative/x", "expected an absolute path or scheme://"),
    ("h:/x", "expected an absolute path or scheme://"),
    ("http://" + "x" * 10_000, "longer than 4096"),
    (5, "must be a non-empty URL string"),
]


@pytest.mark.parametrize("raw, words", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_urls_are_refused_in_one_line(raw, words):
    with pytest.raises(ValidationError) as info:
        check_url(raw, "input_url")
    msg = str(info.value)
    assert words in msg and "\n" not in msg and len(msg) < 400, msg


def test_the_door_keeps_local_paths_to_the_data_roots(tmp_path):
    roots = dataroots.make(tmp_path)
    assert check_job_url(f"{tmp_path}/data/a", "input_url", roots) == f"{tmp_path}/data/a"
    assert check_job_url(f"local://{tmp_path}/data/a", "input_url", roots) == \
        f"{tmp_path}/data/a"
    assert check_job_url("scp://h/in", "input_url", roots) == "scp://h/in"
    assert check_job_url(None, "input_url", roots) is None
    for bad in ("/etc/passwd", "local:///etc/passwd", "weird://h/x"):
        with pytest.raises(ValidationError):
            check_job_url(bad, "input_url", roots)


def test_scheme_for_each_name():
    names = {s: type(scheme_for(f"{s}://h.example/x" if s not in ("file", "local")
                                else f"{s}:///x")).__name__ for s in SCHEMES}
    assert names["file"] == names["local"] == "LocalScheme"
    assert names["scp"] == "ScpScheme" and names["sftp"] == "SftpScheme"
    assert names["http"] == names["https"] == "HttpScheme"
    assert names["gsiftp"] == "GridFtpScheme" and names["globus"] == "GlobusScheme"


def test_limits_are_checked():
    for bad in ({"timeout": 0}, {"stall": -1}, {"max_bytes": 0}, {"max_bytes": True}):
        with pytest.raises(ValidationError):
            Limits(**bad)


def test_credentials_by_scheme_host_then_host_then_star(tmp_path):
    f = tmp_path / "transfers.yaml"
    f.write_text("credentials:\n  h.example: {user: alice, key_file: ~/k}\n"
                 "  '*': {user: anyone}\n  'https://h.example': {token_file: /t}\n")
    c = Credentials.load(site={"h.example": {"user": "site"}}, path=str(f))
    assert c.for_url("scp://h.example/x").user == "site"  # the site profile wins
    assert c.for_url("https://h.example/x").token_file == "/t"
    assert c.for_url("scp://other/x").user == "anyone"
    assert "alice" not in repr(c) and "/k" not in repr(c.for_url("scp://h.example/x"))
    for bad in ({"h": {"user": "-oProxyCommand=x"}}, {"h": {"password": "x"}},
                {"h": {"port": 0}}):
        with pytest.raises(ValidationError):
            Credentials.from_mapping(bad)


# -- local copies behind the interface -----------------------------------------------------
@pytest.fixture
def local(tmp_path):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    roots = dataroots.make(home, resolve=True)
    return home / "data", scheme_for("/x", roots=roots)


def test_local_get_and_put_place_files_atomically(local, tmp_path):
    data, s = local
    (data / "in.bin").write_bytes(b"x" * 1000)
    dest = tmp_path / "copy.bin"
    assert s.stat(f"{data}/in.bin", Limits()) == (1000, False)
    assert s.get(f"file://{data}/in.bin", str(dest), Limits()) == 1000
    assert dest.read_bytes() == b"x" * 1000
    assert s.put(str(dest), f"local://{data}/out.bin", Limits()) == 1000
    assert (data / "out.bin").read_bytes() == b"x" * 1000
    with pytest.raises(TransferError, match="exists already"):
        s.put(str(dest), f"{data}/out.bin", Limits())
    with pytest.raises(TransferError, match="No such file"):
        s.get(f"{data}/missing", str(tmp_path / "m"), Limits())
    with pytest.raises(TransferError, match="over the"):
        s.get(f"{data}/in.bin", str(tmp_path / "capped"), Limits(max_bytes=999))
    assert not os.path.exists(tmp_path / "capped")
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]
    with pytest.raises(TransferError, match="not under a data root"):
        s.get("/etc/hostname", str(tmp_path / "h"), Limits())
