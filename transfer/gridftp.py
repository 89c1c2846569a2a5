"""``gsiftp://``: GridFTP through ``globus-url-copy`` (Debian: globus-gass-copy-progs).

The command line is built by a pure function (:func:`guc_argv`) and is the same for every job:
the URLs go into a pairs file (``-f``), never on the command line, and the proxy certificate
is named by ``X509_USER_PROXY`` in the child's environment (``x509_proxy`` in the
credentials), never on the command line. Options, as globus-url-copy 10.12 documents them
(``globus-url-copy -help``; the man page of globus-gass-copy-progs):

* ``-b`` binary (no conversion); ``-q`` quiet when it works (errors still on stderr);
* ``-cd`` create the destination directory; ``-fast`` MODE E with channel reuse (recommended
  for GridFTP servers); ``-p N`` parallel data connections;
* ``-stall-timeout S`` cancel a transfer with no data movement for S seconds (our stall bound;
  the watcher in :mod:`.process` kills it too);
* ``-c`` continue after an error and ``-df FILE`` dump the pairs not transferred when it
  gives up; a pair that failed under ``-c`` is named on stderr: so a batch reports each
  pair's failure alone.

Downloads go to ``file:///DIR/.NAME.partial-XXXX`` and are renamed when whole and of the size
the server listed; uploads are written under their final name (GridFTP has no rename in
globus-url-copy), so a failed upload may leave a partial file on the server.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence
from urllib.parse import quote, unquote

from .base import Limits, Partial, Scheme, TransferError, Url, as_url, over_cap
from .credentials import NONE
from .process import run
from .ssh import _open_regular

GUC = "globus-url-copy"
PARALLEL = 4


def gsiftp_url(u: Url) -> str:
    """The URL as globus-url-copy takes it (path re-encoded; ``/~/`` kept)."""
    host = u.host + (f":{u.port}" if u.port else "")
    return f"gsiftp://{host}{quote(u.path, safe='/~-._')}"


def file_url(path: str) -> str:
    return "file://" + quote(path, safe="/-._~")


def pairs_text(pairs: Sequence[tuple[str, str]]) -> str:
    """The ``-f`` file: one ``"SOURCE" "DEST"`` line per pair (URLs are percent-encoded, so
    no quote or space is inside)."""
    return "".join(f'"{s}" "{d}"\n' for s, d in pairs)


def guc_argv(pairs_file: str, dump_file: str, limits: Limits,
             parallel: int = PARALLEL) -> list[str]:
    """The globus-url-copy command line (pure)."""
    return [GUC, "-b", "-q", "-cd", "-fast", "-p", str(parallel), "-stall-timeout",
            str(max(1, int(limits.stall))), "-c", "-df", dump_file, "-f", pairs_file]


def _reason(err: str) -> str:
    low = err.lower()
    if "no such file" in low or "not found" in low or "550" in err:
        return "No such file"
    if "connection refused" in low:
        return "connection refused"
    if "credential" in low or "proxy" in low or "authenticat" in low:
        return "authentication failed (x509_proxy in the transfers credentials)"
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "globus-url-copy failed"


class GridFtpScheme(Scheme):
    names = ("gsiftp",)
    batch = True

    def _env(self, u: Url) -> dict:
        cred = self.credentials.for_url(u) if self.credentials is not None else NONE
        return {"X509_USER_PROXY": cred.x509_proxy} if cred.x509_proxy else {}

    def _run(self, pairs: list[tuple[str, str]], u: Url, limits: Limits,
             growing=None, pass_fds=()) -> tuple[set[str], str]:
        """Run one batch; (the source URLs not transferred, stderr)."""
        d = tempfile.mkdtemp(prefix="pilotfish-guc-")
        try:
            pf, df = os.path.join(d, "pairs"), os.path.join(d, "undone")
            with open(pf, "w") as f:
                f.write(pairs_text(pairs))
            rc, err = run(guc_argv(pf, df, limits), limits, str(u), env=self._env(u),
                          growing=growing, pass_fds=pass_fds)
            undone: set[str] = set()
            if os.path.exists(df):  # pairs left when it gave up
                with open(df) as f:
                    for line in f:
                        if line.strip() and not line.startswith("#"):
                            undone.add(line.split()[0].strip('"'))
            # with -c, a failed pair is named on stderr (its source URL or path), not dumped
            for s, _ in pairs:
                path = unquote(s.split("://", 1)[1].partition("/")[2])
                if s in err or f"/{path}" in err:
                    undone.add(s)
            if rc != 0 and not undone:
                undone = {s for s, _ in pairs}
            return undone, err
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def get(self, url: Url | str, dest: str, limits: Limits) -> int:
        r = self.get_batch([(url, dest)], limits)[0]
        if isinstance(r, TransferError):
            raise r
        return r

    def put(self, src: str, url: Url | str, limits: Limits) -> int:
        r = self.put_batch([(src, url)], limits)[0]
        if isinstance(r, TransferError):
            raise r
        return r

    def get_batch(self, pairs, limits: Limits) -> list[int | TransferError]:
        urls = [as_url(u) for u, _ in pairs]
        parts = [Partial(d) for _, d in pairs]
        out: list[int | TransferError] = [0] * len(pairs)
        try:
            for d in (d for _, d in pairs):
                if os.path.lexists(d):
                    raise TransferError(f"{d}: exists already; never overwritten")
            for p in parts:  # made here: O_EXCL|O_NOFOLLOW, so nothing planted is written
                p.open()
                p.close()
            plan = [(gsiftp_url(u), file_url(p.tmp)) for u, p in zip(urls, parts)]

            def largest() -> int:
                return max((os.path.getsize(p.tmp) if os.path.exists(p.tmp) else 0
                            for p in parts), default=0)
            undone, err = self._run(plan, urls[0], limits, largest)
            for i, (u, p, (src, _)) in enumerate(zip(urls, parts, plan)):
                if src in undone or not os.path.exists(p.tmp):
                    out[i] = TransferError(f"{u}: {_reason(err)}")
                    continue
                size = os.path.getsize(p.tmp)
                p.fd = os.open(p.tmp, os.O_RDONLY | os.O_NOFOLLOW)
                p.commit(0o644)
                out[i] = size
            return out
        finally:
            for p in parts:
                if os.path.exists(p.tmp):
                    p.discard()

    def put_batch(self, pairs, limits: Limits) -> list[int | TransferError]:
        urls = [as_url(u) for _, u in pairs]
        out: list[int | TransferError] = [0] * len(pairs)
        plan, fds = [], []
        try:
            for i, ((src, _), u) in enumerate(zip(pairs, urls)):
                try:
                    fd = _open_regular(src, u)  # no symlink followed; read as /dev/fd/N
                    fds.append(fd)
                    size = os.fstat(fd).st_size
                    if size > limits.max_bytes:
                        raise over_cap(u, limits)
                except TransferError as exc:
                    out[i] = exc
                    continue
                plan.append((i, file_url(f"/dev/fd/{fd}"), gsiftp_url(u), size))
            if plan:
                undone, err = self._run([(s, d) for _, s, d, _ in plan], urls[0], limits,
                                        pass_fds=fds)
                for i, s, _, size in plan:
                    out[i] = TransferError(f"{urls[i]}: {_reason(err)}") if s in undone \
                        else size
            return out
        finally:
            for fd in fds:
                os.close(fd)


__all__ = ["GridFtpScheme", "file_url", "gsiftp_url", "guc_argv", "pairs_text"]
