"""The ``geojepa`` entry point: a place query answered by a running ``geojepa embed --serve``, else the full CLI.

A process that imports numpy, pyarrow and faiss spends 300+ ms before it reads a byte, so a place query from a
fresh process cannot answer in tens of milliseconds by itself. When a resident server (``embed_server``) is
listening on this home's socket, ``geojepa embed --lat --lon`` is answered here with the standard library only:
parse, send one JSON line, print the answer. Anything else (another command, a form this parser does not know,
no server, a server that declines) goes to ``cli.main``, which answers the same question itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys

PLACE_OPTIONS = {"--lat": float, "--lon": float, "--variant": str, "--k": int}
SERVER_TIMEOUT_S = 10.0  # a server that does not answer by then is skipped (the CLI answers instead)


def place_query(argv: list[str]) -> dict | None:
    """``[--home H] embed --lat X --lon Y [--variant V] [--k N] [--json]`` as a request dict, else None."""
    args, home, i = {}, None, 0
    if argv[:1] == ["--home"] and len(argv) > 1:
        home, i = argv[1], 2
    elif argv[:1] and argv[0].startswith("--home="):
        home, i = argv[0].split("=", 1)[1], 1
    if argv[i:i + 1] != ["embed"]:
        return None
    rest, as_json = argv[i + 1:], False
    j = 0
    while j < len(rest):
        tok = rest[j]
        if tok == "--json":
            as_json, j = True, j + 1
            continue
        name, sep, value = tok.partition("=")
        if name not in PLACE_OPTIONS or name[2:] in args:
            return None
        if not sep:
            if j + 1 >= len(rest):
                return None
            value, j = rest[j + 1], j + 1
        try:
            args[name[2:]] = PLACE_OPTIONS[name](value)
        except ValueError:
            return None  # the CLI says what is wrong with it
        j += 1
    if "lat" not in args or "lon" not in args or args.get("k", 5) < 1:
        return None
    return {"op": "place", "home": home, "lat": args["lat"], "lon": args["lon"], "variant": args.get("variant", "GT"),
            "k": args.get("k", 5), "json": as_json}


def ask(socket_path, request: dict, timeout: float = SERVER_TIMEOUT_S) -> dict | None:
    """The server's reply to ``request`` (one JSON line each way), or None when no server answers on ``socket_path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(os.fspath(socket_path))
            s.sendall(json.dumps(request).encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
    except OSError:  # no socket, a stale one, or a server gone mid-answer
        return None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return None


def format_place(answer: dict) -> str:
    """The text ``geojepa embed --lat --lon`` prints for ``stages.embeddings.place_answer``'s dict."""
    from .text import format_table

    vec = answer["embedding"]
    near = answer["neighbours"]
    return "\n".join([
        f"tile {answer['tile_id']} of region {answer['region']} (centre lat {answer['lat']:.5f}, lon {answer['lon']:.5f})",
        f"model {answer['model_version']}, embeddings {answer['embeddings_version']}, tokens {answer['tokens_version']}",
        f"embedding ({len(vec)} float32): " + " ".join(f"{v:+.4f}" for v in vec[:8]) + " ...",
        f"{len(near)} nearest tiles (cosine distance = 1 - cosine):",
        format_table(["rank", "tile_id", "region", "distance", "lat", "lon"],
                     [(i + 1, h["tile_id"], h["region"], round(h["distance"], 4), round(h["lat"], 5), round(h["lon"], 5))
                      for i, h in enumerate(near)]),
    ])


def print_place(answer: dict, as_json: bool) -> None:
    print(json.dumps(answer) if as_json else format_place(answer))


def _served(argv: list[str]) -> int | None:
    """The exit code of a place query the server answered, or None (the full CLI goes on)."""
    request = place_query(argv)
    if request is None:
        return None
    from .settings import get_settings

    settings = get_settings(request["home"])
    request["home"], request["store"] = str(settings.home), str(settings.store_root)
    if not settings.embed_socket.exists():
        return None
    reply = ask(settings.embed_socket, request)
    if reply is None or "answer" not in reply and "error" not in reply:
        return None  # no server, or it declined ("fallback": another home or store, an unknown variant)
    if "error" in reply:
        print(f"error: {reply['error']}", file=sys.stderr)
        return 2
    try:
        print_place(reply["answer"], request["json"])
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    code = _served(argv)
    if code is not None:
        return code
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
