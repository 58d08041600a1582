"""A minimal receiver of scope-stream webhooks (Standard Webhooks), verified with the `standardwebhooks` package.

    pip install standardwebhooks
    SCOPE_STREAM_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 8080

It verifies ``webhook-signature`` over the raw body (the package also refuses a ``webhook-timestamp``
more than 5 minutes from now: the replay window), drops ids it has already seen (retries reuse the
id), answers 204, and prints each event. Any other answer than 2xx makes scope-stream retry (5xx,
429) or give up (other 4xx); it never follows a redirect. Uses only the standard library otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


def make_handler(secret: str, max_seen: int = 10_000) -> type[BaseHTTPRequestHandler]:
    wh = Webhook(secret)
    seen: OrderedDict[str, None] = OrderedDict()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                doc = wh.verify(body, dict(self.headers))  # raw bytes, before any parsing
            except WebhookVerificationError as exc:
                self.send_response(401)
                self.end_headers()
                self.wfile.write(str(exc).encode())
                return
            msg_id = self.headers["webhook-id"]
            with lock:
                fresh = msg_id not in seen
                seen[msg_id] = None
                while len(seen) > max_seen:
                    seen.popitem(last=False)
            if fresh:
                print(json.dumps({"topic": doc["topic"], "event": doc["event"]}), flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--secret-env", default="SCOPE_STREAM_WEBHOOK_SECRET")
    args = ap.parse_args()
    secret = os.environ.get(args.secret_env)
    if not secret:
        raise SystemExit(f"set {args.secret_env} to the webhook's secret (whsec_...)")
    server = ThreadingHTTPServer((args.host, args.port), make_handler(secret))
    print(f"listening on http://{args.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
