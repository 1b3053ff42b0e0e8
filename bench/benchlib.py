"""Shared helpers for bench/slowloris.py and bench/idle_conns.py (stdlib only).

Servers are given the way ../shared/bench/compare takes them: NAME='CMD' with
{port} and {rackup} substituted. Each server is started in its own session
(setsid) through `bash -c 'ulimit -n ...; exec CMD'`, so the pid we hold is the
server process itself (bash execs into it); it is stopped by that pid / its
process group, never by name. All traffic goes to 127.0.0.1.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SHARED", os.path.join(os.path.dirname(REPO), "shared"))
DEFAULT_SERVERS = [
    "puma=puma -t 5:5 -b tcp://127.0.0.1:{port} {rackup}",
    "hyperion=bin/hyperion -t 5 -b 127.0.0.1 -p {port} {rackup}",
]
SHELLS = {"bash", "sh", "dash", "env", "timeout", "setsid"}


def parse_servers(specs):
    out = []
    for spec in specs or DEFAULT_SERVERS:
        if "=" not in spec:
            sys.exit(f"bad server spec {spec!r}: expected NAME='CMD with {{port}} {{rackup}}'")
        name, cmd = spec.split("=", 1)
        out.append((name, cmd))
    return out


def raise_nofile(want):
    """Raise our RLIMIT_NOFILE soft limit towards `want`; returns the new soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cap_connections(n):
    """Raise our fd limit for n sockets; returns n, capped (with a note) when the hard limit is lower."""
    soft, hard = raise_nofile(n + 200)
    if soft < n + 100:
        print(f"note: RLIMIT_NOFILE hard limit is {hard} < n+100={n + 100}; capping n to {soft - 100}")
        return max(1, soft - 100)
    return n


def run_servers(servers, rackup, measure):
    """Starts each NAME='CMD' server in turn, calls measure(srv) while it runs,
    stops it; yields (name, result, still_alive). A server that does not start
    is reported as FAILED and skipped."""
    for name, cmd in parse_servers(servers):
        srv = Server(name, cmd, rackup)
        try:
            srv.start()
        except RuntimeError as e:
            print(f"{name} FAILED: {e}")
            continue
        try:
            result = measure(srv)
            alive = srv.proc.poll() is None
        finally:
            srv.stop()
        yield name, result, alive


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Server:
    """One server process: start(), pid, rss_kb(), stop()."""

    def __init__(self, name, cmd, rackup, nofile=65536, boot_timeout=60):
        self.name, self.rackup = name, rackup
        self.port = free_port()
        self.cmd = cmd.replace("{port}", str(self.port)).replace("{rackup}", rackup)
        self.nofile, self.boot_timeout = nofile, boot_timeout
        self.proc = None
        self.pid = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)

    def start(self):
        # As root without CAP_SYS_RESOURCE (containers) the hard limit cannot be
        # raised: fall back to the hard limit.
        wrapper = (f"ulimit -n {self.nofile} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; "
                   f"exec {self.cmd}")
        self.proc = subprocess.Popen(["bash", "-c", wrapper], cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + self.boot_timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: server did not open port {self.port}; log tail:\n"
                                   + self.log_tail())
            time.sleep(0.2)
        self.pid = self._server_pid(self.proc.pid)
        return self

    @staticmethod
    def _server_pid(pid):
        # bash execs into CMD, so pid normally is the server; if CMD itself is a
        # shell wrapper, descend to its (first) child.
        for _ in range(5):
            try:
                comm = open(f"/proc/{pid}/comm").read().strip()
                children = open(f"/proc/{pid}/task/{pid}/children").read().split()
            except OSError:
                return pid
            if comm in SHELLS and children:
                pid = int(children[0])
            else:
                return pid
        return pid

    def log_tail(self, n=5):
        try:
            with open(self.log.name, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def status_kb(self, field):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, TypeError):
            pass
        return None

    def rss_kb(self):
        return self.status_kb("VmRSS")

    def nofile_limit(self):
        try:
            with open(f"/proc/{self.pid}/limits") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        return int(line.split()[3])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            self._cleanup()
            return
        pgid = self.proc.pid  # setsid: the group we created, led by our child
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        self._cleanup()

    def _cleanup(self):
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def to_ms(v):
    m = re.match(r"^([\d.]+)(us|ms|s|m)$", v or "")
    if not m:
        return None
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000, "m": x * 60000}[m.group(2)]


def parse_wrk(out):
    r = {"rps": 0.0, "p50": None, "p99": None, "requests": 0, "errors": 0, "err_detail": ""}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        r["requests"] = int(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            r[key] = to_ms(m.group(1))
    detail = []
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        c, rd, w, t = map(int, m.groups())
        r["errors"] += c + rd + w + t
        detail.append(f"connect={c},read={rd},write={w},timeout={t}")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["errors"] += int(m.group(1))
        detail.append(f"non2xx={m.group(1)}")
    r["err_detail"] = ";".join(detail) or "none"
    return r


def wrk_args(port, conns=50, duration=10, path="/", script=None, latency=True):
    args = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s"]
    if latency:
        args.append("--latency")
    if script:
        args += ["-s", script]
    return args + [f"http://127.0.0.1:{port}{path}"]


def fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def ratio(a, b):
    return "n/a" if not a or not b else f"{a / b:.2f}"
