#!/usr/bin/env python3
"""fedsb-delay-proxy: a TCP proxy that adds a fixed latency to the bytes going upstream.

Used by fedsb-netshape where the kernel has no sch_netem: the client connects to it on 127.0.0.1, every byte
it sends reaches the coordinator DELAY ms later (what `tc netem delay` on the client's egress does), the
replies pass at once. Throughput is kept (bytes are pipelined, not sent one round trip at a time); the rate
limit itself comes from tc on the interface. Standard library only (python3-minimal).
"""
import argparse
import collections
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
MAX_QUEUED = 8 << 20  # bytes held per connection before reading from the client pauses


def log(msg):
    print(f"[delay-proxy] {msg}", file=sys.stderr, flush=True)


class Upstream:
    """Holds the client's bytes for `delay` seconds, then sends them to the upstream socket."""

    def __init__(self, sock, delay):
        self.sock, self.delay = sock, delay
        self.queue = collections.deque()  # (due, bytes or None for end-of-stream)
        self.queued = 0
        self.cv = threading.Condition()
        self.closed = False
        self.failed = False

    def put(self, data):
        with self.cv:
            while self.queued > MAX_QUEUED and not self.closed:
                self.cv.wait(0.1)
            self.queue.append((time.monotonic() + self.delay, data))
            self.queued += len(data) if data else 0
            self.cv.notify_all()

    def run(self):
        try:
            while True:
                with self.cv:
                    while not self.queue and not self.closed:
                        self.cv.wait()
                    if self.closed:
                        return
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.cv:
                    self.queue.popleft()
                    self.queued -= len(data) if data else 0
                    self.cv.notify_all()
                if data is None:
                    self.sock.shutdown(socket.SHUT_WR)
                    return
                self.sock.sendall(data)
        except OSError:
            self.failed = True
        finally:
            self.close()

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify_all()


def serve(client, upstream_addr, delay):
    try:
        up = socket.create_connection(upstream_addr, timeout=10)
        up.settimeout(None)
    except OSError as e:
        log(f"connecting to {upstream_addr[0]}:{upstream_addr[1]}: {e}")
        client.close()
        return
    for s in (client, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sender = Upstream(up, delay)
    done = threading.Event()

    def teardown():
        # Unblocks every pump of this connection.
        sender.close()
        for s in (client, up):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        done.set()

    def client_to_upstream():
        try:
            while True:
                data = client.recv(CHUNK)
                sender.put(data or None)
                if not data:
                    return
        except OSError:
            teardown()

    def send_upstream():
        sender.run()
        if sender.failed:
            teardown()

    def upstream_to_client():
        try:
            while True:
                data = up.recv(CHUNK)
                if not data:
                    break
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        teardown()

    for f in (client_to_upstream, send_upstream, upstream_to_client):
        threading.Thread(target=f, daemon=True).start()
    done.wait()
    client.close()
    up.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:17443", help="HOST:PORT to listen on")
    p.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="latency added to the upstream direction")
    a = p.parse_args()
    lhost, lport = a.listen.rsplit(":", 1)
    uhost, uport = a.upstream.rsplit(":", 1)
    srv = socket.create_server((lhost, int(lport)), reuse_port=False)
    log(f"{a.listen} -> {a.upstream}, +{a.delay_ms:g} ms")
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c, (uhost, int(uport)), a.delay_ms / 1e3), daemon=True).start()


if __name__ == "__main__":
    main()
