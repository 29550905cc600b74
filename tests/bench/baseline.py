"""The bench's baseline: a bare aiohttp app (one catch-all route, a constant body of the size
given), run as its own process with `python -c BASELINE SIZE`; it prints its port."""

from __future__ import annotations

BASELINE = """
import socket, sys
from aiohttp import web
body = b"x" * int(sys.argv[1])
async def handler(request):
    return web.Response(body=body, content_type="text/plain")
app = web.Application()
app.router.add_route("*", "/{path:.*}", handler)
sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None, access_log=None)
"""
