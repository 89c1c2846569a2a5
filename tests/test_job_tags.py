"""The tag filter on job_tags (schema 15): a real server; the jobs a tag finds stay right
through submit, alter of tags, rm and kill, on the seek (few jobs) and the LIKE (many)."""
from __future__ import annotations

from conftest import ServerHandle
from pilotfish.server.job_tags import SEEK_MAX

SLEEP = {"name": "sleep", "executable": "/bin/sleep", "args": ["60"]}


def _ids(c, tag):
    return sorted(j["id"] for j in c.jobs({"tag": tag}, limit=0))


def test_tag_filter_follows_submit_alter_rm_and_kill(server):
    _check(server.client())


def test_tag_filter_on_postgresql(pg_url, home):
    s = ServerHandle(home, pg_url).start()
    try:
        _check(s.client())
    finally:
        s.stop()


def _check(c):
    c.add_app(SLEEP)
    ids = c.add_jobs([{"name": f"j{i}", "application": "sleep",
                       "tags": ["r"] if i % 3 == 0 else ["s", "r2"]} for i in range(9)])
    rare = [i for k, i in enumerate(ids) if k % 3 == 0]
    assert _ids(c, "r") == rare and _ids(c, "r2") == sorted(set(ids) - set(rare))
    assert _ids(c, "nope") == []
    c.alter_jobs({"ids": [rare[0]]}, tags=["x", "r2"])
    assert _ids(c, "r") == rare[1:] and _ids(c, "x") == [rare[0]]
    assert rare[0] in _ids(c, "r2")
    c.remove_jobs({"ids": [rare[1]]})
    assert _ids(c, "r") == rare[2:]
    assert c.kill_jobs({"tag": "r"})["changed"] == rare[2:]
    assert c.counts({"tag": "r"}) == {"USER_KILLED": 1}
    b = c.counts_bounded({"tag": "r"}, limit=1000)
    assert b == {"counts": {"USER_KILLED": 1}, "more": False, "scanned": None}
    # a tag of more than SEEK_MAX jobs: the LIKE, same answers
    many = c.add_jobs([{"name": f"m{i}", "application": "sleep", "tags": ["many"]}
                       for i in range(SEEK_MAX + 1)])
    assert _ids(c, "many") == many
    assert c.counts({"tag": "many"}) == {"READY": SEEK_MAX + 1}
    newest = c.jobs({"tag": "many"}, limit=3, newest=True)
    assert [j["id"] for j in newest] == many[::-1][:3]
    # '_' is a name character, and a LIKE wildcard: on the LIKE road too, "m_x" is that tag
    # only, not "maxx"'s look-alike "mAx"
    under = c.add_jobs([{"name": f"u{i}", "application": "sleep", "tags": ["m_x"]}
                        for i in range(SEEK_MAX + 1)])
    [alike] = c.add_jobs([{"name": "alike", "application": "sleep", "tags": ["mAx"]}])
    assert _ids(c, "m_x") == under and _ids(c, "mAx") == [alike]
    assert c.counts({"tag": "m_x"}) == {"READY": SEEK_MAX + 1}
