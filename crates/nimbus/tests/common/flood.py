"""Slow-client flood for the connection tests: opens COUNT connections to HOST:PORT, sends
each one part of a request head and stalls, and reports what the server did with them.

usage: flood.py HOST PORT COUNT HOLD_SECONDS

Prints two JSON lines: when every connect has settled ("phase": "held", the connections
are open now) and when every connection has ended or HOLD_SECONDS have passed
("phase": "done"). Counts: connected, connect_failed, refused (a 503
too_many_connections answer), cut (closed by the server without an answer), other (any
other answer; first lines in "answers"), open (still open at the end).
"""

import errno
import json
import resource
import selectors
import socket
import sys
import time

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: flood\r\nX-Slow: "
IN_FLIGHT = 512  # connects pending at once, so the SYNs do not overflow the backlog


def main():
    host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    counts = dict(connected=0, connect_failed=0, refused=0, cut=0, other=0)
    answers = []
    started = 0
    pending = 0
    live = 0

    def finish(sock, outcome):
        nonlocal live
        sel.unregister(sock)
        sock.close()
        live -= 1
        if outcome:
            counts[outcome] += 1

    def start_some():
        nonlocal started, pending, live
        while started < count and pending < IN_FLIGHT:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            started += 1
            code = sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                counts["connect_failed"] += 1
                continue
            sel.register(sock, selectors.EVENT_WRITE, "connecting")
            pending += 1
            live += 1

    def on_event(key, mask):
        nonlocal pending
        sock = key.fileobj
        if key.data == "connecting":
            pending -= 1
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                finish(sock, "connect_failed")
                return
            counts["connected"] += 1
            try:
                sock.send(PARTIAL_HEAD)
            except OSError:
                pass
            sel.modify(sock, selectors.EVENT_READ, b"")
            return
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = None
        except BlockingIOError:
            return
        seen = key.data + (data or b"")
        if data:
            sel.modify(sock, selectors.EVENT_READ, seen)
            return
        # The server closed the connection: after an answer, or without one.
        if not seen:
            finish(sock, "cut")
        elif seen.startswith(b"HTTP/1.1 503") and b"too_many_connections" in seen:
            finish(sock, "refused")
        else:
            if len(answers) < 5:
                answers.append(seen.split(b"\r\n", 1)[0].decode("latin-1"))
            finish(sock, "other")

    start_some()
    while started < count or pending:
        for key, mask in sel.select(timeout=1.0):
            on_event(key, mask)
        start_some()
    report("held", counts, answers, live)

    deadline = time.monotonic() + hold
    while live and time.monotonic() < deadline:
        for key, mask in sel.select(timeout=0.5):
            on_event(key, mask)
    report("done", counts, answers, live)


def report(phase, counts, answers, live):
    print(json.dumps(dict(phase=phase, open=live, answers=answers, **counts)), flush=True)


if __name__ == "__main__":
    main()
