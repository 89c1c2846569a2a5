"""``globus://COLLECTION/path``: Globus Transfer tasks, batched and polled.

No globus-sdk needed: the Transfer API's request bodies are plain JSON documents, built here by
pure functions (:func:`transfer_document`) and tested against golden files checked against the
Transfer API documentation (https://docs.globus.org/api/transfer/task_submit/: the
``transfer`` document and ``transfer_item``; task_management for task status and cancel;
file_operations for ``ls``). The few calls go over the standard library's https client with
the bearer token from ``token_file`` (never logged, never on a command line):

* ``GET /operation/endpoint/{id}/ls?path=DIR`` first: a missing path fails fast, before a task
  exists (Balsam#114: a task on a missing path is retried by Globus for days);
* ``GET /submission_id``, then ``POST /transfer`` with one document for the whole batch;
* ``GET /task/{task_id}`` every few seconds until SUCCEEDED or FAILED; a task that reports a
  permanent fault (``nice_status`` FILE_NOT_FOUND, PERMISSION_DENIED, ...) or passes the
  transfer's timeout is cancelled (``POST /task/{task_id}/cancel``) and fails.

The local end is the collection named by ``local_endpoint`` in the credentials: a mapped
collection whose paths are this file system's absolute paths. Files land under a temporary
name beside their destination and are renamed when the task succeeded and the size matches.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Sequence
from urllib.parse import quote

from .base import Limits, Partial, Scheme, Stat, TransferError, Url, as_url, over_cap
from .credentials import NONE

API = "https://transfer.api.globus.org/v0.10"
API_ENV = "PILOTFISH_GLOBUS_API"  #: another base URL (a test stand-in, a sandbox)
POLL = 2.0
#: nice_status values after which a task never succeeds by itself: cancelled at once.
PERMANENT = {"FILE_NOT_FOUND": "No such file", "PERMISSION_DENIED": "permission denied",
             "NOT_A_DIRECTORY": "not a directory", "IS_A_DIRECTORY": "is a directory",
             "FILE_SIZE_CHANGED": "the file changed while copied",
             "QUOTA_EXCEEDED": "quota exceeded on the destination"}


def collection_path(u: Url) -> str:
    """The path inside the collection (``/~/x`` stays: Globus expands it to the home)."""
    return u.path


def transfer_document(submission_id: str, source: str, destination: str,
                      items: Sequence[tuple[str, str]], label: str, deadline: str) -> dict:
    """The body of ``POST /transfer`` (pure): one task for the batch, files only, checksums
    verified, data encrypted, a quota error fatal, a source error not skipped."""
    return {
        "DATA_TYPE": "transfer",
        "submission_id": submission_id,
        "source_endpoint": source,
        "destination_endpoint": destination,
        "label": label[:128],
        "deadline": deadline,
        "verify_checksum": True,
        "encrypt_data": True,
        "preserve_timestamp": False,
        "fail_on_quota_errors": True,
        "skip_source_errors": False,
        "DATA": [{"DATA_TYPE": "transfer_item", "source_path": s, "destination_path": d,
                  "recursive": False} for s, d in items],
    }


def deadline_for(limits: Limits, now: datetime | None = None) -> str:
    """The task's own deadline (Globus stops it there too), ISO 8601 in UTC."""
    now = now or datetime.now(timezone.utc)
    return (now + timedelta(seconds=limits.timeout)).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def ls_request(endpoint: str, directory: str) -> str:
    """The request target of a directory listing (pure)."""
    return f"/operation/endpoint/{quote(endpoint)}/ls?path={quote(directory, safe='/~')}"


class GlobusScheme(Scheme):
    names = ("globus",)
    batch = True

    def _setup(self, u: Url):
        cred = self.credentials.for_url(u) if self.credentials is not None else NONE
        try:
            token = cred.token()
        except Exception as exc:
            raise TransferError(f"{u}: {exc}") from None
        if not token or not cred.local_endpoint:
            raise TransferError(f"{u}: no Globus token_file and local_endpoint in the "
                                "transfers credentials (site profile or transfers file)")
        return token, cred.local_endpoint

    def _call(self, token: str, method: str, target: str, limits: Limits, u: Url,
              body: dict | None = None) -> tuple[int, dict]:
        import http.client
        import ssl
        from urllib.parse import urlsplit
        base = urlsplit(os.environ.get(API_ENV) or API)
        cls = http.client.HTTPSConnection if base.scheme == "https" else \
            http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if base.scheme == "https" else {}
        conn = cls(base.hostname, base.port, timeout=limits.stall, **kw)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, base.path.rstrip("/") + target, body=data,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json",
                                  "User-Agent": "pilotfish-transfer"})
            resp = conn.getresponse()
            raw = resp.read(4 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"{u}: Globus Transfer API: {exc}"[:300]) from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            doc = {}
        return resp.status, doc if isinstance(doc, dict) else {}

    def _ls(self, token: str, u: Url, limits: Limits) -> dict:
        path = collection_path(u)
        directory, name = path.rsplit("/", 1)
        status, doc = self._call(token, "GET", ls_request(u.host, directory or "/"), limits, u)
        if status == 404:
            raise TransferError(f"{u}: No such file")
        if status != 200:
            raise TransferError(f"{u}: Globus ls: HTTP {status} {doc.get('code', '')}".strip())
        for entry in doc.get("DATA") or []:
            if entry.get("name") == name:
                return entry
        raise TransferError(f"{u}: No such file")

    def stat(self, url: Url | str, limits: Limits) -> Stat:
        u = as_url(url)
        token, _ = self._setup(u)
        e = self._ls(token, u, limits)
        is_dir = e.get("type") == "dir"
        return Stat(None if is_dir else int(e.get("size") or 0), is_dir)

    def get(self, url: Url | str, dest: str, limits: Limits) -> int:
        r = self.get_batch([(url, dest)], limits)[0]
        if isinstance(r, TransferError):
            raise r
        return r

    def get_batch(self, pairs: Sequence[tuple[Url | str, str]],
                  limits: Limits) -> list[int | TransferError]:
        """Every pair of one collection in one task (listed first: missing files fail before
        the task); each file renamed into place when the task succeeded."""
        urls = [as_url(u) for u, _ in pairs]
        out: list[int | TransferError] = [0] * len(pairs)
        if not urls:
            return out
        if len({u.host for u in urls}) != 1:
            raise TransferError(f"{urls[0]}: a batch must name one collection")
        token, local = self._setup(urls[0])
        todo = []
        for i, (u, (_, dest)) in enumerate(zip(urls, pairs)):
            try:
                if os.path.lexists(dest):
                    raise TransferError(f"{dest}: exists already; never overwritten")
                e = self._ls(token, u, limits)
                if e.get("type") == "dir":
                    raise TransferError(f"{u}: is a directory; remote inputs are files")
                size = int(e.get("size") or 0)
                if size > limits.max_bytes:
                    raise over_cap(u, limits)
                todo.append((i, u, Partial(dest), size))
            except TransferError as exc:
                out[i] = exc
        if not todo:
            return out
        try:
            self._run_task(token, urls[0].host, local,
                           [(collection_path(u), p.tmp) for _, u, p, _ in todo], limits,
                           urls[0])
        except TransferError as exc:
            for i, _, p, _ in todo:
                out[i] = exc
                p.discard()
            return out
        for i, u, p, size in todo:
            try:
                got = os.stat(p.tmp, follow_symlinks=False).st_size
            except OSError:
                got = -1
            if got != size:
                p.discard()
                out[i] = TransferError(f"{u}: got {got} bytes of {size}: size check failed")
                continue
            os.rename(p.tmp, p.dest)
            out[i] = got
        return out

    def _run_task(self, token: str, source: str, destination: str,
                  items: list[tuple[str, str]], limits: Limits, u: Url) -> str:
        status, doc = self._call(token, "GET", "/submission_id", limits, u)
        if status != 200 or "value" not in doc:
            raise TransferError(f"{u}: Globus submission_id: HTTP {status}")
        body = transfer_document(doc["value"], source, destination, items,
                                 f"pilotfish {len(items)} file(s)", deadline_for(limits))
        status, doc = self._call(token, "POST", "/transfer", limits, u, body)
        if status not in (200, 202) or "task_id" not in doc:
            raise TransferError(f"{u}: Globus transfer refused: HTTP {status} "
                                f"{doc.get('code', '')} {doc.get('message', '')}"[:300])
        task = doc["task_id"]
        end = time.monotonic() + limits.timeout
        while True:
            status, t = self._call(token, "GET", f"/task/{quote(task)}", limits, u)
            state, nice = t.get("status"), t.get("nice_status")
            if state == "SUCCEEDED":
                return task
            if state == "FAILED":
                raise TransferError(f"{u}: Globus task {task} failed "
                                    f"({t.get('fatal_error') or nice})"[:300])
            why = PERMANENT.get(nice or "")
            if why or time.monotonic() > end:
                self._call(token, "POST", f"/task/{quote(task)}/cancel", limits, u)
                raise TransferError(f"{u}: {why}" if why else
                                    f"{u}: timed out after {limits.timeout:g} s (Globus task "
                                    f"{task} cancelled)")
            time.sleep(POLL)

    def put(self, src: str, url: Url | str, limits: Limits) -> int:
        r = self.put_batch([(src, url)], limits)[0]
        if isinstance(r, TransferError):
            raise r
        return r

    def put_batch(self, pairs: Sequence[tuple[str, Url | str]],
                  limits: Limits) -> list[int | TransferError]:
        """Local files (by real path: the local collection reads them itself) to the remote
        collection in one task. Globus writes the final names (its own restart markers make a
        retried task resume)."""
        urls = [as_url(u) for _, u in pairs]
        out: list[int | TransferError] = [0] * len(pairs)
        if not urls:
            return out
        token, local = self._setup(urls[0])
        items, sizes = [], []
        for i, ((src, _), u) in enumerate(zip(pairs, urls)):
            real = os.path.realpath(src)
            size = os.stat(real).st_size
            if size > limits.max_bytes:
                out[i] = over_cap(u, limits)
                continue
            items.append((i, real, collection_path(u)))
            sizes.append(size)
        if items:
            try:
                self._run_task(token, local, urls[0].host, [(s, d) for _, s, d in items],
                               limits, urls[0])
                for (i, _, _), size in zip(items, sizes):
                    out[i] = size
            except TransferError as exc:
                for i, _, _ in items:
                    out[i] = exc
        return out


__all__ = ["API", "GlobusScheme", "PERMANENT", "deadline_for", "ls_request",
           "transfer_document"]
