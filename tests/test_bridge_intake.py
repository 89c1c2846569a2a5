"""The bridge's reading of a job message before the server sees it (pure: no broker)."""
from __future__ import annotations

import json

import pytest

from pilotfish.bridge.config import BridgeConfig, from_yaml, parse_url
from pilotfish.bridge.intake import Poison, add_intake_keys, message_key, parse_body
from pilotfish.errors import ValidationError


def test_one_job_or_a_list():
    assert parse_body(b'{"name": "a"}') == [{"name": "a"}]
    assert parse_body(json.dumps([{"name": "a"}, {"name": "b"}]).encode()) == [
        {"name": "a"}, {"name": "b"}]


@pytest.mark.parametrize("body,words", [
    (b"\xff\xfe", "not JSON"),
    (b"{", "not JSON"),
    (b"NaN", "not JSON"),
    (b"[1e999]", "job #1 is a JSON float"),
    (b"5", "got a JSON int"),
    (b"[]", "empty list"),
    (b"[{}, []]", "job #2 is a JSON list"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[" + b"{}," * 100_000 + b"{}]", "a list of 100,001 jobs; at most 100,000"),
    (b" " * (16 * 2**20 + 1), "16,777,217 bytes"),
])
def test_poison_bodies_get_one_line(body, words):
    with pytest.raises(Poison) as e:
        parse_body(body)
    assert words in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_intake_keys_from_the_message_id_or_the_body():
    body = b'[{"name": "a"}, {"name": "b", "intake_key": "mine"}]'
    jobs = add_intake_keys(parse_body(body), message_key("m-1", body))
    assert [j["intake_key"] for j in jobs] == ["amqp:id:m-1:0", "mine"]
    key = message_key(None, body)
    assert key.startswith("sha:") and key == message_key("", body) != message_key(None, b"{}")
    odd = message_key("id with spaces \u00e9", body)  # not printable ASCII: its digest
    assert odd.startswith("idsha:") and len(odd) == 70
    assert len(add_intake_keys([{}] * 100_000, message_key("x" * 200, b""))[-1]
               ["intake_key"]) <= 255


def test_settings_and_urls():
    assert str(parse_url("amqp://bob@broker:5673/v%2Fh")) == "amqp://bob@broker:5673/v/h"
    assert parse_url("amqp://h").vhost == "/" and parse_url("amqp://h").user == "guest"
    with pytest.raises(ValidationError, match="carries a password"):
        parse_url("amqp://bob:pw@h/")
    with pytest.raises(ValidationError, match="amqp://"):
        parse_url("redis://h/")
    cfg = BridgeConfig(jobs_queue="jobs").check()
    assert cfg.dead_letter_queue == "jobs.dead"
    with pytest.raises(ValidationError, match="prefetch"):
        BridgeConfig(jobs_queue="q", prefetch=0).check()


def test_yaml_settings(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    f = tmp_path / "b.yaml"
    f.write_text("url: amqp://bob@h/\njobs_queue: q\nexchange: x\npassword_file: pw\n"
                 "max_body_mb: 2\n")
    cfg = from_yaml(str(f)).check()
    assert cfg.max_body_bytes == 2 * 2**20 and cfg.password_file == str(tmp_path / "pw")
    f.write_text("- a list\n")
    with pytest.raises(ValidationError, match="must be a map"):
        from_yaml(str(f))
