"""``geojepa embed --serve``: a resident server that answers place queries from memory.

It opens every region's current ``tile_embeddings`` (every variant), holds their kNN indexes, embeddings,
tile ids and tile keys, and answers ``cli_light``'s requests on this home's Unix socket
(``Settings.embed_socket``): one JSON line in, one out. Before each answer it checks that each region's
embeddings are still the current version, and opens any new version first, so it never answers from data
the store has moved past. One request at a time (a query is milliseconds; a second client waits in the
listen queue).

Reply: ``{"answer": place_answer's dict}``, ``{"error": one line}`` (what the CLI would print), or
``{"fallback": why}`` for a request it leaves to the CLI (another home or store, a variant it does not know).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

from .errors import GeojepaError
from .model.config import VARIANTS
from .settings import Settings
from .stages.embeddings import EmbeddedRegion, embedded_regions, place_answer, split_scope
from .store import EMBEDDINGS, Store

REQUEST_MAX_BYTES = 1 << 16


class PlaceServer:
    """The opened regions of one store, by variant, kept current (``regions``) and asked (``answer``)."""

    def __init__(self, settings: Settings, store: Store, log: Callable[[str], None] = print):
        self.settings, self.store, self.log = settings, store, log
        self.opened: dict[str, dict[str, EmbeddedRegion]] = {}

    def regions(self, variant: str) -> dict[str, EmbeddedRegion]:
        """``variant``'s regions at their current versions; a new version is opened (and read) before it is used."""
        before = self.opened.get(variant, {})
        now = embedded_regions(self.store, variant, resident=True, opened=before)
        for name, er in now.items():
            if before.get(name) is not er:
                t = time.perf_counter()
                er.load()
                self.log(f"opened {name} by {variant}: {len(er.tile_xy()[0]):,} tiles, embeddings {er.ds.data_version} "
                         f"({time.perf_counter() - t:.1f} s)")
        self.opened[variant] = now
        return now

    def preload(self) -> int:
        """Open every variant's regions now; returns the tiles held."""
        variants = sorted({split_scope(scope)[1] for scope in self.store.regions(EMBEDDINGS)} & set(VARIANTS))
        return sum(len(er.tile_xy()[0]) for v in variants for er in self.regions(v).values())

    def answer(self, request: dict) -> dict:
        if request.get("op") != "place":
            return {"fallback": f"unknown op {request.get('op')!r}"}
        if request.get("home") != str(self.settings.home) or request.get("store") != str(self.settings.store_root):
            return {"fallback": "another GEOJEPA_HOME or GEOJEPA_STORE than this server's"}
        variant = request.get("variant")
        if variant not in VARIANTS:
            return {"fallback": f"unknown variant {variant!r}"}  # the CLI's usage error names the choices
        try:
            return {"answer": place_answer(self.store, variant, float(request["lon"]), float(request["lat"]),
                                           int(request["k"]), self.regions(variant))}
        except GeojepaError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a fault of this server (a file gone, a bug): the CLI answers instead, and the log says why
            import traceback

            self.log(f"query failed, left to the CLI: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            return {"fallback": f"server fault: {type(exc).__name__}: {exc}"}


def _bind(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``; a stale one (no server behind it) is replaced, a live one is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale: its server died without removing it
        else:
            raise GeojepaError(f"a place server is already listening on {path}; stop it first (or query it: geojepa embed --lat --lon)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is this user's alone
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(64)
    return sock


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > REQUEST_MAX_BYTES:
            raise ValueError("request too long")
    return json.loads(data)


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does


def serve(settings: Settings, store: Store, log: Callable[[str], None] = print, max_requests: int | None = None) -> int:
    """Serve place queries on ``settings.embed_socket`` until SIGINT or SIGTERM (or ``max_requests``); the socket goes on exit."""
    path = settings.embed_socket
    server = PlaceServer(settings, store, log)
    t = time.perf_counter()
    n_tiles = server.preload()
    sock = _bind(path)
    previous = signal.signal(signal.SIGTERM, _stop)
    log(f"serving place queries for {settings.home} on {path}: {n_tiles:,} tiles held, ready in "
        f"{time.perf_counter() - t:.1f} s; geojepa embed --lat --lon now asks here (Ctrl-C stops)")
    if not n_tiles:
        log("no region has tile_embeddings yet: queries are answered as soon as some are "
            "(geojepa materialize --select tile_embeddings)")
    served = 0
    try:
        while max_requests is None or served < max_requests:
            conn, _ = sock.accept()
            with conn:
                conn.settimeout(5.0)
                try:
                    reply = server.answer(_read_request(conn))
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"fallback": f"unreadable request: {exc}"}
                except OSError:
                    continue  # the client went away
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass
            served += 1
    except KeyboardInterrupt:
        log(f"stopped after {served:,} queries")
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        path.unlink(missing_ok=True)
    return 0
