"""Tests for trop.py, in the order of its sections: errors and exit codes; the YAML reader and the
exclusion writer; configuration (schema, layers, validate, exclude, compact-exclusions); paths and git
inference; the reservation models; the SQLite store (schema v2, v1 -> v2 migration, corruption, unsupported
schemas); occupancy (probes, socket owners, scan, port-info); allocation; the operations (cleanup rules,
reserve and release, reservation groups and `trop run`, the cleanup commands and migrate, the Python API and
its pytest plugin); output formats; packaging (the PEP 517 backend, pip install, zipapp); shell completions;
every command of the command line with its options, environment variables and exact output; multi-process
and multi-thread concurrency; and the README's commands and examples.

Unit tests call the library (``import trop``); the others run ``python -m trop`` (or the library) in a
temporary tree with its own HOME and data directory (see TropTestCase).  Run them from the directory holding
trop.py with ``python3 -m unittest -v``; ``TROP_STRESS=1`` adds the stress tests.
"""

import argparse
import ast
import atexit
import base64
import calendar
import collections
import configparser
import contextlib
import copy
import ctypes
import csv
import email.parser
import errno
import hashlib
import http.client
import http.server
import importlib.util
import io
import json
import math
import os
import pathlib
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
import unittest
import zipfile
from unittest import mock

import trop

try:
    import pwd                  # POSIX only: the tests that need it skip elsewhere
except ImportError:
    pwd = None

TROP_DIR = os.path.dirname(os.path.abspath(trop.__file__))
STRESS = os.environ.get("TROP_STRESS") == "1"        # gates the stress tests
TIMEOUT = 180                                         # seconds a child process may take by default
LINUX_PROC = os.path.isdir("/proc/net") and os.path.exists("/proc/self/comm")
DAY = 86400
SKIP_PROBES = {"TROP_SKIP_OCCUPANCY_CHECK": "1"}
POSIX_ONLY = unittest.skipUnless(os.name == "posix", "needs POSIX: signals, permission bits or sh")

# 2024-01-15 10:30:45 UTC and 2024-02-01 00:00:00 UTC
T1 = calendar.timegm((2024, 1, 15, 10, 30, 45))
T2 = calendar.timegm((2024, 2, 1, 0, 0, 0))
S1 = "2024-01-15 10:30:45"
S2 = "2024-02-01 00:00:00"

# The reference's schema v2 (contract B 6.1), written as the reference writes it.
V2_METADATA_SQL = "CREATE TABLE metadata (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) STRICT"
V2_RESERVATIONS_SQL = (
    "CREATE TABLE reservations (path TEXT NOT NULL, tag TEXT NOT NULL, port INTEGER NOT NULL UNIQUE "
    "CONSTRAINT valid_port CHECK (port BETWEEN 1 AND 65535), project TEXT, task TEXT, created_at INTEGER "
    "NOT NULL CONSTRAINT valid_created_at CHECK (created_at >= 0), last_used_at INTEGER NOT NULL "
    "CONSTRAINT valid_last_used_at CHECK (last_used_at >= 0), PRIMARY KEY (path, tag)) STRICT")
INDEX_SQL = (
    "CREATE INDEX idx_reservations_port ON reservations(port)",
    "CREATE INDEX idx_reservations_project ON reservations(project)",
    "CREATE INDEX idx_reservations_last_used ON reservations(last_used_at)",
)
INDEX_NAMES = {"idx_reservations_port", "idx_reservations_project", "idx_reservations_last_used"}
# Schema v1 (contract B 6.2), as published by trop 0.1.0.
V1_SQL = (
    "CREATE TABLE metadata (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    "CREATE TABLE reservations (path TEXT NOT NULL, tag TEXT, port INTEGER NOT NULL UNIQUE, project TEXT, "
    "task TEXT, created_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL, PRIMARY KEY (path, tag))",
) + INDEX_SQL
COLUMNS = "path, tag, port, project, task, created_at, last_used_at"
LOCK_TIMEOUT_1S = "Error: database lock timeout while starting an immediate database transaction after 1s\n"
WIDE = ("--min", "20000", "--max", "40000", "--skip-occupancy-check", "--allow-unrelated-path")   # any path, no probes


# --- Helpers -----------------------------------------------------------------

_PYCACHE = []


def _pycache_dir():
    """One temporary bytecode cache for every child process of this run (nothing is written next to trop.py)."""
    if not _PYCACHE:
        _PYCACHE.append(tempfile.mkdtemp(prefix="trop-test-pycache-"))
        atexit.register(shutil.rmtree, _PYCACHE[0], True)
        if sys.version_info < (3, 8):       # no PYTHONPYCACHEPREFIX: children import a copy of trop.py kept here
            shutil.copy(os.path.join(TROP_DIR, "trop.py"), _PYCACHE[0])
    return _PYCACHE[0]


def updated(env, values):
    """A copy of env with values set; a value None removes the variable."""
    env = dict(env)
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def clean_env(**values):
    """The inherited environment without TROP_* variables or a shell's own (ZSH_VERSION, FISH_VERSION,
    PSModulePath), with SHELL=/bin/bash, UTF-8 standard streams and PYTHONPATH = trop.py's directory (before Python 3.8,
    _pycache_dir()'s copy of trop.py), plus the given values (None removes one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TROP_") and k not in ("PYTHONDONTWRITEBYTECODE", "ZSH_VERSION", "FISH_VERSION",
                                                      "PSModulePath")}
    env.update(PYTHONPATH=TROP_DIR if sys.version_info >= (3, 8) else _pycache_dir(),
               PYTHONPYCACHEPREFIX=_pycache_dir(), PYTHONIOENCODING="utf-8",
               SHELL="/bin/bash")
    return updated(env, values)


def spawn(argv, cwd=None, env=None):
    """Start a program with UTF-8 text streams and no standard input."""
    return subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")


def popen(args, cwd=None, env=None):
    """Start `python -m trop ARGS`, by default with clean_env()."""
    return spawn([sys.executable, "-m", "trop"] + list(args), cwd, clean_env() if env is None else env)


def finish(proc, timeout=TIMEOUT, allow_traceback=False):
    """(exit code, stdout, stderr) of a started process; the exit code is None if the process had to be
    killed after timeout seconds.  No stderr may hold a traceback unless allowed."""
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
    if "Traceback" in err and not allow_traceback:
        raise AssertionError("traceback in stderr of %s:\n%s" % (" ".join(proc.args), err))
    return rc, out, err


def run(*args, cwd=None, env=None, timeout=TIMEOUT):
    """Run `python -m trop ARGS`; returns (exit code, stdout, stderr). No stderr may hold a traceback."""
    return finish(popen(args, cwd, env), timeout)


def trop_main(*args):
    """In-process `trop.main(ARGS)`: (exit code, stdout, stderr); much faster than a child process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = trop.main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _rmtree(path):
    for root, dirs, _files in os.walk(path):             # undo chmod 000 before removing
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def temp_dir(test, prefix="trop-test-"):
    """A fresh real (symlink-free) temporary directory, removed when the test ends."""
    path = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
    test.addCleanup(_rmtree, path)
    return path


def make_v2_db(data_dir, rows=()):
    """A database as the reference creates it (schema v2), with the given rows."""
    os.makedirs(data_dir, exist_ok=True)
    conn = sqlite3.connect(os.path.join(data_dir, "trop.db"), isolation_level=None)
    try:
        for sql in (V2_METADATA_SQL, V2_RESERVATIONS_SQL) + INDEX_SQL:
            if sqlite3.sqlite_version_info < (3, 37, 0):        # no STRICT tables before SQLite 3.37
                sql = sql.replace(") STRICT", ")")
            conn.execute(sql)
        conn.execute("INSERT INTO metadata (key, value) VALUES ('schema_version', '2')")
        insert_rows(conn, rows)
    finally:
        conn.close()


def make_v1_db(data_dir, rows=()):
    os.makedirs(data_dir, exist_ok=True)
    conn = sqlite3.connect(os.path.join(data_dir, "trop.db"), isolation_level=None)
    try:
        for sql in V1_SQL:
            conn.execute(sql)
        conn.execute("INSERT INTO metadata (key, value) VALUES ('schema_version', '1')")
        insert_rows(conn, rows)
    finally:
        conn.close()


def insert_rows(conn, rows):
    conn.executemany("INSERT INTO reservations (%s) VALUES (?, ?, ?, ?, ?, ?, ?)" % COLUMNS, list(rows))


def sqlite_rows(db, statement, params=()):
    """The rows a query of trop.db returns; [] where the database or the table does not exist."""
    if not os.path.exists(db):
        return []
    conn = sqlite3.connect(db)
    try:
        return [tuple(row) for row in conn.execute(statement, params)]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def db_rows(data_dir, width=7):
    """The reservations of <data_dir>/trop.db ordered by path and tag, each the tuple of its first `width`
    columns (path, tag, port, project, task, created_at, last_used_at); [] without a database."""
    db = os.path.join(data_dir, "trop.db")
    if not os.path.exists(db):
        return []
    conn = sqlite3.connect(db)
    try:
        return [tuple(r[:width]) for r in conn.execute("SELECT %s FROM reservations ORDER BY path, tag" % COLUMNS)]
    finally:
        conn.close()


def sql_tokens(sql):
    """Upper-cased tokens of a CREATE statement, ignoring whitespace and `IF NOT EXISTS`."""
    tokens = [t.upper() for t in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+|>=|\S", sql)]
    if tokens[2:5] == ["IF", "NOT", "EXISTS"]:
        del tokens[2:5]
    return tokens


def group_yaml(services, project=None, pmin=40000, pmax=40999, base=None, skip=True, excluded=None):
    """A trop.yaml text; services = [(tag, {offset/preferred/env: value})]."""
    lines = []
    if project is not None:
        lines.append("project: %s" % json.dumps(project))
    lines += ["ports:", "  min: %d" % pmin, "  max: %d" % pmax]
    if excluded:
        lines.append("excluded_ports:")
        lines += ["  - %s" % json.dumps(e) for e in excluded]
    if skip:
        lines += ["occupancy_check:", "  skip: true"]
    lines.append("reservations:")
    if base is not None:
        lines.append("  base: %d" % base)
    lines.append("  services:" if services else "  services: {}")
    for tag, body in services:
        fields = ", ".join("%s: %s" % (k, json.dumps(v, ensure_ascii=False)) for k, v in body.items())
        lines.append("    %s: {%s}" % (json.dumps(tag, ensure_ascii=False), fields))
    return "\n".join(lines) + "\n"


def numbered_services(count):
    """Services s00, s01, ... at offsets 0, 1, ..."""
    return [("s%02d" % i, {"offset": i}) for i in range(count)]


def port_free(port):
    """Independent of trop: can TCP and UDP bind the IPv4 (and IPv6) wildcard?"""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            try:
                s = socket.socket(family, kind)
            except OSError:
                continue
            try:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE or family == socket.AF_INET:
                    return False
            finally:
                s.close()
    return True


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, AttributeError):
        return str(uid)


def this_process_owner():
    """(pid, process name, user) trop must report for this process's sockets."""
    with open("/proc/self/comm") as fh:
        return os.getpid(), fh.read().strip(), user_name(os.getuid())


def run_shell(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60, **kw)


def script_file(test, text, suffix=""):
    fd, path = tempfile.mkstemp(suffix=suffix)
    test.addCleanup(os.unlink, path)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


class TropTestCase(unittest.TestCase):
    """A temporary tree per test, and trop run there as a command (or as the library, IN_PROCESS).

    self.root is a fresh symlink-free temporary directory, removed after the test; self.home (root/home, the
    HOME of everything run) and self.proj (root/proj) exist, self.data (root/data; self.db is its trop.db) is
    left for trop to create.  Commands run in self.proj (self.root if RUN_IN_ROOT) with self.env (clean_env()
    with HOME and the class's ENV) plus TROP_DATA_DIR = self.data as it is when the command starts; a call's
    env adds variables (None removes one).  IN_PROCESS tests get the same HOME and no TROP_* variable in
    os.environ, the cwd self.proj, and self.opts for the library's calls.
    """

    ENV = {}                    # variables every command of the class gets
    RUN_IN_ROOT = False         # commands run in self.root, not self.proj
    IN_PROCESS = False          # the test calls the library in this process
    maxDiff = None
    _template_db = None         # fresh_data's initialized trop.db, one per class

    def setUp(self):
        self.root = temp_dir(self)
        self.home = self.mkdir("home")
        self.proj = self.mkdir("proj")
        self.data = self.path("data")
        self.db = os.path.join(self.data, "trop.db")
        self.env = clean_env(HOME=self.home, **self.ENV)
        if self.IN_PROCESS:
            patcher = mock.patch.dict(os.environ, {"HOME": self.home})
            patcher.start()
            self.addCleanup(patcher.stop)
            for name in [k for k in os.environ if k.startswith("TROP_")]:
                del os.environ[name]
            self.chdir(self.proj)
            self.opts = dict(data_dir=self.data, skip_occupancy_check=True)

    # -- files ---------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def mkdir(self, *parts):
        path = self.path(*parts)
        os.makedirs(path, exist_ok=True)
        return path

    def chdir(self, path):
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(path)

    def write(self, path, content):
        """Writes text (as UTF-8) or bytes to path (absolute, or relative to self.root); returns the path."""
        path = self.path(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    @staticmethod
    def read(path):
        with open(path, "rb") as fh:
            return fh.read()

    def exclusions(self, path):
        """The excluded_ports of a configuration file, as (start, end) pairs."""
        doc = trop.parse_yaml(self.read(path).decode("utf-8"))
        return [trop.parse_exclusion(item) for item in doc.get("excluded_ports") or []]

    def group_file(self, directory, services, **kw):
        """<directory>/trop.yaml holding a reservation group (group_yaml's keywords); returns its path."""
        return self.write(os.path.join(directory, "trop.yaml"), group_yaml(services, **kw))

    def group_dir(self, name, services, **kw):
        """root/NAME holding a trop.yaml (see group_file); returns the directory."""
        return os.path.dirname(self.group_file(self.path(name), services, **kw))

    # -- processes -----------------------------------------------------------
    def environment(self, env=None):
        return updated(dict(self.env, TROP_DATA_DIR=self.data), env or {})

    def _started(self, proc):
        def reap():
            if proc.poll() is None:
                proc.kill()
            if proc.stdout.closed:          # finished already: Python 3.6's communicate() fails on closed pipes
                proc.wait()
            else:
                proc.communicate()
        self.addCleanup(reap)
        return proc

    def _cwd(self, cwd=None):
        return cwd or (self.root if self.RUN_IN_ROOT else self.proj)

    def start(self, *args, cwd=None, env=None):
        """Start `python -m trop ARGS`; finish(proc) waits for its (exit code, stdout, stderr)."""
        return self._started(popen(args, self._cwd(cwd), self.environment(env)))

    def start_python(self, code, *args):
        """Start `python -c CODE ARGS` in self.root with self.env."""
        return self._started(spawn([sys.executable, "-c", code] + list(args), self.root, self.env))

    def trop(self, *args, cwd=None, env=None):
        """`python -m trop ARGS` run to its end: (exit code, stdout, stderr)."""
        return run(*args, cwd=self._cwd(cwd), env=self.environment(env))

    def trop_many(self, calls):
        """Start every command at once, then wait for all; calls = [args or (args, {"cwd": .., "env": ..})]."""
        procs = []
        for call in calls:
            args, kwargs = call if len(call) == 2 and isinstance(call[1], dict) else (call, {})
            procs.append(self.start(*args, **kwargs))
        return [finish(p) for p in procs]

    def ok(self, *args, **kwargs):
        """(stdout, stderr) of a command that must succeed."""
        rc, out, err = self.trop(*args, **kwargs)
        self.assertEqual(rc, 0, "trop %s failed: %s" % (" ".join(map(str, args)), err))
        return out, err

    def reserve_port(self, *args, **kw):
        rc, out, err = self.trop("reserve", *args, **kw)
        self.assertEqual(rc, 0, err)
        self.assertEqual(err, "")
        return int(out)

    def child_env(self, **values):
        """The environment of a program that must not see this checkout: no TROP_*, PIP_* or PYTHON*
        variables, HOME = the temporary home, bytecode only in clean_env()'s cache (none written before
        Python 3.8); PYTHONPATH only if given."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TROP_", "PIP_", "PYTHON")) and k not in ("VIRTUAL_ENV", "PYTEST_ADDOPTS")}
        env.update(HOME=self.home, PYTHONNOUSERSITE="1", PIP_CONFIG_FILE=os.devnull, PYTHONIOENCODING="utf-8")
        env.update({"PYTHONPYCACHEPREFIX": _pycache_dir()} if sys.version_info >= (3, 8) else
                   {"PYTHONDONTWRITEBYTECODE": "1"})
        return updated(env, values)

    def execute(self, argv, cwd=None, env=None, timeout=120, allow_traceback=False):
        """(exit status, stdout, stderr) of any program, by default in self.root with child_env()."""
        proc = self._started(spawn(argv, cwd or self.root, env or self.child_env()))
        return finish(proc, timeout, allow_traceback)

    def handle(self, data=None):
        """An in-process Trop handle for fixtures (never used by the processes under test)."""
        h = trop.Trop(data_dir=data or self.data, allow_unrelated_path=True, skip_occupancy_check=True,
                      min=20000, max=40000, busy_timeout=30)
        self.addCleanup(h.close)
        return h

    # -- the database --------------------------------------------------------
    def rows(self, width=7, data=None):
        """db_rows of the data directory (self.data unless given)."""
        return db_rows(data or self.data, width)

    def sql(self, statement, params=()):
        conn = sqlite3.connect(os.path.join(self.data, "trop.db"), isolation_level=None)
        try:
            conn.execute(statement, params)
        finally:
            conn.close()

    def fresh_data(self, name):
        """Point self.data at root/NAME holding an empty, initialized trop.db (a copy of one per class)."""
        cls = type(self)
        if cls._template_db is None:
            template = tempfile.mkdtemp(prefix="trop-test-template-")
            if hasattr(cls, "addClassCleanup"):
                cls.addClassCleanup(shutil.rmtree, template, True)
            else:                           # Python < 3.8: removed when the test run ends
                atexit.register(shutil.rmtree, template, True)
            saved, self.data = self.data, template
            self.ok("init")
            self.data = saved
            cls._template_db = os.path.join(template, "trop.db")
        self.data = self.mkdir(name)
        shutil.copy(cls._template_db, os.path.join(self.data, "trop.db"))
        return self.data

    def seed(self, *rows):
        """Insert (path, tag, port[, project, task, created_at, last_used_at]) rows directly; missing
        timestamps are now."""
        if not os.path.exists(os.path.join(self.data, "trop.db")):
            self.fresh_data(os.path.relpath(self.data, self.root))
        now = int(time.time())
        conn = sqlite3.connect(os.path.join(self.data, "trop.db"), isolation_level=None)
        try:
            insert_rows(conn, [tuple(row) + (None, None, now, now)[len(row) - 3:] for row in rows])
        finally:
            conn.close()

    # -- ports -----------------------------------------------------------------
    def free_block(self, n=6):
        """n consecutive free ports, above the ephemeral range when possible."""
        low, high = 42000, 60000
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
                eph_high = int(fh.read().split()[1])
            if eph_high < 64000:
                low, high = eph_high + 1, 65500
        except (OSError, ValueError, IndexError):
            pass
        rng = random.Random()
        for _ in range(200):
            start = rng.randrange(low, high - n)
            if all(port_free(p) for p in range(start, start + n)):
                return start
        self.skipTest("no block of %d free ports found" % n)

    def listening_block(self, n, *protos):
        """The first of n consecutive free ports, the first len(protos) of them then held on 127.0.0.1, one
        listener a port, by the protocols given ("tcp" or "udp")."""
        start = self.free_block(n)
        for offset, proto in enumerate(protos):
            self.listen(proto, "127.0.0.1", start + offset)
        return start

    def listen(self, proto, address, port=0):
        """A socket bound to (address, port), listening if TCP; closed when the test ends."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, port))
        if proto == "tcp":
            s.listen(5)
        return s

    # -- assertions ------------------------------------------------------------
    def assertError(self, result, code, message=None, startswith=None, contains=None):
        """Exit code, empty stdout, exactly one `Error: ...` line on stderr."""
        rc, out, err = result
        self.assertEqual(rc, code, "stdout=%r stderr=%r" % (out, err))
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("Error: ") and err.endswith("\n") and err.count("\n") == 1,
                        "not one Error line: %r" % err)
        if message is not None:
            self.assertEqual(err, "Error: %s\n" % message)
        if startswith is not None:
            self.assertTrue(err.startswith("Error: " + startswith), err)
        for part in ([contains] if isinstance(contains, str) else contains or []):
            self.assertIn(part, err)

    def assertPort(self, result, port, warns=()):
        """Exit 0 with port alone on stdout; stderr holds one 'Warning: ' line containing each of warns, in order."""
        rc, out, err = result
        self.assertEqual((rc, out), (0, "%d\n" % port), err)
        lines = err.splitlines()
        self.assertEqual(len(lines), len(warns), err)
        for line, part in zip(lines, warns):
            self.assertTrue(line.startswith("Warning: ") and part in line, (line, part))

    def assertNoTraceback(self, err, what=""):
        self.assertNotIn("Traceback", err, what)
        self.assertNotIn("internal error", err, what)

    def assertTropError(self, cls, code, func, *args, **kwargs):
        """func raises cls (a TropError, never a sqlite3/OS error) whose exit_code is code."""
        with self.assertRaises(trop.TropError) as ctx:
            func(*args, **kwargs)
        exc = ctx.exception
        self.assertIsInstance(exc, cls, "%s: %s" % (type(exc).__name__, exc))
        self.assertNotIsInstance(exc, (sqlite3.Error, OSError))
        self.assertEqual(exc.exit_code, code, str(exc))
        self.assertTrue(str(exc))
        return exc

    def assertDataDirValid(self, data=None):
        self.assertEqual(self.trop("assert-data-dir", "--validate", env={"TROP_DATA_DIR": data or self.data}),
                         (0, "", ""))

    def assertUniquePorts(self, rows):
        ports = [r[2] for r in rows]
        self.assertEqual(len(ports), len(set(ports)), "duplicate ports in %r" % (rows,))


# --- Module layout -----------------------------------------------------------

class TestLayering(unittest.TestCase):
    """trop.py's banner sections form layers: a section uses names of earlier sections and its own only.

    A use of a later section's name is allowed on a line whose comment starts with "layering:" and says why.
    """

    BANNER = re.compile(r"^# --- (.+?) -+$")

    @classmethod
    def setUpClass(cls):
        with open(trop.__file__, encoding="utf-8") as fh:
            cls.source = fh.read()
        cls.lines = cls.source.splitlines()
        cls.tree = ast.parse(cls.source)
        cls.starts = [(number, match.group(1)) for number, match in
                      ((i + 1, cls.BANNER.match(line)) for i, line in enumerate(cls.lines)) if match]

    def section_of(self, line):
        """Index of the section holding a line (-1: the prelude before the first banner)."""
        return sum(1 for start, _name in self.starts if start <= line) - 1

    def definitions(self):
        """Module-level name -> index of the section that defines it."""
        defined = {}
        for node in self.tree.body:
            targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                for name in ([target.name] if hasattr(target, "name") else
                             [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]):
                    defined.setdefault(name, self.section_of(node.lineno))
        return defined

    def global_uses(self, node, local=frozenset()):
        """(name, line) of every name node reads from the module's globals: locals of enclosing functions excluded."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            params = {a.arg for a in args.args + args.kwonlyargs + getattr(args, "posonlyargs", [])}
            params |= {a.arg for a in (args.vararg, args.kwarg) if a}
            body = node.body if isinstance(node.body, list) else [node.body]
            assigned = {n.id for stmt in body for n in ast.walk(stmt)
                        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
            assigned |= {n.name for stmt in body for n in ast.walk(stmt)
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            declared = {name for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Global) for name in n.names}
            local = local | params | (assigned - declared)
            for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
                yield from self.global_uses(default, local)
            for stmt in body:
                yield from self.global_uses(stmt, local)
            for decorator in getattr(node, "decorator_list", []):
                yield from self.global_uses(decorator, local)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
            yield node.id, node.lineno
        for child in ast.iter_child_nodes(node):
            yield from self.global_uses(child, local)

    def edges(self):
        """{(using section, defining section): [(name, line)]} for every use of a later section's name."""
        defined, found = self.definitions(), {}
        for node in self.tree.body:
            for name, line in self.global_uses(node):
                user, owner = self.section_of(line), defined.get(name, -1)
                if owner > user and not re.search(r"#.*\blayering: \S", self.lines[line - 1]):
                    found.setdefault((user, owner), []).append((name, line))
        return found

    def test_sections_form_layers(self):
        names = [name for _start, name in self.starts]
        found = ["%s -> %s: %s" % (names[user] if user >= 0 else "prelude", names[owner],
                                   ", ".join("%s (line %d)" % use for use in uses))
                 for (user, owner), uses in sorted(self.edges().items())]
        self.assertEqual(found, [])

    def test_the_check_sees_a_forward_use(self):
        """The check itself: a function of an early section calling a name of a later one is found."""
        with mock.patch.object(self, "tree", ast.parse("def early():\n    return late()\n\n\ndef late():\n    pass\n")), \
                mock.patch.object(self, "starts", [(1, "early"), (4, "late")]), \
                mock.patch.object(self, "lines", ["", "    return late()", "", "", "", ""]):
            self.assertEqual(self.edges(), {(0, 1): [("late", 2)]})
            self.lines[1] += "  # layering: the late section is loaded by then"
            self.assertEqual(self.edges(), {})

    def test_library_before_command_line(self):
        """Formatting comes after the operations, the Python API is the last library section, the CLI is last."""
        names = [name for _start, name in self.starts]
        api = next(i for i, name in enumerate(names) if name.startswith("Python API"))
        self.assertTrue(names[api - 1].startswith("Output formatting"), names)
        self.assertEqual([n.split(" ")[0] for n in names[api + 1:]], ["Shell", "MCP", "Command"])
        self.assertLess(max(i for i, name in enumerate(names) if name.startswith("Sessions")),
                        min(i for i, name in enumerate(names) if name.startswith("Operations")))


# --- Errors ------------------------------------------------------------------

class TestErrors(unittest.TestCase):
    def test_exit_codes_of_error_categories(self):
        self.assertEqual(trop.SemanticFailure("x").exit_code, 1)
        self.assertEqual(trop.LockTimeout("doing it", 1).exit_code, 2)
        self.assertEqual(trop.NoDataDirectory("x").exit_code, 3)
        self.assertEqual(trop.InvalidArguments("x").exit_code, 4)
        self.assertEqual(trop.IoFailure("x").exit_code, 5)
        self.assertEqual(trop.LibraryError("x").exit_code, 6)
        self.assertEqual(trop.ConfigError("x").exit_code, 7)
        for cls in (trop.SemanticFailure, trop.NoDataDirectory, trop.InvalidArguments, trop.IoFailure,
                    trop.LibraryError, trop.ConfigError):
            self.assertTrue(issubclass(cls, trop.TropError))

    def test_lock_timeout_message(self):
        self.assertEqual(str(trop.LockTimeout("starting an immediate database transaction", 1)),
                         "database lock timeout while starting an immediate database transaction after 1s")
        self.assertEqual(str(trop.LockTimeout("opening and validating the database", 5)),
                         "database lock timeout while opening and validating the database after 5s")

    def test_display_prefixes(self):
        self.assertEqual(str(trop.ConfigError("bad")), "Configuration error: bad")
        self.assertEqual(str(trop.IoFailure("gone")), "I/O error: gone")
        self.assertEqual(str(trop.SemanticFailure("Assertion failed: x")), "Assertion failed: x")

    def test_unexpected_exception_is_one_error_line(self):
        with mock.patch.object(trop, "resolve_data_dir", side_effect=RuntimeError("boom")), \
                mock.patch.dict(os.environ, {"TROP_DEBUG": ""}):
            code, out, err = trop_main("show-data-dir")
        self.assertEqual((code, out), (6, ""))
        self.assertTrue(err.startswith("Error: internal error: "), err)
        self.assertIn("boom", err)
        self.assertEqual(err.count("\n"), 1)

    def test_corruption_error_is_a_library_error(self):
        err = trop.CorruptionError("table=reservations, field=port, key=path=\"/a\", tag=<untagged>: bad")
        self.assertEqual(err.exit_code, 6)
        self.assertTrue(str(err).startswith("database corruption detected: table=reservations, field=port"))


# --- YAML reader -------------------------------------------------------------

class TestYamlReader(unittest.TestCase):
    SAMPLE = """\
# comment
project: my-app
ports:
  min: 5000
  max: 7000     # trailing comment
excluded_ports:
  - 5001
  - "6000..6010"
  - {start: 6100, end: 6105}
  - start: 6200
    end: 6201
cleanup:
  expire_after_days: 30
occupancy_check:
  skip: false
  check_all_interfaces: true
reservations:
  base: 5000
  services:
    web:
      offset: 0
      env: WEB_PORT
    api: {offset: 1, preferred: 8080}
    "db":
      offset: 2
output_format: json
maximum_lock_wait_seconds: 5
"""

    SAMPLE_JSON = """\
{
  "project": "my-app",
  "ports": {"min": 5000, "max": 7000},
  "excluded_ports": [5001, "6000..6010", {"start": 6100, "end": 6105}],
  "occupancy_check": {"skip": false, "check_all_interfaces": true},
  "reservations": {
    "base": 5000,
    "services": {
      "web": {"offset": 0, "env": "WEB_PORT"},
      "api": {"offset": 1, "preferred": 8080}
    }
  },
  "note": "tab\\there \\u00e9 \\ud83d\\ude00 \\"q\\" \\\\ \\/",
  "nothing": null
}
"""

    VALID_CONFIGS = [
        SAMPLE,
        SAMPLE_JSON,
        "a:\n- 1\n- 'two'\n- {x: [1, 2], y: \"\\u00e9\"}\nb: [\n  1, # c\n  2]\n",
        "---\n- a: 1\n  b:\n    - x\n    - - y\n- c\n...\n",
        "excluded_ports: [5001, 5002,\n  5003]  # c\nports: {min: 1, max: 2}\n",
    ]
    FUZZ_CHARS = ": - [ ] { } # \" ' \t \n & * ! | > ? % @ ` , . \\ \r a 1 x".split(" ") + [" ", "\ufeff", "\\u"]

    @staticmethod
    def entries_of(value):
        """excluded_ports as parsed -> the entries form used by replace_excluded_ports."""
        return [(item["start"], item["end"]) if isinstance(item, dict) else item for item in value or []]

    def value(self, text):
        return trop.parse_yaml("v: " + text)["v"]

    def check(self, text, fragment, line):
        with self.assertRaises(trop.YamlError, msg=repr(text)) as cm:
            trop.parse_yaml(text)
        self.assertIn(fragment, cm.exception.message, repr(text))
        self.assertEqual(cm.exception.line, line, "%r: %s" % (text, cm.exception.message))
        self.assertEqual(str(cm.exception), cm.exception.message)

    # -- the accepted subset, with line numbers ------------------------------------------------
    def test_sample_values_and_key_order(self):
        doc = trop.parse_yaml(self.SAMPLE)
        self.assertEqual(doc, {
            "project": "my-app",
            "ports": {"min": 5000, "max": 7000},
            "excluded_ports": [5001, "6000..6010", {"start": 6100, "end": 6105}, {"start": 6200, "end": 6201}],
            "cleanup": {"expire_after_days": 30},
            "occupancy_check": {"skip": False, "check_all_interfaces": True},
            "reservations": {"base": 5000, "services": {
                "web": {"offset": 0, "env": "WEB_PORT"}, "api": {"offset": 1, "preferred": 8080},
                "db": {"offset": 2}}},
            "output_format": "json",
            "maximum_lock_wait_seconds": 5,
        })
        self.assertEqual(list(doc), ["project", "ports", "excluded_ports", "cleanup", "occupancy_check",
                                     "reservations", "output_format", "maximum_lock_wait_seconds"])

    def test_sample_line_numbers(self):
        doc = trop.parse_yaml(self.SAMPLE)
        self.assertEqual(doc.line, 2)
        self.assertEqual(doc.key_lines, {"project": 2, "ports": 3, "excluded_ports": 6, "cleanup": 12,
                                         "occupancy_check": 14, "reservations": 17, "output_format": 26,
                                         "maximum_lock_wait_seconds": 27})
        self.assertEqual(doc["ports"].key_lines, {"min": 4, "max": 5})
        ex = doc["excluded_ports"]
        self.assertEqual(ex.line, 7)
        self.assertEqual(ex.item_lines, [7, 8, 9, 10])
        self.assertEqual(ex[2].key_lines, {"start": 9, "end": 9})
        self.assertEqual(ex[3].key_lines, {"start": 10, "end": 11})
        services = doc["reservations"]["services"]
        self.assertEqual(services.key_lines, {"web": 20, "api": 23, "db": 24})
        self.assertEqual(services["api"].key_lines, {"offset": 23, "preferred": 23})
        self.assertEqual(services["db"].key_lines, {"offset": 25})

    def test_json_document(self):
        doc = trop.parse_yaml(self.SAMPLE_JSON)
        self.assertEqual(doc["excluded_ports"], [5001, "6000..6010", {"start": 6100, "end": 6105}])
        self.assertEqual(doc["note"], 'tab\there \u00e9 \U0001F600 "q" \\ /')
        self.assertIsNone(doc["nothing"])
        self.assertIs(doc["occupancy_check"]["skip"], False)
        self.assertEqual(doc.key_lines["excluded_ports"], 4)
        self.assertEqual(doc["reservations"].key_lines, {"base": 7, "services": 8})
        self.assertEqual(trop.parse_yaml('{\n\t"a": [\n\t\t1\n\t]\n}\n'), {"a": [1]})   # tabs are fine in JSON

    def test_matches_json_module(self):
        data = {"a": [1, -2, 3.25, -1e-05, True, False, None, "x\u0001y\t\"\\/é😀"],
                "b": {"c": {}, "d": [], "e": [[[]]]}, "": "empty key", "8080": "k"}
        for indent in (None, 2, "\t"):
            for ensure_ascii in (True, False):
                text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii)
                self.assertEqual(trop.parse_yaml(text), data, text)

    def test_null_and_bool_yaml_1_2_core(self):
        for text in ("null", "Null", "NULL", "~", "", "   ", "# comment"):
            self.assertIsNone(self.value(text), text)
        for text in ("nULL", "none", "None", "nil"):
            self.assertEqual(self.value(text), text)
        for text in ("true", "True", "TRUE"):
            self.assertIs(self.value(text), True)
        for text in ("false", "False", "FALSE"):
            self.assertIs(self.value(text), False)
        for text in ("yes", "no", "on", "off", "Yes", "y", "n", "tRUE", "OFF"):     # strings in YAML 1.2
            self.assertEqual(self.value(text), text)

    def test_numbers(self):
        for text, expected in {"0": 0, "5000": 5000, "-1": -1, "+7": 7, "007": 7, "0o17": 15, "0x1F": 31,
                               "-0": 0}.items():
            got = self.value(text)
            self.assertEqual((got, type(got)), (expected, int), text)
        for text, expected in {"1.5": 1.5, ".5": 0.5, "1e3": 1000.0, "+1.5e+2": 150.0, ".inf": math.inf,
                               "-.Inf": -math.inf}.items():
            got = self.value(text)
            self.assertEqual((got, type(got)), (expected, float), text)
        self.assertTrue(math.isnan(self.value(".nan")))
        for text in ("6000..6010", "1_000", "0b101", "0X1F", "-0x1", "1.2.3", "1e", "inf", "NaN", "12:30"):
            got = self.value(text)
            self.assertEqual((got, type(got)), (text, str), text)

    def test_plain_and_quoted_strings(self):
        cases = {"my-app": "my-app", "a#b": "a#b", "a #b": "a", "a b  ": "a b", "http://x.y/z?q=1": "http://x.y/z?q=1",
                 "a:b": "a:b", "-x": "-x", "it's": "it's", "--- not a marker": "--- not a marker",
                 "é ü 😀": "é ü 😀", "'5000'": "5000", '"true"': "true", "'null'": "null", "''": "",
                 "'it''s'": "it's", "'a\\nb # c'  # comment": "a\\nb # c", "'a: b'": "a: b"}
        for text, expected in cases.items():
            got = self.value(text)
            self.assertEqual((got, type(got)), (expected, str), text)

    def test_double_quoted_escapes(self):
        cases = {
            r'"\\"': "\\", r'"\""': '"', r'"\/"': "/", r'"\n"': "\n", r'"\t"': "\t", r'"\r"': "\r",
            r'"\0"': "\0", r'"\b"': "\b", r'"\f"': "\f", r'"\x41"': "A", r'"\u00e9"': "\u00e9",
            r'"\U0001F600"': "\U0001F600", r'"\ud83d\ude00"': "\U0001F600", r'"\a\v\e"': "\a\v\x1b",
            r'"\ "': " ", r'"\N\_\L\P"': "\x85\xa0\u2028\u2029", '"\\\t"': "\t",
            r'"a\"b\\"': 'a"b\\', r'"x # y"': "x # y", '"tab\tinside"': "tab\tinside",
        }
        for text, expected in cases.items():
            self.assertEqual(self.value(text), expected, text)

    def test_bad_escapes(self):
        for text in (r'"\q"', r'"\x4"', r'"\x4g"', r'"\u12"', r'"\uzzzz"', r'"\U0011FFFF"', r'"\ud83d"',
                     r'"\ude00"', r'"\ud83dx"', r'"\ud83d\u0041"', r'"\U0000D800"', r'"\'"', r'"\8"'):
            with self.assertRaises(trop.YamlError, msg=text) as cm:
                self.value(text)
            self.assertEqual(cm.exception.line, 1)
            self.assertIn("escape sequence", cm.exception.message)

    def test_keys_are_strings(self):
        doc = trop.parse_yaml("8080: a\ntrue: b\nnull: c\n'q': e\n\"x y\": f\n")
        self.assertEqual(doc, {"8080": "a", "true": "b", "null": "c", "q": "e", "x y": "f"})
        self.assertEqual(trop.parse_yaml("{8080: a, 'b': 1, \"c\": 2}"), {"8080": "a", "b": 1, "c": 2})

    def test_empty_documents(self):
        for text in ("", "\n", "   \n\n", "# only\n  # comments\n", "---\n", "--- # c\n# x\n", "\ufeff",
                     "...\n", "---\n...\n", "\t\n", "\r\n\r\n"):
            self.assertIsNone(trop.parse_yaml(text), repr(text))

    def test_document_markers(self):
        self.assertEqual(trop.parse_yaml("---\na: 1\n"), {"a": 1})
        self.assertEqual(trop.parse_yaml("# c\n---\na: 1\n...\n# after\n"), {"a": 1})
        self.assertEqual(trop.parse_yaml("a: ---\nb: ...\n"), {"a": "---", "b": "..."})

    def test_nested_block_with_lines(self):
        doc = trop.parse_yaml("a:\n  b:\n    c: 1\n    d:\n      - x\n      - y: 2\n        z: 3\n  e: 4\nf: 5\n")
        self.assertEqual(doc, {"a": {"b": {"c": 1, "d": ["x", {"y": 2, "z": 3}]}, "e": 4}, "f": 5})
        self.assertEqual(doc["a"]["b"]["d"].item_lines, [5, 6])
        self.assertEqual(doc["a"]["b"]["d"][1].key_lines, {"y": 6, "z": 7})
        self.assertEqual(doc["a"].key_lines, {"b": 2, "e": 8})

    def test_compact_sequence_and_sequences(self):
        doc = trop.parse_yaml("excluded_ports:\n- 1\n- 2\nnext: x\n")
        self.assertEqual(doc, {"excluded_ports": [1, 2], "next": "x"})
        self.assertEqual(doc["excluded_ports"].item_lines, [2, 3])
        doc = trop.parse_yaml("- a\n-\n- - b\n  - c\n-   d   # c\n- [1, 2]\n-\n  - e\n- k: v\n  l:\n    m: n\n-\n")
        self.assertEqual(doc, ["a", None, ["b", "c"], "d", [1, 2], ["e"], {"k": "v", "l": {"m": "n"}}, None])
        self.assertEqual(doc.item_lines, [1, 2, 3, 5, 6, 7, 9, 12])

    def test_indented_root_blank_lines_comments(self):
        doc = trop.parse_yaml("\n\n   a: 1\n\n   b:\n\n     - 2\n")
        self.assertEqual(doc, {"a": 1, "b": [2]})
        self.assertEqual(doc.key_lines, {"a": 3, "b": 5})
        self.assertEqual(doc["b"].item_lines, [7])
        doc = trop.parse_yaml("# head\na: 1 # c\nb: 'x' # c\nc: [1, 2] # c\n  # indented comment\nd: # c\n  - 1 # c\n"
                              "  # between\n  - 2\n# tail")
        self.assertEqual(doc, {"a": 1, "b": "x", "c": [1, 2], "d": [1, 2]})
        self.assertEqual(trop.parse_yaml("a:\tb\t# c\nc:\t\t1\n"), {"a": "b", "c": 1})   # tabs after content

    def test_flow_collections(self):
        self.assertEqual(trop.parse_yaml("a: [a, 'b', \"c\", [d, {e: f}], {}, []]"),
                         {"a": ["a", "b", "c", ["d", {"e": "f"}], {}, []]})
        self.assertEqual(trop.parse_yaml("a: {start: 1, end: 2,}"), {"a": {"start": 1, "end": 2}})
        self.assertEqual(trop.parse_yaml("a: {x, y: , z: ~}"), {"a": {"x": None, "y": None, "z": None}})
        self.assertEqual(trop.parse_yaml("a: [x: 1, y]"), {"a": [{"x": 1}, "y"]})
        doc = trop.parse_yaml("a: [\n  1,   # one\n  # alone\n\n  2\n]\nb: {x: 1,\n    y: [2,\n 3]}  # c\nc: 3\n")
        self.assertEqual(doc, {"a": [1, 2], "b": {"x": 1, "y": [2, 3]}, "c": 3})
        self.assertEqual(doc["a"].item_lines, [2, 5])
        self.assertEqual(doc["b"].key_lines, {"x": 7, "y": 8})
        self.assertEqual(doc.key_lines, {"a": 1, "b": 7, "c": 10})

    def test_line_endings_bom_and_bytes(self):
        self.assertEqual(trop.parse_yaml("a: 1\r\nb:\r\n  - x\r\n"), {"a": 1, "b": ["x"]})
        doc = trop.parse_yaml("a: 1\rb: 2\r")
        self.assertEqual(doc.key_lines, {"a": 1, "b": 2})
        self.assertEqual(trop.parse_yaml("\ufeffa: 1\n"), {"a": 1})
        self.assertEqual(trop.parse_yaml(b"\xef\xbb\xbfa: 1\n"), {"a": 1})
        self.assertEqual(trop.parse_yaml("a: x\u2028y\x85z\n"), {"a": "x\u2028y\x85z"})
        self.check("a: 1\r\nb: &x 2\r\n", "anchors", 2)

    def test_depth_limit(self):
        self.assertEqual(trop.parse_yaml("[" * 50 + "]" * 50), eval("[" * 50 + "]" * 50))
        for text in ("[" * 101 + "]" * 101, "[" * 100000, "{a: " * 200 + "}" * 200, "- " * 150 + "x",
                     "".join(" " * i + "k:\n" for i in range(150))):
            with self.assertRaises(trop.YamlError) as cm:
                trop.parse_yaml(text)
            self.assertIn("nesting is too deep", cm.exception.message)

    def test_error_api_and_plain_containers(self):
        err = trop.YamlError("boom", 3)
        self.assertEqual((str(err), err.message, err.line), ("boom", "boom", 3))
        self.assertIsNone(trop.YamlError("x").line)
        doc = trop.parse_yaml(self.SAMPLE)
        self.assertIsInstance(doc, dict)
        self.assertIsInstance(doc["excluded_ports"], list)
        self.assertEqual(copy.deepcopy(doc), doc)
        self.assertEqual(pickle.loads(pickle.dumps(doc)), doc)

    # -- every rejected construct names its line ------------------------------------------------
    def test_anchors_aliases_tags(self):
        self.check("a: 1\nb: &x 2\n", "anchors (&name) are not supported", 2)
        self.check("a: &x\n  b: 1\n", "anchors", 1)
        self.check("&x a: 1\n", "anchors", 1)
        self.check("a: 1\nb: *x\n", "aliases (*name) are not supported", 2)
        self.check("a: [1, *x]\n", "aliases", 1)
        self.check("a: !!str 1\n", "tags (!tag) are not supported", 1)
        self.check("a: {b: !t x}\n", "tags", 1)
        self.check("--- !map\na: 1\n", "not supported", 1)

    def test_block_scalars(self):
        self.check("a: |\n  text\n", "block scalars (| or >) are not supported", 1)
        self.check("x: 1\na: >-\n  text\n", "block scalars (| or >) are not supported", 2)
        self.check("- |\n  x\n", "block scalars", 1)

    def test_directives_and_several_documents(self):
        self.check("%YAML 1.2\n---\na: 1\n", "directives (%...) are not supported", 1)
        self.check("a: 1\n---\nb: 2\n", "multiple documents are not supported", 2)
        self.check("---\na: 1\n---\n", "multiple documents are not supported", 3)
        self.check("a: 1\n...\nb: 2\n", "multiple documents are not supported", 3)
        self.check("--- a: 1\n", "content on the '---' line is not supported", 1)

    def test_complex_keys(self):
        self.check("? a\n: b\n", "complex mapping keys (? key) are not supported", 1)
        self.check("[a]: b\n", "complex mapping keys", 1)
        self.check("{a: 1}: b\n", "complex mapping keys", 1)
        self.check("x: {[a]: b}\n", "complex mapping keys", 1)
        self.check(": b\n", "empty key", 1)

    def test_tabs_for_indentation(self):
        self.check("a:\n\tb: 1\n", "tab characters are not allowed for indentation", 2)
        self.check("a:\n  \tb: 1\n", "tab characters are not allowed for indentation", 2)
        self.check("a: 1\n\tb: 2\n", "tab characters are not allowed for indentation", 2)
        self.check("-\tk: v\n", "tab characters are not allowed for indentation", 1)
        self.check("\ta: 1\n", "tab characters", 1)

    def test_duplicate_keys(self):
        self.check("ports: 1\nother: 2\nports: 3\n", "duplicate key 'ports'", 3)
        self.check("a:\n  x: 1\n  'x': 2\n", "duplicate key 'x'", 3)
        self.check("a: {x: 1, y: 2,\n  x: 3}\n", "duplicate key 'x'", 2)
        self.check("- {start: 1, start: 2}\n", "duplicate key 'start'", 1)
        self.check('{"a": 1, "a": 2}', "duplicate key 'a' (first defined on line 1)", 1)

    def test_unterminated_and_multiline_quotes(self):
        for text, what in (('"abc', "double"), ("'abc", "single"), ('"abc\\"', "double"), ("'it''", "single")):
            self.check("a: 1\nb: " + text + "\n", "unterminated %s-quoted string" % what, 2)
        self.check('a: "one\n  two"\n', "unterminated", 1)
        self.check('a: [1, "x\n"]\n', "unterminated double-quoted string", 1)

    def test_indentation_errors(self):
        self.check("a:\n    b: 1\n  c: 2\n", "inconsistent indentation", 3)
        self.check("a: 1\n  b: 2\n", "unexpected indentation", 2)
        self.check("a: text\n  more text\n", "unexpected indentation", 2)
        self.check("- x: 1\n y: 2\n", "inconsistent indentation", 2)
        self.check("  a: 1\nb: 2\n", "inconsistent indentation", 2)
        self.check("a:\n  - 1\n  b: 2\n", "expected a block sequence entry", 3)

    def test_bad_structure(self):
        self.check("a: 1\nb\n", "expected a mapping key", 2)
        self.check("a: 1\n- b\n", "expected a mapping key ('key: value'), found a block sequence entry", 2)
        self.check("hello\nb: 1\n", "unexpected content after the top-level value", 2)
        self.check("a: b: c\n", "mapping values are not allowed here", 1)
        self.check("a: - b\n", "block sequence cannot start on the line of its mapping key", 1)
        self.check("a: 'x' y\n", "unexpected content after quoted string", 1)
        self.check("a: [1] x\n", "unexpected content after flow collection", 1)
        self.check('{"a": 1}\n"b"\n', "unexpected content", 2)

    def test_flow_errors(self):
        self.check("x: 1\na: [1, 2\n", "unclosed '[' (missing ']')", 2)
        self.check("a: {b: 1\n\n", "unclosed '{' (missing '}')", 1)
        self.check("a: [1, 2\nb: 3\n", "expected ',' or ']' in flow sequence", 2)
        self.check("a: {b: 1 c: 2}\n", "expected ',' or '}' in flow mapping", 1)
        self.check("a: [1, , 2]\n", "unexpected ','", 1)
        self.check("a: [- 1]\n", "block sequence entries are not allowed inside flow collections", 1)
        self.check('a: {"b"\n  : 1}\n', "a mapping key and its ':' must be on the same line", 2)

    def test_reserved_indicators(self):
        self.check("a: @x\n", "'@' is a reserved indicator", 1)
        self.check("a: `x`\n", "'`' is a reserved indicator", 1)
        self.check("@a: 1\n", "reserved indicator", 1)
        self.check("a: %x\n", "'%' cannot start a plain scalar", 1)

    def test_huge_int_and_invalid_utf8(self):
        if hasattr(sys, "set_int_max_str_digits"):
            self.check("a: 1\nb: " + "1" * 5000 + "\n", "too large", 2)
        self.check(b"a: 1\nb: \xff\n", "invalid UTF-8", 2)

    def test_fuzz_only_yaml_error_escapes(self):
        rng = random.Random(1234)
        parsed = rewritten = 0
        for _ in range(3000):
            text = rng.choice(self.VALID_CONFIGS)
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                pos = rng.randint(0, len(text))
                if op < 0.4:
                    text = text[:pos] + rng.choice(self.FUZZ_CHARS) + text[pos:]
                elif op < 0.7:
                    text = text[:pos] + text[pos + rng.randint(1, 3):]
                else:
                    text = text[:pos] + rng.choice(self.FUZZ_CHARS) + text[pos + 1:]
            try:
                doc = trop.parse_yaml(text)
            except trop.YamlError as exc:
                self.assertIsInstance(exc.message, str)
                self.assertTrue(exc.line is None or 1 <= exc.line <= text.count("\n") + text.count("\r") + 1,
                                (text, exc.message, exc.line))
                continue
            except Exception as exc:  # pragma: no cover - reported as a failure
                self.fail("%s: %r on input %r" % (type(exc).__name__, exc, text))
            parsed += 1
            if isinstance(doc, dict) or doc is None:
                entries = [rng.randint(1, 65535), (10, 20)][:rng.randint(0, 2)]
                try:
                    out = trop.replace_excluded_ports(text, entries)
                except Exception as exc:  # pragma: no cover
                    self.fail("rewrite %s: %r on input %r" % (type(exc).__name__, exc, text))
                self.assertEqual(self.entries_of(trop.parse_yaml(out)["excluded_ports"]), entries, (text, out))
                rewritten += 1
        self.assertGreater(parsed, 100)
        self.assertGreater(rewritten, 50)


class TestExclusionWriter(unittest.TestCase):
    """replace_excluded_ports: only the excluded_ports value changes, byte for byte."""

    SAMPLE = TestYamlReader.SAMPLE
    entries_of = staticmethod(TestYamlReader.entries_of)

    def rewrite(self, text, entries, expected):
        out = trop.replace_excluded_ports(text, entries)
        self.assertEqual(out, expected)
        self.assertEqual(self.entries_of(trop.parse_yaml(out)["excluded_ports"]), list(entries))

    def test_sample(self):
        expected = self.SAMPLE.replace(
            '  - 5001\n  - "6000..6010"\n  - {start: 6100, end: 6105}\n  - start: 6200\n    end: 6201\n',
            "  - 8080\n  - {start: 8090, end: 8095}\n")
        self.rewrite(self.SAMPLE, [8080, (8090, 8095)], expected)

    def test_comments_above_below_inside(self):
        text = ("# head\nproject: x   # p\n# about exclusions\nexcluded_ports:   # keep me\n    - 1      # one\n"
                "    # inside\n    - 2\n    # after the last item\n\n# before cleanup\ncleanup:\n"
                "  expire_after_days: 3\n")
        expected = ("# head\nproject: x   # p\n# about exclusions\nexcluded_ports:   # keep me\n    - 5\n"
                    "    - {start: 7, end: 9}\n    # after the last item\n\n# before cleanup\ncleanup:\n"
                    "  expire_after_days: 3\n")
        self.rewrite(text, [5, (7, 9)], expected)

    def test_compact_items_keep_indentation(self):
        self.rewrite("a: 1\nexcluded_ports:\n- 1\n- 2\nb: 2\n", [3], "a: 1\nexcluded_ports:\n- 3\nb: 2\n")

    def test_flow_lists(self):
        self.rewrite("a: 1\nexcluded_ports: [1, 2]  # c\nb: 2\n", [3, (4, 5)],
                     "a: 1\nexcluded_ports:  # c\n  - 3\n  - {start: 4, end: 5}\nb: 2\n")
        self.rewrite("excluded_ports: [1, 2]\n", [], "excluded_ports: []\n")
        self.rewrite("a: 1\nexcluded_ports: [\n  1,  # one\n  {start: 2, end: 3}\n]\n# tail\nb: 2\n", [9],
                     "a: 1\nexcluded_ports:\n  - 9\n# tail\nb: 2\n")

    def test_null_and_empty_values(self):
        self.rewrite("excluded_ports:\nb: 1\n", [1], "excluded_ports:\n  - 1\nb: 1\n")
        self.rewrite("excluded_ports: null # none\nb: 1\n", [1], "excluded_ports: # none\n  - 1\nb: 1\n")
        self.rewrite("excluded_ports: ~\n", [], "excluded_ports: []\n")
        self.rewrite("excluded_ports: []\n", [(1, 2)], "excluded_ports:\n  - {start: 1, end: 2}\n")

    def test_no_final_newline(self):
        self.rewrite("a: 1\nexcluded_ports:\n  - 1", [2, 3], "a: 1\nexcluded_ports:\n  - 2\n  - 3")
        self.rewrite("a: 1\nexcluded_ports: [1]", [], "a: 1\nexcluded_ports: []")

    def test_absent_key_is_appended(self):
        self.rewrite("a: 1\n# end\n", [1, (2, 3)], "a: 1\n# end\nexcluded_ports:\n  - 1\n  - {start: 2, end: 3}\n")
        self.rewrite("a: 1", [1], "a: 1\nexcluded_ports:\n  - 1\n")
        self.rewrite("  a: 1\n", [5], "  a: 1\n  excluded_ports:\n    - 5\n")
        self.rewrite("a: 1\n...\n# x\n", [5], "a: 1\nexcluded_ports:\n  - 5\n...\n# x\n")
        self.rewrite("a: 1\nnested:\n  excluded_ports: [1]\n", [5],
                     "a: 1\nnested:\n  excluded_ports: [1]\nexcluded_ports:\n  - 5\n")

    def test_empty_documents(self):
        self.rewrite("", [1], "excluded_ports:\n  - 1\n")
        self.rewrite("# only a comment", [1], "# only a comment\nexcluded_ports:\n  - 1\n")
        self.rewrite("---\n", [], "---\nexcluded_ports: []\n")
        self.rewrite("\ufeff# c\n", [2], "\ufeff# c\nexcluded_ports:\n  - 2\n")

    def test_crlf_kept(self):
        text = "# c\r\nproject: x\r\nexcluded_ports:\r\n  - 1\r\n  - 2\r\n\r\ncleanup:\r\n  expire_after_days: 3\r\n"
        self.rewrite(text, [(5, 6), 7], "# c\r\nproject: x\r\nexcluded_ports:\r\n  - {start: 5, end: 6}\r\n  - 7\r\n"
                                        "\r\ncleanup:\r\n  expire_after_days: 3\r\n")
        self.rewrite("a: 1\r\n", [1], "a: 1\r\nexcluded_ports:\r\n  - 1\r\n")

    def test_quoted_key_and_bom_kept(self):
        self.rewrite("\ufeff'excluded_ports': [1]\n", [2], "\ufeff'excluded_ports':\n  - 2\n")

    def test_other_bytes_untouched(self):
        text = self.SAMPLE.replace("\n", "   \n").replace("project: my-app", "project:  'my-app'  # q")
        before, after = text.split("\n"), trop.replace_excluded_ports(text, [1]).split("\n")
        self.assertEqual(before[:5], after[:5])
        self.assertEqual(after[5:7], ["excluded_ports:", "  - 1"])
        self.assertEqual(before[11:], after[7:])

    def test_json_document(self):
        out = trop.replace_excluded_ports(TestYamlReader.SAMPLE_JSON, [1, (2, 3)])
        data = json.loads(out)
        self.assertEqual(data["excluded_ports"], [1, {"start": 2, "end": 3}])
        self.assertEqual(list(data), list(json.loads(TestYamlReader.SAMPLE_JSON)))
        self.assertEqual(trop.replace_excluded_ports('# c\r\n{"a": 1}', []),
                         '# c\r\n{\r\n  "a": 1,\r\n  "excluded_ports": []\r\n}')

    def test_not_a_mapping_and_bad_entries(self):
        for text in ("- 1\n", "[1]", "hello"):
            with self.assertRaises(trop.YamlError) as cm:
                trop.replace_excluded_ports(text, [1])
            self.assertIn("not a mapping", cm.exception.message)
        with self.assertRaises(trop.YamlError):
            trop.replace_excluded_ports("a: &x 1\n", [1])
        for bad in (["1"], [True], [(1, 2, 3)], [(1, "2")], [None]):
            with self.assertRaises(ValueError):
                trop.replace_excluded_ports("a: 1\n", bad)


# --- Configuration -----------------------------------------------------------

class TestOptionTable(unittest.TestCase):
    """Every setting comes from one row of trop.OPTIONS: its key, default, variables, flag and API keyword."""

    SAMPLE = {"_Switch": (True, "1", "true"), "_Port": (6001, "6001", "6001"), "_Offset": (10, "10", None),
              "_Days": (9, "9", "9"), "_Seconds": (7, "7", "7"), "_Identifier": ("alpha", " alpha ", "alpha"),
              "_Choice": ("json", "JSON", None), "_Text": (None, "/tmp/x", "/tmp/x"),
              "_Exclusions": (None, "6100,6200..6202", None), "_Group": (None, None, None)}

    def test_every_row_has_a_known_kind_and_help(self):
        for option in trop.OPTIONS:
            self.assertIn(type(option.value_type).__name__, self.SAMPLE, option)
            self.assertTrue(option.help, option)
        self.assertEqual(len(trop.OPTION), len(trop.OPTIONS), "duplicate option names")

    def test_derived_tables(self):
        self.assertEqual(trop.API_OPTIONS, {o.name for o in trop.OPTIONS if o.groups})
        self.assertEqual(trop.TOP_KEYS, ["project", "ports", "excluded_ports", "cleanup", "occupancy_check",
                                         "reservations", "disable_autoinit", "disable_autoprune",
                                         "disable_autoexpire", "allow_unrelated_path", "allow_change_project",
                                         "allow_change_task", "allow_change", "allow_unsafe_ports",
                                         "maximum_lock_wait_seconds", "output_format"])
        self.assertEqual(trop.OCCUPANCY_KEYS, ("skip", "skip_ip4", "skip_ip6", "skip_tcp", "skip_udp",
                                               "check_all_interfaces"))
        for option in trop.OPTIONS:
            for key in option.keys:
                self.assertIn(key, trop.DEFAULTS, option)

    def test_each_variable_sets_its_key(self):
        for option in trop.OPTIONS:
            expected, text, _flag = self.SAMPLE[type(option.value_type).__name__]
            if isinstance(option.value_type, trop._Choice):              # any of its choices, in capitals
                expected = option.value_type.choices[-1]
                text = expected.upper()
            for name in option.env:
                if not option.keys or expected is None:
                    continue
                with self.subTest(variable=name):
                    environ = {name: text}
                    if option.key == "ports.max_offset":
                        environ["TROP_PORT_MIN"] = "6000"
                    config = trop.Config([trop.env_layer(environ)]).validate()
                    self.assertEqual(config[option.key], expected)
                    self.assertEqual(config.sources[option.key], name)
        layer = trop.env_layer({"TROP_EXCLUDED_PORTS": self.SAMPLE["_Exclusions"][1]})
        self.assertEqual(layer.exclusions, [((6100, 6100), "TROP_EXCLUDED_PORTS"),
                                            ((6200, 6202), "TROP_EXCLUDED_PORTS")])

    def test_first_variable_of_a_row_wins_and_every_one_is_checked(self):
        config = trop.Config([trop.env_layer({"TROP_BUSY_TIMEOUT": "3", "TROP_MAXIMUM_LOCK_WAIT_SECONDS": "4"})])
        self.assertEqual(config["maximum_lock_wait_seconds"], 3)
        with self.assertRaises(trop.ConfigError):
            trop.env_layer({"TROP_ALLOW_PROJECT_CHANGE": "1", "TROP_ALLOW_CHANGE_PROJECT": "maybe"})

    def test_each_flag_is_an_api_keyword_and_sets_its_keys(self):
        for option in trop.OPTIONS:
            value = self.SAMPLE[type(option.value_type).__name__][2]
            if not (option.flag and option.keys) or value is None:
                continue
            with self.subTest(option=option.name):
                layer = trop.cli_layer({option.name: option.value_type.argument()["type"](value) if type(
                    option.value_type).__name__ in ("_Days", "_Seconds") else value if value != "true" else True})
                for key in option.keys:
                    self.assertIn(key, layer.values)

    def test_each_flag_is_on_the_commands_of_its_groups(self):
        users = {"global": list(trop.COMMANDS), "range": ["reserve", "scan"], "permissions": ["reserve",
                 "reserve-group", "autoreserve", "run"], "autoclean": ["reserve"], "expire": ["expire", "autoclean"],
                 "occupancy": ["reserve", "reserve-group", "autoreserve", "run", "port-info"],
                 "probes": ["scan"], "reserve": ["reserve"]}
        for option in trop.OPTIONS:
            for group in option.groups:
                for command in users[group]:
                    with self.subTest(option=option.name, command=command):
                        parser = trop.build_parser(command)
                        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
                        flags = {f for a in sub.choices[command]._actions for f in a.option_strings}
                        self.assertIn(option.flag, flags)


class TestConfiguration(unittest.TestCase):
    def config(self, environ):
        return trop.Config([trop.env_layer(environ)]).validate()

    def test_builtin_defaults(self):
        config = self.config({})
        self.assertEqual(config.port_range, trop.PortRange(5000, 7000))
        self.assertEqual(config["maximum_lock_wait_seconds"], 5)
        self.assertEqual(config["output_format"], "table")
        self.assertFalse(config.allow("unrelated_path"))

    def test_boolean_syntax(self):
        for text in ("true", "TRUE", "1", "yes", "On"):
            self.assertTrue(self.config({"TROP_ALLOW_UNRELATED_PATH": text})["allow_unrelated_path"], text)
        for text in ("false", "0", "No", "OFF"):
            self.assertFalse(self.config({"TROP_ALLOW_UNRELATED_PATH": text})["allow_unrelated_path"], text)

    def test_invalid_boolean(self):
        with self.assertRaises(trop.ConfigError) as ctx:
            self.config({"TROP_ALLOW_UNRELATED_PATH": "maybe"})
        self.assertEqual(ctx.exception.exit_code, 7)
        self.assertIn("validation error for 'TROP_ALLOW_UNRELATED_PATH': Invalid boolean value: 'maybe' "
                      "(expected true/false/1/0/yes/no/on/off)", str(ctx.exception))

    def test_port_range_from_environment(self):
        config = self.config({"TROP_PORT_MIN": "6000", "TROP_PORT_MAX": "6010"})
        self.assertEqual(config.port_range, trop.PortRange(6000, 6010))
        with self.assertRaises(trop.ConfigError):
            self.config({"TROP_PORT_MIN": "8000"})          # default max 7000 < min

    def test_busy_timeout_canonical_name_wins(self):
        config = self.config({"TROP_BUSY_TIMEOUT": "3", "TROP_MAXIMUM_LOCK_WAIT_SECONDS": "9"})
        self.assertEqual(config["maximum_lock_wait_seconds"], 3)
        self.assertEqual(self.config({"TROP_MAXIMUM_LOCK_WAIT_SECONDS": "9"})["maximum_lock_wait_seconds"], 9)

    def test_project_and_task_are_trimmed_and_non_empty(self):
        config = self.config({"TROP_PROJECT": "  app ", "TROP_TASK": "t1"})
        self.assertEqual((config["project"], config["task"]), ("app", "t1"))
        for name in ("TROP_PROJECT", "TROP_TASK"):
            with self.assertRaises(trop.ConfigError):
                self.config({name: "   "})

    def test_output_format(self):
        self.assertEqual(self.config({"TROP_OUTPUT_FORMAT": "JSON"})["output_format"], "json")
        with self.assertRaises(trop.ConfigError):
            self.config({"TROP_OUTPUT_FORMAT": "xml"})


class TestConfigSchema(unittest.TestCase):
    FULL_PROJECT = TestYamlReader.SAMPLE

    # What the reference's `exclude` writes back (B §5.2): every absent key as null.
    REFERENCE_WRITTEN = """\
project: null
ports:
  min: 5000
  max: 7000
  max_offset: null
excluded_ports:
- 8080
- start: 9000
  end: 9005
cleanup: null
occupancy_check: null
reservations: null
disable_autoinit: null
disable_autoprune: null
disable_autoexpire: null
allow_unrelated_path: null
allow_change_project: null
allow_change_task: null
allow_change: null
maximum_lock_wait_seconds: null
output_format: null
"""

    def problems(self, text, kind="project"):
        probs = trop.Problems("f.yaml")
        layer = trop.read_config_document(trop.parse_yaml(text), "f.yaml", kind, probs)
        return layer, probs.items

    def assertValid(self, text, kind="project"):
        layer, items = self.problems(text, kind)
        self.assertEqual(items, [], text)
        return layer

    def assertProblem(self, text, fragment, lines, kind="project"):
        """Exactly one problem, mentioning fragment, on one of lines."""
        lines = (lines,) if isinstance(lines, int) else lines
        _, items = self.problems(text, kind)
        self.assertEqual(len(items), 1, "%r -> %r" % (text, items))
        line, message = items[0]
        self.assertIn(fragment, message, text)
        self.assertIn(line, lines, "%r: %r" % (text, items))

    def test_valid_documents(self):
        self.assertValid(self.FULL_PROJECT, "project")
        _, items = self.problems(self.FULL_PROJECT, "user")     # project + reservations: project files only
        self.assertEqual([line for line, _ in items], [2, 17])
        for text in ("", "# only comments\n", "---\n", "{}"):
            self.assertValid(text, "user")
            self.assertValid(text, "project")
        self.assertValid('{"ports": {"min": 6000, "max_offset": 10}, "excluded_ports": [6001, "6002..6003"]}', "user")
        self.assertValid("reservations: null\n", "user")          # inert in user config

    def test_null_means_absent_for_every_optional_key(self):
        # The reference's schema is all Option<...>: a null value is the same as an absent key, and
        # its own `exclude` writes such files (B §5.2).  They must load.
        self.assertValid(self.REFERENCE_WRITTEN, "user")
        self.assertValid(self.REFERENCE_WRITTEN, "project")
        self.assertValid("ports: null\nproject: null\noutput_format: null\n", "project")
        self.assertValid("cleanup:\n  expire_after_days: null\noccupancy_check:\n  skip: null\n", "project")

    def test_exclusion_forms(self):
        layer = self.assertValid('excluded_ports:\n  - 5001\n  - "6000..6010"\n  - " 6100 .. 6105 "\n'
                                 '  - "7000"\n  - {start: 8000, end: 8001}\n  - start: 9000\n    end: 9000\n')
        self.assertEqual(layer.exclusions, [((5001, 5001), 2), ((6000, 6010), 3), ((6100, 6105), 4), ((7000, 7000), 5),
                                            ((8000, 8001), 6), ((9000, 9000), 7)])
        self.assertValid("excluded_ports: [1, 65535, \"1..65535\"]\n")

    def test_unknown_keys_with_path_and_line(self):
        self.assertProblem("project: x\nbogus: 1\n", "bogus", 2)
        self.assertProblem("ports:\n  min: 5000\n  maximum: 6000\n", "ports.maximum", 3)
        self.assertProblem("cleanup:\n  days: 3\n", "cleanup.days", 2)
        self.assertProblem("occupancy_check:\n  skip_ipv4: true\n", "occupancy_check.skip_ipv4", 2)
        self.assertProblem("reservations:\n  services:\n    web:\n      port: 1\n", "reservations.services.web.port", 4)
        self.assertProblem("reservations:\n  extra: 1\n  services:\n    web: {}\n", "reservations.extra", 2)
        self.assertProblem("excluded_ports:\n  - {start: 1, end: 2, step: 1}\n", "step", 2)
        self.assertProblem("task: x\n", "task", 1)                # no `task` key exists
        for text in ("bogus: 1\n", "ports:\n  min: 5000\n  maximum: 6000\n"):
            _, items = self.problems(text)
            self.assertIn("unknown field", items[0][1])

    def test_project_rules(self):
        self.assertEqual(self.assertValid("project: '  spaced  '\n").values["project"], "spaced")
        self.assertProblem("project: '   '\n", "empty", 1)
        self.assertProblem('project: "a\\0b"\n', "NUL", 1)
        self.assertProblem("project: " + "x" * 256 + "\n", "255", 1)
        self.assertValid("project: " + "x" * 255 + "\n")
        self.assertProblem("project: [a]\n", "string", 1)
        self.assertProblem("project: x\n", "project is only valid in trop.yaml/trop.local.yaml, not user config.yaml",
                           1, kind="user")

    def test_ports_rules(self):
        self.assertProblem("ports:\n  max: 6000\n", "min", (1, 2))                       # min is required
        self.assertProblem("ports:\n  min: 0\n", "ports.min", 2)
        self.assertProblem("ports:\n  min: 70000\n", "ports.min", 2)
        self.assertProblem("ports:\n  min: '5000'\n", "ports.min", 2)                    # wrong type
        self.assertProblem("ports:\n  min: 5000\n  max: true\n", "ports.max", 3)
        self.assertProblem("ports:\n  min: 6000\n  max: 5999\n", "min", 3)               # min > max
        self.assertValid("ports:\n  min: 6000\n  max: 6000\n")
        self.assertProblem("ports:\n  min: 5000\n  max: 6000\n  max_offset: 10\n",
                           "Cannot specify both max and max_offset", (1, 3, 4))
        self.assertProblem("ports:\n  min: 5000\n  max_offset: 0\n", "max_offset", 3)
        self.assertProblem("ports:\n  min: 65000\n  max_offset: 1000\n", "Offset 1000 would overflow", 3)
        self.assertValid("ports:\n  min: 65000\n  max_offset: 535\n")
        self.assertProblem("ports: 5000\n", "ports", 1)

    def test_exclusion_rules(self):
        self.assertProblem("excluded_ports: 5000\n", "excluded_ports", 1)
        self.assertProblem("excluded_ports:\n  - 1\n  - 2\n  - 0\n", "0", 4)
        self.assertProblem("excluded_ports:\n  - 70000\n", "70000", 2)
        self.assertProblem('excluded_ports:\n  - "9..8"\n', "Invalid range: 9..8 (end < start)", 2)
        self.assertProblem("excluded_ports:\n  - {start: 9, end: 8}\n", "Invalid range: 9..8 (end < start)", 2)
        self.assertProblem('excluded_ports:\n  - "1..70000"\n', "70000", 2)
        for bad in ('"abc"', '"1.."', '"..5"', "{start: 5}", "true", "1.5", "[1, 2]", '{start: "1", end: 2}', "-3"):
            _, items = self.problems("excluded_ports:\n  - 1\n  - %s\n" % bad)
            self.assertEqual(len(items), 1, (bad, items))
            self.assertEqual(items[0][0], 3, (bad, items))

    def test_cleanup_occupancy_flags_lock_output(self):
        self.assertEqual(self.assertValid("cleanup:\n  expire_after_days: 7\n").values["cleanup.expire_after_days"], 7)
        for bad in ("0", "-1", "'30'", "1.5"):
            self.assertProblem("cleanup:\n  expire_after_days: %s\n" % bad, "expire_after_days", 2)
        self.assertProblem("cleanup: 30\n", "cleanup", 1)
        self.assertProblem("occupancy_check:\n  skip: yes\n", "occupancy_check.skip", 2)   # YAML 1.2: a string
        self.assertProblem("occupancy_check:\n  skip_tcp: 1\n", "skip_tcp", 2)
        for key in ("disable_autoinit", "disable_autoprune", "disable_autoexpire", "allow_unrelated_path",
                    "allow_change_project", "allow_change_task", "allow_change"):
            self.assertEqual(self.assertValid("%s: true\n" % key).values[key], True)
            self.assertProblem("%s: 'true'\n" % key, key, 1)
            self.assertProblem("%s: on\n" % key, key, 1)
        self.assertValid("maximum_lock_wait_seconds: 2147483\n")
        self.assertValid("maximum_lock_wait_seconds: 0\n")
        self.assertProblem("maximum_lock_wait_seconds: 2147484\n", "Timeout must not exceed 2147483 seconds", 1)
        self.assertProblem("maximum_lock_wait_seconds: -1\n", "maximum_lock_wait_seconds", 1)
        self.assertProblem("maximum_lock_wait_seconds: '5'\n", "maximum_lock_wait_seconds", 1)
        for fmt in ("json", "csv", "tsv", "table"):
            self.assertValid("output_format: %s\n" % fmt)
        self.assertProblem("output_format: JSON\n", "output_format", 1)                 # lowercase only in YAML
        self.assertProblem("output_format: xml\n", "output_format", 1)

    def test_reservations_rules(self):
        group = "reservations:\n  base: 6000\n  services:\n    web: {}\n"
        self.assertValid(group)
        self.assertProblem(group, "reservations are only valid in trop.yaml/trop.local.yaml, not user config.yaml",
                           1, kind="user")
        self.assertProblem("reservations:\n  base: 6000\n", "services", (1, 2))          # services is required
        self.assertValid("reservations:\n  services: {}\n")       # passes validation; group commands fail later
        self.assertProblem("reservations:\n  base: 0\n  services:\n    web: {}\n", "base", 2)
        self.assertProblem("reservations:\n  services: [web]\n", "services", 2)
        S = "reservations:\n  services:\n"
        self.assertProblem(S + "    web: {offset: 1}\n    api: {offset: 1}\n", "offset", (3, 4))
        self.assertProblem(S + "    web:\n    api: {offset: 0}\n", "offset", (3, 4))   # implicit offset 0
        self.assertProblem(S + "    web: {}\n    api: {}\n", "offset", (3, 4))
        self.assertValid(S + "    web: {}\n    api: {offset: 1}\n")
        self.assertProblem(S + "    web: {offset: -1}\n", "offset", 3)
        self.assertProblem(S + "    web: {offset: 70000}\n", "offset", 3)
        self.assertProblem(S + "    web: {preferred: 8080}\n    api: {offset: 1, preferred: 8080}\n",
                           "preferred", (3, 4))
        self.assertProblem(S + "    web: {preferred: 0}\n", "preferred", 3)
        self.assertValid(S + "    web: {preferred: 65535}\n")           # may lie outside the ports range
        for env in ('"1X"', '"A-B"', '""', '"A B"', '"X' + "Y" * 255 + '"', "5"):
            self.assertProblem(S + "    web: {env: %s}\n" % env, "env", 3)
        self.assertValid(S + "    web: {env: _Web_1}\n")
        self.assertProblem(S + "    my.svc: {}\n", "my.svc", 3)                      # derived name invalid
        self.assertProblem(S + "    x: {env: PORT}\n    y: {offset: 1, env: port}\n", "port", (3, 4))
        self.assertProblem(S + "    web-a: {}\n    web_a: {offset: 1}\n", "WEB_A", (3, 4))
        self.assertProblem(S + '    "  ": {}\n', "tag", 3)
        self.assertProblem(S + '    x: {}\n    " x": {offset: 1}\n', "x", 4)            # duplicate after trim
        self.assertProblem(S + "    %s: {}\n" % ("t" * 256), "255", 3)

    def test_every_problem_reported(self):
        text = ("bogus: 1\nports:\n  min: 0\nexcluded_ports: [0]\ncleanup:\n  expire_after_days: 0\n"
                "output_format: xml\n")
        _, items = self.problems(text)
        self.assertEqual(sorted(line for line, _ in items), [1, 3, 4, 6, 7])

    def test_read_config_file_names_file_and_line(self):
        path = os.path.join(temp_dir(self), "trop.yaml")
        with open(path, "w") as fh:
            fh.write("ports:\n  min: 5000\n  bogus: 1\n")
        with self.assertRaises(trop.ConfigError) as cm:
            trop.read_config_file(path, "project")
        self.assertIn(path + ":3:", str(cm.exception))
        self.assertEqual(cm.exception.exit_code, 7)


class TestConfigMerge(unittest.TestCase):
    def layer(self, text, kind="project", source=None):
        probs = trop.Problems(source or kind)
        layer = trop.read_config_document(trop.parse_yaml(text), source or kind + ".yaml", kind, probs)
        self.assertEqual(probs.items, [], text)
        return layer

    def config(self, *layers):
        return trop.Config(list(layers)).validate()

    def test_builtin_defaults(self):
        cfg = self.config()
        self.assertEqual((cfg.port_range.min, cfg.port_range.max), (5000, 7000))
        self.assertEqual(cfg["cleanup.expire_after_days"], 30)
        self.assertEqual(cfg["maximum_lock_wait_seconds"], 5)
        self.assertEqual(cfg["output_format"], "table")
        self.assertEqual(len(cfg.exclusions), 0)
        self.assertIsNone(cfg.group)
        for key in ("skip", "skip_ip4", "skip_ip6", "skip_tcp", "skip_udp", "check_all_interfaces"):
            self.assertIs(getattr(cfg.occupancy, key), False)
        for key in ("disable_autoinit", "disable_autoprune", "disable_autoexpire", "allow_unrelated_path",
                    "allow_change_project", "allow_change_task", "allow_change"):
            self.assertIs(cfg[key], False)

    def test_scalars_override_in_order(self):
        user = self.layer("output_format: json\nmaximum_lock_wait_seconds: 9\n", "user")
        proj = self.layer("output_format: csv\n")
        local = self.layer("output_format: tsv\n")
        self.assertEqual(self.config(user)["output_format"], "json")
        self.assertEqual(self.config(user, proj)["output_format"], "csv")
        self.assertEqual(self.config(user, proj, local)["output_format"], "tsv")
        self.assertEqual(self.config(user, proj, local)["maximum_lock_wait_seconds"], 9)
        env = trop.env_layer({"TROP_OUTPUT_FORMAT": "JSON", "TROP_BUSY_TIMEOUT": "3"})
        self.assertEqual(self.config(user, proj, local, env)["output_format"], "json")
        self.assertEqual(self.config(user, proj, local, env)["maximum_lock_wait_seconds"], 3)
        cli = trop.cli_layer({"busy_timeout": 1})
        self.assertEqual(self.config(user, proj, local, env, cli)["maximum_lock_wait_seconds"], 1)

    def test_ports_pair_rule(self):
        def rng(*layers):
            r = self.config(*layers).port_range
            return r.min, r.max
        user = self.layer("ports: {min: 20000, max: 20010}\n", "user")
        self.assertEqual(rng(user, self.layer("ports: {min: 20005}\n")), (20005, 20010))      # max inherited
        user_off = self.layer("ports: {min: 20000, max_offset: 10}\n", "user")
        self.assertEqual(rng(user_off), (20000, 20010))
        self.assertEqual(rng(user_off, self.layer("ports: {min: 20100}\n")), (20100, 20110))  # offset inherited
        self.assertEqual(rng(user_off, self.layer("ports: {min: 20100, max: 20200}\n")), (20100, 20200))
        self.assertEqual(rng(user, self.layer("ports: {min: 20100, max_offset: 5}\n")), (20100, 20105))
        self.assertEqual(rng(user_off, trop.env_layer({"TROP_PORT_MAX": "20100"})), (20000, 20100))
        self.assertEqual(rng(user, trop.env_layer({"TROP_PORT_MAX_OFFSET": "3"})), (20000, 20003))
        self.assertEqual(rng(user_off, trop.cli_layer({"max": 20050})), (20000, 20050))
        self.assertEqual(rng(user, trop.env_layer({"TROP_PORT_MIN": "20001"}), trop.cli_layer({"min": 20002})),
                         (20002, 20010))

    def test_merged_result_is_validated_and_attributed(self):
        user = self.layer("ports: {min: 6000, max: 6100}\n", "user", "/u/config.yaml")
        proj = self.layer("ports: {min: 6200}\n", "project", "/p/trop.yaml")
        with self.assertRaises(trop.ConfigError) as cm:
            self.config(user, proj)
        self.assertIn("/u/config.yaml", str(cm.exception))          # the winning source of ports.max
        self.assertEqual(cm.exception.exit_code, 7)
        # an environment value can be repaired by a flag
        env = trop.env_layer({"TROP_PORT_MAX": "5500"})
        self.assertEqual(self.config(user, env, trop.cli_layer({"max": 6300})).port_range.max, 6300)

    def test_exclusions_accumulate(self):
        user = self.layer("excluded_ports: [100]\n", "user")
        proj = self.layer("excluded_ports: ['101..102']\n")
        local = self.layer("excluded_ports: [{start: 103, end: 103}]\n")
        env = trop.env_layer({"TROP_EXCLUDED_PORTS": " 104 , ,105..106,"})
        cfg = self.config(user, proj, local, env)
        self.assertEqual(cfg.exclusions.ranges, [(100, 106)])
        for port in range(100, 107):
            self.assertIn(port, cfg.exclusions)
        self.assertNotIn(107, cfg.exclusions)

    def test_occupancy_and_cleanup_leaf_by_leaf(self):
        user = self.layer("occupancy_check: {skip_tcp: true, skip_ip6: true}\n"
                          "cleanup: {expire_after_days: 10}\n", "user")
        proj = self.layer("occupancy_check: {skip_udp: true}\ncleanup: {}\n")
        local = self.layer("occupancy_check: {skip_tcp: false}\n")
        env = trop.env_layer({"TROP_CHECK_ALL_INTERFACES": "yes"})
        occ = self.config(user, proj, local, env).occupancy
        self.assertEqual((occ.skip, occ.skip_ip4, occ.skip_ip6, occ.skip_tcp, occ.skip_udp, occ.check_all_interfaces),
                         (False, False, True, False, True, True))
        self.assertEqual(self.config(user, proj, local)["cleanup.expire_after_days"], 10)
        self.assertEqual(self.config(user, self.layer("cleanup: {expire_after_days: 2}\n"))
                         ["cleanup.expire_after_days"], 2)

    def test_reservations_replaced_whole_or_cleared(self):
        proj = self.layer("reservations:\n  base: 6000\n  services:\n    web: {}\n    api: {offset: 1}\n")
        tags = lambda cfg: sorted(s.tag for s in cfg.group.services)   # noqa: E731
        self.assertEqual(tags(self.config(proj)), ["api", "web"])
        self.assertEqual(tags(self.config(proj, self.layer("project: x\n"))), ["api", "web"])      # omitted: inherit
        local = self.layer("reservations:\n  services:\n    db: {offset: 2}\n")
        cfg = self.config(proj, local)
        self.assertEqual(tags(cfg), ["db"])                                                      # replaced whole
        self.assertIsNone(cfg.group.base)
        self.assertIsNone(self.config(proj, self.layer("reservations: null\n")).group)            # cleared
        user = self.layer("reservations: null\n", "user")
        self.assertEqual(tags(self.config(user, proj)), ["api", "web"])


class TestConfigLayersCLI(TropTestCase):
    def reserve(self, tag, *extra, cwd=None, env=None):
        environment = dict(SKIP_PROBES, **(env or {}))
        rc, out, err = self.trop("--data-dir", self.data, "reserve", "--tag", tag, *extra, cwd=cwd, env=environment)
        self.assertNoTraceback(err)
        self.assertEqual(rc, 0, err)
        return int(out)

    def test_precedence_chain(self):
        # level i adds one more source over level i-1; each level in its own tree, run in parallel
        env = dict(SKIP_PROBES, TROP_PORT_MIN="44000", TROP_PORT_MAX="44009")
        levels = [([], SKIP_PROBES), ([], SKIP_PROBES), ([], SKIP_PROBES), ([], env),
                  (["--min", "45000", "--max", "45009"], env)]
        calls = []
        for i, (extra, environment) in enumerate(levels):
            self.write("d%d/config.yaml" % i, "ports: {min: 41000, max: 41009}\n")
            if i >= 1:
                self.write("p%d/trop.yaml" % i, "ports:\n  min: 42000\n  max: 42009\n")
            if i >= 2:
                self.write("p%d/trop.local.yaml" % i, "ports:\n  min: 43000\n  max: 43009\n")
            calls.append((["--data-dir", os.path.join(self.root, "d%d" % i), "reserve"] + extra,
                          {"cwd": self.mkdir("p%d" % i, "sub"), "env": environment}))
        results = self.trop_many(calls)
        for (rc, out, err) in results:
            self.assertNoTraceback(err)
        self.assertEqual([(rc, out) for rc, out, err in results],
                         [(0, "41000\n"),      # user config
                          (0, "42000\n"),      # trop.yaml
                          (0, "43000\n"),      # trop.local.yaml
                          (0, "44000\n"),      # environment
                          (0, "45000\n")],     # command line
                         [err for _, _, err in results])

    def test_exclusions_accumulate_across_layers(self):
        self.write("data/config.yaml", "excluded_ports: [46000]\n")
        self.write("proj/trop.yaml", "excluded_ports: ['46001..46002']\n")
        self.write("proj/trop.local.yaml", "excluded_ports:\n  - {start: 46003, end: 46003}\n")
        port = self.reserve("x", "--min", "46000", "--max", "46010", cwd=self.mkdir("proj"),
                            env={"TROP_EXCLUDED_PORTS": "46004, 46005"})
        self.assertEqual(port, 46006)

    def test_only_the_nearest_directory_contributes(self):
        self.write("proj/trop.yaml", "ports: {min: 47000, max: 47009}\nexcluded_ports: [47100]\nbogus: key\n")
        self.write("proj/sub/trop.local.yaml", "ports: {min: 47100, max: 47109}\n")
        deep = self.mkdir("proj", "sub", "deep", "er")
        # the malformed parent trop.yaml is never read, and its exclusion does not apply
        self.assertEqual(self.reserve("n", cwd=deep), 47100)
        rc, out, err = self.trop("--data-dir", self.data, "list", cwd=self.mkdir("proj"))
        self.assertEqual(rc, 7, err)

    def test_discovery_walks_up_from_the_canonical_cwd(self):
        self.write("a/trop.yaml", "ports: {min: 48000, max: 48009}\n")
        self.write("b/trop.yaml", "ports: {min: 49000, max: 49009}\n")
        inner = self.mkdir("b", "inner")
        link = os.path.join(self.root, "a", "link")
        os.symlink(inner, link)
        self.assertEqual(self.reserve("s", cwd=link, env={"PWD": link}), 49000)

    def test_group_replaced_or_cleared_by_trop_local_yaml(self):
        group = ("ports: {min: 25000, max: 25100}\nreservations:\n  base: 25000\n"
                 "  services:\n    web: {}\n    api: {offset: 1}\n")
        locals_ = [None, "reservations:\n  base: 25050\n  services:\n    db: {}\n", "reservations: null\n",
                   "project: inherit\n"]
        calls = []
        for i, local in enumerate(locals_):
            self.write("p%d/trop.yaml" % i, group)
            if local is not None:
                self.write("p%d/trop.local.yaml" % i, local)
            calls.append((["--data-dir", os.path.join(self.root, "d%d" % i), "autoreserve", "--format", "json"],
                          {"cwd": self.mkdir("p%d" % i), "env": SKIP_PROBES}))
        results = self.trop_many(calls)
        parsed = [(rc, json.loads(out) if rc == 0 else out) for rc, out, err in results]
        errors = [err for _, _, err in results]
        self.assertEqual(parsed[0], (0, {"web": 25000, "api": 25001}), errors[0])      # trop.yaml alone
        self.assertEqual(parsed[1], (0, {"db": 25050}), errors[1])                      # replaced whole
        self.assertEqual(parsed[2], (6, ""), errors[2])                                 # cleared by null
        self.assertIn("does not contain a reservation group", errors[2])
        self.assertEqual(parsed[3], (0, {"web": 25000, "api": 25001}), errors[3])      # omitted: inherited

    def test_malformed_file_fails_every_discover_command(self):
        proj = self.mkdir("proj")
        bad = self.write("proj/trop.yaml", "ports:\n  min: 5000\n  bogus: 1\n")
        commands = [
            ["reserve"], ["release"], ["list"], ["autoreserve"], ["prune"], ["expire"], ["autoclean"],
            ["assert-reservation"], ["assert-port", "5000"], ["port-info", "5000"],
            ["scan", "--min", "5000", "--max", "5001"], ["exclude", "5000"], ["list-projects"],
            ["migrate", "--from", proj, "--to", os.path.join(self.root, "elsewhere")],
            ["assert-data-dir", "--validate"], ["reserve-group", bad],
        ]
        results = self.trop_many([(["--data-dir", self.data] + cmd, {"cwd": proj}) for cmd in commands])
        for cmd, (rc, out, err) in zip(commands, results):
            self.assertNoTraceback(err, cmd)
            self.assertEqual(rc, 7, "%s: %s" % (cmd, err))
            self.assertIn(bad + ":3:", err, cmd)
            self.assertTrue(err.startswith("Error: "), (cmd, err))
            self.assertEqual(out, "", cmd)
        self.assertEqual(self.read(bad), b"ports:\n  min: 5000\n  bogus: 1\n")
        self.assertFalse(os.path.exists(os.path.join(self.data, "trop.db")))

    def test_malformed_user_config_fails_commands_but_not_scope_none(self):
        user = self.write("data/config.yaml", "excluded_ports:\n  - 80\n  - &a 81\n")
        calls = [["reserve"], ["list"], ["exclude", "9000"], ["port-info", "5000"],
                 ["show-data-dir"], ["show-path"], ["completions", "bash"],
                 ["validate", self.write("good.yaml", "ports: {min: 1, max: 2}\n")]]
        results = self.trop_many([(["--data-dir", self.data] + c, {"cwd": self.proj}) for c in calls])
        for cmd, (rc, out, err) in zip(calls[:4], results[:4]):
            self.assertEqual(rc, 7, (cmd, err))
            self.assertIn(user + ":3:", err, cmd)
            self.assertIn("anchor", err, cmd)
            self.assertNoTraceback(err, cmd)
        for cmd, (rc, out, err) in zip(calls[4:], results[4:]):
            self.assertEqual(rc, 0, (cmd, err))
            self.assertNoTraceback(err, cmd)
        rc, out, err = self.trop("init", "--data-dir", self.data, "--with-config")   # init reads no YAML file
        self.assertEqual(rc, 0, err)
        self.assertIn("already exists", out)
        self.assertEqual(self.read(user), b"excluded_ports:\n  - 80\n  - &a 81\n")

    def test_bad_environment_values_exit_7(self):
        envs = [{"TROP_PORT_MIN": "abc"}, {"TROP_PORT_MAX": "70000"}, {"TROP_SKIP_TCP": "maybe"},
                {"TROP_OUTPUT_FORMAT": "xml"}, {"TROP_EXCLUDED_PORTS": "9..8"}, {"TROP_EXCLUDED_PORTS": "80,abc"}]
        results = self.trop_many([(["--data-dir", self.data, "reserve", "--skip-occupancy-check"], {"env": env})
                                  for env in envs])
        for env, (rc, out, err) in zip(envs, results):
            self.assertNoTraceback(err, env)
            self.assertEqual(rc, 7, (env, err))
            self.assertIn(list(env)[0], err)
            self.assertEqual(out, "", env)


class TestConfigBadInput(TropTestCase):
    SERVICES = "reservations:\n  services:\n"
    CASES = [
        # name, file content, acceptable lines, fragment (lower-case) of the message
        ("unknown key", "ports:\n  min: 5000\n  maximum: 6000\n", (3,), "ports.maximum"),
        ("wrong type", "ports:\n  min: five\n", (2,), "ports.min"),
        ("min > max", "ports:\n  min: 6000\n  max: 5000\n", (2, 3), "min"),
        ("max with max_offset", "ports:\n  min: 5000\n  max: 6000\n  max_offset: 10\n", (1, 3, 4), "max_offset"),
        ("offset collision", SERVICES + "    web: {offset: 1}\n    api: {offset: 1}\n", (3, 4), "offset"),
        ("duplicate preferred", SERVICES + "    web: {preferred: 8080}\n    api: {offset: 1, preferred: 8080}\n",
         (3, 4), "preferred"),
        ("bad env name", SERVICES + "    web: {env: '1X'}\n", (3,), "env"),
        ("tab indentation", "ports:\n\tmin: 5000\n", (2,), "tab"),
        ("anchor", "ports: &p\n  min: 5000\n", (1,), "anchor"),
        ("block scalar", "project: |\n  x\n", (1,), "block scalar"),
        ("duplicate key", "project: a\nports: {min: 5000}\nproject: b\n", (3,), "duplicate key"),
        ("unterminated quote", "project: 'abc\n", (1,), "unterminated"),
        ("invalid utf-8", b"project: a\nports:\n  min: \xff\n", (3,), "utf-8"),
    ]

    def test_each_bad_file(self):
        calls, paths = [], []
        for i, (name, content, lines, fragment) in enumerate(self.CASES):
            proj = self.mkdir("p%d" % i)
            path = self.write("p%d/trop.yaml" % i, content)
            paths.append(path)
            data = os.path.join(self.root, "d%d" % i)
            calls.append((["--data-dir", data, "list"], {"cwd": proj}))
        results = self.trop_many(calls)
        for i, (name, content, lines, fragment) in enumerate(self.CASES):
            path = paths[i]
            (rc, out, err), (vrc, vout, verr) = results[i], trop_main("validate", path)
            self.assertNoTraceback(err, name)
            self.assertNoTraceback(verr, name)
            self.assertEqual(rc, 7, "%s: %s" % (name, err))
            self.assertEqual(out, "", name)
            self.assertTrue(any("%s:%d:" % (path, n) in err for n in lines), "%s: %s" % (name, err))
            self.assertIn(fragment, err.lower(), name)
            self.assertEqual(vrc, 1, "%s: %s" % (name, verr))
            self.assertEqual(vout, "", name)
            self.assertTrue(any(re.search(r"(?m)^%s:%d: " % (re.escape(path), n), verr) for n in lines),
                            "%s: %s" % (name, verr))
            self.assertIn(fragment, verr.lower(), name)
            self.assertTrue(verr.splitlines()[-1].startswith("Error: "), (name, verr))

    def test_project_key_in_user_config(self):
        user = self.write("data/config.yaml", "# user\nproject: nope\n")
        rc, out, err = self.trop("--data-dir", self.data, "reserve", env=SKIP_PROBES)
        vrc, vout, verr = trop_main("validate", user)
        self.assertEqual(rc, 7, err)
        self.assertIn(user + ":2:", err)
        self.assertIn("project is only valid in trop.yaml/trop.local.yaml, not user config.yaml", err)
        self.assertEqual(vrc, 1, verr)
        self.assertIn(user + ":2: ", verr)
        self.assertNoTraceback(err + verr)

    def test_file_that_is_a_directory(self):
        proj = self.mkdir("proj")
        path = self.mkdir("proj", "trop.yaml")
        rc, out, err = self.trop("--data-dir", self.data, "list", cwd=proj)
        vrc, vout, verr = trop_main("validate", path)
        self.assertEqual(rc, 7, err)
        self.assertIn(path, err)
        self.assertIn("directory", err)
        self.assertNoTraceback(err + verr)
        self.assertIn(path, verr)
        self.assertEqual(vrc, 1, "validate of a directory: %s" % verr)       # issue: validate failures exit 1

    def test_fifo_is_a_clear_error_not_a_hang(self):
        if not hasattr(os, "mkfifo"):
            self.skipTest("no FIFOs on this platform")
        proj = self.mkdir("proj")
        path = os.path.join(proj, "trop.yaml")
        os.mkfifo(path)
        procs = [self.start("--data-dir", self.data, "list", cwd=proj), self.start("validate", path, cwd=proj)]
        deadline = time.time() + 3
        (rc, out, err), (vrc, vout, verr) = [finish(p, max(0.1, deadline - time.time())) for p in procs]
        self.assertIsNotNone(rc, "`list` hung reading a FIFO trop.yaml")
        self.assertIsNotNone(vrc, "`validate` hung reading a FIFO")
        self.assertEqual(rc, 7, err)
        self.assertIn(path, err)
        self.assertEqual(vrc, 1, verr)
        self.assertIn(path, verr)
        self.assertNoTraceback(err + verr)

    def test_dangling_symlink(self):
        proj = self.mkdir("proj")
        path = os.path.join(proj, "trop.yaml")
        os.symlink(os.path.join(self.root, "missing.yaml"), path)
        rc, out, err = self.trop("--data-dir", self.data, "list", cwd=proj)
        vrc, vout, verr = trop_main("validate", path)
        self.assertEqual(rc, 7, err)
        self.assertIn(path, err)
        self.assertEqual(vrc, 4, verr)                                  # validate: missing file -> 4
        self.assertIn(path, verr)
        self.assertNoTraceback(err + verr)

    @unittest.skipIf(hasattr(os, "geteuid") and os.geteuid() == 0, "root reads files whatever their mode")
    def test_unreadable_file(self):
        proj = self.mkdir("proj")
        path = self.write("proj/trop.yaml", "project: x\n")
        os.chmod(path, 0)
        rc, out, err = self.trop("--data-dir", self.data, "list", cwd=proj)
        vrc, vout, verr = trop_main("validate", path)
        self.assertEqual(rc, 7, err)
        self.assertIn(path, err)
        self.assertIn(vrc, (1,), verr)
        self.assertIn(path, verr)
        self.assertNoTraceback(err + verr)

    def test_ten_megabyte_file(self):
        proj = self.mkdir("proj")
        path = self.write("proj/trop.yaml", b"# padding\n" * (1024 * 1024))
        self.assertGreaterEqual(os.path.getsize(path), 10 * 1024 * 1024)
        rc, out, err = self.trop("--data-dir", self.data, "list", cwd=proj)
        vrc, vout, verr = trop_main("validate", path)
        self.assertEqual(rc, 7, err)
        self.assertIn(path, err)
        self.assertEqual(vrc, 1, verr)
        self.assertIn(path, verr)
        self.assertLess(len(err) + len(verr), 2000)
        self.assertNoTraceback(err + verr)


class TestValidateCommand(TropTestCase):
    def test_valid_files(self):
        files = [self.write("full.yaml", TestYamlReader.SAMPLE), self.write("empty.yaml", ""),
                 self.write("comments.yaml", "# nothing\n"), self.write("j.json", '{"ports": {"min": 6000}}'),
                 self.write("u/config.yaml", "ports: {min: 6000, max: 6100}\nreservations: null\n")]
        for path in files:
            self.assertEqual(trop_main("validate", path), (0, "Configuration is valid\n", ""), path)

    def test_reference_written_file_is_valid(self):
        user = self.write("u/config.yaml", TestConfigSchema.REFERENCE_WRITTEN)
        proj = self.write("p/trop.yaml", TestConfigSchema.REFERENCE_WRITTEN)
        for path in (user, proj):
            rc, out, err = trop_main("validate", path)
            self.assertEqual((rc, out), (0, "Configuration is valid\n"), err)

    def test_lists_every_problem_in_file_line_form(self):
        path = self.write("trop.yaml", "bogus: 1\nports:\n  min: 0\nexcluded_ports: [0]\ncleanup:\n"
                                       "  expire_after_days: 0\noutput_format: xml\n")
        rc, out, err = self.trop("validate", path)
        self.assertEqual(rc, 1, err)
        self.assertEqual(out, "")
        lines = err.splitlines()
        prefixes = [line.split(": ", 1)[0] for line in lines[:-1]]
        self.assertEqual(prefixes, ["%s:%d" % (path, n) for n in (1, 3, 4, 6, 7)], err)
        self.assertTrue(lines[-1].startswith("Error: "), lines[-1])
        self.assertNoTraceback(err)

    def test_relative_path_reported_as_given(self):
        self.write("proj/rel.yaml", "ports:\n  min: 5000\n  maximum: 1\n")
        rc, out, err = self.trop("validate", "rel.yaml")
        self.assertEqual(rc, 1)
        self.assertTrue(err.startswith("rel.yaml:3: "), err)

    def test_rules_chosen_by_basename(self):
        text = "project: x\nreservations:\n  services:\n    web: {}\n"
        user, other = self.write("a/config.yaml", text), self.write("a/other.yaml", text)
        (urc, _, uerr), (orc, oout, oerr) = trop_main("validate", user), trop_main("validate", other)
        self.assertEqual(urc, 1, uerr)
        self.assertIn(user + ":1: ", uerr)
        self.assertIn(user + ":2: ", uerr)
        self.assertEqual((orc, oout), (0, "Configuration is valid\n"), oerr)

    def test_missing_file(self):
        path = os.path.join(self.root, "nope.yaml")
        rc, out, err = self.trop("validate", path)
        self.assertEqual((rc, out), (4, ""))
        self.assertIn(path, err)
        self.assertTrue(err.startswith("Error: "), err)


class TestExcludeCommand(TropTestCase):
    PREFIX = ("# Team ports \u2014 don't touch   \n"
              "project:   'shop'    # quoted, odd spacing\n"
              "ports: {min: 41000, max: 41999}   # flow\n"
              "\n"
              "# exclusions below\t(tab in comment)\n")
    BLOCK = ("excluded_ports:        # keep this comment\n"
             "  - 41001\n"
             "  - \"41010..41012\"\n")
    SUFFIX = ("# trailing section\n"
              "cleanup:\n"
              "    expire_after_days: 9   # four-space indent\n"
              "occupancy_check: {skip_udp: true}\n"
              "# end, no newline at EOF")

    def assertOnlyExclusionsChanged(self, path, expected):
        new = self.read(path).decode("utf-8")
        self.assertTrue(new.startswith(self.PREFIX), new)
        self.assertTrue(new.endswith(self.SUFFIX), new)
        middle = new[len(self.PREFIX):len(new) - len(self.SUFFIX)]
        self.assertTrue(middle.startswith("excluded_ports:"), middle)
        self.assertIn("# keep this comment", middle.splitlines()[0])
        self.assertEqual(self.exclusions(path), expected)

    def test_comments_and_other_bytes_preserved(self):
        proj = self.mkdir("proj")
        path = self.write("proj/trop.yaml", self.PREFIX + self.BLOCK + self.SUFFIX)
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "41100..41105", cwd=self.mkdir("proj", "sub"))
        self.assertEqual((rc, out), (0, "Added exclusion to %s\n" % path), err)
        self.assertOnlyExclusionsChanged(path, [(41001, 41001), (41010, 41012), (41100, 41105)])
        rc, out, err = self.trop("validate", path)
        self.assertEqual(rc, 0, err)
        self.assertEqual(sorted(os.listdir(proj)), ["sub", "trop.yaml"])            # no temporary files left

    def test_key_absent_is_appended_after_untouched_text(self):
        original = "# only settings\nports:\n  min: 5000   # c\noutput_format: json"
        path = self.write("proj/trop.yaml", original)
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "6000", cwd=self.mkdir("proj"))
        self.assertEqual(rc, 0, err)
        self.assertTrue(self.read(path).decode().startswith(original + "\n"))
        self.assertEqual(self.exclusions(path), [(6000, 6000)])

    def test_duplicate_is_not_added(self):
        path = self.write("proj/trop.yaml", self.PREFIX + self.BLOCK + self.SUFFIX)
        before = self.read(path)
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "41010..41012", cwd=self.mkdir("proj"))
        self.assertEqual((rc, out), (0, "Exclusion already exists in %s\n" % path), err)
        self.assertEqual(self.read(path), before)

    def test_writer_target(self):
        proj = self.mkdir("proj")
        user = os.path.join(self.data, "config.yaml")
        # no project file: the user config, created together with the data directory
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "7001", cwd=proj)
        self.assertEqual((rc, out), (0, "Added exclusion to %s\n" % user), err)
        self.assertEqual(self.exclusions(user), [(7001, 7001)])
        tyaml = self.write("proj/trop.yaml", "# t\n")
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "7002", cwd=proj)
        self.assertEqual((rc, out), (0, "Added exclusion to %s\n" % tyaml), err)
        local = self.write("proj/trop.local.yaml", "# l\n")
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "7003", cwd=proj)
        self.assertEqual((rc, out), (0, "Added exclusion to %s\n" % local), err)
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "7004", "--global", cwd=proj)
        self.assertEqual((rc, out), (0, "Added exclusion to %s\n" % user), err)
        self.assertEqual(self.exclusions(user), [(7001, 7001), (7004, 7004)])
        self.assertEqual(self.exclusions(tyaml), [(7002, 7002)])
        self.assertEqual(self.exclusions(local), [(7003, 7003)])
        # and the written exclusions are honoured by reserve
        rc, out, err = self.trop("--data-dir", self.data, "reserve", "--min", "7001", "--max", "7010", cwd=proj,
                                 env=SKIP_PROBES)
        self.assertEqual((rc, out), (0, "7005\n"), err)

    def test_invalid_input_exit_4_and_nothing_written(self):
        path = self.write("proj/trop.yaml", self.PREFIX + self.BLOCK + self.SUFFIX)
        before = self.read(path)
        bad = ["0", "0..5", "9..8", "70000", "1..70000", "abc", ""]
        results = self.trop_many([(["--data-dir", self.data, "exclude", "--", b], {"cwd": self.mkdir("proj")})
                                  for b in bad])
        for arg, (rc, out, err) in zip(bad, results):
            self.assertEqual(rc, 4, (arg, err))
            self.assertEqual(out, "", arg)
            self.assertTrue(err.startswith("Error: "), (arg, err))
            self.assertNoTraceback(err, arg)
        self.assertEqual(self.read(path), before)
        self.assertFalse(os.path.exists(os.path.join(self.data, "config.yaml")))

    def test_reserved_port_needs_force(self):
        proj = self.mkdir("proj")
        path = self.write("proj/trop.yaml", "# keep\n")
        rc, out, err = self.trop("--data-dir", self.data, "reserve", "--min", "50000", "--max", "50009", cwd=proj,
                                 env=SKIP_PROBES)
        self.assertEqual((rc, out), (0, "50000\n"), err)
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "49990..50005", cwd=proj)
        self.assertEqual((rc, out), (4, ""))
        self.assertIn("Port 50000 is reserved", err)
        self.assertEqual(self.read(path), b"# keep\n")
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "49990..50005", "--force", cwd=proj)
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.exclusions(path), [(49990, 50005)])

    def test_malformed_target_untouched(self):
        original = b"# c\nexcluded_ports: [1]\nports: &x {min: 1}\n"
        path = self.write("proj/trop.yaml", original)
        rc, out, err = self.trop("--data-dir", self.data, "exclude", "5", cwd=self.mkdir("proj"))
        self.assertEqual(rc, 7, err)
        self.assertIn(path + ":3:", err)
        self.assertEqual(self.read(path), original)

    def test_concurrent_excludes_all_land(self):
        proj = self.mkdir("proj")
        path = self.write("proj/trop.yaml", self.PREFIX + self.BLOCK + self.SUFFIX)
        rc, _, err = self.trop("--data-dir", self.data, "list", cwd=proj)                # create the database
        self.assertEqual(rc, 0, err)
        expected = [(41001, 41001), (41010, 41012)]
        for round_, count in enumerate((2, 4)):
            ports = [str(42000 + 10 * round_ + i) for i in range(count)]
            results = self.trop_many([(["--data-dir", self.data, "exclude", p], {"cwd": proj}) for p in ports])
            for p, (rc, out, err) in zip(ports, results):
                self.assertEqual((rc, out), (0, "Added exclusion to %s\n" % path), (p, err))
            expected += [(int(p), int(p)) for p in ports]
            self.assertEqual(sorted(self.exclusions(path)), sorted(expected))
        self.assertOnlyExclusionsChanged(path, self.exclusions(path))
        self.assertEqual(sorted(os.listdir(proj)), ["trop.yaml"])


class TestCompactExclusions(TropTestCase):
    HEAD = "# head comment\nproject: p   # keep\n"
    TAIL = "# tail comment\ncleanup:\n  expire_after_days: 3  # keep too\n"

    def test_merges_overlapping_and_adjacent(self):
        body = ('excluded_ports:\n  - 5\n  - 3\n  - 4\n  - "1..2"\n  - {start: 10, end: 12}\n  - 11\n'
                '  - " 13 "\n  - 20\n  - 5\n')
        path = self.write("trop.yaml", self.HEAD + body + self.TAIL)
        rc, out, err = self.trop("compact-exclusions", path)
        self.assertEqual((rc, out), (0, "Compacted 9 exclusions to 3\nUpdated %s\n" % path), err)
        new = self.read(path).decode()
        self.assertTrue(new.startswith(self.HEAD) and new.endswith(self.TAIL), new)
        self.assertEqual(self.exclusions(path), [(1, 5), (10, 13), (20, 20)])
        rc, out, err = self.trop("validate", path)
        self.assertEqual(rc, 0, err)

    def test_result_is_minimal_for_a_random_set(self):
        rng = random.Random(7)
        entries, ports = [], set()
        for _ in range(60):
            a = rng.randint(1000, 1400)
            b = a + rng.choice([0, 0, 1, 3, 10])
            entries.append(str(a) if a == b else '"%d..%d"' % (a, b))
            ports.update(range(a, b + 1))
        path = self.write("x.yaml", "excluded_ports:\n" + "".join("  - %s\n" % e for e in entries))
        rc, out, err = trop_main("compact-exclusions", path)
        self.assertEqual(rc, 0, err)
        got = self.exclusions(path)
        covered = set()
        for s, e in got:
            covered.update(range(s, e + 1))
        self.assertEqual(covered, ports)
        self.assertEqual(got, sorted(got))
        for (s1, e1), (s2, e2) in zip(got, got[1:]):
            self.assertGreater(s2, e1 + 1)                  # disjoint and not adjacent: minimal

    def test_dry_run_writes_nothing(self):
        path = self.write("trop.yaml", self.HEAD + "excluded_ports: [1, 2, 3]\n" + self.TAIL)
        before = self.read(path)
        rc, out, err = trop_main("compact-exclusions", path, "--dry-run")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("Compacted 3 exclusions to 1\nDry run - no changes made\n"), out)
        self.assertIn("Would save:", out)
        self.assertEqual(self.read(path), before)

    def test_nothing_to_do(self):
        cases = {"opt.yaml": (self.HEAD + "excluded_ports:\n  - {start: 1, end: 5}\n  - 7\n" + self.TAIL,
                              "Exclusions already optimal\n"),
                 "reordered.yaml": (self.HEAD + "excluded_ports: [7, 1]\n" + self.TAIL,
                                    "Exclusions already optimal\n"),     # count-based (B §3.11, §5.3)
                 "none.yaml": (self.HEAD + self.TAIL, "No exclusions to compact\n"),
                 "null.yaml": (self.HEAD + "excluded_ports: null\n" + self.TAIL, "No exclusions to compact\n")}
        paths = {name: self.write(name, text) for name, (text, _) in cases.items()}
        results = [trop_main("compact-exclusions", paths[n]) for n in cases]
        for name, (rc, out, err) in zip(cases, results):
            self.assertEqual((rc, out), (0, cases[name][1]), (name, err))
            self.assertEqual(self.read(paths[name]), cases[name][0].encode(), name)

    def test_errors(self):
        missing = os.path.join(self.root, "missing.yaml")
        bad = self.write("bad.yaml", "# c\nexcluded_ports: [1, 2]\nx: &y 1\n")
        invalid = self.write("inv.yaml", "excluded_ports: [3, 0]\n")
        (mrc, _, merr), (brc, _, berr), (irc, _, ierr) = [trop_main("compact-exclusions", p)
                                                          for p in (missing, bad, invalid)]
        self.assertEqual(mrc, 4, merr)
        self.assertIn(missing, merr)
        self.assertEqual(brc, 7, berr)
        self.assertIn(bad + ":3:", berr)
        self.assertEqual(irc, 7, ierr)
        self.assertIn(invalid + ":1:", ierr)
        self.assertNoTraceback(merr + berr + ierr)
        self.assertEqual(self.read(bad), b"# c\nexcluded_ports: [1, 2]\nx: &y 1\n")


class TestInitConfigTemplate(TropTestCase):
    def test_template_names_every_file_key_of_the_option_table(self):
        """Generated from OPTIONS: each key a user file may hold is an example under its section, with its
        value; each project-only key is named; the uncommented examples read back as those values."""
        text = trop.config_template()
        for key, option in trop.FILE_OPTIONS.items():
            top, _, leaf = key.partition(".")
            if option.files == "project":
                self.assertIn("`%s:`" % key, text)
                continue
            if leaf:
                section = re.search(r"(?ms)^# %s:\n((?:#   .*\n)+)" % top, text)
                self.assertIsNotNone(section, key)
                self.assertRegex(section.group(1), r"(?m)^#   (# )?%s:" % leaf, key)
            else:
                self.assertRegex(text, r"(?m)^# %s:" % key, key)
        examples = "".join(m.group(1) + "\n" for m in re.finditer(r"(?m)^# ( *(?:[a-z0-9_]+:|- ).*)$", text))
        problems = trop.Problems("template")
        layer = trop.read_config_document(trop.parse_yaml(examples), "template", "user", problems)
        self.assertEqual(problems.items, [])
        for key, option in trop.FILE_OPTIONS.items():
            if option.files != "any" or key == "excluded_ports":
                continue
            if option.default is None and option.clears:     # the commented alternative (max_offset)
                self.assertIsNone(layer.values.get(key), key)
            else:
                self.assertEqual(layer.values[key], option.example, key)
        self.assertEqual([rng for rng, _line in layer.exclusions], [(5432, 5432), (6000, 6010), (6379, 6380)])

    def test_template_is_valid_and_mentions_every_key(self):
        rc, out, err = self.trop("init", "--data-dir", self.data, "--with-config")
        self.assertEqual(rc, 0, err)
        self.assertIn("Created default configuration file", out)
        cfg = os.path.join(self.data, "config.yaml")
        text = self.read(cfg).decode("utf-8")
        self.assertEqual(text, trop.config_template())
        # the examples, uncommented, are a valid user configuration too
        examples = "".join(m.group(1) + "\n" for m in re.finditer(r"(?m)^# ( *(?:[a-z0-9_]+:|- ).*)$", text))
        self.assertIn("ports:", examples)
        uncommented = self.write("uncommented/config.yaml", examples)
        (rc1, out1, err1), (rc2, out2, err2), (rc3, out3, err3) = self.trop_many([
            ["validate", cfg], ["validate", uncommented], ["--data-dir", self.data, "list"]])
        self.assertEqual((rc1, out1), (0, "Configuration is valid\n"), err1)
        self.assertEqual((rc2, out2), (0, "Configuration is valid\n"), err2 + examples)
        self.assertEqual(rc3, 0, err3)

    def test_existing_config_not_overwritten(self):
        cfg = self.write("data/config.yaml", "# mine\nports: {min: 6000}\n")
        rc, out, err = self.trop("init", "--data-dir", self.data, "--with-config")
        self.assertEqual(rc, 0, err)
        self.assertIn("Configuration file already exists", out)
        self.assertEqual(self.read(cfg), b"# mine\nports: {min: 6000}\n")


# --- Paths -------------------------------------------------------------------

class TestPaths(TropTestCase):
    def test_normalize_absolute(self):
        n = trop.normalize_path
        self.assertEqual(n("/"), "/")
        self.assertEqual(n("/a/b"), "/a/b")
        self.assertEqual(n("//a"), "/a")
        self.assertEqual(n("/a//b/./c/"), "/a/b/c")
        self.assertEqual(n("/a/b/../c"), "/a/c")
        self.assertEqual(n("/a/.."), "/")

    def test_normalize_relative_joins_cwd(self):
        self.assertEqual(trop.normalize_path("x/../y/./z", "/base/dir"), "/base/dir/y/z")
        self.chdir(self.root)
        self.assertEqual(trop.normalize_path("sub"), os.path.join(self.root, "sub"))

    def test_normalize_tilde(self):
        with mock.patch.dict(os.environ, {"HOME": "/home/me"}):
            self.assertEqual(trop.normalize_path("~"), "/home/me")
            self.assertEqual(trop.normalize_path("~/"), "/home/me")
            self.assertEqual(trop.normalize_path("~/a/../b"), "/home/me/b")

    def test_tilde_user_is_an_error(self):
        with self.assertRaises(trop.TropError) as ctx:
            trop.normalize_path("~other/x")
        self.assertEqual(ctx.exception.exit_code, 6)
        self.assertIn("~user syntax is not supported; use ~ or ~/path", str(ctx.exception))

    def test_dotdot_past_root_is_an_error(self):
        for path in ("/..", "/../..", "/a/../../b"):
            with self.assertRaises(trop.TropError) as ctx:
                trop.normalize_path(path)
            self.assertEqual(ctx.exception.exit_code, 6)
            self.assertIn("Path contains too many '..' components (escapes root)", str(ctx.exception))

    def test_is_within_is_component_wise(self):
        w = trop.is_within
        self.assertTrue(w("/w/a", "/w/a"))
        self.assertTrue(w("/w/a/x", "/w/a"))
        self.assertFalse(w("/w/ab", "/w/a"))
        self.assertFalse(w("/w", "/w/a"))
        self.assertTrue(w("/anything", "/"))

    def test_check_path_relationship(self):
        cwd = self.mkdir("w", "proj")
        self.chdir(cwd)
        check = trop.check_path_relationship
        check(cwd, False)                                          # same
        check(os.path.join(self.root, "w"), False)                 # ancestor
        check(os.path.join(cwd, "not", "yet"), False)              # descendant, need not exist
        check("/unrelated/elsewhere", True)                        # allowed
        for target in ("/unrelated/elsewhere", cwd + "x"):
            with self.assertRaises(trop.SemanticFailure) as ctx:
                check(target, False)
            self.assertEqual(ctx.exception.exit_code, 1)
            self.assertTrue(str(ctx.exception).startswith(
                "path relationship violation: %s and %s are unrelated paths" % (target, cwd)))

    def test_check_path_relationship_resolves_symlinks(self):
        cwd = self.mkdir("real", "proj")
        os.symlink(os.path.join(self.root, "real"), os.path.join(self.root, "link"))
        self.chdir(cwd)
        target = os.path.join(self.root, "link", "proj", "sub")
        self.assertFalse(trop.is_within(target, cwd))                   # lexically unrelated,
        self.assertIsNone(trop.check_path_relationship(target, False))  # related once resolved
        with self.assertRaises(trop.SemanticFailure):
            trop.check_path_relationship(self.mkdir("elsewhere"), False)

    def test_shorten_home(self):
        with mock.patch.dict(os.environ, {"HOME": "/home/me"}):
            shorten = trop.PLATFORM.paths.shorten_home
            self.assertEqual(shorten("/home/me", trop.home_dir()), "~/")
            self.assertEqual(shorten("/home/me/a/b", trop.home_dir()), "~/a/b")
            self.assertEqual(shorten("/home/meant", trop.home_dir()), "/home/meant")
            self.assertEqual(shorten("/srv", trop.home_dir()), "/srv")


# --- Paths: the two flavours, table-driven ------------------------------------
#
# Every Windows expectation below is the answer of a port of Rust std's Windows Path code with the
# reference trop's path functions on top (normalize, between, starts_with, validate_stored_path,
# migrate, shorten_path), cross-checked on random inputs; the POSIX tables are trop.py's own rules
# plus the reference's where noted.

W, P = trop.PathFlavour(True), trop.PathFlavour(False)
CWD, HOME, VCWD, UCWD = r"C:\Users\me\proj", r"C:\Users\me", r"\\?\C:\Users\me\proj", r"\\srv\sh\w"
VDRIVE = r"\\?\C:"
ESC = "ERR", "Path contains too many '..' components (escapes root)"
TILDE = "ERR", "~user syntax is not supported; use ~ or ~/path"
REFUSED = "ERR", "drive-relative paths such as C:foo are not supported"

# (input, cwd, home, key or (ERR, message fragment)); oracle `normalize` (+ `valid` for REFUSED)
WINDOWS_NORMALIZE = [
    ("proj", CWD, HOME, r"C:\Users\me\proj\proj"),
    (".", CWD, HOME, r"C:\Users\me\proj"),
    ("", CWD, HOME, r"C:\Users\me\proj"),
    (r".\x", CWD, HOME, r"C:\Users\me\proj\x"),
    (r"..\other", CWD, HOME, r"C:\Users\me\other"),
    ("x/../..", CWD, HOME, r"C:\Users\me"),
    (r"a\.\b\..\c", CWD, HOME, r"C:\Users\me\proj\a\c"),
    ("a/b/c", CWD, HOME, r"C:\Users\me\proj\a\b\c"),
    ("a\\b/", CWD, HOME, r"C:\Users\me\proj\a\b"),
    (r"..\..\..", CWD, HOME, "C:\\"),
    (r"..\..\..\..", CWD, HOME, ESC),
    ("~", CWD, HOME, r"C:\Users\me"),
    ("~/a/b", CWD, HOME, r"C:\Users\me\a\b"),
    ("~\\a", CWD, HOME, r"C:\Users\me\a"),
    ("~\\\\x", CWD, HOME, r"C:\x"),                               # home.join(r"\x") keeps home's drive
    ("~/../../..", CWD, HOME, ESC),
    ("~bob", CWD, HOME, TILDE),
    ("~", CWD, None, ("ERR", "cannot expand ~ because USERPROFILE is not set")),
    ("~", CWD, HOME + "\\", r"C:\Users\me"),
    ("~/x", CWD, "rel", r"C:\Users\me\proj\rel\x"),               # a relative home joins the cwd
    ("~", CWD, r"\\?\C:\Users\me", r"\\?\C:\Users\me"),
    ("C:/x/y/", CWD, HOME, r"C:\x\y"),
    (r"c:\x", CWD, HOME, r"c:\x"),                                 # prefix kept as spelled
    (r"C:\USERS\ME\Proj", CWD, HOME, r"C:\USERS\ME\Proj"),         # no case folding
    ("C:\\", CWD, HOME, "C:\\"),
    ("/", CWD, HOME, "C:\\"),                                      # root-relative: the cwd's drive
    (r"C:\a\.\b\\c", CWD, HOME, r"C:\a\b\c"),
    (r"C:\..", CWD, HOME, ESC),
    (r"C:\a\..\..", CWD, HOME, ESC),
    ("C:foo", CWD, HOME, REFUSED),                                 # the reference would store "C:foo"
    ("C:", CWD, HOME, REFUSED),                                    # ... "C:"
    ("D:foo", CWD, HOME, REFUSED),                                 # ... "D:foo"
    ("a:b", CWD, HOME, REFUSED),                                   # ... "a:b"
    (r"D:\data", CWD, HOME, r"D:\data"),
    (r"\foo", CWD, HOME, r"C:\foo"),
    ("/foo/bar", CWD, HOME, r"C:\foo\bar"),
    (r"\foo", UCWD, HOME, r"\\srv\sh\foo"),
    ("x", UCWD, HOME, r"\\srv\sh\w\x"),
    (r"..\..", UCWD, HOME, ESC),
    ("\\", VCWD, HOME, "\\\\?\\C:\\"),
    ("a", VCWD, HOME, r"\\?\C:\Users\me\proj\a"),
    (r"..\..\..\..\..", VCWD, HOME, "\\\\?\\C:\\"),                # verbatim push: '..' stops at the root
    (r"\\server\share\x", CWD, HOME, r"\\server\share\x"),
    (r"\\server\share", CWD, HOME, "\\\\server\\share\\"),         # implicit root is written
    ("//server/share/x/", CWD, HOME, r"//server/share\x"),
    (r"\\server", CWD, HOME, r"C:\server"),                        # no share: not a prefix
    (r"\\srv\sh\..", CWD, HOME, ESC),
    (r"\\?\C:\a\..\b", CWD, HOME, r"\\?\C:\b"),
    (r"\\?\C:\a\.\b", CWD, HOME, r"\\?\C:\a\b"),
    (r"\\?\C:\a/b", CWD, HOME, r"\\?\C:\a\b"),
    (r"\\?\C:\a/../..", CWD, HOME, "\\\\?\\C:\\"),
    (r"\\?\C:\..", CWD, HOME, ESC),
    (r"\\?\c:\x", CWD, HOME, r"\\?\c:\x"),
    (r"\\?\C:", CWD, HOME, r"\\?\C:"),                             # verbatim: no implicit root written
    (r"\\?\C:/x", CWD, HOME, r"\\?\C:\x"),
    (r"\\?\UNC\srv\sh\x", CWD, HOME, r"\\?\UNC\srv\sh\x"),
    (r"\\?\UNC\srv\sh", CWD, HOME, r"\\?\UNC\srv\sh"),
    (r"\\?\UNC\srv\\x", CWD, HOME, r"\\?\UNC\srv\x"),              # re-parsed: x becomes the share
    (r"\\?\UNC\srv\\x\..", CWD, HOME, ESC),                          # ... so '..' cannot pop it
    (r"\\?\UNC\srv\\x\y\..", CWD, HOME, "\\\\?\\UNC\\srv\\x\\"),
    ("\\", VDRIVE, HOME, "\\\\?\\C:\\"),
    ("a", VDRIVE, HOME, r"\\?\C:\a"),
    (r"a\..\..", VDRIVE, HOME, r"\\?\C:"),
    (r"\\?\C:\a\b/../c", CWD, HOME, r"\\?\C:\a\c"),
    ("/x", r"\\?\UNC\srv\sh", HOME, r"\\?\UNC\srv\sh\x"),
    (r"\\?\Volume{1}\x", CWD, HOME, r"\\?\Volume{1}\x"),
    (r"\\.\pipe\x", CWD, HOME, r"\\.\pipe\x"),
    ("//./pipe/x", CWD, HOME, r"//./pipe\x"),
    (r"\\?\C:\a\C:", CWD, HOME, REFUSED),                          # the reference would store "C:"
    (r"C:\a\C:\b", CWD, HOME, REFUSED),                            # ... "C:b"
]

# The one input class where trop.py chooses to differ from the oracle: a verbatim path with a
# component that is itself a whole //server/share prefix.  (path, cwd, oracle's key); compact refuses.
CHOSEN_DIFFERENCES = [
    (r"\\?\C:\x\//s/h\b", CWD, r"//s/h\b"),
]

# (a, b, related); oracle `between` (answer in the comment)
WINDOWS_RELATED = [
    (r"\\?\C:\Users\me\proj", r"C:\Users\me\proj", False),       # Unrelated: VerbatimDisk vs Disk
    (r"\\?\C:\x", r"C:\x", False),                               # Unrelated
    (r"C:\Users\me\proj\x", r"C:\Users\me\proj", True),          # Descendant
    (r"c:\Users\me\proj", r"C:\Users\me\proj", True),            # Same: drive letter case
    (r"c:\users\me\proj", r"C:\Users\me\proj", False),           # Unrelated: names are case-sensitive
    ("C:/Users/me/proj/", r"C:\Users\me\proj", True),            # Same
    (r"C:\Users\me\projx", r"C:\Users\me\proj", False),          # Unrelated
    ("C:\\", r"C:\Users", True),                                 # Ancestor
    (r"D:\a", r"C:\a", False),                                   # Unrelated
    ("\\\\?\\C:\\", r"\\?\C:\a", True),                          # Ancestor
    ("\\\\server\\share\\", r"\\server\share\x", True),          # Ancestor
    (r"\\server\share", "\\\\server\\share\\", True),            # Same
    (r"\\SERVER\share\x", r"\\server\share", False),             # Unrelated: server compares exactly
    (r"\\server\SHARE\x", r"\\server\share", False),             # Unrelated: share too
    (r"//server/share\x", "\\\\server\\share\\", True),          # Descendant
    ("//s/h/x", r"\\s\h", True),                                 # Descendant: //s/h is \\s\h
    (r"\\?\UNC\server\share\x", r"\\server\share\x", False),     # Unrelated: VerbatimUNC vs UNC
    ("/home/me", HOME, False),                                   # Unrelated
    (r"\\?\C:\a", r"\\?\c:\a", True),                            # Same
    ("C:\\", "C:", True),                                        # Same (one trailing '\' dropped)
    (r"\\?\UNC\srv\sh", r"\\?\UNC\srv\sh\x", True),              # Ancestor
    (r"\\?\C:", "\\\\?\\C:\\", True),                            # Same
    (r"\\?\C:\a\.\b", r"\\?\C:\a\b", False),                     # Unrelated: verbatim '.' counts
    (r"C:\a\.\b", r"C:\a\b", True),                              # Same
    (r"C:\a", "C:a", False),                                     # Unrelated
    ("/a/b", "/a", True),                                        # Descendant
    (r"\a", "/a", True),                                         # Same
    (r"\\.\pipe\x", r"\\.\pipe", True),                          # Descendant
    (r"\\?\C:\a/b", r"\\?\C:\a", False),                         # Unrelated: a/b is one verbatim name
    ("C:\\a\\\\", r"C:\a", True),                                # Same
]

# (path, root, is_within); oracle `starts_with`
WINDOWS_WITHIN = [
    (r"C:\Users\me\proj\sub", r"C:\Users\me\proj", True),
    (r"C:\Users\me\proj", r"C:\Users\me\proj\sub", False),
    (r"c:\Users\me\proj\sub", r"C:\Users\me\proj", True),
    (r"\\?\C:\Users\me\proj\sub", r"C:\Users\me\proj", False),
    (r"\\?\C:\Users\me\proj\sub", r"\\?\C:\Users\me\proj", True),
    (r"C:\w\ab", r"C:\w\a", False),
    ("/w/a/x", "/w/a", True),
    (r"\\s\h\x", "//s/h", True),
]

# (stored row, valid); oracle `valid` (validate_stored_path)
WINDOWS_ROWS = [
    (r"\\?\C:\Users\me\proj", True),                             # what an inferred key looks like
    (r"C:\Users\me\proj", True),                                 # what an explicit key looks like
    (r"c:\x", True),
    ("C:\\", True),
    ("\\\\?\\C:\\", True),
    (r"\\?\C:", True),
    (r"\\server\share\x", True),
    ("\\\\server\\share\\", True),
    (r"//server/share\x", True),
    (r"\\?\UNC\srv\sh\x", True),
    (r"\\?\UNC\srv\sh", True),
    ("/home/me/x", True),                                        # written on Unix
    ("/", True),
    (r"\\.\pipe\x", True),
    ("", False),
    ("C:", False),
    ("C:foo", False),
    (r"\x", False),
    (r"relative\x", False),
    ("C:/x", False),
    ("C:\\x\\", False),
    (r"C:\x\.\y", False),
    (r"C:\x\..\y", False),
    (r"C:\\x", False),
    (r"\\server\share", False),
    (r"\\?\C:\a/b", False),
    (r"\\?\C:\a\.\b", False),
    ("//home", False),
    (r"/home\x", False),
    ("/home/./x", False),
    ("/home/", False),
    (r"\\?\C:\a\C:", False),
    (r"C:\Users\me\proj\C:", False),
]

# (path, is_absolute); oracle `is_absolute`
WINDOWS_ABSOLUTE = [
    (r"C:\x", True), ("C:x", False), ("C:", False), (r"\x", False), ("/x", False), (r"\\s\h", True),
    (r"\\s\h\x", True), (r"\\s", False), (r"\\?\C:", True), (r"\\?\UNC\s\h", True), (r"\\.\pipe", True),
    ("//s/h", True), ("x", False), ("", False), (r"\\?\x", True),
]

# (row, --from, --to, new key or ERR); oracle `migrate` (cwd C:\Users\me\proj)
WINDOWS_REBASE = [
    (r"C:\old\a\b", r"C:\old", r"D:\new", r"D:\new\a\b"),
    (r"C:\old", r"C:\old", r"D:\new", r"D:\new"),
    (r"C:\old\a", r"C:\old", "C:\\", r"C:\a"),
    (r"\\?\C:\old\a", r"\\?\C:\old", r"C:\new", r"C:\new\a"),
    (r"c:\old\a", r"C:\old", r"C:\new", r"C:\new\a"),
    (r"\\?\C:\old\a", r"C:\old", r"C:\new", "ERR"),
    (r"C:\old\a", r"C:\old", r"\\?\D:\n", r"\\?\D:\n\a"),
    (r"\\srv\sh\a\b", "\\\\srv\\sh\\", r"\\s2\h2\z", r"\\s2\h2\z\a\b"),
    (r"//srv/sh\a", r"\\srv\sh", r"C:\n", r"C:\n\a"),
    (r"C:\a\x", "C:\\", r"D:\n", r"D:\n\a\x"),
    (r"C:\a", r"C:\ab", r"D:\n", "ERR"),
]

# (path, home, shown); oracle `shorten` (trop-cli shorten_path)
WINDOWS_SHORTEN = [
    (r"C:\Users\me\proj\x", HOME, r"~/proj\x"),
    (r"C:\Users\me", HOME, "~/"),
    (r"c:\Users\me\proj", HOME, "~/proj"),
    (r"\\?\C:\Users\me\proj", HOME, r"\\?\C:\Users\me\proj"),
    (r"C:\Users\meant", HOME, r"C:\Users\meant"),
    (r"C:\Users\me\proj", "C:\\Users\\me\\", "~/proj"),
    (r"C:\Users\me\proj", None, r"C:\Users\me\proj"),
    (r"C:\Users\me\a\b", "C:/Users/me", r"~/a\b"),
    (r"\\?\C:\Users\me\proj", r"\\?\C:\Users\me", "~/proj"),
    (r"D:\x", HOME, r"D:\x"),
    ("/home/me/x", HOME, "/home/me/x"),
]

# rows, and those the reference's prefix query (LIKE pre-filter, then Path::starts_with = oracle
# `starts_with`) keeps under C:\w\a.  "C:/w/a/q" is below it but the reference's LIKE misses it too.
DESC_ROOT = r"C:\w\a"
DESC_ROWS = [r"C:\w\a", r"C:\w\a\x", r"c:\w\a\y", r"C:\w\ab", r"C:\w\A\z", r"\\?\C:\w\a\v", r"C:\w\a_b",
             r"D:\w\a\x", "/w/a/x", r"C:\w", "C:/w/a/q", r"C:\w%a\x"]
DESC_STARTS_WITH = [r"C:\w\a", r"C:\w\a\x", r"c:\w\a\y", "C:/w/a/q"]
DESC_KEPT = [r"C:\w\a", r"C:\w\a\x", r"c:\w\a\y"]

# (final path, verbatim spelling or ERR); pathmodel.WINDOWS.verbatim
WINDOWS_VERBATIM = [
    (r"C:\Users\Me\Proj", r"\\?\C:\Users\Me\Proj"),
    (r"\\srv\sh\w", r"\\?\UNC\srv\sh\w"),
    (r"\\?\UNC\srv\sh\w", r"\\?\UNC\srv\sh\w"),
    (r"\\?\C:\target", r"\\?\C:\target"),
    (r"c:\x", r"\\?\c:\x"),
    (r"\??\C:\x", r"\??\C:\x"),
    (r"\\.\pipe\x", "ERR"),
    (r"rel\x", "ERR"),
]

# trop.py TestPaths (POSIX contract): (path, cwd, home, key or (ERR, fragment))
POSIX_NORMALIZE = [
    ("/", "/r", None, "/"),
    ("/a/b", "/r", None, "/a/b"),
    ("//a", "/r", None, "/a"),
    ("/a//b/./c/", "/r", None, "/a/b/c"),
    ("/a/b/../c", "/r", None, "/a/c"),
    ("/a/..", "/r", None, "/"),
    ("x/../y/./z", "/base/dir", None, "/base/dir/y/z"),
    ("sub", "/root", None, "/root/sub"),
    ("~", "/r", "/home/me", "/home/me"),
    ("~/", "/r", "/home/me", "/home/me"),
    ("~/a/../b", "/r", "/home/me", "/home/me/b"),
    ("~other/x", "/r", "/home/me", TILDE),
    ("/..", "/r", None, ESC),
    ("/../..", "/r", None, ESC),
    ("/a/../../b", "/r", None, ESC),
    ("~/x", "/r", None, ("ERR", "cannot expand ~ because HOME is not set")),
]

# The deliberate POSIX changes: (path, cwd, home, key); the reference on real std::path (posix oracle
# `normalize`); trop.py gives: error, /home/me/x, /rel/x, /rel, /rel/x (message), /home/me/x/y
POSIX_REFERENCE = [
    ("~\\x", "/w", "/home/me", "/home/me/x"),
    ("~//x", "/w", "/home/me", "/x"),
    ("~/x", "/w", "rel", "/w/rel/x"),
    ("~", "/w", "rel", "/w/rel"),
    ("~/../x", "/w", "rel/", "/w/x"),
    ("~///x//y", "/w", "/home/me", "/x/y"),
]


def raises_value_error(test, want, f, *args):
    with test.assertRaises(ValueError) as ctx:
        f(*args)
    test.assertIn(want[1], str(ctx.exception))
    return str(ctx.exception)


class TestWindowsPathKeys(unittest.TestCase):
    def test_table(self):
        self.assertGreaterEqual(len(WINDOWS_NORMALIZE), 45)
        for path, cwd, home, want in WINDOWS_NORMALIZE:
            with self.subTest(path=path, cwd=cwd, home=home):
                if isinstance(want, tuple):
                    raises_value_error(self, want, W.normalize, path, cwd, home)
                else:
                    key = W.normalize(path, cwd, home)
                    self.assertEqual(key, want)
                    self.assertTrue(W.is_normal(key), "a key passes row validation")
                    self.assertEqual(W.normalize(key, cwd, home), key, "normalize is idempotent on keys")

    def test_messages(self):
        self.assertEqual(raises_value_error(self, ESC, W.normalize, r"C:\..", CWD, HOME),
                         r"invalid path C:\..: Path contains too many '..' components (escapes root)")
        self.assertEqual(raises_value_error(self, TILDE, W.normalize, "~bob", CWD, HOME),
                         "invalid path ~bob: ~user syntax is not supported; use ~ or ~/path")
        msg = raises_value_error(self, REFUSED, W.normalize, "C:foo", CWD, HOME)
        self.assertTrue(msg.startswith("invalid path C:foo: "), msg)
        for flavour in (W, P):
            self.assertEqual(raises_value_error(self, ("ERR", "UTF-8"), flavour.normalize, "/x\udcff", "/", None),
                             "invalid path /x\ufffd: path is not valid UTF-8")

    def test_chosen_difference(self):
        # The oracle accepts these (key in the table); trop.py refuses every name that re-parses
        # as a prefix, since push() then starts over from that name.
        for path, cwd, oracle_key in CHOSEN_DIFFERENCES:
            raises_value_error(self, REFUSED, W.normalize, path, cwd, HOME)
            self.assertTrue(W.is_normal(oracle_key))


class TestWindowsPathComparisons(unittest.TestCase):
    def test_related(self):
        self.assertGreaterEqual(len(WINDOWS_RELATED), 20)
        for a, b, want in WINDOWS_RELATED:
            with self.subTest(a=a, b=b):
                self.assertEqual(W.related(a, b), want)
                self.assertEqual(W.related(b, a), want, "symmetric")

    def test_within(self):
        for path, root, want in WINDOWS_WITHIN:
            with self.subTest(path=path, root=root):
                self.assertEqual(W.is_within(path, root), want)

    def test_rows(self):
        self.assertGreaterEqual(len(WINDOWS_ROWS), 20)
        for row, want in WINDOWS_ROWS:
            with self.subTest(row=row):
                self.assertEqual(W.is_normal(row), want)

    def test_is_absolute(self):
        for path, want in WINDOWS_ABSOLUTE:
            with self.subTest(path=path):
                self.assertEqual(W.is_absolute(path), want)


class TestWindowsPathRebaseAndDisplay(unittest.TestCase):
    def test_rebase(self):
        for row, src, dst, want in WINDOWS_REBASE:
            with self.subTest(row=row, src=src, dst=dst):
                if want == "ERR":
                    self.assertRaises(ValueError, W.rebase, row, src, dst)
                else:
                    self.assertEqual(W.rebase(row, src, dst), want)

    def test_shorten_home(self):
        for path, home, want in WINDOWS_SHORTEN:
            with self.subTest(path=path, home=home):
                self.assertEqual(W.shorten_home(path, home), want)

    def test_verbatim(self):
        for final, want in WINDOWS_VERBATIM:
            with self.subTest(final=final):
                if want == "ERR":
                    self.assertRaises(ValueError, W.verbatim, final)
                else:
                    self.assertEqual(W.verbatim(final), want)
        self.assertEqual(P.verbatim("/a/b"), "/a/b")

    def test_home(self):
        env = {"HOME": "/home/me", "USERPROFILE": HOME}
        self.assertEqual(W.home(env), HOME)
        self.assertEqual(P.home(env), "/home/me")
        self.assertIsNone(W.home({"HOME": "/home/me", "USERPROFILE": ""}))
        self.assertIsNone(P.home({}))
        self.assertEqual((W.sep, P.sep, W.windows, P.windows), ("\\", "/", True, False))


def select_descendants(flavour, root, rows):
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE reservations (path TEXT)")
        conn.executemany("INSERT INTO reservations VALUES (?)", [(r,) for r in rows])
        where, params = flavour.descendant_where(root)
        return sorted(r for (r,) in conn.execute("SELECT path FROM reservations WHERE " + where, params))
    finally:
        conn.close()


class TestPathDescendants(unittest.TestCase):
    def test_windows_like_then_is_within(self):
        self.assertEqual(W.descendant_where(DESC_ROOT), ("path LIKE ? || '%'", (DESC_ROOT,)))
        found = select_descendants(W, DESC_ROOT, DESC_ROWS)
        self.assertTrue(set(DESC_KEPT) <= set(found) and r"C:\w\ab" in found and r"C:\w\A\z" in found)
        self.assertEqual(sorted(r for r in found if W.is_within(r, DESC_ROOT)), sorted(DESC_KEPT))
        self.assertEqual(sorted(r for r in DESC_ROWS if W.is_within(r, DESC_ROOT)), sorted(DESC_STARTS_WITH))

    def test_posix_exact_range(self):
        # trop.py Store.under: the same SQL and parameters
        self.assertEqual(P.descendant_where("/w/a"),
                         ("path = ? OR (path >= ? AND path < ?)", ("/w/a", "/w/a/", "/w/a0")))
        self.assertEqual(P.descendant_where("/"), ("1", ()))
        rows = ["/w/a", "/w/a/x", "/w/ab", "/w/a0", "/w/a/b/c", "/w", "/w/a!"]
        self.assertEqual(select_descendants(P, "/w/a", rows), ["/w/a", "/w/a/b/c", "/w/a/x"])
        self.assertEqual(select_descendants(P, "/", rows), sorted(rows))


class TestPosixPathKeys(unittest.TestCase):
    def test_trop_py_cases(self):
        for path, cwd, home, want in POSIX_NORMALIZE:
            with self.subTest(path=path):
                if isinstance(want, tuple):
                    raises_value_error(self, want, P.normalize, path, cwd, home)
                else:
                    self.assertEqual(P.normalize(path, cwd, home), want)

    def test_trop_py_messages(self):
        self.assertEqual(raises_value_error(self, ESC, P.normalize, "../../..", "/a", None),
                         "invalid path /a/../../..: Path contains too many '..' components (escapes root)")
        self.assertEqual(raises_value_error(self, ESC, P.normalize, "~/../../..", "/a", "/home/me/"),
                         "invalid path /home/me//../../..: Path contains too many '..' components (escapes root)")

    def test_deliberate_changes_follow_the_reference(self):
        for path, cwd, home, want in POSIX_REFERENCE:
            with self.subTest(path=path, home=home):
                self.assertEqual(P.normalize(path, cwd, home), want)
        self.assertEqual(P.shorten_home("/srv/x", "/"), "~/srv/x")    # reference; trop.py: /srv/x
        self.assertEqual(P.shorten_home("/", "/"), "~/")
        self.assertEqual(P.rebase("/a/x", "/a", "/"), "/x")           # reference; trop.py: //x
        self.assertEqual(P.rebase("/a", "/a", "/"), "/")

    def test_trop_py_rules(self):
        for a, b, want in [("/w/a", "/w/a", True), ("/w/a/x", "/w/a", True), ("/w/ab", "/w/a", False),
                           ("/w", "/w/a", False), ("/anything", "/", True)]:
            self.assertEqual(P.is_within(a, b), want, (a, b))
        self.assertTrue(P.related("/w", "/w/a") and P.related("/w/a", "/w") and not P.related("/w/ab", "/w/a"))
        for path, ok in [("/", True), ("/a/b", True), ("", False), ("a", False), ("/a/", False), ("//a", False),
                         ("/a/./b", False), ("/a/../b", False), ("/.", False), ("/a/..", False), ("/a\\b", True),
                         (r"\\?\C:\x", False), ("C:\\x", False)]:
            self.assertEqual(P.is_normal(path), ok, path)
        for path, want in [("/home/me", "~/"), ("/home/me/a/b", "~/a/b"), ("/home/meant", "/home/meant"),
                           ("/srv", "/srv")]:
            self.assertEqual(P.shorten_home(path, "/home/me"), want)
            self.assertEqual(P.shorten_home(path, "/home/me/"), want)
        self.assertEqual(P.shorten_home("/home/me/x", None), "/home/me/x")
        self.assertEqual(P.rebase("/a/x/y", "/a", "/b"), "/b/x/y")
        self.assertRaises(ValueError, P.rebase, "/ab/x", "/a", "/b")


class TestSimulatedWindowsDatabase(TropTestCase):
    """trop.py with the Windows path flavour (as on Windows) over a database the reference wrote on Windows."""
    IN_PROCESS = True
    ROWS = [(r"\\?\C:\Users\me\proj", "", 5000, "proj", None, T1, T1),        # a cwd key: fs::canonicalize
            (r"C:\Users\me\proj", "web", 5001, None, None, T1, T1),           # an explicit --path key
            (r"C:\Users\me\proj\api", "", 5002, None, None, T1, T1),
            (r"\\?\UNC\srv\share\team", "", 5003, None, "t", T1, T1),
            ("/home/me/unix", "", 5004, None, None, T1, T1)]                  # written on Unix: still valid

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(trop.PLATFORM, "paths", trop.PathFlavour(True))
        patcher.start()
        self.addCleanup(patcher.stop)
        make_v2_db(self.data, self.ROWS)

    def test_path_functions_run_with_windows_rules(self):
        self.assertEqual(trop.normalize_path(r"proj\..\api/x", r"C:\Users\me"), r"C:\Users\me\api\x")
        self.assertEqual(trop.normalize_path(r"\\?\C:\Users\me\proj"), r"\\?\C:\Users\me\proj")
        self.assertTrue(trop.is_within(r"c:\Users\me\proj\x", r"C:\Users\me"))       # drive letters: any case
        self.assertFalse(trop.is_within(r"\\?\C:\Users\me\proj", r"C:\Users\me"))
        self.assertTrue(trop.Reservation.from_row(self.ROWS[0]))
        with self.assertRaises(trop.LibraryError):
            trop.normalize_path("C:foo", r"D:\w")

    def test_listed_pruned_and_migrated_without_a_corruption_error(self):
        rc, out, err = trop_main("--data-dir", self.data, "list", "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(sorted(r["path"] for r in json.loads(out)), sorted(r[0] for r in self.ROWS))
        self.assertEqual(trop_main("--data-dir", self.data, "assert-data-dir", "--validate"), (0, "", ""))
        rc, out, err = trop_main("--data-dir", self.data, "prune", "--dry-run", "--quiet")
        self.assertEqual((rc, out, err), (0, "5\n", ""))        # none of these exists on this host
        rc, out, err = trop_main("--data-dir", self.data, "migrate", "--from", r"C:\Users\me", "--to", r"D:\work",
                                 "--recursive", "--quiet")
        self.assertEqual((rc, out, err), (0, "D:\\work\n", ""))
        self.assertEqual(self.rows(3), sorted([
            ("/home/me/unix", "", 5004), (r"D:\work\proj", "web", 5001), (r"D:\work\proj\api", "", 5002),
            (r"\\?\C:\Users\me\proj", "", 5000), (r"\\?\UNC\srv\share\team", "", 5003)]))
        rc, out, err = trop_main("--data-dir", self.data, "release", "--path", r"D:\work", "--recursive",
                                 "--allow-unrelated-path", "--quiet")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual([r[0] for r in self.rows(1)], ["/home/me/unix", r"\\?\C:\Users\me\proj",
                                                         r"\\?\UNC\srv\share\team"])
        rc, out, err = trop_main("--data-dir", self.data, "prune", "--quiet")
        self.assertEqual((rc, out, err), (0, "3\n", ""))
        self.assertEqual(self.rows(), [])


class TestGitInference(TropTestCase):
    def repo(self, name, head="ref: refs/heads/main\n"):
        gitdir = self.mkdir(name, ".git")
        self.write(os.path.join(gitdir, "HEAD"), head)
        return os.path.dirname(gitdir)

    def test_normal_repository_with_branch(self):
        repo = self.repo("myrepo")
        sub = self.mkdir("myrepo", "src", "pkg")
        self.assertEqual(trop.infer_git_metadata(repo), ("myrepo", "main"))
        self.assertEqual(trop.infer_git_metadata(sub), ("myrepo", "main"))

    def test_branch_with_slashes(self):
        repo = self.repo("app", "ref: refs/heads/feature/login\n")
        self.assertEqual(trop.infer_git_metadata(repo), ("app", "feature/login"))

    def test_detached_head_has_no_task(self):
        repo = self.repo("myrepo", "0123456789abcdef0123456789abcdef01234567\n")
        self.assertEqual(trop.infer_git_metadata(repo), ("myrepo", None))

    def test_linked_worktree(self):
        main = self.repo("mainrepo")
        wt_gitdir = self.mkdir("mainrepo", ".git", "worktrees", "feature-wt")
        self.write(os.path.join(wt_gitdir, "HEAD"), "ref: refs/heads/topic\n")
        self.write(os.path.join(wt_gitdir, "commondir"), "../..\n")
        worktree = self.mkdir("feature-wt")
        self.write(os.path.join(worktree, ".git"), "gitdir: %s\n" % wt_gitdir)
        self.assertEqual(trop.infer_git_metadata(worktree), ("mainrepo", "feature-wt"))
        self.assertEqual(trop.infer_git_metadata(self.mkdir("feature-wt", "deep")), ("mainrepo", "feature-wt"))
        self.assertEqual(trop.infer_git_metadata(main), ("mainrepo", "main"))

    def test_bare_repository(self):
        bare = self.mkdir("x.git")
        self.write(os.path.join(bare, "HEAD"), "ref: refs/heads/main\n")
        self.mkdir("x.git", "objects")
        self.mkdir("x.git", "refs")
        project, task = trop.infer_git_metadata(bare)
        self.assertEqual((project, task), ("x", "main"))

    def test_no_repository(self):
        plain = self.mkdir("plain")
        parent, found = plain, False
        while True:
            found = found or os.path.exists(os.path.join(parent, ".git"))
            if os.path.dirname(parent) == parent:
                break
            parent = os.path.dirname(parent)
        if found:
            self.skipTest("a .git exists above the temporary directory")
        self.assertEqual(trop.infer_git_metadata(plain), (None, None))


# --- Models ------------------------------------------------------------------

class TestModels(unittest.TestCase):
    GOOD = ("/w/a", "", 5000, None, None, T1, T2)

    def test_reservation_key(self):
        self.assertEqual(str(trop.ReservationKey("/w/a")), "/w/a")
        self.assertEqual(str(trop.ReservationKey("/w/a", "web")), "/w/a:web")
        self.assertEqual(trop.ReservationKey("/w/a", ""), trop.ReservationKey("/w/a", None))
        self.assertEqual(hash(trop.ReservationKey("/w/a", "")), hash(trop.ReservationKey("/w/a")))
        self.assertNotEqual(trop.ReservationKey("/w/a", "web"), trop.ReservationKey("/w/a"))

    def test_from_row(self):
        res = trop.Reservation.from_row(self.GOOD)
        self.assertEqual((res.path, res.tag, res.port, res.project, res.task, res.created_at, res.last_used_at),
                         ("/w/a", None, 5000, None, None, T1, T2))
        tagged = trop.Reservation.from_row(("/w/a", "web", 5001, "proj", "task", T1, T2))
        self.assertEqual((tagged.tag, tagged.project, tagged.task), ("web", "proj", "task"))
        self.assertEqual(tagged.key, trop.ReservationKey("/w/a", "web"))

    def test_from_row_rejects_corruption(self):
        cases = [
            ("path", ("relative/a", "", 5000, None, None, T1, T2)),
            ("path", ("", "", 5000, None, None, T1, T2)),
            ("path", ("/w/a/", "", 5000, None, None, T1, T2)),
            ("path", ("/w//a", "", 5000, None, None, T1, T2)),
            ("path", ("/w/../a", "", 5000, None, None, T1, T2)),
            ("tag", ("/w/a", " web", 5000, None, None, T1, T2)),
            ("tag", ("/w/a", None, 5000, None, None, T1, T2)),
            ("port", ("/w/a", "", 0, None, None, T1, T2)),
            ("port", ("/w/a", "", 70000, None, None, T1, T2)),
            ("port", ("/w/a", "", "5000", None, None, T1, T2)),
            ("project", ("/w/a", "", 5000, "", None, T1, T2)),
            ("project", ("/w/a", "", 5000, "p ", None, T1, T2)),
            ("task", ("/w/a", "", 5000, None, " t", T1, T2)),
            ("created_at", ("/w/a", "", 5000, None, None, -1, T2)),
            ("last_used_at", ("/w/a", "", 5000, None, None, T1, "x")),
        ]
        for field, row in cases:
            with self.assertRaises(trop.TropError, msg=repr(row)) as ctx:
                trop.Reservation.from_row(row)
            self.assertEqual(ctx.exception.exit_code, 6)
            self.assertTrue(str(ctx.exception).startswith(
                "database corruption detected: table=reservations, field=%s, key=path=" % field),
                str(ctx.exception))
        with self.assertRaises(trop.TropError) as ctx:
            trop.Reservation.from_row(("/w/a", "web", 0, None, None, T1, T2))
        self.assertIn('key=path="/w/a", tag="web"', str(ctx.exception))
        with self.assertRaises(trop.TropError) as ctx:
            trop.Reservation.from_row(("/w/a", "", 0, None, None, T1, T2))
        self.assertIn('key=path="/w/a", tag=<untagged>', str(ctx.exception))

    def test_port_range(self):
        rng = trop.PortRange(5000, 5002)
        self.assertEqual(list(rng), [5000, 5001, 5002])
        self.assertEqual(len(rng), 3)
        self.assertIn(5001, rng)
        self.assertNotIn(4999, rng)
        self.assertNotIn(5003, rng)
        self.assertEqual(str(rng), "5000-5002")
        self.assertEqual(rng, trop.PortRange(5000, 5002))

    def test_exclusion_list_merges(self):
        excl = trop.ExclusionList([(8, 10), (1, 1), (5, 7), (3, 3), (2, 2), (20, 25), (22, 30)])
        self.assertEqual(excl.entries(), [(1, 3), (5, 10), (20, 30)])
        self.assertEqual(len(excl), 3)
        for port in (1, 2, 3, 5, 10, 20, 30):
            self.assertIn(port, excl)
        for port in (0, 4, 11, 19, 31, 65535):
            self.assertNotIn(port, excl)
        self.assertEqual(trop.ExclusionList([(9000, 9000), (7, 7)]).entries(), [7, 9000])
        self.assertEqual(trop.ExclusionList().entries(), [])
        self.assertNotIn(5000, trop.ExclusionList())

    def test_occupancy_policy_probe_order(self):
        P = trop.OccupancyPolicy
        self.assertEqual(P().probes(), [
            ("tcp", "ipv4", "localhost", "127.0.0.1"), ("udp", "ipv4", "localhost", "127.0.0.1"),
            ("tcp", "ipv6", "localhost", "::1"), ("udp", "ipv6", "localhost", "::1")])
        self.assertEqual(P(check_all_interfaces=True).probes(), [
            ("tcp", "ipv4", "localhost", "127.0.0.1"), ("udp", "ipv4", "localhost", "127.0.0.1"),
            ("tcp", "ipv4", "wildcard", "0.0.0.0"), ("udp", "ipv4", "wildcard", "0.0.0.0"),
            ("tcp", "ipv6", "localhost", "::1"), ("udp", "ipv6", "localhost", "::1"),
            ("tcp", "ipv6", "wildcard", "::"), ("udp", "ipv6", "wildcard", "::")])
        self.assertEqual(P(skip=True, check_all_interfaces=True).probes(), [])
        self.assertEqual(P(skip_tcp=True, skip_ip6=True).probes(), [("udp", "ipv4", "localhost", "127.0.0.1")])
        self.assertEqual(P(skip_udp=True, skip_ip4=True, check_all_interfaces=True).probes(),
                         [("tcp", "ipv6", "localhost", "::1"), ("tcp", "ipv6", "wildcard", "::")])


# --- Store -------------------------------------------------------------------

class TestStore(TropTestCase):
    ENV = SKIP_PROBES

    def open_conn(self):
        conn = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def test_schema_v2_created(self):
        trop.Store.open(self.data).close()
        conn = self.open_conn()
        objects = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
        self.assertEqual({n for t, n, _ in objects if t == "table"}, {"metadata", "reservations"})
        self.assertEqual({n for t, n, _ in objects if t == "index"}, INDEX_NAMES)
        sql = {n: s for _t, n, s in objects}
        if sqlite3.sqlite_version_info >= (3, 37, 0):
            self.assertEqual(sql_tokens(sql["metadata"]), sql_tokens(V2_METADATA_SQL))
            self.assertEqual(sql_tokens(sql["reservations"]), sql_tokens(V2_RESERVATIONS_SQL))
            strict = {r[1]: r[5] for r in conn.execute("PRAGMA table_list")}
            self.assertEqual((strict["metadata"], strict["reservations"]), (1, 1))
        self.assertEqual(conn.execute("SELECT key, value, typeof(value) FROM metadata").fetchall(),
                         [("schema_version", "2", "text")])
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0].lower(), "wal")
        trop.validate_schema(conn)

    def test_reference_database_is_accepted(self):
        make_v2_db(self.data, [("/w/a", "", 5000, "p", None, T1, T2)])
        trop.validate_schema(self.open_conn())
        rc, out, err = self.trop("list", "--format", "csv")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(out, "port,path,tag,project,task,created_at,last_used_at\n5000,/w/a,,p,,%s,%s\n" % (S1, S2))

    def test_validate_schema_detects_problems(self):
        make_v2_db(self.data)
        conn = self.open_conn()
        conn.execute("DROP INDEX idx_reservations_project")
        with self.assertRaises(trop.TropError) as ctx:
            trop.validate_schema(conn)
        self.assertEqual(ctx.exception.exit_code, 6)
        conn.execute(INDEX_SQL[1])
        trop.validate_schema(conn)
        insert_rows(conn, [("relative/path", "", 5000, None, None, T1, T2)])
        with self.assertRaises(trop.TropError) as ctx:
            trop.validate_schema(conn)
        self.assertIn("database corruption detected", str(ctx.exception))

    def test_migrate_v1_to_v2_preserves_rows(self):
        make_v1_db(self.data, [("/w/a", None, 5000, "p", None, T1, T2),
                               ("/w/a", "web", 5001, None, "t", T1, T1),
                               ("/w/b", None, 5002, None, None, T2, T2)])
        trop.Store.open(self.data).close()
        self.assertEqual(self.rows(), [("/w/a", "", 5000, "p", None, T1, T2),
                                       ("/w/a", "web", 5001, None, "t", T1, T1),
                                       ("/w/b", "", 5002, None, None, T2, T2)])
        conn = self.open_conn()
        self.assertEqual(conn.execute("SELECT value FROM metadata WHERE key = 'schema_version'").fetchone()[0], "2")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
        self.assertEqual(names, {"metadata", "reservations"} | INDEX_NAMES)
        trop.validate_schema(conn)

    def test_v1_with_duplicate_keys_is_blocked_and_untouched(self):
        make_v1_db(self.data, [("/w/a", None, 5000, None, None, T1, T2),
                               ("/w/a", None, 5001, None, None, T1, T2)])
        before = self.read(self.db)
        self.assertError(self.trop("list"), 6, contains=["blocked", "duplicate"])
        self.assertTrue(self.read(self.db) == before, "trop.db was modified")

    def test_validate_does_not_migrate_v1(self):
        make_v1_db(self.data, [("/w/a", None, 5000, None, None, T1, T2)])
        before = self.read(self.db)
        self.assertError(self.trop("assert-data-dir", "--validate"), 6, contains="migration required")
        self.assertTrue(self.read(self.db) == before, "trop.db was modified")

    def test_schema_version_3_is_unsupported(self):
        make_v2_db(self.data, [("/w/a", "", 5000, None, None, T1, T2)])
        conn = self.open_conn()
        conn.execute("UPDATE metadata SET value = '3' WHERE key = 'schema_version'")
        self.assertError(self.trop("reserve"), 6, "unsupported schema version: expected 2, found 3")
        self.assertEqual(conn.execute("SELECT value FROM metadata").fetchall(), [("3",)])
        self.assertEqual(self.rows(), [("/w/a", "", 5000, None, None, T1, T2)])

    def test_not_a_database(self):
        content = b"this is not an SQLite database\n" * 100
        self.write(self.db, content)
        for args in (("reserve",), ("list",), ("assert-data-dir", "--validate")):
            result = self.trop(*args)
            self.assertError(result, 6)
            self.assertNotIn("lock timeout", result[2])
            self.assertTrue(self.read(self.db) == content, "trop.db was modified by %s" % (args,))

    def test_corrupt_row_is_reported(self):
        make_v2_db(self.data, [("relative/x", "", 5000, None, None, T1, T2)])
        self.assertError(self.trop("list"), 6, startswith="database corruption detected: table=reservations, "
                         "field=path, key=path=\"relative/x\", tag=<untagged>")


# --- Occupancy ---------------------------------------------------------------

def unused_uid():
    """A uid with no passwd entry (so also no home), or None where this process cannot switch to one."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    for uid in range(54321, 60000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    return None


# Runs `trop.main(ARGS)` in CWD as another user: everything trop imports is imported first (the interpreter's
# own files may be unreadable to that user, as /root/.pyenv is), then the process drops to UID for good.
AS_USER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import trop, argparse, fcntl, http.client, json, pwd, shutil, socket, sqlite3, subprocess, threading, traceback
import encodings.ascii, encodings.latin_1, urllib.parse
uid = int(sys.argv[2])
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.chdir(sys.argv[3])
sys.exit(trop.main(sys.argv[4:]))
"""


class UnprivilegedCase(TropTestCase):
    """Runs trop as a real user without write access: an unused uid when the tests run as root (as in CI),
    else this user, for whom the permission bits below apply just the same."""

    def setUp(self):
        super().setUp()
        if os.name != "posix":
            self.skipTest("POSIX permissions")
        self.uid = unused_uid()
        if self.uid is None and os.geteuid() == 0:
            self.skipTest("no unused uid to switch to")
        for directory in (self.root, self.proj, self.home):
            os.chmod(directory, 0o755)

    def as_user(self, *args, cwd=None, env=None):
        """(exit code, stdout, stderr) of trop ARGS run as the unprivileged user."""
        environ = self.environment(dict({"PYTHONDONTWRITEBYTECODE": "1"}, **(env or {})))
        proc = self._started(spawn([sys.executable, "-c", AS_USER, TROP_DIR, -1 if self.uid is None else self.uid,
                                    cwd or self.proj] + list(args), self.root, environ))
        return finish(proc)

    def freeze(self, *paths):
        """Make paths read-only for everyone (root ignores this; the unprivileged user does not)."""
        for path in paths:
            os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
            self.addCleanup(os.chmod, path, 0o755 if os.path.isdir(path) else 0o644)

    def snapshot(self, directory):
        return {name: self.read(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}


class TestReadOnlyData(UnprivilegedCase):
    """A data directory and trop.db this user can read but not write: every read works and creates nothing."""

    def setUp(self):
        super().setUp()
        self.h = self.handle()
        self.port = self.h.reserve(self.proj, tag="web")
        self.h.reserve(self.root + "/gone", tag="x")
        self.h.close()
        self.group = self.group_file(self.proj, [("web", {"offset": 0})], pmin=20000, pmax=20010)
        self.freeze(self.data, self.db)
        self.before = self.snapshot(self.data)

    def assertUntouched(self):
        self.assertEqual(self.snapshot(self.data), self.before)

    def test_read_commands_and_dry_runs_work_and_create_nothing(self):
        key = "%s:web" % self.proj
        expected = {
            ("list", "--format", "csv"): lambda out: self.assertIn("%d,%s,web" % (self.port, self.proj), out),
            ("list-projects",): lambda out: self.assertEqual(out, ""),
            ("port-info", str(self.port)): lambda out: self.assertIn("Tag: web", out),
            ("assert-port", str(self.port)): lambda out: self.assertEqual(out, ""),
            ("assert-reservation", "--tag", "web"): lambda out: self.assertEqual(out, "%d\n" % self.port),
            ("assert-data-dir", "--validate"): lambda out: self.assertEqual(out, ""),
            ("show-data-dir",): lambda out: self.assertEqual(out, self.data + "\n"),
            ("show-path",): lambda out: self.assertEqual(out, self.proj + "\n"),
            ("validate", self.group): lambda out: self.assertEqual(out, "Configuration is valid\n"),
            ("scan", "--min", "20000", "--max", "20002", "--format", "csv"): lambda out: self.assertTrue(out),
            ("reserve", "--tag", "web", "--dry-run"): lambda out: self.assertEqual(out, ""),
            ("reserve", "--tag", "new", "--dry-run", "--min", "20000", "--max", "20010"): lambda out: None,
            ("release", "--tag", "web", "--dry-run"): lambda out: self.assertEqual(out, ""),
            ("reserve-group", self.group, "--dry-run"): lambda out: None,
            ("autoreserve", "--dry-run"): lambda out: None,
            ("prune", "--dry-run", "--quiet"): lambda out: self.assertEqual(out, "1\n"),
            ("expire", "--dry-run", "--days", "1"): lambda out: None,
            ("autoclean", "--dry-run"): lambda out: None,
            ("migrate", "--from", ".", "--to", self.root + "/moved", "--dry-run"): lambda out: None,
            ("init", "--dry-run"): lambda out: self.assertIn("Database already exists", out),
        }
        for args, check in expected.items():
            with self.subTest(args=args):
                rc, out, err = self.as_user(*args)
                self.assertEqual(rc, 0, err)
                self.assertNoTraceback(err)
                check(out)
        rc, _out, err = self.as_user("reserve", "--tag", "web", "--dry-run")
        self.assertIn("Refresh reservation for %s (port %d)" % (key, self.port), err)
        self.assertUntouched()

    def test_reads_see_what_a_connected_writer_committed(self):
        writer = sqlite3.connect(self.db, isolation_level=None)         # as root: keeps -wal and -shm in place
        self.addCleanup(writer.close)
        writer.execute("INSERT INTO reservations VALUES ('/w', '', 21000, NULL, NULL, 0, 0)")
        self.assertTrue(os.path.exists(self.db + "-shm"))
        for path in (self.db + "-wal", self.db + "-shm"):
            os.chmod(path, 0o644)
        self.assertEqual(self.as_user("assert-port", "21000"), (0, "", ""))
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO reservations VALUES ('/u', '', 21001, NULL, NULL, 0, 0)")
        self.assertError(self.as_user("assert-port", "21001", "--busy-timeout", "0"), 1)   # never uncommitted
        writer.execute("ROLLBACK")

    def test_writing_commands_fail_with_one_line_that_says_what_to_do(self):
        for args in (("reserve", "--tag", "new"), ("release", "--tag", "web"), ("prune",), ("autoclean",),
                     ("reserve-group", self.group), ("migrate", "--from", ".", "--to", "/x")):
            with self.subTest(args=args):
                self.assertError(self.as_user(*args), 6, contains=[self.db, "--data-dir", "TROP_DATA_DIR"])
        self.assertUntouched()

    def test_a_missing_database_in_an_unwritable_directory_reads_as_empty(self):
        other = self.mkdir("other")
        self.freeze(other)
        env = {"TROP_DATA_DIR": other}
        self.assertEqual(self.as_user("list", "--format", "json", env=env), (0, "[]\n", ""))
        self.assertEqual(self.as_user("assert-port", "5000", "--not", env=env), (0, "", ""))
        self.assertError(self.as_user("reserve", env=env), 6, contains=[other, "--data-dir"])
        self.assertEqual(os.listdir(other), [])

    def test_an_unwritable_home_names_the_way_out(self):
        os.chmod(self.home, 0o555)
        rc, out, err = self.as_user("reserve", env={"TROP_DATA_DIR": None})
        self.assertError((rc, out, err), 6, contains=["--data-dir", "TROP_DATA_DIR"])
        self.assertEqual(os.listdir(self.home), [])


class TestUserWithoutHome(UnprivilegedCase):
    """A uid with no passwd entry and no HOME: a clean error naming TROP_DATA_DIR; with it, everything works."""

    def setUp(self):
        super().setUp()
        if self.uid is None:
            self.skipTest("needs root to become a uid without a passwd entry")

    def test_without_a_data_directory(self):
        env = {"HOME": None, "TROP_DATA_DIR": None}
        for args in (("reserve",), ("list",), ("show-data-dir",)):
            self.assertError(self.as_user(*args, env=env), 7, contains=["TROP_DATA_DIR", "--data-dir"])

    def test_with_a_data_directory(self):
        data = self.mkdir("own")
        os.chown(data, self.uid, self.uid)
        env = {"HOME": None, "TROP_DATA_DIR": data}
        rc, out, err = self.as_user("reserve", env=env)
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(self.as_user("list", "--format", "csv", env=env)[0], 0)
        self.assertEqual(self.as_user("assert-reservation", env=env), (0, out, ""))
        self.assertError(self.as_user("reserve", "--path", "~/x", env=env), 6, contains="~")
        self.assertError(self.as_user("reserve-group", "~/trop.yaml", env=env), 6, contains="cannot expand ~")


class TestNetworkFilesystem(TropTestCase):
    """A data directory on NFS, SMB or FUSE is refused (WAL needs shared memory), unless allowed."""
    IN_PROCESS = True

    def mount_table(self, *mounts):
        """A fake PROC_ROOT whose self/mountinfo lists (mount point, type) pairs."""
        root = self.mkdir("fakeproc")
        lines = ["%d 1 0:%d / %s rw,relatime shared:1 - %s src rw" % (20 + i, i, point.replace(" ", "\\040"), kind)
                 for i, (point, kind) in enumerate(mounts)]
        self.write(os.path.join(root, "self", "mountinfo"), "\n".join(lines) + "\n")
        patcher = mock.patch.object(trop, "PROC_ROOT", root)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_mount_of_picks_the_longest_mount_point(self):
        self.mount_table(("/", "ext4"), (self.root, "nfs4"), (self.root + "/local dir", "tmpfs"))
        self.assertEqual(trop.mount_of(self.path("data", "x")), ("nfs4", self.root))
        self.assertEqual(trop.mount_of(self.mkdir("local dir", "d")), ("tmpfs", self.root + "/local dir"))
        self.assertEqual(trop.mount_of("/usr"), ("ext4", "/"))
        self.assertIsNone(trop.mount_of("/usr", proc_root=self.path("nowhere")))

    def test_kinds(self):
        for kind in ("nfs", "nfs4", "cifs", "smb3", "9p", "fuse.sshfs", "fuse", "ceph"):
            self.assertTrue(trop.is_network_filesystem(kind), kind)
        for kind in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "fuseblk", "apfs"):
            self.assertFalse(trop.is_network_filesystem(kind), kind)

    def test_refused_with_advice_then_allowed(self):
        self.mount_table(("/", "ext4"), (self.root, "nfs"))
        for args in (("reserve",), ("list",), ("assert-data-dir", "--validate")):
            rc, out, err = trop_main("--data-dir", self.data, *args)
            self.assertEqual((rc, out), (7 if args[0] != "assert-data-dir" else 1, ""), err)
            if args[0] != "assert-data-dir":
                self.assertIn("nfs filesystem (mounted at %s)" % self.root, err)
                self.assertIn("TROP_ALLOW_NETWORK_FS=1", err)
                self.assertIn("TROP_DATA_DIR", err)
        self.assertFalse(os.path.exists(self.data))
        with mock.patch.dict(os.environ, {"TROP_ALLOW_NETWORK_FS": "1"}):
            rc, out, err = trop_main("--data-dir", self.data, "reserve")
        self.assertEqual((rc, out, err), (0, "5000\n", ""))
        rc, out, err = trop_main("--data-dir", self.data, "assert-data-dir", "--validate")
        self.assertEqual(rc, 7, err)

    def test_local_filesystems_pass(self):
        self.mount_table(("/", "ext4"), (self.root, "tmpfs"))
        self.assertEqual(trop_main("--data-dir", self.data, "reserve"), (0, "5000\n", ""))


class TestOldSqlite(TropTestCase):
    """An SQLite older than 3.37 cannot read the reference's STRICT tables: one line says so and what to do."""
    IN_PROCESS = True

    def test_strict_schema_with_old_sqlite(self):
        make_v2_db(self.data, [("/a", "", 5000, None, None, T1, T1)])
        real = sqlite3.connect

        def old_connect(*args, **kwargs):
            conn = real(*args, **kwargs)
            if "memory" not in str(args[0]):
                conn.close()
                raise sqlite3.OperationalError('malformed database schema (reservations) - near "STRICT": '
                                               'syntax error')
            return conn
        with mock.patch.object(sqlite3, "connect", old_connect), \
                mock.patch.object(sqlite3, "sqlite_version_info", (3, 31, 1)):
            for args in (("list",), ("reserve",), ("assert-data-dir", "--validate")):
                rc, out, err = trop_main("--data-dir", self.data, *args)
                self.assertEqual((rc, out), (6, ""), args)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("STRICT tables, which need SQLite 3.37 or newer, and this Python uses SQLite 3.31.1",
                              err)
        self.assertEqual(self.rows(3), [("/a", "", 5000)])


class TestOccupancy(TropTestCase):
    def test_listening_tcp_socket_is_occupied(self):
        sock = self.listen("tcp", "127.0.0.1")
        port = sock.getsockname()[1]
        self.assertTrue(trop.Occupancy(trop.OccupancyPolicy()).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip=True)).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_tcp=True)).occupied(port))
        sock.close()
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_udp=True)).occupied(port))

    def test_bound_udp_socket_is_occupied(self):
        port = self.listen("udp", "127.0.0.1").getsockname()[1]
        self.assertTrue(trop.Occupancy(trop.OccupancyPolicy(skip_tcp=True)).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_udp=True, skip_ip6=True)).occupied(port))


class TestOwnerStatus(unittest.TestCase):
    def test_status(self):
        self.assertEqual(trop.owner_status(1, "x", "u"), "available")
        self.assertEqual(trop.owner_status(None, None, None), "unavailable")
        self.assertEqual(trop.owner_status(None, None, "u"), "partial")
        self.assertEqual(trop.owner_status(1, None, None), "partial")
        self.assertEqual(trop.owner_status(0, "", "u"), "available")   # falsy but known


@POSIX_ONLY
class TestFakeProcOwners(unittest.TestCase):
    """OwnerTable over a throwaway /proc tree: net tables, per-pid comm and fd links."""

    HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
              "retrnsmt   uid  timeout inode\n")

    def setUp(self):
        self.root = temp_dir(self, "fakeproc")
        os.mkdir(os.path.join(self.root, "net"))

    @staticmethod
    def net_line(port, state="0A", uid=1000, inode=111, addr="0100007F"):
        return ("   0: %s:%04X 00000000:0000 %s 00000000:00000000 00:00000000 "
                "00000000  %5d        0 %d 1 0000000000000000 100 0 0 10 0\n" % (addr, port, state, uid, inode))

    def net(self, name, *lines):
        with open(os.path.join(self.root, "net", name), "w") as fh:
            fh.write(self.HEADER + "".join(lines))

    def proc(self, pid, comm, inodes=(), fd_dir=True):
        d = os.path.join(self.root, str(pid))
        os.mkdir(d)
        with open(os.path.join(d, "comm"), "w") as fh:
            fh.write(comm + "\n")
        if fd_dir:
            os.mkdir(os.path.join(d, "fd"))
            for i, ino in enumerate(inodes):
                os.symlink("socket:[%d]" % ino, os.path.join(d, "fd", str(i + 3)))
            os.symlink("/dev/null", os.path.join(d, "fd", "0"))

    @staticmethod
    def unreadable_fds():
        """chmod is useless as root: make every <pid>/fd listing fail with EACCES."""
        real_listdir = os.listdir

        def listdir(path):
            if str(path).endswith(os.sep + "fd"):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_listdir(path)
        return mock.patch("os.listdir", side_effect=listdir)

    def test_resolves_pid_name_user_smallest_pid_wins(self):
        uid = os.getuid()
        self.net("tcp", self.net_line(8080, uid=uid, inode=500))
        self.net("tcp6")
        self.proc(42, "worker", [500])
        self.proc(7, "server", [500, 9])
        t = trop.OwnerTable(self.root)
        self.assertEqual(t.lookup("tcp", "ipv4", 8080), (7, "server", user_name(uid)))
        self.assertEqual(t.lookup("tcp", "ipv4", 8081), (None, None, None))
        self.assertEqual(t.lookup("udp", "ipv4", 8080), (None, None, None))

    def test_listen_preferred_over_other_states(self):
        self.net("tcp", self.net_line(9000, state="01", inode=1), self.net_line(9000, state="0A", inode=2))
        self.proc(5, "client", [1])
        self.proc(50, "listener", [2])
        self.assertEqual(trop.OwnerTable(self.root).lookup("tcp", "ipv4", 9000)[:2], (50, "listener"))

    def test_non_listen_socket_still_counts(self):
        self.net("tcp", self.net_line(9001, state="01", inode=3))
        self.proc(8, "client", [3])
        self.assertEqual(trop.OwnerTable(self.root).lookup("tcp", "ipv4", 9001)[:2], (8, "client"))

    def test_family_files_and_dual_stack_fallback(self):
        self.net("udp6", self.net_line(5353, state="07", inode=77, addr="0" * 32))
        self.proc(12, "mdns", [77])
        t = trop.OwnerTable(self.root)
        self.assertEqual(t.lookup("udp", "ipv6", 5353)[:2], (12, "mdns"))
        self.assertEqual(t.lookup("udp", "ipv4", 5353)[:2], (12, "mdns"))
        self.assertEqual(t.lookup("tcp", "ipv6", 5353), (None, None, None))

    def test_absent_fd_dir_gives_partial(self):
        self.net("tcp", self.net_line(7000, uid=0, inode=10))
        self.proc(1, "init", fd_dir=False)
        pid, name, user = trop.OwnerTable(self.root).lookup("tcp", "ipv4", 7000)
        self.assertEqual((pid, name, user), (None, None, user_name(0)))
        self.assertEqual(trop.owner_status(pid, name, user), "partial")

    def test_permission_denied_fd_dir_gives_partial(self):
        self.net("tcp", self.net_line(7001, uid=0, inode=11))
        self.proc(3, "secret", [11])
        with self.unreadable_fds():
            res = trop.OwnerTable(self.root).lookup("tcp", "ipv4", 7001)
        self.assertEqual(res, (None, None, user_name(0)))
        self.assertEqual(trop.owner_status(*res), "partial")

    def test_unknown_uid_falls_back_to_number(self):
        self.net("tcp", self.net_line(7002, uid=3999999, inode=12))
        self.assertEqual(trop.OwnerTable(self.root).lookup("tcp", "ipv4", 7002), (None, None, "3999999"))

    def test_time_wait_inode_zero_has_no_owner(self):
        self.net("tcp", self.net_line(7003, state="06", uid=0, inode=0))
        self.assertEqual(trop.OwnerTable(self.root).lookup("tcp", "ipv4", 7003), (None, None, None))

    def test_malformed_lines_ignored(self):
        self.net("tcp", "garbage\n", "   1: nothex:zz 0 0A\n", "\n",
                 "   2: 0100007F:GGGG 00000000:0000 0A 0 0 0 0 1000 0 5\n", self.net_line(6000, inode=20))
        with open(os.path.join(self.root, "net", "udp"), "wb") as fh:
            fh.write(b"\xff\xfe binary junk\n\x00\x01")
        self.proc(99, "ok", [20])
        t = trop.OwnerTable(self.root)
        self.assertEqual(t.lookup("tcp", "ipv4", 6000)[:2], (99, "ok"))
        self.assertEqual(t.lookup("udp", "ipv4", 6000), (None, None, None))

    def test_fd_scan_happens_once_and_only_on_match(self):
        self.net("tcp", self.net_line(6001, inode=21))
        self.proc(4, "x", [21])
        t = trop.OwnerTable(self.root)
        with mock.patch.object(trop.OwnerTable, "_scan_fds", autospec=True,
                               side_effect=trop.OwnerTable._scan_fds) as scan:
            t.lookup("tcp", "ipv4", 1)
            self.assertEqual(scan.call_count, 0)
            t.lookup("tcp", "ipv4", 6001)
            t.lookup("tcp", "ipv4", 6001)
            self.assertEqual(scan.call_count, 1)

    def test_absent_proc_is_unavailable(self):
        t = trop.OwnerTable(os.path.join(self.root, "missing"), use_lsof=False)
        res = t.lookup("tcp", "ipv4", 80)
        self.assertEqual(res, (None, None, None))
        self.assertEqual(trop.owner_status(*res), "unavailable")

    def test_unreadable_net_dir_never_raises(self):
        with mock.patch("builtins.open", side_effect=PermissionError(errno.EACCES, "no")):
            t = trop.OwnerTable(self.root)
        self.assertEqual(t.lookup("tcp", "ipv4", 80), (None, None, None))

    def test_lsof_failure_gives_empty_table(self):
        with mock.patch("shutil.which", return_value="/bin/lsof"), \
                mock.patch("subprocess.run", side_effect=subprocess.TimeoutExpired("lsof", 5)):
            t = trop.OwnerTable(os.path.join(self.root, "missing"), use_lsof=True)
        self.assertEqual(t.lookup("tcp", "ipv4", 80), (None, None, None))


class TestLsofParse(unittest.TestCase):
    SAMPLE = "\n".join([
        "p100", "cnginx", "u0", "Lroot",
        "f6", "tIPv4", "PTCP", "n*:8080", "TST=LISTEN", "TQR=0",
        "f7", "tIPv6", "PTCP", "n[::1]:8443", "TST=LISTEN",
        "f8", "tIPv4", "PTCP", "n127.0.0.1:5000->127.0.0.1:6000", "TST=ESTABLISHED",
        "p55", "cpostgres", "u501", "Lpg",
        "f3", "tIPv4", "PTCP", "n127.0.0.1:8080", "TST=LISTEN",
        "f4", "tIPv6", "PUDP", "n[::]:5353",
        "f5", "tIPv4", "PUDP", "n*:*",
        "p", "f1", "tIPv4", "PTCP", "n*:1",   # malformed process record
    ]) + "\n"

    def test_parse(self):
        t = trop.OwnerTable(proc_root="/nonexistent-proc", use_lsof=False)
        t._parse_lsof(self.SAMPLE)
        self.assertEqual(t.lookup("tcp", "ipv4", 8080), (55, "postgres", "pg"))
        self.assertEqual(t.lookup("tcp", "ipv6", 8443), (100, "nginx", "root"))
        self.assertEqual(t.lookup("tcp", "ipv4", 5000), (100, "nginx", "root"))
        self.assertEqual(t.lookup("udp", "ipv6", 5353), (55, "postgres", "pg"))
        self.assertEqual(t.lookup("tcp", "ipv4", 1), (None, None, None))


@unittest.skipUnless(LINUX_PROC, "needs Linux /proc")
class TestRealProcOwners(TropTestCase):
    def bind(self, proto, address):
        return self.listen(proto, address).getsockname()[1]

    def test_own_sockets(self):
        cases = [("tcp", "ipv4", self.bind("tcp", "127.0.0.1")),
                 ("tcp", "ipv4", self.bind("tcp", "0.0.0.0")),
                 ("udp", "ipv4", self.bind("udp", "127.0.0.1"))]
        try:
            cases.append(("tcp", "ipv6", self.bind("tcp", "::1")))
        except OSError:
            pass   # IPv6 unavailable: that case only
        t = trop.OwnerTable()
        for protocol, family, port in cases:
            with self.subTest(protocol=protocol, family=family, port=port):
                res = t.lookup(protocol, family, port)
                self.assertEqual(res, this_process_owner())
                self.assertEqual(trop.owner_status(*res), "available")

    def test_process_table_is_walked_once_per_scan(self):
        """The cost that matters (a walk over every /proc/<pid>/fd) is paid once, however many lookups."""
        port = self.bind("tcp", "127.0.0.1")
        t = trop.OwnerTable()
        base = max(1, min(port - 1000, 65535 - 2000))
        with mock.patch.object(t, "_scan_fds", wraps=t._scan_fds) as walk:
            for p in range(base, base + 2001):
                for proto in ("tcp", "udp"):
                    t.lookup(proto, "ipv4", p)
            self.assertEqual(t.lookup("tcp", "ipv4", port)[0], os.getpid())
        self.assertEqual(walk.call_count, 1)


class TestScanOwnersDegrade(TropTestCase):
    """/proc absent or unreadable, or another user's socket: owners degrade, scan rows stay right."""

    def setUp(self):
        super().setUp()
        self.port = self.listening_block(2, "tcp")
        self.policy = trop.OccupancyPolicy(skip_ip6=True)

    def test_missing_proc_root_owners_unavailable(self):
        owners = trop.OwnerTable(proc_root=os.path.join(self.root, "no-proc"), use_lsof=False)
        rows = trop.scan_ports(trop.PortRange(self.port, self.port + 1), self.policy, set(), owners)
        self.assertEqual(rows, [{"port": self.port, "status": "occupied", "reserved": False, "protocol": "tcp",
                                 "address_family": "ipv4", "scope": "localhost", "address": "127.0.0.1",
                                 "process_id": None, "process_name": None, "user": None,
                                 "owner_status": "unavailable"}])
        self.assertEqual(json.loads(trop.format_scan(rows, "json"))[0]["process_id"], None)
        table = trop.format_scan(rows, "table").splitlines()
        self.assertEqual(table[2].split()[-4:], ["unavailable"] * 4)
        body = list(csv.reader(io.StringIO(trop.format_scan(rows, "csv"))))
        self.assertEqual(body[1][7:], ["unavailable"] * 4)
        lines = trop.format_occupancy(trop.occupancy_evidence(self.port, self.policy, owners))
        self.assertEqual(lines[-4:], ["    Process ID: unavailable", "    Process: unavailable",
                                      "    User: unavailable", "    Owner metadata: unavailable"])

    def test_other_users_process_is_partial(self):
        root = self.path("proc")
        self.write(os.path.join(root, "4242", "comm"), "someone-else\n")
        os.symlink("socket:[31337]", os.path.join(self.mkdir("proc", "4242", "fd"), "3"))
        self.write(os.path.join(root, "net", "tcp"),
                   TestFakeProcOwners.HEADER + TestFakeProcOwners.net_line(self.port, uid=0, inode=31337))
        root_name = user_name(0)
        with TestFakeProcOwners.unreadable_fds():
            owners = trop.OwnerTable(proc_root=root, use_lsof=False)
            rows = trop.scan_ports(trop.PortRange(self.port, self.port), self.policy, set(), owners)
            lines = trop.format_occupancy(trop.occupancy_evidence(self.port, self.policy, owners))
        self.assertEqual(len(rows), 1)
        self.assertEqual((rows[0]["status"], rows[0]["process_id"], rows[0]["process_name"], rows[0]["user"],
                          rows[0]["owner_status"]), ("occupied", None, None, root_name, "partial"))
        self.assertIn("    User: %s" % root_name, lines)
        self.assertEqual(lines[-1], "    Owner metadata: partial")

    def test_owner_table_exception_never_breaks_scan(self):
        owners = trop.OwnerTable(proc_root=os.path.join(self.root, "no-proc"), use_lsof=False)
        with mock.patch.object(trop.OwnerTable, "_user", side_effect=RuntimeError("boom")):
            owners._sockets[("tcp", "ipv4", self.port)] = [(0, 0, None, 1, "127.0.0.1")]
            rows = trop.scan_ports(trop.PortRange(self.port, self.port), self.policy, set(), owners)
        self.assertEqual([(r["port"], r["status"], r["owner_status"]) for r in rows],
                         [(self.port, "occupied", "unavailable")])


class TestProbes(unittest.TestCase):
    ALL = trop.OccupancyPolicy(check_all_interfaces=True).probes()

    def fake_sockets(self, fail):
        """Patch socket.socket; fail(stage, family, address, port) -> OSError or None."""
        created = []

        class FakeSocket(object):
            def __init__(self, family=socket.AF_INET, kind=socket.SOCK_STREAM, *rest):
                exc = fail("socket", family, None, None)
                if exc:
                    raise exc
                self.family, self.kind, self.options, self.bound = family, kind, [], None
                created.append(self)

            def setsockopt(self, *args):
                self.options.append(args)

            def bind(self, addr):
                exc = fail("bind", self.family, addr[0], addr[1])
                if exc:
                    raise exc
                self.bound = addr

            def close(self):
                pass
        return mock.patch("socket.socket", FakeSocket), created

    def test_matrix_order_and_skips(self):
        self.assertEqual(self.ALL, [
            ("tcp", "ipv4", "localhost", "127.0.0.1"), ("udp", "ipv4", "localhost", "127.0.0.1"),
            ("tcp", "ipv4", "wildcard", "0.0.0.0"), ("udp", "ipv4", "wildcard", "0.0.0.0"),
            ("tcp", "ipv6", "localhost", "::1"), ("udp", "ipv6", "localhost", "::1"),
            ("tcp", "ipv6", "wildcard", "::"), ("udp", "ipv6", "wildcard", "::")])
        self.assertEqual(trop.OccupancyPolicy().probes(), [p for p in self.ALL if p[2] == "localhost"])
        self.assertEqual(trop.OccupancyPolicy(skip_tcp=True, skip_ip4=True).probes(),
                         [("udp", "ipv6", "localhost", "::1")])
        self.assertEqual(trop.OccupancyPolicy(skip_udp=True, skip_ip6=True, check_all_interfaces=True).probes(),
                         [("tcp", "ipv4", "localhost", "127.0.0.1"), ("tcp", "ipv4", "wildcard", "0.0.0.0")])
        self.assertEqual(trop.OccupancyPolicy(skip=True, check_all_interfaces=True).probes(), [])

    def test_bind_only_v6only_reuseaddr_for_tcp_where_it_stays_strict_all_probes_run(self):
        """SO_REUSEADDR on TCP probes only where the platform says it still fails beside any listener (Linux)."""
        for reuse in (True, False):
            patcher, created = self.fake_sockets(
                lambda stage, fam, addr, port: OSError(errno.EADDRINUSE, "in use") if stage == "bind" else None)
            with patcher, mock.patch.object(trop.PLATFORM, "reuse_address", reuse):
                found, failed = trop.probe_port(41000, self.ALL)
            self.assertEqual((found, failed), (self.ALL, []))          # no short-circuit
            self.assertEqual(len(created), 8)
            for sock in created:
                reuses = (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1) in sock.options
                self.assertEqual(reuses, reuse and sock.kind == socket.SOCK_STREAM, (reuse, sock.kind))
                if sock.family == socket.AF_INET6:
                    self.assertIn((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1), sock.options)

    def test_platforms_that_reuse_addresses_in_probes(self):
        self.assertEqual(trop.PosixPlatform.reuse_address, sys.platform.startswith("linux"))
        self.assertFalse(trop.WindowsPlatform.reuse_address)

    def test_eacces_and_eperm_are_possibly_occupied(self):
        for code, exc_type in ((errno.EACCES, PermissionError), (errno.EPERM, PermissionError),
                               (errno.ENOBUFS, OSError)):
            with self.subTest(errno=errno.errorcode[code]):
                patcher, _ = self.fake_sockets(
                    lambda stage, fam, addr, port: exc_type(code, os.strerror(code))
                    if stage == "bind" and addr == "127.0.0.1" else None)
                probes = trop.OccupancyPolicy(skip_udp=True).probes()
                with patcher:
                    found, failed = trop.probe_port(41000, probes)
                    occ = trop.Occupancy(trop.OccupancyPolicy(skip_udp=True))
                    self.assertTrue(occ.occupied(41000))
                self.assertEqual(found, [])
                self.assertEqual([p for p, _e in failed], [("tcp", "ipv4", "localhost", "127.0.0.1")])
                self.assertEqual([(p, probe) for p, probe, _e in occ.failures],
                                 [(41000, ("tcp", "ipv4", "localhost", "127.0.0.1"))])

    def test_missing_family_or_address_is_not_applicable(self):
        for code in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
            for stage in ("socket", "bind"):
                with self.subTest(errno=errno.errorcode[code], stage=stage):
                    patcher, _ = self.fake_sockets(
                        lambda st, fam, addr, port: OSError(code, os.strerror(code))
                        if st == stage and fam == socket.AF_INET6 else None)
                    with patcher:
                        self.assertEqual(trop.probe_port(41000, self.ALL), ([], []))
                        occ = trop.Occupancy(trop.OccupancyPolicy(check_all_interfaces=True))
                        self.assertFalse(occ.occupied(41000))
                        self.assertEqual(occ.failures, [])
                        rows = trop.scan_ports(trop.PortRange(41000, 41002), trop.OccupancyPolicy(), set(),
                                               trop.OwnerTable("/nonexistent-proc", use_lsof=False))
                    self.assertEqual(rows, [])

    def test_possibly_occupied_port_is_skipped_by_allocation(self):
        patcher, _ = self.fake_sockets(
            lambda stage, fam, addr, port: PermissionError(errno.EACCES, "Permission denied")
            if stage == "bind" and port == 41000 else None)
        with patcher:
            occ = trop.Occupancy(trop.OccupancyPolicy())
            port = trop.Skips(trop.ExclusionList(), occ, os_reserved=trop.ExclusionList()).first_free(
                trop.PortRange(41000, 41001), set())
        self.assertEqual(port, 41001)

    def test_exhaustion_by_failed_probes_names_them(self):
        tmp = temp_dir(self, "trop-occ-")
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(tmp)
        patcher, _ = self.fake_sockets(
            lambda stage, fam, addr, port: PermissionError(errno.EACCES, "Permission denied")
            if stage == "bind" else None)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TROP_")}
        with patcher, mock.patch.dict(os.environ, env, clear=True):
            with self.assertRaises(trop.TropError) as ctx:
                trop.reserve(path=tmp, data_dir=os.path.join(tmp, "data"), min=41000, max=41000,
                             skip_ipv6=True, disable_autoclean=True)
        message = str(ctx.exception)
        self.assertEqual(ctx.exception.exit_code, 6)
        self.assertIn("exhausted", message)
        self.assertIn("possibly occupied", message)
        self.assertIn("TCP IPv4 localhost at 127.0.0.1", message)

    def test_scan_reports_failed_probes_apart_from_rows(self):
        """A failed probe proves nothing: no row (so autoexclude never adds it), but it is reported."""
        patcher, _ = self.fake_sockets(
            lambda stage, fam, addr, port: PermissionError(errno.EACCES, "Permission denied")
            if stage == "bind" and port == 41001 and fam == socket.AF_INET else None)
        owners = trop.OwnerTable("/nonexistent-proc", use_lsof=False)
        failures = []
        with patcher:
            rows = trop.scan_ports(trop.PortRange(41000, 41002), trop.OccupancyPolicy(skip_udp=True), {41001},
                                   owners, failures)
        self.assertEqual(rows, [])
        self.assertEqual([(port, probe[:2]) for port, probe, _err in failures], [(41001, ("tcp", "ipv4"))])
        self.assertIn("Permission denied", failures[0][2])

    def test_port_info_lists_probes_in_matrix_order(self):
        """A failed (possibly occupied) probe is reported where it sits in the probe matrix."""
        patcher, _ = self.fake_sockets(
            lambda stage, fam, addr, port: None if stage != "bind" or fam != socket.AF_INET else
            PermissionError(errno.EACCES, "Permission denied") if addr == "127.0.0.1" else
            OSError(errno.EADDRINUSE, "in use"))
        owners = trop.OwnerTable("/nonexistent-proc", use_lsof=False)
        with patcher:
            lines = trop.format_occupancy(trop.occupancy_evidence(
                41000, trop.OccupancyPolicy(skip_udp=True, skip_ip6=True, check_all_interfaces=True), owners))
        probes = [l for l in lines if l.startswith("  - ")]
        self.assertEqual(len(probes), 2)
        self.assertTrue(probes[0].startswith("  - TCP IPv4 localhost at 127.0.0.1"), probes)
        self.assertEqual(probes[1], "  - TCP IPv4 wildcard at 0.0.0.0")

    def test_scan_rows_sorted_by_port_then_probe(self):
        busy = {(41002, "::1"), (41002, "127.0.0.1"), (41001, "::"), (41001, "0.0.0.0")}
        patcher, _ = self.fake_sockets(
            lambda stage, fam, addr, port: OSError(errno.EADDRINUSE, "in use")
            if stage == "bind" and (port, addr) in busy else None)
        with patcher:
            rows = trop.scan_ports(trop.PortRange(41000, 41003), trop.OccupancyPolicy(check_all_interfaces=True),
                                   set(), trop.OwnerTable("/nonexistent-proc", use_lsof=False))
        self.assertEqual([(r["port"], r["protocol"], r["address"]) for r in rows], [
            (41001, "tcp", "0.0.0.0"), (41001, "udp", "0.0.0.0"), (41001, "tcp", "::"), (41001, "udp", "::"),
            (41002, "tcp", "127.0.0.1"), (41002, "udp", "127.0.0.1"), (41002, "tcp", "::1"),
            (41002, "udp", "::1")])
        self.assertEqual(trop.unreserved_occupied(rows), [41001, 41002])


class TestRealProbe(TropTestCase):
    def test_real_listener_probe(self):
        port = self.listening_block(2, "tcp")
        found, failed = trop.probe_port(port, trop.OccupancyPolicy().probes())
        self.assertEqual((found, failed), ([("tcp", "ipv4", "localhost", "127.0.0.1")], []))
        self.assertTrue(trop.Occupancy(trop.OccupancyPolicy()).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy()).occupied(port + 1))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_tcp=True)).occupied(port))


class TestScanCLI(TropTestCase):
    """Listeners: A = TCP 127.0.0.1, A+1 = UDP 127.0.0.1; A+2 and A+3 free."""

    # B §3.5, in this order
    FIELDS = ("port", "status", "reserved", "protocol", "address_family", "scope", "address",
              "process_id", "process_name", "user", "owner_status")
    WIDTHS = (6, 20, 9, 9, 7, 10, 15, 12, 16, 16)

    def setUp(self):
        super().setUp()
        self.a = self.listening_block(6, "tcp", "udp")
        self.expected = [self.row(self.a, "tcp"), self.row(self.a + 1, "udp")]
        self.found = "\nFound 2 unreserved occupied port(s)\n"

    def text_rows(self):
        out = []
        for r in self.expected:
            cells = []
            for k in self.FIELDS:
                v = r[k]
                cells.append("unavailable" if v is None else ("true" if v else "false") if isinstance(v, bool)
                             else str(v))
            out.append(cells)
        return out

    def row(self, port, proto, family="ipv4", scope="localhost", address="127.0.0.1", reserved=False):
        pid, name, user = this_process_owner() if LINUX_PROC else (None, None, None)
        return {"port": port, "status": "occupied (reserved)" if reserved else "occupied", "reserved": reserved,
                "protocol": proto, "address_family": family, "scope": scope, "address": address,
                "process_id": pid, "process_name": name, "user": user,
                "owner_status": "available" if LINUX_PROC else None}

    @staticmethod
    def comparable(rows):
        if LINUX_PROC:
            return rows
        owner = ("process_id", "process_name", "user", "owner_status")
        return [{k: v for k, v in r.items() if k not in owner} for r in rows]

    def scan(self, *args):
        return self.trop("scan", "--min", self.a, "--max", self.a + 3, *args)

    def scan_json(self, *args, **kw):
        rc, out, err = self.trop("scan", "--format", "json", *args, **kw)
        self.assertEqual(rc, 0, err)
        return json.loads(out), err

    def test_table(self):
        rc, out, err = self.scan()
        self.assertEqual((rc, err), (0, self.found))
        lines = out.split("\n")
        self.assertEqual(lines[-1], "")                      # exactly one trailing newline
        lines = lines[:-1]
        header = lines[0]
        self.assertEqual(header[:7], "Port   ")
        self.assertEqual(header[7:28], "Status".ljust(21))
        self.assertEqual(header[sum(self.WIDTHS) + len(self.WIDTHS):], "Owner Status")
        self.assertEqual(lines[1], "-" * 145)
        expected = [" ".join(c.ljust(w) for c, w in zip(cells, self.WIDTHS)) + " " + cells[-1]
                    for cells in self.text_rows()]
        if LINUX_PROC:
            self.assertEqual(lines[2:], expected)
        else:
            self.assertEqual([l[:120] for l in lines[2:]], [l[:120] for l in expected])

    def test_json(self):
        rc, out, err = self.scan("--format", "json")
        self.assertEqual((rc, err), (0, self.found))
        self.assertTrue(out.endswith("]\n"))
        self.assertTrue(out.startswith("[\n  {\n    \"port\": "), out)   # pretty, 2-space indent
        pairs = json.loads(out, object_pairs_hook=lambda p: p)
        self.assertEqual([[k for k, _v in obj] for obj in pairs], [list(self.FIELDS)] * 2)
        rows = json.loads(out)
        self.assertEqual(self.comparable(rows), self.comparable(self.expected))
        self.assertIs(rows[0]["reserved"], False)
        if LINUX_PROC:
            self.assertIsInstance(rows[0]["process_id"], int)

    def test_csv_and_tsv(self):
        for fmt, delim in (("csv", ","), ("tsv", "\t")):
            with self.subTest(format=fmt):
                rc, out, err = self.scan("--format", fmt)
                self.assertEqual((rc, err), (0, self.found))
                self.assertTrue(out.endswith("\n") and not out.endswith("\n\n"))
                table = list(csv.reader(io.StringIO(out), delimiter=delim))
                self.assertEqual(table[0], list(self.FIELDS))
                self.assertEqual(out.splitlines()[0], delim.join(self.FIELDS))
                if LINUX_PROC:
                    self.assertEqual(table[1:], self.text_rows())
                else:
                    self.assertEqual([r[:7] for r in table[1:]], [r[:7] for r in self.text_rows()])

    def test_free_range_is_empty(self):
        lo, hi = self.a + 2, self.a + 3
        rc, out, err = self.trop("scan", "--min", lo, "--max", hi)
        self.assertEqual((rc, err, len(out.splitlines())), (0, "", 2))
        rows, err = self.scan_json("--min", lo, "--max", hi)
        self.assertEqual((rows, err), ([], ""))
        rc, out, err = self.trop("scan", "--min", lo, "--max", hi, "--format", "csv")
        self.assertEqual((rc, out, err), (0, ",".join(self.FIELDS) + "\n", ""))

    def test_free_port_absent(self):
        rows, _err = self.scan_json("--check-all-interfaces")
        self.assertNotIn(self.a + 2, [r["port"] for r in rows])
        self.assertNotIn(self.a + 3, [r["port"] for r in rows])

    def test_skip_flags(self):
        rows, err = self.scan_json("--min", self.a, "--max", self.a + 3, "--skip-tcp")
        self.assertEqual(self.comparable(rows), self.comparable([self.row(self.a + 1, "udp")]))
        self.assertEqual(err, "\nFound 1 unreserved occupied port(s)\n")
        rows, err = self.scan_json("--min", self.a, "--max", self.a + 3, "--skip-udp")
        self.assertEqual(self.comparable(rows), self.comparable([self.row(self.a, "tcp")]))
        rows, err = self.scan_json("--min", self.a, "--max", self.a + 3, "--skip-ipv4")
        self.assertEqual((rows, err), ([], ""))

    def test_reserved_port_shows_occupied_reserved(self):
        rc, out, err = self.trop("reserve", "--port", self.a, "--min", self.a, "--max", self.a, "--ignore-occupied")
        self.assertEqual((rc, out), (0, "%d\n" % self.a), err)
        rows, err = self.scan_json("--min", self.a, "--max", self.a + 3)
        self.assertEqual(self.comparable(rows), self.comparable([self.row(self.a, "tcp", reserved=True),
                                                                 self.row(self.a + 1, "udp")]))
        self.assertEqual(err, "\nFound 1 unreserved occupied port(s)\n")
        rc, out, err = self.trop("scan", "--min", self.a, "--max", self.a)
        self.assertEqual((rc, err), (0, ""))                 # only reserved ones: no "Found"
        cells = out.splitlines()[2]
        self.assertEqual(cells[7:28], "occupied (reserved)".ljust(21))
        self.assertEqual(cells[28:38], "true".ljust(10))

    def test_quiet_keeps_found_line(self):
        rc, out, err = self.scan("--quiet", "--format", "csv")
        self.assertEqual((rc, err), (0, self.found))
        self.assertEqual(len(out.splitlines()), 3)

    def test_range_from_config_and_cli_override(self):
        self.write(os.path.join(self.proj, "trop.yaml"), "ports:\n  min: %d\n  max: %d\n" % (self.a, self.a + 3))
        rows, _err = self.scan_json()
        self.assertEqual([r["port"] for r in rows], [self.a, self.a + 1])
        rows, _err = self.scan_json("--min", self.a + 1)
        self.assertEqual([r["port"] for r in rows], [self.a + 1])

    def test_scan_ignores_max_offset(self):
        self.write(os.path.join(self.proj, "trop.yaml"), "ports:\n  min: %d\n  max_offset: 1\n" % self.a)
        rows, _err = self.scan_json("--max", self.a + 3)
        self.assertEqual([r["port"] for r in rows], [self.a, self.a + 1])

    def test_same_port_rows_follow_probe_order(self):
        self.listen("udp", "127.0.0.1", self.a)
        rows, err = self.scan_json("--min", self.a, "--max", self.a, "--check-all-interfaces", "--skip-ipv6")
        self.assertEqual([(r["protocol"], r["scope"], r["address"]) for r in rows], [
            ("tcp", "localhost", "127.0.0.1"), ("udp", "localhost", "127.0.0.1"),
            ("tcp", "wildcard", "0.0.0.0"), ("udp", "wildcard", "0.0.0.0")])
        self.assertEqual(err, "\nFound 1 unreserved occupied port(s)\n")   # ports, not rows

    def test_wildcard_listener_with_check_all_interfaces(self):
        port = self.a + 4
        self.listen("tcp", "0.0.0.0", port)
        for fmt in ("json", "table", "csv", "tsv"):
            with self.subTest(format=fmt):
                rc, out, err = self.trop("scan", "--min", port, "--max", port, "--check-all-interfaces",
                                         "--format", fmt)
                self.assertEqual((rc, err), (0, "\nFound 1 unreserved occupied port(s)\n"))
                if fmt == "json":
                    rows = json.loads(out)
                elif fmt == "table":
                    rows = [dict(zip(self.FIELDS, l.split())) for l in out.splitlines()[2:]]
                else:
                    rows = list(csv.DictReader(io.StringIO(out), delimiter="," if fmt == "csv" else "\t"))
                wildcard = [r for r in rows if r["scope"] == "wildcard"]
                self.assertEqual([(str(r["port"]), r["protocol"], r["address_family"], r["address"])
                                  for r in wildcard], [(str(port), "tcp", "ipv4", "0.0.0.0")])
                if LINUX_PROC:
                    pid, name, user = this_process_owner()
                    self.assertEqual((str(wildcard[0]["process_id"]), wildcard[0]["process_name"],
                                      wildcard[0]["user"], wildcard[0]["owner_status"]),
                                     (str(pid), name, user, "available"))
        rows, _err = self.scan_json("--min", port, "--max", port)
        self.assertEqual([r for r in rows if r["scope"] == "wildcard"], [])

    def test_ipv6_loopback_listener(self):
        port = self.a + 5
        try:
            self.listen("tcp", "::1", port)
        except OSError as exc:
            self.skipTest("IPv6 loopback unavailable: %s" % exc)
        expected = self.row(port, "tcp", family="ipv6", address="::1")
        for fmt in ("json", "table", "csv", "tsv"):
            with self.subTest(format=fmt):
                rc, out, err = self.trop("scan", "--min", port, "--max", port, "--format", fmt)
                self.assertEqual((rc, err), (0, "\nFound 1 unreserved occupied port(s)\n"))
                if fmt == "json":
                    self.assertEqual(self.comparable(json.loads(out)), self.comparable([expected]))
                else:
                    delim = {"csv": ",", "tsv": "\t"}.get(fmt)
                    row = (out.splitlines()[2].split() if fmt == "table"
                           else list(csv.reader(io.StringIO(out), delimiter=delim))[1])
                    n = 11 if LINUX_PROC else 7
                    self.assertEqual(row[:n], [("false" if v is False else str(v))
                                               for v in (expected[k] for k in self.FIELDS)][:n])
        rc, out, _err = self.trop("port-info", port, "--include-occupancy", "--skip-ipv4")
        self.assertIn("  - TCP IPv6 localhost at ::1\n", out)


class TestScanBadInput(TropTestCase):
    def assert_fails(self, code, *args):
        rc, out, err = self.trop("scan", *args)
        self.assertEqual((rc, out), (code, ""), err)
        return err

    def test_invalid_ports_exit_4(self):
        for args in (("--min", "0", "--max", "10"), ("--min", "10", "--max", "70000"), ("--min", "abc"),
                     ("--min", "-1", "--max", "10")):
            with self.subTest(args=args):
                err = self.assert_fails(4, *args)
                self.assertTrue(err.startswith("Error: ") and err.count("\n") == 1, err)
                self.assertNotIn("Traceback", err)

    def test_min_greater_than_max_exit_4(self):
        err = self.assert_fails(4, "--min", "50001", "--max", "50000")
        self.assertTrue(err.startswith("Error: "), err)
        self.assertFalse(os.path.exists(os.path.join(self.data, "trop.db")))

    def test_unknown_format_exit_2(self):
        for fmt in ("xml", "JSON", "Table", ""):
            with self.subTest(format=fmt):
                self.assertIn("usage:", self.assert_fails(2, "--format", fmt))

    def test_invalid_project_config_exit_7(self):
        self.write(os.path.join(self.proj, "trop.yaml"), "ports: [\n")
        err = self.assert_fails(7, "--min", "50000", "--max", "50001")
        self.assertTrue(err.startswith("Error: ") and "trop.yaml" in err, err)

    def test_no_skip_occupancy_check_flag(self):
        self.assert_fails(2, "--skip-occupancy-check")


class TestPortInfoOccupancy(TropTestCase):
    def setUp(self):
        super().setUp()
        self.a = self.listening_block(3, "tcp")

    def owner_lines(self):
        pid, name, user = this_process_owner()
        return ["    Process ID: %d" % pid, "    Process: %s" % name, "    User: %s" % user,
                "    Owner metadata: available"]

    def test_occupied_port(self):
        rc, out, err = self.trop("port-info", self.a, "--include-occupancy")
        self.assertEqual((rc, err), (0, ""))
        lines = out.split("\n")
        self.assertEqual(lines[:5], ["Port %d is not reserved" % self.a, "", "Occupancy status:",
                                     "  Port is currently in use", "  - TCP IPv4 localhost at 127.0.0.1"])
        if LINUX_PROC:
            self.assertEqual(lines[5:], self.owner_lines() + [""])

    def test_check_all_interfaces_lists_each_probe(self):
        if not LINUX_PROC:
            self.skipTest("needs Linux /proc")
        rc, out, _err = self.trop("port-info", self.a, "--include-occupancy", "--check-all-interfaces")
        self.assertEqual(rc, 0)
        self.assertEqual(out.split("\n")[3:], ["  Port is currently in use", "  - TCP IPv4 localhost at 127.0.0.1"]
                         + self.owner_lines() + ["  - TCP IPv4 wildcard at 0.0.0.0"] + self.owner_lines() + [""])

    def test_udp_listener(self):
        self.listen("udp", "127.0.0.1", self.a + 1)
        rc, out, _err = self.trop("port-info", self.a + 1, "--include-occupancy")
        self.assertEqual(rc, 0)
        self.assertIn("\n  - UDP IPv4 localhost at 127.0.0.1\n", out)

    def test_free_port_and_disabled_probes(self):
        rc, out, err = self.trop("port-info", self.a + 2, "--include-occupancy")
        self.assertEqual((rc, out, err),
                         (0, "Port %d is not reserved\n\nOccupancy status:\n  Port is available\n" % (self.a + 2), ""))
        rc, out, _err = self.trop("port-info", self.a, "--include-occupancy", "--skip-tcp")
        self.assertEqual(out.split("\n")[3:], ["  Port is available", ""])
        not_checked = "Occupancy status:\n  Not checked: the effective policy disabled every probe\n"
        for flags in (("--skip-occupancy-check",), ("--skip-tcp", "--skip-udp"), ("--skip-ipv4", "--skip-ipv6")):
            with self.subTest(flags=flags):
                rc, out, _err = self.trop("port-info", self.a, "--include-occupancy", *flags)
                self.assertEqual(rc, 0)
                self.assertTrue(out.endswith("\n\n" + not_checked), out)

    def test_without_include_occupancy_no_report(self):
        rc, out, err = self.trop("port-info", self.a)
        self.assertEqual((rc, out, err), (0, "Port %d is not reserved\n" % self.a, ""))

    def test_reserved_and_occupied(self):
        rc, out, err = self.trop("reserve", "--port", self.a, "--min", self.a, "--max", self.a, "--ignore-occupied",
                                 "--tag", "web")
        self.assertEqual((rc, out), (0, "%d\n" % self.a), err)
        rc, out, _err = self.trop("port-info", self.a, "--include-occupancy")
        self.assertEqual(rc, 0)
        lines = out.split("\n")
        self.assertEqual(lines[:3], ["Port: %d" % self.a, "Path: %s" % self.proj, "Tag: web"])
        i = lines.index("Path exists: yes")
        self.assertEqual(lines[i + 1:i + 5], ["", "Occupancy status:", "  Port is currently in use",
                                              "  - TCP IPv4 localhost at 127.0.0.1"])

    def test_occupancy_flags_require_include_occupancy(self):
        for flag in ("--skip-occupancy-check", "--skip-tcp", "--skip-udp", "--skip-ipv4", "--skip-ipv6",
                     "--check-all-interfaces"):
            with self.subTest(flag=flag):
                rc, out, err = self.trop("port-info", self.a, flag)
                self.assertEqual((rc, out), (2, ""), err)
                error = [l for l in err.splitlines() if "error:" in l]
                self.assertTrue(error and "--include-occupancy" in error[-1], err)

    def test_port_zero(self):
        rc, out, err = self.trop("port-info", "0", "--include-occupancy")
        self.assertEqual((rc, out), (4, ""), err)


class TestScanAutoexclude(TropTestCase):
    CONFIG = ("# project settings -- keep me\n"
              "project: demo   # inline project comment\n"
              "\n"
              "# exclusions below\n"
              "excluded_ports:\n"
              "  - %d  # postgres\n"
              "ports:\n"
              "  min: 1000\n"
              "  max: 65000  # range comment\n"
              "# trailing comment\n")

    def setUp(self):
        super().setUp()
        self.a = self.listening_block(6, "tcp", "udp")
        self.project = self.mkdir("proj", "proj")

    def text(self, path):
        return self.read(path).decode("utf-8")

    def entries(self, path):
        return self.exclusions(path)

    def scan(self, *args):
        return self.trop("scan", "--min", self.a, "--max", self.a + 3, *args, cwd=self.project)

    def assert_comments_kept(self, before, after):
        for line in before.splitlines():
            if "#" in line and "postgres" not in line:
                self.assertIn(line, after.splitlines())

    def test_writes_trop_yaml_and_keeps_comments(self):
        before = self.CONFIG % (self.a + 5)
        path = self.write(os.path.join(self.project, "trop.yaml"), before)
        rc, out, err = self.scan("--autoexclude")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out.splitlines()), 4)
        self.assertEqual(err, "Added 2 exclusions to %s\n\nFound 2 unreserved occupied port(s)\n" % path)
        after = self.text(path)
        self.assert_comments_kept(before, after)
        self.assertEqual(self.entries(path), [(self.a + 5, self.a + 5), (self.a, self.a), (self.a + 1, self.a + 1)])
        rc, out, err = self.trop("validate", path)
        self.assertEqual((rc, out), (0, "Configuration is valid\n"), err)
        # a second run adds no duplicates
        rc, _out, err = self.scan("--autoexclude")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(self.entries(path)), 3)

    def test_existing_entry_comments_survive_append(self):
        before = ("excluded_ports:\n"
                  "  # databases\n"
                  "  - %d  # postgres\n"
                  "  - %d  # redis\n" % (self.a + 4, self.a + 5))
        path = self.write(os.path.join(self.project, "trop.yaml"), before)
        rc, _out, err = self.scan("--autoexclude")
        self.assertEqual(rc, 0, err)
        after = self.text(path)
        for comment in ("# databases", "# postgres", "# redis"):
            self.assertIn(comment, after)

    def test_prefers_trop_local_yaml(self):
        main = self.write(os.path.join(self.project, "trop.yaml"), "# main\nports: {min: 1000, max: 65000}\n")
        local = self.write(os.path.join(self.project, "trop.local.yaml"), "# local comment\nexcluded_ports: []\n")
        rc, _out, err = self.scan("--autoexclude")
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.text(main), "# main\nports: {min: 1000, max: 65000}\n")
        self.assertIn("# local comment", self.text(local))
        self.assertEqual(self.entries(local), [(self.a, self.a), (self.a + 1, self.a + 1)])
        self.assertIn("Added 2 exclusions to %s\n" % local, err)

    def test_falls_back_to_user_config(self):
        rc, _out, err = self.trop("scan", "--min", self.a, "--max", self.a + 3, "--autoexclude")
        self.assertEqual(rc, 0, err)
        user = os.path.join(self.data, "config.yaml")
        self.assertEqual(self.entries(user), [(self.a, self.a), (self.a + 1, self.a + 1)])
        self.assertEqual(sorted(os.listdir(self.proj)), ["proj"])
        self.assertIn("Added 2 exclusions to %s\n" % user, err)

    def test_autocompact_after_adding(self):
        before = self.CONFIG % (self.a + 2)
        path = self.write(os.path.join(self.project, "trop.yaml"), before)
        rc, _out, err = self.scan("--autoexclude", "--autocompact")
        self.assertEqual(rc, 0, err)
        after = self.text(path)
        self.assert_comments_kept(before, after)
        self.assertEqual(self.entries(path), [(self.a, self.a + 2)])
        rc, _out, err = self.trop("validate", path)
        self.assertEqual(rc, 0, err)

    def test_autocompact_only_when_something_added(self):
        before = "# c\nexcluded_ports:\n  - %d\n  - %d\n" % (self.a + 4, self.a + 5)
        path = self.write(os.path.join(self.project, "trop.yaml"), before)
        rc, _out, err = self.trop("scan", "--min", self.a + 2, "--max", self.a + 3, "--autoexclude",
                                  "--autocompact", cwd=self.project)
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(self.text(path), before)

    def test_reserved_ports_not_excluded_and_quiet(self):
        path = self.write(os.path.join(self.project, "trop.yaml"), "# c\n")
        rc, out, err = self.trop("reserve", "--port", self.a, "--min", self.a, "--max", self.a,
                                 "--ignore-occupied", cwd=self.project)
        self.assertEqual((rc, out), (0, "%d\n" % self.a), err)
        rc, _out, err = self.scan("--autoexclude", "--quiet")
        self.assertEqual((rc, err), (0, "\nFound 1 unreserved occupied port(s)\n"))
        self.assertEqual(self.entries(path), [(self.a + 1, self.a + 1)])
        self.assertTrue(self.text(path).startswith("# c\n"))

    def test_without_autoexclude_nothing_written(self):
        before = self.CONFIG % (self.a + 5)
        path = self.write(os.path.join(self.project, "trop.yaml"), before)
        rc, _out, _err = self.scan("--autocompact")
        self.assertEqual(rc, 0)
        self.assertEqual(self.text(path), before)
        self.assertFalse(os.path.exists(os.path.join(self.data, "config.yaml")))


# --- Allocation --------------------------------------------------------------

def port_set(ports=()):
    """Reserved ports as the allocator takes them."""
    cls = getattr(trop, "PortSet", None)
    return cls(ports) if cls else set(ports)


class FakeOccupancy:
    def __init__(self, busy=()):
        self.busy = set(busy)

    def occupied(self, port):
        return port in self.busy


class TestAllocation(unittest.TestCase):
    def skips(self, excluded=(), busy=(), os_reserved=(), avoid_unsafe=True):
        return trop.Skips(trop.ExclusionList(excluded), FakeOccupancy(busy), avoid_unsafe,
                          trop.ExclusionList(os_reserved))

    def test_first_free_skips_taken_excluded_and_occupied(self):
        rng = trop.PortRange(5000, 5010)
        excl = [(5002, 5003)]
        self.assertEqual(self.skips().first_free(rng, port_set()), 5000)
        self.assertEqual(self.skips(excl).first_free(rng, port_set({5000, 5001})), 5004)
        self.assertEqual(self.skips(excl, {5004}).first_free(rng, port_set({5000, 5001})), 5005)
        self.assertEqual(self.skips(excl, {5007}).first_free(rng, port_set({5000, 5001, 5004, 5005, 5006, 5008})),
                         5009)
        self.assertEqual(self.skips(excl).first_free(trop.PortRange(5003, 5010), port_set({5000, 5001})), 5004)
        self.assertIsNone(self.skips([(5001, 5001)]).first_free(trop.PortRange(5000, 5001), port_set({5000})))
        self.assertIsNone(self.skips().first_free(trop.PortRange(5000, 5002), port_set(range(4990, 5003))))

    def test_first_free_skips_unsafe_and_os_reserved_ports_and_says_why(self):
        rng = trop.PortRange(5058, 5066)
        skips = self.skips([(5059, 5059)], {5063}, os_reserved=[(5062, 5062)])
        self.assertEqual(skips.first_free(rng, port_set({5058})), 5064)
        self.assertEqual(self.skips(avoid_unsafe=False).first_free(trop.PortRange(5060, 5061), port_set()), 5060)
        with mock.patch.object(trop, "OwnerTable", lambda: types.SimpleNamespace(
                lookup=lambda proto, family, port: (812, "node", "me") if proto == "tcp" else (None, None, None))):
            census = skips.census(rng, port_set({5058}))            # owners are looked up here, not in str()
        self.assertEqual(census.counts, {"reserved": 1, "excluded": 1, "unsafe": 2, "OS-reserved": 1, "occupied": 1})
        with mock.patch.object(trop, "OwnerTable", None):          # formatting does no I/O
            self.assertEqual(str(census), "1 reserved, 1 excluded, 2 unsafe, 1 OS-reserved, 1 occupied "
                                          "(5063 by pid 812 node)")

    def request(self, preferred, **flags):
        values = dict(preferred=preferred, port_range=trop.PortRange(5000, 5010), ignore_exclusions=False,
                      ignore_occupied=False, force=False)
        values.update(flags)
        return types.SimpleNamespace(**values)

    def allocate(self, preferred, taken=(), busy=(), **flags):
        return trop.allocate_single(self.request(preferred, **flags), port_set(taken),
                                    self.skips([(5005, 5005)], busy))[0]

    def test_preferred_port(self):
        self.assertEqual(self.allocate(5007), 5007)
        self.assertEqual(self.allocate(5007, taken={5000}), 5007)
        self.assertEqual(self.allocate(None, taken={5000}), 5001)

    def test_preferred_port_falls_back(self):
        self.assertEqual(self.allocate(9000), 5000)                          # outside the range
        self.assertEqual(self.allocate(5007, taken={5007}), 5000)            # held by another key
        self.assertEqual(self.allocate(5007, taken={5007}, force=True), 5000)
        self.assertEqual(self.allocate(5005), 5000)                          # excluded
        self.assertEqual(self.allocate(5006, busy={5006}), 5000)             # occupied

    def test_preferred_port_ignore_flags(self):
        self.assertEqual(self.allocate(5005, ignore_exclusions=True), 5005)
        self.assertEqual(self.allocate(5006, busy={5006}, ignore_occupied=True), 5006)
        self.assertEqual(self.allocate(5005, force=True), 5005)
        # The ignore flags apply to the preferred port only, never to the fallback scan.
        self.assertEqual(self.allocate(None, busy={5000}, ignore_occupied=True), 5001)

    def test_a_preferred_unsafe_or_os_reserved_port_is_given_with_a_caution(self):
        request = self.request(5060, port_range=trop.PortRange(5000, 7000))
        port, cautions = trop.allocate_single(request, port_set(), self.skips(os_reserved=[(5060, 5061)]))
        self.assertEqual(port, 5060)
        self.assertEqual(len(cautions), 2)
        self.assertIn("bad-port list", cautions[0])
        self.assertIn("reserved by the operating system", cautions[1])


NETSH_EXCLUDED_V4 = """
Protocol tcp Port Exclusion Ranges

Start Port    End Port
----------    --------
      5357        5357
      5985        6084
     50000       50059     *

* - Administered port exclusions.

"""
NETSH_EXCLUDED_V6 = """
Protocol tcp Port Exclusion Ranges

Start Port    End Port
----------    --------
      6200        6299

* - Administered port exclusions.
"""
NETSH_EXCLUDED_GERMAN = """
Protokoll tcp Portausschlussbereiche

Startport    Endport
----------    --------
      1080        1080

* - Verwaltete Portausschlüsse.
"""
NETSH_DYNAMIC = """
Protocol tcp Dynamic Port Range
---------------------------------
Start Port      : 49152
Number of Ports : 16384
"""


class TestUnsafeAndReservedPorts(TropTestCase):
    """Browsers' bad ports, the OS's reserved ports and its ephemeral range: lists, allocation and messages."""
    IN_PROCESS = True

    def fake_proc(self, reserved="", ephemeral="32768\t60999\n"):
        root = self.mkdir("fakeproc")
        self.write(os.path.join(root, "sys/net/ipv4/ip_local_reserved_ports"), reserved + "\n")
        self.write(os.path.join(root, "sys/net/ipv4/ip_local_port_range"), ephemeral)
        patcher = mock.patch.object(trop, "PROC_ROOT", root)
        patcher.start()
        self.addCleanup(patcher.stop)
        return root

    def test_the_fetch_bad_port_list(self):
        self.assertEqual(len(trop.UNSAFE_PORTS), 82)
        for port in (1, 22, 25, 110, 143, 587, 993, 2049, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668,
                     6669, 6679, 6697, 10080):
            self.assertIn(port, trop.UNSAFE_PORTS)
        for port in (80, 443, 3000, 5000, 5432, 8080, 6664, 6670):
            self.assertNotIn(port, trop.UNSAFE_PORTS)
        self.assertEqual(sorted(p for p in trop.UNSAFE_PORTS if 5000 <= p <= 7000),
                         [5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697])

    def test_parsers(self):
        self.assertEqual(trop.parse_reserved_ports("8080,9000-9002, 70000,junk,0\n"), [(8080, 8080), (9000, 9002)])
        self.assertEqual(trop.parse_reserved_ports(""), [])
        self.assertEqual(trop.parse_netsh_ranges(NETSH_EXCLUDED_V4), [(5357, 5357), (5985, 6084), (50000, 50059)])
        self.assertEqual(trop.parse_netsh_ranges(NETSH_EXCLUDED_GERMAN), [(1080, 1080)])
        answers = {"ipv4": NETSH_EXCLUDED_V4, "ipv6": NETSH_EXCLUDED_V6}
        calls = []

        def netsh(*args):
            calls.append(args)
            return answers.get(args[1], "") if "excludedportrange" in args else NETSH_DYNAMIC
        reserved = trop.os_reserved_ports(netsh=netsh)
        self.assertEqual(reserved.ranges, [(5357, 5357), (5985, 6084), (6200, 6299), (50000, 50059)])
        self.assertEqual(len(calls), 2)                 # IPv4 and IPv6, once each
        self.assertEqual(trop.ephemeral_range(netsh=netsh), trop.PortRange(49152, 65535))
        self.assertIsNone(trop.ephemeral_range(netsh=lambda *a: ""))

    def test_linux_files(self):
        root = self.fake_proc("5000-5002,5004")
        self.assertEqual(trop.os_reserved_ports().ranges, [(5000, 5002), (5004, 5004)])
        self.assertEqual(trop.ephemeral_range(), trop.PortRange(32768, 60999))
        self.assertEqual(trop.os_reserved_ports(proc_root=self.path("nowhere")).ranges, [])
        self.assertIsNone(trop.ephemeral_range(proc_root=self.path("nowhere")))
        self.assertTrue(root)

    def test_a_fake_ip_local_reserved_ports_is_honoured(self):
        self.fake_proc("5000-5002,5004")
        self.assertEqual(trop.reserve(tag="a", **self.opts), 5003)
        self.assertEqual(trop.reserve(tag="b", **self.opts), 5005)
        rc, out, err = trop_main("--data-dir", self.data, "reserve", "--tag", "c", "--port", "5001",
                                 "--skip-occupancy-check")
        self.assertEqual((rc, out), (0, "5001\n"))
        self.assertEqual(err, "Warning: port 5001 is reserved by the operating system "
                              "(net.ipv4.ip_local_reserved_ports)\n")
        rc, out, err = trop_main("--data-dir", self.data, "reserve", "--tag", "d", "--min", "5000", "--max", "5004",
                                 "--skip-occupancy-check", "--disable-autoclean")
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("remaining blockers: 2 reserved, 3 OS-reserved", err)

    def test_explicit_unsafe_port_warns_but_works(self):
        self.fake_proc()
        rc, out, err = trop_main("--data-dir", self.data, "reserve", "--port", "5060", "--skip-occupancy-check")
        self.assertEqual((rc, out), (0, "5060\n"))
        self.assertEqual(err, "Warning: port 5060 is on the browsers' bad-port list (WHATWG Fetch): browsers refuse "
                              "to connect to it\n")
        self.assertEqual(trop_main("--data-dir", self.data, "reserve", "--skip-occupancy-check"), (0, "5060\n", ""))
        rc, out, err = trop_main("--data-dir", self.data, "reserve", "--port", "5060", "--quiet", "--tag", "q",
                                 "--skip-occupancy-check")
        self.assertEqual((rc, out, err), (0, "5000\n", ""))          # 5060 is taken: the fallback, no caution

    def test_a_preferred_unsafe_service_port_warns_but_works(self):
        self.fake_proc()
        group = self.group_file(self.proj, [("web", {"preferred": 6000}), ("api", {"offset": 1})], pmin=5059,
                                pmax=5070)
        rc, out, err = trop_main("--data-dir", self.data, "reserve-group", group, "--format", "json")
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out), {"web": 6000, "api": 5062})     # base 5061: 5060 and 5061 are unsafe
        self.assertEqual(err, "Reserved 2 ports.\nWarning: port 6000 is on the browsers' bad-port list (WHATWG "
                              "Fetch): browsers refuse to connect to it\n")

    def test_offsets_never_land_on_an_unsafe_port(self):
        self.fake_proc()
        group = self.group_file(self.proj, [("a", {"offset": 0}), ("b", {"offset": 2})], pmin=5056, pmax=5070)
        rc, out, err = trop_main("--data-dir", self.data, "reserve-group", group, "--format", "json")
        self.assertEqual(rc, 0, err)
        ports = json.loads(out)
        self.assertEqual(ports, {"a": 5056, "b": 5058})
        self.assertTrue(set(ports.values()).isdisjoint(trop.UNSAFE_PORTS))
        group = self.group_file(self.mkdir("proj", "two"), [("a", {"offset": 0}), ("b", {"offset": 1})], pmin=5059,
                                pmax=5061)
        rc, out, err = trop_main("--data-dir", self.data, "reserve-group", group)
        self.assertEqual(rc, 6)
        self.assertIn("no base in 5059-5061 leaves every offset free: 2 unsafe", err)

    def test_the_switch(self):
        self.fake_proc()
        for env in ({"TROP_ALLOW_UNSAFE_PORTS": "1"}, {}):
            with mock.patch.dict(os.environ, env):
                rc, out, err = trop_main("--data-dir", self.data, "reserve", "--tag", str(bool(env)), "--min",
                                         "5060", "--max", "5061", "--skip-occupancy-check", "--disable-autoclean")
            if env:
                self.assertEqual((rc, out, err), (0, "5060\n", ""))
            else:
                self.assertEqual(rc, 6)
                self.assertIn("remaining blockers: 1 reserved, 1 unsafe", err)
        self.write(os.path.join(self.proj, "trop.yaml"), "allow_unsafe_ports: true\n")
        self.assertEqual(trop.reserve(tag="file", min=5061, max=5061, **self.opts), 5061)
        self.assertEqual(trop_main("validate", os.path.join(self.proj, "trop.yaml")),
                         (0, "Configuration is valid\n", ""))
        self.write(os.path.join(self.proj, "trop.yaml"), "allow_unsafe_ports: yes\n")
        rc, _out, err = trop_main("validate", os.path.join(self.proj, "trop.yaml"))
        self.assertEqual(rc, 1)
        self.assertIn("allow_unsafe_ports must be true or false", err)

    def test_a_reservation_of_an_unsafe_port_stays_valid(self):
        self.fake_proc()
        make_v2_db(self.data, [(self.proj, "", 5060, None, None, T1, T1)])
        self.assertEqual(trop_main("--data-dir", self.data, "reserve", "--skip-occupancy-check"), (0, "5060\n", ""))
        self.assertEqual(trop_main("--data-dir", self.data, "assert-data-dir", "--validate"), (0, "", ""))

    def test_port_info_says_what_is_special(self):
        self.fake_proc("6001-6002", "6000 6100\n")
        rc, out, err = trop_main("--data-dir", self.data, "port-info", "6000")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(out, "Port 6000 is not reserved\n"
                              "Note: port 6000 is on the browsers' bad-port list (WHATWG Fetch): browsers refuse to "
                              "connect to it\n"
                              "Note: port 6000 is in the ephemeral range 6000-6100: the OS may give it to an outgoing "
                              "connection first\n")
        rc, out, err = trop_main("--data-dir", self.data, "port-info", "6001")
        self.assertIn("Note: port 6001 is reserved by the operating system (net.ipv4.ip_local_reserved_ports)\n", out)
        self.assertEqual(trop_main("--data-dir", self.data, "port-info", "5000"),
                         (0, "Port 5000 is not reserved\n", ""))

    def test_validate_warns_about_the_ephemeral_range(self):
        self.fake_proc(ephemeral="6500 7500\n")
        path = self.write(os.path.join(self.proj, "trop.yaml"), "ports: {min: 6000, max: 7000}\n")
        self.assertEqual(trop_main("validate", path), (
            0, "Configuration is valid\n", "Warning: the range 6000-7000 overlaps the ephemeral range 6500-7500 in "
            "501 port(s) (6500-7000): the OS may give them to outgoing connections, so a server can find its port "
            "taken\n"))
        path = self.write(os.path.join(self.proj, "trop.yaml"), "ports: {min: 5000, max: 5100}\n")
        self.assertEqual(trop_main("validate", path), (0, "Configuration is valid\n", ""))


class TestDoctor(TropTestCase):
    """doctor: the range explained port by port, the data directory's health, the layers; read-only."""
    ENV = {"TROP_SKIP_UDP": "1", "TROP_SKIP_IPV6": "1"}

    def doctor(self, *args, **kw):
        rc, out, err = self.trop("doctor", "--format", "json", *args, **kw)
        self.assertEqual(err, "")
        return rc, json.loads(out)

    def test_json_report(self):
        start = self.free_block(8)
        rng = ("--min", str(start), "--max", str(start + 7))
        self.seed((self.proj, "a", start, "shop"))
        self.write(os.path.join(self.proj, "trop.yaml"), "excluded_ports:\n  - %d\n" % (start + 1))
        listener = self.listen("tcp", "127.0.0.1", start + 2)
        self.assertTrue(listener)
        rc, report = self.doctor(*rng, env={"TROP_EXCLUDED_PORTS": str(start + 3)})
        self.assertEqual(rc, 0)
        self.assertEqual(set(report), {"cwd", "range", "ports", "data_dir", "layers", "warnings", "problems",
                                       "healthy", "leases"})
        self.assertEqual(report["leases"], {"live": 0, "dead": 0, "unverifiable": 0})
        self.assertEqual(report["cwd"], self.proj)
        self.assertEqual(report["range"]["min"], start)
        self.assertEqual(report["range"]["size"], 8)
        self.assertEqual(report["range"]["sources"]["ports.min"], "<command line>")
        ports = report["ports"]
        self.assertEqual(ports["reserved"], {"count": 1, "paths": 1, "projects": 1})
        self.assertEqual(ports["excluded"]["count"], 2)
        self.assertEqual(ports["excluded"]["sources"], [
            {"ports": str(start + 1), "source": os.path.join(self.proj, "trop.yaml") + ":2"},
            {"ports": str(start + 3), "source": "TROP_EXCLUDED_PORTS"}])
        self.assertEqual(ports["occupied"]["count"], 1)
        occupied = ports["occupied"]["ports"][0]
        self.assertEqual((occupied["port"], occupied["reserved"], occupied["probe_failed"]), (start + 2, False, False))
        if LINUX_PROC:
            self.assertEqual((occupied["pid"], occupied["process"]), this_process_owner()[:2])
        self.assertEqual(ports["free"], {"count": 4, "first": [start + 4, start + 5, start + 6, start + 7]})
        for key in ("unsafe", "os_reserved", "ephemeral"):
            self.assertIn("count", ports[key])
        database = report["data_dir"]["database"]
        self.assertEqual((database["exists"], database["schema_version"], database["reservations"], database["error"]),
                         (True, 2, 1, None))
        self.assertEqual(report["data_dir"]["path"], self.data)
        self.assertTrue(report["data_dir"]["writable"])
        kinds = [layer["kind"] for layer in report["layers"]]
        self.assertEqual(kinds, ["builtin", "project", "env", "cli"])
        self.assertEqual(report["problems"], [])
        self.assertTrue(report["healthy"])

    def test_text_report_and_exit_codes(self):
        start = self.free_block(4)                  # start + 3 must be free too (below)
        h = self.handle()
        for i in range(3):
            h.reserve(self.proj + "/d%d" % i)
        h.close()
        self.sql("UPDATE reservations SET port = port - 20000 + ?", (start,))
        rc, out, err = self.trop("doctor", "--min", str(start), "--max", str(start + 2))
        self.assertEqual((rc, err), (1, ""))
        self.assertIn("reserved         3  by 3 path(s) in 0 project(s)", out)
        self.assertIn("free             0", out)
        self.assertIn("Problem: no free port in %d-%d" % (start, start + 2), out)
        self.assertTrue(out.endswith("Status: unhealthy\n"), out)
        rc, report = self.doctor("--min", str(start), "--max", str(start + 3))
        self.assertEqual((rc, report["healthy"]), (0, True))

    def test_read_only_creates_nothing_and_never_waits(self):
        rc, report = self.doctor()
        self.assertEqual(rc, 0)
        self.assertFalse(os.path.exists(self.data))
        self.assertEqual(report["data_dir"]["database"]["exists"], False)
        self.reserve_port("--skip-occupancy-check")
        conn = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        rc, report = self.doctor("--busy-timeout", "0")
        self.assertEqual((rc, report["ports"]["reserved"]["count"]), (0, 1))
        conn.execute("ROLLBACK")

    def test_a_corrupt_database_is_reported(self):
        os.makedirs(self.data)
        self.write(self.db, b"not a database at all" * 100)
        rc, report = self.doctor()
        self.assertEqual(rc, 6)
        self.assertIn("not a valid trop database", report["data_dir"]["database"]["error"])
        self.assertEqual(report["problems"][0]["exit_code"], 6)
        self.assertEqual(self.read(self.db), b"not a database at all" * 100)


class TestFullRangeAllocation(TropTestCase):
    def test_a_fresh_data_directory_never_hands_out_a_bad_port(self):
        """The default range, allocated to the last port through the API: every port except the bad ones."""
        handle = trop.Trop(data_dir=self.data, skip_occupancy_check=True, allow_unrelated_path=True,
                           disable_autoclean=True)
        self.addCleanup(handle.close)
        with mock.patch.object(trop, "os_reserved_ports", lambda *a, **k: trop.ExclusionList()):
            ports = [handle.reserve("/srv/p%04d" % i) for i in range(2001 - 11)]
            with self.assertRaises(trop.LibraryError) as ctx:
                handle.reserve("/srv/one-too-many")
        self.assertEqual(len(set(ports)), 1990)
        self.assertTrue(set(ports).isdisjoint(trop.UNSAFE_PORTS))
        self.assertEqual(set(ports) | {5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697},
                         set(range(5000, 7001)))
        self.assertIn("remaining blockers: 1990 reserved, 11 unsafe", str(ctx.exception))


class TestReserveOccupancy(TropTestCase):
    def setUp(self):
        super().setUp()
        self.a = self.listening_block(3, "tcp")

    def reserve(self, *args):
        return self.trop("reserve", "--min", self.a, "--max", self.a + 2, *args)

    def test_occupied_port_skipped(self):
        rc, out, err = self.reserve()
        self.assertEqual((rc, out), (0, "%d\n" % (self.a + 1)), err)

    def test_occupied_preferred_falls_back(self):
        rc, out, err = self.reserve("--port", self.a)
        self.assertEqual((rc, out), (0, "%d\n" % (self.a + 1)), err)

    def test_ignore_occupied_preferred(self):
        rc, out, err = self.reserve("--ignore-occupied", "--port", self.a)
        self.assertEqual((rc, out), (0, "%d\n" % self.a), err)

    def test_udp_listener_and_skip_flags(self):
        self.listen("udp", "127.0.0.1", self.a + 1)
        rc, out, err = self.reserve("--tag", "x")
        self.assertEqual((rc, out), (0, "%d\n" % (self.a + 2)), err)
        rc, out, err = self.reserve("--tag", "y", "--skip-occupancy-check")
        self.assertEqual((rc, out), (0, "%d\n" % self.a), err)
        rc, out, err = self.reserve("--tag", "z", "--skip-udp")
        self.assertEqual((rc, out), (0, "%d\n" % (self.a + 1)), err)

    def test_all_occupied_exhausts(self):
        rc, out, err = self.trop("reserve", "--min", self.a, "--max", self.a, "--disable-autoclean")
        self.assertEqual((rc, out), (6, ""), err)
        self.assertIn("exhausted", err)
        self.assertIn("occupied", err)


# --- Operations: cleanup rules -----------------------------------------------

class TestInspectPath(unittest.TestCase):
    def verdict_for(self, error):
        with mock.patch("os.stat", side_effect=error):
            return trop.inspect_path("/srv/somewhere")

    def test_uninspectable_errors_are_kept_with_a_kind(self):
        cases = [(PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
                 (OSError(errno.EPERM, "Operation not permitted"), "permission denied"),
                 (OSError(errno.ELOOP, "Too many levels of symbolic links"), "symlink loop"),
                 (OSError(errno.EIO, "Input/output error"), "transient I/O error"),
                 (OSError(errno.ENOSYS, "Function not implemented"), "unsupported filesystem operation"),
                 (OSError(errno.EBUSY, "Device or resource busy"), "unknown filesystem error")]
        for error, kind in cases:
            with self.subTest(kind=kind, errno=error.errno):
                verdict = self.verdict_for(error)
                self.assertNotIn(verdict, ("stale", "live"))
                self.assertEqual(verdict[0], kind)

    def test_certainly_gone_errors_are_stale(self):
        for code in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            with self.subTest(errno=code):
                self.assertEqual(self.verdict_for(OSError(code, os.strerror(code))), "stale")

    def test_real_filesystem(self):
        tmp = temp_dir(self, "trop-gc-inspect-")
        open(os.path.join(tmp, "file"), "w").close()
        os.symlink(os.path.join(tmp, "missing"), os.path.join(tmp, "dangling"))
        os.symlink(tmp, os.path.join(tmp, "dirlink"))
        os.symlink(os.path.join(tmp, "loop-b"), os.path.join(tmp, "loop-a"))
        os.symlink(os.path.join(tmp, "loop-a"), os.path.join(tmp, "loop-b"))
        self.assertEqual(trop.inspect_path(tmp), "live")
        self.assertEqual(trop.inspect_path(os.path.join(tmp, "dirlink")), "live")
        for name in ("missing", "file", "dangling", "file/sub"):
            with self.subTest(name=name):
                self.assertEqual(trop.inspect_path(os.path.join(tmp, name)), "stale")
        self.assertEqual(trop.inspect_path(os.path.join(tmp, "loop-a"))[0], "symlink loop")


# --- Operations: reserve and release -----------------------------------------

class TestAutomaticCleanup(TropTestCase):
    RUN_IN_ROOT = True
    P = 47001
    RANGE = ("--min", str(P), "--max", str(P), "--skip-occupancy-check")

    def test_stale_holder_is_pruned_and_reserve_warns(self):
        gone = self.mkdir("gone")
        self.ok("reserve", "--path", gone, *self.RANGE)
        os.rmdir(gone)
        live = self.mkdir("live")
        rc, out, err = self.trop("reserve", "--path", live, *self.RANGE)
        self.assertEqual((rc, out), (0, "%d\n" % self.P), err)
        self.assertEqual(err, "Warning: Automatic cleanup after initial port exhaustion pruned 1 and expired 0 "
                              "reservation(s); allocation succeeded on the single retry.\n")
        self.assertEqual([r[:3] for r in self.rows()], [(live, "", self.P)])

    def test_disabled_autoclean_fails_exhausted_and_deletes_nothing(self):
        self.seed((self.path("gone"), "", self.P))
        before = self.rows()
        live = self.mkdir("live")
        rc, out, err = self.trop("reserve", "--path", live, "--disable-autoclean", *self.RANGE)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("port range %d-%d exhausted: cleanup was skipped (automatic pruning and expiration "
                      "disabled); remaining blockers: 1 reserved\n" % (self.P, self.P), err)
        self.assertEqual(self.rows(), before)

    def test_failure_after_cleanup_leaves_the_stale_row(self):
        holder = self.mkdir("holder")
        self.seed((holder, "", self.P), (self.path("gone"), "", 47100))
        before = self.rows()
        live = self.mkdir("live")
        rc, out, err = self.trop("reserve", "--path", live, *self.RANGE)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("port range %d-%d exhausted after cleanup: remaining blockers after the single retry: "
                      "1 reserved;" % (self.P, self.P), err)
        self.assertIn("automatic cleanup pruned 1 and expired 0 reservation(s); automatic pruning and expiration "
                      "enabled", err)
        self.assertEqual(self.rows(), before)

    def test_cleanup_policies(self):
        now = int(time.time())
        old = now - 60 * DAY
        holder = self.mkdir("holder")
        self.seed((holder, "", self.P, None, None, old, old))
        before = self.rows()
        live = self.mkdir("live")
        rc, out, err = self.trop("reserve", "--path", live, "--disable-autoexpire", *self.RANGE)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("after cleanup", err)
        self.assertIn("automatic expiration disabled", err)
        self.assertEqual(self.rows(), before)
        rc, out, err = self.trop("reserve", "--path", live, "--disable-autoprune", *self.RANGE)
        self.assertEqual((rc, out), (0, "%d\n" % self.P), err)
        self.assertIn("pruned 0 and expired 1 reservation(s)", err)
        self.assertEqual([r[:3] for r in self.rows()], [(live, "", self.P)])
        os.rmdir(live)
        other = self.mkdir("other")
        rc, out, err = self.trop("reserve", "--path", other, "--disable-autoprune", *self.RANGE)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("automatic pruning disabled", err)
        self.assertEqual([r[:3] for r in self.rows()], [(live, "", self.P)])


# --- Operations: groups ------------------------------------------------------

class TestGroupFormats(TropTestCase):
    RUN_IN_ROOT = True
    SERVICES = [("web", {"offset": 0}), ("api-v2", {"offset": 1}), ("db", {"offset": 2, "env": "DB_PORT"}),
                ("B", {"offset": 3})]

    def test_formats_shells_and_rows(self):
        group = self.group_dir("proj", self.SERVICES, pmin=40100, pmax=40199)
        cfg = os.path.join(group, "trop.yaml")
        rc, out, err = self.trop("reserve-group", cfg)
        self.assertEqual(rc, 0, err)
        # sorted by tag bytewise ("B" < "api-v2"), variable names derived or explicit
        self.assertEqual(out, "export B=40103\nexport API_V2=40101\nexport DB_PORT=40102\nexport WEB=40100\n")
        self.assertEqual(err, "Reserved 4 ports.\n")
        self.assertEqual([(r[0], r[1], r[2], r[3], r[4]) for r in self.rows()],
                         [(group, "B", 40103, None, None), (group, "api-v2", 40101, None, None),
                          (group, "db", 40102, None, None), (group, "web", 40100, None, None)])
        expected = {
            ("json",): '{\n  "B": 40103,\n  "api-v2": 40101,\n  "db": 40102,\n  "web": 40100\n}\n',
            ("dotenv",): "B=40103\nAPI_V2=40101\nDB_PORT=40102\nWEB=40100\n",
            ("human",): "Reserved ports:\n  B: 40103\n  api-v2: 40101\n  db: 40102\n  web: 40100\n",
            ("export", "fish"): "set -x B 40103\nset -x API_V2 40101\nset -x DB_PORT 40102\nset -x WEB 40100\n",
            ("export", "PWSH"): '$env:B="40103"\n$env:API_V2="40101"\n$env:DB_PORT="40102"\n$env:WEB="40100"\n',
        }
        calls = [(("autoreserve", "--format", key[0]) + (("--shell", key[1]) if len(key) > 1 else ()),
                  {"cwd": group}) for key in expected]
        for (key, text), (rc, out, err) in zip(expected.items(), self.trop_many(calls)):
            with self.subTest(format=key):
                self.assertEqual(rc, 0, err)
                self.assertEqual(out, text)
                self.assertTrue(err.endswith("Reserved 4 ports.\n"), err)
        self.assertEqual(len(self.rows()), 4)

    def test_autoreserve_discovers_from_subdirectory(self):
        group = self.mkdir("proj")
        deeper = self.mkdir("proj", "sub", "deeper")
        cfg = self.group_file(group, [("web", {})], pmin=40150, pmax=40160)
        rc, out, err = self.trop("autoreserve", "--format", "dotenv", cwd=deeper)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "WEB=40150\n")
        self.assertRegex(err, r'^Discovered config: "?%s"?\nReserved 1 ports\.\n$' % re.escape(cfg))
        self.assertEqual([r[:3] for r in self.rows()], [(group, "web", 40150)])

    def test_local_file_replaces_whole_group(self):
        group = self.group_dir("proj", [("web", {}), ("api", {"offset": 1})], pmin=40170, pmax=40180)
        self.write(os.path.join(group, "trop.local.yaml"),
                   "reservations:\n  services:\n    cache: {offset: 0, env: CACHE_PORT}\n")
        out, _err = self.ok("autoreserve", cwd=group)
        self.assertEqual(out, "export CACHE_PORT=40170\n")
        self.assertEqual([r[:3] for r in self.rows()], [(group, "cache", 40170)])


class TestGroupAllocation(TropTestCase):
    RUN_IN_ROOT = True

    def mapping(self, directory):
        return {r[1]: r[2] for r in self.rows() if r[0] == directory}

    def test_contract_worked_example_preferred_outside_range(self):
        g = self.group_dir("g", [("web", {"preferred": 40150}), ("api", {"offset": 1}), ("db", {"offset": 2})],
                           pmin=40200, pmax=40299)
        out, _ = self.ok("reserve-group", os.path.join(g, "trop.yaml"), "--format", "json")
        self.assertEqual(json.loads(out), {"web": 40150, "api": 40201, "db": 40202})
        self.assertEqual(self.mapping(g), {"web": 40150, "api": 40201, "db": 40202})

    def test_pinned_preferred_port_is_not_reused_by_the_pattern(self):
        g = self.group_dir("g", [("web", {"preferred": 40301}), ("api", {"offset": 1}), ("db", {"offset": 2})],
                           pmin=40300, pmax=40399)
        self.ok("autoreserve", cwd=g)
        self.assertEqual(self.mapping(g), {"web": 40301, "api": 40302, "db": 40303})

    def test_unavailable_preferred_port_joins_the_offset_pattern(self):
        self.seed((self.path("other"), "", 40400))
        g = self.group_dir("g", [("web", {"preferred": 40400}), ("api", {"offset": 1})], pmin=40400, pmax=40499)
        self.ok("autoreserve", cwd=g)
        self.assertEqual(self.mapping(g), {"web": 40401, "api": 40402})
        self.assertIn((self.path("other"), "", 40400), [r[:3] for r in self.rows()])

    def test_whole_pattern_must_avoid_exclusions_and_base_starts_the_scan(self):
        services = [("web", {}), ("api", {"offset": 1}), ("db", {"offset": 3})]
        excluded = [40500, "40503..40504"]
        g = self.group_dir("g", services, pmin=40500, pmax=40599, excluded=excluded)
        self.ok("autoreserve", cwd=g)
        self.assertEqual(self.mapping(g), {"web": 40505, "api": 40506, "db": 40508})
        b = self.group_dir("b", services, pmin=40500, pmax=40599, excluded=excluded, base=40560)
        self.ok("autoreserve", cwd=b)
        self.assertEqual(self.mapping(b), {"web": 40560, "api": 40561, "db": 40563})
        bad = self.group_dir("bad", services, pmin=40500, pmax=40599, base=40700)
        rc, out, err = self.trop("autoreserve", cwd=bad)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("Base port 40700 must be within port range", err)
        self.assertEqual(self.mapping(bad), {})

    def test_occupied_ports_are_skipped_unless_occupancy_check_is_skipped(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        if port > 65500:
            self.skipTest("ephemeral port too high")
        for candidate in (port + 1, port + 2):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                probe = socket.socket(socket.AF_INET, kind)
                try:
                    probe.bind(("127.0.0.1", candidate))
                except OSError:
                    self.skipTest("port %d is busy on this host" % candidate)
                finally:
                    probe.close()
        g = self.group_dir("g", [("web", {}), ("api", {"offset": 1})], pmin=port, pmax=port + 20, skip=False)
        self.ok("autoreserve", "--skip-ipv6", cwd=g)
        self.assertEqual(self.mapping(g), {"web": port + 1, "api": port + 2})
        s = self.group_dir("s", [("web", {})], pmin=port, pmax=port + 20, skip=False)
        self.ok("autoreserve", "--skip-occupancy-check", cwd=s)
        self.assertEqual(self.mapping(s), {"web": port})

    def test_group_that_cannot_fit_leaves_no_rows(self):
        self.seed((self.path("other"), "", 40602))
        before = self.rows()
        g = self.group_dir("g", [("a", {}), ("b", {"offset": 1}), ("c", {"offset": 2}),
                                 ("d", {"offset": 9, "preferred": 40650})], pmin=40600, pmax=40603)
        rc, out, err = self.trop("autoreserve", cwd=g)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("Error: group allocation failed after attempting 4 service(s)", err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertEqual(self.rows(), before)


class TestGroupIdempotency(TropTestCase):
    RUN_IN_ROOT = True

    def group_rows(self, directory):
        return [r for r in self.rows() if r[0] == directory]

    def test_refresh_returns_same_mapping_keeps_created_at_and_refreshes_last_used(self):
        g = self.group_dir("g", [("web", {}), ("api", {"offset": 1})], pmin=41000, pmax=41099)
        first, _ = self.ok("reserve-group", os.path.join(g, "trop.yaml"))
        self.sql("UPDATE reservations SET created_at = 1000, last_used_at = 2000")
        start = int(time.time())
        second, err = self.ok("autoreserve", cwd=g)
        self.assertEqual(second, first)
        self.assertTrue(err.endswith("Reserved 2 ports.\n"), err)
        rows = self.group_rows(g)
        self.assertEqual(len(rows), 2)
        for row in rows:
            self.assertEqual(row[5], 1000)
            self.assertGreaterEqual(row[6], start - 1)

    def test_incompatible_group_fails_untouched_and_force_replaces_atomically(self):
        self.seed((self.path("blocker"), "", 41100))
        g = self.group_dir("g", [("web", {}), ("api", {"offset": 1})], pmin=41100, pmax=41199)
        self.ok("autoreserve", cwd=g)               # web 41101, api 41102
        self.sql("UPDATE reservations SET created_at = 1000, last_used_at = 2000 WHERE path = ?", (g,))
        before = self.rows()
        cases = [([("web", {}), ("api", {"offset": 2})], "stored offset mappings imply different bases"),
                 ([("web", {}), ("api", {"offset": 1}), ("db", {"offset": 2})],
                  "requested service set does not match stored service set")]
        for services, reason in cases:
            with self.subTest(reason=reason):
                self.group_file(g, services, pmin=41100, pmax=41199)
                rc, out, err = self.trop("autoreserve", cwd=g)
                self.assertEqual((rc, out), (6, ""))
                self.assertIn("reservation conflict: existing group at %s is incompatible: %s" % (g, reason), err)
                self.assertEqual(self.rows(), before)
        start = int(time.time())
        out, _ = self.ok("autoreserve", "--force", "--format", "json", cwd=g)
        self.assertEqual(json.loads(out), {"web": 41101, "api": 41102, "db": 41103})
        rows = self.group_rows(g)
        self.assertEqual({r[1]: r[2] for r in rows}, {"web": 41101, "api": 41102, "db": 41103})
        self.assertTrue(all(r[5] >= start - 1 for r in rows), rows)

    def test_force_that_cannot_allocate_keeps_the_old_group(self):
        g = self.group_dir("g", [("a", {}), ("b", {"offset": 1})], pmin=41200, pmax=41202)
        self.ok("autoreserve", cwd=g)
        self.seed((self.path("other"), "", 41202))
        before = self.rows()
        self.group_file(g, [("a", {}), ("b", {"offset": 1}), ("c", {"offset": 2})], pmin=41200, pmax=41202)
        rc, out, err = self.trop("autoreserve", "--force", cwd=g)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("group allocation failed", err)
        self.assertEqual(self.rows(), before)

    def test_tagged_single_reservations_are_the_stored_group_and_untagged_row_survives_force(self):
        g = self.mkdir("g")
        self.ok("reserve", "--tag", "web", "--skip-occupancy-check", "--min", "41300", "--max", "41399", cwd=g)
        self.ok("reserve", "--skip-occupancy-check", "--min", "41300", "--max", "41399", cwd=g)
        untagged = [r for r in self.rows() if r[1] == ""]
        self.group_file(g, [("web", {}), ("api", {"offset": 1})], pmin=41300, pmax=41399)
        rc, out, err = self.trop("autoreserve", cwd=g)
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("requested service set does not match stored service set", err)
        self.ok("autoreserve", "--force", cwd=g)
        rows = self.group_rows(g)
        self.assertEqual([r for r in rows if r[1] == ""], untagged)
        self.assertEqual({r[1]: r[2] for r in rows if r[1]}, {"web": 41302, "api": 41303})

    def test_symlinked_and_relative_spellings_converge_on_one_group(self):
        real = self.group_dir("real-proj", [("web", {}), ("api", {"offset": 1})], pmin=41400, pmax=41499)
        link = self.path("link-proj")
        os.symlink(real, link)
        outputs = [self.ok("reserve-group", os.path.join(link, "trop.yaml"))[0],
                   self.ok("reserve-group", os.path.join(real, "trop.yaml"))[0],
                   self.ok("reserve-group", "link-proj/./sub/../trop.yaml")[0],
                   self.ok("autoreserve", cwd=link)[0]]
        self.assertEqual(len(set(outputs)), 1, outputs)
        self.assertEqual([r[:3] for r in self.rows()], [(real, "api", 41401), (real, "web", 41400)])

    def test_symlinked_config_file_belongs_to_its_own_directory(self):
        # CONTRACT 7.1: identity = realpath of the config file's *parent directory*
        shared = self.write(self.path("shared", "group.yaml"), group_yaml([("web", {})], pmin=41500, pmax=41599))
        project = self.mkdir("project")
        os.symlink(shared, os.path.join(project, "trop.yaml"))
        auto, _ = self.ok("autoreserve", cwd=project)
        named, _ = self.ok("reserve-group", os.path.join(project, "trop.yaml"))
        self.assertEqual(named, auto)
        self.assertEqual([r[:3] for r in self.rows()], [(project, "web", 41500)])

    def test_sticky_project_and_task(self):
        g = self.group_dir("g", [("web", {})], project="alpha", pmin=41600, pmax=41699)
        self.ok("autoreserve", "--task", "t1", cwd=g)
        self.assertEqual([r[3:5] for r in self.group_rows(g)], [("alpha", "t1")])
        self.group_file(g, [("web", {})], project="beta", pmin=41600, pmax=41699)
        rc, out, err = self.trop("autoreserve", cwd=g)
        self.assertEqual((rc, out), (1, ""))
        self.assertIn("Cannot change group project", err)
        self.assertIn("--allow-project-change", err)
        self.ok("autoreserve", "--allow-project-change", cwd=g)
        self.assertEqual([r[3:5] for r in self.group_rows(g)], [("beta", "t1")])
        rc, out, err = self.trop("autoreserve", "--task", "t2", cwd=g)
        self.assertEqual((rc, out), (1, ""))
        self.assertIn("--allow-task-change", err)
        self.ok("autoreserve", "--task", "t2", "--allow-task-change", cwd=g)
        self.ok("autoreserve", cwd=g)                      # no task requested: stored task kept
        self.assertEqual([r[3:5] for r in self.group_rows(g)], [("beta", "t2")])
        self.ok("autoreserve", "--allow-change", cwd=g, env={"TROP_TASK": "t3"})
        self.assertEqual([r[3:5] for r in self.group_rows(g)], [("beta", "t3")])

    def test_force_replacement_inherits_a_uniform_task(self):
        g = self.group_dir("g", [("web", {})], pmin=41700, pmax=41799)
        self.ok("autoreserve", "--task", "t1", cwd=g)
        self.group_file(g, [("web", {}), ("api", {"offset": 1})], pmin=41700, pmax=41799)
        self.ok("autoreserve", "--force", cwd=g)
        self.assertEqual({(r[1], r[4]) for r in self.group_rows(g)}, {("web", "t1"), ("api", "t1")})


class TestGroupInputSafety(TropTestCase):
    RUN_IN_ROOT = True

    def attempts(self, groups):
        """autoreserve each service list in its own directory, all at once: [(dir, (rc, out, err))]."""
        dirs = []
        for services in groups:
            dirs.append(self.group_dir("g%d" % len(dirs), services, pmin=42000, pmax=42099))
        return list(zip(dirs, self.trop_many([(("autoreserve",), {"cwd": g}) for g in dirs])))

    def attempt(self, services):
        return self.attempts([services])[0][1]

    def assert_config_error(self, directory, result):
        rc, out, err = result
        self.assertEqual((rc, out), (7, ""), err)
        self.assertTrue(err.startswith("Error: "), err)
        self.assertEqual([r for r in self.rows() if r[0] == directory], [])

    def test_unsafe_tags_without_env_are_configuration_errors(self):
        tags = ("my web", "it's", 'say"hi', "$(id)", "`id`", "a;b", "caf\u00e9", "\u00fcber")
        for tag, (g, result) in zip(tags, self.attempts([[(tag, {})] for tag in tags])):
            with self.subTest(tag=tag):
                self.assert_config_error(g, result)
        self.assertEqual(self.rows(), [])

    def test_tag_with_newline_is_rejected_with_a_single_error_line(self):
        rc, out, err = self.attempt([("a\nb", {})])
        self.assertEqual((rc, out), (7, ""), err)
        self.assertEqual(self.rows(), [])
        # CONTRACT A.2: every failure is ONE line `Error: ...`
        self.assertEqual(err.count("\n"), 1, repr(err))
        self.assertTrue(err.startswith("Error: "), err)

    def test_non_ascii_tags_whose_unicode_uppercase_is_ascii_are_rejected(self):
        # CONTRACT 3.4: derived name = tag uppercased (ASCII); non-ASCII tag without env -> error
        tags = ("\u00dfweb", "\ufb01le", "\u0131d")          # ß -> SS, ﬁ -> FI, ı -> I under str.upper()
        for tag, (g, result) in zip(tags, self.attempts([[(tag, {})] for tag in tags])):
            with self.subTest(tag=tag):
                self.assert_config_error(g, result)

    def test_unsafe_explicit_env_names_are_rejected(self):
        names = ("1PORT", "A-B", "A B", "$(id)", "X;Y", "\u00c9T\u00c9", "", "A" * 256)
        for env, (g, result) in zip(names, self.attempts([[("web", {"env": env})] for env in names])):
            with self.subTest(env=env[:20]):
                self.assert_config_error(g, result)

    def test_explicit_env_makes_an_odd_tag_safe(self):
        rc, out, err = self.attempt([("my web $(x)", {"env": "MY_WEB"}), ("api", {"offset": 1, "env": "A" * 255})])
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, "export %s=42001\nexport MY_WEB=42000\n" % ("A" * 255))

    def test_variable_names_colliding_ignoring_case(self):
        cases = [[("web", {}), ("WEB", {"offset": 1})],
                 [("web", {"env": "Port"}), ("api", {"offset": 1, "env": "PORT"})],
                 [("web-x", {}), ("web_x", {"offset": 1})],
                 [("web", {}), ("api", {"offset": 1, "env": "Web"})]]
        for services, (g, result) in zip(cases, self.attempts(cases)):
            with self.subTest(services=services):
                self.assert_config_error(g, result)
                self.assertIn("collide", result[2])

    def test_empty_services_map_exit_6(self):
        rc, out, err = self.attempt([])
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("at least one service", err)
        self.assertEqual(self.rows(), [])

    def test_reservations_without_services_key_exit_7(self):
        g = self.mkdir("g")
        self.write(os.path.join(g, "trop.yaml"), "reservations: {}\n")
        self.assert_config_error(g, self.trop("autoreserve", cwd=g))

    def test_reservations_null_in_local_file_clears_the_group(self):
        g = self.group_dir("g", [("web", {})])
        self.write(os.path.join(g, "trop.local.yaml"), "reservations: null\n")
        rc, out, err = self.trop("autoreserve", cwd=g)
        self.assertEqual((rc, out), (6, ""))
        self.assertTrue(err.startswith("Error: "), err)
        self.assertEqual(self.rows(), [])

    def test_project_file_without_reservations_exit_6(self):
        g = self.mkdir("g")
        self.write(os.path.join(g, "trop.yaml"), "ports:\n  min: 42000\n  max: 42099\n")
        rc, out, _err = self.trop("autoreserve", cwd=g)
        self.assertEqual((rc, out), (6, ""))

    def test_config_path_missing_or_directory_exit_4(self):
        self.mkdir("adir")
        cases = (("missing.yaml", "Configuration file not found: missing.yaml"), ("adir", "Path is not a file: adir"))
        results = self.trop_many([("reserve-group", arg) for arg, _ in cases])
        for (arg, message), (rc, out, err) in zip(cases, results):
            with self.subTest(arg=arg):
                self.assertEqual((rc, out), (4, ""))
                self.assertIn(message, err)
        self.assertFalse(os.path.exists(self.data))

    def test_autoreserve_without_any_config_exit_4(self):
        start = self.mkdir("empty", "deep")
        probe = start
        while probe != os.path.dirname(probe):
            if any(os.path.exists(os.path.join(probe, n)) for n in ("trop.yaml", "trop.local.yaml")):
                self.skipTest("a trop.yaml exists above the temp dir")
            probe = os.path.dirname(probe)
        rc, out, err = self.trop("autoreserve", cwd=start)
        self.assertEqual((rc, out), (4, ""))
        self.assertIn("No trop configuration file found (searched from: %s)" % start, err)

    def test_unknown_shell_exit_6_before_touching_the_database(self):
        g = self.group_dir("g", [("web", {})])
        rc, out, err = self.trop("autoreserve", "--shell", "tcsh", cwd=g)
        self.assertEqual((rc, out), (6, ""))
        self.assertEqual(err, "Error: validation error for 'shell': unknown shell type 'tcsh': supported shells "
                              "are bash, zsh, fish, powershell\n")
        self.assertFalse(os.path.exists(os.path.join(self.data, "trop.db")))
        out, _ = self.ok("autoreserve", "--shell", "tcsh", "--format", "json", cwd=g)   # ignored for json
        self.assertEqual(json.loads(out), {"web": 40000})


class TestShellDetection(TropTestCase):
    RUN_IN_ROOT = True

    def test_detect_shell_matrix(self):
        cases = [
            ({}, "bash"), ({"SHELL": "/bin/sh"}, "bash"), ({"SHELL": "/usr/bin/zsh"}, "zsh"),
            ({"SHELL": "/usr/local/bin/fish"}, "fish"), ({"SHELL": "/opt/microsoft/pwsh"}, "powershell"),
            ({"SHELL": "/usr/bin/powershell"}, "powershell"), ({"SHELL": "/bin/ksh"}, "bash"),
            ({"ZSH_VERSION": "5.9", "FISH_VERSION": "3", "PSModulePath": "x", "SHELL": "/bin/fish"}, "zsh"),
            ({"FISH_VERSION": "3", "PSModulePath": "x", "SHELL": "/bin/zsh"}, "fish"),
            ({"PSModulePath": "x", "SHELL": "/bin/zsh"}, "zsh"),           # SHELL first: Windows sets
            ({"PSModulePath": "x", "SHELL": "/usr/bin/bash"}, "bash"),     # PSModulePath machine-wide
            ({"PSModulePath": "x", "MSYSTEM": "MINGW64"}, "bash"),         # Git Bash
            ({"PSModulePath": "x"}, "powershell"),
        ]
        for environ, shell in cases:
            with self.subTest(environ=environ):
                self.assertEqual(trop.detect_shell(None, environ), shell)
        for name, shell in (("bash", "bash"), ("SH", "bash"), ("Zsh", "zsh"), ("fish", "fish"),
                            ("powershell", "powershell"), ("PWSH", "powershell"), ("ps", "powershell")):
            with self.subTest(name=name):
                self.assertEqual(trop.detect_shell(name, {"FISH_VERSION": "3"}), shell)

    def test_cli_autodetection_and_override(self):
        g = self.group_dir("g", [("web", {})])
        cases = [({"FISH_VERSION": "3.7"}, [], "set -x WEB 40000\n"),
                 ({"PSModulePath": "/x", "SHELL": None}, [], '$env:WEB="40000"\n'),
                 ({"SHELL": "/usr/bin/fish"}, [], "set -x WEB 40000\n"),
                 ({"SHELL": None}, [], "export WEB=40000\n"),
                 ({"ZSH_VERSION": "5.9", "FISH_VERSION": "3.7"}, [], "export WEB=40000\n"),
                 ({"FISH_VERSION": "3.7"}, ["--shell", "bash"], "export WEB=40000\n")]
        self.ok("autoreserve", cwd=g)
        results = self.trop_many([(("autoreserve",) + tuple(extra), {"cwd": g, "env": env}) for env, extra, _ in cases])
        for (env, extra, expected), (rc, out, err) in zip(cases, results):
            with self.subTest(env=env, extra=extra):
                self.assertEqual((rc, out), (0, expected), err)


class TestGroupDryRunAndFlags(TropTestCase):
    RUN_IN_ROOT = True

    def test_dry_run_creates_nothing_and_matches_the_real_run(self):
        g = self.group_dir("g", [("web", {}), ("api", {"offset": 1})], pmin=42100, pmax=42199)
        rc, out, err = self.trop("autoreserve", "--dry-run", cwd=g)
        self.assertEqual((rc, out), (0, ""), err)
        self.assertTrue(err.startswith("Dry run - would perform the following actions:\n"), err)
        self.assertFalse(os.path.exists(os.path.join(self.data, "trop.db")))
        self.assertIn("42100", err)
        self.assertIn("42101", err)
        self.ok("autoreserve", cwd=g)
        before = self.rows()
        self.group_file(g, [("web", {}), ("api", {"offset": 2})], pmin=42100, pmax=42199)
        rc, out, err = self.trop("reserve-group", os.path.join(g, "trop.yaml"), "--dry-run", "--force")
        self.assertEqual((rc, out), (0, ""), err)
        self.assertEqual(self.rows(), before)
        self.assertIn("Reserve port 42102 for %s:api" % g, err)    # what a real --force then does
        out, _ = self.ok("reserve-group", os.path.join(g, "trop.yaml"), "--force", "--format", "json")
        self.assertEqual(json.loads(out), {"web": 42100, "api": 42102})

    def test_path_guard_and_allow_flags(self):
        g = self.mkdir("proj")
        elsewhere = self.mkdir("elsewhere")
        cfg = self.group_file(g, [("web", {})], pmin=42200, pmax=42299)
        rc, out, err = self.trop("reserve-group", cfg, cwd=elsewhere)
        self.assertEqual((rc, out), (1, ""))
        self.assertIn("path relationship violation", err)
        self.assertEqual(self.rows(), [])
        self.ok("reserve-group", cfg, "--allow-unrelated-path", cwd=elsewhere)
        self.ok("reserve-group", cfg, "--force", cwd=elsewhere)
        self.assertEqual([r[:3] for r in self.rows()], [(g, "web", 42200)])

    def test_task_option_and_environment(self):
        g = self.mkdir("g")
        cfg = self.group_file(g, [("web", {})], pmin=42300, pmax=42399)
        self.ok("reserve-group", cfg, env={"TROP_TASK": "from-env"})
        self.assertEqual(self.rows()[0][4], "from-env")
        h = self.mkdir("h")
        cfg = self.group_file(h, [("web", {})], pmin=42300, pmax=42399)
        self.ok("reserve-group", cfg, "--task", "from-cli", env={"TROP_TASK": "from-env"})
        self.assertEqual({r[0]: r[4] for r in self.rows()}, {g: "from-env", h: "from-cli"})


# Stands in for Windows' msvcrt in simulations: byte-range locks through fcntl, with msvcrt's interface.
FAKE_MSVCRT = r"""
import fcntl, os, types
def locking(fd, mode, nbytes):
    where = os.lseek(fd, 0, os.SEEK_CUR)
    if mode == LK_UNLCK:
        fcntl.lockf(fd, fcntl.LOCK_UN, nbytes, where)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, nbytes, where)      # raises OSError when held
LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2
msvcrt = types.SimpleNamespace(locking=locking, LK_UNLCK=LK_UNLCK, LK_LOCK=LK_LOCK, LK_NBLCK=LK_NBLCK)
"""


def fake_msvcrt():
    namespace = {}
    exec(FAKE_MSVCRT, namespace)
    return namespace["msvcrt"]


class TestWindowsPlatform(TropTestCase):
    """The Windows side of the platform seam, run here with stand-ins for what only Windows has."""

    def sharing_violation(self, winerror=32):
        exc = PermissionError(errno.EACCES, "The process cannot access the file")
        exc.winerror = winerror
        return exc

    def test_replace_retries_while_another_program_holds_the_file(self):
        naps = []
        platform = trop.WindowsPlatform(sleep=naps.append)
        source, target = self.write("a", "new"), self.write("b", "old")
        real = os.replace
        failures = [self.sharing_violation(), self.sharing_violation(5)]

        def flaky(src, dst):
            if failures:
                raise failures.pop(0)
            return real(src, dst)
        with mock.patch.object(os, "replace", flaky):
            platform.replace(source, target)
        self.assertEqual((self.read(target), len(naps)), (b"new", 2))
        with mock.patch.object(os, "replace", side_effect=self.sharing_violation(2)):     # not a sharing problem
            with self.assertRaises(PermissionError):
                platform.replace(source, target)
        with mock.patch.object(os, "replace", side_effect=self.sharing_violation()):
            with self.assertRaises(PermissionError):
                platform.replace(source, target, attempts=3)

    @unittest.skipUnless(hasattr(os, "fork"), "fcntl stands in for msvcrt")
    def test_sidecar_lock_serialises_concurrent_config_writers(self):
        """Twelve concurrent `exclude` runs through the Windows lock keep every entry."""
        config = self.write(os.path.join(self.proj, "trop.yaml"), "excluded_ports:\n  - 5999\n")
        code = FAKE_MSVCRT + (
            "import sys, trop\n"
            "trop.PLATFORM = trop.WindowsPlatform(msvcrt=msvcrt)\n"
            "sys.exit(trop.main(sys.argv[1:]))\n")
        procs = [self._started(spawn([sys.executable, "-c", code, "exclude", str(6100 + i), "--force", "--quiet"],
                                     self.proj, self.environment(SKIP_PROBES))) for i in range(12)]
        for proc in procs:
            self.assertEqual(finish(proc)[0], 0)
        self.assertEqual(sorted(self.exclusions(config)), [(5999, 5999)] + [(6100 + i, 6100 + i) for i in range(12)])
        self.assertTrue(os.path.exists(os.path.join(self.proj, ".trop-config.lock")))

    def test_sidecar_lock_waits_then_gives_up_cleanly(self):
        attempts = []

        class Busy:
            LK_NBLCK, LK_UNLCK = 2, 0

            def locking(self, fd, mode, nbytes):
                attempts.append(mode)
                if len(attempts) < 3:
                    raise OSError(errno.EACCES, "locked")
        lock = trop.WindowsPlatform(msvcrt=Busy(), sleep=lambda s: None).lock(self.proj)
        with lock:
            self.assertEqual(attempts, [2, 2, 2])
        self.assertEqual(attempts[-1], 0)                   # released
        lock = trop.WindowsPlatform(msvcrt=Busy(), sleep=lambda s: None).lock(self.proj)
        lock.timeout = 0
        attempts[:] = []
        with self.assertRaises(trop.IoFailure):
            lock.__enter__()

    def test_run_waits_for_the_child_and_maps_its_status(self):
        calls = []

        class Child:
            def __init__(self, argv, env):
                calls.append((argv, env))

            def wait(self):
                calls.append(signal.getsignal(signal.SIGINT))
                return 0xC000013A                           # STATUS_CONTROL_C_EXIT, above 2**31
        fake = types.SimpleNamespace(Popen=Child)
        platform = trop.WindowsPlatform(subprocess=fake)
        before = signal.getsignal(signal.SIGINT)
        status = platform.run(r"C:\bin\server.exe", ["server", "--port", "5000"], {"WEB_PORT": "5000"})
        self.assertEqual(status, 0xC000013A - (1 << 32))
        self.assertEqual(calls[0], ([r"C:\bin\server.exe", "--port", "5000"], {"WEB_PORT": "5000"}))
        self.assertIs(calls[1], signal.SIG_IGN)                 # Ctrl+C goes to the child; trop waits
        self.assertIs(signal.getsignal(signal.SIGINT), before)

    def test_run_refuses_arguments_to_batch_files(self):
        fake = types.SimpleNamespace(Popen=lambda argv, env: types.SimpleNamespace(wait=lambda: 3))
        platform = trop.WindowsPlatform(subprocess=fake)
        for program in (r"C:\x\start.bat", r"C:\x\START.CMD"):
            with self.assertRaises(trop.CommandNotRunnable) as ctx:
                platform.run(program, ["start", "& calc"], {})
            self.assertEqual(ctx.exception.exit_code, 126)
        self.assertEqual(platform.run(r"C:\x\start.bat", ["start"], {}), 3)

    def test_exit_statuses(self):
        for code, status in ((0, 0), (1, 1), (255, 255), (0x7FFFFFFF, 0x7FFFFFFF), (0x80000000, -(1 << 31)),
                             (0xC0000005, 0xC0000005 - (1 << 32)), (-1, -1)):
            self.assertEqual(trop.windows_exit_status(code), status, hex(code))

    def test_wildcard_listeners_are_probed_on_windows(self):
        probes = trop.OccupancyPolicy().probes()
        self.assertNotIn("wildcard", [p[2] for p in probes])
        with mock.patch.object(trop, "PLATFORM", trop.WindowsPlatform()):
            probes = trop.OccupancyPolicy().probes()
        self.assertEqual([p[2:] for p in probes if p[0] == "tcp"], [("localhost", "127.0.0.1"), ("wildcard", "0.0.0.0"),
                                                                   ("localhost", "::1"), ("wildcard", "::")])

    NETSTAT = """
Active Connections

  Proto  Local Address          Foreign Address        State           PID
  TCP    0.0.0.0:135            0.0.0.0:0              LISTENING       1104
  TCP    127.0.0.1:5000         0.0.0.0:0              LISTENING       812
  TCP    127.0.0.1:5000         127.0.0.1:60001        ESTABLISHED     812
  TCP    127.0.0.1:60001        127.0.0.1:5000         ESTABLISHED     4040
  TCP    [::]:5001              [::]:0                 ABHÖREN         913
  TCP    [fe80::1%12]:5002      [::]:0                 LISTENING       914
  UDP    0.0.0.0:5353           *:*                                    2980
"""
    TASKLIST = '"System Idle Process","0","Services","0","8 K"\n"node.exe","812","Console","1","45,312 K"\n' \
               '"python.exe","913","Console","1","12,100 K"\n'

    def test_owners_from_netstat_and_tasklist(self):
        table = trop.OwnerTable(self.path("no-proc"), use_lsof=False)
        table._parse_netstat(self.NETSTAT)
        table._parse_tasklist(self.TASKLIST)
        self.assertEqual(table.lookup("tcp", "ipv4", 5000), (812, "node.exe", None))
        self.assertEqual(table.lookup("tcp", "ipv6", 5001), (913, "python.exe", None))
        self.assertEqual(table.lookup("udp", "ipv4", 5353)[0], 2980)
        self.assertEqual(table.lookup("tcp", "ipv4", 60001)[0], 4040)       # a client socket: known, not a listener
        self.assertEqual([(e["address"], e["pid"]) for e in table.listeners(5000)], [("127.0.0.1", 812)])
        self.assertEqual([(e["address"], e["pid"]) for e in table.listeners(5002)], [("fe80::1", 914)])
        self.assertEqual(table.listeners(60001), [])
        self.assertEqual(trop.owner_status(*table.lookup("tcp", "ipv4", 5000)), "partial")


class TestConfigWritesThroughSymlinks(TropTestCase):
    ENV = SKIP_PROBES

    @unittest.skipUnless(hasattr(os, "symlink") and os.name == "posix", "symlinks")
    def test_a_symlinked_config_file_is_written_through(self):
        target = self.write("shared/trop.yaml", "# shared settings\nexcluded_ports:\n  - 5999\n")
        link = os.path.join(self.proj, "trop.yaml")
        os.symlink(target, link)
        self.ok("exclude", "6100")
        self.assertTrue(os.path.islink(link))
        self.assertEqual(os.readlink(link), target)
        self.assertEqual(self.exclusions(target), [(5999, 5999), (6100, 6100)])
        self.assertEqual(self.read(target).decode(), "# shared settings\nexcluded_ports:\n  - 5999\n  - 6100\n")
        self.assertEqual(sorted(os.listdir(os.path.dirname(target))), ["trop.yaml"])


class TestRunCommand(TropTestCase):
    RUN_IN_ROOT = True
    SCRIPT = "import os, sys; print(os.environ['WEB'], os.environ['API_PORT'], sys.argv[1:]); sys.exit(5)"

    def setUp(self):
        super().setUp()
        self.group = self.mkdir("g")
        self.cfg = self.group_file(self.group, [("web", {}), ("api", {"offset": 1, "env": "API_PORT"})],
                                   pmin=42400, pmax=42499)

    def test_runs_command_with_variables_and_returns_its_status(self):
        rc, out, err = self.trop("run", "--", sys.executable, "-c", self.SCRIPT, "$(echo hi)", "`id`;x",
                                 cwd=self.group)
        self.assertEqual(rc, 5, err)
        self.assertEqual(out, "42400 42401 ['$(echo hi)', '`id`;x']\n")
        self.assertEqual([r[:3] for r in self.rows()], [(self.group, "api", 42401), (self.group, "web", 42400)])

    def test_config_option_and_zero_status(self):
        other = self.mkdir("other")
        rc, out, err = self.trop("run", "--config", self.cfg, "--allow-unrelated-path", "--", sys.executable,
                                 "-c", "import os; print(os.environ['API_PORT'])", cwd=other)
        self.assertEqual((rc, out), (0, "42401\n"), err)

    def test_missing_command_exit_127(self):
        rc, out, err = self.trop("run", "--", "no-such-command-for-trop-tests", cwd=self.group)
        self.assertEqual((rc, out), (127, ""))
        self.assertRegex(err, r"^Error: .*no-such-command-for-trop-tests.*\n$")

    def test_no_command_is_a_usage_error(self):
        cases = (("run",), ("run", "--"))
        for args, (rc, out, err) in zip(cases, self.trop_many([(args, {"cwd": self.group}) for args in cases])):
            with self.subTest(args=args):
                self.assertEqual((rc, out), (2, ""))
                self.assertTrue(err.strip(), err)


class TestGroupConcurrency(TropTestCase):
    RUN_IN_ROOT = True

    READER = r"""
import contextlib, io, json, os, sys, time, trop
data, group, stop = sys.argv[1:4]
seen = []
while True:
    done = os.path.exists(stop)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = trop.main(["--data-dir", data, "list", "--format", "json"])
    if rc != 0:
        seen.append("rc=%s %s" % (rc, err.getvalue().strip()))
    else:
        seen.append(sum(1 for r in json.loads(out.getvalue()) if r["path"] == group))
    if done:
        break
    time.sleep(0.005)
print(json.dumps(seen))
"""

    def test_ten_concurrent_autoreserves_make_one_group_and_readers_never_see_part(self):
        services = [("web", {}), ("api", {"offset": 1}), ("db", {"offset": 2}), ("cache", {"offset": 3})]
        group = self.group_dir("g", services, pmin=43000, pmax=43999)
        for round_no in range(8):
            self.fresh_data("data-%d" % round_no)
            stop = self.path("stop-%d" % round_no)
            reader = self.start_python(self.READER, self.data, group, stop)
            writers = [self.start("autoreserve", cwd=group) for _ in range(10)]
            results = [finish(p) for p in writers]
            open(stop, "w").close()
            _rc, seen_out, seen_err = finish(reader)
            with self.subTest(round=round_no):
                self.assertEqual([r[0] for r in results], [0] * 10, [r[2] for r in results])
                self.assertEqual(len({r[1] for r in results}), 1, [r[1] for r in results])
                self.assertEqual(results[0][1], "export API=43001\nexport CACHE=43003\nexport DB=43002\n"
                                                "export WEB=43000\n")
                self.assertEqual([r[:3] for r in self.rows()],
                                 [(group, "api", 43001), (group, "cache", 43003), (group, "db", 43002),
                                  (group, "web", 43000)])
                self.assertEqual(reader.returncode, 0, seen_err)
                seen = json.loads(seen_out)
                self.assertTrue(set(seen) <= {0, 4}, seen)
                self.assertEqual(seen[-1], 4)


# --- Operations: cleanup commands and migrate --------------------------------

class TestCleanupCommands(TropTestCase):
    RUN_IN_ROOT = True
    LOOP_WARNING = (r"Warning: could not inspect reserved directory %s \(symlink loop: [^)]+\); reservation "
                    r"preserved by prune\. Repair the symlink loop, then retry\.\n")

    def prune_fixture(self):
        live = self.mkdir("a-live")
        self.write(self.path("d-file"), "x")
        os.symlink(self.path("nowhere"), self.path("c-dangling"))
        os.symlink(self.path("f-loop-b"), self.path("f-loop-a"))
        os.symlink(self.path("f-loop-a"), self.path("f-loop-b"))
        os.symlink(live, self.path("b-link"))
        self.seed((live, "web", 44001), (self.path("b-link"), "", 44008),
                  (self.path("c-dangling"), "", 44005), (self.path("d-file"), "", 44004),
                  (self.path("d-file", "sub"), "", 44006), (self.path("e-gone"), "", 44002, "p1"),
                  (self.path("e-gone"), "web", 44003), (self.path("f-loop-a"), "", 44007))
        return live

    def split_warnings(self, err):
        warnings = [l + "\n" for l in err.splitlines() if l.startswith("Warning: ")]
        rest = "".join(l + "\n" for l in err.splitlines() if not l.startswith("Warning: "))
        return warnings, rest

    def test_prune_outputs_and_conservative_staleness(self):
        self.prune_fixture()
        before = self.rows()
        removed = [(44005, "c-dangling", "none", "none"), (44004, "d-file", "none", "none"),
                   (44006, "d-file/sub", "none", "none"), (44002, "e-gone", "none", '"p1"'),
                   (44003, "e-gone", '"web"', "none")]
        detail = "".join("  - Port %d: %s (tag: %s, project: %s)\n" % (p, self.path(n), t, pr)
                         for p, n, t, pr in removed)
        loop = self.LOOP_WARNING % re.escape(self.path("f-loop-a"))

        rc, out, err = self.trop("prune", "--dry-run")
        self.assertEqual((rc, out), (0, ""))
        warnings, rest = self.split_warnings(err)
        self.assertEqual(len(warnings), 1)
        self.assertRegex(warnings[0], "^" + loop + "$")
        self.assertEqual(rest, "[DRY RUN] Scanning for reservations with non-existent paths...\n"
                               "[DRY RUN] Would remove 5 reservation(s) for non-existent paths\n")
        rc, out, err = self.trop("prune", "--dry-run", "--verbose")
        self.assertEqual(self.split_warnings(err)[1],
                         "[DRY RUN] Scanning for reservations with non-existent paths...\n"
                         "[DRY RUN] Would remove 5 reservation(s):\n" + detail)
        self.assertEqual(self.trop("prune", "--dry-run", "--quiet"), (0, "5\n", ""))
        self.assertEqual(self.rows(), before)

        rc, out, err = self.trop("prune", "--verbose")
        self.assertEqual((rc, out), (0, ""))
        warnings, rest = self.split_warnings(err)
        self.assertRegex("".join(warnings), "^" + loop + "$")
        self.assertEqual(rest, "Removed 5 reservation(s):\n" + detail)
        self.assertEqual([r[:3] for r in self.rows()],
                         [(self.path("a-live"), "web", 44001), (self.path("b-link"), "", 44008),
                          (self.path("f-loop-a"), "", 44007)])
        rc, out, err = self.trop("prune")
        self.assertEqual((rc, out), (0, ""))
        self.assertEqual(self.split_warnings(err)[1], "Removed 0 reservation(s) for non-existent paths\n")
        self.assertEqual(self.trop("prune", "--quiet"), (0, "", ""))

    def test_prune_keeps_permission_denied_paths_with_a_warning(self):
        denied = self.mkdir("denied")
        self.seed((denied, "", 44100), (self.path("gone"), "", 44101))
        real_stat = os.stat

        def fake_stat(path, *args, **kwargs):
            if os.fspath(path) == denied:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_stat(path, *args, **kwargs)
        self.chdir(self.root)
        with mock.patch.dict(os.environ, self.env, clear=True), mock.patch("os.stat", side_effect=fake_stat):
            rc, out, err = trop_main("--data-dir", self.data, "prune")
        self.assertEqual((rc, out), (0, ""))
        warnings, rest = self.split_warnings(err)
        self.assertEqual(warnings, ["Warning: could not inspect reserved directory %s (permission denied: Permission "
                                    "denied); reservation preserved by prune. Restore access to the path and its "
                                    "parents, then retry.\n" % denied])
        self.assertEqual(rest, "Removed 1 reservation(s) for non-existent paths\n")
        self.assertEqual([r[:3] for r in self.rows()], [(denied, "", 44100)])

    def expire_fixture(self):
        live = self.mkdir("live")
        now = int(time.time())
        self.seed((os.path.join(live, "x1"), "", 44201, "p", None, now - 50 * DAY, now - 40 * DAY),
                  (os.path.join(live, "x2"), "", 44202, None, None, now - 20 * DAY, now - 20 * DAY),
                  (os.path.join(live, "x3"), "", 44203),
                  (os.path.join(live, "x4"), "", 44204, None, None, now - 10 * DAY + 600, now - 10 * DAY + 600),
                  (self.path("gone"), "", 44205))
        for name in ("x1", "x2", "x3", "x4"):
            self.mkdir("live", name)
        os.symlink(self.path("loop-b"), self.path("loop-a"))
        os.symlink(self.path("loop-a"), self.path("loop-b"))
        self.seed((self.path("loop-a"), "", 44206))
        return live

    def test_expire_outputs_and_threshold(self):
        live = self.expire_fixture()
        before = self.rows()
        rc, out, err = self.trop("expire", "--dry-run", "--verbose")
        self.assertEqual((rc, out), (0, ""))
        self.assertEqual(err, "[DRY RUN] Scanning for reservations unused for 30 days...\n"
                              "[DRY RUN] Would expire 1 reservation(s) older than 30 days:\n"
                              "  - Port 44201: %s/x1 (40 days old, project: \"p\")\n" % live)
        self.assertEqual(self.trop("expire", "--dry-run"),
                         (0, "", "[DRY RUN] Scanning for reservations unused for 30 days...\n"
                                 "[DRY RUN] Would expire 1 reservation(s) older than 30 days\n"))
        self.assertEqual(self.rows(), before)
        rc, out, err = self.trop("expire", "--days", "10", "--verbose")
        self.assertEqual((rc, out), (0, ""))
        self.assertEqual(err, "Expired 2 reservation(s) older than 10 days:\n"
                              "  - Port 44201: %s/x1 (40 days old, project: \"p\")\n"
                              "  - Port 44202: %s/x2 (20 days old, project: none)\n" % (live, live))
        self.assertEqual(sorted(r[2] for r in self.rows()), [44203, 44204, 44205, 44206])
        self.assertEqual(self.trop("expire"), (0, "", "Expired 0 reservation(s) older than 30 days\n"))
        self.assertEqual(self.trop("expire", "--quiet", "--days", "11"), (0, "", ""))

    def test_expire_default_comes_from_configuration(self):
        self.expire_fixture()
        self.write(os.path.join(self.data, "config.yaml"), "cleanup:\n  expire_after_days: 15\n")
        self.assertEqual(self.trop("expire", "--quiet"), (0, "2\n", ""))
        self.assertEqual(sorted(r[2] for r in self.rows()), [44203, 44204, 44205, 44206])
        self.assertEqual(self.trop("expire", "--days", "9", env={"TROP_EXPIRE_AFTER_DAYS": "100"}),
                         (0, "", "Expired 1 reservation(s) older than 9 days\n"))

    def test_autoclean_counts_a_row_that_is_both_as_pruned(self):
        live = self.mkdir("live")
        now = int(time.time())
        old = now - 40 * DAY
        self.seed((self.path("gone-a"), "", 44301),
                  (self.path("gone-b"), "web", 44302, None, None, old, old),
                  (live, "old35", 44303, None, None, now - 35 * DAY, now - 35 * DAY),
                  (live, "old45", 44304, None, None, now - 45 * DAY, now - 45 * DAY),
                  (live, "recent", 44305))
        before = self.rows()
        rc, out, err = self.trop("autoclean", "--dry-run", "--verbose")
        self.assertEqual((rc, out), (0, ""))
        self.assertEqual(err, "[DRY RUN] Performing combined cleanup...\n"
                              "[DRY RUN] Would remove 4 total reservation(s):\n"
                              "  Pruned: 2 (non-existent paths)\n"
                              "  Expired: 2 (old reservations)\n\n"
                              "Pruned reservations:\n"
                              "  - Port 44301: %s\n"
                              "  - Port 44302: %s\n\n"
                              "Expired reservations:\n"
                              "  - Port 44304: %s (45 days old)\n"
                              "  - Port 44303: %s (35 days old)\n"
                              % (self.path("gone-a"), self.path("gone-b"), live, live))
        self.assertEqual(self.rows(), before)
        self.assertEqual(self.trop("autoclean", "--days", "40", "--dry-run"),
                         (0, "", "[DRY RUN] Performing combined cleanup...\n"
                                 "[DRY RUN] Would remove 3 total reservation(s) (pruned: 2, expired: 1)\n"))
        self.assertEqual(self.trop("autoclean"),
                         (0, "", "Removed 4 total reservation(s) (pruned: 2, expired: 2)\n"))
        self.assertEqual([r[:3] for r in self.rows()], [(live, "recent", 44305)])
        self.assertEqual(self.trop("autoclean", "--quiet"), (0, "", ""))

    def test_bad_days_values(self):
        self.expire_fixture()
        before = self.rows()
        cases = ((("expire", "--days", "0"), 7), (("autoclean", "--days", "0"), 7),
                 (("expire", "--days", "-1"), 2), (("expire", "--days", "abc"), 2), (("autoclean", "--days", "-1"), 2))
        for (args, code), (rc, out, err) in zip(cases, self.trop_many([args for args, _ in cases])):
            with self.subTest(args=args):
                self.assertEqual((rc, out), (code, ""), err)
                self.assertTrue(err.strip())
        self.assertEqual(self.rows(), before)


class TestMigrate(TropTestCase):
    RUN_IN_ROOT = True

    def setUp(self):
        super().setUp()
        self.w = self.path("w")
        self.v = self.path("v")
        self.seed((self.w + "/a", "", 45100, "pa", "ta", 1000, 2000),
                  (self.w + "/a", "web", 45101, None, None, 1100, 2100),
                  (self.w + "/a/sub", "api", 45102, None, None, 1500, 2500),
                  (self.w + "/ab", "", 45103, None, None, 1600, 2600))

    def plan_text(self, src, dst, mode, moves):
        lines = ["Migration plan:", "  From: %s" % src, "  To:   %s" % dst, "  Mode: %s" % mode, "",
                 "Reservations to migrate (%d):" % len(moves)] + ["  " + m for m in moves] + [""]
        return "\n".join(lines) + "\n"

    def test_recursive_dry_run_equals_real_run_and_preserves_everything(self):
        w, v = self.w, self.v
        plan = self.plan_text(w + "/a", v + "/a", "recursive",
                              ["%s/a -> %s/a (port 45100, project: pa)" % (w, v),
                               "%s/a -> %s/a (port 45101, tag: web)" % (w, v),
                               "%s/a/sub -> %s/a/sub (port 45102, tag: api)" % (w, v)])
        before = self.rows()
        rc, out, err = self.trop("migrate", "--from", w + "/a/", "--to", v + "/./a", "--recursive", "--dry-run")
        self.assertEqual((rc, out), (0, ""))
        self.assertEqual(err, plan + "Dry run - no changes made.\n")
        self.assertEqual(self.rows(), before)
        rc, out, err = self.trop("migrate", "--from", w + "/a", "--to", v + "/a", "--recursive")
        self.assertEqual((rc, out), (0, ""))
        self.assertEqual(err, plan + "Migration complete:\n  Migrated: 3 reservation(s)\n")
        self.assertEqual(self.rows(), [(v + "/a", "", 45100, "pa", "ta", 1000, 2000),
                                       (v + "/a", "web", 45101, None, None, 1100, 2100),
                                       (v + "/a/sub", "api", 45102, None, None, 1500, 2500),
                                       (w + "/ab", "", 45103, None, None, 1600, 2600)])
        self.assertDataDirValid()

    def test_exact_mode_moves_only_the_path_itself(self):
        rc, out, err = self.trop("migrate", "--from", "w/a", "--to", "x")
        self.assertEqual((rc, out), (0, ""), err)
        self.assertIn("  Mode: exact\n", err)
        self.assertEqual([r[:3] for r in self.rows()],
                         [(self.w + "/a/sub", "api", 45102), (self.w + "/ab", "", 45103),
                          (self.path("x"), "", 45100), (self.path("x"), "web", 45101)])

    def test_conflicts_need_force(self):
        self.seed((self.v + "/a", "web", 45104))
        before = self.rows()
        extras = ((), ("--dry-run",))
        results = self.trop_many([("migrate", "--from", self.w + "/a", "--to", self.v + "/a", "--recursive") + extra
                                  for extra in extras])
        for extra, (rc, out, err) in zip(extras, results):
            with self.subTest(extra=extra):
                self.assertEqual((rc, out), (6, ""))
                self.assertEqual(err, "Error: reservation conflict: Found 1 conflicting reservation(s) at "
                                      "destination. Use --force to overwrite.\n")
        self.assertEqual(self.rows(), before)
        conflict = "Conflicts at destination (1) (will be overwritten):\n  %s/a\n    (tag: web)\n\n" % self.v
        rc, out, err = self.trop("migrate", "--from", self.w + "/a", "--to", self.v + "/a", "--recursive",
                                 "--force", "--dry-run")
        self.assertEqual((rc, out), (0, ""))
        self.assertTrue(err.endswith(conflict + "Dry run - no changes made.\n"), err)
        self.assertEqual(self.rows(), before)
        rc, out, err = self.trop("migrate", "--from", self.w + "/a", "--to", self.v + "/a", "--recursive", "--force")
        self.assertEqual((rc, out), (0, ""))
        self.assertTrue(err.endswith(conflict + "Migration complete:\n  Migrated: 3 reservation(s)\n"
                                                "  Conflicts resolved: 1\n"), err)
        self.assertEqual(sorted(r[2] for r in self.rows()), [45100, 45101, 45102, 45103])
        self.assertIn((self.v + "/a", "web", 45101), [r[:3] for r in self.rows()])

    def test_quiet_prints_destination_only(self):
        self.assertEqual(self.trop("--quiet", "migrate", "--from", self.w + "/ab", "--to", "ab2", "--dry-run"),
                         (0, "", ""))
        self.assertEqual(self.trop("--quiet", "migrate", "--from", self.w + "/ab", "--to", "ab2"),
                         (0, self.path("ab2") + "\n", ""))

    def test_invalid_requests(self):
        before = self.rows()
        cases = [(("--from", self.w + "/a", "--to", self.w + "/a/"), 4),
                 (("--from", self.w, "--to", self.w + "/a/new", "--recursive"), 4),
                 (("--from", self.w + "/missing", "--to", self.v), 6)]
        results = self.trop_many([("migrate",) + args for args, _ in cases] +
                                 [("migrate", "--from", self.w + "/missing", "--to", self.v, "--recursive")])
        for (args, code), (rc, out, err) in zip(cases, results):
            with self.subTest(args=args):
                self.assertEqual((rc, out), (code, ""), err)
                self.assertTrue(err.startswith("Error: "), err)
        self.assertIn("not found: reservation at %s/missing" % self.w, err)
        rc, out, err = results[-1]
        self.assertEqual((rc, out), (0, ""))
        self.assertTrue(err.endswith("  Mode: recursive\n\nNo reservations to migrate.\n"), err)
        self.assertEqual(self.rows(), before)


class TestCleanupRaces(TropTestCase):
    RUN_IN_ROOT = True
    ROUNDS = 3

    def test_exhaustion_retry_serializes_competing_reserves(self):
        port = 47501
        args = ("--min", str(port), "--max", str(port), "--skip-occupancy-check")
        for n in range(self.ROUNDS):
            with self.subTest(round=n):
                self.fresh_data("data-%d" % n)
                self.seed((self.path("r%d" % n, "stale"), "", port))
                lives = [self.mkdir("r%d" % n, "live-%d" % i) for i in range(4)]
                results = [finish(self.start("reserve", "--path", p, *args)) for p in lives]
                winners = [i for i, r in enumerate(results) if r[0] == 0]
                self.assertEqual(len(winners), 1, results)
                self.assertEqual(results[winners[0]][1], "%d\n" % port)
                for i, (rc, out, err) in enumerate(results):
                    if i != winners[0]:
                        self.assertEqual((rc, out), (6, ""), err)
                        self.assertIn("after cleanup", err)
                self.assertEqual([r[:3] for r in self.rows()], [(lives[winners[0]], "", port)])
                self.assertDataDirValid()

    def test_cleanup_serializes_with_reserve_and_group_processes(self):
        for n in range(self.ROUNDS):
            with self.subTest(round=n):
                self.fresh_data("data-%d" % n)
                top = "r%d" % n
                self.seed(*[(self.path(top, "gone", "stale-%d" % i), "", 5000 + i) for i in range(8)])
                lives = [self.mkdir(top, "live-%d" % i) for i in range(6)]
                groups = []
                for i in range(3):
                    groups.append(self.group_dir(
                        os.path.join(top, "group-%d" % i),
                        [("web", {"offset": 0, "env": "WEB_PORT"}), ("api", {"offset": 1, "env": "API_PORT"})],
                        project="cleanup-race-%d" % i, pmin=10000, pmax=20000, base=12000 + 10 * i))
                procs = [self.start("prune" if i % 2 == 0 else "autoclean") for i in range(4)]
                procs += [self.start("reserve", "--path", p, "--skip-occupancy-check") for p in lives]
                procs += [self.start("reserve-group", os.path.join(g, "trop.yaml"), "--allow-unrelated-path")
                          for g in groups]
                results = [finish(p) for p in procs]
                self.assertEqual([r[0] for r in results], [0] * 13, [r[2] for r in results])
                rows = self.rows()
                self.assertFalse([r for r in rows if "/gone/" in r[0]], rows)
                for path, (rc, out, err) in zip(lives, results[4:10]):
                    self.assertIn((path, "", int(out)), [r[:3] for r in rows])
                for i, g in enumerate(groups):
                    base = 12000 + 10 * i
                    self.assertEqual(sorted((r[1], r[2], r[3]) for r in rows if r[0] == g),
                                     [("api", base + 1, "cleanup-race-%d" % i), ("web", base, "cleanup-race-%d" % i)])
                    self.assertEqual(results[10 + i][1], "export API_PORT=%d\nexport WEB_PORT=%d\n" % (base + 1, base))
                self.assertEqual(len(rows), 6 + 6)
                self.assertEqual(len({r[2] for r in rows}), len(rows))
                self.assertDataDirValid()

    def test_recursive_release_serializes_with_reserve_processes(self):
        for n in range(self.ROUNDS):
            with self.subTest(round=n):
                self.fresh_data("data-%d" % n)
                root = self.mkdir("r%d" % n, "root")
                refresh = self.mkdir("r%d" % n, "root", "refresh")
                self.seed((root, "", 5100), (root, "fixture", 5101), (refresh, "web", 5102))
                writer_keys = {(refresh, "web")}
                procs = [self.start("reserve", "--path", refresh, "--tag", "web", "--busy-timeout", "10",
                                    "--skip-occupancy-check", cwd=root)]
                for i in range(1, 6):
                    path = self.mkdir("r%d" % n, "root", "writer-%d" % i)
                    tag = ("--tag", "service-%d" % i) if i % 2 == 0 else ()
                    writer_keys.add((path, "service-%d" % i if i % 2 == 0 else ""))
                    procs.append(self.start("reserve", "--path", path, "--busy-timeout", "10",
                                            "--skip-occupancy-check", *tag, cwd=root))
                procs.append(self.start("release", "--path", root, "--recursive", "--busy-timeout", "10", cwd=root))
                results = [finish(p) for p in procs]
                self.assertEqual([r[0] for r in results], [0] * 7, [r[2] for r in results])
                rows = self.rows()
                self.assertTrue({(r[0], r[1]) for r in rows} <= writer_keys, rows)
                self.assertFalse([r for r in rows if r[0] == root], rows)
                self.assertEqual(len({r[2] for r in rows}), len(rows))
                self.assertDataDirValid()

    def test_autoclean_while_reserving(self):
        for n in range(self.ROUNDS):
            with self.subTest(round=n):
                self.fresh_data("data-%d" % n)
                self.seed(*[(self.path("r%d" % n, "gone-%d" % i), "", 5000 + i) for i in range(10)])
                cleaner = self.start("autoclean")
                time.sleep(0.01)
                lives = [self.mkdir("r%d" % n, "live-%d" % i) for i in range(5)]
                writers = [self.start("reserve", "--path", p, "--skip-occupancy-check") for p in lives]
                results = [finish(p) for p in writers]
                crc, _cout, cerr = finish(cleaner)
                self.assertEqual(crc, 0, cerr)
                self.assertEqual([r[0] for r in results], [0] * 5, [r[2] for r in results])
                rows = [r[:3] for r in self.rows()]
                for path, (_rc, out, _err) in zip(lives, results):
                    self.assertIn((path, "", int(out)), rows)
                self.assertEqual(len({r[2] for r in rows}), len(rows))

    def test_migrate_races_reserve_at_the_destination(self):
        for n in range(self.ROUNDS):
            with self.subTest(round=n):
                self.fresh_data("data-%d" % n)
                src, dst = self.mkdir("r%d" % n, "src"), self.path("r%d" % n, "dst")
                self.seed((src + "/a", "web", 5200), (src + "/b", "", 5201))
                procs = [self.start("migrate", "--from", src, "--to", dst, "--recursive"),
                         self.start("reserve", "--path", dst + "/a", "--tag", "web", "--skip-occupancy-check",
                                    "--allow-unrelated-path"),
                         self.start("reserve", "--path", dst + "/c", "--skip-occupancy-check",
                                    "--allow-unrelated-path"),
                         self.start("reserve", "--path", src + "/d", "--skip-occupancy-check",
                                    "--allow-unrelated-path")]
                (mrc, _mo, merr), (arc, aout, aerr), (crc, cout, cerr), (drc, dout, derr) = [finish(p) for p in procs]
                self.assertEqual((arc, crc, drc), (0, 0, 0), (aerr, cerr, derr))
                rows = self.rows()
                keys = [(r[0], r[1]) for r in rows]
                self.assertEqual(len(keys), len(set(keys)))
                self.assertEqual(len({r[2] for r in rows}), len(rows))
                by_key = {(r[0], r[1]): r[2] for r in rows}
                self.assertEqual(by_key.get((dst + "/c", "")), int(cout))
                d_port = int(dout)
                self.assertEqual(sorted(p for k, p in by_key.items() if k in ((src + "/d", ""), (dst + "/d", ""))),
                                 [d_port])
                if mrc == 0:
                    self.assertEqual(by_key.get((dst + "/a", "web")), 5200)
                    self.assertEqual(int(aout), 5200)
                    self.assertEqual(by_key.get((dst + "/b", "")), 5201)
                    self.assertFalse([k for k in by_key if k[0].startswith(src + "/") and k[0] != src + "/d"], rows)
                    self.assertEqual(len(rows), 4)
                else:
                    self.assertEqual(mrc, 6, merr)
                    self.assertIn("conflicting reservation", merr)
                    self.assertEqual(by_key.get((src + "/a", "web")), 5200)
                    self.assertEqual(by_key.get((src + "/b", "")), 5201)
                    self.assertEqual(by_key.get((dst + "/a", "web")), int(aout))
                    self.assertEqual(len(rows), 5)
                self.assertDataDirValid()


# --- Operations: the Python API ----------------------------------------------

class TestDataDirResolution(unittest.TestCase):
    def test_order(self):
        r = trop.resolve_data_dir
        self.assertEqual(r("rel/dir", {"TROP_DATA_DIR": "/e", "HOME": "/h"}), "rel/dir")
        self.assertEqual(r(None, {"TROP_DATA_DIR": "/e", "HOME": "/h"}), "/e")
        self.assertEqual(r(None, {"HOME": "/h"}), "/h/.trop")
        self.assertEqual(r(None, {"USERPROFILE": "/u"}), "/u/.trop")

    def test_no_home_is_a_configuration_error(self):
        with self.assertRaises(trop.TropError) as ctx:
            trop.resolve_data_dir(None, {})
        self.assertEqual(ctx.exception.exit_code, 7)


class TestPythonAPI(TropTestCase):
    IN_PROCESS = True

    def test_reserve_release_list(self):
        proj = os.path.join(self.root, "proj")
        port = trop.reserve(**self.opts)
        self.assertEqual(port, 5000)
        self.assertEqual(trop.reserve(**self.opts), 5000)
        self.assertEqual(trop.reserve(tag="web", project="app", **self.opts), 5001)
        rows = trop.list_reservations(**self.opts)
        self.assertEqual([(r.path, r.tag, r.port, r.project) for r in rows],
                         [(proj, None, 5000, None), (proj, "web", 5001, "app")])
        self.assertEqual(trop.list_projects(**self.opts), ["app"])
        self.assertEqual(trop.port_info(5001, **self.opts).tag, "web")
        self.assertIsNone(trop.port_info(5002, **self.opts))
        self.assertEqual(trop.release(**self.opts), 2)
        self.assertEqual(trop.release(**self.opts), 0)

    def test_errors_are_trop_errors(self):
        with self.assertRaises(trop.SemanticFailure):
            trop.reserve(path="/unrelated/x", **self.opts)
        with self.assertRaises(trop.InvalidArguments):
            trop.reserve(port="0", **self.opts)


class TestApiSurface(unittest.TestCase):
    def test_all_names_exist(self):
        self.assertEqual(len(trop.__all__), len(set(trop.__all__)))
        for name in trop.__all__:
            self.assertTrue(hasattr(trop, name), name)
        for name in ("Trop", "reserve", "release", "reserve_group", "autoreserve", "list_reservations",
                     "list_projects", "port_info", "prune", "expire", "autoclean", "migrate", "data_dir",
                     "reservation", "TropError", "__version__"):
            self.assertIn(name, trop.__all__)
        self.assertTrue(callable(trop.pytest_configure))

    def test_version(self):
        self.assertIsInstance(trop.__version__, str)
        self.assertRegex(trop.__version__, r"^\d+\.\d+\.\d+$")

    def test_error_classes_and_exit_codes(self):
        table = [(trop.SemanticFailure, 1), (trop.LockTimeout, 2), (trop.NoDataDirectory, 3),
                 (trop.InvalidArguments, 4), (trop.IoFailure, 5), (trop.LibraryError, 6),
                 (trop.CorruptionError, 6), (trop.ConfigError, 7), (trop.UsageError, 2)]
        for cls, code in table:
            self.assertTrue(issubclass(cls, trop.TropError), cls)
            self.assertTrue(issubclass(cls, Exception), cls)
            self.assertEqual(cls.exit_code, code, cls)
        self.assertTrue(issubclass(trop.CorruptionError, trop.LibraryError))
        self.assertEqual(trop.LockTimeout("doing x", 1).exit_code, 2)
        self.assertEqual(trop.InvalidArguments("bad").exit_code, 4)


class TestApiFunctions(TropTestCase):
    """The module-level functions: exact return values, idempotency, options named like CLI flags."""
    IN_PROCESS = True

    def test_reserve_returns_the_same_int_for_the_same_key(self):
        port = trop.reserve(**self.opts)
        self.assertIs(type(port), int)
        self.assertEqual(port, 5000)
        self.assertEqual(trop.reserve(**self.opts), 5000)
        self.assertEqual(trop.reserve(path=self.proj, **self.opts), 5000)         # explicit = cwd
        self.assertEqual(trop.reserve(path=".", **self.opts), 5000)
        self.assertEqual(trop.reserve(tag="web", **self.opts), 5001)
        self.assertEqual(trop.reserve(None, "web", **self.opts), 5001)           # positional path, tag
        sub = self.mkdir("proj", "sub")
        self.assertEqual(trop.reserve(path="sub", **self.opts), 5002)
        self.assertEqual(trop.reserve(path=sub, **self.opts), 5002)
        self.assertEqual(self.rows(5), [(self.proj, "", 5000, None, None), (self.proj, "web", 5001, None, None),
                                        (sub, "", 5002, None, None)])

    def test_reserve_options_like_cli_flags(self):
        self.assertEqual(trop.reserve(tag="a", min=6100, max=6199, **self.opts), 6100)
        self.assertEqual(trop.reserve(tag="b", min=6100, max=6199, **self.opts), 6101)
        self.assertEqual(trop.reserve(tag="c", port=6150, **self.opts), 6150)          # preferred port
        self.assertEqual(trop.reserve(tag="c", port=6160, overwrite=True, **self.opts), 6160)
        self.assertEqual(trop.reserve(tag="p", project="app", task="t1", **self.opts), 5000)
        self.assertEqual(trop.reserve(tag="p", project="app", task="t2", allow_task_change=True, **self.opts), 5000)
        self.assertIn((self.proj, "p", 5000, "app", "t2"), self.rows(5))
        self.assertEqual(trop.reserve(tag="p", clear_task=True, allow_task_change=True, **self.opts), 5000)
        self.assertIn((self.proj, "p", 5000, "app", None), self.rows(5))

    def test_reserve_unrelated_path_needs_allow_unrelated_path(self):
        other = self.mkdir("other")
        exc = self.assertTropError(trop.SemanticFailure, 1, trop.reserve, path=other, **self.opts)
        self.assertIn("unrelated", str(exc))
        self.assertEqual(self.rows(), [])
        port = trop.reserve(path=other, allow_unrelated_path=True, **self.opts)
        self.assertEqual(port, 5000)
        self.assertEqual(trop.reserve(path=other, force=True, **self.opts), 5000)
        self.assertTropError(trop.SemanticFailure, 1, trop.release, path=other, **self.opts)
        self.assertEqual(trop.release(path=other, allow_unrelated_path=True, **self.opts), 1)

    def test_dry_run_never_writes(self):
        self.assertEqual(trop.reserve(dry_run=True, **self.opts), 5000)
        self.assertFalse(os.path.exists(self.data), "a dry run created the data directory")
        self.assertEqual(trop.reserve(**self.opts), 5000)
        self.assertEqual(trop.reserve(tag="web", dry_run=True, **self.opts), 5001)
        self.assertEqual(trop.release(dry_run=True, **self.opts), 1)
        self.assertEqual(self.rows(5), [(self.proj, "", 5000, None, None)])
        self.assertEqual(trop.reserve(tag="web", **self.opts), 5001)               # the dry run's answer

    def test_release_counts(self):
        sub = self.mkdir("proj", "sub")
        trop.reserve(**self.opts)
        trop.reserve(tag="a", **self.opts)
        trop.reserve(tag="b", **self.opts)
        trop.reserve(path=sub, **self.opts)
        self.assertEqual(trop.release(tag="a", **self.opts), 1)
        self.assertEqual(trop.release(tag="a", **self.opts), 0)                 # idempotent
        self.assertEqual(trop.release(untagged_only=True, **self.opts), 1)
        self.assertEqual(trop.release(recursive=True, **self.opts), 2)           # b and sub
        self.assertEqual(trop.release(**self.opts), 0)
        self.assertEqual(self.rows(), [])
        self.assertTropError(trop.InvalidArguments, 4, trop.release, tag="x", untagged_only=True, **self.opts)

    def test_list_reservations_and_projects(self):
        self.assertEqual(trop.list_reservations(**self.opts), [])
        self.assertEqual(trop.list_projects(**self.opts), [])
        sub = self.mkdir("proj", "sub")
        trop.reserve(tag="web", project="zeta", **self.opts)
        trop.reserve(project="alpha", **self.opts)
        trop.reserve(path=sub, tag="web", **self.opts)
        rows = trop.list_reservations(**self.opts)
        self.assertIsInstance(rows, list)
        for row in rows:
            self.assertIsInstance(row, trop.Reservation)
            self.assertIs(type(row.port), int)
            self.assertIsInstance(row.created_at, int)
            self.assertIsInstance(row.last_used_at, int)
        self.assertEqual([(r.path, r.tag, r.port, r.project) for r in rows],
                         [(self.proj, None, 5001, "alpha"), (self.proj, "web", 5000, "zeta"), (sub, "web", 5002, None)])
        self.assertEqual([r.port for r in trop.list_reservations(filter_tag="web", **self.opts)], [5000, 5002])
        self.assertEqual([r.port for r in trop.list_reservations(filter_project="alpha", **self.opts)], [5001])
        self.assertEqual([r.port for r in trop.list_reservations(filter_path="sub", **self.opts)], [5002])
        self.assertEqual(trop.list_projects(**self.opts), ["alpha", "zeta"])

    def test_port_info(self):
        port = trop.reserve(tag="web", project="app", **self.opts)
        res = trop.port_info(port, **self.opts)
        self.assertIsInstance(res, trop.Reservation)
        self.assertEqual((res.path, res.tag, res.port, res.project), (self.proj, "web", port, "app"))
        self.assertIsNone(trop.port_info(port + 1, **self.opts))
        self.assertTropError(trop.InvalidArguments, 4, trop.port_info, 0, **self.opts)
        self.assertTropError(trop.InvalidArguments, 4, trop.port_info, 65536, **self.opts)

    def test_reserve_group_and_autoreserve_return_tag_port_dicts(self):
        config = self.group_file(self.proj, [("web", {"offset": 0}), ("api", {"offset": 1, "env": "API_PORT"})],
                                 pmin=41000, pmax=41099)
        expected = {"web": 41000, "api": 41001}
        self.assertEqual(trop.reserve_group(config, dry_run=True, **self.opts), expected)
        self.assertFalse(os.path.exists(self.data), "a dry run created the data directory")
        result = trop.reserve_group(config, **self.opts)
        self.assertEqual(result, expected)
        self.assertTrue(all(type(p) is int for p in result.values()))
        self.assertEqual(trop.reserve_group("trop.yaml", **self.opts), expected)          # relative to cwd
        self.assertEqual(trop.autoreserve(**self.opts), expected)
        self.assertEqual([r[:3] for r in self.rows()], [(self.proj, "api", 41001), (self.proj, "web", 41000)])
        with trop.Trop(**self.opts) as handle:
            self.assertEqual(handle.group_environment(), {"WEB": "41000", "API_PORT": "41001"})
            self.assertEqual(handle.group_environment(config), {"WEB": "41000", "API_PORT": "41001"})
        self.assertTropError(trop.InvalidArguments, 4, trop.reserve_group, "missing.yaml", **self.opts)

    def test_autoreserve_without_a_config_file(self):
        lonely = self.mkdir("lonely")
        os.chdir(lonely)
        self.assertTropError(trop.InvalidArguments, 4, trop.autoreserve, **self.opts)

    def test_prune_expire_autoclean_return_removed_reservations(self):
        gone = self.mkdir("proj", "gone")
        old = self.mkdir("proj", "old")
        trop.reserve(**self.opts)
        trop.reserve(path=gone, **self.opts)
        trop.reserve(path=old, **self.opts)
        os.rmdir(gone)
        self.sql("UPDATE reservations SET last_used_at = last_used_at - 10 * 86400 WHERE path = ?", (old,))
        before = self.rows(5)
        for func, kwargs in ((trop.prune, {}), (trop.expire, {"days": 5}), (trop.autoclean, {"days": 5})):
            removed = func(dry_run=True, **dict(kwargs, **self.opts))
            self.assertIsInstance(removed, list)
            self.assertTrue(all(isinstance(r, trop.Reservation) for r in removed))
            self.assertEqual(self.rows(5), before, "dry run of %s wrote" % func.__name__)
        self.assertEqual([r.path for r in trop.prune(**self.opts)], [gone])
        self.assertEqual(trop.prune(**self.opts), [])
        self.assertEqual(trop.expire(days=30, **self.opts), [])
        self.assertEqual([r.path for r in trop.expire(days=5, **self.opts)], [old])
        self.assertEqual(self.rows(5), [(self.proj, "", 5000, None, None)])
        self.assertEqual(trop.autoclean(**self.opts), [])
        self.assertTropError(trop.ConfigError, 7, trop.expire, days=0, **self.opts)

    def test_autoclean_prunes_and_expires_in_one_call(self):
        gone = self.mkdir("proj", "gone")
        old = self.mkdir("proj", "old")
        trop.reserve(path=gone, **self.opts)
        trop.reserve(path=old, **self.opts)
        os.rmdir(gone)
        self.sql("UPDATE reservations SET last_used_at = last_used_at - 10 * 86400 WHERE path = ?", (old,))
        self.assertEqual(sorted(r.path for r in trop.autoclean(days=5, **self.opts)), [gone, old])
        self.assertEqual(self.rows(), [])

    def test_migrate_returns_old_new_pairs(self):
        src = self.mkdir("proj", "a")
        trop.reserve(path=src, **self.opts)
        trop.reserve(path=src, tag="web", **self.opts)
        dst = os.path.join(self.proj, "b")
        planned = trop.migrate(src, dst, dry_run=True, **self.opts)
        self.assertEqual([r[0] for r in self.rows()], [src, src])
        moves = trop.migrate("a", "b", **self.opts)
        self.assertEqual([(o.path, o.tag, n.path, n.tag, o.port == n.port) for o, n in moves],
                         [(src, None, dst, None, True), (src, "web", dst, "web", True)])
        self.assertEqual([(o.path, n.path, n.port) for o, n in planned], [(o.path, n.path, n.port) for o, n in moves])
        self.assertEqual([r[:3] for r in self.rows()], [(dst, "", 5000), (dst, "web", 5001)])
        self.assertTropError(trop.LibraryError, 6, trop.migrate, src, dst, **self.opts)     # nothing at src

    def test_data_dir(self):
        self.assertEqual(trop.data_dir(), os.path.join(self.home, ".trop"))
        self.assertEqual(trop.data_dir(data_dir="rel/x"), "rel/x")
        os.environ["TROP_DATA_DIR"] = os.path.join(self.root, "env-data")
        self.assertEqual(trop.data_dir(), os.path.join(self.root, "env-data"))
        self.assertEqual(trop.data_dir(data_dir=self.data), self.data)

    def test_environment_and_config_files_apply(self):
        os.environ["TROP_DATA_DIR"] = self.data
        os.environ["TROP_SKIP_OCCUPANCY_CHECK"] = "true"
        self.assertEqual(trop.reserve(), 5000)                                  # TROP_DATA_DIR is used
        self.assertEqual(self.rows(5), [(self.proj, "", 5000, None, None)])
        os.environ["TROP_PORT_MIN"] = "7000"
        self.assertEqual(trop.reserve(tag="env"), 7000)
        del os.environ["TROP_PORT_MIN"]
        self.write(os.path.join(self.proj, "trop.yaml"), "ports:\n  min: 8000\n  max: 8099\n")
        self.assertEqual(trop.reserve(tag="yaml"), 8000)
        self.assertFalse(os.path.exists(os.path.join(self.home, ".trop")))

    def test_path_like_arguments(self):
        # Python callers pass pathlib.Path (pytest's tmp_path ...): every path argument accepts os.PathLike.
        sub = pathlib.Path(self.mkdir("proj", "sub"))
        opts = dict(self.opts, data_dir=pathlib.Path(self.data))
        self.assertEqual(trop.reserve(path=sub, **opts), 5000)
        self.assertEqual(trop.port_info(5000, **opts).path, str(sub))
        self.assertEqual([r.port for r in trop.list_reservations(filter_path=sub, **opts)], [5000])
        self.assertEqual(len(trop.migrate(sub, pathlib.Path(self.proj, "sub2"), **opts)), 1)
        self.assertEqual(trop.release(path=pathlib.Path(self.proj, "sub2"), **opts), 1)
        config = pathlib.Path(self.group_file(self.proj, [("web", {"offset": 0}), ("api", {"offset": 1})],
                                              pmin=41000, pmax=41099))
        self.assertEqual(trop.reserve_group(config, **opts), {"web": 41000, "api": 41001})

    def test_unknown_option_is_rejected(self):
        # A misspelt option (allow_unrelated_paths) must not be silently ignored.
        with self.assertRaises((TypeError, trop.InvalidArguments)):
            trop.reserve(path=self.mkdir("other"), allow_unrelated_paths=True, **self.opts)
        with self.assertRaises((TypeError, trop.InvalidArguments)):
            trop.Trop(skip_ocupancy_check=True, data_dir=self.data)


class TestApiErrors(TropTestCase):
    """Every failure is a TropError with the CLI's exit code, never a sqlite3 or OS error."""
    IN_PROCESS = True

    def test_sticky_project_change(self):
        trop.reserve(tag="web", project="a", **self.opts)
        exc = self.assertTropError(trop.SemanticFailure, 1, trop.reserve, tag="web", project="b", **self.opts)
        self.assertIn("project", str(exc))
        self.assertEqual(self.rows(5), [(self.proj, "web", 5000, "a", None)])
        self.assertEqual(trop.reserve(tag="web", project="b", allow_project_change=True, **self.opts), 5000)
        self.assertEqual(self.rows(5), [(self.proj, "web", 5000, "b", None)])

    def test_lock_held_by_another_connection(self):
        trop.reserve(**self.opts)
        other = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        exc = self.assertTropError(trop.LockTimeout, 2, trop.reserve, tag="x", busy_timeout=0, **self.opts)
        self.assertEqual(str(exc), "database lock timeout while starting an immediate database transaction after 0s")
        self.assertTropError(trop.LockTimeout, 2, trop.release, busy_timeout=0, **self.opts)
        self.assertTropError(trop.LockTimeout, 2, trop.prune, busy_timeout=0, **self.opts)
        # readers do not need the write lock
        self.assertEqual([r.port for r in trop.list_reservations(busy_timeout=0, **self.opts)], [5000])
        self.assertEqual(trop.port_info(5000, busy_timeout=0, **self.opts).port, 5000)
        other.execute("ROLLBACK")
        self.assertEqual(trop.reserve(tag="x", busy_timeout=0, **self.opts), 5001)

    def test_busy_timeout_waits_for_the_lock(self):
        trop.reserve(**self.opts)
        other = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.3, other.execute, ("ROLLBACK",))
        timer.start()
        self.addCleanup(timer.cancel)
        self.assertEqual(trop.reserve(tag="x", busy_timeout=10, **self.opts), 5001)
        timer.join()

    def test_exclusive_lock_on_reads(self):
        trop.reserve(**self.opts)
        other = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        self.assertTropError(trop.LockTimeout, 2, trop.list_reservations, busy_timeout=0, **self.opts)
        self.assertTropError(trop.LockTimeout, 2, trop.port_info, 5000, busy_timeout=0, **self.opts)
        self.assertTropError(trop.LockTimeout, 2, trop.reserve, busy_timeout=0, **self.opts)

    def test_disable_autoinit_without_database(self):
        self.assertTropError(trop.NoDataDirectory, 3, trop.reserve, disable_autoinit=True, **self.opts)
        self.assertTropError(trop.NoDataDirectory, 3, trop.list_reservations, disable_autoinit=True, **self.opts)
        self.assertFalse(os.path.exists(self.data))
        trop.reserve(**self.opts)
        self.assertEqual(trop.reserve(disable_autoinit=True, **self.opts), 5000)

    def test_invalid_arguments(self):
        for value in (0, "0", 65536, "x"):
            self.assertTropError(trop.InvalidArguments, 4, trop.reserve, port=value, **self.opts)
        self.assertTropError(trop.InvalidArguments, 4, trop.reserve, min=0, **self.opts)
        self.assertTropError(trop.InvalidArguments, 4, trop.reserve, tag="  ", **self.opts)
        self.assertTropError(trop.InvalidArguments, 4, trop.reserve, busy_timeout=-1, **self.opts)
        self.assertEqual(self.rows(), [])

    def test_exhausted_range(self):
        self.assertEqual(trop.reserve(tag="a", min=6100, max=6101, **self.opts), 6100)
        self.assertEqual(trop.reserve(tag="b", min=6100, max=6101, **self.opts), 6101)
        exc = self.assertTropError(trop.LibraryError, 6, trop.reserve, tag="c", min=6100, max=6101, **self.opts)
        self.assertIn("exhausted", str(exc))
        self.assertEqual(len(self.rows()), 2)

    def test_bad_config_files(self):
        self.write(os.path.join(self.proj, "trop.yaml"), "ports:\n  min: not-a-port\n")
        self.assertTropError(trop.ConfigError, 7, trop.reserve, **self.opts)
        self.assertTropError(trop.ConfigError, 7, trop.Trop, **self.opts)
        self.assertTropError(trop.ConfigError, 7, trop.list_reservations, **self.opts)
        self.write(os.path.join(self.proj, "trop.yaml"), "ports:\n\tmin: 6000\n")               # a tab
        self.assertTropError(trop.ConfigError, 7, trop.reserve, **self.opts)
        os.remove(os.path.join(self.proj, "trop.yaml"))
        self.write(os.path.join(self.data, "config.yaml"), "project: not-allowed-here\n")
        self.assertTropError(trop.ConfigError, 7, trop.reserve, **self.opts)
        os.remove(os.path.join(self.data, "config.yaml"))
        self.assertTropError(trop.ConfigError, 7, trop.reserve, busy_timeout=3000000, **self.opts)
        self.assertTropError(trop.ConfigError, 7, trop.reserve, project="", **self.opts)
        self.assertEqual(self.rows(), [])

    def test_database_problems_are_trop_errors(self):
        self.write(self.db, "this is not a database\n" * 200)
        for func in (trop.reserve, trop.list_reservations, trop.prune, trop.list_projects):
            self.assertTropError(trop.LibraryError, 6, func, **self.opts)
        self.assertTropError(trop.LibraryError, 6, trop.port_info, 5000, **self.opts)
        with open(self.db) as fh:
            self.assertEqual(fh.read(), "this is not a database\n" * 200)          # untouched
        not_a_dir = self.write(os.path.join(self.root, "file"), "")
        self.assertTropError(trop.LibraryError, 6, trop.reserve, data_dir=not_a_dir, skip_occupancy_check=True)
        self.assertTropError(trop.LibraryError, 6, trop.reserve, data_dir=os.path.join(not_a_dir, "d"),
                             skip_occupancy_check=True)


class TestTropHandle(TropTestCase):
    """trop.Trop: the same operations as methods, one connection for many calls."""
    IN_PROCESS = True

    def test_methods(self):
        sub = self.mkdir("proj", "sub")
        config = self.group_file(self.mkdir("proj", "grp"), [("web", {"offset": 0}), ("api", {"offset": 1})],
                                 pmin=41000, pmax=41099)
        with trop.Trop(**self.opts) as handle:
            self.assertEqual(handle.reserve(), 5000)
            self.assertEqual(handle.reserve(), 5000)
            self.assertEqual(handle.reserve(tag="web"), 5001)
            self.assertEqual(handle.reserve(sub, "web"), 5002)
            self.assertEqual(handle.reserve(tag="dry", dry_run=True), 5003)
            self.assertEqual(handle.reserve(tag="p", port=5100), 5100)
            self.assertEqual(handle.reserve_group(config), {"web": 41000, "api": 41001})
            self.assertEqual(handle.reserve_group(config, dry_run=True), {"web": 41000, "api": 41001})
            self.assertEqual([(r.path, r.tag, r.port) for r in handle.list(filter_path="sub")], [(sub, "web", 5002)])
            self.assertEqual(len(handle.list()), 6)
            self.assertEqual(handle.projects(), [])
            self.assertEqual(handle.port_info(5001).tag, "web")
            self.assertIsNone(handle.port_info(5003))
            self.assertEqual(handle.prune(), [])
            self.assertEqual(handle.expire(days=1), [])
            self.assertEqual(handle.autoclean(), [])
            moves = handle.migrate(sub, os.path.join(self.proj, "sub2"))
            self.assertEqual([(o.port, n.path) for o, n in moves], [(5002, os.path.join(self.proj, "sub2"))])
            self.assertEqual(handle.release(tag="web"), 1)
            self.assertEqual(handle.release(recursive=True), 5)
            self.assertEqual(handle.list(), [])
            self.assertTropError(trop.InvalidArguments, 4, handle.reserve, port=0)
            self.assertTropError(trop.SemanticFailure, 1, handle.reserve, path=self.mkdir("other"))
        self.assertIsNone(handle.session._store)                                # closed by the with block

    def test_autoreserve_and_group_environment(self):
        self.group_file(self.proj, [("web", {"offset": 0, "env": "HTTP_PORT"}), ("api", {"offset": 1})],
                        pmin=41000, pmax=41099)
        with trop.Trop(**self.opts) as handle:
            self.assertEqual(handle.autoreserve(), {"web": 41000, "api": 41001})
            self.assertEqual(handle.autoreserve(), {"web": 41000, "api": 41001})
            self.assertEqual(handle.group_environment(), {"HTTP_PORT": "41000", "API": "41001"})

    def test_reuses_one_connection(self):
        handle = trop.Trop(**self.opts)
        self.addCleanup(handle.close)
        handle.reserve()
        store = handle.session._store
        self.assertIsNotNone(store)
        conn = store.conn
        handle.reserve(tag="a")
        handle.list()
        handle.port_info(5000)
        handle.projects()
        handle.release(tag="a")
        handle.prune()
        self.assertIs(handle.session._store, store)
        self.assertIs(handle.session._store.conn, conn)
        handle.close()
        self.assertIsNone(handle.session._store)

    def test_reopens_after_data_dir_was_recreated(self):
        handle = trop.Trop(**self.opts)
        self.addCleanup(handle.close)
        self.assertEqual(handle.reserve(tag="a"), 5000)
        store = handle.session._store
        shutil.rmtree(self.data)
        self.assertEqual(handle.list(), [])
        self.assertIsNot(handle.session._store, store)
        self.assertEqual(handle.reserve(tag="b"), 5000)
        self.assertEqual(self.rows(5), [(self.proj, "b", 5000, None, None)])

    def test_lock_timeout_then_recovery(self):
        handle = trop.Trop(busy_timeout=0, **self.opts)
        self.addCleanup(handle.close)
        self.assertEqual(handle.reserve(), 5000)
        other = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        self.assertTropError(trop.LockTimeout, 2, handle.reserve, tag="x")
        self.assertEqual([r.port for r in handle.list()], [5000])
        other.execute("ROLLBACK")
        self.assertEqual(handle.reserve(tag="x"), 5001)
        self.assertFalse(handle.session._store.conn.in_transaction)

    def test_no_descriptor_leak(self):
        fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
        if not os.path.isdir(fd_dir):
            self.skipTest("no /proc/self/fd or /dev/fd")

        def count():
            return len(os.listdir(fd_dir))
        with trop.Trop(**self.opts) as handle:
            handle.reserve()
            handle.list()
            before = count()
            for i in range(500):
                kind = i % 5
                if kind == 0:
                    handle.reserve(tag="t%d" % (i % 7))
                elif kind == 1:
                    handle.list()
                elif kind == 2:
                    handle.port_info(5000)
                elif kind == 3:
                    handle.release(tag="t%d" % (i % 7))
                else:
                    self.assertRaises(trop.InvalidArguments, handle.reserve, port=0)
            self.assertEqual(count(), before)
        trop.reserve(**self.opts)
        before = count()
        for i in range(100):
            trop.reserve(tag="m%d" % (i % 3), **self.opts)
            trop.port_info(5000, **self.opts)
        self.assertEqual(count(), before)


class TestReservationContext(TropTestCase):
    """trop.reservation inside a unittest TestCase."""
    IN_PROCESS = True

    def test_reserved_inside_released_after(self):
        with trop.reservation(tag="test_server", data_dir=self.data) as port:
            self.assertIsInstance(port, int)            # a trop.ReservedPort, which can also wait()
            self.assertIsInstance(port, trop.ReservedPort)
            res = trop.port_info(port, data_dir=self.data)
            self.assertIsNotNone(res)
            self.assertEqual((res.path, res.tag), (self.proj, "test_server"))
            with socket.socket() as sock:                          # occupancy was checked: the port is free
                sock.bind(("127.0.0.1", port))
        self.assertIsNone(trop.port_info(port, data_dir=self.data))
        self.assertEqual(self.rows(), [])

    def test_released_when_the_block_raises(self):
        with self.assertRaises(RuntimeError):
            with trop.reservation(tag="boom", **self.opts) as port:
                self.assertEqual(trop.port_info(port, **self.opts).tag, "boom")
                raise RuntimeError("boom")
        self.assertIsNone(trop.port_info(port, **self.opts))
        self.assertEqual(self.rows(), [])

    def test_untagged_reservation_leaves_other_tags(self):
        kept = trop.reserve(tag="kept", **self.opts)
        with trop.reservation(min=7000, max=7010, **self.opts) as port:
            self.assertEqual(port, 7000)
            self.assertEqual(trop.port_info(port, **self.opts).tag, None)
        self.assertEqual(self.rows(5), [(self.proj, "kept", kept, None, None)])

    def test_nested_and_explicit_path(self):
        other = self.mkdir("other")
        with trop.reservation(other, "a", allow_unrelated_path=True, **self.opts) as first:
            with trop.reservation(tag="b", **self.opts) as second:
                self.assertNotEqual(first, second)
                self.assertEqual(len(self.rows()), 2)
            self.assertEqual([r[:2] for r in self.rows()], [(other, "a")])
        self.assertEqual(self.rows(), [])

    def test_inside_a_test_suite(self):
        data, rows = self.data, []

        class ServerTest(unittest.TestCase):
            def test_server(inner):
                with trop.reservation(tag="test_server", data_dir=data) as port:
                    rows.append(trop.port_info(port, data_dir=data))
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", port))
                        inner.assertEqual(sock.getsockname()[1], port)

        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
            unittest.defaultTestLoader.loadTestsFromTestCase(ServerTest))
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
        self.assertEqual([r.tag for r in rows], ["test_server"])
        self.assertEqual(self.rows(), [])


class TestPytestPlugin(TropTestCase):
    IN_PROCESS = True

    TEST_FILE = '''\
import pytest
import trop


def test_port(trop_port):
    assert isinstance(trop_port, int) and callable(trop_port.wait)
    res = trop.port_info(trop_port)
    assert res is not None and res.tag == "test_fixture.py::test_port", res


def test_two_tests_two_ports(trop_port, request):
    assert trop.port_info(trop_port).tag == request.node.nodeid
    assert len(trop.list_reservations()) == 1


@pytest.mark.xfail(raises=RuntimeError, strict=True)
def test_released_after_failure(trop_port):
    assert trop.port_info(trop_port) is not None
    raise RuntimeError("expected")
'''

    def test_import_does_not_import_pytest(self):
        code = ("import sys, trop; print(sorted(m for m in sys.modules "
                "if m.split('.')[0] in ('pytest', '_pytest', 'pluggy')))")
        rc, out, err = self.execute([sys.executable, "-c", code], env=self.child_env(PYTHONPATH=TROP_DIR))
        self.assertEqual((rc, out, err), (0, "[]\n", ""))

    @unittest.skipIf(importlib.util.find_spec("pytest") is None, "pytest is not installed for this interpreter")
    def test_trop_port_fixture(self):
        work = self.mkdir("pytest-run")
        self.write(os.path.join(work, "test_fixture.py"), self.TEST_FILE)
        data = os.path.join(self.root, "pytest-data")
        env = self.child_env(PYTHONPATH=TROP_DIR, TROP_DATA_DIR=data, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        rc, out, err = self.execute([sys.executable, "-m", "pytest", "-p", "trop", "-p", "no:cacheprovider", "-q",
                                     "test_fixture.py"], cwd=work, env=env)
        self.assertEqual(rc, 0, out + err)
        self.assertRegex(out, r"2 passed, 1 xfailed")
        self.assertEqual(trop.list_reservations(data_dir=data), [])             # every fixture released


# --- Output ------------------------------------------------------------------

class TestOutput(unittest.TestCase):
    def rows(self, **fields):
        values = dict(path="/w/a", tag="", port=5000, project=None, task=None, created_at=T1, last_used_at=T2)
        values.update(fields)
        return [trop.Reservation.from_row(tuple(values[k] for k in COLUMNS.split(", ")))]

    def test_timestamps_are_utc(self):
        self.assertEqual(trop.format_timestamp(T1), S1)
        self.assertEqual(trop.format_timestamp(0), "1970-01-01 00:00:00")

    def test_csv_quotes_only_when_needed(self):
        out = trop.format_reservations(self.rows(path="/w/a,b", tag='say "hi"', project="a b"), "csv")
        self.assertEqual(out.rstrip("\n").split("\n")[1],
                         '5000,"/w/a,b","say ""hi""",a b,,%s,%s' % (S1, S2))

    def test_csv_and_tsv_quote_carriage_return_and_newline(self):
        for fmt, sep in (("csv", ","), ("tsv", "\t")):
            for tag in ("a\rb", "a\nb"):
                out = trop.format_reservations(self.rows(tag=tag), fmt)
                expected = sep.join(["5000", "/w/a", '"%s"' % tag, "", "", S1, S2])
                self.assertEqual(out.rstrip("\n").split("\n", 1)[1], expected, "%s %r" % (fmt, tag))

    def test_tsv_quotes_tabs(self):
        out = trop.format_reservations(self.rows(tag="a\tb"), "tsv")
        self.assertEqual(out.rstrip("\n").split("\n")[1], '5000\t/w/a\t"a\tb"\t\t\t%s\t%s' % (S1, S2))


class TestEncodings(TropTestCase):
    """Real narrow consoles in child processes: output is escaped, JSON stays JSON, nothing is an internal error."""
    ENV = SKIP_PROBES

    def setUp(self):
        super().setUp()
        self.cafe = self.mkdir("proj", "café ü")
        self.seed((self.cafe, "tag-é", 5000, "prøject", None))

    def run_with(self, encoding, *args, cwd=None, env=None):
        environ = dict({"PYTHONIOENCODING": encoding}, **(env or {}))
        rc, out_bytes, err_bytes = self.run_bytes(args, cwd, environ)
        self.assertNotIn(b"internal error", err_bytes, (encoding, args))
        self.assertNotIn(b"Traceback", err_bytes, (encoding, args))
        return rc, out_bytes, err_bytes

    def run_bytes(self, args, cwd=None, env=None):
        proc = subprocess.run([sys.executable, "-m", "trop"] + list(args), cwd=cwd or self.proj,
                              env=self.environment(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT)
        return proc.returncode, proc.stdout, proc.stderr

    def test_narrow_encodings(self):
        for encoding in ("ascii", "cp1252", "latin-1"):
            with self.subTest(encoding=encoding):
                rc, out, _ = self.run_with(encoding, "list", "--show-full-paths")
                self.assertEqual(rc, 0)
                text = out.decode(encoding)
                self.assertIn("5000", text)
                if encoding == "ascii":
                    self.assertIn("caf\\xe9 \\xfc", text)
                else:
                    self.assertIn("café ü", text)
                rc, out, _ = self.run_with(encoding, "list", "--format", "json")
                self.assertEqual(rc, 0)
                self.assertTrue(out.isascii() if hasattr(out, "isascii") else all(b < 128 for b in out))
                self.assertEqual(json.loads(out.decode("ascii"))[0]["path"], self.cafe)
                rc, out, _ = self.run_with(encoding, "reserve", "--path", self.cafe, "--tag", "tag-é")
                self.assertEqual((rc, out), (0, b"5000\n"))
                rc, out, err = self.run_with(encoding, "reserve", "--path", self.cafe, "--tag", "tag-é",
                                             "--project", "nöpe")
                self.assertEqual(rc, 1)
                self.assertIn(b"Error: cannot change sticky field", err)

    def test_a_message_after_a_commit_is_escaped_not_fatal(self):
        target = self.path("proj", "dest ø")
        rc, out, err = self.run_with("ascii", "migrate", "--from", self.cafe, "--to", target)
        self.assertEqual((rc, out), (0, b""))
        self.assertIn(b"dest \\xf8", err)
        self.assertEqual(self.rows(3), [(target, "tag-é", 5000)])

    @POSIX_ONLY
    def test_c_locale_without_utf8_mode(self):
        env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": None}
        rc, out, err = self.run_with("ascii", "reserve", "--tag", "c", cwd=self.cafe, env=env)
        self.assertEqual((rc, err), (0, b""), err)
        self.assertEqual(sorted(self.rows(3)), sorted([(self.cafe, "tag-é", 5000), (self.cafe, "c", int(out))]))
        rc, out, err = self.run_with("ascii", "assert-reservation", "--tag", "c", cwd=self.cafe, env=env)
        self.assertEqual(rc, 0, err)

    def test_a_path_that_is_not_utf8_is_refused_clearly(self):
        if sys.platform == "darwin" or os.name == "nt":
            self.skipTest("the filesystem itself refuses names that are not UTF-8")
        bad = os.path.join(os.fsencode(self.proj), b"bad-\xff")
        os.mkdir(bad)
        rc, out, err = self.run_bytes(("reserve",), cwd=bad)
        self.assertEqual((rc, out), (6, b""))
        self.assertTrue(err.startswith(b"Error: invalid path ") and b"not valid UTF-8" in err, err)
        self.assertEqual(err.count(b"\n"), 1)

    def test_internal_errors_say_whether_anything_was_committed(self):
        self.chdir(self.proj)
        with mock.patch.dict(os.environ, {"TROP_DATA_DIR": self.data, "HOME": self.home}):
            with mock.patch.object(trop, "plan_reserve", side_effect=ValueError("planner broke")):
                rc, out, err = trop_main("reserve", "--path", self.cafe, "--tag", "x")
            self.assertEqual((rc, out), (6, ""))
            self.assertIn("internal error: ValueError: planner broke", err)
            self.assertIn("nothing was written to the database", err)
            with mock.patch.object(trop, "_out", side_effect=ValueError("printer broke")):
                rc, out, err = trop_main("reserve", "--path", self.cafe, "--tag", "y")
            self.assertEqual(rc, 6)
            self.assertIn("the changes already committed are kept", err)
        self.assertIn((self.cafe, "y"), [r[:2] for r in self.rows(2)])


# --- Packaging ---------------------------------------------------------------

BACKEND_FILE = os.path.join(TROP_DIR, "tools", "build_backend.py")
BUILD_HOOKS = ("build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
               "get_requires_for_build_sdist", "get_requires_for_build_editable", "prepare_metadata_for_build_wheel",
               "prepare_metadata_for_build_editable")


def load_backend(path):
    """The build backend at path as a fresh module (compiled here: no bytecode is written next to it)."""
    with open(path, "rb") as fh:
        code = compile(fh.read(), path, "exec")
    module = types.ModuleType("trop_build_backend_under_test")
    module.__file__ = path
    exec(code, module.__dict__)
    return module


def setup_cfg_list(value):
    """A setup.cfg list (license_files, a file: directive): one item a line, or comma-separated."""
    return [item.strip() for line in value.splitlines() for item in line.split(",") if item.strip()]


def setup_cfg_lines(value):
    """A setup.cfg list of one item a line (classifiers)."""
    return [line.strip() for line in value.splitlines() if line.strip()]


class TestPackaging(TropTestCase):
    """The PEP 517 / PEP 660 backend in tools/build_backend.py (metadata from setup.cfg), pip wheel, pip install
    and pip install -e into a venv, and a zipapp.  The hooks run in this process with the cwd self.proj, outside
    the source tree, unless a test says otherwise."""
    IN_PROCESS = True

    def setUp(self):
        super().setUp()
        if not os.path.exists(os.path.join(TROP_DIR, "pyproject.toml")) or not os.path.exists(BACKEND_FILE):
            self.skipTest("trop.py is not in its source tree")
        self.out = self.mkdir("dist")
        self.backend = load_backend(BACKEND_FILE)

    def source(self, name):
        with open(os.path.join(TROP_DIR, name), "rb") as fh:
            return fh.read()

    def source_listing(self):
        """Every file of the source tree but bytecode caches and .git."""
        found = []
        for top, dirs, files in os.walk(TROP_DIR):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git")]
            found += [os.path.relpath(os.path.join(top, name), TROP_DIR) for name in files]
        return sorted(found)

    def setup_cfg(self):
        """setup.cfg read independently of the backend."""
        cfg = configparser.ConfigParser(interpolation=None, delimiters=("=",))
        cfg.optionxform = str
        cfg.read_string(self.source("setup.cfg").decode("utf-8"))
        return cfg

    def check_metadata(self, text):
        """METADATA or PKG-INFO holds every field setup.cfg declares."""
        cfg = self.setup_cfg()
        meta, options = cfg["metadata"], cfg["options"]
        self.assertEqual(meta["version"].strip(), "attr: trop.__version__")
        self.assertTrue(meta["long_description"].startswith("file:"))
        parsed = email.parser.Parser().parsestr(text)
        self.assertEqual(parsed["Metadata-Version"], "2.1")
        self.assertEqual(parsed["Name"], meta["name"].strip())
        self.assertEqual(parsed["Version"], trop.__version__)
        self.assertEqual(parsed["Summary"], meta["description"].strip())
        self.assertEqual(parsed["License"], meta["license"].strip())
        self.assertEqual(parsed["Requires-Python"], options["python_requires"].strip())
        self.assertEqual(parsed["Requires-Python"], ">=3.6")
        self.assertEqual(parsed["Description-Content-Type"], meta["long_description_content_type"].strip())
        classifiers = setup_cfg_lines(meta["classifiers"])
        self.assertGreaterEqual(len(classifiers), 4)
        self.assertEqual(parsed.get_all("Classifier"), classifiers)
        self.assertEqual(parsed.get_all("License-File"), setup_cfg_list(meta["license_files"]))
        readme = "\n".join(self.source(n).decode("utf-8") for n in setup_cfg_list(meta["long_description"][5:]))
        self.assertEqual(parsed.get_payload(), readme)
        return parsed

    def check_wheel(self, path, payload):
        """Checks a wheel's name, dist-info and RECORD; payload = {archive name: bytes} besides the dist-info.
        Returns {archive name: bytes}."""
        version = trop.__version__
        dist_info = "trop_ports-%s.dist-info/" % version
        self.assertEqual(os.path.basename(path), "trop_ports-%s-py3-none-any.whl" % version)
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            self.assertEqual(len(names), len(set(names)))
            self.assertIsNone(zf.testzip())
            contents = {name: zf.read(name) for name in names}
            for info in zf.infolist():
                self.assertEqual(info.date_time, (2020, 1, 1, 0, 0, 0), info.filename)
        for name in names:
            self.assertFalse(name.startswith("/") or ".." in name.split("/"), name)
            self.assertTrue(name in payload or name.startswith(dist_info), name)
        for name, data in payload.items():
            self.assertEqual(contents.get(name), data, name)
        self.check_metadata(contents[dist_info + "METADATA"].decode("utf-8"))
        cfg = self.setup_cfg()
        for name in setup_cfg_list(cfg["metadata"]["license_files"]):
            self.assertEqual(contents[dist_info + "licenses/" + name], self.source(name), name)
        wheel = email.parser.Parser().parsestr(contents[dist_info + "WHEEL"].decode("utf-8"))
        self.assertEqual((wheel["Wheel-Version"], wheel["Root-Is-Purelib"], wheel["Tag"]),
                         ("1.0", "true", "py3-none-any"))
        points = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        points.optionxform = str
        points.read_string(contents[dist_info + "entry_points.txt"].decode("utf-8"))
        declared = {group: dict(line.split("=", 1) for line in text.replace(" ", "").splitlines() if line)
                    for group, text in cfg["options.entry_points"].items()}
        self.assertEqual({group: dict(points[group]) for group in points.sections()}, declared)
        self.assertEqual(declared, {"console_scripts": {"trop": "trop:main"}, "pytest11": {"trop": "trop"}})
        record = list(csv.reader(io.StringIO(contents[dist_info + "RECORD"].decode("utf-8"))))
        self.assertEqual(sorted(r[0] for r in record), sorted(names))
        for name, digest, size in record:
            if name == dist_info + "RECORD":
                self.assertEqual((digest, size), ("", ""))
                continue
            algorithm, _, value = digest.partition("=")
            self.assertEqual(algorithm, "sha256", name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(contents[name]).digest()).rstrip(b"=").decode()
            self.assertEqual(value, expected, name)
            self.assertEqual(int(size), len(contents[name]), name)
        return contents

    def pip_version(self, python):
        """The version of python's pip as a tuple, or None without pip."""
        rc, out, _err = self.execute([python, "-m", "pip", "--version"], timeout=120)
        match = re.match(r"pip (\d+)\.(\d+)", out)
        return tuple(int(n) for n in match.groups()) if rc == 0 and match else None

    def needs_pip(self, python, version, why):
        found = self.pip_version(python)
        if found is None:
            self.skipTest("pip is not available for %s" % python)
        if found < version:
            self.skipTest("pip %s is older than %s, the first with %s" % (".".join(map(str, found)),
                                                                          ".".join(map(str, version)), why))

    def venv(self):
        """A fresh venv that borrows this interpreter's pip (--system-site-packages: installing pip into
        every venv would cost seconds); returns its bin directory.  pip installs into the venv that runs
        it, which is what is checked."""
        if importlib.util.find_spec("venv") is None:
            self.skipTest("venv is not available for this interpreter")
        venv = os.path.join(self.root, "venv")
        rc, out, err = self.execute([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv])
        self.assertEqual(rc, 0, out + err)
        return os.path.join(venv, "Scripts" if os.name == "nt" else "bin")

    def check_console_script(self, bin_dir):
        script = os.path.join(bin_dir, "trop")
        self.assertEqual(self.execute([script, "--version"]), (0, "trop %s\n" % trop.__version__, ""))
        data = os.path.join(self.root, "venv-data")
        target = self.mkdir("somewhere")
        self.assertEqual(self.execute([script, "--data-dir", data, "reserve", "--path", target,
                                       "--allow-unrelated-path", "--skip-occupancy-check"]), (0, "5000\n", ""))
        rc, out, err = self.execute([script, "--data-dir", data, "assert-port", "1"])
        self.assertEqual((rc, out), (1, ""))
        self.assertTrue(err.startswith("Error: "), err)
        self.assertEqual(self.execute([script, "--data-dir", data, "assert-port", "5000"])[0], 0)

    def test_the_runtime_module_has_no_build_hooks(self):
        rc, out, err = self.execute([sys.executable, "-c", "import trop; print(hasattr(trop, 'build_wheel'))"],
                                    env=self.child_env(PYTHONPATH=TROP_DIR))
        self.assertEqual((rc, out, err), (0, "False\n", ""))
        for hook in BUILD_HOOKS:
            self.assertFalse(hasattr(trop, hook), hook)
            self.assertTrue(callable(getattr(self.backend, hook)), hook)
        pyproject = self.source("pyproject.toml").decode("utf-8")
        self.assertRegex(pyproject, r'(?m)^requires\s*=\s*\[\s*\]\s*$')
        self.assertRegex(pyproject, r'(?m)^build-backend\s*=\s*"build_backend"\s*$')
        self.assertRegex(pyproject, r'(?m)^backend-path\s*=\s*\[\s*"tools"\s*\]\s*$')
        source = self.source(os.path.join("tools", "build_backend.py")).decode("utf-8")
        self.assertNotRegex(source, r"(?m)^\s*(import|from)\s+trop\b")             # reads trop.py, never imports it
        if sys.version_info >= (3, 8):
            ast.parse(source, feature_version=(3, 6))                                  # Python 3.6 syntax

    def test_build_wheel_from_another_cwd(self):
        self.assertFalse(os.path.realpath(os.getcwd()).startswith(os.path.realpath(TROP_DIR) + os.sep))
        before = self.source_listing()
        name = self.backend.build_wheel(self.out)
        path = os.path.join(self.out, name)
        contents = self.check_wheel(path, {"trop.py": self.source("trop.py")})
        self.assertIn("trop.py", contents)
        self.assertEqual(os.listdir(self.proj), [], "building wrote into the cwd")
        self.assertEqual(self.source_listing(), before, "building wrote into the source tree")
        again = self.mkdir("dist2")
        self.chdir(self.root)
        self.assertEqual(self.backend.build_wheel(again, {}, None), name)            # PEP 517 signature
        self.assertEqual(self.read(os.path.join(again, name)), self.read(path), "the wheel is not reproducible")

    def test_prepare_metadata_is_the_wheels_dist_info(self):
        for hook in ("get_requires_for_build_wheel", "get_requires_for_build_sdist",
                     "get_requires_for_build_editable"):
            self.assertEqual(getattr(self.backend, hook)({}), [], hook)
        with zipfile.ZipFile(os.path.join(self.out, self.backend.build_wheel(self.out))) as zf:
            wheel = {n: zf.read(n) for n in zf.namelist() if ".dist-info/" in n and not n.endswith("/RECORD")}
        for hook in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
            target = self.mkdir(hook)
            dist_info = getattr(self.backend, hook)(target, {})
            self.assertEqual(dist_info, "trop_ports-%s.dist-info" % trop.__version__)
            written = {}
            for top, _dirs, files in os.walk(target):
                for file_name in files:
                    full = os.path.join(top, file_name)
                    written[os.path.relpath(full, target).replace(os.sep, "/")] = self.read(full)
            self.assertEqual(written, wheel, hook)

    def test_build_editable(self):
        name = self.backend.build_editable(self.out, {}, None)
        with zipfile.ZipFile(os.path.join(self.out, name)) as zf:
            pth = [n for n in zf.namelist() if n.endswith(".pth")]
            self.assertEqual(len(pth), 1)
            self.assertNotIn("/", pth[0])
            text = zf.read(pth[0]).decode("utf-8")
        self.assertEqual(os.path.realpath(text.strip()), os.path.realpath(TROP_DIR))   # not the cwd
        self.assertTrue(text.endswith("\n"))
        contents = self.check_wheel(os.path.join(self.out, name), {pth[0]: text.encode("utf-8")})
        self.assertNotIn("trop.py", contents)

    def test_build_sdist_then_a_wheel_from_it(self):
        before = self.source_listing()
        name = self.backend.build_sdist(self.out)
        base = "trop_ports-%s" % trop.__version__
        self.assertEqual(name, base + ".tar.gz")
        path = os.path.join(self.out, name)
        again = self.mkdir("dist2")
        self.assertEqual(self.backend.build_sdist(again, {}), name)                   # PEP 517 signature
        self.assertEqual(self.read(os.path.join(again, name)), self.read(path), "the sdist is not reproducible")
        shipped = ("trop.py", "test_trop.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE",
                   "tools/build_backend.py")
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            self.assertEqual(sorted(members), sorted(base + "/" + n for n in shipped + ("PKG-INFO",)))
            for member in members.values():
                self.assertTrue(member.isfile(), member.name)
                self.assertEqual((member.mtime, member.mode, member.uid, member.gid), (1577836800, 0o644, 0, 0))
            for copied in shipped:
                self.assertEqual(tar.extractfile(members[base + "/" + copied]).read(),
                                 self.source(copied), copied)
            pkg_info = tar.extractfile(members[base + "/PKG-INFO"]).read().decode("utf-8")
            unpacked = self.mkdir("unpacked")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpacked, filter="data")
            else:
                tar.extractall(unpacked)
        self.check_metadata(pkg_info)
        self.assertEqual(self.source_listing(), before, "building wrote into the source tree")
        # the sdist's own backend builds the same wheel, from the unpacked sdist (the cwd is elsewhere)
        from_sdist = load_backend(os.path.join(unpacked, base, "tools", "build_backend.py"))
        self.assertEqual(os.path.realpath(from_sdist.ROOT), os.path.realpath(os.path.join(unpacked, base)))
        rebuilt = self.mkdir("rebuilt")
        wheel = from_sdist.build_wheel(rebuilt)
        contents = self.check_wheel(os.path.join(rebuilt, wheel), {"trop.py": self.source("trop.py")})
        self.assertEqual(contents["trop_ports-%s.dist-info/METADATA" % trop.__version__].decode("utf-8"), pkg_info)
        self.assertEqual(self.read(os.path.join(rebuilt, wheel)),
                         self.read(os.path.join(self.out, self.backend.build_wheel(self.out))))

    def test_the_backend_reads_its_own_tree_and_refuses_what_it_cannot_emit(self):
        tree = self.mkdir("copy")
        for name in ("setup.cfg", "README.md", "LICENSE", "pyproject.toml"):
            shutil.copy(os.path.join(TROP_DIR, name), tree)
        os.mkdir(os.path.join(tree, "tools"))
        shutil.copy(BACKEND_FILE, os.path.join(tree, "tools"))
        source = self.source("trop.py").decode("utf-8")
        self.write(os.path.join(tree, "trop.py"), re.sub(r'(?m)^__version__ = "[^"]*"$', '__version__ = "9.8.7"',
                                                         source, count=1))
        copy_backend = load_backend(os.path.join(tree, "tools", "build_backend.py"))
        self.assertEqual(copy_backend.build_wheel(self.out), "trop_ports-9.8.7-py3-none-any.whl")   # not imported
        setup_cfg = self.source("setup.cfg").decode("utf-8")
        for section, line, named in (("[metadata]", "author = someone", "author"),
                                     ("[options]", "install_requires = pytest", "install_requires"),
                                     ("[options.extras_require]", "test = pytest", "options.extras_require")):
            self.assertEqual(section in setup_cfg, not named.startswith("options."))
            text = (setup_cfg.replace(section + "\n", section + "\n" + line + "\n", 1) if section in setup_cfg
                    else setup_cfg + "\n" + section + "\n" + line + "\n")
            self.write(os.path.join(tree, "setup.cfg"), text)
            for hook in (copy_backend.build_wheel, copy_backend.build_sdist, copy_backend.build_editable):
                with self.assertRaisesRegex(copy_backend.BuildError, r"\b%s\b.*not supported" % re.escape(named)):
                    hook(self.mkdir("refused"))

    def test_pip_wheel_without_build_isolation_from_another_cwd(self):
        self.needs_pip(sys.executable, (20, 0), "backend-path")
        before = self.source_listing()
        wheels = self.mkdir("pip-wheels")
        rc, out, err = self.execute([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                     "--no-index", "--disable-pip-version-check", "-q", "-w", wheels, TROP_DIR],
                                    cwd=self.proj, timeout=300)
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.source_listing(), before, "pip wheel wrote into the source tree")
        (name,) = os.listdir(wheels)
        self.check_wheel(os.path.join(wheels, name), {"trop.py": self.source("trop.py")})
        self.assertEqual(self.read(os.path.join(wheels, name)),
                         self.read(os.path.join(self.out, self.backend.build_wheel(self.out))))

    def test_pip_install_into_a_venv_gives_the_console_script(self):
        bin_dir = self.venv()
        python = os.path.join(bin_dir, "python")
        self.needs_pip(python, (20, 0), "backend-path")
        before = self.source_listing()
        rc, out, err = self.execute([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                                     "-q", TROP_DIR], timeout=300)            # with build isolation: requires = []
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.source_listing(), before, "pip install wrote into the source tree")
        code = ("import sys, trop\n"
                "from importlib import metadata\n"
                "eps = metadata.entry_points()\n"
                "sel = (lambda g: eps.select(group=g)) if hasattr(eps, 'select') else (lambda g: eps.get(g, []))\n"
                "print(trop.__file__.startswith(sys.prefix), metadata.version('trop-ports'))\n"
                "print(sorted((e.name, e.value) for e in sel('console_scripts') if e.name == 'trop'))\n"
                "print(sorted((e.name, e.value) for e in sel('pytest11') if e.value == 'trop'))\n"
                "print(metadata.metadata('trop-ports').get_all('Classifier'))\n")
        if sys.version_info < (3, 8):       # no importlib.metadata: read the installed dist-info itself
            code = ("import configparser, email, glob, os, sys, trop\n"
                    "d, = glob.glob(os.path.join(os.path.dirname(trop.__file__), 'trop_ports-*.dist-info'))\n"
                    "with open(os.path.join(d, 'METADATA'), encoding='utf-8') as fh:\n"
                    "    meta = email.message_from_file(fh)\n"
                    "eps = configparser.ConfigParser(delimiters=('=',), interpolation=None)\n"
                    "eps.optionxform = str\n"
                    "eps.read(os.path.join(d, 'entry_points.txt'), encoding='utf-8')\n"
                    "print(trop.__file__.startswith(sys.prefix), meta['Version'])\n"
                    "print(sorted((k, v) for k, v in eps.items('console_scripts') if k == 'trop'))\n"
                    "print(sorted((k, v) for k, v in eps.items('pytest11') if v == 'trop'))\n"
                    "print(meta.get_all('Classifier'))\n")
        rc, out, err = self.execute([python, "-c", code])
        self.assertEqual((rc, err), (0, ""))
        classifiers = setup_cfg_lines(self.setup_cfg()["metadata"]["classifiers"])
        self.assertEqual(out.splitlines(), ["True %s" % trop.__version__, "[('trop', 'trop:main')]",
                                            "[('trop', 'trop')]", repr(classifiers)])
        self.check_console_script(bin_dir)

    def test_pip_editable_install_into_a_venv(self):
        bin_dir = self.venv()
        python = os.path.join(bin_dir, "python")
        self.needs_pip(python, (21, 3), "PEP 660 editable installs")
        before = self.source_listing()
        rc, out, err = self.execute([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                                     "-q", "-e", TROP_DIR], timeout=300)
        self.assertEqual(rc, 0, out + err)
        self.assertEqual(self.source_listing(), before, "pip install -e wrote into the source tree")
        rc, out, err = self.execute([python, "-c", "import os, trop; print(os.path.realpath(trop.__file__))"])
        self.assertEqual((rc, out, err), (0, os.path.realpath(os.path.join(TROP_DIR, "trop.py")) + "\n", ""))
        self.check_console_script(bin_dir)

    def test_zipapp(self):
        src = self.mkdir("pyz")
        shutil.copy(os.path.join(TROP_DIR, "trop.py"), src)
        pyz = os.path.join(self.root, "trop.pyz")
        rc, out, err = self.execute([sys.executable, "-m", "zipapp", src, "-m", "trop:cli", "-o", pyz])
        self.assertEqual(rc, 0, out + err)
        os.remove(os.path.join(src, "trop.py"))                  # only the archive can provide trop now
        data = os.path.join(self.root, "pyz-data")
        target = self.mkdir("somewhere")

        def pyz_run(*args):
            return self.execute([sys.executable, pyz] + list(args))
        self.assertEqual(pyz_run("--version"), (0, "trop %s\n" % trop.__version__, ""))
        self.assertEqual(pyz_run("--data-dir", data, "reserve", "--path", target, "--allow-unrelated-path",
                                 "--skip-occupancy-check"), (0, "5000\n", ""))
        self.assertEqual(pyz_run("--data-dir", data, "assert-port", "5000")[0], 0)
        for args, status in ((("assert-port", "1"), 1), (("reserve", "--port", "0", "--path", target,
                                                           "--allow-unrelated-path"), 4),
                             (("reserve", "--path", target, "--disable-autoinit", "--data-dir",
                               os.path.join(self.root, "none")), 3)):
            rc, out, err = pyz_run("--data-dir", data, *args)
            self.assertEqual((rc, out), (status, ""), err)
            self.assertTrue(err.startswith("Error: ") and err.count("\n") == 1, err)
        rc, out, err = pyz_run("--data-dir", data, "no-such-command")
        self.assertEqual((rc, out), (2, ""))


# --- Shell completions -------------------------------------------------------

class TestCompletionScripts(unittest.TestCase):
    NASTY = "Data dir: it's `$HOME/.trop` \"quoted\" [x] \\ back $(rm -rf /)"
    SUBCOMMANDS = ["reserve", "list", "completions", "validate"]
    FLAGS = ["--verbose", "--data-dir", "--path", "--tag", "--dry-run", "--format"]

    @classmethod
    def sample_parser(cls):
        p = argparse.ArgumentParser(prog="trop")
        p.add_argument("-v", "--verbose", action="store_true", help="Enable verbose output")
        p.add_argument("--data-dir", metavar="PATH", help=cls.NASTY)
        p.add_argument("--hidden-opt", help=argparse.SUPPRESS)
        sp = p.add_subparsers(dest="command")
        r = sp.add_parser("reserve", help="Reserve a port [it's: 'x' $y `z`]")
        r.add_argument("--path", help="Directory path")
        r.add_argument("--tag", help="Tag: label")
        r.add_argument("--dry-run", action="store_true", help="Don't write")
        ls = sp.add_parser("list", help="List reservations")
        ls.add_argument("--format", choices=["table", "json", "csv", "tsv"], default="table",
                        help="Output format (default: %(default)s)")
        c = sp.add_parser("completions", help="Print a completion script")
        c.add_argument("shell", choices=list(trop.COMPLETION_SHELLS))
        v = sp.add_parser("validate", help="Validate a config file")
        v.add_argument("config_path")
        sp.add_parser("secret", help=argparse.SUPPRESS)
        return p

    def test_shells(self):
        self.assertEqual(tuple(trop.COMPLETION_SHELLS), ("bash", "elvish", "fish", "powershell", "zsh"))

    def test_bash_header(self):
        self.assertEqual(trop.completion_header("bash"), (
            "# Generating bash completion script\n"
            "# Run the following command to enable completions:\n"
            "#   trop completions bash > ~/.local/share/bash-completion/completions/trop\n"
            "# Or source it directly in ~/.bashrc:\n"
            '#   eval "$(trop completions bash)"\n\n'))

    def test_elvish_has_no_hints(self):
        self.assertEqual(trop.completion_header("elvish"),
                         "# Generating elvish completion script\n"
                         "# Run the following command to enable completions:\n\n")

    def test_every_shell_header_shape(self):
        for shell in trop.COMPLETION_SHELLS:
            h = trop.completion_header(shell)
            self.assertTrue(h.startswith("# Generating %s completion script\n"
                                         "# Run the following command to enable completions:\n" % shell))
            self.assertTrue(h.endswith("\n\n"))
            self.assertTrue(all(line.startswith("#") for line in h.splitlines() if line))

    def test_all_names_present_and_hidden_skipped(self):
        for shell in trop.COMPLETION_SHELLS:
            text = trop.completion_script(self.sample_parser(), shell)
            with self.subTest(shell=shell):
                for word in self.SUBCOMMANDS + self.FLAGS:
                    self.assertIn("-l " + word[2:] if shell == "fish" and word.startswith("--") else word, text)
                for word in ("table", "tsv", "powershell", "elvish"):
                    self.assertIn(word, text)
                self.assertNotIn("hidden-opt", text)
                self.assertNotIn("secret", text)

    def test_real_parser_names_present(self):
        for shell in trop.COMPLETION_SHELLS:
            text = trop.completion_script(trop.build_parser(), shell)
            with self.subTest(shell=shell):
                for word in ("reserve", "scan", "port-info", "list-projects", "compact-exclusions"):
                    self.assertIn(word, text)
                for flag in ("--include-occupancy", "--check-all-interfaces", "--autoexclude", "--data-dir"):
                    self.assertIn("-l " + flag[2:] if shell == "fish" else flag, text)

    def test_markers(self):
        markers = {"bash": "complete -F _trop trop", "zsh": "#compdef trop",
                   "fish": "__trop_using_subcommand reserve",
                   "powershell": "Register-ArgumentCompleter -Native -CommandName 'trop'",
                   "elvish": "set edit:completion:arg-completer['trop'] = {|@words|"}
        for shell, marker in markers.items():
            text = trop.completion_script(self.sample_parser(), shell)
            self.assertIn(marker.replace("trop trop", "trop 'trop'"), text)

    def test_unknown_shell(self):
        with self.assertRaises(ValueError):
            trop.completion_script(self.sample_parser(), "tcsh")

    def test_unsafe_choices_dropped_and_huge_choices_not_enumerated(self):
        p = argparse.ArgumentParser(prog="trop")
        x = p.add_subparsers().add_parser("x")
        x.add_argument("--mode", choices=["ok", "$(evil)", "a b"])
        x.add_argument("--port", type=int, choices=range(1, 65536))
        for shell in trop.COMPLETION_SHELLS:
            text = trop.completion_script(p, shell)
            self.assertNotIn("evil", text)
            self.assertNotIn("65535", text)
            self.assertIn("ok", text)

    def test_zsh_escapes_help(self):
        text = trop.completion_script(self.sample_parser(), "zsh")
        self.assertIn(r"""[Data dir\: it'\''s `$HOME/.trop` "quoted" \[x\] \\ back""", text)

    def test_powershell_structure_balanced(self):
        for parser in (self.sample_parser(), trop.build_parser()):
            text = trop.completion_script(parser, "powershell")
            body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
            stripped = re.sub(r"'(?:[^']|'')*'", "''", body)
            self.assertNotIn("'", stripped.replace("''", ""))
            for o, c in ("()", "{}", "[]"):
                self.assertEqual(stripped.count(o), stripped.count(c), o + c)
        self.assertIn("it''s", trop.completion_script(self.sample_parser(), "powershell"))

    def test_edge_parsers_parse(self):
        a = argparse.ArgumentParser(prog="my-tool", add_help=False)
        a.add_argument("-q", action="count")
        a.add_argument("target", nargs="*")
        b = argparse.ArgumentParser(prog="my-tool", add_help=False)
        b.add_subparsers().add_parser("bare", add_help=False)
        checkers = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-config", "-n"]}
        for i, parser in enumerate((a, b)):
            for shell, argv in checkers.items():
                if not shutil.which(argv[0]):
                    continue
                with self.subTest(parser=i, shell=shell):
                    path = script_file(self, trop.completion_script(parser, shell, prog="my-tool"))
                    res = run_shell(argv + [path])
                    self.assertEqual(res.returncode, 0, res.stderr)


def run_in_pty(test, argv, keys, ready, env=None, cwd=None):
    """Run argv on a new pseudo-terminal, type `keys` once it has printed `ready`, and return (exit status,
    everything it printed).  `ready` belongs in the prompt: a line editor prints it once it has put the
    terminal in raw mode, and keys typed earlier meet the line discipline instead (which eats a ^D).  A
    program silent for 60 s fails the test: a guard against hangs, not a timing."""
    import pty
    import select
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                close_fds=True, start_new_session=True)
    finally:
        os.close(slave)
    out, pending = b"", keys
    try:
        while True:
            if not select.select([master], [], [], 60)[0]:
                test.fail("%s printed nothing for 60 s; it printed: %r" % (argv[0], out[-2000:]))
            try:
                data = os.read(master, 65536)
            except OSError:         # EIO: no process holds the terminal any more
                break
            if not data:
                break
            out += data
            if pending and ready in out:
                os.write(master, pending)
                pending = b""
        return proc.wait(60), out.decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# What the real parser must complete in every shell: (command line, every candidate, sorted).  The cursor
# is at the end of the line; completing at a new word leaves a trailing space.
REAL_COMPLETIONS = [
    ("trop res", ["reserve", "reserve-group"]),
    ("trop reserve --sk", ["--skip-ipv4", "--skip-ipv6", "--skip-occupancy-check", "--skip-tcp", "--skip-udp"]),
    ("trop list --format ", ["csv", "json", "table", "tsv"]),
    ("trop --data-dir /tmp sc", ["scan"]),
    ("trop --busy-timeout 3 list --fo", ["--format"]),
    ("trop completions ", sorted(trop.COMPLETION_SHELLS)),
    ("trop port-info --incl", ["--include-occupancy"]),
    ("trop reserve --ver", ["--verbose"]),          # --version is trop's option, not reserve's
]

# zsh -f ZCAPTURE SETUP LINE...: for each LINE, a fresh interactive zsh on a zpty sources SETUP (which
# loads compinit and the script under test, and wraps compadd), is typed LINE and a TAB, and every word
# its completion system adds is printed; "@@DONE@@" ends each LINE's words.
ZSH_CAPTURE = r"""
zmodload zsh/zpty || exit 3
local setup=$1 line out
shift
for line in "$@"; do
  zpty z zsh -f -i || exit 4
  zpty -w z "source ${(q)setup}"
  zpty -n -w z "$line"$'\t'
  out=
  zpty -r -m z out '*@@END@@*' || { print -r -- "no completion ran: $out"; exit 5 }
  zpty -d z
  for line in ${(f)out//$'\r'/}; do
    [[ $line == *@@HIT@@* ]] && print -r -- ${line##*@@HIT@@}
  done
  print -r -- @@DONE@@
done
"""

ZSH_SETUP = r"""
PS1= PROMPT= RPROMPT=
%s
autoload -U compinit && compinit -u -d %s
bindkey '^I' complete-word
%s
compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
  local -a hits
  builtin compadd -O hits "$@"
  (( $#hits )) && print -rl -- @@HIT@@${^hits}
  builtin compadd "$@"
}
__capture_end() { print -r -- @@END@@; exit }
comppostfuncs=(__capture_end)
"""


@unittest.skipUnless(shutil.which("bash"), "bash not installed")
class TestBashCompletion(TropTestCase):
    """The real `trop completions bash` output, plus the sample parser's edge cases."""

    def setUp(self):
        super().setUp()
        rc, out, err = self.trop("completions", "bash")
        self.assertEqual((rc, err), (0, trop.completion_header("bash")))
        self.real = script_file(self, out, ".bash")
        self.sample = script_file(self, trop.completion_script(TestCompletionScripts.sample_parser(), "bash"), ".bash")

    def complete(self, line, script=None):
        words = line.split(" ")
        cmd = ("source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _trop; printf '%%s\\n' \"${COMPREPLY[@]}\""
               % (shlex.quote(script or self.real), " ".join(shlex.quote(w) for w in words), len(words) - 1))
        res = run_shell(["bash", "-c", cmd])
        self.assertEqual(res.returncode, 0, res.stderr)
        return [w for w in res.stdout.splitlines() if w]

    def test_syntax(self):
        for path in (self.real, self.sample):
            res = run_shell(["bash", "-n", path])
            self.assertEqual(res.returncode, 0, res.stderr)

    def test_real_completion(self):
        for line, expected in REAL_COMPLETIONS:
            with self.subTest(line=line):
                self.assertEqual(sorted(self.complete(line)), expected)
        self.assertIn("--tag", self.complete("trop reserve --t"))
        self.assertIn("list", self.complete("trop li"))
        self.assertEqual(sorted(self.complete("trop scan --format ")), ["csv", "json", "table", "tsv"])
        self.assertIn("--check-all-interfaces", self.complete("trop scan --check"))
        self.assertEqual(self.complete("trop list --format = j"), ["json"])
        after = self.complete("trop reserve -")
        self.assertIn("--data-dir", after)
        self.assertNotIn("--version", after)            # argparse takes only reserve's options there
        self.assertNotIn("-V", after)
        self.assertIn("--version", self.complete("trop -"))

    def test_sample_completion(self):
        s = self.sample
        self.assertIn("--tag", self.complete("trop reserve --t", s))
        self.assertNotIn("--format", self.complete("trop reserve --", s))
        self.assertNotIn("--verbose", self.complete("trop reserve --", s))     # `trop reserve --verbose` is an error
        self.assertIn("--verbose", self.complete("trop --", s))
        self.assertEqual(self.complete("trop li", s), ["list"])
        self.assertEqual(self.complete("trop --data-dir /tmp li", s), ["list"])
        self.assertEqual(self.complete("trop --data-dir = /tmp li", s), ["list"])
        self.assertEqual(sorted(self.complete("trop list --format ", s)), ["csv", "json", "table", "tsv"])
        self.assertEqual(self.complete("trop list --format = j", s), ["json"])
        self.assertEqual(self.complete("trop completions b", s), ["bash"])

    def test_path_values_complete_files(self):
        d = self.root
        os.mkdir(os.path.join(d, "subdir"))
        open(os.path.join(d, "file.yaml"), "w").close()
        s = self.sample
        self.assertEqual(self.complete("trop reserve --path %s/fi" % d, s), [d + "/file.yaml"])
        self.assertEqual(self.complete("trop validate %s/fi" % d, s), [d + "/file.yaml"])
        self.assertEqual(self.complete("trop --data-dir %s/s" % d, s), [d + "/subdir"])
        self.assertEqual(self.complete("trop reserve --tag x", s), [])

    def test_readline_completion(self):
        """Typed into an interactive bash: `complete -F`, readline's word splitting and insertion."""
        os.mkdir(self.path("subdir"))
        open(self.path("sfile"), "w").close()
        out = self.path("lines")
        rcfile = script_file(self, "\n".join([
            "PS1='@@READY@@ '",
            "source %s" % shlex.quote(self.real),
            "capture() { printf '%%s\\n' \"$READLINE_LINE\" >> %s; READLINE_LINE=; READLINE_POINT=0; }"
            % shlex.quote(out),
            "bind -x '\"\\C-y\": capture'", ""]), ".bash")
        typed = ["trop reserve --skip-o", "trop list --format=j", "trop --data-dir /tmp sc", "trop res",
                 "trop completions fi", "trop --data-dir %s/s" % self.root]
        keys = "".join(line + "\t\x19" for line in typed) + "\x04"
        rc, screen = run_in_pty(self, ["bash", "--noprofile", "--rcfile", rcfile, "-i"], keys.encode(),
                                b"@@READY@@", env=dict(self.env, TERM="xterm"), cwd=self.proj)
        self.assertEqual(rc, 0, screen)
        with open(out) as fh:
            self.assertEqual(fh.read().splitlines(), [
                "trop reserve --skip-occupancy-check ", "trop list --format=json ", "trop --data-dir /tmp scan ",
                "trop reserve", "trop completions fish ", "trop --data-dir %s/subdir/" % self.root])


class TestCompletionsCLI(TropTestCase):
    """`trop completions SHELL`, and its script loaded into each real shell that is installed and asked to
    complete (the shells that are missing skip)."""

    def shell_env(self, **values):
        return dict(self.env, TERM="xterm", XDG_CONFIG_HOME=self.path("home", ".config"),
                    XDG_DATA_HOME=self.path("home", ".local", "share"), XDG_STATE_HOME=self.path("home", ".local", "state"),
                    XDG_CACHE_HOME=self.path("home", ".cache"), **values)

    def script(self, shell, suffix=""):
        rc, out, err = self.trop("completions", shell)
        self.assertEqual((rc, err), (0, trop.completion_header(shell)))
        return script_file(self, out, suffix)

    def files_tree(self):
        """root/tree with a directory and two files; returns its path."""
        tree = self.mkdir("tree")
        os.mkdir(os.path.join(tree, "subdir"))
        for name in ("file.yaml", "sfile"):
            open(os.path.join(tree, name), "w").close()
        return tree

    def test_every_shell(self):
        for shell in trop.COMPLETION_SHELLS:
            with self.subTest(shell=shell):
                rc, out, err = self.trop("completions", shell)
                self.assertEqual((rc, err), (0, trop.completion_header(shell)))
                self.assertEqual(out, trop.completion_script(trop.build_parser(), shell).rstrip("\n") + "\n")

    def test_unknown_shell_usage_error(self):
        rc, out, err = self.trop("completions", "tcsh")
        self.assertEqual((rc, out), (2, ""))
        self.assertIn("usage:", err)

    # -- zsh -------------------------------------------------------------------
    def zsh_complete(self, lines, load):
        """{line: the words zsh's completion system offers for line<TAB>}; `load` loads the script."""
        dump = script_file(self, "", ".zcompdump")      # compinit's cache: written once, then read per line
        setup = script_file(self, ZSH_SETUP % (load if load.startswith("fpath") else "", shlex.quote(dump),
                                               "" if load.startswith("fpath") else load), ".zsh")
        capture = script_file(self, ZSH_CAPTURE, ".zsh")
        res = run_shell(["zsh", "-f", capture, setup] + list(lines), env=self.shell_env(), cwd=self.proj)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        blocks = res.stdout.split("@@DONE@@\n")
        self.assertEqual(len(blocks), len(lines) + 1, res.stdout)
        # a word offered under two tags (directories and all files) is listed once
        return dict(zip(lines, (list(collections.OrderedDict.fromkeys(w for w in b.splitlines() if w))
                                for b in blocks)))

    @unittest.skipUnless(shutil.which("zsh"), "zsh not installed")
    def test_zsh_script_loads(self):
        path = self.script("zsh")
        res = run_shell(["zsh", "-n", path])
        self.assertEqual(res.returncode, 0, res.stderr)
        res = run_shell(["zsh", "-fc", "autoload -U compinit; compinit -u -D; "
                         "source %s; print -r -- ${_comps[trop]}" % shlex.quote(path)], env=self.shell_env())
        self.assertEqual((res.returncode, res.stdout.strip()), (0, "_trop"), res.stderr)
        sample = script_file(self, trop.completion_script(TestCompletionScripts.sample_parser(), "zsh"))
        res = run_shell(["zsh", "-fc", "_arguments() { print -rl -- \"$@\" }; compdef() { : }; "
                         "_describe() { print -rl -- \"${(@P)4}\" }; "
                         "source %s; _trop; _trop_commands" % shlex.quote(sample)])
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("--data-dir=[Data dir\\: it's `$HOME/.trop` \"quoted\" \\[x\\] \\\\ back $(rm -rf /)]:PATH:"
                      "_files -/", res.stdout.splitlines())
        self.assertIn("reserve:Reserve a port [it's: 'x' $y `z`]", res.stdout.splitlines())

    def check_real_completions(self, got):
        """What every shell must answer: REAL_COMPLETIONS, and globals before the command only."""
        for line, expected in REAL_COMPLETIONS:
            with self.subTest(line=line):
                self.assertEqual(sorted(got[line]), expected)
        self.assertIn("--data-dir", got["trop reserve --"])
        self.assertNotIn("--version", got["trop reserve --"])
        self.assertIn("--version", got["trop -"])

    @unittest.skipUnless(shutil.which("zsh"), "zsh not installed")
    def test_zsh_completes(self):
        """Typed into zsh on a zpty, the script sourced as `eval "$(trop completions zsh)"` does."""
        tree = self.files_tree()
        path = self.script("zsh")
        lines = [l for l, _ in REAL_COMPLETIONS] + [
            "trop list --format=j", "trop reserve --", "trop -", "trop validate %s/" % tree,
            "trop --data-dir %s/" % tree, "trop reserve --path %s/fi" % tree]
        got = self.zsh_complete(lines, "source %s" % shlex.quote(path))
        self.check_real_completions(got)
        self.assertEqual(got["trop list --format=j"], ["json"])
        self.assertEqual(sorted(got["trop validate %s/" % tree]), ["file.yaml", "sfile", "subdir"])
        self.assertEqual(got["trop --data-dir %s/" % tree], ["subdir"])
        self.assertEqual(got["trop reserve --path %s/fi" % tree], ["file.yaml"])
        sample = script_file(self, trop.completion_script(TestCompletionScripts.sample_parser(), "zsh"))
        got = self.zsh_complete(["trop --data", "trop res", "trop reserve --t"], "source %s" % shlex.quote(sample))
        self.assertEqual(got, {"trop --data": ["--data-dir"], "trop res": ["reserve"], "trop reserve --t": ["--tag"]})

    @unittest.skipUnless(shutil.which("zsh"), "zsh not installed")
    def test_zsh_completes_from_fpath(self):
        """Installed as _trop in a directory of $fpath, found by compinit through its #compdef line."""
        funcs = self.mkdir("zfunc")
        _rc, out, _err = self.trop("completions", "zsh")
        with open(os.path.join(funcs, "_trop"), "w") as fh:
            fh.write(out)
        got = self.zsh_complete(["trop res", "trop list --format "], "fpath=(%s $fpath)" % shlex.quote(funcs))
        self.assertEqual(got, {"trop res": ["reserve", "reserve-group"],
                               "trop list --format ": ["table", "json", "csv", "tsv"]})

    # -- fish ------------------------------------------------------------------
    def fish_complete(self, script, lines):
        """{line: the words `complete -C line` offers}, the script sourced first."""
        body = ["source %s" % shlex.quote(script)]
        body += ["complete -C %s; echo @@DONE@@" % shlex.quote(line) for line in lines]
        res = run_shell(["fish", "--no-config", script_file(self, "\n".join(body) + "\n", ".fish")],
                        env=self.shell_env(), cwd=self.proj)
        self.assertEqual(res.returncode, 0, res.stderr)
        blocks = res.stdout.split("@@DONE@@\n")
        self.assertEqual(len(blocks), len(lines) + 1, res.stdout)
        return dict(zip(lines, ([w.split("\t")[0] for w in b.splitlines() if w] for b in blocks)))

    @unittest.skipUnless(shutil.which("fish"), "fish not installed")
    def test_fish(self):
        tree = self.files_tree()
        path = self.script("fish", ".fish")
        res = run_shell(["fish", "--no-config", "-n", path])
        self.assertEqual(res.returncode, 0, res.stderr)
        lines = [l for l, _ in REAL_COMPLETIONS] + [
            "trop list --format=j", "trop reserve --", "trop -", "trop --data-dir /tmp ", "trop --data-dir=/tmp sc",
            "trop validate %s/" % tree, "trop --data-dir %s/" % tree, "trop reserve --path %s/fi" % tree,
            "trop reserve --tag "]
        got = self.fish_complete(path, lines)
        self.check_real_completions(got)
        self.assertEqual(got["trop list --format=j"], ["--format=json"])
        # the value of --data-dir is not the subcommand, whichever way it is written
        self.assertIn("reserve", got["trop --data-dir /tmp "])
        self.assertEqual(got["trop --data-dir=/tmp sc"], ["scan"])
        self.assertEqual(sorted(got["trop validate %s/" % tree]),
                         [tree + "/file.yaml", tree + "/sfile", tree + "/subdir/"])
        self.assertEqual(got["trop --data-dir %s/" % tree], [tree + "/subdir/"])
        self.assertEqual(got["trop reserve --path %s/fi" % tree], [tree + "/file.yaml"])
        self.assertEqual(got["trop reserve --tag "], [])
        sample = script_file(self, trop.completion_script(TestCompletionScripts.sample_parser(), "fish"), ".fish")
        got = self.fish_complete(sample, ["trop reserve --t", "trop li", "trop --data"])
        self.assertEqual(got["trop reserve --t"], ["--tag"])
        self.assertEqual(got["trop li"], ["list"])
        self.assertEqual(got["trop --data"], ["--data-dir"])
        res = run_shell(["fish", "--no-config", "-c", "source %s; complete -C'trop --data'" % shlex.quote(sample)],
                        env=self.shell_env())
        self.assertIn(TestCompletionScripts.NASTY.split(" $(")[0], res.stdout)

    # -- elvish ----------------------------------------------------------------
    @unittest.skipUnless(shutil.which("elvish"), "elvish not installed")
    def test_elvish(self):
        """An interactive elvish on a pseudo-terminal (the edit: module exists only there) evaluates the
        script as `eval (trop completions elvish | slurp)` does; its registered completer is asked for
        candidates, and lines typed with a TAB are completed by the editor itself."""
        tree = self.files_tree()
        path = self.script("elvish", ".elv")
        out, typed_out = self.path("candidates"), self.path("lines")
        queries = [l for l, _ in REAL_COMPLETIONS] + [
            "trop list --format=j", "trop reserve --", "trop -", "trop validate %s/fi" % tree,
            "trop reserve --path=%s/fi" % tree, "trop list --dry-run="]

        def words(line):
            return " ".join("'%s'" % w.replace("'", "''") for w in line.split(" "))
        rc = "\n".join([
            "use str",
            "var out = '%s'" % out,
            "try { eval (slurp < '%s') } catch e { echo 'LOAD FAILED' >> $out; show $e >> $out }" % path,
            "fn query {|@words|",
            "    var cur = $words[-1]",
            "    put [($edit:completion:arg-completer[trop] $@words | each {|c|",
            "        if (eq (kind-of $c) string) { put $c } else { put $c[stem] }",
            "    } | each {|s| if (str:has-prefix $s $cur) { put $s } })]",
            "}",
            "fn record {|@words|",
            "    try { query $@words | to-json >> $out } catch e { echo 'FAILED' >> $out; show $e >> $out }",
            "}",
        ] + ["record %s" % words(q) for q in queries] + [
            "fn capture {",
            "    echo $edit:current-command >> '%s'" % typed_out,
            "    set edit:current-command = ''",
            "}",
            "set edit:insert:binding[Ctrl-Y] = $capture~",
            # a TAB that opened the menu instead of inserting: record the line as it is, never hang
            "set edit:completion:binding[Ctrl-Y] = { edit:completion:close; capture }",
            "set edit:prompt = { put '@@READY@@ ' }",
            "set edit:rprompt = { }", ""])
        typed = ["trop reserve --skip-o", "trop list --format j", "trop --data-dir /tmp sc", "trop completions fi",
                 "trop validate %s/fi" % tree]
        keys = "".join(line + "\t\x19" for line in typed) + "\x04"
        status, screen = run_in_pty(self, ["elvish", "-rc", script_file(self, rc, ".elv")], keys.encode(),
                                    b"@@READY@@", env=self.shell_env(), cwd=self.proj)
        self.assertEqual(status, 0, screen)
        with open(out) as fh:
            text = fh.read()
        self.assertNotIn("FAILED", text)
        got = dict(zip(queries, (json.loads(l) for l in text.splitlines())))
        self.check_real_completions(got)
        self.assertEqual(got["trop list --format=j"], ["--format=json"])
        self.assertEqual(got["trop validate %s/fi" % tree], [tree + "/file.yaml"])
        self.assertEqual(got["trop reserve --path=%s/fi" % tree], ["--path=%s/file.yaml" % tree])
        self.assertEqual(got["trop list --dry-run="], [])
        with open(typed_out) as fh:
            self.assertEqual(fh.read().splitlines(), [
                "trop reserve --skip-occupancy-check", "trop list --format json", "trop --data-dir /tmp scan",
                "trop completions fish", "trop validate %s/file.yaml " % tree])

    # -- PowerShell --------------------------------------------------------------
    @unittest.skipUnless(shutil.which("pwsh"), "pwsh (PowerShell 7) not installed")
    def test_powershell(self):
        """TabExpansion2 asks the registered native completer, as a TAB at the end of the line does."""
        path = self.script("powershell", ".ps1")
        bindir = self.mkdir("bin")                  # a native command named trop, for -Native to apply
        with open(os.path.join(bindir, "trop"), "w") as fh:
            fh.write("#!/bin/sh\n")
        os.chmod(os.path.join(bindir, "trop"), 0o755)
        lines = [l for l, _ in REAL_COMPLETIONS] + ["trop reserve --", "trop -"]
        ps = ["$ErrorActionPreference = 'Stop'", ". '%s'" % path]
        for line in lines:
            ps.append("(TabExpansion2 -inputScript '%s' -cursorColumn %d).CompletionMatches | "
                      "ForEach-Object { $_.CompletionText }" % (line, len(line)))
            ps.append("'@@DONE@@'")
        res = run_shell(["pwsh", "-NoProfile", "-NonInteractive", "-File", script_file(self, "\n".join(ps), ".ps1")],
                        env=self.shell_env(PATH=bindir + os.pathsep + self.env.get("PATH", "")), cwd=self.proj)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        blocks = res.stdout.split("@@DONE@@")
        self.assertEqual(len(blocks), len(lines) + 1, res.stdout)
        got = dict(zip(lines, (b.split() for b in blocks)))
        self.check_real_completions(got)


# --- Command line ------------------------------------------------------------

class TestCommandLineBasics(TropTestCase):
    ENV = SKIP_PROBES

    def test_version(self):
        self.assertEqual(self.trop("--version"), (0, "trop 0.2.0\n", ""))

    def test_no_subcommand_is_a_usage_error(self):
        rc, out, err = self.trop()
        self.assertEqual((rc, out), (2, ""))
        self.assertIn("usage", err.lower())

    def test_unknown_flag_is_a_usage_error(self):
        rc, out, _err = self.trop("reserve", "--bogus")
        self.assertEqual((rc, out), (2, ""))
        self.assertFalse(os.path.exists(self.data))


class TestReserveCLI(TropTestCase):
    ENV = SKIP_PROBES

    def test_reserve_prints_port_and_is_stable(self):
        self.assertPort(self.trop("reserve"), 5000)
        self.assertPort(self.trop("reserve"), 5000)
        self.assertPort(self.trop("reserve", "--tag", "web"), 5001)
        self.assertPort(self.trop("reserve", "--tag", "  web "), 5001)
        self.assertPort(self.trop("reserve", "--path", "sub"), 5002, ["directory %s/sub does not exist" % self.proj])
        rows = self.rows()
        self.assertEqual([r[:5] for r in rows], [(self.proj, "", 5000, None, None),
                                                 (self.proj, "web", 5001, None, None),
                                                 (self.proj + "/sub", "", 5002, None, None)])
        now = int(time.time())
        for row in rows:
            self.assertTrue(now - 120 <= row[5] <= row[6] <= now + 1, row)

    def test_refresh_updates_last_used_only(self):
        make_v2_db(self.data, [(self.proj, "", 5004, "p", "t", T1, T1)])
        self.assertPort(self.trop("reserve", "--port", "5000"), 5004,       # --port ignored for existing keys, and said
                        ["%s already holds port 5004: the preferred port 5000 needs --overwrite" % self.proj])
        (row,) = self.rows()
        self.assertEqual(row[:6], (self.proj, "", 5004, "p", "t", T1))
        self.assertGreater(row[6], T1)

    def test_preferred_port(self):
        """A moved preference is said on stderr, with why and the port given instead; stdout is the port alone."""
        self.mkdir("proj", "b")
        self.mkdir("proj", "c")
        self.assertPort(self.trop("reserve", "--port", "5005"), 5005)
        self.assertPort(self.trop("reserve", "--path", "b", "--port", "5005"), 5000,
                        ["preferred port 5005 is reserved for %s; reserved 5000 instead" % self.proj])
        self.assertPort(self.trop("reserve", "--path", "c", "--port", "9000"), 5001,
                        ["preferred port 9000 is outside the range 5000-7000; reserved 5001 instead"])
        self.write("proj/trop.yaml", "excluded_ports: [5010]\n")
        self.mkdir("proj", "d")
        self.assertPort(self.trop("reserve", "--path", "d", "--port", "5010"), 5002,
                        ["preferred port 5010 is excluded; reserved 5002 instead"])
        self.assertPort(self.trop("reserve", "--path", "d", "--port", "5010", "--quiet"), 5002)

    def test_range_from_flags_and_environment(self):
        self.assertPort(self.trop("reserve", "--min", "20000", "--max", "20010"), 20000)
        self.mkdir("proj", "b")
        self.assertPort(self.trop("reserve", "--path", "b", env={"TROP_PORT_MIN": "21000", "TROP_PORT_MAX": "21010"}),
                        21000)

    def test_exhausted_range(self):
        self.assertPort(self.trop("reserve", "--min", "20000", "--max", "20000"), 20000)
        self.assertError(self.trop("reserve", "--path", "b", "--min", "20000", "--max", "20000",
                                   "--disable-autoclean"), 6, contains="port range 20000-20000 exhausted")

    def test_overwrite_moves_to_lowest_free_port_and_keeps_created_at(self):
        make_v2_db(self.data, [(self.proj + "/other", "", 5000, None, None, T1, T1),
                               (self.proj, "", 5003, "p", None, T1, T1)])
        self.assertPort(self.trop("reserve", "--overwrite"), 5001)
        self.assertPort(self.trop("reserve", "--overwrite", "--port", "5002"), 5002)
        self.assertPort(self.trop("reserve", "--overwrite", "--port", "5000"), 5001,   # held by another key
                        ["preferred port 5000 is reserved for %s/other; reserved 5001 instead" % self.proj])
        row = [r for r in self.rows() if r[0] == self.proj][0]
        self.assertEqual(row[:6], (self.proj, "", 5001, "p", None, T1))
        self.assertGreater(row[6], T1)

    def test_bad_ports(self):
        self.assertError(self.trop("reserve", "--port", "0"), 4,
                         contains="Invalid port number: port 0 is reserved and cannot be used")
        self.assertError(self.trop("reserve", "--port", "70000"), 4,
                         contains="Invalid port number: 70000 is greater than maximum port 65535")
        self.assertError(self.trop("reserve", "--port", "abc"), 4,
                         contains="Invalid port number: 'abc' is not a valid number")
        self.assertError(self.trop("reserve", "--min", "abc"), 4, startswith="Invalid arguments: invalid --min value: ",
                         contains="'abc' is not a valid number")
        self.assertError(self.trop("reserve", "--min", "8000"), 7, contains="must be >= min")
        self.assertFalse(os.path.exists(self.data))

    def test_bad_tag_project_task(self):
        for tag in ("", "   "):
            self.assertError(self.trop("reserve", "--tag", tag), 4,
                             "validation error for 'tag': tag must be non-empty after trimming whitespace")
        self.assertError(self.trop("reserve", "--project", ""), 7)
        self.assertError(self.trop("reserve", "--task", "  "), 7)
        rc, out, _ = self.trop("reserve", "--project", "a", "--clear-project")
        self.assertEqual((rc, out), (2, ""))
        self.assertFalse(os.path.exists(self.data))

    def test_bad_paths(self):
        self.assertError(self.trop("reserve", "--path", "~other/x"), 6,
                         contains="~user syntax is not supported; use ~ or ~/path")
        self.assertError(self.trop("reserve", "--path", "/../.."), 6,
                         contains="Path contains too many '..' components (escapes root)")
        self.assertFalse(os.path.exists(self.data))

    def test_sticky_project(self):
        self.assertPort(self.trop("reserve", "--project", "a"), 5000)
        self.assertError(self.trop("reserve", "--project", "b"), 1, startswith="cannot change sticky field 'project'")
        self.assertPort(self.trop("reserve", "--project", "b", "--allow-project-change"), 5000)
        self.assertPort(self.trop("reserve"), 5000)                                   # preserved
        self.assertError(self.trop("reserve", "--clear-project"), 1)
        self.assertError(self.trop("reserve", env={"TROP_PROJECT": "c"}), 1)
        self.assertPort(self.trop("reserve", env={"TROP_PROJECT": "c", "TROP_ALLOW_PROJECT_CHANGE": "1"}), 5000)
        self.assertEqual(self.rows()[0][3], "c")
        self.assertPort(self.trop("reserve", "--project", "d", "--force"), 5000)
        self.assertEqual(self.rows()[0][3], "d")
        self.assertPort(self.trop("reserve", "--clear-project", "--allow-change"), 5000)
        self.assertEqual(self.rows()[0][2:5], (5000, None, None))

    def test_sticky_task(self):
        self.assertPort(self.trop("reserve", "--task", "x"), 5000)
        self.assertError(self.trop("reserve", "--task", "y"), 1, startswith="cannot change sticky field 'task'")
        self.assertError(self.trop("reserve", env={"TROP_TASK": "y"}), 1)
        self.assertPort(self.trop("reserve", "--task", "y", "--allow-task-change"), 5000)
        self.assertPort(self.trop("reserve", env={"TROP_TASK": "z", "TROP_ALLOW_CHANGE": "true"}), 5000)
        self.assertEqual(self.rows()[0][4], "z")
        self.assertPort(self.trop("reserve", "--clear-task", "--force"), 5000)
        self.assertEqual(self.rows()[0][4], None)

    def test_project_and_task_from_environment_on_new_key(self):
        self.assertPort(self.trop("reserve", env={"TROP_PROJECT": " app ", "TROP_TASK": "t1"}), 5000)
        self.assertEqual(self.rows()[0][3:5], ("app", "t1"))

    def test_git_inference_for_new_keys(self):
        self.write(os.path.join(self.proj, ".git", "HEAD"), "ref: refs/heads/feature\n")
        self.assertPort(self.trop("reserve"), 5000)
        self.assertPort(self.trop("reserve", "--project", "explicit", "--tag", "t"), 5001)
        self.assertEqual([r[3:5] for r in self.rows()], [("proj", "feature"), ("explicit", "feature")])

    def test_path_guard(self):
        self.assertError(self.trop("reserve", "--path", "/unrelated"), 1,
                         startswith="path relationship violation: /unrelated and %s are unrelated paths" % self.proj)
        missing = "directory %s does not exist: the reservation is made, and prune removes it while the directory " \
                  "is missing"
        self.assertPort(self.trop("reserve", "--path", "/unrelated", "--allow-unrelated-path"), 5000,
                        [missing % "/unrelated"])
        self.assertPort(self.trop("reserve", "--path", "/unrelated2", env={"TROP_ALLOW_UNRELATED_PATH": "1"}), 5001,
                        [missing % "/unrelated2"])
        self.assertPort(self.trop("reserve", "--path", "/unrelated3", "--force"), 5002, [missing % "/unrelated3"])
        self.assertPort(self.trop("reserve", "--path", self.root), 5003)                       # ancestor
        self.mkdir("proj", "sub", "deeper")
        self.assertPort(self.trop("reserve", "--path", self.proj + "/sub/deeper"), 5004)     # descendant
        self.assertPort(self.trop("reserve", env={"TROP_PATH": self.proj + "/env"}), 5005,
                        [missing % (self.proj + "/env")])
        self.assertEqual(self.rows()[-1][0], "/unrelated3")
        self.assertIn((self.proj + "/env", "", 5005), [r[:3] for r in self.rows()])

    def test_dry_run_on_missing_database_creates_nothing(self):
        rc, out, err = self.trop("reserve", "--dry-run")
        self.assertEqual((rc, out), (0, ""))
        lines = err.splitlines()
        self.assertEqual(lines[0], "Dry run - would perform the following actions:")
        self.assertTrue(lines[1].startswith("  1. Reserve port"), err)
        self.assertFalse(os.path.exists(self.data))
        self.assertEqual(self.trop("reserve", "--dry-run", "--quiet"), (0, "", ""))
        self.assertFalse(os.path.exists(self.data))

    def test_dry_run_on_existing_database_changes_nothing(self):
        make_v2_db(self.data, [(self.proj, "", 5003, "p", None, T1, T1)])
        before = self.rows()
        for args in (("--dry-run",), ("--dry-run", "--overwrite"), ("--dry-run", "--path", "new"),
                     ("--dry-run", "--project", "q", "--allow-project-change")):
            rc, out, err = self.trop("reserve", *args)
            self.assertEqual((rc, out), (0, ""), err)
            self.assertTrue(err.startswith("Dry run - would perform the following actions:\n"), err)
        self.assertEqual(self.rows(), before)

    def test_disable_autoinit(self):
        self.assertError(self.trop("reserve", "--disable-autoinit"), 3, startswith="Data directory not found")
        self.assertError(self.trop("reserve", env={"TROP_DISABLE_AUTOINIT": "1"}), 3)
        self.assertFalse(os.path.exists(self.db))

    def test_no_home(self):
        self.assertError(self.trop("reserve", env={"HOME": None, "TROP_DATA_DIR": None}), 7)

    def test_unwritable_data_directory(self):
        if os.geteuid() == 0:
            self.write(os.path.join(self.root, "file"), "a regular file\n")
            data = os.path.join(self.root, "file", "data")
        else:
            make_v2_db(self.data)
            os.chmod(self.data, 0o555)
            self.addCleanup(os.chmod, self.data, 0o755)
            data = self.data
        self.assertError(self.trop("reserve", env={"TROP_DATA_DIR": data}), 6)
        self.assertError(self.trop("reserve", "--data-dir", data), 6)

    def test_busy_timeout_validation(self):
        for value in ("-1", "abc"):
            rc, out, _ = self.trop("reserve", "--busy-timeout", value)
            self.assertEqual((rc, out), (2, ""))
        self.assertError(self.trop("reserve", "--busy-timeout", "2147484"), 7, contains="2147483")
        self.assertFalse(os.path.exists(self.data))
        self.assertPort(self.trop("reserve", "--busy-timeout", "2147483"), 5000)


class TestReleaseCLI(TropTestCase):
    ENV = SKIP_PROBES

    def setUp(self):
        super().setUp()
        p = self.proj
        self.seeded = [(p + "/a", "", 5000, None, None, T1, T1), (p + "/a", "web", 5001, None, None, T1, T1),
                       (p + "/a/x", "", 5002, None, None, T1, T1), (p + "/ab", "", 5003, None, None, T1, T1),
                       (p + "/ab", "web", 5004, None, None, T1, T1)]
        make_v2_db(self.data, self.seeded)

    def remaining(self):
        return [r[2] for r in self.rows()]

    def test_all_tags_at_path(self):
        self.assertEqual(self.trop("release", "--path", "a"), (0, "", "Released reservation successfully\n"))
        self.assertEqual(self.remaining(), [5002, 5003, 5004])

    def test_one_tag(self):
        self.assertEqual(self.trop("release", "--path", "a", "--tag", " web "),
                         (0, "", "Released reservation successfully\n"))
        self.assertEqual(self.remaining(), [5000, 5002, 5003, 5004])

    def test_untagged_only(self):
        self.assertEqual(self.trop("release", "--path", "ab", "--untagged-only"),
                         (0, "", "Released reservation successfully\n"))
        self.assertEqual(self.remaining(), [5000, 5001, 5002, 5004])

    def test_recursive_is_component_wise(self):
        self.assertEqual(self.trop("release", "--path", "a", "--recursive"), (0, "", "Released 3 reservation(s)\n"))
        self.assertEqual(self.remaining(), [5003, 5004])

    def test_recursive_with_tag(self):
        self.assertEqual(self.trop("release", "--recursive", "--tag", "web"), (0, "", "Released 2 reservation(s)\n"))
        self.assertEqual(self.remaining(), [5000, 5002, 5003])

    def test_default_path_is_cwd(self):
        self.assertEqual(self.trop("release", cwd=self.mkdir("proj", "ab")),
                         (0, "", "Released reservation successfully\n"))
        self.assertEqual(self.remaining(), [5000, 5001, 5002])

    def test_idempotent(self):
        a = self.proj + "/a"
        self.trop("release", "--path", "a")
        self.assertEqual(self.trop("release", "--path", "a"),
                         (0, "", "No reservation found (already released)\n"
                                 "Warning: No reservations found for %s (already released)\n" % a))
        self.assertEqual(self.trop("release", "--path", "a", "--tag", "web"),
                         (0, "", "No reservation found (already released)\n"
                                 "Warning: No reservation found for %s:web (already released)\n" % a))
        self.assertEqual(self.trop("release", "--path", "a", "--untagged-only", "--quiet"), (0, "", ""))
        self.assertEqual(self.trop("release", "--path", "zz", "--recursive"),
                         (0, "", "Released 0 reservation(s)\n"
                                 "Warning: No reservations found under %s/zz (already released)\n" % self.proj))
        self.assertEqual(self.remaining(), [5002, 5003, 5004])

    def test_dry_run_output(self):
        p = self.proj
        self.assertEqual(self.trop("release", "--path", "a", "--dry-run"), (0, "", (
            "Dry run - would perform the following actions:\n"
            "  1. Delete reservation for %s/a\n"
            "  2. Delete reservation for %s/a:web\n") % (p, p)))
        self.assertEqual(self.trop("release", "--path", "a", "--recursive", "--dry-run"), (0, "", (
            "Dry run - would release 3 reservation(s):\n"
            "  - Delete reservation for %s/a\n"
            "  - Delete reservation for %s/a:web\n"
            "  - Delete reservation for %s/a/x\n") % (p, p, p)))
        self.assertEqual(self.trop("release", "--path", "a", "--tag", "nope", "--dry-run"), (0, "", (
            "Dry run - would perform the following actions:\n"
            "Warnings:\n"
            "  - No reservation found for %s/a:nope (already released)\n") % p))
        self.assertEqual(self.trop("release", "--path", "zz", "--recursive", "--dry-run"), (0, "", (
            "Dry run - would release 0 reservation(s):\n"
            "Warnings:\n"
            "  - No reservations found under %s/zz (already released)\n") % p))
        self.assertEqual(self.trop("release", "--path", "a", "--dry-run", "--quiet"), (0, "", ""))
        self.assertEqual(self.rows(), sorted(self.seeded))

    def test_bad_selection(self):
        self.assertError(self.trop("release", "--tag", "web", "--untagged-only"), 4,
                         "Cannot specify both --tag and --untagged-only")
        self.assertError(self.trop("release", "--tag", "  "), 4)
        self.assertEqual(len(self.remaining()), 5)

    def test_path_guard(self):
        make = [("/unrelated", "", 5005, None, None, T1, T1)]
        conn = sqlite3.connect(self.db, isolation_level=None)
        insert_rows(conn, make)
        conn.close()
        self.assertError(self.trop("release", "--path", "/unrelated"), 1, startswith="path relationship violation")
        self.assertIn(5005, self.remaining())
        self.assertEqual(self.trop("release", "--path", "/unrelated", "--force")[0], 0)
        self.assertNotIn(5005, self.remaining())


class TestListCLI(TropTestCase):
    ENV = SKIP_PROBES
    HEADER = "PORT\tPATH\tTAG\tPROJECT\tTASK\tCREATED_AT\tLAST_USED_AT\n"

    def test_empty(self):
        self.assertEqual(self.trop("list"), (0, self.HEADER, ""))
        self.assertEqual(self.trop("list", "--format", "json"), (0, "[]\n", ""))
        self.assertEqual(self.trop("list", "--format", "csv"),
                         (0, "port,path,tag,project,task,created_at,last_used_at\n", ""))
        self.assertEqual(self.trop("list-projects"), (0, "", ""))

    def seed(self):
        h = self.home
        make_v2_db(self.data, [
            ("/srv/b", "", 5002, "Zeta", None, T1, T2),
            ("/srv/a", "web", 5001, "app", "t1", T1, T2),
            ("/srv/a", "", 5000, None, None, T1, T2),
            (h, "", 5003, "app", None, T1, T2),
            (h + "/code/x", "", 5004, None, None, T1, T2),
            (h + "x", "", 5005, None, None, T1, T2),
        ])

    def test_table(self):
        self.seed()
        h = self.home
        expected = self.HEADER + (
            "5000\t/srv/a\t-\t-\t-\t{0}\t{1}\n"
            "5001\t/srv/a\tweb\tapp\tt1\t{0}\t{1}\n"
            "5002\t/srv/b\t-\tZeta\t-\t{0}\t{1}\n").format(S1, S2)
        rows = {h: "5003\t~/\t-\tapp\t-\t%s\t%s\n" % (S1, S2),
                h + "/code/x": "5004\t~/code/x\t-\t-\t-\t%s\t%s\n" % (S1, S2),
                h + "x": "5005\t%sx\t-\t-\t-\t%s\t%s\n" % (h, S1, S2)}
        expected += "".join(rows[k] for k in sorted(rows))
        self.assertEqual(self.trop("list"), (0, expected, ""))
        full = self.trop("list", "--show-full-paths")[1]
        self.assertIn("5003\t%s\t-\tapp" % h, full)
        self.assertIn("5004\t%s/code/x\t" % h, full)

    def test_json(self):
        make_v2_db(self.data, [("/srv/a", "web", 5001, "app", None, T1, T2), ("/srv/a", "", 5000, None, "t", T1, T1)])
        expected = (
            '[\n'
            '  {\n'
            '    "created_at": "%s",\n'
            '    "last_used_at": "%s",\n'
            '    "path": "/srv/a",\n'
            '    "port": 5000,\n'
            '    "project": null,\n'
            '    "tag": null,\n'
            '    "task": "t"\n'
            '  },\n'
            '  {\n'
            '    "created_at": "%s",\n'
            '    "last_used_at": "%s",\n'
            '    "path": "/srv/a",\n'
            '    "port": 5001,\n'
            '    "project": "app",\n'
            '    "tag": "web",\n'
            '    "task": null\n'
            '  }\n'
            ']\n') % (S1, S1, S1, S2)
        self.assertEqual(self.trop("list", "--format", "json"), (0, expected, ""))
        self.assertEqual(self.trop("list", "--format", "JSON"), (0, expected, ""))
        self.assertEqual(self.trop("list", env={"TROP_OUTPUT_FORMAT": "json"}), (0, expected, ""))

    def test_json_is_the_standard_librarys_encoding_of_the_rows(self):
        """The output is written from a template for speed; it must stay byte-identical to json.dumps."""
        awkward = ["plain", "quote \" and \\ backslash", "tab\tnew\nline\r", "\x00\x01\x1f\x7f", "é ü 日本 😀",
                   "\u2028\u2029", "</script>", "a" * 300]
        rows = []
        for i, text in enumerate(awkward):
            rows.append(("/srv/%s" % text.replace("\x00", "0"), text.strip() or "t", 5000 + i, text.strip() or None,
                         None if i % 2 else text.strip(), T1 + i, T2 + 86400 * 400 * i))
        rows.append(("/srv/untagged", "", 6000, None, None, 0, 253402300799))
        make_v2_db(self.data, rows)
        rc, out, err = self.trop("list", "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        conn = sqlite3.connect(self.db)
        self.addCleanup(conn.close)
        expected = [{"path": p, "tag": t or None, "port": port, "project": pr, "task": ta,
                     "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c)),
                     "last_used_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(u))}
                    for p, t, port, pr, ta, c, u in conn.execute("SELECT %s FROM reservations ORDER BY path, tag"
                                                                 % COLUMNS)]
        self.assertEqual(len(expected), len(rows))
        self.assertEqual(out, json.dumps(expected, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def test_csv_and_tsv_use_full_paths(self):
        make_v2_db(self.data, [(self.home + "/x", "", 5000, "a,b", None, T1, T2)])
        self.assertEqual(self.trop("list", "--format", "csv"), (0, (
            "port,path,tag,project,task,created_at,last_used_at\n"
            '5000,%s/x,,"a,b",,%s,%s\n') % (self.home, S1, S2), ""))
        self.assertEqual(self.trop("list", "--format", "tsv"), (0, (
            "port\tpath\ttag\tproject\ttask\tcreated_at\tlast_used_at\n"
            "5000\t%s/x\t\ta,b\t\t%s\t%s\n") % (self.home, S1, S2), ""))

    def test_bad_format(self):
        rc, out, _ = self.trop("list", "--format", "xml")
        self.assertEqual((rc, out), (2, ""))
        self.assertError(self.trop("list", env={"TROP_OUTPUT_FORMAT": "xml"}), 7)

    def test_filters(self):
        p = self.proj
        os.symlink(p, os.path.join(self.root, "link"))
        self.mkdir("proj", "w", "a")
        make_v2_db(self.data, [(p + "/w/a", "", 5000, "app", None, T1, T2),
                               (p + "/w/a", "web", 5001, "other", None, T1, T2),
                               (p + "/w/a/x", "", 5002, "app", None, T1, T2),
                               (p + "/w/ab", "web", 5003, None, None, T1, T2)])

        def ports(*args):
            rc, out, err = self.trop("list", "--format", "json", *args)
            self.assertEqual((rc, err), (0, ""))
            return [r["port"] for r in json.loads(out)]
        self.assertEqual(ports("--filter-path", "w/a"), [5000, 5001, 5002])
        self.assertEqual(ports("--filter-path", p + "/w/a/"), [5000, 5001, 5002])
        # Through a symlink only existing stored paths canonicalize: <proj>/w/a/x does not exist.
        self.assertEqual(ports("--filter-path", os.path.join(self.root, "link", "w", "a")), [5000, 5001])
        self.assertEqual(ports("--filter-tag", "web"), [5001, 5003])
        self.assertEqual(ports("--filter-project", "app"), [5000, 5002])
        self.assertEqual(ports("--filter-project", "app", "--filter-path", "w/a/x"), [5002])

    def test_list_projects(self):
        self.seed()
        self.assertEqual(self.trop("list-projects"), (0, "Zeta\napp\n", ""))


class TestAssertCLI(TropTestCase):
    ENV = SKIP_PROBES

    def seed(self):
        make_v2_db(self.data, [(self.proj, "", 5000, None, None, T1, T2),
                               (self.proj, "web", 5001, "app", "t1", T1, T2),
                               ("/nonexistent/dir", "", 5002, None, None, T1, T2)])

    def test_assert_reservation(self):
        self.seed()
        self.assertEqual(self.trop("assert-reservation"), (0, "5000\n", ""))
        self.assertEqual(self.trop("assert-reservation", "--tag", "web"), (0, "5001\n", ""))
        self.assertEqual(self.trop("assert-reservation", "--tag", "web", "--quiet"), (0, "", ""))
        self.assertEqual(self.trop("assert-reservation", env={"TROP_PATH": "/nonexistent/dir"}), (0, "5002\n", ""))
        self.assertEqual(self.trop("assert-reservation", "--tag", "db", "--not"), (0, "", ""))
        self.assertError(self.trop("assert-reservation", "--tag", "db"), 1,
                         "Assertion failed: no reservation found for %s:db" % self.proj)
        self.assertError(self.trop("assert-reservation", "--not"), 1,
                         "Assertion failed: reservation exists for %s" % self.proj)
        self.assertError(self.trop("assert-reservation", "--tag", " "), 6)
        self.assertEqual(self.rows()[0][6], T2)          # assertions never touch rows

    def test_assert_port(self):
        self.seed()
        self.assertEqual(self.trop("assert-port", "5001"), (0, "", ""))
        self.assertEqual(self.trop("assert-port", "5003", "--not"), (0, "", ""))
        self.assertError(self.trop("assert-port", "5003"), 1, "Assertion failed: port 5003 is not reserved")
        self.assertError(self.trop("assert-port", "5000", "--not"), 1, "Assertion failed: port 5000 is reserved")
        self.assertError(self.trop("assert-port", "0"), 4)

    def test_port_arguments_are_u16(self):
        for args in (("assert-port", "abc"), ("assert-port", "70000"), ("port-info", "abc"), ("port-info", "-5")):
            rc, out, _ = self.trop(*args)
            self.assertEqual((rc, out), (2, ""), args)

    def test_assert_data_dir(self):
        self.assertError(self.trop("assert-data-dir"), 1,
                         "Assertion failed: data directory not found at %s" % self.data)
        self.assertEqual(self.trop("assert-data-dir", "--not"), (0, "", ""))
        self.assertEqual(self.trop("assert-data-dir", "--validate", "--not"), (0, "", ""))
        self.assertFalse(os.path.exists(self.data))
        os.makedirs(self.data)
        self.assertEqual(self.trop("assert-data-dir"), (0, "", ""))     # the directory, not trop.db
        self.assertError(self.trop("assert-data-dir", "--not"), 1, "Assertion failed: data directory exists at %s"
                         % self.data)
        self.assertError(self.trop("assert-data-dir", "--validate"), 6)
        self.assertError(self.trop("assert-data-dir", "--validate", "--not"), 6)
        self.assertFalse(os.path.exists(self.db))
        other = os.path.join(self.root, "other")
        make_v2_db(other, [(self.proj, "", 5000, None, None, T1, T2)])
        self.assertEqual(self.trop("assert-data-dir", "--validate", "--data-dir", other), (0, "", ""))

    def test_port_info(self):
        self.seed()
        self.assertEqual(self.trop("port-info", "5001"), (0, (
            "Port: 5001\nPath: %s\nTag: web\nProject: app\nTask: t1\nCreated: %s\nLast used: %s\nPath exists: yes\n")
            % (self.proj, S1, S2), ""))
        self.assertEqual(self.trop("port-info", "5002"), (0, (
            "Port: 5002\nPath: /nonexistent/dir\nCreated: %s\nLast used: %s\nPath exists: no\n") % (S1, S2), ""))
        self.assertEqual(self.trop("port-info", "6100"), (0, "Port 6100 is not reserved\n", ""))
        self.assertError(self.trop("port-info", "0"), 4)

    def test_port_info_occupancy_flags_require_include_occupancy(self):
        rc, out, _ = self.trop("port-info", "5000", "--skip-tcp")
        self.assertEqual((rc, out), (2, ""))


class TestShowCLI(TropTestCase):
    ENV = SKIP_PROBES

    def test_show_data_dir(self):
        self.assertEqual(self.trop("show-data-dir"), (0, self.data + "\n", ""))
        self.assertEqual(self.trop("show-data-dir", env={"TROP_DATA_DIR": None}), (0, self.home + "/.trop\n", ""))
        self.assertEqual(self.trop("--data-dir", "rel/d", "show-data-dir"), (0, "rel/d\n", ""))
        self.assertEqual(self.trop("show-data-dir", "--data-dir", "rel/d"), (0, "rel/d\n", ""))
        self.assertError(self.trop("show-data-dir", env={"HOME": None, "TROP_DATA_DIR": None}), 7)
        self.assertFalse(os.path.exists(self.data))

    def test_show_path(self):
        self.assertEqual(self.trop("show-path", env={"TROP_PATH": "/elsewhere"}), (0, self.proj + "\n", ""))
        self.assertEqual(self.trop("show-path", "--path", "../x/./y//"), (0, self.root + "/x/y\n", ""))
        self.assertEqual(self.trop("show-path", "--path", "~/a"), (0, self.home + "/a\n", ""))
        self.assertError(self.trop("show-path", "--path", "~bob/a"), 6)
        self.assertError(self.trop("show-path", "--path", "/../.."), 6)

    def test_show_path_canonicalize(self):
        os.symlink(self.proj, os.path.join(self.root, "link"))
        link = os.path.join(self.root, "link")
        self.assertEqual(self.trop("show-path", "--path", link), (0, link + "\n", ""))
        self.assertEqual(self.trop("show-path", "--path", link, "--canonicalize"), (0, self.proj + "\n", ""))
        rc, out, err = self.trop("show-path", "--path", "missing", "--canonicalize")
        self.assertEqual((rc, out), (6, ""))
        self.assertIn("Error: ", err)


class TestInitCLI(TropTestCase):
    ENV = SKIP_PROBES

    def test_init(self):
        d, db = self.data, self.db
        self.assertEqual(self.trop("init"), (0, "Initialized trop in: %s\n  - Created data directory\n"
                                                "  - Created database\n" % d, ""))
        conn = sqlite3.connect(db)
        self.addCleanup(conn.close)
        trop.validate_schema(conn)
        self.assertError(self.trop("init"), 6, "validation error for 'database': Database already exists at %s. "
                                               "Use --overwrite to replace it." % db)
        self.assertPort(self.trop("reserve"), 5000)
        self.assertEqual(self.trop("init", "--overwrite"), (0, "Initialized trop in: %s\n  - Recreated database\n"
                                                               % d, ""))
        self.assertEqual(db_rows(d), [])

    def test_dry_run(self):
        d, db = self.data, self.db
        self.assertEqual(self.trop("init", "--dry-run", "--with-config"), (0, (
            "Dry-run mode: no changes will be made\n\nWould initialize trop in: {0}\n"
            "  - Create data directory: {0}\n  - Create database: {1}\n"
            "  - Create configuration file: {0}/config.yaml\n").format(d, db), ""))
        self.assertFalse(os.path.exists(d))
        make_v2_db(d)
        self.assertEqual(self.trop("init", "--dry-run"), (0, (
            "Dry-run mode: no changes will be made\n\nWould initialize trop in: {0}\n"
            "  - Data directory already exists: {0}\n"
            "  - ERROR: Database already exists (use --overwrite to replace): {1}\n").format(d, db), ""))
        self.assertEqual(self.trop("init", "--dry-run", "--overwrite"), (0, (
            "Dry-run mode: no changes will be made\n\nWould initialize trop in: {0}\n"
            "  - Data directory already exists: {0}\n"
            "  - Remove existing database: {1}\n  - Create new database: {1}\n").format(d, db), ""))

    def test_with_config_and_data_dir_option(self):
        d = os.path.join(self.root, "elsewhere")
        self.assertEqual(self.trop("--disable-autoinit", "init", "--data-dir", d, "--with-config"), (0, (
            "Initialized trop in: {0}\n  - Created data directory\n  - Created database\n"
            "  - Created default configuration file\n").format(d), ""))
        self.assertTrue(os.path.isfile(os.path.join(d, "config.yaml")))
        self.assertTrue(os.path.isfile(os.path.join(d, "trop.db")))
        self.assertFalse(os.path.exists(self.data))
        self.assertEqual(self.trop("init", "--with-config", "--overwrite", "--data-dir", d), (0, (
            "Initialized trop in: {0}\n  - Recreated database\n"
            "  - Configuration file already exists (not overwritten)\n").format(d), ""))

    def test_invalid_configuration_touches_nothing(self):
        self.assertError(self.trop("init", "--busy-timeout", "2147484"), 7)
        self.assertError(self.trop("init", env={"TROP_DISABLE_AUTOPRUNE": "perhaps"}), 7)
        self.assertFalse(os.path.exists(self.data))


class TestGlobalOptionsCLI(TropTestCase):
    ENV = SKIP_PROBES

    def test_options_before_or_after_the_command(self):
        other = os.path.join(self.root, "other")
        make_v2_db(other, [(self.proj, "", 5007, None, None, T1, T2)])
        for args in (("--data-dir", other, "--quiet", "assert-reservation"),
                     ("assert-reservation", "--data-dir", other, "--quiet"),
                     ("--quiet", "assert-reservation", "--data-dir", other)):
            self.assertEqual(self.trop(*args), (0, "", ""), args)
        self.assertEqual(self.trop("--data-dir", other, "assert-reservation", "--busy-timeout", "0"),
                         (0, "5007\n", ""))
        self.assertEqual(self.trop("--busy-timeout", "3", "--disable-autoinit", "assert-port", "5007",
                                   "--data-dir", other), (0, "", ""))
        self.assertError(self.trop("list", "--disable-autoinit"), 3)
        self.assertError(self.trop("--disable-autoinit", "list"), 3)
        self.assertError(self.trop("--busy-timeout", "2147484", "list"), 7)
        rc, out, _ = self.trop("--busy-timeout", "-1", "list")
        self.assertEqual((rc, out), (2, ""))
        self.assertFalse(os.path.exists(self.data))

    def test_read_commands_create_the_database(self):
        self.assertEqual(self.trop("list-projects"), (0, "", ""))
        conn = sqlite3.connect(self.db)
        self.addCleanup(conn.close)
        trop.validate_schema(conn)

    def test_empty_data_dir_is_a_configuration_error(self):
        self.assertError(self.trop("--data-dir", "", "list"), 7)
        self.assertFalse(os.path.exists(os.path.join(self.home, ".trop")))

    def run_with_stdout(self, stdout, *args):
        proc = subprocess.run([sys.executable, "-m", "trop"] + list(args), cwd=self.proj,
                              env=dict(self.env, TROP_DATA_DIR=self.data), stdin=subprocess.DEVNULL,
                              stdout=stdout, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertNotIn("Traceback", proc.stderr)
        return proc.returncode, proc.stderr

    @unittest.skipUnless(os.path.exists("/dev/full"), "needs /dev/full")
    def test_unwritable_stdout_is_an_io_error_after_the_commit(self):
        """The port was committed; the user is told the output failed (exit 5), not that nothing happened."""
        with open("/dev/full", "w") as full:
            rc, err = self.run_with_stdout(full, "reserve", "--tag", "full")
        self.assertEqual(rc, 5)
        self.assertEqual(err, "Error: I/O error: cannot write results to standard output: No space left on "
                              "device\n")
        self.assertEqual(self.trop("assert-reservation", "--tag", "full"), (0, "5000\n", ""))

    def test_closed_stdout_is_an_io_error(self):
        rc, err = self.run_with_stdout(subprocess.DEVNULL, "show-path")
        self.assertEqual((rc, err), (0, ""))
        proc = subprocess.run([sys.executable, "-c", "import os, sys, runpy; os.close(1); sys.stdout = None; "
                               "sys.argv = ['trop', 'list']; runpy.run_module('trop', run_name='__main__')"],
                              cwd=self.proj, env=dict(self.env, TROP_DATA_DIR=self.data), stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual((proc.returncode, proc.stderr),
                         (5, "Error: I/O error: cannot write results: standard output is closed\n"))


# --- Concurrency -------------------------------------------------------------

class TestConcurrency(TropTestCase):
    """Real processes against one database; every assertion is strict."""

    def setUp(self):
        super().setUp()                                     # occupancy probes on
        self.assertEqual(self.trop("init")[0], 0)

    def list_ports(self):
        rc, out, err = self.trop("list", "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        return [r["port"] for r in json.loads(out)]

    def concurrent_reserves(self, count, prefix):
        results = self.trop_many([("reserve", "--path", self.mkdir("%s-%d" % (prefix, i)),
                                   "--allow-unrelated-path") for i in range(count)])
        for rc, out, err in results:
            self.assertEqual((rc, err), (0, ""), err)
        ports = [int(out) for _rc, out, _err in results]
        self.assertEqual(len(set(ports)), count)
        return ports

    def test_concurrent_reservations_get_distinct_ports(self):
        ports = self.concurrent_reserves(10, "p")
        self.assertEqual(sorted(self.list_ports()), sorted(ports))

    def test_fifty_concurrent_reservations_keep_the_database_valid(self):
        ports = self.concurrent_reserves(50, "c")
        self.assertEqual(self.trop("assert-data-dir", "--validate"), (0, "", ""))
        listed = self.list_ports()
        self.assertEqual(len(listed), 50)
        self.assertEqual(sorted(listed), sorted(ports))

    # A reader process: 50 `trop list` calls (in-process, so that 500 reads cost 10 processes), a little
    # apart so that they overlap the writer's; prints the row counts it saw, or why a call failed.
    LIST_READER = r"""
import contextlib, io, json, sys, time, trop
seen = []
for _ in range(50):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = trop.main(["--data-dir", sys.argv[1], "list"])
    lines = out.getvalue().splitlines()
    seen.append(len(lines) - 1 if rc == 0 and lines and lines[0].startswith("PORT\t") else
                "rc=%s %s" % (rc, err.getvalue().strip()))
    time.sleep(0.02)
print(json.dumps(seen))
"""

    def test_readers_during_writes(self):
        for i in range(5):
            self.reserve_port("--path", self.mkdir("seed-%d" % i), "--allow-unrelated-path")
        readers = [self.start_python(self.LIST_READER, self.data) for _ in range(10)]
        written = []
        for i in range(20):
            written.append(self.trop("reserve", "--path", self.mkdir("writer-%d" % i), "--allow-unrelated-path"))
        self.assertEqual([(rc, err) for rc, _out, err in written], [(0, "")] * 20)
        for reader in readers:
            rc, out, err = finish(reader)
            self.assertEqual((rc, err), (0, ""))
            seen = json.loads(out)
            self.assertEqual(len(seen), 50)
            self.assertTrue(all(isinstance(n, int) and 5 <= n <= 25 for n in seen), seen)   # every read succeeded
            self.assertEqual(seen, sorted(seen), "a reader saw committed rows disappear")
        self.assertEqual(len(set(self.list_ports())), 25)

    def hold_write_lock(self):
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=0)
        conn.execute("BEGIN IMMEDIATE")
        self.addCleanup(conn.close)
        return conn

    def test_lock_timeout(self):
        self.reserve_port()
        before = self.rows()
        conn = self.hold_write_lock()
        for args, extra in ((("reserve", "--busy-timeout", "1", "--quiet", "--path", "new"), {}),
                            (("release", "--quiet"), {"TROP_BUSY_TIMEOUT": "1"})):
            start = time.monotonic()
            result = self.trop(*args, env=extra)
            elapsed = time.monotonic() - start
            self.assertEqual(result, (2, "", LOCK_TIMEOUT_1S), args)      # the 1 s timeout, not the default
            self.assertGreaterEqual(elapsed, 0.8, args)                     # and it did wait
        self.assertEqual(self.rows(), before)
        port = before[0][2]
        # Readers never wait for the writer.
        self.assertEqual(self.trop("list", "--busy-timeout", "0")[0], 0)
        self.assertEqual(self.trop("list-projects", "--busy-timeout", "0"), (0, "", ""))
        self.assertEqual(self.trop("port-info", str(port), "--busy-timeout", "0")[0], 0)
        self.assertEqual(self.trop("assert-port", str(port), "--busy-timeout", "0"), (0, "", ""))
        self.assertEqual(self.trop("assert-reservation", "--busy-timeout", "0"), (0, "%d\n" % port, ""))
        self.assertEqual(self.trop("assert-data-dir", "--validate", "--busy-timeout", "0"), (0, "", ""))
        conn.execute("ROLLBACK")

    def test_writer_waits_for_the_lock(self):
        conn = self.hold_write_lock()
        start = time.monotonic()
        self.mkdir("proj", "waiting")
        proc = self.start("reserve", "--busy-timeout", "5", "--path", "waiting")
        time.sleep(0.5)
        self.assertIsNone(proc.poll())
        conn.execute("ROLLBACK")
        rc, out, err = finish(proc)
        self.assertEqual((rc, err), (0, ""))
        self.assertGreaterEqual(time.monotonic() - start, 0.5)
        self.assertEqual(self.rows()[0][:3], (self.proj + "/waiting", "", int(out)))


class TestConcurrentScenarios(TropTestCase):
    RUN_IN_ROOT = True
    GROUP_ROUNDS = 20

    # A child that lists in a loop until the stop file exists (then lists once more): through
    # trop's own `list --format json` and through a raw sqlite3 SELECT, alternately.
    LISTER = r"""
import contextlib, io, json, os, sqlite3, sys, time, trop
data, prefix, stop = sys.argv[1:4]
conn = sqlite3.connect(os.path.join(data, "trop.db"), isolation_level=None)
seen, bad, n = set(), [], 0
while True:
    done = os.path.exists(stop)
    if n % 2 == 0:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = trop.main(["--data-dir", data, "list", "--format", "json"])
        if rc != 0:
            bad.append("list exited %s" % rc)
            break
        paths = [r["path"] for r in json.loads(buf.getvalue())]
    else:
        paths = [r[0] for r in conn.execute("SELECT path FROM reservations")]
    counts = {}
    for p in paths:
        if p.startswith(prefix):
            counts[p] = counts.get(p, 0) + 1
    for p, c in counts.items():
        seen.add(c)
        if c != 10:
            bad.append("%s: %d rows (%s)" % (p, c, "list" if n % 2 == 0 else "sqlite"))
    n += 1
    if done:
        break
    time.sleep(0.001)
print(json.dumps({"listings": n, "seen": sorted(seen), "bad": bad[:10], "last": counts}))
"""

    def test_group_of_ten_is_all_or_nothing_for_a_concurrent_lister(self):
        self.assertEqual(self.trop("init")[0], 0)
        prefix = self.mkdir("groups") + "/"
        stop = os.path.join(self.root, "stop")
        lister = self.start_python(self.LISTER, self.data, prefix, stop)
        files = [self.group_file(os.path.join(prefix, "g%02d" % r), numbered_services(10), pmin=30000, pmax=39999)
                 for r in range(self.GROUP_ROUNDS)]
        outputs = []
        for r, path in enumerate(files):
            # one group writer per round, racing a single reservation for the same lock
            procs = [self.start("reserve-group", path, "--allow-unrelated-path", "--format", "json"),
                     self.start("reserve", "--path", self.mkdir("single", str(r)), "--min", 30000, "--max", 39999,
                                "--skip-occupancy-check", "--allow-unrelated-path")]
            results = [finish(p) for p in procs]
            self.assertEqual([res[0] for res in results], [0, 0], results)
            outputs.append(json.loads(results[0][1]))
        with open(stop, "w"):
            pass
        rc, out, err = finish(lister)
        self.assertEqual((rc, err), (0, ""))
        report = json.loads(out)
        self.assertEqual(report["bad"], [])
        self.assertTrue(set(report["seen"]) <= {10}, report)
        self.assertEqual(report["last"], {os.path.dirname(f): 10 for f in files})
        self.assertGreaterEqual(report["listings"], 20, report)
        rows = self.rows(3)
        self.assertUniquePorts(rows)
        for path, mapping in zip(files, outputs):
            group_dir = os.path.dirname(path)
            self.assertEqual({r[1]: r[2] for r in rows if r[0] == group_dir}, mapping)
            base = mapping["s00"]
            self.assertEqual(mapping, {"s%02d" % i: base + i for i in range(10)})
        self.assertDataDirValid()

    def test_eleven_port_pool_twenty_racers(self):
        low = 50000
        dirs = [self.mkdir("race", "r%02d" % i) for i in range(20)]
        procs = [self.start("reserve", "--path", d, "--min", low, "--max", low + 10, "--skip-occupancy-check",
                            "--allow-unrelated-path") for d in dirs]
        results = [finish(p) for p in procs]
        winners = {d: int(res[1]) for d, res in zip(dirs, results) if res[0] == 0}
        self.assertEqual(len(winners), 11, results)
        for d, (rc, out, err) in zip(dirs, results):
            if rc == 0:
                self.assertEqual((out, err), ("%d\n" % winners[d], ""))
            else:
                self.assertError((rc, out, err), 6, contains="exhausted")
        self.assertEqual(sorted(winners.values()), list(range(low, low + 11)))
        self.assertEqual(sorted((r[0], r[2]) for r in self.rows()), sorted(winners.items()))
        self.assertDataDirValid()

    def test_user_config_rewritten_while_reserving(self):
        texts = ("ports: {min: 10000, max: 20000}\n", "ports: {min: 30000, max: 40000}\n")
        config = self.write(os.path.join(self.data, "config.yaml"), texts[0])
        self.assertEqual(self.trop("init")[0], 0)
        rewrites = []

        def rewrite():
            for i in range(50):
                tmp = "%s.tmp-%d" % (config, i)
                with open(tmp, "w") as fh:
                    fh.write(texts[(i + 1) % 2])
                os.replace(tmp, config)
                rewrites.append(i)
                time.sleep(0.01)

        thread = threading.Thread(target=rewrite)
        thread.start()
        try:
            dirs = [self.mkdir("cfg", "c%02d" % i) for i in range(25)]
            procs = []
            for d in dirs:
                procs.append(self.start("reserve", "--path", d, "--skip-occupancy-check", "--allow-unrelated-path"))
                time.sleep(0.02)
            results = [finish(p) for p in procs]
        finally:
            thread.join()
        self.assertEqual(len(rewrites), 50)
        for rc, out, err in results:
            self.assertEqual((rc, err), (0, ""), out)
        ports = [int(r[1]) for r in results]
        for port in ports:
            self.assertTrue(10000 <= port <= 20000 or 30000 <= port <= 40000, port)
        self.assertEqual(len(set(ports)), 25)
        self.assertEqual(sorted((r[0], r[2]) for r in self.rows()), sorted(zip(dirs, ports)))
        self.assertDataDirValid()

    def test_group_that_cannot_fit_leaves_no_rows(self):
        low = 52000
        self.assertEqual(self.trop("reserve", "--path", self.mkdir("frag-1"), "--min", low, "--max", low + 5,
                                   "--skip-occupancy-check", "--allow-unrelated-path"), (0, "%d\n" % low, ""))
        before = self.rows()
        impossible = [self.group_file(self.path("big-%d" % i), numbered_services(3), pmin=low + 2, pmax=low + 3)
                      for i in range(3)]
        procs = [self.start("reserve-group", f, "--allow-unrelated-path") for f in impossible]
        singles = [self.mkdir("frag-more-%d" % i) for i in range(3)]
        procs += [self.start("reserve", "--path", d, "--min", low, "--max", low + 5, "--skip-occupancy-check",
                             "--allow-unrelated-path") for d in singles]
        results = [finish(p) for p in procs]
        for res in results[:3]:
            self.assertError(res, 6, contains="group allocation failed")
        single_ports = []
        for rc, out, err in results[3:]:
            self.assertEqual((rc, err), (0, ""))
            single_ports.append(int(out))
        self.assertEqual(sorted(single_ports), [low + 1, low + 2, low + 3])
        rows = self.rows()
        self.assertFalse([r for r in rows if "/big-" in r[0]], rows)
        self.assertEqual([r for r in rows if r[0].endswith("/frag-1")], before)
        self.assertEqual(len(rows), 4)
        self.assertDataDirValid()

    def test_concurrent_prunes_and_autocleans_remove_each_stale_row_once(self):
        h = self.handle()
        stale = [os.path.join(self.root, "gone", "s%02d" % i) for i in range(12)]
        for path in stale:
            h.reserve(path)
        h.close()
        lives = [self.mkdir("live", "l%d" % i) for i in range(4)]
        cleaners = [self.start(cmd) for cmd in ("prune", "autoclean", "prune", "autoclean")]
        writers = [self.start("reserve", "--path", d, *WIDE) for d in lives]
        cleaned = [finish(p) for p in cleaners]
        written = [finish(p) for p in writers]
        removed = 0
        for rc, out, err in cleaned:
            self.assertEqual((rc, out), (0, ""), err)
            match = re.match(r"Removed (\d+) (total )?reservation\(s\)", err)
            self.assertIsNotNone(match, err)
            removed += int(match.group(1))
        self.assertEqual(removed, len(stale))
        for rc, out, err in written:
            self.assertEqual((rc, err), (0, ""))
        self.assertEqual(sorted((r[0], r[2]) for r in self.rows()),
                         sorted(zip(lives, (int(w[1]) for w in written))))
        self.assertDataDirValid()


class TestConcurrencyScale(TropTestCase):
    RUN_IN_ROOT = True
    SIZES = (1, 8, 32, 128)
    HANDLE_WORKERS, HANDLE_OPS = 8, 300

    def explained(self, kind, rc, err, elapsed):
        """Only exhaustion, or a lock timeout after really waiting --busy-timeout 30, may fail."""
        if rc == 6 and kind == "reserve" and err.startswith("Error: ") and "exhausted" in err:
            return True
        return rc == 2 and err.startswith("Error: database lock timeout while ") and elapsed >= 29

    def run_scale(self, n):
        data = os.path.join(self.root, "data-%d" % n)          # first use: no database yet
        paths = [self.mkdir("scale-%d" % n, "p%03d" % i) for i in range(n)]
        opts = WIDE + ("--busy-timeout", "30")
        env = {"TROP_DATA_DIR": data}
        pending = {}
        for i in range(min(n // 8, 4)):                       # readers race the first-use creation too
            pending[("list", i)] = (self.start("list", "--format", "json", env=env), time.monotonic())
        for i, path in enumerate(paths):
            pending[("reserve", i)] = (self.start("reserve", "--path", path, *opts, env=env), time.monotonic())
        results = {}
        while pending:
            for key, (proc, started) in list(pending.items()):
                if proc.poll() is None:
                    continue
                del pending[key]
                elapsed = time.monotonic() - started
                results[key] = finish(proc) + (elapsed,)
                kind, i = key
                if kind == "reserve" and i % 4 == 0 and results[key][0] == 0:      # a quarter release again
                    pending[("release", i)] = (
                        self.start("release", "--path", paths[i], "--allow-unrelated-path", "--busy-timeout", "30",
                                   env=env), time.monotonic())
            time.sleep(0.005)
        unexplained = [(k, r) for k, r in results.items() if r[0] != 0 and not self.explained(k[0], r[0], r[2], r[3])]
        self.assertEqual(unexplained, [])
        reserved = {i: int(r[1]) for (kind, i), r in results.items() if kind == "reserve" and r[0] == 0}
        released = {i for (kind, i), r in results.items() if kind == "release" and r[0] == 0}
        for (kind, i), (rc, out, err, _t) in results.items():
            if rc == 0 and kind == "reserve":
                self.assertEqual((out, err), ("%d\n" % reserved[i], ""))
            elif rc == 0 and kind == "list":
                self.assertEqual(err, "")
                self.assertIsInstance(json.loads(out), list)
            elif rc == 0:
                self.assertEqual((out, err), ("", "Released reservation successfully\n"))
        kept = {paths[i]: port for i, port in reserved.items() if i not in released}
        self.assertEqual(len(set(kept.values())), len(kept), "duplicate ports among live reservations")
        for port in reserved.values():
            self.assertTrue(20000 <= port <= 40000, port)
        rows = self.rows(3, data)
        self.assertEqual({r[0]: r[2] for r in rows}, kept)       # nothing lost, nothing extra
        self.assertEqual(len(rows), len(kept))
        self.assertTrue(all(r[1] == "" for r in rows))
        self.assertDataDirValid(data)
        return len(reserved), len(released)

    def test_same_key_from_many_processes_gets_one_port(self):
        path = self.mkdir("same")
        procs = [self.start("reserve", "--path", path, "--tag", "web", *WIDE) for _ in range(12)]
        results = [finish(p) for p in procs]
        self.assertEqual({r[0] for r in results}, {0}, results)
        self.assertEqual({r[2] for r in results}, {""})
        self.assertEqual(len({r[1] for r in results}), 1, results)
        self.assertEqual(self.rows(3), [(path, "web", int(results[0][1]))])
        self.assertDataDirValid()

    HANDLE_WORKER = r"""
import json, os, random, sys, trop
data, root, w, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng, held, errors, exhausted = random.Random(w), {}, [], 0
with trop.Trop(data_dir=data, allow_unrelated_path=True, skip_occupancy_check=True, min=21000, max=21015,
               busy_timeout=30) as t:
    for i in range(ops):
        path = os.path.join(root, "h%d" % w, "k%d" % rng.randrange(4))
        if path in held and rng.random() < 0.5:
            if t.release(path) != 1:
                errors.append("release of %s did not delete one row" % path)
            del held[path]
        else:
            try:
                port = t.reserve(path)
            except trop.TropError as exc:           # 8 workers x 4 keys > 16 ports: exhaustion is expected
                if exc.exit_code != 6 or "exhausted after cleanup" not in str(exc) or path in held:
                    errors.append("%s: %s" % (type(exc).__name__, exc))
                exhausted += 1
                continue
            if held.get(path, port) != port:
                errors.append("port of %s moved from %s to %s" % (path, held[path], port))
            held[path] = port
print(json.dumps({"held": held, "errors": errors, "exhausted": exhausted}))
"""

    def test_long_lived_handles_in_parallel_processes(self):
        """Handles keep one connection (and a port cache) across calls while others commit."""
        for w in range(self.HANDLE_WORKERS):
            for k in range(4):
                self.mkdir("h%d" % w, "k%d" % k)
        self.assertEqual(self.trop("init")[0], 0)
        procs = [self.start_python(self.HANDLE_WORKER, self.data, self.root, w, self.HANDLE_OPS)
                 for w in range(self.HANDLE_WORKERS)]
        held = {}
        for p in procs:
            rc, out, err = finish(p)
            self.assertEqual((rc, err), (0, ""))
            report = json.loads(out)
            self.assertEqual(report["errors"], [])
            held.update(report["held"])
        self.assertEqual({r[0]: r[2] for r in self.rows()}, held)
        self.assertEqual(len(set(held.values())), len(held))
        self.assertDataDirValid()

    def test_scale_matrix(self):
        for n in self.SIZES:
            with self.subTest(processes=n):
                reserved, released = self.run_scale(n)
                self.assertEqual((reserved, released), (n, (n + 3) // 4))


@POSIX_ONLY
class TestConcurrencyFaults(TropTestCase):
    RUN_IN_ROOT = True
    API_KILL_ROUNDS, CLI_KILL_ROUNDS, FIRST_USE_ROUNDS = 10, 4, 4

    # A writer that loops over every kind of mutating operation until it is killed.  It
    # prints "ready" once imported, then "<iteration> <operation>" before each operation.
    HAMMER = r"""
import os, sys, trop
data, root, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = trop.Trop(data_dir=data, allow_unrelated_path=True, skip_occupancy_check=True, min=20000, max=40000,
              busy_timeout=30)
groups = [os.path.join(root, "groups", "g%d" % k, "trop.yaml") for k in range(3)]
rel = [os.path.join(root, "rel", "g%d" % k, "trop.yaml") for k in range(2)]
mig_a, mig_b = os.path.join(root, "mig", "a"), os.path.join(root, "mig", "b")
def say(what):
    sys.stdout.write("%d %s\n" % (i, what))
    sys.stdout.flush()
say("ready")
while True:
    say("group"); t.reserve_group(groups[i % 3])
    say("release"); t.release(os.path.dirname(groups[(i + 1) % 3]))
    say("group"); t.reserve_group(rel[0])
    say("group"); t.reserve_group(rel[1])
    say("release-recursive"); t.release(os.path.join(root, "rel"), recursive=True)
    src, dst = (mig_a, mig_b) if t.list(filter_path=mig_a) else (mig_b, mig_a)
    say("migrate"); t.migrate(src, dst, recursive=True)
    say("reserve"); t.reserve(os.path.join(root, "stale", "s%d" % i))
    say("reserve"); t.reserve(os.path.join(root, "live", "l%d" % (i % 4)), tag="t%d" % (i % 3))
    if i % 2:
        say("prune"); t.prune()
    else:
        say("autoclean"); t.autoclean()
    i += 1
"""

    def make_fixtures(self):
        """Group files, a migration tree (3 rows under mig/a), live dirs; returns the layout."""
        groups = [self.group_file(self.path("groups", "g%d" % k), numbered_services(5), pmin=30000, pmax=39999)
                  for k in range(3)]
        rel = [self.group_file(self.path("rel", "g%d" % k), numbered_services(3), pmin=30000, pmax=39999)
               for k in range(2)]
        for side in ("a", "b"):
            for sub in ("", "x", "y"):
                self.mkdir("mig", side, sub)
        for k in range(4):
            self.mkdir("live", "l%d" % k)
        self.mkdir("stale")
        h = self.handle()
        mig_a = os.path.join(self.root, "mig", "a")
        h.reserve(mig_a)
        h.reserve(mig_a + "/x", tag="web")
        h.reserve(mig_a + "/y")
        h.close()
        return [os.path.dirname(g) for g in groups], [os.path.dirname(g) for g in rel]

    def check_invariants(self, groups, sizes, rel_dirs):
        rows = self.rows(3)
        self.assertUniquePorts(rows)
        for g, size in zip(groups, sizes):
            count = len([r for r in rows if r[0] == g and r[1] != ""])
            self.assertIn(count, (0, size), "partial group at %s: %r" % (g, rows))
        if rel_dirs:
            counts = tuple(len([r for r in rows if r[0] == d]) for d in rel_dirs)
            self.assertIn(counts, ((0, 0), (3, 0), (3, 3)), "partial recursive release: %r" % (counts,))
        mig = os.path.join(self.root, "mig")
        moved = sorted((r[0][len(mig) + 2:], r[1]) for r in rows if r[0].startswith(mig + "/"))
        self.assertEqual(moved, [("", ""), ("/x", "web"), ("/y", "")], "partial migration: %r" % (rows,))
        sides = {r[0][len(mig) + 1] for r in rows if r[0].startswith(mig + "/")}
        self.assertEqual(len(sides), 1, "migration split across a and b: %r" % (rows,))
        self.assertDataDirValid()
        return rows

    def test_sigkill_of_an_api_writer_at_random_moments(self):
        groups, rel = self.make_fixtures()
        rng = random.Random(os.getpid())
        last_ops = []
        for round_no in range(self.API_KILL_ROUNDS):
            with self.subTest(round=round_no):
                proc = self.start_python(self.HAMMER, self.data, self.root, round_no * 1000)
                line = proc.stdout.readline()
                self.assertEqual(line, "%d ready\n" % (round_no * 1000), proc.stderr.read() if not line else "")
                time.sleep(rng.uniform(0, 0.06))
                os.kill(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                self.assertEqual(proc.returncode, -signal.SIGKILL, err)
                self.assertEqual(err, "")
                lines = out.splitlines()
                last_ops.append(lines[-1] if lines else "ready")
                self.check_invariants(groups + rel, (5, 5, 5, 3, 3), rel)
        self.assertTrue([op for op in last_ops if not op.endswith("ready")], last_ops)
        port = self.trop("reserve", "--path", self.mkdir("after"), *WIDE)
        self.assertEqual(port[0], 0, port)
        self.assertIn((self.root + "/after", "", int(port[1])), self.rows(3))
        self.assertDataDirValid()

    def test_sigkill_of_cli_writers_at_random_moments(self):
        # Interpreter start-up alone takes ~80 ms, so a fixed 0-60 ms delay would kill nearly every
        # CLI writer before it opens the database: kill each at a random moment of a window measured
        # by an unkilled round 0 instead (the API test above kills at 0-60 ms into a busy loop).
        groups, rel = self.make_fixtures()
        rng = random.Random(os.getpid() + 1)
        rel_root = os.path.join(self.root, "rel")
        mig_a, mig_b = os.path.join(self.root, "mig", "a"), os.path.join(self.root, "mig", "b")
        window = None
        for round_no in range(self.CLI_KILL_ROUNDS):
            with self.subTest(round=round_no):
                h = self.handle()
                for g in groups[:2]:
                    h.release(g)
                for r in rel:
                    h.reserve_group(os.path.join(r, "trop.yaml"))
                for i in range(3):
                    h.reserve(os.path.join(self.root, "stale", "r%d-%d" % (round_no, i)))
                src, dst = (mig_a, mig_b) if h.list(filter_path=mig_a) else (mig_b, mig_a)
                h.close()
                commands = [("reserve", "--path", self.root + "/live/l%d" % k, "--tag", "r%d" % round_no)
                            + WIDE for k in range(3)]
                commands += [("reserve-group", os.path.join(g, "trop.yaml"), "--allow-unrelated-path")
                             for g in groups[:2]]
                commands += [("prune",), ("autoclean",), ("migrate", "--from", src, "--to", dst, "--recursive"),
                             ("release", "--path", rel_root, "--recursive", "--allow-unrelated-path")]
                started = time.monotonic()
                procs = [self.start(*c) for c in commands]
                if window is None:            # round 0 measures how long the writers live, unkilled
                    results = [finish(p) for p in procs]
                    self.assertEqual([r[0] for r in results], [0] * len(procs), results)
                    window = time.monotonic() - started
                else:
                    killers = [threading.Timer(rng.uniform(0, window), self._kill, (p,)) for p in procs]
                    for k in killers:
                        k.start()
                    for k in killers:
                        k.join()
                    for p, c in zip(procs, commands):
                        rc, out, err = finish(p)
                        self.assertIn(rc, (0, -signal.SIGKILL), (c, err))
                self.check_invariants(groups + rel, (5, 5, 5, 3, 3), None)
                rows = self.rows(3)
                self.assertIn(tuple(len([r for r in rows if r[0] == d]) for d in rel), ((0, 0), (3, 3)))
        port = self.trop("reserve", "--path", self.mkdir("after"), *WIDE)
        self.assertEqual(port[0], 0, port)
        self.assertDataDirValid()

    @staticmethod
    def _kill(proc):
        try:
            proc.send_signal(signal.SIGKILL)
        except OSError:
            pass

    def test_first_use_killed_then_next_command_works(self):
        """Writers killed while creating the database: the next command creates or finds a valid one."""
        rng = random.Random(os.getpid() + 2)
        for round_no in range(self.FIRST_USE_ROUNDS):
            with self.subTest(round=round_no):
                data = os.path.join(self.root, "first-%d" % round_no)
                procs = [self.start("reserve", "--path", self.mkdir("first", "%d-%d" % (round_no, i)), *WIDE,
                                    env={"TROP_DATA_DIR": data}) for i in range(4)]
                time.sleep(0.05 + rng.uniform(0, 0.1))
                for p in procs:
                    self._kill(p)
                for p in procs:
                    finish(p)
                rc, out, err = self.trop("reserve", "--path", self.mkdir("first", "%d-after" % round_no),
                                         *WIDE, env={"TROP_DATA_DIR": data})
                self.assertEqual((rc, err), (0, ""))
                self.assertIn((self.root + "/first/%d-after" % round_no, "", int(out)), self.rows(3, data))
                self.assertDataDirValid(data)

    def test_every_writer_times_out_while_the_lock_is_held(self):
        group = self.group_file(self.path("grp"), numbered_services(2), pmin=30000, pmax=39999)
        h = self.handle()
        h.reserve(self.mkdir("old"))
        h.reserve(self.root + "/gone")
        h.reserve(self.mkdir("from"))
        h.close()
        before = self.rows()
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=0)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        quiet = ("--quiet", "--busy-timeout", "1")
        commands = [("reserve", "--path", self.root + "/new") + WIDE,
                    ("release", "--path", self.root + "/old", "--allow-unrelated-path"),
                    ("reserve-group", group, "--allow-unrelated-path"), ("autoreserve",), ("prune",),
                    ("expire", "--days", "1"), ("autoclean", "--days", "1"),
                    ("migrate", "--from", self.root + "/from", "--to", self.root + "/to")]
        started = time.monotonic()
        procs = [(self.start(*(c + quiet), cwd=os.path.dirname(group)), c) for c in commands]
        for proc, command in procs:
            result = finish(proc)
            elapsed = time.monotonic() - started
            self.assertEqual(result, (2, "", LOCK_TIMEOUT_1S), command)   # the 1 s timeout, not the default
            self.assertGreaterEqual(elapsed, 0.8, command)                  # and it did wait
        self.assertEqual(self.rows(), before)
        conn.execute("ROLLBACK")
        self.assertEqual(self.trop("reserve", "--path", self.root + "/new", "--busy-timeout", "1", *WIDE)[0], 0)

    LOCKER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO reservations VALUES ('/uncommitted', '', 29999, NULL, NULL, 0, 0)")
print("locked", flush=True)
time.sleep(120)
"""

    def test_lock_of_a_killed_process_is_released(self):
        self.assertEqual(self.trop("init")[0], 0)
        locker = self.start_python(self.LOCKER, self.db)
        self.assertEqual(locker.stdout.readline(), "locked\n")
        rc, out, err = self.trop("reserve", "--path", self.root + "/w", "--busy-timeout", "1", *WIDE)
        self.assertEqual((rc, out, err), (2, "", LOCK_TIMEOUT_1S))
        os.kill(locker.pid, signal.SIGKILL)
        locker.communicate()
        self.mkdir("w")
        rc, out, err = self.trop("reserve", "--path", self.root + "/w", "--busy-timeout", "5", *WIDE)
        self.assertEqual((rc, err), (0, ""))        # a lock still held would be a timeout (exit 2)
        self.assertEqual(self.rows(3), [(self.root + "/w", "", int(out))])
        self.assertDataDirValid()


class TestConcurrencyInOneProcess(TropTestCase):
    """Threads and forked children of one program using the API (each run in a child process,
    so that a crash of the interpreter fails the test instead of the test run)."""

    THREADS = r"""
import json, os, sys, threading, trop
data, root, mode, ops = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
opts = dict(data_dir=data, allow_unrelated_path=True, skip_occupancy_check=True, min=20000, max=20999,
            busy_timeout=30)
shared = trop.Trop(**opts) if mode == "shared" else None
reserve = shared.reserve if shared else (lambda path: trop.reserve(path, None, **opts))
release = shared.release if shared else (lambda path: trop.release(path, None, **opts))
errors, held, lock = [], {}, threading.Lock()
def work(w):
    mine = {}
    for i in range(ops):
        path = os.path.join(root, "t%d" % w, "k%d" % (i % 3))
        try:
            port = reserve(path)
            if mine.get(path, port) != port:
                errors.append("port of %s moved from %s to %s" % (path, mine[path], port))
            mine[path] = port
            if i % 2:
                if release(path) != 1:
                    errors.append("release of %s did not delete one row" % path)
                del mine[path]
        except Exception as exc:
            errors.append("%s: %s" % (type(exc).__name__, exc))
    with lock:
        held.update(mine)
threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"errors": sorted(set(errors))[:6], "error_count": len(errors), "held": held}))
"""

    def run_threads(self, mode, ops):
        self.assertEqual(self.trop("init")[0], 0)
        rc, out, err = finish(self.start_python(self.THREADS, self.data, self.root, mode, ops))
        self.assertEqual((rc, err), (0, ""), "child exit %s (-11 = segmentation fault)" % rc)
        report = json.loads(out)
        self.assertEqual((report["error_count"], report["errors"]), (0, []))
        self.assertEqual({r[0]: r[2] for r in self.rows()}, report["held"])
        self.assertDataDirValid()

    def test_one_handle_shared_by_threads(self):
        """A Trop handle used by several threads: every call is still its own transaction."""
        self.run_threads("shared", 150)

    def test_module_functions_called_from_threads(self):
        self.run_threads("module", 40)

    FORK = r"""
import json, multiprocessing, os, sys, trop
data, root = sys.argv[1], sys.argv[2]
h = trop.Trop(data_dir=data, allow_unrelated_path=True, skip_occupancy_check=True, min=20000, max=20999,
              busy_timeout=30)
h.reserve(os.path.join(root, "parent-first"))
def work(name, queue):
    mine = {}
    try:
        for i in range(60):
            path = os.path.join(root, name, "k%d" % (i % 3))
            mine[path] = h.reserve(path)
            if i % 2:
                h.release(path)
                del mine[path]
        queue.put(mine)
    except Exception as exc:
        queue.put("%s: %s" % (type(exc).__name__, exc))
ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
children = [ctx.Process(target=work, args=("child-%d" % w, queue)) for w in range(3)]
for c in children:
    c.start()
results = []
work("parent", queue)
results = [queue.get() for _ in range(4)]
for c in children:
    c.join()
held = {os.path.join(root, "parent-first"): h.list(filter_path=os.path.join(root, "parent-first"))[0].port}
errors = [r for r in results if not isinstance(r, dict)]
for r in results:
    if isinstance(r, dict):
        held.update(r)
print(json.dumps({"errors": errors, "exits": [c.exitcode for c in children], "held": held}))
"""

    @unittest.skipUnless(sys.platform.startswith("linux"), "fork start method")
    def test_handle_inherited_by_forked_children(self):
        """After fork, parent and children each keep working through the same handle object."""
        rc, out, err = finish(self.start_python(self.FORK, self.data, self.root))
        self.assertEqual((rc, err), (0, ""))
        report = json.loads(out)
        self.assertEqual((report["errors"], report["exits"]), ([], [0, 0, 0]))
        self.assertEqual({r[0]: r[2] for r in self.rows()}, report["held"])
        self.assertDataDirValid()


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc/self/fd")
class TestResourceUsage(TropTestCase):
    CHILD = r"""
import json, os, sys, trop
data, mode, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])
def fds():
    return len(os.listdir("/proc/self/fd"))
def wal():
    path = os.path.join(data, "trop.db-wal")
    return os.path.getsize(path) if os.path.exists(path) else 0
opts = dict(data_dir=data, allow_unrelated_path=True, skip_occupancy_check=True, min=20000, max=20999)
paths = [os.path.join(data, "k%d" % k) for k in range(7)]
if mode == "handle":
    h = trop.Trop(**opts)
    reserve, release = h.reserve, h.release
else:
    reserve = lambda p, tag: trop.reserve(p, tag, **opts)
    release = lambda p, tag: trop.release(p, tag, **opts)
out = {"fd_start": fds()}
ports = set()
for i in range(cycles):
    path, tag = paths[i % 7], ("t%d" % (i % 3) if i % 2 else None)
    ports.add(reserve(path, tag))
    if release(path, tag) != 1:
        raise SystemExit("release of %s:%s did not delete one row" % (path, tag))
    if i + 1 == 100:
        out["fd_100"] = fds()
    if i + 1 == 1000:
        out["wal_1000"] = wal()
out["fd_end"] = fds()
out["wal_end"] = wal()
if mode == "handle":
    h.close()
    out["fd_closed"] = fds()
out["ports"] = sorted(ports)
print(json.dumps(out))
"""

    def measure(self, mode, cycles):
        h = self.handle()
        for i in range(40):                       # other rows, so allocation has work to do
            h.reserve(self.root + "/bg-%d" % i)
        h.close()
        # Another process (this one) keeps the database open, as concurrent users do.  Without it
        # every module-level call is the last connection to close, and SQLite checkpoints and
        # deletes the WAL on that close: ~1 ms CPU but 2-15 ms of fsync-bound wall time per call.
        keeper = sqlite3.connect(self.db)
        self.addCleanup(keeper.close)
        keeper.execute("SELECT COUNT(*) FROM reservations").fetchone()
        rc, out, err = finish(self.start_python(self.CHILD, self.data, mode, cycles))
        keeper.close()
        self.assertEqual((rc, err), (0, ""))
        result = json.loads(out)
        self.assertEqual(result["fd_end"], result["fd_100"], result)
        self.assertLess(result["wal_1000"], 8 * 1024 * 1024)
        self.assertLess(result["wal_end"], 8 * 1024 * 1024)
        self.assertTrue(set(result["ports"]) <= set(range(20040, 21000)), result["ports"][:5])
        self.assertEqual(len(self.rows()), 40)
        self.assertDataDirValid()
        return result

    def test_handle_ten_thousand_cycles(self):
        result = self.measure("handle", 10000)
        self.assertLessEqual(result["fd_closed"], result["fd_start"], result)

    def test_module_functions_two_thousand_calls(self):
        result = self.measure("module", 1000)
        self.assertEqual(result["fd_100"], result["fd_start"], result)


@unittest.skipUnless(STRESS, "set TROP_STRESS=1 to run the stress tests")
class TestConcurrencyStress(TropTestCase):
    WORKER = r"""
import json, os, sys, trop
data, root, w = sys.argv[1], sys.argv[2], int(sys.argv[3])
with trop.Trop(data_dir=data, allow_unrelated_path=True, skip_occupancy_check=True, min=10000, max=40000,
               busy_timeout=120) as t:
    ports = [t.reserve(os.path.join(root, "w%03d" % w, "r%03d" % i)) for i in range(100)]
print(json.dumps(ports))
"""

    def report(self, text):
        sys.stderr.write("\n  [stress] %s " % text)
        sys.stderr.flush()

    def test_ten_thousand_reservations_from_a_hundred_workers(self):
        self.assertEqual(self.trop("init")[0], 0)
        started = time.monotonic()
        workers = [self.start_python(self.WORKER, self.data, self.root, w) for w in range(100)]
        results = [finish(p, timeout=900) for p in workers]
        elapsed = time.monotonic() - started
        expected = {}
        for w, (rc, out, err) in enumerate(results):
            self.assertEqual((rc, err), (0, ""))
            for i, port in enumerate(json.loads(out)):
                expected[os.path.join(self.root, "w%03d" % w, "r%03d" % i)] = port
        self.assertEqual(len(expected), 10000)
        self.assertEqual(len(set(expected.values())), 10000)
        self.assertTrue(all(10000 <= p <= 40000 for p in expected.values()))
        rows = self.rows(3)
        self.assertEqual({r[0]: r[2] for r in rows}, expected)
        self.assertEqual(len(rows), 10000)
        self.assertDataDirValid()
        self.report("10,000 reservations by 100 workers: %.1fs" % elapsed)

    def test_thousand_cli_reserve_release_cycles(self):
        path = self.mkdir("cycle")
        started = time.monotonic()
        ports = set()
        for i in range(1000):
            rc, out, err = self.trop("reserve", "--path", path, *WIDE)
            self.assertEqual((rc, err), (0, ""), i)
            ports.add(int(out))
            self.assertEqual(self.trop("release", "--path", path, "--quiet", "--allow-unrelated-path"),
                             (0, "", ""))
        elapsed = time.monotonic() - started
        self.assertEqual(ports, {20000})
        self.assertEqual(self.rows(), [])
        self.assertDataDirValid()
        self.report("1,000 CLI reserve/release cycles: %.1fs (%.1f ms per command)" % (elapsed, elapsed / 2))

    def test_list_timing_with_a_thousand_rows(self):
        h = self.handle()
        for i in range(1000):
            h.reserve(self.root + "/perf-%04d" % i)
        h.close()
        times = []
        for _ in range(100):
            started = time.monotonic()
            rc, out, err = self.trop("list")
            times.append(time.monotonic() - started)
            self.assertEqual((rc, err), (0, ""))
            self.assertEqual(len(out.splitlines()), 1001)
        self.report("list at 1,000 rows: mean %.1f ms, max %.1f ms over 100 runs"
                    % (1000 * sum(times) / len(times), 1000 * max(times)))


# --- Operations: servers on reserved ports (wait, who, socket handoff) ---------
#
# Real servers, started by the tests as child processes (or, for the API, as sockets of this process):
# `trop wait` until they answer, `trop who` naming them, and `trop run --listen` handing them bound
# sockets.  No assertion bounds how long anything takes; waits are bounded by generous timeouts only.

def _loopback_ipv6():
    """Can this host listen on ::1?  (No where IPv6 is disabled or absent.)"""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _loopback_ipv6()
NO_IPV6 = "this host cannot listen on ::1 (no IPv6)"
WAIT_READY = r"%d: ready on %s \(%s\) after \d+\.\d\ds\n"      # one line of `trop wait` per port

# A TCP listener: ADDRESS PORT [DELAY]; sleeps DELAY seconds, listens, prints one line, then accepts and
# closes connections until killed.
LISTENER_CHILD = """\
import os, socket, sys, time
address, port = sys.argv[1], int(sys.argv[2])
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
family = socket.AF_INET6 if ":" in address else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET6:
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
sock.bind((address, port))
sock.listen(16)
print("listening", os.getpid(), os.getcwd(), flush=True)
while True:
    conn, _peer = sock.accept()
    conn.close()
"""

# An HTTP server answering every GET with one status: PORT STATUS [ADDRESS]; prints one line once listening.
STATUS_CHILD = """\
import http.server, socket, sys
port, status = int(sys.argv[1]), int(sys.argv[2])
address = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        http.server.HTTPServer.server_bind(self)

server = Server((address, port), Handler)
print("listening", flush=True)
server.serve_forever()
"""

# The command of `trop run --listen`: serves HTTP on every inherited socket (fds 3, 4, ...), prints one JSON
# line (its pid, the LISTEN_* variables, what each fd is, any fd open beyond them) and answers every GET with
# that report plus the fd and service name that took the request.
SOCKET_ACTIVATED_CHILD = """\
import http.server, json, os, socket, sys, threading

def inherited(fd):
    if sys.version_info >= (3, 7):
        return socket.socket(fileno=fd)                 # family and type read from the descriptor
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)   # 3.6 takes them as given: ask the fd
    family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    probe.detach()
    return socket.socket(family, socket.SOCK_STREAM, 0, fd)

count = int(os.environ["LISTEN_FDS"])
extra = []
for fd in range(3 + count, 3 + count + 32):
    try:
        os.fstat(fd)
    except OSError:
        continue
    extra.append(fd)
report = {"pid": os.getpid(), "cwd": os.getcwd(), "extra_fds": extra, "sockets": [],
          "LISTEN_FDS": os.environ.get("LISTEN_FDS"), "LISTEN_PID": os.environ.get("LISTEN_PID"),
          "LISTEN_FDNAMES": os.environ.get("LISTEN_FDNAMES")}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(dict(report, path=self.path, fd=self.server.fd, name=self.server.name)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Inherited(http.server.HTTPServer):
    def __init__(self, sock, fd, name):
        self.address_family = sock.family
        http.server.HTTPServer.__init__(self, sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()                             # the unbound socket TCPServer made: use the inherited one
        self.socket, self.fd, self.name = sock, fd, name

for index, name in enumerate(os.environ["LISTEN_FDNAMES"].split(":")):
    sock = inherited(3 + index)
    address = sock.getsockname()
    report["sockets"].append({"fd": 3 + index, "name": name, "address": address[0], "port": address[1],
                              "family": "ipv6" if sock.family == socket.AF_INET6 else "ipv4"})
    threading.Thread(target=Inherited(sock, 3 + index, name).serve_forever, daemon=True).start()
print(json.dumps(report), flush=True)
threading.Event().wait()
"""


def first_line(proc, timeout=TIMEOUT):
    """The first line a started child prints (without the newline); fails if it exits or stays silent."""
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        raise AssertionError("%s printed no line (exit %s): %s" % (" ".join(proc.args), proc.wait(),
                                                                    proc.stderr.read()))
    return lines[0].rstrip("\n")


def process_comm(pid):
    """The name the kernel gives pid (what trop reports as its process)."""
    with open("/proc/%d/comm" % pid) as fh:
        return fh.read().strip()


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """In-process HTTP server for the API tests: every GET answers the server's status."""
    def do_GET(self):
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class ServerCase(TropTestCase):
    """Tests that start servers: children killed and reaped when the test ends."""

    def python(self, *args, cwd=None):
        """Start `python ARGS` (a server) in cwd (default self.root) with self.env."""
        return self._started(spawn([sys.executable] + list(args), cwd or self.root, self.env))

    def serve(self, code, *args, cwd=None):
        """Start `python -c CODE ARGS` (a server) in cwd (default self.root) with self.env."""
        return self.python("-c", code, *args, cwd=cwd)

    def listener(self, address, port, delay=0, cwd=None):
        """A child listening on (address, port) after delay seconds; returns the started process."""
        return self.serve(LISTENER_CHILD, address, port, delay, cwd=cwd)

    def ready_listener(self, address, port, cwd=None):
        """A child already listening on (address, port) (it said so)."""
        proc = self.listener(address, port, cwd=cwd)
        self.assertTrue(first_line(proc).startswith("listening %d " % proc.pid))
        return proc

    def http_server(self, port, status=200, address="127.0.0.1"):
        """In this process: an HTTP server answering status to every GET, shut down when the test ends."""
        server = http.server.HTTPServer((address, port), _StatusHandler)
        server.status = status
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(thread.join, 60)
        self.addCleanup(server.shutdown)
        return server

    def reserve_ports(self, port, *tags, path=None, **options):
        """Reserve tags of path (default self.proj) at port, port + 1, ... (in this process, without probes)."""
        with trop.Trop(data_dir=self.data, allow_unrelated_path=True, skip_occupancy_check=True, min=port,
                       max=port + len(tags) - 1, busy_timeout=30, **options) as handle:
            ports = [handle.reserve(path or self.proj, tag) for tag in tags]
        self.assertEqual(ports, list(range(port, port + len(tags))))

    def hold_write_lock(self):
        """Another connection holding trop.db's write lock (BEGIN IMMEDIATE) until the test ends."""
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=0)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        self.addCleanup(conn.execute, "ROLLBACK")
        return conn


class TestWaitForServers(ServerCase):
    """`trop wait` against real servers: Python's http.server, a listener that starts late, IPv6 only."""

    def test_http_server_reached_with_http_path(self):
        port = self.free_block(1)
        self.reserve_ports(port, "web")
        site = self.mkdir("site")
        self.write(os.path.join(site, "index.html"), "<p>hello</p>\n")
        self.python("-m", "http.server", port, "--bind", "127.0.0.1", cwd=site)
        rc, out, err = self.trop("wait", "--tag", "web", "--http", "/", "--timeout", "120")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, r"127\.0\.0\.1", "IPv4")))
        # Ready now: a 404 (status below 500) counts, --quiet prints nothing, the path gets its leading /.
        self.assertEqual(self.trop("wait", "--tag", "web", "--http", "no-such-page", "--quiet", "--timeout", "120"),
                         (0, "", ""))
        rc, out, err = self.trop("wait", "--port", str(port), "--timeout", "120", "--interval", "0.05")
        self.assertEqual((rc, err), (0, ""))
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, r"127\.0\.0\.1", "IPv4")))
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=60)) as conn:
            conn.request("GET", "/")                           # the server still serves after wait's knocks
            response = conn.getresponse()
            self.assertEqual((response.status, response.read()), (200, b"<p>hello</p>\n"))

    def test_listener_that_starts_late(self):
        port = self.free_block(1)
        with self.assertRaises(ConnectionRefusedError):        # nothing listens yet
            socket.create_connection(("127.0.0.1", port), timeout=60).close()
        child = self.listener("127.0.0.1", port, delay=1)      # listens about a second after it starts
        rc, out, err = self.trop("wait", "--port", str(port), "--timeout", "120", "--interval", "0.1")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, r"127\.0\.0\.1", "IPv4")))
        self.assertEqual(first_line(child), "listening %d %s" % (child.pid, self.root))
        self.assertIsNone(child.poll())

    @unittest.skipUnless(HAS_IPV6, NO_IPV6)
    def test_ipv6_only_listener(self):
        port = self.free_block(2)
        self.ready_listener("::1", port)
        rc, out, err = self.trop("wait", "--port", str(port), "--timeout", "120")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, "::1", "IPv6")))
        # With --http: an HTTP server on ::1 only (127.0.0.1 refuses, ::1 answers).
        http_port = port + 1
        self.assertEqual(first_line(self.serve(STATUS_CHILD, http_port, 204, "::1")), "listening")
        rc, out, err = self.trop("wait", "--port", str(http_port), "--http", "/health", "--timeout", "120")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (http_port, "::1", "IPv6")))

    def test_both_families_ipv4_first(self):
        port = self.free_block(1)
        self.ready_listener("127.0.0.1", port)
        if HAS_IPV6:
            self.ready_listener("::1", port)
        rc, out, err = self.trop("wait", "--port", str(port), "--timeout", "120")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, r"127\.0\.0\.1", "IPv4")))


class TestWaitOutcomes(ServerCase):
    """wait's failures and targets: timeouts (exit 1), not found (exit 6), --group, and read-only use."""

    def test_timeout_names_the_port_and_what_was_seen(self):
        port = self.free_block(1)
        self.reserve_ports(port, "web")
        self.assertError(self.trop("wait", "--tag", "web", "--timeout", "0.5", "--interval", "0.1"), 1,
                         startswith="timed out after 0.5s waiting for port %d (last seen: connection refused on "
                                    "127.0.0.1; " % port)
        self.assertError(self.trop("wait", "--port", str(port), "--timeout", "0"), 1,
                         startswith="timed out after 0s waiting for port %d (last seen: connection refused on "
                                    "127.0.0.1" % port)
        if HAS_IPV6:
            self.assertError(self.trop("wait", "--port", str(port), "--timeout", "0"), 1,
                             "timed out after 0s waiting for port %d (last seen: connection refused on 127.0.0.1; "
                             "connection refused on ::1)" % port)

    def test_http_500_is_not_ready(self):
        port = self.free_block(1)
        self.assertEqual(first_line(self.serve(STATUS_CHILD, port, 500)), "listening")
        rc, out, err = self.trop("wait", "--port", str(port), "--timeout", "120")     # it does accept
        self.assertEqual((rc, err), (0, ""), out)
        self.assertError(self.trop("wait", "--port", str(port), "--http", "/health", "--timeout", "1"), 1,
                         startswith="timed out after 1s waiting for port %d (last seen: HTTP 500 from 127.0.0.1"
                                    % port)

    def test_not_found_exit_6_and_no_database(self):
        self.assertError(self.trop("wait", "--tag", "nope", "--timeout", "0"), 6,
                         "not found: no reservation for %s:nope (reserve it first, or give --port)" % self.proj)
        self.assertError(self.trop("wait", "--timeout", "0"), 6,
                         "not found: no reservation for %s (reserve it first, or give --port)" % self.proj)
        self.assertFalse(os.path.exists(self.data), "wait created the data directory")
        port = self.free_block(1)
        self.reserve_ports(port, "web")
        self.assertError(self.trop("wait", "--tag", "api", "--timeout", "0"), 6,
                         "not found: no reservation for %s:api (reserve it first, or give --port)" % self.proj)
        group = self.mkdir("g")
        self.assertError(self.trop("wait", "--group", "--timeout", "0", cwd=group), 4,
                         "No trop configuration file found (searched from: %s)" % group)
        self.group_file(group, [("web", {})], pmin=port, pmax=port)
        self.assertError(self.trop("wait", "--group", "--timeout", "0", cwd=group), 6,
                         "not found: no group is reserved at %s (run `trop autoreserve` first)" % group)

    def test_group_waits_for_every_service(self):
        port = self.free_block(3)
        group = self.mkdir("shop")
        self.group_file(group, [("web", {}), ("api", {"offset": 1}), ("db", {"offset": 2})],
                        pmin=port, pmax=port + 2)
        self.ok("autoreserve", "--quiet", cwd=group)
        self.ready_listener("127.0.0.1", port, cwd=group)
        self.listener("127.0.0.1", port + 1, delay=1, cwd=group)               # two start late
        self.listener("127.0.0.1", port + 2, delay=2, cwd=group)
        rc, out, err = self.trop("wait", "--group", "--timeout", "120", "--interval", "0.1",
                                 cwd=self.mkdir("shop", "src"))                 # the group is found from below too
        self.assertEqual((rc, err), (0, ""), out)
        lines = sorted(out.splitlines(True))
        self.assertEqual(len(lines), 3, out)
        for offset, line in enumerate(lines):
            self.assertRegex(line, "^%s$" % (WAIT_READY % (port + offset, r"127\.0\.0\.1", "IPv4")))

    def test_bad_arguments(self):
        port = str(self.free_block(1))
        for args, code, text in ((("--port", port, "--timeout", "-1"), 2, "invalid value '-1': expected seconds"),
                                 (("--port", port, "--interval", "x"), 2, "invalid value 'x': expected seconds"),
                                 (("--port", port, "--tag", "web"), 2, "not allowed with argument"),
                                 (("--port", "0"), 4, "Error: Invalid port number"),
                                 (("--port", "65536"), 4, "Error: Invalid port number")):
            with self.subTest(args=args):
                rc, out, err = self.trop("wait", *args)
                self.assertEqual((rc, out), (code, ""), err)
                self.assertIn(text, err)

    def test_group_timeout_names_only_the_missing_services(self):
        port = self.free_block(2)
        group = self.mkdir("shop")
        self.group_file(group, [("web", {}), ("api", {"offset": 1})], pmin=port, pmax=port + 1)
        self.ok("autoreserve", "--quiet", cwd=group)
        web = self.listen("tcp", "127.0.0.1", port)                                # web is up, api is not
        rc, out, err = self.trop("wait", "--group", "--timeout", "0.5", cwd=group)
        self.assertEqual(rc, 1, err)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, r"127\.0\.0\.1", "IPv4")))
        self.assertTrue(err.startswith("Error: timed out after 0.5s waiting for port %d (last seen: connection "
                                       "refused on 127.0.0.1" % (port + 1)), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertNotIn("port %d " % port, err)
        web.close()                           # nothing up: one Error line names both, in the group's (tag) order
        self.assertError(self.trop("wait", "--group", "--timeout", "0", cwd=group), 1, contains=[
            "waiting for port %d (last seen: connection refused on 127.0.0.1" % (port + 1),
            "; port %d (last seen: connection refused on 127.0.0.1" % port])

    def test_works_under_the_write_lock_and_writes_nothing(self):
        port = self.free_block(1)
        # No data directory at all: --port needs none, and wait creates none (who neither).
        self.listen("tcp", "127.0.0.1", port)
        rc, out, err = self.trop("wait", "--port", str(port), "--timeout", "120")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertEqual(self.trop("who", str(port), "--format", "json")[0], 0)
        self.assertFalse(os.path.exists(self.data), "wait or who created the data directory")
        # Another connection holds BEGIN IMMEDIATE: wait and who still read, without waiting for the lock.
        self.reserve_ports(port, "web")
        before = self.rows()
        self.hold_write_lock()
        rc, out, err = self.trop("wait", "--tag", "web", "--timeout", "120", "--busy-timeout", "0")
        self.assertEqual((rc, err), (0, ""), out)
        self.assertRegex(out, "^%s$" % (WAIT_READY % (port, r"127\.0\.0\.1", "IPv4")))
        rc, out, err = self.trop("who", "--busy-timeout", "0", "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual([r["port"] for r in json.loads(out)], [port])
        self.assertEqual(self.rows(), before)                                       # last_used_at untouched


@unittest.skipUnless(LINUX_PROC, "who's pids and working directories are read from Linux /proc")
class TestWhoNamesServers(ServerCase):
    """`trop who` names the child processes listening on reserved ports, and whether they run in the
    reserved directory."""

    def setUp(self):
        super().setUp()
        self.port = self.free_block(3)
        self.user = user_name(os.getuid())
        self.reserve_ports(self.port, "web", project="shop", task="t1")
        self.reserve_ports(self.port + 1, "api", project="shop")
        self.sql("UPDATE reservations SET created_at = ?, last_used_at = ?", (T1, T1))
        self.sql("UPDATE reservations SET last_used_at = ? WHERE tag = 'web'", (T2,))
        self.inside = self.mkdir("proj", "server")                    # within the reserved directory
        self.elsewhere = temp_dir(self, "trop-test-elsewhere-")       # another temporary directory
        self.mine = self.ready_listener("127.0.0.1", self.port, cwd=self.inside)
        self.theirs = self.ready_listener("127.0.0.1", self.port + 1, cwd=self.elsewhere)

    def listener_entry(self, proc, cwd):
        return {"protocol": "tcp", "family": "ipv4", "address": "127.0.0.1", "pid": proc.pid,
                "process": process_comm(proc.pid), "user": self.user, "cwd": cwd}

    def test_json(self):
        rc, out, err = self.trop("who", "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        reports = {r["port"]: r for r in json.loads(out)}
        self.assertEqual(sorted(reports), [self.port, self.port + 1])
        name = process_comm(self.mine.pid)
        self.assertEqual(reports[self.port], {
            "port": self.port, "verdict": "reservation",
            "detail": "held by this reservation's directory: pid %d %s in %s" % (self.mine.pid, name, self.inside),
            "reservation": {"path": self.proj, "tag": "web", "project": "shop", "task": "t1", "last_used_at": S2,
                            "lease": None},
            "listeners": [self.listener_entry(self.mine, self.inside)]})
        other = reports[self.port + 1]
        self.assertEqual(other["verdict"], "other")
        self.assertEqual(other["detail"], "held by another process: pid %d %s in %s"
                         % (self.theirs.pid, process_comm(self.theirs.pid), self.elsewhere))
        self.assertEqual(other["listeners"], [self.listener_entry(self.theirs, self.elsewhere)])
        self.assertEqual(other["reservation"]["tag"], "api")
        # One port by number, one tag, another directory's reservations by --path.
        self.assertEqual(json.loads(self.trop("who", str(self.port), "--format", "json")[1]), [reports[self.port]])
        self.assertEqual(json.loads(self.ok("who", "--tag", "api", "--format", "json")[0]), [other])
        self.assertEqual(json.loads(self.ok("who", "--path", self.proj, "--format", "json", cwd=self.root)[0]),
                         json.loads(out))

    def test_text(self):
        name = process_comm(self.mine.pid)
        self.assertEqual(self.ok("who", "--tag", "web")[0], (
            "Port {p}: held by this reservation's directory: pid {pid} {name} in {cwd}\n"
            "  reserved for {proj} tag web, project shop, task t1 (last used {used})\n"
            "  listener TCP IPv4 127.0.0.1: pid {pid}, {name}, user {user}, cwd {cwd}\n").format(
                p=self.port, pid=self.mine.pid, name=name, cwd=self.inside, proj=self.proj, used=S2, user=self.user))
        name = process_comm(self.theirs.pid)
        self.assertEqual(self.ok("who", str(self.port + 1))[0], (
            "Port {p}: held by another process: pid {pid} {name} in {cwd}\n"
            "  reserved for {proj} tag api, project shop (last used {used})\n"
            "  listener TCP IPv4 127.0.0.1: pid {pid}, {name}, user {user}, cwd {cwd}\n").format(
                p=self.port + 1, pid=self.theirs.pid, name=name, cwd=self.elsewhere, proj=self.proj, used=S1,
                user=self.user))

    def test_free_ports(self):
        free = self.port + 2                                       # neither reserved nor listened on
        self.assertEqual(self.ok("who", str(free))[0], "Port %d: nothing listens on it\n  not reserved\n" % free)
        self.assertEqual(json.loads(self.ok("who", str(free), "--format", "json")[0]), [
            {"port": free, "reservation": None, "listeners": [], "verdict": "free",
             "detail": "nothing listens on it"}])
        # A reserved port whose server stopped: free, reservation still named.
        self.mine.kill()
        self.mine.wait(60)
        report, = json.loads(self.ok("who", "--tag", "web", "--format", "json")[0])
        self.assertEqual((report["verdict"], report["listeners"], report["reservation"]["tag"]), ("free", [], "web"))

    def test_errors(self):
        self.assertError(self.trop("who", "--tag", "nope"), 6, "not found: no reservation for %s:nope" % self.proj)
        self.assertError(self.trop("who", cwd=self.inside), 6, "not found: no reservation for %s" % self.inside)
        rc, out, err = self.trop("who", str(self.port), "--tag", "web")
        self.assertEqual((rc, out), (2, ""))
        self.assertIn("give a PORT or --path/--tag, not both", err)


class TestWhoVerdicts(unittest.TestCase):
    """who_holds decides from the listeners it is given (and a probe when there are none)."""

    class Owners:
        def __init__(self, listeners):
            self._listeners = listeners

        def listeners(self, port):
            return self._listeners

        def lingering(self, port):
            return False

    @staticmethod
    def entry(pid, cwd, process="server"):
        return {"protocol": "tcp", "family": "ipv4", "address": "127.0.0.1", "pid": pid, "process": process,
                "user": "u", "cwd": cwd}

    def test_verdicts(self):
        res = trop.Reservation("/w/app", "web", 0, created_at=T1, last_used_at=T1)
        cases = [
            ([self.entry(7, "/w/app")], "reservation", "held by this reservation's directory: pid 7 server in /w/app"),
            ([self.entry(7, "/w/app/sub")], "reservation",
             "held by this reservation's directory: pid 7 server in /w/app/sub"),
            ([self.entry(7, "/w/application")], "other", "held by another process: pid 7 server in /w/application"),
            ([self.entry(7, None)], "other", "held by another process: pid 7 server"),
            ([self.entry(None, None, None)], "other", "held by another process: a process"),
            ([self.entry(7, "/elsewhere"), self.entry(9, "/w/app")], "reservation",
             "held by this reservation's directory: pid 9 server in /w/app"),
        ]
        for listeners, verdict, detail in cases:
            with self.subTest(listeners=listeners):
                report = trop.who_holds(1, res, self.Owners(listeners))
                self.assertEqual((report["verdict"], report["detail"]), (verdict, detail))
                self.assertEqual(report["listeners"], listeners)
        report = trop.who_holds(1, None, self.Owners([self.entry(7, "/w/app")]))     # unreserved: never "mine"
        self.assertEqual((report["verdict"], report["reservation"]), ("other", None))

    def test_in_use_by_a_process_the_os_does_not_name(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
            port = sock.getsockname()[1]
            report = trop.who_holds(port, None, self.Owners([]), trop.OccupancyPolicy())
        self.assertEqual(report["verdict"], "unknown")
        self.assertTrue(report["detail"].startswith("in use, but the OS does not say by whom"), report["detail"])


@unittest.skipUnless(os.name == "posix", "run --listen hands sockets over on POSIX only")
class TestRunListen(ServerCase):
    """`trop run --listen`: the command inherits bound, listening sockets (systemd socket activation)."""

    def setUp(self):
        super().setUp()
        self.port = self.free_block(2)
        self.group = self.mkdir("shop")
        self.group_file(self.group, [("web", {}), ("api", {"offset": 1})], pmin=self.port, pmax=self.port + 1)

    def get(self, address, port, path):
        """(status, JSON body) of GET path, made here with http.client."""
        with contextlib.closing(http.client.HTTPConnection(address, port, timeout=120)) as conn:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read().decode("utf-8"))

    def test_http_server_on_inherited_sockets(self):
        web, api = self.port, self.port + 1
        families = [("ipv4", "127.0.0.1")] + ([("ipv6", "::1")] if HAS_IPV6 else [])
        expected = [{"fd": 3 + index, "name": name, "family": family, "address": address, "port": port}
                    for index, (name, port, (family, address)) in enumerate(
                        (name, port, fa) for name, port in (("api", api), ("web", web)) for fa in families)]
        proc = self.start("--verbose", "run", "--listen", "--", sys.executable, "-c", SOCKET_ACTIVATED_CHILD,
                          cwd=self.group)
        report = json.loads(first_line(proc))
        status, body = self.get("127.0.0.1", web, "/hello")
        self.assertEqual(status, 200)
        self.assertEqual(report["pid"], proc.pid)                             # exec kept trop's pid ...
        self.assertEqual(report["LISTEN_PID"], str(proc.pid))                  # ... which LISTEN_PID names
        self.assertEqual(report["LISTEN_FDS"], str(len(expected)))
        self.assertEqual(report["LISTEN_FDNAMES"], ":".join(e["name"] for e in expected))
        self.assertEqual(report["sockets"], expected)                           # by tag; IPv4 then IPv6
        self.assertEqual(report["extra_fds"], [])                               # nothing else leaked
        self.assertEqual(report["cwd"], self.group)
        self.assertEqual(body, dict(report, path="/hello", fd=expected[len(families)]["fd"], name="web"))
        for entry in expected:
            with self.subTest(entry=entry):
                status, body = self.get(entry["address"], entry["port"], "/" + entry["name"])
                self.assertEqual((status, body["fd"], body["name"], body["pid"]),
                                 (200, entry["fd"], entry["name"], proc.pid))
        if LINUX_PROC:                                    # who: the server holds both ports, in the group's directory
            reports = json.loads(self.ok("who", "--format", "json", cwd=self.group)[0])
            self.assertEqual([(r["port"], r["verdict"]) for r in reports], [(api, "reservation"), (web, "reservation")])
            for r in reports:
                self.assertEqual([(l["address"], l["pid"], l["cwd"]) for l in r["listeners"]],
                                 [(address, proc.pid, self.group) for _family, address in families])
        proc.kill()
        proc.wait(60)
        err = proc.stderr.read()                                    # trop's --verbose lines, before the exec
        self.assertNoTraceback(err)
        for line in ("API=%d" % api, "WEB=%d" % web, "LISTEN_FDS=%d" % len(expected), "LISTEN_PID=%d" % proc.pid,
                     "LISTEN_FDNAMES=%s" % report["LISTEN_FDNAMES"]):
            self.assertIn(line + "\n", err)

    def test_port_in_use_stops_before_the_command(self):
        self.listen("tcp", "127.0.0.1", self.port)                  # occupancy is not checked (skip: true)
        self.assertError(self.trop("run", "--listen", "--", sys.executable, "-c", "print('ran')", cwd=self.group), 6,
                         startswith="cannot listen on 127.0.0.1 port %d for web: " % self.port)
        self.assertEqual(len(self.rows()), 2)                        # the group is reserved all the same
        with socket.socket() as sock:                                # and no socket of api was left behind
            sock.bind(("127.0.0.1", self.port + 1))

    def test_without_listen_nothing_is_inherited(self):
        code = "import os; print(os.environ.get('LISTEN_FDS'), os.environ.get('LISTEN_PID'))"
        self.assertEqual(self.ok("run", "--", sys.executable, "-c", code, cwd=self.group), ("None None\n", ""))
        self.assertEqual(self.ok("run", "--listen", "--dry-run", "--quiet", "--", sys.executable, "-c", code,
                                 cwd=self.group), ("", ""))
        with socket.socket() as sock:                                # a dry run binds nothing
            sock.bind(("127.0.0.1", self.port))


class TestServersAPI(ServerCase):
    """trop.wait, Trop.wait/who, ReservedPort.wait and the trop_port fixture, against servers of this process."""
    IN_PROCESS = True

    def test_module_wait(self):
        port = self.free_block(2)
        self.listen("tcp", "127.0.0.1", port)
        answer = trop.wait(port=port, timeout=60, **self.opts)
        self.assertEqual(list(answer), [port])
        family, address, seconds = answer[port]
        self.assertEqual((family, address), ("ipv4", "127.0.0.1"))
        self.assertIsInstance(seconds, float)
        self.assertGreaterEqual(seconds, 0)
        exc = self.assertTropError(trop.WaitTimeout, 1, trop.wait, port=port + 1, timeout=0.2, interval=0.05,
                                   **self.opts)
        self.assertIsInstance(exc, trop.SemanticFailure)
        self.assertIn("waiting for port %d (last seen: connection refused on 127.0.0.1" % (port + 1), str(exc))
        server = self.http_server(port + 1, 503)
        exc = self.assertTropError(trop.WaitTimeout, 1, trop.wait, port=port + 1, http="/health", timeout=0.5,
                                   **self.opts)
        self.assertIn("HTTP 503 from 127.0.0.1", str(exc))
        server.status = 200
        self.assertEqual(trop.wait(port=port + 1, http="/health", timeout=60, **self.opts)[port + 1][:2],
                         ("ipv4", "127.0.0.1"))
        self.assertFalse(os.path.exists(self.data), "wait --port created the data directory")

    def test_handle_wait_and_who(self):
        port = self.free_block(3)
        with trop.Trop(min=port, max=port + 2, **self.opts) as handle:
            self.assertEqual(handle.reserve(tag="web"), port)
            self.assertTropError(trop.WaitTimeout, 1, handle.wait, tag="web", timeout=0.2)
            self.listen("tcp", "127.0.0.1", port)
            answer = handle.wait(tag="web", timeout=60)
            self.assertEqual((list(answer), answer[port][:2]), ([port], ("ipv4", "127.0.0.1")))
            self.assertTropError(trop.LibraryError, 6, handle.wait, tag="nope", timeout=0)
            reports = handle.who(tag="web")
            self.assertEqual(handle.who(port=port), reports)
            report, = reports
            self.assertEqual(report["port"], port)
            self.assertEqual((report["reservation"]["path"], report["reservation"]["tag"]), (self.proj, "web"))
            self.assertEqual([(l["protocol"], l["address"]) for l in report["listeners"]], [("tcp", "127.0.0.1")])
            if LINUX_PROC:                           # this process listens, and its cwd is the reserved directory
                self.assertEqual(report["verdict"], "reservation")
                self.assertEqual((report["listeners"][0]["pid"], report["listeners"][0]["cwd"]),
                                 (os.getpid(), self.proj))
            free, = handle.who(port=port + 2)
            self.assertEqual((free["verdict"], free["reservation"], free["listeners"]), ("free", None, []))
        self.assertEqual(trop.who(port + 2, **self.opts), [free])
        self.assertEqual(trop.who(tag="web", **self.opts)[0]["port"], port)
        self.assertEqual(trop.wait(tag="web", timeout=60, **self.opts)[port][:2], ("ipv4", "127.0.0.1"))

    def test_reservation_yields_a_port_that_waits(self):
        port = self.free_block(2)
        with trop.reservation(tag="server", min=port, max=port + 1, **self.opts) as reserved:
            self.assertIsInstance(reserved, trop.ReservedPort)
            self.assertIsInstance(reserved, int)
            self.assertEqual(reserved, port)
            exc = self.assertTropError(trop.WaitTimeout, 1, reserved.wait, timeout=0.2, interval=0.05)
            self.assertIn("port %d" % port, str(exc))
            self.http_server(reserved, 200)
            family, address, seconds = reserved.wait(timeout=60, http="/")
            self.assertEqual((family, address), ("ipv4", "127.0.0.1"))
            self.assertGreaterEqual(seconds, 0)
        self.assertIsNone(trop.port_info(port, **self.opts))

    PYTEST_FILE = '''\
import http.server
import threading

import pytest
import trop


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_server_is_ready(trop_port):
    assert isinstance(trop_port, trop.ReservedPort) and trop.port_info(trop_port) is not None
    server = http.server.HTTPServer(("127.0.0.1", trop_port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        family, address, seconds = trop_port.wait(timeout=60, http="/health")
        assert (family, address) == ("ipv4", "127.0.0.1") and seconds >= 0
    finally:
        server.shutdown()
        server.server_close()


def test_nothing_listens(trop_port):
    with pytest.raises(trop.WaitTimeout) as info:
        trop_port.wait(timeout=0.2, interval=0.05)
    assert info.value.exit_code == 1 and "port %d" % trop_port in str(info.value)
'''

    @unittest.skipIf(importlib.util.find_spec("pytest") is None, "pytest is not installed for this interpreter")
    def test_trop_port_fixture_waits_for_its_server(self):
        work = self.mkdir("pytest-run")
        self.write(os.path.join(work, "test_ready.py"), self.PYTEST_FILE)
        data = os.path.join(self.root, "pytest-data")
        low = self.free_block(4)                          # free ports: nothing else listens on trop_port
        env = self.child_env(PYTHONPATH=TROP_DIR, TROP_DATA_DIR=data, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
                             TROP_PORT_MIN=str(low), TROP_PORT_MAX=str(low + 3))
        rc, out, err = self.execute([sys.executable, "-m", "pytest", "-p", "trop", "-p", "no:cacheprovider", "-q",
                                     "test_ready.py"], cwd=work, env=env)
        self.assertEqual(rc, 0, out + err)
        self.assertRegex(out, r"2 passed")
        self.assertEqual(trop.list_reservations(data_dir=data), [])


class TestServerFixes(ServerCase):
    """Cases found by running the servers: symlinked reservations, TIME_WAIT, slow health checks, fd names,
    --group from a path, and single-family handoff."""

    # An HTTP server whose every answer takes DELAY seconds: PORT DELAY; prints one line once listening.
    SLOW_CHILD = STATUS_CHILD.replace("    def do_GET(self):\n", "    def do_GET(self):\n        import time\n"
                                      "        time.sleep(float(sys.argv[3]))\n").replace(
        'address = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"', 'address = "127.0.0.1"')

    @unittest.skipUnless(LINUX_PROC and hasattr(os, "symlink"), "needs Linux /proc for cwds, and symlinks")
    def test_who_sees_its_own_server_through_a_symlinked_reservation(self):
        port = self.free_block(1)
        real = self.mkdir("proj", "real")
        link = os.path.join(self.proj, "link")
        os.symlink(real, link)
        self.reserve_ports(port, "web", path=link)
        self.ready_listener("127.0.0.1", port, cwd=real)
        rc, out, err = self.trop("who", "--path", link, "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(json.loads(out)[0]["verdict"], "reservation")

    def test_closed_connections_in_time_wait_are_not_a_stranger(self):
        owners = types.SimpleNamespace(listeners=lambda port: [], lingering=lambda port: True)
        holder = self.listen("tcp", "127.0.0.1")                    # makes the probe fail as TIME_WAIT would
        report = trop.who_holds(holder.getsockname()[1], None, owners, trop.OccupancyPolicy(skip_udp=True))
        self.assertEqual(report["verdict"], "free")
        self.assertIn("TIME_WAIT", report["detail"])

    def test_a_health_check_slower_than_a_second_is_waited_for(self):
        port = self.free_block(1)
        proc = self.serve(self.SLOW_CHILD, port, 200, 1.5)
        self.assertEqual(first_line(proc), "listening")
        rc, out, err = self.trop("wait", "--port", str(port), "--http", "/health", "--timeout", "60")
        self.assertEqual((rc, err), (0, ""))
        self.assertRegex(out, WAIT_READY % (port, "127.0.0.1", "IPv4"))

    def test_fd_names_follow_systemd_rules(self):
        self.assertEqual(trop._fd_name("web:main"), "web_main")
        self.assertEqual(trop._fd_name("café api"), "caf__api")
        self.assertEqual(len(trop._fd_name("x" * 300)), 255)

    def test_wait_for_a_group_found_from_a_path_or_named_by_file(self):
        port = self.free_block(2)
        shop = self.mkdir("proj", "shop")
        config = self.group_file(shop, [("web", {}), ("api", {"offset": 1})], pmin=port, pmax=port + 1)
        self.ok("autoreserve", cwd=shop)
        for offset in (0, 1):
            self.ready_listener("127.0.0.1", port + offset)
        for args in (("--group", "--path", shop), ("--config", config)):
            with self.subTest(args=args):
                rc, out, err = self.trop("wait", *args, "--timeout", "60", cwd=self.root)
                self.assertEqual((rc, err), (0, ""))
                self.assertEqual(len(out.splitlines()), 2)
        self.assertError(self.trop("wait", "--port", str(port), "--path", shop), 2)

    @unittest.skipUnless(os.name == "posix", "socket handoff needs POSIX")
    def test_listen_hands_over_one_family_when_the_other_is_skipped(self):
        port = self.free_block(1)
        group = self.mkdir("proj", "one")
        self.group_file(group, [("web", {})], pmin=port, pmax=port)
        proc = self.start("run", "--listen", "--skip-ipv6", "--", sys.executable, "-c", SOCKET_ACTIVATED_CHILD,
                          cwd=group)
        report = json.loads(first_line(proc))
        self.assertEqual((report["LISTEN_FDS"], report["LISTEN_FDNAMES"]), ("1", "web"))
        self.assertEqual([s["family"] for s in report["sockets"]], ["ipv4"])


class TestFirstHourWithServers(ServerCase):
    """Real servers in their first hour: one service per `run --listen`, TIME_WAIT, groups that cannot fit,
    number messages that agree with themselves, and the warnings that say what trop did."""

    def get(self, port):
        """The JSON report of a SOCKET_ACTIVATED_CHILD answering on 127.0.0.1:port."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/")
            return json.loads(conn.getresponse().read().decode("utf-8"))
        finally:
            conn.close()

    def linger(self, port):
        """Serve one connection on 127.0.0.1:port and close it first, so the port is left in TIME_WAIT."""
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn, _ = server.accept()
        conn.close()                        # the server closes first: its side of port lingers in TIME_WAIT
        self.assertEqual(client.recv(1), b"")
        client.close()
        server.close()
        self.assertTrue(trop.OwnerTable().lingering(port), "port %d was not left in TIME_WAIT" % port)

    # -- one service per server --------------------------------------------------------------------------------
    @unittest.skipIf(os.name == "nt", "socket handoff needs POSIX")
    def test_two_run_listen_commands_one_service_each_serve_at_once(self):
        port = self.free_block(2)
        group = self.mkdir("proj", "two")
        self.group_file(group, [("api", {"offset": 1}), ("web", {"offset": 0})], pmin=port, pmax=port + 1)
        web = self.start("run", "--listen", "--service", "web", "--", sys.executable, "-c", SOCKET_ACTIVATED_CHILD,
                         cwd=group)
        api = self.start("run", "--listen", "--skip-ipv6", "--service", "api", "--", sys.executable, "-c",
                         SOCKET_ACTIVATED_CHILD, cwd=group)
        web_report, api_report = json.loads(first_line(web)), json.loads(first_line(api))
        self.assertEqual(set(web_report["LISTEN_FDNAMES"].split(":")), {"web"})
        self.assertEqual((api_report["LISTEN_FDS"], api_report["LISTEN_FDNAMES"]), ("1", "api"))
        self.assertEqual({s["port"] for s in web_report["sockets"]}, {port})
        self.assertEqual([s["port"] for s in api_report["sockets"]], [port + 1])
        self.assertEqual((self.get(port)["pid"], self.get(port)["name"]), (web_report["pid"], "web"))
        self.assertEqual((self.get(port + 1)["pid"], self.get(port + 1)["name"]), (api_report["pid"], "api"))
        self.assertEqual(len(trop.list_reservations(data_dir=self.data)), 2)        # one group, reserved once

    def test_service_names_a_service_of_the_group_and_needs_listen(self):
        group = self.mkdir("proj", "svc")
        self.group_file(group, [("web", {})])
        self.assertError(self.trop("run", "--listen", "--service", "db", "--", "true", cwd=group), 4,
                         contains="the group has no service 'db' (its services: web)")
        self.assertError(self.trop("run", "--service", "web", "--", "true", cwd=group), 2,
                         contains="--service chooses the sockets that --listen hands over")
        self.assertEqual(trop.list_reservations(data_dir=self.data), [])           # refused before any write

    # -- TIME_WAIT ---------------------------------------------------------------------------------------------
    @unittest.skipUnless(LINUX_PROC, "TIME_WAIT is told apart from a listener on Linux")
    def test_a_port_its_server_closed_comes_back_twenty_times_in_a_row(self):
        low = self.free_block(4)
        ports = []
        for _ in range(20):
            port = trop.reserve(self.proj, tag="loop", data_dir=self.data, min=low, max=low + 3, skip_udp=True,
                                allow_unrelated_path=True)
            self.linger(port)
            trop.release(self.proj, tag="loop", data_dir=self.data, allow_unrelated_path=True)
            ports.append(port)
        self.assertEqual(ports, [low] * 20)

    @unittest.skipUnless(LINUX_PROC, "TIME_WAIT is told apart from a listener on Linux")
    def test_lingering_port_is_free_for_preferences_who_scan_and_doctor(self):
        low = self.free_block(3)
        self.linger(low + 1)
        wide = ("--min", str(low), "--max", str(low + 2), "--skip-udp")
        self.assertPort(self.trop("reserve", "--port", str(low + 1), *wide), low + 1)
        self.assertEqual(self.trop("release")[0], 0)
        rc, out, err = self.trop("who", str(low + 1), "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(json.loads(out)[0]["verdict"], "free")
        self.assertIn("TIME_WAIT", json.loads(out)[0]["detail"])
        rc, out, err = self.trop("scan", *wide, "--format", "json")
        self.assertEqual((rc, json.loads(out)), (0, []), err)
        rc, out, err = self.trop("doctor", *wide, "--format", "json")
        report = json.loads(out)
        self.assertEqual(report["ports"]["occupied"]["count"], 0, out)
        self.assertEqual(report["ports"]["lingering"], {"count": 1, "ports": [low + 1]})
        self.assertEqual(report["ports"]["free"]["count"], 3)
        rc, out, err = self.trop("doctor", *wide)
        self.assertRegex(out, r"(?m)^  lingering +1  %d " % (low + 1))
        self.assertRegex(out, r"(?m)^  occupied +0")

    def test_a_listener_is_still_occupied_whatever_the_probe_reuses(self):
        holder = self.listen("tcp", "127.0.0.1")
        found, failed = trop.probe_port(holder.getsockname()[1], trop.OccupancyPolicy(skip_udp=True).probes())
        self.assertEqual((len(found), failed), (1, []))
        wildcard = self.listen("tcp", "0.0.0.0")
        found, failed = trop.probe_port(wildcard.getsockname()[1], trop.OccupancyPolicy(skip_udp=True).probes())
        self.assertEqual((len(found), failed), (1, []))      # 127.0.0.1 cannot bind beside a 0.0.0.0 listener

    # -- groups that cannot fit -----------------------------------------------------------------------------------
    def test_a_group_whose_offsets_cannot_fit_is_refused_in_plain_words(self):
        group = self.mkdir("proj", "narrow")
        path = self.group_file(group, [("a", {"offset": 0}), ("b", {"offset": 5})], pmin=6000, pmax=6001)
        rc, out, err = self.trop("validate", path)
        self.assertEqual((rc, out), (1, ""))
        self.assertIn("reservations: offset 5 does not fit in 6000-6001 (2 ports)", err)
        rc, out, err = self.trop("autoreserve", cwd=group)
        self.assertEqual(rc, 6)
        self.assertEqual(err, "Error: group allocation failed: offset 5 does not fit in 6000-6001 (2 ports)\n")
        many = self.group_file(self.mkdir("proj", "many"), numbered_services(3), pmin=6100, pmax=6101)
        rc, out, err = self.trop("validate", many)
        self.assertIn("reservations: 3 services do not fit in 6100-6101 (2 ports)", err)

    def test_a_moved_group_preference_is_said(self):
        low = self.free_block(4)
        self.listen("tcp", "127.0.0.1", low)
        group = self.mkdir("proj", "pref")
        self.group_file(group, [("web", {"offset": 0, "preferred": low})], pmin=low, pmax=low + 3, skip=False)
        rc, out, err = self.trop("autoreserve", "--format", "json", "--skip-udp", cwd=group)
        self.assertEqual((rc, json.loads(out)), (0, {"web": low + 1}), err)
        self.assertIn("Warning: service 'web': preferred port %d is occupied; reserved %d instead" % (low, low + 1),
                      err)

    # -- numbers -----------------------------------------------------------------------------------------------
    def test_number_messages_state_the_range_accepted(self):
        for args, status, text in ((("who", "70000"), 2, "invalid port '70000': expected a port, 1..65535"),
                                   (("who", "0"), 4, "Invalid port number: port 0 is reserved"),
                                   (("port-info", "-1"), 2, "expected a port, 1..65535"),
                                   (("expire", "--days", "-3"), 2, "expected a whole number of days, 1..4294967295"),
                                   (("expire", "--days", "0"), 7, "must be greater than 0"),
                                   (("list", "--busy-timeout", "-1"), 2, "expected whole seconds, 0..2147483"),
                                   (("list", "--busy-timeout", "2147484"), 7, "must not exceed 2147483 seconds")):
            with self.subTest(args=args):
                rc, out, err = self.trop(*args)
                self.assertEqual((rc, out), (status, ""), err)
                self.assertIn(text, err)
        rc, out, _err = self.trop("list", "--help")
        self.assertIn("whole seconds to wait for the database lock", " ".join(out.split()))

    # -- small truths ------------------------------------------------------------------------------------------
    def test_an_extra_tag_in_a_group_directory_warns_that_run_will_refuse(self):
        group = self.mkdir("proj", "grp")
        self.group_file(group, [("web", {})])
        rc, out, err = self.trop("reserve", "--tag", "debug", *WIDE, cwd=group)
        self.assertEqual(rc, 0, err)
        self.assertIn("which has no service 'debug': `trop run` and `autoreserve` there will refuse", err)
        self.assertPort(self.trop("reserve", "--tag", "web", *WIDE, cwd=group), int(out) + 1)   # a service: no word

    def test_wait_for_a_port_reads_no_configuration_file(self):
        self.write("proj/trop.yaml", "ports: [not, a, mapping]\n")
        self.assertEqual(self.trop("list")[0], 7)
        holder = self.listen("tcp", "127.0.0.1")
        rc, out, err = self.trop("wait", "--port", str(holder.getsockname()[1]), "--timeout", "10")
        self.assertEqual((rc, err), (0, ""))
        self.assertIn(": ready on 127.0.0.1", out)


class TestReviewedEdges(TropTestCase):
    """Edges found in review: each once broke a rule (no write by a reader, no internal error, no lost data)."""
    ENV = SKIP_PROBES

    def test_init_checks_the_filesystem_before_touching_anything(self):
        self.ok("init")
        before = self.read(self.db)
        proc_root = self.mkdir("fakeproc")
        self.write(os.path.join(proc_root, "self", "mountinfo"), "20 1 0:1 / / rw - ext4 src rw\n"
                   "21 1 0:2 / %s rw - nfs4 src rw\n" % self.data)
        code = ("import sys, trop\ntrop.PROC_ROOT = %r\nsys.exit(trop.main(sys.argv[1:]))\n" % proc_root)
        refused = self.execute([sys.executable, "-c", code, "--data-dir", self.data, "init", "--overwrite"],
                               env=self.environment())
        self.assertError(refused, 7, contains="TROP_ALLOW_NETWORK_FS")
        self.assertEqual(self.read(self.db), before)
        allowed = self.execute([sys.executable, "-c", code, "--data-dir", self.data, "init", "--overwrite"],
                               env=self.environment({"TROP_ALLOW_NETWORK_FS": "1"}))
        self.assertEqual(allowed[0], 0, allowed[2])

    def test_api_keywords_are_checked_like_flags(self):
        for options, cls in (({"days": -5}, trop.ConfigError), ({"days": "abc"}, trop.ConfigError),
                             ({"skip_occupancy_check": "false"}, trop.InvalidArguments),
                             ({"project": 123}, trop.InvalidArguments), ({"data_dir": 5}, trop.InvalidArguments)):
            with self.subTest(options=options):
                with self.assertRaises(cls):
                    trop.Trop(**options)
        self.seed(("/gone", "", 5000))
        with trop.Trop(data_dir=self.data) as handle:
            with self.assertRaises(trop.ConfigError):
                handle.expire(days=-5)
        self.assertEqual(len(self.rows()), 1)

    def test_doctor_wait_and_who_never_change_a_writable_database(self):
        make_v1_db(self.data, [(self.proj, None, 5000, None, None, T1, T1)])
        before = self.read(self.db)
        self.assertEqual(self.trop("doctor", "--format", "json")[0], 6)     # v1 must be migrated by a writer
        self.assertError(self.trop("wait", "--timeout", "0"), 6, contains="migration required")
        self.assertError(self.trop("who"), 6, contains="migration required")
        self.assertEqual(self.read(self.db), before)
        self.assertEqual(sorted(os.listdir(self.data)), ["trop.db"])

    def test_doctor_reports_a_broken_data_directory(self):
        os.makedirs(self.db)                                # trop.db is a directory
        rc, out, err = self.trop("doctor")
        self.assertEqual((rc, err), (6, ""))
        self.assertIn("is not a regular file", out)

    def test_wait_quotes_its_http_path(self):
        port = self.free_block(1)
        server = http.server.HTTPServer(("127.0.0.1", port), _StatusHandler)
        server.status = 200
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        for path in ("/a b", "/é", "health?x=1"):
            with self.subTest(path=path):
                rc, out, err = self.trop("wait", "--port", str(port), "--http", path, "--timeout", "30")
                self.assertEqual((rc, err), (0, ""))

    def test_a_double_slash_data_dir_reads(self):
        self.ok("init")
        self.assertEqual(self.trop("assert-data-dir", "--validate", "--data-dir", "/" + self.data), (0, "", ""))

    def test_reservation_context_with_force_releases_what_it_reserved(self):
        elsewhere = self.mkdir("elsewhere")
        self.chdir(self.proj)
        with mock.patch.dict(os.environ, {"HOME": self.home}):
            with trop.reservation(path=elsewhere, data_dir=self.data, force=True, skip_occupancy_check=True) as port:
                self.assertEqual(port, 5000)
        self.assertEqual(self.rows(), [])

    def test_c_locale_tags_and_projects(self):
        env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": None, "TROP_PROJECT": "prøj"}
        rc, out, err = self.trop("reserve", "--tag", "wéb", env=env)
        self.assertEqual((rc, err), (0, ""))
        self.assertEqual(self.rows(4), [(self.proj, "wéb", int(out), "prøj")])

    def test_who_says_when_a_port_could_not_be_probed(self):
        probe = ("tcp", "ipv4", "localhost", "127.0.0.1")
        owners = types.SimpleNamespace(listeners=lambda port: [], lingering=lambda port: False)
        with mock.patch.object(trop, "probe_port", return_value=([], [(probe, "Permission denied")])):
            report = trop.who_holds(81, None, owners)
        self.assertEqual(report["verdict"], "unknown")
        self.assertIn("could not be probed (Permission denied)", report["detail"])

    def test_listen_needs_an_address(self):
        group = self.mkdir("proj", "g")
        self.group_file(group, [("web", {})])
        self.assertError(self.trop("run", "--listen", "--skip-ipv4", "--skip-ipv6", "--", "true", cwd=group), 2)


class TestUnreadableDatabase(UnprivilegedCase):
    def test_says_it_cannot_read(self):
        h = self.handle()
        h.reserve(self.proj)
        h.close()
        os.chmod(self.data, 0o755)
        os.chmod(self.db, 0o600)
        self.addCleanup(os.chmod, self.db, 0o644)
        self.assertError(self.as_user("list"), 6, contains=["cannot read", "--data-dir"])


# --- Leases: ports held by a live process --------------------------------------

LEASE_CHILD = r"""
import os, socket, sys, time, trop
data, start_at, barrier, count = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
time.sleep(max(0.0, start_at - time.time()))
with trop.reservation(tag="same", data_dir=data, allow_unrelated_path=True, skip_udp=True) as port:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        print("bound %d" % port, flush=True)
    except OSError as exc:
        print("failed %d %s" % (port, exc), flush=True)
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.time() + 120
    while len(os.listdir(barrier)) < count and time.time() < deadline:    # everyone holds its port at once
        time.sleep(0.05)
    sock.close()
"""


@unittest.skipIf(os.name != "posix", "holders here are POSIX shells and sleep processes")
class TestLeases(ServerCase):
    """Reservations held by a live process: distinct ports for concurrent holders, the same port for a lone
    one, and a dead holder's port taken back."""

    def held(self, *args, cwd=None):
        """`sh -c 'trop reserve --lease ARGS; sleep'`: (the shell, which holds the lease; the port)."""
        command = "%s -m trop reserve --lease %s && exec sleep 120" % (
            shlex.quote(sys.executable), " ".join(shlex.quote(str(a)) for a in args))
        shell = self._started(spawn(["sh", "-c", command], cwd or self.proj, self.environment()))
        return shell, int(first_line(shell))

    def kill(self, proc):
        proc.kill()
        proc.wait()

    def leases(self):
        return sqlite_rows(self.db, "SELECT path, tag, base_tag, slot, port, pid FROM trop_py_leases "
                                    "ORDER BY path, tag")

    def test_eight_holders_at_once_bind_eight_ports_and_leave_nothing(self):
        low = self.free_block(12)
        start_at = time.time() + 2.0
        barrier = self.mkdir("barrier")
        env = self.environment({"TROP_PORT_MIN": str(low), "TROP_PORT_MAX": str(low + 11)})
        children = [spawn([sys.executable, "-c", LEASE_CHILD, self.data, start_at, barrier, 8], self.proj, env)
                    for _ in range(8)]
        results = [finish(child) for child in children]
        self.assertEqual([(rc, err) for rc, _out, err in results], [(0, "")] * 8)
        lines = [out.strip() for _rc, out, _err in results]
        self.assertTrue(all(line.startswith("bound ") for line in lines), lines)
        self.assertEqual(len({line.split()[1] for line in lines}), 8, lines)
        self.assertEqual(self.rows(), [])
        self.assertEqual(self.leases(), [])

    @unittest.skipUnless(LINUX_PROC or sys.platform == "darwin", "needs a platform whose process start times trop reads")
    def test_a_killed_holders_port_is_taken_back_and_prune_names_it_first(self):
        port = self.free_block(1)
        shell, held = self.held("--min", port, "--max", port)
        self.assertEqual(held, port)
        self.assertError(self.trop("reserve", "--tag", "other", "--min", str(port), "--max", str(port),
                                   "--disable-autoclean"), 6, contains="exhausted")           # alive: kept
        self.kill(shell)
        rc, out, err = self.trop("prune", "--dry-run")
        self.assertEqual((rc, out), (0, ""))
        self.assertTrue(err.startswith("[DRY RUN] Would take back 1 lease(s) of dead holders:\n"
                                       "  - Port %d: %s (tag: none; its holder has died)\n" % (port, self.proj)), err)
        self.assertEqual(len(self.rows()), 1)                                                  # a dry run
        rc, out, err = self.trop("reserve", "--tag", "other", "--min", str(port), "--max", str(port),
                                 "--disable-autoclean")
        self.assertEqual((rc, out), (0, "%d\n" % port), err)
        self.assertIn("took back 1 lease(s) of dead holders", err)
        self.assertEqual([r[:3] for r in self.rows(3)], [(self.proj, "other", port)])
        self.assertEqual(self.leases(), [])

    def test_a_dead_holders_port_comes_back_to_a_preference_and_a_group(self):
        low = self.free_block(3)
        opts = dict(data_dir=self.data, allow_unrelated_path=True, min=low, max=low + 2, skip_occupancy_check=True)
        for tag in ("a", "b"):
            trop.reserve(self.proj, tag, holder=os.getpid(), **opts)
        self.sql("UPDATE trop_py_leases SET start = 'a process that has died'")
        self.assertEqual(trop.reserve(self.proj, "c", port=low + 1, **opts), low + 1)          # asked by number
        group = self.mkdir("proj", "grp")
        self.group_file(group, [("x", {})], pmin=low, pmax=low)
        rc, out, err = self.trop("autoreserve", "--format", "json", cwd=group)
        self.assertEqual((rc, json.loads(out)), (0, {"x": low}), err)                         # a's port
        self.assertEqual(sorted((r[1], r[2]) for r in self.rows(3)), [("c", low + 1), ("x", low)])
        self.assertEqual(sqlite_rows(self.db, "SELECT tag FROM trop_py_leases"), [])

    def test_a_lease_of_an_ordinary_reservation_leaves_it_as_it_was(self):
        port = self.free_block(2)
        wide = ("--min", str(port), "--max", str(port + 1), "--skip-occupancy-check")
        self.assertPort(self.trop("reserve", "--tag", "web", "--project", "keep", *wide), port)
        sleeper = self._started(spawn(["sleep", "60"]))
        self.assertPort(self.trop("reserve", "--tag", "web", "--holder", str(sleeper.pid), *wide), port)   # adopted
        self.assertEqual(self.trop("release", "--tag", "web", "--holder", str(sleeper.pid)),
                         (0, "", "Released the lease; the reservation it took over stays\n"))
        self.assertEqual([r[1:4] for r in self.rows(4)], [("web", port, "keep")])        # still there
        shell, held = self.held("--tag", "web", *wide)
        self.kill(shell)
        rc, out, err = self.trop("prune")
        self.assertEqual((rc, out), (0, ""), err)
        self.assertNotIn("dead holders", err)                       # an adopted row is not taken back
        self.assertEqual([r[1:4] for r in self.rows(4)], [("web", port, "keep")])
        self.assertEqual(self.leases(), [])

    def test_a_slot_row_in_a_groups_directory_is_said(self):
        group = self.mkdir("proj", "grp")
        self.group_file(group, [("web", {})])
        sleeper = self._started(spawn(["sleep", "60"]))
        self.assertEqual(self.trop("reserve", "--tag", "web", "--holder", str(sleeper.pid), *WIDE, cwd=group)[0], 0)
        rc, out, err = self.trop("reserve", "--tag", "web", "--lease", *WIDE, cwd=group)
        self.assertEqual(rc, 0, err)
        self.assertIn("which has no service 'web~2'", err)

    def test_reserving_a_dead_holders_row_again_makes_it_an_ordinary_reservation(self):
        port = self.free_block(1)
        opts = dict(data_dir=self.data, allow_unrelated_path=True, min=port, max=port, skip_occupancy_check=True)
        trop.reserve(self.proj, "t", holder=os.getpid(), **opts)
        self.sql("UPDATE trop_py_leases SET start = 'a process that has died'")
        self.assertEqual(trop.reserve(self.proj, "t", **opts), port)                 # the same key: refreshed
        self.assertEqual(self.leases(), [])
        with self.assertRaises(trop.LibraryError):                                   # and no longer taken back
            trop.reserve(self.proj, "u", disable_autoclean=True, **opts)

    def test_a_live_pid_with_another_start_time_is_a_dead_holder(self):
        port = self.free_block(1)
        opts = dict(data_dir=self.data, allow_unrelated_path=True, min=port, max=port, skip_occupancy_check=True)
        self.assertEqual(trop.reserve(self.proj, "t", holder=os.getpid(), **opts), port)
        self.sql("UPDATE trop_py_leases SET start = 'another process'")              # the pid was reused
        self.assertEqual(trop.reserve(self.proj, "u", disable_autoclean=True, **opts), port)
        self.assertEqual([r[:3] for r in self.rows(3)], [(self.proj, "u", port)])

    def test_a_lone_holder_gets_the_same_port_run_after_run(self):
        low = self.free_block(6)
        opts = dict(data_dir=self.data, allow_unrelated_path=True, min=low, max=low + 5, skip_udp=True)
        trop.reserve(self.proj, "before", **opts)                                    # an ordinary neighbour
        ports = []
        for _ in range(2):
            with trop.reservation(self.proj, "suite", **opts) as port:
                ports.append(port)
                self.assertEqual(len(self.leases()), 1)
        self.assertEqual(ports, [low + 1, low + 1])
        self.assertEqual([r[1] for r in self.rows(3)], ["before"])

    def test_concurrent_holders_of_one_key_get_slots_and_release_only_their_own(self):
        low = self.free_block(6)
        wide = ("--min", low, "--max", low + 5, "--skip-occupancy-check")
        sleepers = [self._started(spawn(["sleep", "60"])) for _ in range(3)]
        ports = []
        for sleeper in sleepers:
            rc, out, err = self.trop("reserve", "--tag", "t", "--holder", str(sleeper.pid), *map(str, wide))
            self.assertEqual((rc, err), (0, ""))
            ports.append(int(out))
        self.assertEqual(ports, [low, low + 1, low + 2])
        self.assertEqual([(tag, base, slot, pid) for _p, tag, base, slot, _port, pid in self.leases()],
                         [("t", "t", 1, sleepers[0].pid), ("t~2", "t", 2, sleepers[1].pid),
                          ("t~3", "t", 3, sleepers[2].pid)])
        rc, out, err = self.trop("reserve", "--tag", "t", "--holder", str(sleepers[1].pid), *map(str, wide))
        self.assertEqual(int(out), low + 1)                                  # the same holder: its own lease
        self.assertEqual(trop.release(self.proj, "t", data_dir=self.data, holder=sleepers[1].pid,
                                      allow_unrelated_path=True), 1)
        self.assertEqual([r[1:3] for r in self.rows(3)], [("t", low), ("t~3", low + 2)])
        self.assertEqual([row[1] for row in self.leases()], ["t", "t~3"])
        rc, out, err = self.trop("assert-data-dir", "--validate")
        self.assertEqual((rc, out, err), (0, "", ""))
        for path, tag, *_rest in self.leases():                             # the reference's row rules hold
            self.assertEqual(tag, tag.strip())
            self.assertTrue(tag and "\0" not in tag and path == trop.normalize_path(path))
        rc, out, err = self.trop("list", "--format", "json")
        rows = json.loads(out)
        self.assertEqual(rows[0]["lease"], {"pid": sleepers[0].pid, "host": trop.PLATFORM.host(),
                                            "state": "alive", "slot": 1})
        self.assertEqual(set(rows[0]), {"port", "path", "tag", "project", "task", "created_at", "last_used_at",
                                        "lease"})
        self.assertEqual(out, json.dumps(rows, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        rc, table, err = self.trop("list")
        self.assertEqual(table.splitlines()[0].split("\t"), [c.upper() for c in trop.LIST_COLUMNS])
        rc, out, err = self.trop("who", str(low), "--format", "json")
        self.assertEqual(json.loads(out)[0]["reservation"]["lease"]["state"], "alive")
        rc, out, err = self.trop("who", str(low))
        self.assertIn("leased to pid %d on %s: alive" % (sleepers[0].pid, trop.PLATFORM.host()), out)

    def test_an_unverifiable_lease_is_never_taken_back_and_doctor_says_why(self):
        port = self.free_block(1)
        opts = dict(data_dir=self.data, allow_unrelated_path=True, min=port, max=port, skip_occupancy_check=True)
        trop.reserve(self.proj, "t", holder=os.getpid(), **opts)
        self.sql("UPDATE trop_py_leases SET host = 'another-host', pid = 1")
        self.assertError(self.trop("reserve", "--tag", "u", "--min", str(port), "--max", str(port),
                                   "--skip-occupancy-check"), 6, contains="exhausted")
        self.assertEqual(trop.prune(data_dir=self.data), [])
        rc, out, err = self.trop("doctor", "--min", str(port), "--max", str(port), "--format", "json")
        self.assertEqual(json.loads(out)["leases"], {"live": 0, "dead": 0, "unverifiable": 1})
        rc, out, err = self.trop("doctor", "--min", str(port), "--max", str(port))
        self.assertIn("1 unverifiable (another host or pid namespace: only expire removes them)", out)
        self.sql("UPDATE reservations SET last_used_at = ?", (int(time.time()) - 40 * 86400,))
        self.assertEqual(len(trop.expire(data_dir=self.data)), 1)                       # age alone removes it

    @unittest.skipUnless(LINUX_PROC, "needs Linux /proc for the holder's start time")
    def test_run_lease_frees_its_ports_when_the_child_exits_or_is_killed(self):
        for how in ("exits", "killed"):
            with self.subTest(how=how):
                port = self.free_block(1)
                group = self.mkdir("proj", "run-" + how)
                self.group_file(group, [("web", {})], pmin=port, pmax=port)
                child = "import os, time; print(os.environ['WEB'], os.getpid(), flush=True); time.sleep(%d)" % (
                    0 if how == "exits" else 120)
                proc = self.start("run", "--lease", "--", sys.executable, "-c", child, cwd=group)
                web, pid = map(int, first_line(proc).split())
                self.assertEqual((web, pid), (port, proc.pid))                  # exec: the lease's holder is the child
                self.assertEqual(sqlite_rows(self.db, "SELECT tag, pid FROM trop_py_leases WHERE path = ?",
                                             (group,)), [("web", proc.pid)])
                if how == "killed":
                    self.assertError(self.trop("reserve", "--tag", how, "--min", str(port), "--max", str(port),
                                               "--skip-occupancy-check"), 6, contains="exhausted")
                    proc.kill()
                proc.wait()
                rc, out, err = self.trop("reserve", "--tag", how, "--min", str(port), "--max", str(port),
                                         "--skip-occupancy-check")
                self.assertEqual((rc, out), (0, "%d\n" % port), err)

    def test_a_group_is_leased_to_one_live_run_at_a_time(self):
        group = self.mkdir("proj", "busy")
        self.group_file(group, [("web", {})])
        first = self.start("run", "--lease", "--", "sleep", "120", cwd=group)
        deadline = time.time() + 30
        while not sqlite_rows(self.db, "SELECT pid FROM trop_py_leases") and time.time() < deadline:
            time.sleep(0.05)
        self.assertError(self.trop("run", "--lease", "--", "true", cwd=group), 6,
                         contains="is leased to pid %d (alive): one `trop run --lease` at a time" % first.pid)

    def test_pytest_runs_at_once_get_different_ports(self):
        if importlib.util.find_spec("pytest") is None:
            self.skipTest("pytest is not installed")
        work = self.mkdir("suite")
        barrier = self.mkdir("barrier")
        self.write(os.path.join(work, "test_port.py"),
                   "import os, time\n\ndef test_port(trop_port):\n"
                   "    with open(os.environ['OUT'], 'w') as fh:\n        fh.write(str(trop_port))\n"
                   "    open(os.path.join(%r, str(os.getpid())), 'w').close()\n"
                   "    deadline = time.time() + 120\n"
                   "    while len(os.listdir(%r)) < 2 and time.time() < deadline:\n"
                   "        time.sleep(0.05)\n" % (barrier, barrier))
        low = self.free_block(4)
        runs = []
        for n in range(2):
            env = self.child_env(PYTHONPATH=TROP_DIR, TROP_DATA_DIR=self.data, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
                                 TROP_PORT_MIN=str(low), TROP_PORT_MAX=str(low + 3), OUT=self.path("port-%d" % n))
            runs.append(spawn([sys.executable, "-m", "pytest", "-p", "trop", "-p", "no:cacheprovider", "-q",
                               "test_port.py"], work, env))
        for run in runs:
            rc, out, err = finish(run)
            self.assertEqual(rc, 0, out + err)
        ports = {self.read(self.path("port-%d" % n)) for n in range(2)}
        self.assertEqual(len(ports), 2, ports)
        self.assertEqual(self.rows(), [])


class TestHolderIdentity(unittest.TestCase):
    """Each platform's way to tell a holder apart, with stand-ins where it cannot run here."""

    def test_linux_stat_parsing_with_an_awkward_name_and_a_zombie(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        for pid, name, state in ((10, "a) b (c", "S"), (11, "zomb", "Z")):
            os.makedirs(os.path.join(root, str(pid)))
            fields = [state] + ["0"] * 18 + ["%d00" % pid] + ["0"] * 10
            with open(os.path.join(root, str(pid), "stat"), "w") as fh:
                fh.write("%d (%s) %s\n" % (pid, name, " ".join(fields)))
        with mock.patch.object(trop, "PROC_ROOT", root):
            self.assertEqual(trop._linux_process(10), ("1000", False))
            self.assertEqual(trop._linux_process(11), ("1100", True))
            self.assertIsNone(trop._linux_process(12))

    def test_darwin_kinfo_proc_through_a_stand_in_libc(self):
        class Libc(object):
            def __init__(self, size, stat=2):
                self.size, self.stat = size, stat

            def sysctl(self, mib, count, buf, size, new, new_size):
                if list(mib) != [1, 14, 1, 4242] or count != 4:
                    return -1
                size._obj.value = self.size
                data = bytearray(648)
                struct.pack_into("=qi", data, 0, 1700000000, 123456)
                data[36] = self.stat
                ctypes.memmove(buf, bytes(data), 648)
                return 0
        self.assertEqual(trop._darwin_process(4242, Libc(648)), ("1700000000.123456", False))
        self.assertEqual(trop._darwin_process(4242, Libc(648, stat=5)), ("1700000000.123456", True))   # zombie
        self.assertIsNone(trop._darwin_process(4242, Libc(0)))                                       # no such pid
        with self.assertRaises(OSError):
            trop._darwin_process(4242, Libc(600))

    def test_windows_process_times_through_a_stand_in_kernel32(self):
        class Kernel32(object):
            def __init__(self, exists=True, status=259, error=87):
                self.exists, self.status, self.error, self.closed = exists, status, error, []

            def OpenProcess(self, access, inherit, pid):
                return 77 if self.exists and access == 0x1000 else 0

            def GetLastError(self):
                return self.error

            def GetProcessTimes(self, handle, created, exited, kernel, user):
                created._obj.dwHighDateTime, created._obj.dwLowDateTime = 1, 2
                return 1

            def GetExitCodeProcess(self, handle, status):
                status._obj.value = self.status
                return 1

            def CloseHandle(self, handle):
                self.closed.append(handle)
        try:
            importlib.import_module("ctypes.wintypes")      # the Windows types, which import on other hosts too
        except (ImportError, ValueError):
            self.skipTest("ctypes.wintypes is not importable here")
        windows = trop.WindowsPlatform()
        kernel = Kernel32()
        self.assertEqual(windows.process(9, kernel), (str((1 << 32) | 2), False))
        self.assertEqual(kernel.closed, [77])
        self.assertEqual(windows.process(9, Kernel32(status=0)), (str((1 << 32) | 2), True))         # exited
        self.assertIsNone(windows.process(9, Kernel32(exists=False)))
        with self.assertRaises(OSError):
            windows.process(9, Kernel32(exists=False, error=5))                          # access denied: unknown

    def test_holder_states(self):
        try:
            me = trop.Holder.of(os.getpid())
        except trop.LibraryError as exc:
            self.skipTest("this platform cannot tell holders apart: %s" % exc)
        self.assertEqual(me.state(), "alive")
        for change, state in (({"start": "x"}, "dead"), ({"host": "elsewhere"}, "unknown"),
                              ({"platform": "other"}, "unknown"), ({"namespace": "9:9"}, "unknown")):
            other = trop.Holder(**dict({n: getattr(me, n) for n in trop.Holder.__slots__}, **change))
            self.assertEqual(other.state(), state, change)
        if me.boot:
            self.assertEqual(trop.Holder(**dict({n: getattr(me, n) for n in trop.Holder.__slots__},
                                                boot="another boot", namespace="9:9")).state(), "dead")
        with mock.patch.object(trop.PLATFORM, "process", side_effect=OSError(38, "cannot say")):
            self.assertEqual(me.state(), "unknown")                       # never taken back on a guess
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        with self.assertRaises(trop.LibraryError):
            trop.Holder.of(gone.pid)


# --- For coding agents: MCP server, .env files, service URLs --------------------

MODERN_META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
               "io.modelcontextprotocol/clientCapabilities": {}}
JSON_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def check_json_schema(test, schema, where="schema"):
    """A structural check of a JSON Schema (2020-12) as trop's tools use it."""
    test.assertIsInstance(schema, dict, where)
    test.assertIn(schema.get("type"), JSON_SCHEMA_TYPES, where)
    known = {"type", "properties", "required", "additionalProperties", "description", "minimum", "maximum",
             "enum", "minLength", "items"}
    test.assertEqual(set(schema) - known, set(), where)
    if "properties" in schema:
        test.assertEqual(schema["type"], "object", where)
        for name, sub in schema["properties"].items():
            test.assertRegex(name, r"^[a-z][a-z0-9_]*$", where)
            check_json_schema(test, sub, "%s.%s" % (where, name))
    for name in schema.get("required", ()):
        test.assertIn(name, schema["properties"], where)
    if "enum" in schema:
        test.assertTrue(schema["enum"] and all(isinstance(v, str) for v in schema["enum"]), where)
    for bound in ("minimum", "maximum"):
        if bound in schema:
            test.assertIn(schema["type"], ("integer", "number"), where)
            test.assertIsInstance(schema[bound], (int, float), where)
    if "minimum" in schema and "maximum" in schema:
        test.assertLessEqual(schema["minimum"], schema["maximum"], where)
    if "additionalProperties" in schema:
        test.assertIsInstance(schema["additionalProperties"], bool, where)
    if "description" in schema:
        test.assertIsInstance(schema["description"], str, where)


class McpClient(object):
    """`python -m trop mcp` over pipes, spoken to in raw JSON-RPC lines."""

    def __init__(self, test, cwd, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "trop", "mcp"], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        test.addCleanup(self.close)
        self.next_id = 0

    def send(self, line):
        self.proc.stdin.write(line.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout=TIMEOUT):
        lines = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not lines:
            self.proc.kill()
            raise AssertionError("trop mcp gave no answer within %ss" % timeout)
        if not lines[0]:
            raise AssertionError("trop mcp closed stdout; stderr: %s" % self.proc.stderr.read().decode())
        return json.loads(lines[0].decode("utf-8"))

    def request(self, method, params=None, meta=True):
        self.next_id += 1
        params = dict(params or {})
        if meta:
            params["_meta"] = dict(MODERN_META, **(meta if isinstance(meta, dict) else {}))
        self.send(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}))
        answer = self.receive()
        assert answer["id"] == self.next_id, answer
        return answer

    def call(self, tool, meta=True, **arguments):
        answer = self.request("tools/call", {"name": tool, "arguments": arguments}, meta)
        return answer["result"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


class TestMcpServer(TropTestCase):
    ENV = SKIP_PROBES

    def client(self):
        return McpClient(self, self.proj, self.environment())

    def test_the_2026_07_28_flow(self):
        mcp = self.client()
        found = mcp.request("server/discover")["result"]
        self.assertEqual(found["supportedVersions"], ["2026-07-28"])
        self.assertEqual((found["resultType"], found["cacheScope"], found["ttlMs"]), ("complete", "public", 0))
        self.assertIn("tools", found["capabilities"])
        self.assertEqual(found["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "trop")
        listed = mcp.request("tools/list")["result"]
        self.assertEqual(listed["resultType"], "complete")
        tools = {tool["name"]: tool for tool in listed["tools"]}
        self.assertEqual(sorted(tools), ["doctor", "list", "release", "reserve", "reserve_group", "url", "wait",
                                         "who"])
        for tool in listed["tools"]:
            check_json_schema(self, tool["inputSchema"], tool["name"])
            self.assertEqual(tool["inputSchema"]["type"], "object")
            self.assertTrue(tool["description"])
        # the schemas come from the operations and the option table, not from a copy
        reserve = tools["reserve"]["inputSchema"]["properties"]
        for name in trop._params(trop.run_reserve):
            self.assertIn(name, reserve)
        for option in trop.OPTIONS:
            if option.name in trop.API_OPTIONS and option.name not in ("verbose", "quiet"):
                self.assertEqual({k: v for k, v in reserve[option.name].items() if k != "description"},
                                 option.value_type.schema, option.name)
        self.assertEqual(tools["wait"]["inputSchema"]["required"], ["timeout"])
        self.assertEqual(tools["wait"]["inputSchema"]["properties"]["timeout"]["maximum"], trop.MCP_WAIT_LIMIT)
        result = mcp.call("reserve", tag="web")
        self.assertEqual((result["isError"], result["structuredContent"]["port"], result["resultType"]),
                         (False, 5000, "complete"))
        self.assertEqual(result["content"], [{"type": "text", "text": "port 5000"}])
        self.assertEqual(mcp.call("reserve", tag="web")["structuredContent"]["port"], 5000)      # stable
        rows = mcp.call("list")["structuredContent"]["reservations"]
        self.assertEqual([(r["path"], r["tag"], r["port"], r["lease"]) for r in rows], [(self.proj, "web", 5000, None)])
        who = mcp.call("who", port=5000)["structuredContent"]["reports"]
        self.assertEqual((who[0]["port"], who[0]["reservation"]["tag"]), (5000, "web"))
        self.assertEqual(mcp.call("url", service="web", route="api")["structuredContent"]["url"],
                         "http://localhost:5000/api")
        released = mcp.call("release", tag="web")["structuredContent"]["released"]
        self.assertEqual([r["port"] for r in released], [5000])
        self.assertEqual(self.rows(), [])

    def test_the_initialize_flows_2025_11_25_and_2024_11_05(self):
        for version in ("2025-11-25", "2024-11-05"):
            with self.subTest(version=version):
                mcp = self.client()
                self.assertEqual(mcp.request("tools/list", meta=False)["error"]["code"], -32602)   # not yet
                answer = mcp.request("initialize", {"protocolVersion": version, "capabilities": {},
                                                    "clientInfo": {"name": "test", "version": "1"}}, meta=False)
                result = answer["result"]
                self.assertEqual(result["protocolVersion"], version)
                self.assertEqual(result["serverInfo"]["name"], "trop")
                self.assertEqual("title" in result["serverInfo"], version >= "2025-06-18")
                self.assertNotIn("resultType", result)
                mcp.send('{"jsonrpc":"2.0","method":"notifications/initialized"}')         # no answer to it
                self.assertEqual(mcp.request("ping", meta=False)["result"], {})
                listed = mcp.request("tools/list", meta=False)["result"]
                self.assertEqual(set(listed), {"tools"})
                port = mcp.call("reserve", meta=False, tag=version)["structuredContent"]["port"]
                self.assertEqual(mcp.call("url", meta=False, service=version)["structuredContent"]["port"], port)
        self.assertEqual(self.client().request("initialize", {"protocolVersion": "1999-01-01", "capabilities": {},
                                                              "clientInfo": {"name": "t", "version": "1"}},
                                               meta=False)["result"]["protocolVersion"], "2025-11-25")

    def test_errors_are_results_or_json_rpc_errors_and_the_server_lives_on(self):
        mcp = self.client()
        failed = mcp.call("reserve", port=0)
        self.assertTrue(failed["isError"])
        self.assertEqual(failed["structuredContent"]["exit_code"], 4)
        self.assertEqual(failed["structuredContent"]["exit_name"], "EXIT_INVALID_ARGS")
        self.assertIn("port 0 is reserved", failed["content"][0]["text"])
        self.assertTrue(mcp.call("reserve", colour="red")["isError"])                # unknown argument
        self.assertTrue(mcp.call("wait", port=1)["isError"])                         # timeout is required
        wrong = mcp.call("wait", port=1, timeout="soon")                             # a value of the wrong type
        self.assertEqual((wrong["isError"], wrong["structuredContent"]["exit_code"]), (True, 4))
        mcp.send("{not json")
        self.assertEqual(mcp.receive()["error"]["code"], -32700)
        mcp.send('[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]')
        self.assertEqual(mcp.receive()["error"]["code"], -32600)
        self.assertEqual(mcp.request("resources/list")["error"]["code"], -32601)
        self.assertEqual(mcp.request("tools/call", {"name": "format_disk"})["error"]["code"], -32602)
        unsupported = mcp.request("tools/list", meta={"io.modelcontextprotocol/protocolVersion": "2030-01-01"})
        self.assertEqual(unsupported["error"]["code"], -32022)
        self.assertEqual(unsupported["error"]["data"]["requested"], "2030-01-01")
        self.assertIn("2026-07-28", unsupported["error"]["data"]["supported"])
        mcp.send('{"jsonrpc":"2.0","id":null,"method":"tools/list"}')
        self.assertEqual(mcp.receive()["error"]["code"], -32600)                  # ids are strings or integers
        mcp.send('{"jsonrpc":"2.0","id":"s","method":"tools/call","params":{"name":"list","arguments":'
                 '{"filter_tag":"\\ud800"},"_meta":%s}}' % json.dumps(MODERN_META))
        self.assertEqual(mcp.receive()["id"], "s")                                # a lone surrogate: still a line
        self.assertEqual(mcp.call("reserve")["structuredContent"]["port"], 5000)                   # still serving
        mcp.proc.stdin.close()
        self.assertEqual(mcp.proc.wait(30), 0)                                       # end of input: exit 0
        self.assertEqual(mcp.proc.stdout.read(), b"")

    def test_wait_is_bounded(self):
        mcp = self.client()
        started = time.monotonic()
        result = mcp.call("wait", port=self.free_block(1), timeout=0.3)
        self.assertTrue(result["isError"])
        self.assertEqual(result["structuredContent"]["exit_code"], 1)
        self.assertLess(time.monotonic() - started, 60)

    def test_two_servers_and_a_command_line_loop_never_share_a_port(self):
        servers = [self.client() for _ in range(2)]
        cli = [popen(["reserve", "--tag", "cli-%d" % i], self.proj, self.environment()) for i in range(10)]
        ports = []
        for i in range(10):
            for n, server in enumerate(servers):
                ports.append(server.call("reserve", tag="mcp-%d-%d" % (n, i))["structuredContent"]["port"])
        for proc in cli:
            rc, out, err = finish(proc)
            self.assertEqual(rc, 0, err)
            ports.append(int(out))
        self.assertEqual(len(ports), 30)
        self.assertEqual(len(set(ports)), 30)
        self.assertEqual(sorted(r[2] for r in self.rows(3)), sorted(ports))


class TestEnvFile(TropTestCase):
    ENV = SKIP_PROBES

    def test_managed_section_keeps_every_other_line_and_is_idempotent(self):
        path = self.write("proj/.env.local", "# mine\r\nSECRET=x\n\nOTHER=1")
        self.assertTrue(trop.run_write_env(path, {"WEB_PORT": "5000", "API_PORT": "5001"}))
        text = self.read(path).decode("utf-8")
        self.assertEqual(text, "# mine\r\nSECRET=x\n\nOTHER=1\n%s\nWEB_PORT=5000\nAPI_PORT=5001\n%s\n"
                         % (trop.ENV_BEGIN, trop.ENV_END))
        before = os.stat(path)
        self.assertFalse(trop.run_write_env(path, {"WEB_PORT": "5000", "API_PORT": "5001"}))      # unchanged
        self.assertEqual(os.stat(path).st_mtime_ns, before.st_mtime_ns)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("AFTER=2\n")
        self.assertTrue(trop.run_write_env(path, {"WEB_PORT": "6000"}))
        self.assertEqual(self.read(path).decode("utf-8"), "# mine\r\nSECRET=x\n\nOTHER=1\n%s\nWEB_PORT=6000\n%s\n"
                         "AFTER=2\n" % (trop.ENV_BEGIN, trop.ENV_END))

    def test_stray_markers_and_repeated_sections(self):
        path = self.write("proj/.env", "A=1\n%s\nX=1\n%s\nB=2\n%s\nY=2\n%s\n" % (
            trop.ENV_BEGIN, trop.ENV_END, trop.ENV_BEGIN, trop.ENV_END))
        self.assertTrue(trop.run_write_env(path, {"WEB": "5000"}))             # one section, where the first was
        self.assertEqual(self.read(path).decode(), "A=1\n%s\nWEB=5000\n%s\nB=2\n" % (trop.ENV_BEGIN, trop.ENV_END))
        for text in ("A=1\n%s\nX=1\n" % trop.ENV_BEGIN, "%s\nA=1\n" % trop.ENV_END):
            lone = self.write("proj/.env.lone", text)
            with self.assertRaises(trop.InvalidArguments):
                trop.run_write_env(lone, {"WEB": "5000"})
            self.assertEqual(self.read(lone).decode(), text)

    def test_the_replace_is_atomic(self):
        path = self.write("proj/.env", "KEEP=1\n")
        inode = os.stat(path).st_ino
        replaced = []
        with mock.patch.object(trop.PLATFORM, "replace", side_effect=lambda s, t: replaced.append(t) or
                               os.replace(s, t)):
            trop.run_write_env(path, {"WEB": "5000"})
        self.assertEqual(replaced, [os.path.realpath(path)])                 # written aside, then renamed over
        self.assertNotEqual(os.stat(path).st_ino, inode)
        with mock.patch.object(trop.PLATFORM, "replace", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(trop.IoFailure):
                trop.run_write_env(path, {"WEB": "6000"})
        self.assertIn("WEB=5000", self.read(path).decode())                  # the old file, whole
        self.assertEqual([n for n in os.listdir(self.proj) if n.endswith(".tmp")], [])

    @unittest.skipUnless(shutil.which("git"), "needs git")
    def test_a_file_git_tracks_is_refused_unless_allowed(self):
        repo = self.mkdir("repo")
        git = lambda *a: subprocess.run(["git", "-C", repo] + list(a), stdout=subprocess.DEVNULL,   # noqa: E731
                                        stderr=subprocess.DEVNULL, check=True)
        git("init", "-q")
        tracked = self.write("repo/.env", "A=1\n")
        git("add", ".env")
        with self.assertRaises(trop.InvalidArguments) as caught:
            trop.run_write_env(tracked, {"WEB": "5000"})
        self.assertIn("tracked by git", str(caught.exception))
        self.assertEqual(self.read(tracked), b"A=1\n")
        self.assertTrue(trop.run_write_env(tracked, {"WEB": "5000"}, allow_tracked=True))
        self.assertTrue(trop.run_write_env(os.path.join(repo, ".env.local"), {"WEB": "5000"}))     # untracked

    def test_autoreserve_write_env_and_url(self):
        self.group_file(self.proj, [("web", {"env": "WEB_PORT"}), ("api", {"offset": 1})], pmin=5000, pmax=5100)
        rc, out, err = self.trop("autoreserve", "--write-env", ".env.local", "--format", "json")
        self.assertEqual((rc, json.loads(out)), (0, {"api": 5001, "web": 5000}), err)
        self.assertIn("Wrote 2 variable(s) to .env.local", err)
        self.assertIn("API=5001\nWEB_PORT=5000\n", self.read(os.path.join(self.proj, ".env.local")).decode())
        rc, out, err = self.trop("autoreserve", "--write-env", ".env.local", "--format", "json")
        self.assertIn("2 variable(s) already up to date in .env.local", err)
        self.assertEqual(self.trop("url", "web"), (0, "http://localhost:5000\n", ""))
        self.assertEqual(self.trop("url", "api", "--scheme", "https", "--host", "::1", "--route", "v1/x"),
                         (0, "https://[::1]:5001/v1/x\n", ""))
        self.assertError(self.trop("url", "db"), 6, contains="not found: no reservation for %s:db" % self.proj)
        other = self.mkdir("other")
        self.assertEqual(self.trop("reserve", "--path", other, "--tag", "web", *WIDE)[0], 0)
        self.assertEqual(self.trop("url", "web", "--path", other), (0, "http://localhost:20000\n", ""))   # not the group's


# --- One data directory for a whole host ----------------------------------------

# Runs as a member of a team: imports first, then drops to UID with the team's group GID as its only
# supplementary group and the given umask; then `trop.main(ARGS)`, or CODE with `trop` imported.
AS_MEMBER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import trop, argparse, fcntl, grp, http.client, json, pwd, shutil, socket, sqlite3, subprocess, threading, time
import traceback, encodings.ascii, encodings.latin_1, urllib.parse
uid, gid, mask = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 8)
os.setgroups([gid])
os.setgid(uid)
os.setuid(uid)
os.umask(mask)
os.chdir(sys.argv[5])
if sys.argv[6] == "code":
    exec(sys.argv[7])
else:
    sys.exit(trop.main(sys.argv[7:]))
"""


def unused_ids(count):
    """count ids that are neither a user nor a group here, or None where this process cannot switch users."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import grp
    found = []
    for number in range(54321, 60000):
        try:
            pwd.getpwuid(number)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(number)
            continue
        except KeyError:
            found.append(number)
        if len(found) == count:
            return found
    return None


class TestTeamDataDirectory(TropTestCase):
    """Two users in one group share /srv/trop/data: what each creates the other can write, whatever the umask;
    neither can cost the other a reservation; doctor explains the directory.  Needs root to switch users."""

    def setUp(self):
        super().setUp()
        ids = unused_ids(3)
        if ids is None:
            self.skipTest("needs root (to run as two users of one group)")
        self.a, self.b, self.team = ids
        for directory in (self.root, self.proj, self.home):
            os.chmod(directory, 0o755)
        self.srv = self.mkdir("srv")
        os.chown(self.srv, 0, self.team)
        os.chmod(self.srv, 0o2775)                               # install -d -m 2775 -g team /srv/trop
        self.shared = os.path.join(self.srv, "data")
        self.work = {}
        for user in (self.a, self.b):
            home = self.mkdir("home-%d" % user)
            os.chown(home, user, user)
            os.chmod(home, 0o700)                                  # nobody else may look inside
            work = os.path.join(home, "work")
            os.mkdir(work)
            os.chown(work, user, user)
            self.work[user] = work

    def member(self, user, *args, mask="022", code=None, cwd=None, env=None):
        """(exit code, stdout, stderr) of trop ARGS (or CODE) run as user, a member of the team."""
        environ = self.environment(dict({"PYTHONDONTWRITEBYTECODE": "1", "TROP_DATA_DIR": self.shared,
                                         "TROP_SKIP_OCCUPANCY_CHECK": "1"}, **(env or {})))
        argv = [sys.executable, "-c", AS_MEMBER, TROP_DIR, user, self.team, mask, cwd or self.work[user]]
        argv += ["code", code] if code is not None else ["main"] + list(args)
        return self._started(spawn(argv, self.root, environ))

    def run_as(self, user, *args, **kw):
        return finish(self.member(user, *args, **kw))

    def modes(self):
        return {name: os.stat(os.path.join(self.shared, name)).st_mode & 0o7777
                for name in ["."] + sorted(os.listdir(self.shared))}

    def test_a_creates_b_reserves_lists_releases_and_prunes_with_umask_022_and_077(self):
        for mask in ("022", "077"):
            with self.subTest(umask=mask):
                if os.path.exists(self.shared):
                    shutil.rmtree(self.shared)
                rc, out, err = self.run_as(self.a, "reserve", mask=mask)
                self.assertEqual((rc, out, err), (0, "5000\n", ""))
                modes = self.modes()
                self.assertEqual(modes["."] & 0o2070, 0o2070, modes)                 # group rwx, setgid
                self.assertEqual(modes["trop.db"] & 0o060, 0o060, modes)
                self.assertEqual(os.stat(os.path.join(self.shared, "trop.db")).st_gid, self.team)
                # B's connection, held open: SQLite made -wal and -shm with trop.db's mode
                code = ("h = trop.Trop(data_dir=%r, skip_occupancy_check=True)\nprint(h.reserve(), flush=True)\n"
                        "print(json.dumps({n: os.stat(os.path.join(%r, n)).st_mode & 0o777 for n in "
                        "('trop.db-wal', 'trop.db-shm')}))\nh.close()\n" % (self.shared, self.shared))
                rc, out, err = self.run_as(self.b, code=code)
                self.assertEqual((rc, err), (0, ""))
                port, wal = out.splitlines()
                self.assertEqual(port, "5001")
                self.assertEqual({k: v & 0o060 for k, v in json.loads(wal).items()},
                                 {"trop.db-wal": 0o060, "trop.db-shm": 0o060}, wal)
                rc, out, err = self.run_as(self.b, "list", "--format", "json")
                self.assertEqual(rc, 0, err)
                self.assertEqual(sorted(r["port"] for r in json.loads(out)), [5000, 5001])
                rc, out, err = self.run_as(self.b, "prune")
                self.assertEqual(rc, 0, err)
                self.assertIn("reservation preserved by prune", err)            # A's directory: permission denied
                self.assertIn("Removed 0 reservation(s)", err)
                rc, out, err = self.run_as(self.b, "release")
                self.assertEqual((rc, err), (0, "Released reservation successfully\n"))
                self.assertEqual([r[:3] for r in self.rows(3, self.shared)], [(self.work[self.a], "", 5000)])

    def test_both_users_reserving_at_once_get_distinct_ports(self):
        self.assertEqual(self.run_as(self.a, "init")[0], 0)
        procs = []
        for user in (self.a, self.b):
            for n in range(20):
                procs.append(self.member(user, "reserve", "--tag", "t%d" % n, "--busy-timeout", "60"))
        results = [finish(proc) for proc in procs]
        self.assertEqual([(rc, err) for rc, _out, err in results], [(0, "")] * 40)
        ports = [int(out) for _rc, out, _err in results]
        self.assertEqual(len(set(ports)), 40)
        self.assertEqual(sorted(r[2] for r in self.rows(3, self.shared)), sorted(ports))

    def test_a_lock_held_by_one_user_is_waited_for_by_the_other(self):
        self.assertEqual(self.run_as(self.a, "reserve")[0], 0)
        holder = self.member(self.b, code="c = sqlite3.connect(%r, isolation_level=None)\nc.execute('BEGIN "
                                          "IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(60)\n"
                                          % os.path.join(self.shared, "trop.db"))
        self.assertEqual(first_line(holder), "locked")
        rc, out, err = self.run_as(self.a, "reserve", "--tag", "x", "--busy-timeout", "1")
        self.assertEqual((rc, out, err), (2, "", LOCK_TIMEOUT_1S))

    def test_doctor_names_a_file_the_group_cannot_write_and_its_fix(self):
        self.assertEqual(self.run_as(self.a, "reserve")[0], 0)
        db = os.path.join(self.shared, "trop.db")
        os.chmod(db, 0o644)
        rc, out, err = self.run_as(self.b, "doctor", "--format", "json")
        self.assertEqual(rc, 0, err)
        sharing = json.loads(out)["data_dir"]["sharing"]
        self.assertTrue(sharing["shared"])
        self.assertEqual(sharing["group"], str(self.team))
        self.assertEqual(sharing["fixes"][0], {"path": db, "command": "chmod g+rw %s" % db})
        entry = [f for f in sharing["files"] if f["path"] == db][0]
        self.assertEqual((entry["owner"], entry["mode"], entry["group_can_write"]), (str(self.a), "0644", False))
        rc, out, err = self.run_as(self.b, "doctor")
        self.assertIn("Warning: members of group %s cannot write %s: run `chmod g+rw %s`" % (self.team, db, db), out)
        for name in os.listdir(self.shared):           # the -wal and -shm that B's read made have trop.db's mode
            os.chmod(os.path.join(self.shared, name), 0o664)
        rc, out, err = self.run_as(self.b, "doctor", "--format", "json")
        self.assertEqual(json.loads(out)["data_dir"]["sharing"]["fixes"], [])

    def test_a_world_writable_directory_is_not_a_team_directory(self):
        scratch = self.mkdir("scratch")
        os.chmod(scratch, 0o1777)                                          # like /tmp
        self.assertFalse(trop.group_sharing(scratch))
        self.assertTrue(trop.group_sharing(self.srv))
        self.assertEqual((trop.group_sharing(scratch, "yes"), trop.group_sharing(self.srv, "no")), (True, False))

    def test_the_setting_turns_sharing_off_or_on(self):
        rc, out, err = self.run_as(self.a, "reserve", mask="077", env={"TROP_SHARE_WITH_GROUP": "no"})
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.modes()["trop.db"] & 0o077, 0)
        private = os.path.join(os.path.dirname(self.work[self.a]), "private-data")
        rc, out, err = self.run_as(self.a, "--data-dir", private, "reserve", mask="077",
                                   env={"TROP_SHARE_WITH_GROUP": "yes"})
        self.assertEqual(rc, 0, err)
        self.assertEqual(os.stat(os.path.join(private, "trop.db")).st_mode & 0o060, 0o060)


# --- README ------------------------------------------------------------------

README_PATH = os.path.join(TROP_DIR, "README.md")
README_TIMEOUT = 120
README_SKIPS = (
    (re.compile(r"^pip3? install\b"), "needs pip (and possibly the network)"),
    (re.compile(r"^(\w+=\S* )*python3 -m unittest\b"), "runs this test suite itself"),
    (re.compile(r"^bash \.ci/run\b"), "runs this test suite itself, once per Python"),
    (re.compile(r"^python3 tools/bench\.py\b"), "a benchmark that takes minutes"),
)
_README_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
_README_FILE_MARK = re.compile(r"^<!--\s*file:\s*(\S+)\s*-->$")
_README_FENCE = re.compile(r"^```\s*([A-Za-z0-9_+-]*)\s*$")


def readme_tables():
    """{marker: markdown table} of the README's tables made from trop.OPTIONS (see `python3 test_trop.py
    --readme`)."""
    def code(text):
        return "`%s`" % text

    def flag(option):
        metavar = option.value_type.argument().get("metavar", option.name.upper())
        return option.flag + ("" if option.value_type is trop._SWITCH else " " + metavar)

    def default(option):
        value = option.default
        if value is None or value == () or not option.keys:
            return "–"
        return code(str(value).lower() if isinstance(value, bool) else value)
    settings = ["| Setting (file key) | Default | Variable | Flag, API keyword | Meaning |", "|---|---|---|---|---|"]
    for o in trop.OPTIONS:
        if "global" in o.groups and not o.keys and not o.env:
            continue                        # --verbose, --quiet: in the global options table
        key = code(o.key) if o.files else ", ".join(map(code, o.keys)) or "–"
        settings.append("| %s | %s | %s | %s | %s |" % (
            key, default(o), ", ".join(map(code, o.env)) or "–",
            "%s, %s" % (code(flag(o)), code(o.name + "=")) if o.flag else "–", o.help.replace("|", "\\|")))
    globals_ = ["| Option | Effect |", "|---|---|"]
    globals_ += ["| %s | %s |" % (code(flag(o)), o.help) for o in trop.OPTIONS if "global" in o.groups]
    globals_.append("| `--version`, `-h`/`--help` | print the version (`trop %s`) / help |" % trop.__version__)
    return {"settings": "\n".join(settings), "global-options": "\n".join(globals_)}


def readme_with_tables(text):
    """text with every generated table replaced by what trop.OPTIONS makes of it now."""
    for marker, table in readme_tables().items():
        head = "<!-- %s: generated from trop.OPTIONS by `python3 test_trop.py --readme` -->\n" % marker
        start, end = text.index(head) + len(head), text.index("<!-- /%s -->" % marker)
        text = text[:start] + table + "\n" + text[end:]
    return text


def readme_blocks(text):
    """[(language, first line number, [lines], file name or None)] of every fenced block."""
    blocks, lang, start, body, mark, pending = [], None, 0, [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        if lang is None:
            fence = _README_FENCE.match(line)
            if fence:
                lang, start, body, mark, pending = fence.group(1) or "text", number + 1, [], pending, None
                continue
            found = _README_FILE_MARK.match(line.strip())
            if found:
                pending = found.group(1)
            elif line.strip():
                pending = None
        elif line.strip() == "```":
            blocks.append((lang, start, body, mark))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        raise AssertionError("README.md: code block opened on line %d is never closed" % (start - 1))
    return blocks


def readme_steps(text):
    """The README as a script: ("file", name, content) and ("run", command, line number, skip reason)."""
    steps = []
    for lang, start, body, mark in readme_blocks(text):
        if mark is not None:
            steps.append(("file", mark, "\n".join(body) + "\n"))
        if lang != "console":
            continue
        for offset, line in enumerate(body):
            if not line.startswith("$ "):
                continue
            command = line[2:].strip()
            reason = next((why for pattern, why in README_SKIPS if pattern.search(command)), None)
            steps.append(("run", command, start + offset, reason))
    return steps


class TestReadme(TropTestCase):
    """The README run as a script in self.proj, with `trop` and `python3` on PATH."""

    def setUp(self):
        super().setUp()
        if not os.path.exists(README_PATH):
            self.fail("README.md is missing next to trop.py (%s)" % README_PATH)
        with open(README_PATH, encoding="utf-8") as fh:
            self.text = fh.read()
        bin_dir = self.mkdir("bin")
        quoted_py = "'%s'" % sys.executable.replace("'", "'\\''")
        quoted_dir = "'%s'" % TROP_DIR.replace("'", "'\\''")
        os.chmod(self.write(os.path.join(bin_dir, "trop"),
                            "#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}\nexport PYTHONPATH\n"
                            "exec %s -m trop \"$@\"\n" % (quoted_dir, quoted_py)), 0o755)
        os.chmod(self.write(os.path.join(bin_dir, "python3"), "#!/bin/sh\nexec %s \"$@\"\n" % quoted_py), 0o755)
        # Bytecode goes to clean_env()'s cache (none before Python 3.8: then none is written into self.proj).
        self.shell_env = self.environment({"SHELL": "/bin/sh",
                                           "PYTHONDONTWRITEBYTECODE": None if sys.version_info >= (3, 8) else "1",
                                           "PATH": bin_dir + os.pathsep + self.env.get("PATH", os.defpath)})
        shutil.copy(os.path.join(TROP_DIR, "trop.py"), os.path.join(self.proj, "trop.py"))

    def run_in(self, cwd, *argv):
        """(exit status, stdout, stderr) of argv in cwd with the README's environment."""
        return self.execute(argv, cwd, self.shell_env, README_TIMEOUT, allow_traceback=True)

    def test_quick_start_commands(self):
        commands = [s[1] for s in readme_steps(self.text) if s[0] == "run"]
        self.assertEqual(commands[:2], ["python3 -m trop reserve", "python3 -m unittest -v"])

    def test_option_tables_are_made_from_the_option_table(self):
        self.assertEqual(self.text, readme_with_tables(self.text),
                         "README.md's option tables are out of date: run `python3 test_trop.py --readme`")

    def test_every_command_is_documented(self):
        for name in trop.COMMANDS:
            self.assertRegex(self.text, r"\n\| `%s[ `]" % re.escape(name), "no table row for %s" % name)

    def test_console_lines(self):
        bash = shutil.which("bash")
        if bash is None:
            self.skipTest("bash is not available")
        ran = skipped = 0
        for step in readme_steps(self.text):
            if step[0] == "file":
                self.write(os.path.join(self.proj, step[1]), step[2])
                continue
            _, command, line, reason = step
            if reason:
                skipped += 1
                continue
            wanted = _README_EXIT.search(command)
            expected = int(wanted.group(1)) if wanted else 0
            rc, out, err = self.run_in(self.proj, bash, "-c", command)
            ran += 1
            self.assertEqual(rc, expected,
                             "README.md line %d: `%s` exited %s, expected %d\n--- stdout:\n%s--- stderr:\n%s"
                             % (line, command, rc, expected, out, err))
            if expected == 0:
                self.assertNotIn("Traceback", err, "README.md line %d: `%s`" % (line, command))
        self.assertGreaterEqual(ran, 40, "too few README console lines ran")
        self.assertGreaterEqual(skipped, 1)

    def test_documented_status_lines_are_what_trop_prints(self):
        """The README's words for run --dry-run and the cleanup commands' --quiet, checked against trop."""
        group = self.group_dir("readme-group", [("web", {"env": "WEB_PORT"})])
        rc, _out, err = self.run_in(group, sys.executable, "-m", "trop", "run", "--dry-run", "--", "npm", "start")
        self.assertEqual(rc, 0, err)
        self.assertTrue(err.startswith("Dry run - would run npm start with WEB_PORT="), err)
        self.assertIn("\nDry run - would run npm start with ", self.text)
        self.assertEqual(self.run_in(self.proj, sys.executable, "-m", "trop", "autoclean", "--quiet"), (0, "", ""))
        self.assertIn("`--quiet` prints only the count, on stdout, and nothing when it is 0", " ".join(self.text.split()))

    def test_yaml_examples_validate(self):
        blocks = [b for b in readme_blocks(self.text) if b[0] in ("yaml", "yml")]
        self.assertTrue(blocks, "README.md has no YAML example")
        for number, (_, start, body, mark) in enumerate(blocks):
            folder = self.mkdir("yaml-%d" % number)
            path = self.write(os.path.join(folder, os.path.basename(mark or "trop.yaml")), "\n".join(body) + "\n")
            rc, _out, err = self.run_in(folder, sys.executable, "-m", "trop", "validate", path)
            self.assertEqual(rc, 0, "README.md YAML block at line %d:\n%s" % (start, err))

    def test_python_examples_run(self):
        blocks = [b for b in readme_blocks(self.text) if b[0] == "python"]
        self.assertTrue(blocks, "README.md has no Python example")
        for number, (_, start, body, _) in enumerate(blocks):
            with self.subTest(line=start):
                folder = self.mkdir("py-%d" % number)
                name = "test_readme_example_%d.py" % number
                self.write(os.path.join(folder, name), "\n".join(body) + "\n")
                if "trop_port" in "\n".join(body):
                    if importlib.util.find_spec("pytest") is None:
                        self.skipTest("pytest is not installed")
                    argv = [sys.executable, "-m", "pytest", "-q", "-p", "trop", "-p", "no:cacheprovider", name]
                else:
                    argv = [sys.executable, name]
                rc, out, err = self.run_in(folder, *argv)
                self.assertEqual(rc, 0, "README.md Python block at line %d:\n%s%s" % (start, out, err))


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:          # rewrite README.md's tables made from trop.OPTIONS
        with open(README_PATH, encoding="utf-8") as fh:
            readme = readme_with_tables(fh.read())
        with open(README_PATH, "w", encoding="utf-8") as fh:
            fh.write(readme)
    else:
        unittest.main()
