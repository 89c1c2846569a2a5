"""gsiftp:// and globus://: the systems cannot run here (no GridFTP server with GSI
credentials, no Globus account), so their exact command lines and request bodies are checked
against golden files, which were checked by hand against their documentation:

* tests/data/transfer/guc_get.argv and guc_get.pairs: ``globus-url-copy -help`` of
  globus-gass-copy-progs 10.12 (Debian bookworm) and its man page (globus-url-copy(1):
  -b, -q, -cd, -fast, -p, -stall-timeout, -c, -df, -f; "Enclose URLs with spaces in double
  quotes"); the same option set and pairs file are also run by the real globus-url-copy
  below on file:// URLs, when it is installed (it is not required: gsiftp stays golden-only);
* tests/data/transfer/globus_transfer.json: the Globus Transfer API's task submission document
  (https://docs.globus.org/api/transfer/task_submit/: DATA_TYPE "transfer", submission_id,
  source_endpoint, destination_endpoint, label, deadline, verify_checksum, encrypt_data,
  preserve_timestamp, fail_on_quota_errors, skip_source_errors, DATA of "transfer_item"
  with source_path, destination_path, recursive). The polling and cancel logic runs against a
  local stand-in of the four calls it makes (documented response shapes, not Globus itself).
"""
from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pilotfish.transfer import Limits, TransferError, check_url, scheme_for
from pilotfish.transfer.credentials import Credentials
from pilotfish.transfer.globus import deadline_for, ls_request, transfer_document
from pilotfish.transfer.gridftp import (GridFtpScheme, file_url, gsiftp_url, guc_argv,
                                        pairs_text)

GOLDEN = Path(__file__).parent / "data" / "transfer"


def test_globus_url_copy_command_line_and_pairs_file():
    argv = guc_argv("/tmp/pf/pairs", "/tmp/pf/undone", Limits())
    assert argv == (GOLDEN / "guc_get.argv").read_text().split("\n")[:-1]
    pairs = [(gsiftp_url(check_url("gsiftp://GridFTP.example.org:2811/project/run%201/in.dat")),
              file_url("/work/job.7/.in.dat.partial-0000")),
             (gsiftp_url(check_url("gsiftp://gridftp.example.org:2811/~/inputs/b.dat")),
              file_url("/work/job.7/.b.dat.partial-0000"))]
    assert pairs_text(pairs) == (GOLDEN / "guc_get.pairs").read_text()
    # nothing of a URL or a credential is on the command line: it is the same for every job
    assert not [a for a in argv if "gsiftp" in a or "x509" in a.lower()]


def test_the_real_globus_url_copy_takes_the_command_line(tmp_path):
    """Runs the installed globus-url-copy with our exact options and pairs file on file://
    URLs (no GridFTP server here): one pair copies, a missing one is named as failed alone."""
    if not shutil.which("globus-url-copy"):
        pytest.skip("globus-url-copy is not installed (optional: the gsiftp tests are golden)")
    (tmp_path / "a.bin").write_bytes(b"a" * 5000)
    s = GridFtpScheme()
    pairs = [(file_url(str(tmp_path / "a.bin")), file_url(str(tmp_path / "out dir" / "b.bin"))),
             (file_url(str(tmp_path / "missing")), file_url(str(tmp_path / "c.bin")))]
    undone, err = s._run(pairs, check_url("gsiftp://h/x"), Limits(timeout=60))
    assert undone == {pairs[1][0]}, err
    assert (tmp_path / "out dir" / "b.bin").read_bytes() == b"a" * 5000
    assert not (tmp_path / "c.bin").exists()


def test_globus_transfer_document():
    body = transfer_document(
        "9f2cc1ac-6ab1-11ef-bd5b-7b0c33e6b7bf", "ddb59aef-6d04-11e5-ba46-22000b92c6ec",
        "6c54cade-bde5-45c1-bdea-f4bd71dba2cc",
        [("/~/campus/run 1/in.dat", "/work/job.7/.in.dat.partial-0000"),
         ("/data/b.dat", "/work/job.7/.b.dat.partial-0000")],
        "pilotfish 2 file(s)",
        deadline_for(Limits(timeout=5400), datetime(2026, 12, 6, 7, 30, tzinfo=timezone.utc)))
    assert body == json.loads((GOLDEN / "globus_transfer.json").read_text())
    assert ls_request("ddb59aef-6d04-11e5-ba46-22000b92c6ec", "/~/campus/run 1") == \
        "/operation/endpoint/ddb59aef-6d04-11e5-ba46-22000b92c6ec/ls?path=/~/campus/run%201"


# -- the Globus calls, against a local stand-in ------------------------------------------------
class StandIn:
    """Answers GET /submission_id, GET .../ls, POST /transfer, GET /task/ID, POST cancel with
    the documented shapes; the task 'copies' by writing the destination files."""

    def __init__(self, files: dict[str, bytes], nice: str | None = None) -> None:
        self.files, self.nice, self.calls, self.bodies = files, nice, [], []
        self.items: list = []
        stand = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, doc: dict) -> None:
                raw = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                stand.calls.append(("GET", self.path))
                assert self.headers["Authorization"] == "Bearer tok-123"
                if self.path.endswith("/submission_id"):
                    return self._send(200, {"DATA_TYPE": "submission_id", "value": "sub-1"})
                if "/ls?path=" in self.path:
                    d = self.path.split("path=", 1)[1]
                    names = [p.rsplit("/", 1)[1] for p in stand.files
                             if p.rsplit("/", 1)[0] == d]
                    if not names:
                        return self._send(404, {"code": "ClientError.NotFound"})
                    return self._send(200, {"DATA_TYPE": "file_list", "DATA": [
                        {"DATA_TYPE": "file", "name": n, "type": "file",
                         "size": len(stand.files[f"{d}/{n}"])} for n in names]})
                if "/task/" in self.path:
                    if stand.nice:
                        return self._send(200, {"status": "ACTIVE", "nice_status": stand.nice})
                    for item in stand.items:
                        Path(item["destination_path"]).write_bytes(
                            stand.files[item["source_path"]])
                    return self._send(200, {"status": "SUCCEEDED", "nice_status": None})
                self._send(404, {})

            def do_POST(self):
                stand.calls.append(("POST", self.path))
                n = int(self.headers["Content-Length"] or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if self.path.endswith("/transfer"):
                    stand.bodies.append(body)
                    stand.items = body["DATA"]
                    return self._send(202, {"code": "Accepted", "task_id": "task-1"})
                return self._send(200, {"code": "Canceled"})

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/v0.10"

    def stop(self):
        self.srv.shutdown()


EP = "ddb59aef-6d04-11e5-ba46-22000b92c6ec"
LOCAL = "6c54cade-bde5-45c1-bdea-f4bd71dba2cc"


@pytest.fixture
def globus(tmp_path, monkeypatch):
    tok = tmp_path / "token"
    tok.write_text("tok-123\n")
    creds = Credentials.from_mapping({"globus://*": {"token_file": str(tok),
                                                      "local_endpoint": LOCAL}})
    monkeypatch.setattr("pilotfish.transfer.globus.POLL", 0.05)
    made = []

    def start(files, nice=None):
        s = StandIn(files, nice)
        monkeypatch.setenv("PILOTFISH_GLOBUS_API", s.url)
        made.append(s)
        return s, scheme_for(f"globus://{EP}/x", credentials=creds)
    yield start
    for s in made:
        s.stop()


def test_globus_batch_lists_submits_polls_and_places(globus, tmp_path):
    stand, s = globus({"/data/a.dat": b"a" * 10, "/data/b.dat": b"b" * 20})
    out = s.get_batch([(f"globus://{EP}/data/a.dat", str(tmp_path / "a.dat")),
                       (f"globus://{EP}/data/nope", str(tmp_path / "n")),
                       (f"globus://{EP}/data/b.dat", str(tmp_path / "b.dat"))],
                      Limits(timeout=30))
    assert out[0] == 10 and out[2] == 20
    assert str(out[1]) == f"globus://{EP}/data/nope: No such file"
    [body] = stand.bodies  # one task for the batch, the missing file never in it
    assert [i["source_path"] for i in body["DATA"]] == ["/data/a.dat", "/data/b.dat"]
    assert body["source_endpoint"] == EP and body["destination_endpoint"] == LOCAL
    assert (tmp_path / "b.dat").read_bytes() == b"b" * 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dat", "b.dat", "token"]


def test_globus_permanent_fault_cancels_the_task_at_once(globus, tmp_path):
    """Balsam#114: a task Globus keeps retrying (nice_status FILE_NOT_FOUND) is cancelled and
    fails at the first poll, not at the deadline."""
    stand, s = globus({"/data/a.dat": b"a"}, nice="FILE_NOT_FOUND")
    with pytest.raises(TransferError, match="No such file"):
        s.get(f"globus://{EP}/data/a.dat", str(tmp_path / "a"), Limits(timeout=30))
    assert ("POST", "/v0.10/task/task-1/cancel") in stand.calls
    assert [p.name for p in tmp_path.iterdir()] == ["token"]
