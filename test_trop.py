"""Tests for trop.py: errors and exit codes, path normalization and the path
guard, git inference, the reservation models, the SQLite store (schema v2,
v1 -> v2 migration, corruption and unsupported-schema handling), occupancy
probes, port allocation, and the commands init, show-data-dir, show-path,
reserve, release, list, list-projects, assert-reservation, assert-port,
assert-data-dir and port-info with their global options, environment
variables and exact output, plus multi-process concurrency. Unit tests call
the library (``import trop``); command-line tests run ``python -m trop`` in
temporary directories with an isolated HOME and data directory. Run with
``python3 -m unittest`` from the directory holding trop.py; set
``TROP_STRESS=1`` to also run the stress tests.
"""

import atexit
import calendar
import contextlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import trop

TROP_DIR = os.path.dirname(os.path.abspath(trop.__file__))
STRESS = os.environ.get("TROP_STRESS") == "1"        # gates stress tests: @unittest.skipUnless(STRESS, ...)

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


# --- helpers -----------------------------------------------------------------

_PYCACHE = []


def _pycache_dir():
    """One temporary bytecode cache for every child process of this run (nothing is written next to trop.py)."""
    if not _PYCACHE:
        _PYCACHE.append(tempfile.mkdtemp(prefix="trop-test-pycache-"))
        atexit.register(shutil.rmtree, _PYCACHE[0], True)
    return _PYCACHE[0]


def clean_env(**values):
    """The inherited environment without TROP_* variables, plus PYTHONPATH and the given values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TROP_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = TROP_DIR
    env["PYTHONPYCACHEPREFIX"] = _pycache_dir()
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(*args, cwd=None, env=None):
    """Run `python -m trop ARGS`; returns (exit code, stdout, stderr). No stderr may hold a traceback."""
    proc = subprocess.run([sys.executable, "-m", "trop"] + [str(a) for a in args], cwd=cwd,
                          env=clean_env() if env is None else env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if "Traceback" in proc.stderr:
        raise AssertionError("traceback in stderr of trop %s:\n%s" % (" ".join(map(str, args)), proc.stderr))
    return proc.returncode, proc.stdout, proc.stderr


def popen(args, cwd, env):
    return subprocess.Popen([sys.executable, "-m", "trop"] + [str(a) for a in args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)


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


def db_rows(data_dir):
    conn = sqlite3.connect(os.path.join(data_dir, "trop.db"))
    try:
        return conn.execute("SELECT %s FROM reservations ORDER BY path, tag" % COLUMNS).fetchall()
    finally:
        conn.close()


def read_bytes(path):
    with open(path, "rb") as fh:
        return fh.read()


def write_file(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def sql_tokens(sql):
    """Upper-cased tokens of a CREATE statement, ignoring whitespace and `IF NOT EXISTS`."""
    import re
    tokens = [t.upper() for t in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+|>=|\S", sql)]
    if tokens[2:5] == ["IF", "NOT", "EXISTS"]:
        del tokens[2:5]
    return tokens


class TempDirTestCase(unittest.TestCase):
    """A fresh real (symlink-free) temporary directory per test."""

    def setUp(self):
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="trop-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)

    def mkdir(self, *parts):
        path = os.path.join(self.root, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def chdir(self, path):
        old = os.getcwd()
        os.chdir(path)
        self.addCleanup(os.chdir, old)


class CLITestCase(TempDirTestCase):
    """Black-box tests: cwd = <tmp>/proj, HOME = <tmp>/home, TROP_DATA_DIR = <tmp>/data."""

    def setUp(self):
        TempDirTestCase.setUp(self)
        self.home = self.mkdir("home")
        self.proj = self.mkdir("proj")
        self.data = os.path.join(self.root, "data")
        self.db = os.path.join(self.data, "trop.db")
        self.env = clean_env(HOME=self.home, TROP_DATA_DIR=self.data, TROP_SKIP_OCCUPANCY_CHECK="1")

    def trop(self, *args, **kw):
        """run() with this test's cwd and environment; keyword TROP_X=... adds (None removes) variables."""
        cwd = kw.pop("cwd", self.proj)
        env = dict(kw.pop("env", self.env))
        for key, value in kw.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return run(*args, cwd=cwd, env=env)

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

    def assertPort(self, result, port):
        rc, out, err = result
        self.assertEqual((rc, out, err), (0, "%d\n" % port, ""))

    def reserve_port(self, *args, **kw):
        rc, out, err = self.trop("reserve", *args, **kw)
        self.assertEqual(rc, 0, err)
        self.assertEqual(err, "")
        return int(out)


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
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.object(trop, "resolve_data_dir", side_effect=RuntimeError("boom")), \
                mock.patch.dict(os.environ, {"TROP_DEBUG": ""}), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = trop.main(["show-data-dir"])
        self.assertEqual((code, out.getvalue()), (6, ""))
        self.assertTrue(err.getvalue().startswith("Error: internal error: "), err.getvalue())
        self.assertIn("boom", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)

    def test_corruption_error_is_a_library_error(self):
        err = trop.CorruptionError("table=reservations, field=port, key=path=\"/a\", tag=<untagged>: bad")
        self.assertEqual(err.exit_code, 6)
        self.assertTrue(str(err).startswith("database corruption detected: table=reservations, field=port"))


class TestCommandLineBasics(CLITestCase):
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


# --- Configuration (environment layer) ---------------------------------------

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


# --- Paths -------------------------------------------------------------------

class TestPaths(TempDirTestCase):
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
        trop.check_path_relationship(os.path.join(self.root, "link", "proj", "sub"), False)

    def test_shorten_home(self):
        with mock.patch.dict(os.environ, {"HOME": "/home/me"}):
            self.assertEqual(trop.shorten_home("/home/me"), "~/")
            self.assertEqual(trop.shorten_home("/home/me/a/b"), "~/a/b")
            self.assertEqual(trop.shorten_home("/home/meant"), "/home/meant")
            self.assertEqual(trop.shorten_home("/srv"), "/srv")


class TestGitInference(TempDirTestCase):
    def repo(self, name, head="ref: refs/heads/main\n"):
        gitdir = self.mkdir(name, ".git")
        write_file(os.path.join(gitdir, "HEAD"), head)
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
        write_file(os.path.join(wt_gitdir, "HEAD"), "ref: refs/heads/topic\n")
        write_file(os.path.join(wt_gitdir, "commondir"), "../..\n")
        worktree = self.mkdir("feature-wt")
        write_file(os.path.join(worktree, ".git"), "gitdir: %s\n" % wt_gitdir)
        self.assertEqual(trop.infer_git_metadata(worktree), ("mainrepo", "feature-wt"))
        self.assertEqual(trop.infer_git_metadata(self.mkdir("feature-wt", "deep")), ("mainrepo", "feature-wt"))
        self.assertEqual(trop.infer_git_metadata(main), ("mainrepo", "main"))

    def test_bare_repository(self):
        bare = self.mkdir("x.git")
        write_file(os.path.join(bare, "HEAD"), "ref: refs/heads/main\n")
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

class TestStore(CLITestCase):
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
        self.assertEqual(db_rows(self.data), [("/w/a", "", 5000, "p", None, T1, T2),
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
        before = read_bytes(self.db)
        self.assertError(self.trop("list"), 6, contains=["blocked", "duplicate"])
        self.assertTrue(read_bytes(self.db) == before, "trop.db was modified")

    def test_validate_does_not_migrate_v1(self):
        make_v1_db(self.data, [("/w/a", None, 5000, None, None, T1, T2)])
        before = read_bytes(self.db)
        self.assertError(self.trop("assert-data-dir", "--validate"), 6, contains="migration required")
        self.assertTrue(read_bytes(self.db) == before, "trop.db was modified")

    def test_schema_version_3_is_unsupported(self):
        make_v2_db(self.data, [("/w/a", "", 5000, None, None, T1, T2)])
        conn = self.open_conn()
        conn.execute("UPDATE metadata SET value = '3' WHERE key = 'schema_version'")
        self.assertError(self.trop("reserve"), 6, "unsupported schema version: expected 2, found 3")
        self.assertEqual(conn.execute("SELECT value FROM metadata").fetchall(), [("3",)])
        self.assertEqual(db_rows(self.data), [("/w/a", "", 5000, None, None, T1, T2)])

    def test_not_a_database(self):
        os.makedirs(self.data)
        content = b"this is not an SQLite database\n" * 100
        with open(self.db, "wb") as fh:
            fh.write(content)
        for args in (("reserve",), ("list",), ("assert-data-dir", "--validate")):
            result = self.trop(*args)
            self.assertError(result, 6)
            self.assertNotIn("lock timeout", result[2])
            self.assertTrue(read_bytes(self.db) == content, "trop.db was modified by %s" % (args,))

    def test_corrupt_row_is_reported(self):
        make_v2_db(self.data, [("relative/x", "", 5000, None, None, T1, T2)])
        self.assertError(self.trop("list"), 6, startswith="database corruption detected: table=reservations, "
                         "field=path, key=path=\"relative/x\", tag=<untagged>")


# --- Occupancy ---------------------------------------------------------------

class TestOccupancy(unittest.TestCase):
    def test_listening_tcp_socket_is_occupied(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        self.assertTrue(trop.Occupancy(trop.OccupancyPolicy()).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip=True)).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_tcp=True)).occupied(port))
        sock.close()
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_udp=True)).occupied(port))

    def test_bound_udp_socket_is_occupied(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.assertTrue(trop.Occupancy(trop.OccupancyPolicy(skip_tcp=True)).occupied(port))
        self.assertFalse(trop.Occupancy(trop.OccupancyPolicy(skip_udp=True, skip_ip6=True)).occupied(port))


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
    def test_find_free_port_skips_taken_excluded_and_occupied(self):
        rng = trop.PortRange(5000, 5010)
        excl = trop.ExclusionList([(5002, 5003)])
        free = trop.find_free_port
        self.assertEqual(free(rng, port_set(), trop.ExclusionList(), FakeOccupancy()), 5000)
        self.assertEqual(free(rng, port_set({5000, 5001}), excl, FakeOccupancy()), 5004)
        self.assertEqual(free(rng, port_set({5000, 5001}), excl, FakeOccupancy({5004})), 5005)
        self.assertEqual(free(rng, port_set({5000, 5001, 5004, 5005, 5006, 5008}), excl, FakeOccupancy({5007})), 5009)
        self.assertEqual(free(trop.PortRange(5003, 5010), port_set({5000, 5001}), excl, FakeOccupancy()), 5004)
        self.assertIsNone(free(trop.PortRange(5000, 5001), port_set({5000}), trop.ExclusionList([(5001, 5001)]),
                               FakeOccupancy()))
        self.assertIsNone(free(trop.PortRange(5000, 5002), port_set(range(4990, 5003)), trop.ExclusionList(),
                               FakeOccupancy()))

    def request(self, preferred, **flags):
        values = dict(preferred=preferred, port_range=trop.PortRange(5000, 5010),
                      exclusions=trop.ExclusionList([(5005, 5005)]), ignore_exclusions=False,
                      ignore_occupied=False, force=False)
        values.update(flags)
        return types.SimpleNamespace(**values)

    def allocate(self, preferred, taken=(), busy=(), **flags):
        return trop.allocate_single(self.request(preferred, **flags), port_set(taken), FakeOccupancy(busy))[0]

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


# --- Operations and API -------------------------------------------------------

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


class TestPythonAPI(TempDirTestCase):
    def setUp(self):
        TempDirTestCase.setUp(self)
        patcher = mock.patch.dict(os.environ, {"HOME": self.mkdir("home")})
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in [k for k in os.environ if k.startswith("TROP_")]:
            del os.environ[name]
        self.chdir(self.mkdir("proj"))
        self.opts = dict(data_dir=os.path.join(self.root, "data"), skip_occupancy_check=True)

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


# --- Command line: reserve -------------------------------------------------------

class TestReserveCLI(CLITestCase):
    def test_reserve_prints_port_and_is_stable(self):
        self.assertPort(self.trop("reserve"), 5000)
        self.assertPort(self.trop("reserve"), 5000)
        self.assertPort(self.trop("reserve", "--tag", "web"), 5001)
        self.assertPort(self.trop("reserve", "--tag", "  web "), 5001)
        self.assertPort(self.trop("reserve", "--path", "sub"), 5002)
        rows = db_rows(self.data)
        self.assertEqual([r[:5] for r in rows], [(self.proj, "", 5000, None, None),
                                                 (self.proj, "web", 5001, None, None),
                                                 (self.proj + "/sub", "", 5002, None, None)])
        now = int(time.time())
        for row in rows:
            self.assertTrue(now - 120 <= row[5] <= row[6] <= now + 1, row)

    def test_refresh_updates_last_used_only(self):
        make_v2_db(self.data, [(self.proj, "", 5004, "p", "t", T1, T1)])
        self.assertPort(self.trop("reserve", "--port", "5000"), 5004)       # --port ignored for existing keys
        (row,) = db_rows(self.data)
        self.assertEqual(row[:6], (self.proj, "", 5004, "p", "t", T1))
        self.assertGreater(row[6], T1)

    def test_preferred_port(self):
        self.assertPort(self.trop("reserve", "--port", "5005"), 5005)
        self.assertPort(self.trop("reserve", "--path", "b", "--port", "5005"), 5000)
        self.assertPort(self.trop("reserve", "--path", "c", "--port", "9000"), 5001)

    def test_range_from_flags_and_environment(self):
        self.assertPort(self.trop("reserve", "--min", "20000", "--max", "20010"), 20000)
        self.assertPort(self.trop("reserve", "--path", "b", TROP_PORT_MIN="21000", TROP_PORT_MAX="21010"), 21000)

    def test_exhausted_range(self):
        self.assertPort(self.trop("reserve", "--min", "20000", "--max", "20000"), 20000)
        self.assertError(self.trop("reserve", "--path", "b", "--min", "20000", "--max", "20000",
                                   "--disable-autoclean"), 6, contains="port range 20000-20000 exhausted")

    def test_overwrite_moves_to_lowest_free_port_and_keeps_created_at(self):
        make_v2_db(self.data, [(self.proj + "/other", "", 5000, None, None, T1, T1),
                               (self.proj, "", 5003, "p", None, T1, T1)])
        self.assertPort(self.trop("reserve", "--overwrite"), 5001)
        self.assertPort(self.trop("reserve", "--overwrite", "--port", "5002"), 5002)
        self.assertPort(self.trop("reserve", "--overwrite", "--port", "5000"), 5001)   # held by another key
        row = [r for r in db_rows(self.data) if r[0] == self.proj][0]
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
        self.assertError(self.trop("reserve", TROP_PROJECT="c"), 1)
        self.assertPort(self.trop("reserve", TROP_PROJECT="c", TROP_ALLOW_PROJECT_CHANGE="1"), 5000)
        self.assertEqual(db_rows(self.data)[0][3], "c")
        self.assertPort(self.trop("reserve", "--project", "d", "--force"), 5000)
        self.assertEqual(db_rows(self.data)[0][3], "d")
        self.assertPort(self.trop("reserve", "--clear-project", "--allow-change"), 5000)
        self.assertEqual(db_rows(self.data)[0][2:5], (5000, None, None))

    def test_sticky_task(self):
        self.assertPort(self.trop("reserve", "--task", "x"), 5000)
        self.assertError(self.trop("reserve", "--task", "y"), 1, startswith="cannot change sticky field 'task'")
        self.assertError(self.trop("reserve", TROP_TASK="y"), 1)
        self.assertPort(self.trop("reserve", "--task", "y", "--allow-task-change"), 5000)
        self.assertPort(self.trop("reserve", TROP_TASK="z", TROP_ALLOW_CHANGE="true"), 5000)
        self.assertEqual(db_rows(self.data)[0][4], "z")
        self.assertPort(self.trop("reserve", "--clear-task", "--force"), 5000)
        self.assertEqual(db_rows(self.data)[0][4], None)

    def test_project_and_task_from_environment_on_new_key(self):
        self.assertPort(self.trop("reserve", TROP_PROJECT=" app ", TROP_TASK="t1"), 5000)
        self.assertEqual(db_rows(self.data)[0][3:5], ("app", "t1"))

    def test_git_inference_for_new_keys(self):
        write_file(os.path.join(self.proj, ".git", "HEAD"), "ref: refs/heads/feature\n")
        self.assertPort(self.trop("reserve"), 5000)
        self.assertPort(self.trop("reserve", "--project", "explicit", "--tag", "t"), 5001)
        self.assertEqual([r[3:5] for r in db_rows(self.data)], [("proj", "feature"), ("explicit", "feature")])

    def test_path_guard(self):
        self.assertError(self.trop("reserve", "--path", "/unrelated"), 1,
                         startswith="path relationship violation: /unrelated and %s are unrelated paths" % self.proj)
        self.assertPort(self.trop("reserve", "--path", "/unrelated", "--allow-unrelated-path"), 5000)
        self.assertPort(self.trop("reserve", "--path", "/unrelated2", TROP_ALLOW_UNRELATED_PATH="1"), 5001)
        self.assertPort(self.trop("reserve", "--path", "/unrelated3", "--force"), 5002)
        self.assertPort(self.trop("reserve", "--path", self.root), 5003)                       # ancestor
        self.assertPort(self.trop("reserve", "--path", self.proj + "/sub/deeper"), 5004)     # descendant
        self.assertPort(self.trop("reserve", TROP_PATH=self.proj + "/env"), 5005)
        self.assertEqual(db_rows(self.data)[-1][0], "/unrelated3")
        self.assertIn((self.proj + "/env", "", 5005), [r[:3] for r in db_rows(self.data)])

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
        before = db_rows(self.data)
        for args in (("--dry-run",), ("--dry-run", "--overwrite"), ("--dry-run", "--path", "new"),
                     ("--dry-run", "--project", "q", "--allow-project-change")):
            rc, out, err = self.trop("reserve", *args)
            self.assertEqual((rc, out), (0, ""), err)
            self.assertTrue(err.startswith("Dry run - would perform the following actions:\n"), err)
        self.assertEqual(db_rows(self.data), before)

    def test_disable_autoinit(self):
        self.assertError(self.trop("reserve", "--disable-autoinit"), 3, startswith="Data directory not found")
        self.assertError(self.trop("reserve", TROP_DISABLE_AUTOINIT="1"), 3)
        self.assertFalse(os.path.exists(self.db))

    def test_no_home(self):
        self.assertError(self.trop("reserve", HOME=None, TROP_DATA_DIR=None), 7)

    def test_unwritable_data_directory(self):
        if os.geteuid() == 0:
            write_file(os.path.join(self.root, "file"), "a regular file\n")
            data = os.path.join(self.root, "file", "data")
        else:
            make_v2_db(self.data)
            os.chmod(self.data, 0o555)
            self.addCleanup(os.chmod, self.data, 0o755)
            data = self.data
        self.assertError(self.trop("reserve", TROP_DATA_DIR=data), 6)
        self.assertError(self.trop("reserve", "--data-dir", data), 6)

    def test_busy_timeout_validation(self):
        for value in ("-1", "abc"):
            rc, out, _ = self.trop("reserve", "--busy-timeout", value)
            self.assertEqual((rc, out), (2, ""))
        self.assertError(self.trop("reserve", "--busy-timeout", "2147484"), 7, contains="2147483")
        self.assertFalse(os.path.exists(self.data))
        self.assertPort(self.trop("reserve", "--busy-timeout", "2147483"), 5000)


# --- Command line: release -------------------------------------------------------

class TestReleaseCLI(CLITestCase):
    def setUp(self):
        CLITestCase.setUp(self)
        p = self.proj
        self.rows = [(p + "/a", "", 5000, None, None, T1, T1), (p + "/a", "web", 5001, None, None, T1, T1),
                     (p + "/a/x", "", 5002, None, None, T1, T1), (p + "/ab", "", 5003, None, None, T1, T1),
                     (p + "/ab", "web", 5004, None, None, T1, T1)]
        make_v2_db(self.data, self.rows)

    def remaining(self):
        return [r[2] for r in db_rows(self.data)]

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
        self.assertEqual(db_rows(self.data), sorted(self.rows))

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


# --- Command line: list, list-projects -------------------------------------------------

class TestListCLI(CLITestCase):
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
        self.assertEqual(self.trop("list", TROP_OUTPUT_FORMAT="json"), (0, expected, ""))

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
        self.assertError(self.trop("list", TROP_OUTPUT_FORMAT="xml"), 7)

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


# --- Command line: assertions and port-info -------------------------------------------

class TestAssertCLI(CLITestCase):
    def seed(self):
        make_v2_db(self.data, [(self.proj, "", 5000, None, None, T1, T2),
                               (self.proj, "web", 5001, "app", "t1", T1, T2),
                               ("/nonexistent/dir", "", 5002, None, None, T1, T2)])

    def test_assert_reservation(self):
        self.seed()
        self.assertEqual(self.trop("assert-reservation"), (0, "5000\n", ""))
        self.assertEqual(self.trop("assert-reservation", "--tag", "web"), (0, "5001\n", ""))
        self.assertEqual(self.trop("assert-reservation", "--tag", "web", "--quiet"), (0, "", ""))
        self.assertEqual(self.trop("assert-reservation", TROP_PATH="/nonexistent/dir"), (0, "5002\n", ""))
        self.assertEqual(self.trop("assert-reservation", "--tag", "db", "--not"), (0, "", ""))
        self.assertError(self.trop("assert-reservation", "--tag", "db"), 1,
                         "Assertion failed: no reservation found for %s:db" % self.proj)
        self.assertError(self.trop("assert-reservation", "--not"), 1,
                         "Assertion failed: reservation exists for %s" % self.proj)
        self.assertError(self.trop("assert-reservation", "--tag", " "), 6)
        self.assertEqual(db_rows(self.data)[0][6], T2)          # assertions never touch rows

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
        self.assertError(self.trop("assert-data-dir"), 1, "Assertion failed: data directory not found at %s" % self.data)
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
        self.assertEqual(self.trop("port-info", "6000"), (0, "Port 6000 is not reserved\n", ""))
        self.assertError(self.trop("port-info", "0"), 4)

    def test_port_info_occupancy_flags_require_include_occupancy(self):
        rc, out, _ = self.trop("port-info", "5000", "--skip-tcp")
        self.assertEqual((rc, out), (2, ""))


# --- Command line: show-data-dir, show-path -----------------------------------------------

class TestShowCLI(CLITestCase):
    def test_show_data_dir(self):
        self.assertEqual(self.trop("show-data-dir"), (0, self.data + "\n", ""))
        self.assertEqual(self.trop("show-data-dir", TROP_DATA_DIR=None), (0, self.home + "/.trop\n", ""))
        self.assertEqual(self.trop("--data-dir", "rel/d", "show-data-dir"), (0, "rel/d\n", ""))
        self.assertEqual(self.trop("show-data-dir", "--data-dir", "rel/d"), (0, "rel/d\n", ""))
        self.assertError(self.trop("show-data-dir", HOME=None, TROP_DATA_DIR=None), 7)
        self.assertFalse(os.path.exists(self.data))

    def test_show_path(self):
        self.assertEqual(self.trop("show-path", TROP_PATH="/elsewhere"), (0, self.proj + "\n", ""))
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


# --- Command line: init ------------------------------------------------------------

class TestInitCLI(CLITestCase):
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
        self.assertError(self.trop("init", TROP_DISABLE_AUTOPRUNE="perhaps"), 7)
        self.assertFalse(os.path.exists(self.data))


# --- Command line: global options -----------------------------------------------------

class TestGlobalOptionsCLI(CLITestCase):
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


# --- Concurrency ---------------------------------------------------------------

class TestConcurrency(CLITestCase):
    """Real processes against one database; every assertion is strict."""

    def setUp(self):
        CLITestCase.setUp(self)
        self.env = clean_env(HOME=self.home, TROP_DATA_DIR=self.data)        # occupancy probes on
        self.assertEqual(self.trop("init")[0], 0)

    def list_ports(self):
        rc, out, err = self.trop("list", "--format", "json")
        self.assertEqual((rc, err), (0, ""))
        return [r["port"] for r in json.loads(out)]

    def concurrent_reserves(self, count, prefix):
        procs = [popen(["reserve", "--path", os.path.join(self.root, "%s-%d" % (prefix, i)),
                        "--allow-unrelated-path"], self.proj, self.env) for i in range(count)]
        results = [(p.communicate() + (p.returncode,)) for p in procs]
        for out, err, rc in results:
            self.assertEqual((rc, err), (0, ""), err)
        ports = [int(out) for out, _err, _rc in results]
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

    def test_readers_during_writes(self):
        for i in range(5):
            self.reserve_port("--path", os.path.join(self.root, "seed-%d" % i), "--allow-unrelated-path")
        failures = []

        def writer():
            for i in range(20):
                rc, _out, err = self.trop("reserve", "--path", os.path.join(self.root, "writer-%d" % i),
                                          "--allow-unrelated-path")
                if rc:
                    failures.append(("reserve", rc, err))

        def reader(_n):
            ok = 0
            for _ in range(50):
                rc, out, err = self.trop("list")
                if rc == 0 and out.startswith("PORT\t"):
                    ok += 1
                else:
                    failures.append(("list", rc, err))
            return ok

        thread = threading.Thread(target=writer)
        thread.start()
        with ThreadPoolExecutor(max_workers=10) as pool:
            counts = list(pool.map(reader, range(10)))
        thread.join()
        self.assertEqual(failures, [])
        self.assertEqual(counts, [50] * 10)
        self.assertEqual(len(set(self.list_ports())), 25)

    def hold_write_lock(self):
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=0)
        conn.execute("BEGIN IMMEDIATE")
        self.addCleanup(conn.close)
        return conn

    def test_lock_timeout(self):
        self.reserve_port()
        before = db_rows(self.data)
        conn = self.hold_write_lock()
        for args, extra in ((("reserve", "--busy-timeout", "1", "--quiet", "--path", "new"), {}),
                            (("release", "--quiet"), {"TROP_BUSY_TIMEOUT": "1"})):
            start = time.monotonic()
            result = self.trop(*args, **extra)
            elapsed = time.monotonic() - start
            self.assertEqual(result, (2, "", LOCK_TIMEOUT_1S), args)
            self.assertTrue(0.8 <= elapsed < 3, "%s took %.2fs" % (args, elapsed))
        self.assertEqual(db_rows(self.data), before)
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
        proc = popen(["reserve", "--busy-timeout", "5", "--path", "waiting"], self.proj, self.env)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.communicate()))
        time.sleep(0.5)
        self.assertIsNone(proc.poll())
        conn.execute("ROLLBACK")
        out, err = proc.communicate()
        self.assertEqual((proc.returncode, err), (0, ""))
        self.assertGreaterEqual(time.monotonic() - start, 0.5)
        self.assertEqual(db_rows(self.data)[0][:3], (self.proj + "/waiting", "", int(out)))


if __name__ == "__main__":
    unittest.main()
