"""Issue 10's memory table, row by row: each against a fresh `majordome up`
(release build), printing resident memory before, at its peak and after,
and whether a normal echo request is still served. Needs pyzmq
(`pip install pyzmq`). Usage: python3 tools/memory_rows.py [ROW...]
(rows: the function names without `row_`; `limit_*` run at the limits)."""
import json, os, re, subprocess, sys, tempfile, threading, time
import zmq

BIN = os.environ.get("MAJORDOME", os.path.join(os.path.dirname(__file__), "..", "target", "release", "majordome"))
ctx = zmq.Context()

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0

class Up:
    def __init__(self, extra=()):
        self.data = tempfile.mkdtemp()
        args = [BIN, "up", "--bind", "tcp://127.0.0.1:0", "--pub-bind", "tcp://127.0.0.1:0",
                "--sub-bind", "tcp://127.0.0.1:0", "--state-bind", "tcp://127.0.0.1:0",
                "--http-bind", "127.0.0.1:0",
                "--data", self.data, *extra]
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env={**os.environ, "MAJORDOME_LOG": "error"})
        lines = [self.p.stdout.readline() for _ in range(7)]
        last = lambda i: lines[i].split()[-1]
        self.broker, self.pub, self.sub = last(0), last(2), last(3)
        self.snapshot, self.updates, self.collector = last(4), last(5), last(6)
        threading.Thread(target=lambda: [None for _ in self.p.stdout], daemon=True).start()
        self.peak = 0
        self.sampling = True
        threading.Thread(target=self._sample, daemon=True).start()
        time.sleep(2)
        self.before = rss(self.p.pid)
    def _sample(self):
        while self.sampling:
            try:
                self.peak = max(self.peak, rss(self.p.pid))
            except Exception:
                return
            time.sleep(0.02)
    def echo_ok(self):
        s = ctx.socket(zmq.DEALER); s.linger = 0; s.connect(self.broker)
        s.send_multipart([b"", b"MDPC01", b"echo", b"ping"])
        ok = s.poll(5000) and s.recv_multipart()[-1] == b"ping"
        s.close(); return bool(ok)
    def stats(self, service):
        s = ctx.socket(zmq.DEALER); s.linger = 0; s.connect(self.broker)
        s.send_multipart([b"", b"MDPC01", service.encode(), b"stats.get", b"{}"])
        r = s.recv_multipart() if s.poll(5000) else None
        s.close(); return json.loads(r[-1]) if r else None
    def mmi_stats(self):
        s = ctx.socket(zmq.DEALER); s.linger = 0; s.connect(self.broker)
        s.send_multipart([b"", b"MDPC01", b"mmi.stats"])
        r = s.recv_multipart() if s.poll(5000) else None
        s.close(); return json.loads(r[-1]) if r else None
    def stop(self):
        self.sampling = False
        self.p.terminate(); self.p.wait(20)

def report(name, up, extra=""):
    now = rss(up.p.pid)
    print(f"{name}: RSS {up.before} MB -> peak {up.peak} MB, now {now} MB (+{up.peak - up.before} MB); echo served: {up.echo_ok()} {extra}", flush=True)

def row_clone_slow_subscriber():
    up = Up(["--no-autostart"])
    sub = ctx.socket(zmq.SUB); sub.rcvhwm = 1; sub.setsockopt(zmq.RCVBUF, 4096); sub.subscribe(b""); sub.connect(up.updates)
    time.sleep(0.5)
    col = ctx.socket(zmq.PUB); col.linger = 0; col.sndhwm = 0; col.connect(up.collector); time.sleep(0.5)
    value = b"x" * (256 * 1024)
    for n in range(1500):
        col.send_multipart([f"/slow/k{n % 50}".encode(), (0).to_bytes(8, "big"), os.urandom(16), b"", value])
    time.sleep(5)
    report("clone slow subscriber, 1500 KVSET x 256 KiB", up, json.dumps(up.stats("state")))
    up.stop()

def row_snapshots_never_read():
    up = Up(["--no-autostart"])
    col = ctx.socket(zmq.PUB); col.linger = 0; col.connect(up.collector); time.sleep(0.5)
    for n in range(20):
        col.send_multipart([f"/big/k{n}".encode(), (0).to_bytes(8, "big"), os.urandom(16), b"", b"y" * (1024 * 1024 - 100)])
    time.sleep(2)
    socks = []
    for _ in range(10):
        s = ctx.socket(zmq.DEALER); s.rcvhwm = 1; s.setsockopt(zmq.RCVBUF, 4096); s.connect(up.snapshot)
        s.send_multipart([b"ICANHAZ?", b""]); socks.append(s)
    time.sleep(5)
    report("10 snapshots never read, 20 keys of 1 MiB", up)
    up.stop()

def row_echo_never_read():
    up = Up(["--no-autostart"])
    c = ctx.socket(zmq.DEALER); c.rcvhwm = 1; c.setsockopt(zmq.RCVBUF, 4096); c.sndhwm = 0; c.connect(up.broker)
    body = b"z" * (64 * 1024)
    for _ in range(6000):
        c.send_multipart([b"", b"MDPC01", b"echo", body])
    time.sleep(6)
    peak = up.peak
    c.close(); time.sleep(3)
    report("6000 echo x 64 KiB never read", up, f"(after client left: {rss(up.p.pid)} MB)")
    up.stop()

def row_domogik_year():
    up = Up(["--no-autostart"])
    c = ctx.socket(zmq.DEALER); c.sndhwm = 0; c.connect(up.broker)
    body = b"w" * (128 * 1024)
    for n in range(1500):
        c.send_multipart([b"", b"MDPC01", b"nobody", b"31536000", b"x.get", body])
    time.sleep(4)
    report("1500 Domogik requests x 128 KiB, 1-year timeout, no worker", up, json.dumps({k: v for k, v in up.mmi_stats().items() if k in ("queued_bytes", "dropped", "requests_in_flight")}))
    up.stop()

def row_event_slow_subscriber():
    up = Up(["--no-autostart"])
    sub = ctx.socket(zmq.SUB); sub.rcvhwm = 1; sub.setsockopt(zmq.RCVBUF, 4096); sub.subscribe(b""); sub.connect(up.sub)
    time.sleep(0.5)
    pub = ctx.socket(zmq.PUB); pub.sndhwm = 0; pub.connect(up.pub); time.sleep(0.5)
    ev = b"e" * (256 * 1024)
    for n in range(1500):
        pub.send_multipart([b"slow.event", ev])
    time.sleep(4)
    report("event subscriber never reads, 1500 x 256 KiB", up)
    up.stop()

def row_big_subscriptions():
    up = Up([])
    time.sleep(2)
    up.before = rss(up.p.pid)
    subs = []
    for n in range(8):
        s = ctx.socket(zmq.SUB); s.subscribe(bytes([65 + n]) * (256 * 1024)); s.connect(up.sub); subs.append(s)
    time.sleep(4)
    report("8 subscriptions of 256 KiB", up)
    up.stop()

def row_oversized():
    up = Up(["--no-autostart"])
    c = ctx.socket(zmq.DEALER); c.sndhwm = 0; c.connect(up.broker)
    frame = b"o" * (15 * 1024 * 1024)
    c.send_multipart([b"", b"MDPC01", b"echo"] + [frame] * 10)
    time.sleep(4)
    report("one message of 10 frames x 15 MiB", up)
    up.stop()

def row_names():
    up = Up(["--no-autostart"])
    c = ctx.socket(zmq.DEALER); c.sndhwm = 0; c.connect(up.broker)
    t = time.time()
    for n in range(100000):
        c.send_multipart([b"", b"MDPC01", f"svc-{n}".encode(), b"x"])
    c.send_multipart([b"", b"MDPC01", b"mmi.service", b"svc-0"]); c.poll(60000); c.recv_multipart()
    # a new worker
    w = ctx.socket(zmq.DEALER); w.linger = 0; w.connect(up.broker)
    w.send_multipart([b"", b"MDPW01", b"\x01", b"fresh"])
    time.sleep(0.5)
    s = ctx.socket(zmq.DEALER); s.connect(up.broker)
    s.send_multipart([b"", b"MDPC01", b"mmi.service", b"fresh"]); s.poll(5000)
    ans = s.recv_multipart()[-1]
    st = up.mmi_stats()
    report("100,000 distinct service names", up, f"fresh worker registered: {ans} evicted {st.get('services_evicted')} services {len(st['services'])}")
    up.stop()

def row_clone_big_values():
    up = Up(["--no-autostart"])
    col = ctx.socket(zmq.PUB); col.linger = 0; col.connect(up.collector); time.sleep(0.5)
    for n in range(100):
        col.send_multipart([f"/huge/k{n}".encode(), (0).to_bytes(8, "big"), os.urandom(16), b"", b"v" * (1024 * 1024 - 200)])
    time.sleep(4)
    report("100 Clone keys of 1 MiB", up, json.dumps(up.stats("state")))
    up.stop()

ROWS = {f.__name__[4:]: f for f in [row_clone_slow_subscriber, row_snapshots_never_read, row_echo_never_read,
        row_domogik_year, row_event_slow_subscriber, row_big_subscriptions, row_oversized, row_names, row_clone_big_values]}

def limit_clone_slow_subscriber():
    up = Up(["--no-autostart"])
    sub = ctx.socket(zmq.SUB); sub.rcvhwm = 1; sub.setsockopt(zmq.RCVBUF, 4096); sub.subscribe(b""); sub.connect(up.updates)
    time.sleep(0.5)
    col = ctx.socket(zmq.PUB); col.linger = 0; col.sndhwm = 0; col.connect(up.collector); time.sleep(0.5)
    value = b"x" * (60 * 1024)
    for n in range(3000):
        col.send_multipart([f"/slow/k{n % 50}".encode(), (0).to_bytes(8, "big"), os.urandom(16), b"", value])
        if n % 500 == 0: time.sleep(0.2)
    time.sleep(5)
    report("AT LIMIT clone slow subscriber, 3000 KVSET x 60 KiB", up, json.dumps({k: v for k, v in up.stats("state").items() if k in ("bytes", "updates", "keys")}))
    up.stop()

def limit_snapshots_never_read():
    up = Up(["--no-autostart"])
    col = ctx.socket(zmq.PUB); col.linger = 0; col.sndhwm = 0; col.connect(up.collector); time.sleep(0.5)
    for n in range(1000):
        col.send_multipart([f"/big/k{n}".encode(), (0).to_bytes(8, "big"), os.urandom(16), b"", b"y" * (60 * 1024)])
        if n % 200 == 0: time.sleep(0.2)
    time.sleep(3)
    up.before = rss(up.p.pid); up.peak = up.before
    socks = []
    for _ in range(20):
        s = ctx.socket(zmq.DEALER); s.rcvhwm = 1; s.setsockopt(zmq.RCVBUF, 4096); s.connect(up.snapshot)
        s.send_multipart([b"ICANHAZ?", b""]); socks.append(s)
    time.sleep(5)
    report("AT LIMIT 20 snapshots never read, 1000 keys of 60 KiB (RSS before = with the keys)", up, json.dumps({k: v for k, v in up.stats("state").items() if k in ("bytes", "keys", "snapshots_pending", "dropped")}))
    up.stop()

def limit_state_full():
    up = Up(["--no-autostart"])
    col = ctx.socket(zmq.PUB); col.linger = 0; col.sndhwm = 0; col.connect(up.collector); time.sleep(0.5)
    for n in range(2000):
        col.send_multipart([f"/full/k{n}".encode(), (0).to_bytes(8, "big"), os.urandom(16), b"", b"v" * (60 * 1024)])
        if n % 200 == 0: time.sleep(0.2)
    time.sleep(4)
    st = up.stats("state")
    report("AT LIMIT 2000 Clone keys of 60 KiB", up, json.dumps({"bytes": st["bytes"], "keys": st["keys"], "state_full": st["dropped"]["state_full"]}))
    up.stop()

def limit_event_slow_subscriber():
    up = Up(["--no-autostart"])
    sub = ctx.socket(zmq.SUB); sub.rcvhwm = 1; sub.setsockopt(zmq.RCVBUF, 4096); sub.subscribe(b""); sub.connect(up.sub)
    time.sleep(0.5)
    pub = ctx.socket(zmq.PUB); pub.sndhwm = 0; pub.connect(up.pub); time.sleep(0.5)
    ev = b"e" * (120 * 1024)
    for n in range(1500):
        pub.send_multipart([b"slow.event", ev])
    time.sleep(4)
    report("AT LIMIT event subscriber never reads, 1500 x 120 KiB", up)
    up.stop()

for f in [limit_clone_slow_subscriber, limit_snapshots_never_read, limit_state_full, limit_event_slow_subscriber]:
    ROWS[f.__name__] = f

for name in (sys.argv[1:] or ROWS):
    ROWS[name]()
