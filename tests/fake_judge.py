"""A chat-completions server on 127.0.0.1 that answers like a VIEScore judge, with injected faults.

Used in-process by the ``server`` fixture (conftest) and as a command by the tests of a judge server the steps
start themselves (``python tests/fake_judge.py --port N``): a real HTTP server, never a mock client.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class FakeJudge(BaseHTTPRequestHandler):
    """Scores [8, 6] for SC questions and [9, 7] for PQ ones, or (``by_image``) scores drawn from a hash of the
    edited image, so that samples of a group differ as a real judge's would; a seeded share of requests (the
    ``fault_rate``) get a fault."""

    faults = ("timeout", "http500", "prose", "one_score")

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests += 1
            draw = server.rng.random()
            fault = self.faults[server.rng.integers(4)] if draw < server.fault_rate else None
            if fault:
                server.fault_counts[fault] += 1
        content = body["messages"][0]["content"]
        images = sum(1 for part in content if part["type"] == "image_url")
        if fault == "timeout":
            time.sleep(4.0)
        if fault == "http500":
            self.send_response(500)
            self.end_headers()
            return
        scores = [8, 6] if images == 2 else [9, 7]
        if server.by_image:  # the edited image is the last one; the same image always gets the same scores
            digest = hashlib.sha256(content[-1]["image_url"]["url"].encode()).digest()
            scores = [digest[0] % 11, digest[1] % 11] if images == 2 else [digest[2] % 11, digest[3] % 11]
        text = {"prose": "The edit looks good to me.", "one_score": json.dumps({"score": [8]})}.get(
            fault, json.dumps({"score": scores, "reasoning": "ok"})
        )
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}
        data = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
            pass

    def do_GET(self):  # noqa: N802  (GET /v1/models: the readiness probe of a served judge)
        data = json.dumps({"object": "list", "data": [{"id": "judge", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def make_server(port: int, fault_rate: float, by_image: bool = False) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", port), FakeJudge)
    httpd.lock, httpd.requests, httpd.rng = threading.Lock(), 0, np.random.default_rng(0)
    httpd.fault_rate, httpd.fault_counts, httpd.by_image = fault_rate, {f: 0 for f in FakeJudge.faults}, by_image
    return httpd


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--by-image", action="store_true", help="scores from a hash of the edited image")
    args = parser.parse_args()
    make_server(args.port, args.fault_rate, args.by_image).serve_forever()
