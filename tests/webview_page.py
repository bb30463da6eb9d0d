"""The VS Code extension's webview pages as the extension makes them (``render-html``), served from
127.0.0.1 with their built scripts at ``{origin}/{page}.html``: what the Chromium test and
``bench/vscode.py`` load. ``HOST`` stands in for VS Code's webview host, as its API documents it:
``acquireVsCodeApi()`` once, ``postMessage`` to the host (recorded)."""

from __future__ import annotations

import functools
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VSCODE = Path(__file__).resolve().parents[1] / "vscode"
PAGES = ("dag", "launcher", "cards")
HOST = "window.posted = []; window.acquireVsCodeApi = () => ({ postMessage: (m) => window.posted.push(m) });"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the callers' output is theirs
        pass


@contextmanager
def served_webview(folder: Path, nonce: str = "test-nonce") -> Iterator[str]:
    """Each page (``dag``, ``launcher``, ``cards``) and its script from ``folder``, while the block runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    subprocess.run(["node", str(VSCODE / "esbuild.mjs"), "--tests"], check=True, timeout=120)
    for page in PAGES:
        (folder / f"{page}.js").write_bytes((VSCODE / "dist" / f"{page}.js").read_bytes())
        html = subprocess.run(
            ["node", str(VSCODE / "dist-test" / "render-html.mjs"), page, f"{origin}/{page}.js", origin, nonce],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (folder / f"{page}.html").write_text(html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield origin
    finally:
        server.shutdown()
