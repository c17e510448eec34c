#!/usr/bin/env python3
"""Benchmark trop.py against a floor measured in the same run.

Run from anywhere (standard library only, Python 3.8+):

    python3 tools/bench.py            # full run (P4 dominates: 1-3 minutes)
    python3 tools/bench.py --quick    # fewer repetitions (P4 once: ~30 s on 2 CPUs)
    python3 tools/bench.py --json     # also emit machine-readable results:
                                      # JSON on stdout, the text report on stderr

Every CLI figure runs ``<this interpreter> -m trop ...`` with the repository
root as working directory, a temporary ``--data-dir`` and a temporary HOME.
The *floor* is the same interpreter running ``-c "import sqlite3"``: the
cheapest process that could possibly do trop's job.  Figures are medians and
are reported as ratios against the floor, so they compare across machines:

    P1  reserve refresh of an existing key, 1,000 rows        <= 1.3x floor
    P2  reserve of a new key, 10,000 rows, range 1024-65535   <= 1.5x floor
    P3  list --format json, 10,000 rows                       <= 2.5x floor
    P4  16 processes x 50 sequential reserves (wall time)     <= 1.25x the same
                                                                 run of floors
    P5  Python API Trop.reserve() per call                    <= 4x a raw sqlite3
                                                                 BEGIN IMMEDIATE /
                                                                 INSERT / COMMIT
    P6  scan --min 5000 --max 7000                            <= 0.5 s absolute
    P7  Python API lease acquire + release (Trop.reserve with  <= 10x P5's floor
        holder=, Trop.release with holder=) per pair
    P8  `trop mcp` start-up until it answers server/discover   <= 1.5x floor
    P9  one tools/call reserve (a refresh) in a running server <= 0.1x P1 (the same
                                                                 refresh as a command)

P1-P3 are measured three ways: with a bytecode cache (the normal case), cold
(a fresh copy of trop.py, PYTHONDONTWRITEBYTECODE=1, no __pycache__: every
call compiles the module) and as the README's zipapp (trop.pyz with the
bytecode it bundles).  The zipapp has the same target as the cached figure;
the cold figure is reported to show what a missing cache costs.

P0 (informative, no target) justifies trop.py's import policy: for each module
trop.py imports at the top, whether a command line has loaded it anyway (the
interpreter's start-up, or argparse, which every command line builds); for each
module it imports only where used, its median cumulative import cost
(``-X importtime``) in a fresh interpreter.

Large databases are seeded by letting trop create its schema once
(``trop --data-dir D list``) and then inserting rows directly with sqlite3.

Exit status: 0 even when a target is missed (the line says MISS); 1 when a
measured command fails (its command line and stderr are printed).

Environment: TROP_BENCH_MODULE names the module to run instead of ``trop``
(e.g. a stub on PYTHONPATH, to check this script itself).  Other TROP_*
variables are removed from the children's environment.  Bytecode is cached in
a temporary PYTHONPYCACHEPREFIX, so nothing is written into the repository.
"""

import argparse
import json
import os
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.environ.get("TROP_BENCH_MODULE", "trop")
PY = sys.executable

WIDE = ["--min", "1024", "--max", "65535"]


class CommandFailed(Exception):
    def __init__(self, cmd, proc):
        super().__init__(cmd)
        self.cmd = cmd
        self.proc = proc


class Bench:
    """Holds the temporary world the children run in, and the timers."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.home = os.path.join(tmp, "home")
        os.mkdir(self.home)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TROP_")}
        env.pop("USERPROFILE", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["HOME"] = self.home
        env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
        self.env = env
        self._dirs = 0

    # -- processes --------------------------------------------------------

    def run(self, argv, check=True, cwd=None, env=None):
        """Run argv in the repo root (or cwd); return (seconds, CompletedProcess)."""
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd or REPO, env=env or self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t0
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc)
        return elapsed, proc

    def trop(self, data_dir, *args):
        return [PY, "-m", MODULE, "--data-dir", data_dir] + list(args)

    def copy_module(self, name):
        """A new directory tmp/NAME holding a fresh copy of trop.py; returns the copy's path."""
        directory = os.path.join(self.tmp, name)
        os.mkdir(directory)
        copy = os.path.join(directory, MODULE + ".py")
        with open(os.path.join(REPO, MODULE + ".py"), "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read())
        return copy

    def cold_copy(self):
        """A directory holding a fresh trop.py, and an environment in which nothing caches its bytecode."""
        directory = os.path.dirname(self.copy_module("cold"))
        env = dict(self.env, PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPYCACHEPREFIX", None)
        return directory, env

    def zipapp(self):
        """trop.pyz built by the README's recipe: trop.py and its bytecode for this interpreter."""
        source = self.copy_module("pyz")
        target = os.path.join(self.tmp, "trop.pyz")
        for argv in ([PY, "-m", "compileall", "-q", "-b", source],
                     [PY, "-m", "zipapp", os.path.dirname(source), "-m", MODULE + ":cli", "-o", target]):
            self.run(argv)
        return target

    def median_time_in(self, make_argv, reps, cwd, env):
        """median_time for commands run in cwd with env (one warm-up: a cold run has nothing to warm)."""
        self.run(make_argv(-1), cwd=cwd, env=env)
        return statistics.median(self.run(make_argv(i), cwd=cwd, env=env)[0] for i in range(reps))

    def mcp_session(self, data_dir, calls):
        """Start `-m trop mcp`, ask server/discover, then make `calls` reserve calls (a refresh of one key):
        (seconds until the first answer, median seconds per tool call)."""
        meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.trop(data_dir, "mcp"), cwd=REPO, env=self.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def ask(n, method, params):
            proc.stdin.write((json.dumps({"jsonrpc": "2.0", "id": n, "method": method,
                                          "params": dict(params, _meta=meta)}) + "\n").encode())
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            if "error" in answer or answer["result"].get("isError"):
                raise CommandFailed(self.trop(data_dir, "mcp"), proc)
        try:
            ask(0, "server/discover", {})
            first = time.perf_counter() - t0
            costs = []
            for n in range(1, calls + 1):
                t1 = time.perf_counter()
                ask(n, "tools/call", {"name": "reserve", "arguments": {"path": "/bench/mcp",
                                                                       "allow_unrelated_path": True}})
                costs.append(time.perf_counter() - t1)
        finally:
            proc.stdin.close()
            proc.wait()
        return first, statistics.median(costs[1:] or costs)

    def floor_cmd(self):
        return [PY, "-c", "import sqlite3"]

    def median_time(self, make_argv, reps, warmup=2):
        """Median wall time of make_argv(i) over reps runs (after warm-up)."""
        for i in range(warmup):
            self.run(make_argv(-1 - i))
        return statistics.median(self.run(make_argv(i))[0] for i in range(reps))

    def parallel_wall(self, make_argv, workers, per_worker):
        """Wall time of `workers` threads each running per_worker commands in turn."""
        failures = []

        def work(w):
            for j in range(per_worker):
                argv = make_argv(w, j)
                try:
                    self.run(argv)
                except CommandFailed as exc:
                    failures.append(exc)
                    return

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        if failures:
            raise failures[0]
        return elapsed

    # -- databases --------------------------------------------------------

    def new_data_dir(self, rows=0, first_port=5000):
        """A data dir whose trop.db has trop's schema plus `rows` seeded rows."""
        self._dirs += 1
        data_dir = os.path.join(self.tmp, "data%02d" % self._dirs)
        os.mkdir(data_dir)
        db = os.path.join(data_dir, "trop.db")
        self.run(self.trop(data_dir, "list"))  # trop creates its own schema
        if not os.path.exists(db):             # fall back to an explicit init
            self.run(self.trop(data_dir, "init"))
        if not os.path.exists(db):
            raise SystemExit("bench: neither `%s list` nor `%s init` created %s"
                             % (MODULE, MODULE, db))
        if rows:
            now = int(time.time())
            con = sqlite3.connect(db, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany(
                    "INSERT INTO reservations (path, tag, port, project, task,"
                    " created_at, last_used_at) VALUES (?, '', ?, NULL, NULL, ?, ?)",
                    (("/bench/p%05d" % i, first_port + i, now, now) for i in range(rows)))
                con.execute("COMMIT")
            finally:
                con.close()
        return data_dir


# P0: what a command line has loaded before trop's own imports run.
P0_LOADED = r'''
import sys
import argparse
print(" ".join(sorted(sys.modules)))
'''
P0_TOP = ("codecs", "errno", "io", "os", "re", "stat", "sys", "time", "bisect", "collections")
P0_LAZY = ("argparse", "json", "sqlite3", "socket", "subprocess", "shutil", "pwd", "threading", "fcntl",
           "urllib.parse", "http.client", "ctypes", "traceback")


def import_cost_ms(module, reps):
    """Median cumulative import time of module in a fresh interpreter (its line of -X importtime)."""
    costs = []
    for _ in range(reps):
        proc = subprocess.run([PY, "-X", "importtime", "-c", "import " + module], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, universal_newlines=True)
        for line in proc.stderr.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and fields[2] == module:
                costs.append(int(fields[1]) / 1000.0)
    return statistics.median(costs) if costs else float("nan")


# Runs in a child process (cwd = repo root) so the module is found exactly as
# `-m trop` finds it.  Prints one JSON object.
P5_CHILD = r'''
import importlib, json, os, sqlite3, statistics, sys, time
cfg = json.loads(sys.argv[1])
mod = importlib.import_module(cfg["module"])
if not callable(getattr(mod, "reserve", None)):
    print(json.dumps({"skipped": "no Python API"}))
    sys.exit(0)
data_dir, batches, per_batch = cfg["data_dir"], cfg["batches"], cfg["per_batch"]
lo, hi = cfg["min"], cfg["max"]

options = dict(data_dir=data_dir, allow_unrelated_path=True, skip_occupancy_check=True, min=lo, max=hi)
if hasattr(mod, "Trop"):                # the reusable handle: one connection, config resolved once
    handle = mod.Trop(**options)

    def api(i):
        handle.reserve("/bench/api/p%06d" % i)
else:
    def api(i):
        mod.reserve(path="/bench/api/p%06d" % i, **options)

for i in range(3):                      # warm-up; also creates trop.db
    api(1000000 - 1 - i)

# Raw floor: the same schema, read back from trop's own database.
db = os.path.join(data_dir, "trop.db")
ddl = []
if os.path.exists(db):
    src = sqlite3.connect(db)
    ddl = [r[0] for r in src.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'"
        " ORDER BY rowid")]
    src.close()
if not any("reservations" in s for s in ddl):
    strict = " STRICT" if sqlite3.sqlite_version_info >= (3, 37, 0) else ""
    ddl = ["CREATE TABLE reservations (path TEXT NOT NULL, tag TEXT NOT NULL,"
           " port INTEGER NOT NULL UNIQUE, project TEXT, task TEXT,"
           " created_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL,"
           " PRIMARY KEY (path, tag))" + strict]
raw = sqlite3.connect(cfg["raw_db"], isolation_level=None)
raw.execute("PRAGMA journal_mode = WAL")
raw.execute("PRAGMA synchronous = NORMAL")
raw.execute("PRAGMA busy_timeout = 5000")
for stmt in ddl:
    raw.execute(stmt)

def raw_insert(i):
    now = int(time.time())
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("INSERT INTO reservations (path, tag, port, project, task, created_at,"
                " last_used_at) VALUES (?, '', ?, NULL, NULL, ?, ?)",
                ("/bench/raw/p%06d" % i, lo + i, now, now))
    raw.execute("COMMIT")

api_ms, raw_ms, k = [], [], 0
for b in range(batches):                # interleaved so drift hits both alike
    t0 = time.perf_counter()
    for j in range(per_batch):
        api(k + j)
    api_ms.append((time.perf_counter() - t0) * 1000 / per_batch)
    t0 = time.perf_counter()
    for j in range(per_batch):
        raw_insert(k + j)
    raw_ms.append((time.perf_counter() - t0) * 1000 / per_batch)
    k += per_batch
raw.close()
lease_ms = None
if hasattr(mod, "Holder"):              # P7: a lease taken and released (two transactions, the holder checked)
    me, lease_ms = os.getpid(), []
    for b in range(batches):
        t0 = time.perf_counter()
        for j in range(per_batch):
            handle.reserve("/bench/lease", "t", holder=me)
            handle.release("/bench/lease", "t", holder=me)
        lease_ms.append((time.perf_counter() - t0) * 1000 / per_batch)
    lease_ms = statistics.median(lease_ms)
print(json.dumps({"api_ms": statistics.median(api_ms), "raw_ms": statistics.median(raw_ms),
                  "lease_ms": lease_ms, "ops": batches * per_batch}))
'''


def verdict(ok):
    return "OK" if ok else "MISS"


def fmt_target(x):
    return ("%g" % x)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark trop.py (figures P0-P6).")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true",
                    help="print JSON results on stdout (text report goes to stderr)")
    opts = ap.parse_args(argv)

    out = sys.stderr if opts.json else sys.stdout

    def say(line):
        print(line, file=out, flush=True)

    if opts.quick:
        floor_reps, reps, par_reps, p5_batches, p5_per, scan_reps = 10, 7, 1, 3, 10, 2
    else:
        floor_reps, reps, par_reps, p5_batches, p5_per, scan_reps = 30, 25, 3, 5, 40, 7

    results = {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "executable": PY,
        "sqlite": sqlite3.sqlite_version,
        "module": MODULE,
        "quick": opts.quick,
        "cpus": os.cpu_count(),
        "figures": [],
    }

    def figure(fid, label, value, unit, ratio, target, floor_value=None, extra=""):
        if ratio is None:          # absolute figure
            ok = value <= target
            say("%s %s: %s %s (target <= %s %s) %s"
                % (fid, label, fmt_value(value, unit), unit, fmt_target(target), unit,
                   verdict(ok)))
        elif target is None:       # informative
            ok = True
            say("%s %s: %s %s = %.2fx floor (no target)%s"
                % (fid, label, fmt_value(value, unit), unit, ratio, ("  [" + extra + "]") if extra else ""))
        else:
            ok = ratio <= target
            say("%s %s: %s %s = %.2fx floor (target <= %sx) %s%s"
                % (fid, label, fmt_value(value, unit), unit, ratio, fmt_target(target),
                   verdict(ok), ("  [" + extra + "]") if extra else ""))
        results["figures"].append({
            "id": fid, "label": label, "value": round(value, 6), "unit": unit,
            "ratio": None if ratio is None else round(ratio, 4),
            "floor": None if floor_value is None else round(floor_value, 6),
            "target": target, "ok": ok})

    with tempfile.TemporaryDirectory(prefix="trop-bench-") as tmp:
        b = Bench(tmp)
        try:
            say("trop bench: python %s, sqlite %s, module %s, %s CPUs%s"
                % (results["python"], results["sqlite"], MODULE, results["cpus"],
                   ", quick" if opts.quick else ""))

            # P0: the import policy's evidence.
            loaded = set(subprocess.run([PY, "-c", P0_LOADED], stdout=subprocess.PIPE,
                                        universal_newlines=True).stdout.split())
            top = ", ".join("%s%s" % (m, "" if m in loaded else " (NOT loaded)") for m in P0_TOP)
            say("P0 top-level imports, loaded by start-up or argparse anyway: %s" % top)
            costs = [(m, import_cost_ms(m, 3 if opts.quick else 9)) for m in P0_LAZY]
            say("P0 imported where used (cumulative ms): %s"
                % ", ".join("%s %.2f" % (m, c) for m, c in costs))
            results["p0"] = {"top_not_loaded": [m for m in P0_TOP if m not in loaded],
                             "lazy_ms": {m: round(c, 3) for m, c in costs}}

            # Floor.
            floor = b.median_time(lambda i: b.floor_cmd(), floor_reps, warmup=3)
            results["floor_ms"] = round(floor * 1000, 3)
            say('Floor: python -c "import sqlite3": %.1f ms (median of %d)'
                % (floor * 1000, floor_reps))

            # P1: refresh of an existing key, 1k rows.
            d1k = b.new_data_dir(rows=1000, first_port=5000)
            p1_cmd = b.trop(d1k, "reserve", "--path", "/bench/p00000",
                            "--allow-unrelated-path", "--skip-occupancy-check")
            _, proc = b.run(p1_cmd)
            if proc.stdout.strip() != b"5000":
                say("note: P1 refresh printed %r, expected the seeded port 5000"
                    % proc.stdout.strip().decode(errors="replace"))
            t = p1 = b.median_time(lambda i: p1_cmd, reps)
            figure("P1", "reserve refresh (1k rows)", t * 1000, "ms", t / floor, 1.3,
                   floor * 1000)

            # P2: a new key each run, 10k rows (seeded at the bottom of the range).
            d10k = b.new_data_dir(rows=10000, first_port=1024)
            t = b.median_time(
                lambda i: b.trop(d10k, "reserve", "--path", "/bench/new/n%05d" % (i + 100),
                                 "--allow-unrelated-path", "--skip-occupancy-check", *WIDE),
                reps)
            figure("P2", "reserve new (10k rows)", t * 1000, "ms", t / floor, 1.5,
                   floor * 1000)

            # P3: list --format json, 10k rows.
            t = b.median_time(lambda i: b.trop(d10k, "list", "--format", "json"), reps)
            figure("P3", "list --format json (10k rows)", t * 1000, "ms", t / floor, 2.5,
                   floor * 1000)

            # P1-P3 without a bytecode cache, and from the zipapp with its bundled bytecode.
            cold_dir, cold_env = b.cold_copy()
            pyz = b.zipapp()
            variants = (("cold", lambda argv: argv, cold_dir, cold_env, None),
                        ("zipapp", lambda argv: [PY, pyz] + argv[3:], None, None, (1.3, 1.5, 2.5)))
            for name, shape, cwd, env, targets in variants:
                cases = (("P1", "reserve refresh (1k rows)", lambda i: p1_cmd),
                         ("P2", "reserve new (10k rows)", lambda i: b.trop(
                             d10k, "reserve", "--path", "/bench/%s/n%05d" % (name, i + 100), "--allow-unrelated-path",
                             "--skip-occupancy-check", *WIDE)),
                         ("P3", "list --format json (10k rows)", lambda i: b.trop(d10k, "list", "--format", "json")))
                for index, (fid, label, make) in enumerate(cases):
                    t = b.median_time_in(lambda i: shape(make(i)), reps, cwd, env)
                    target = targets[index] if targets else None
                    figure(fid + ("c" if name == "cold" else "z"), "%s, %s" % (label, name), t * 1000, "ms",
                           t / floor, target, floor * 1000)

            # P4: 16 parallel processes x 50 sequential reserves vs the same of floors.
            workers, per = 16, 50
            walls, floors = [], []
            for r in range(par_reps):
                dpar = b.new_data_dir()
                floors.append(b.parallel_wall(lambda w, j: b.floor_cmd(), workers, per))
                walls.append(b.parallel_wall(
                    lambda w, j: b.trop(dpar, "reserve", "--path",
                                        "/bench/par/w%02d/r%03d" % (w, j),
                                        "--allow-unrelated-path", "--skip-occupancy-check",
                                        *WIDE),
                    workers, per))
                rows = _count_rows(os.path.join(dpar, "trop.db"))
                if rows is not None and rows != workers * per:
                    say("note: P4 run %d left %d rows, expected %d" % (r, rows, workers * per))
            wall, pfloor = statistics.median(walls), statistics.median(floors)
            figure("P4", "%d parallel x %d reserves" % (workers, per), wall, "s",
                   wall / pfloor, 1.25, pfloor,
                   extra="floor: %d x %d 'import sqlite3' = %.2f s" % (workers, per, pfloor))

            # P5: Python API cost per reservation vs raw sqlite3 transactions.
            dapi = os.path.join(tmp, "api")
            os.mkdir(dapi)
            cfg = {"module": MODULE, "data_dir": dapi, "raw_db": os.path.join(tmp, "raw.db"),
                   "batches": p5_batches, "per_batch": p5_per, "min": 1024, "max": 65535}
            _, proc = b.run([PY, "-c", P5_CHILD, json.dumps(cfg)])
            p5 = json.loads(proc.stdout.decode().strip().splitlines()[-1])
            if "skipped" in p5:
                say("P5 skipped: no Python API")
                results["figures"].append({"id": "P5", "skipped": p5["skipped"]})
            else:
                figure("P5", "API reserve per call", p5["api_ms"], "ms",
                       p5["api_ms"] / p5["raw_ms"], 4, p5["raw_ms"],
                       extra="floor: raw sqlite3 BEGIN IMMEDIATE/INSERT/COMMIT = %.3f ms"
                             % p5["raw_ms"])
                if p5.get("lease_ms") is not None:
                    figure("P7", "API lease acquire + release", p5["lease_ms"], "ms",
                           p5["lease_ms"] / p5["raw_ms"], 10, p5["raw_ms"],
                           extra="two transactions and a holder check; floor as P5")

            # P8/P9: the MCP server: start-up to its first answer, and a tool call inside it.
            dmcp = b.new_data_dir(rows=1000, first_port=5000)
            firsts, calls = zip(*[b.mcp_session(dmcp, 20) for _ in range(p5_batches)])
            figure("P8", "mcp start-up to its first answer", statistics.median(firsts), "s",
                   statistics.median(firsts) / floor, 1.5, floor, extra="floor: 'import sqlite3'")
            call_ms = statistics.median(calls) * 1000
            figure("P9", "mcp tools/call reserve (refresh)", call_ms, "ms", call_ms / (p1 * 1000), 0.1, p1 * 1000,
                   extra="floor: P1, the same refresh as a command (a tool call reads the configuration and "
                         "opens the database again, without starting a process)")

            # P6: scan wall time, absolute.
            t = b.median_time(lambda i: b.trop(d1k, "scan", "--min", "5000", "--max", "7000"),
                              scan_reps, warmup=1)
            figure("P6", "scan --min 5000 --max 7000", t, "s", None, 0.5)

        except CommandFailed as exc:
            say("bench: command failed (exit %d): %s"
                % (exc.proc.returncode, shlex.join(exc.cmd)))
            sys.stderr.write(exc.proc.stderr.decode(errors="replace"))
            sys.stderr.flush()
            return 1

    if opts.json:
        print(json.dumps(results, indent=2))
    return 0


def fmt_value(value, unit):
    if unit == "s":
        return "%.2f" % value if value >= 0.1 else "%.3f" % value
    return "%.1f" % value if value >= 1 else "%.3f" % value


def _count_rows(db):
    try:
        con = sqlite3.connect(db)
        try:
            return con.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return None


if __name__ == "__main__":
    sys.exit(main())
