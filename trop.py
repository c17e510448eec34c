"""trop: stable, collision-free port reservations for directories.

``PORT=$(python3 -m trop reserve)`` returns the same port for the same
directory every time and a different port for every other directory, safely
under many concurrent processes.  The reservations live in one SQLite file
(``~/.trop/trop.db``) shared with the Rust ``trop`` 0.2.0.

The module is a library first (``import trop``; see ``__all__``) with a thin
command line in :func:`main`.  It depends on the standard library only, so it
can be copied into a repository as a single file.

Every command that may write reads, plans and writes inside one
``BEGIN IMMEDIATE`` transaction on one connection: a plan is never built from
data read outside the transaction that executes it.
"""

# Import policy.  Start-up is most of a command's run time, so the top of the
# module imports only what every command line has loaded anyway: modules the
# interpreter imports before trop runs (os, sys, stat, codecs, io; time and
# errno are builtins) or that argparse imports for the parser every command
# builds (re, collections), plus bisect (C-accelerated), which allocation needs.
# Anything else costs a run that uses it and no other: a module one function
# needs is imported in that function; a module several functions need
# (argparse, json, sqlite3, socket, subprocess, shutil, pwd, fcntl,
# urllib.parse) comes from one accessor below, so it is imported in one place.
# `python3 tools/bench.py` prints the import figures that justify the split
# (P0) next to the command timings (P1-P3).
import codecs
import errno
import io
import os
import re
import stat
import sys
import time
from bisect import bisect_left, bisect_right, insort
from collections import namedtuple

__version__ = "0.2.0"

__all__ = [
    "TropError", "SemanticFailure", "LockTimeout", "NoDataDirectory", "InvalidArguments",
    "IoFailure", "LibraryError", "ConfigError", "CorruptionError", "UsageError",
    "Reservation", "ReservationKey", "PortRange", "ExclusionList", "GroupSpec", "Plan",
    "Trop", "reserve", "release", "reserve_group", "autoreserve", "list_reservations",
    "list_projects", "port_info", "prune", "expire", "autoclean", "migrate", "data_dir", "wait", "who",
    "WaitTimeout", "ReservedPort",
    "reservation", "main", "__version__",
]


def _argparse():
    import argparse
    return argparse


def _json():
    import json
    return json


def _sqlite():
    import sqlite3
    return sqlite3


def _socket():
    import socket
    return socket


def _subprocess():
    import subprocess
    return subprocess


def _shutil():
    import shutil
    return shutil


def _fcntl():
    import fcntl                # POSIX only
    return fcntl


def _url_quote(text, safe="/"):
    import urllib.parse
    return urllib.parse.quote(text, safe=safe)


def _pwd():
    """The password database, or None where there is none (Windows)."""
    try:
        import pwd
    except ImportError:
        return None
    return pwd


# --- Errors and exit codes --------------------------------------------------

EXIT_OK = 0
EXIT_SEMANTIC = 1
EXIT_LOCK_TIMEOUT = 2
EXIT_USAGE = 2
EXIT_NO_DATA_DIR = 3
EXIT_INVALID_ARGS = 4
EXIT_IO = 5
EXIT_LIBRARY = 6
EXIT_CONFIG = 7


class TropError(Exception):
    """Base of every error trop reports; ``exit_code`` is the CLI's status.

    ``warnings`` are printed before the error (the library itself never prints).
    """

    exit_code = EXIT_LIBRARY
    prefix = ""

    def __init__(self, message, warnings=()):
        Exception.__init__(self, message)
        self.message = message
        self.warnings = list(warnings)

    def __str__(self):
        return self.prefix + self.message


class SemanticFailure(TropError):
    """An assertion that did not hold, a sticky field or an unrelated path."""
    exit_code = EXIT_SEMANTIC


class LockTimeout(TropError):
    """Another writer held the database longer than the busy timeout."""
    exit_code = EXIT_LOCK_TIMEOUT

    def __init__(self, operation, seconds):
        TropError.__init__(self, "database lock timeout while %s after %ss"
                           % (operation, ("%g" % seconds) if seconds else "0"))


class NoDataDirectory(TropError):
    exit_code = EXIT_NO_DATA_DIR


class InvalidArguments(TropError):
    exit_code = EXIT_INVALID_ARGS


class IoFailure(TropError):
    exit_code = EXIT_IO
    prefix = "I/O error: "


class LibraryError(TropError):
    """Database, allocation, conflict and path errors (exit 6)."""
    exit_code = EXIT_LIBRARY


class ConfigError(TropError):
    exit_code = EXIT_CONFIG
    prefix = "Configuration error: "


class CorruptionError(LibraryError):
    prefix = "database corruption detected: "

    def __init__(self, details):
        LibraryError.__init__(self, details + ". Make a copy of the database before attempting any repair; "
                              "trop did not modify or repair the stored data")


class UsageError(TropError):
    """Arguments argparse cannot check (exit 2, as a usage error)."""
    exit_code = EXIT_USAGE


class CommandNotRunnable(TropError):
    """`trop run` could not start its command: 127 not found, 126 not executable (as a shell)."""

    def __init__(self, message, exit_code):
        TropError.__init__(self, message)
        self.exit_code = exit_code


# --- Values: ports, ranges, identifiers and path text ------------------------
#
# One parser per concept.  Each raises ValueError saying why, in the
# reference's words; the caller wraps it in the error of its context (a flag,
# a variable, a line of a file).
#
# A key is a path as the reference stores it: text, always valid UTF-8.  The OS
# may hand trop the same path another way (a C locale without UTF-8 mode decodes
# names as ASCII with surrogate escapes), so text crosses that border in two
# places only: key_text() for what the OS returns, os_path() for what it takes.

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def parse_uint(value, limit):
    """An int 0..limit from an int or ASCII decimal text (surrounding spaces allowed)."""
    if isinstance(value, str):
        text = value.strip()
        if not text or text.strip("0123456789"):
            raise ValueError("'%s' is not a valid number" % text)
        value = int(text)
    elif not _is_int(value):
        raise ValueError("%r is not a valid number" % (value,))
    if not 0 <= value <= limit:
        raise ValueError("%d is %s" % (value, "negative" if value < 0 else "greater than %d" % limit))
    return value


def parse_port(value, allow_zero=False):
    """A port 1..65535 (0 too with allow_zero: the u16 of an environment variable)."""
    try:
        port = parse_uint(value, 65535)
    except ValueError as exc:
        raise ValueError(str(exc).replace("greater than 65535", "greater than maximum port 65535"))
    if port == 0 and not allow_zero:
        raise ValueError("port 0 is reserved and cannot be used")
    return port


def parse_port_range(text):
    """'N' or 'A..B' (spaces around the numbers allowed) as (start, end)."""
    first, dots, last = text.strip().partition("..")
    start = parse_port(first)
    end = parse_port(last) if dots else start
    if end < start:
        raise ValueError("Invalid range: %d..%d (end < start)" % (start, end))
    return start, end


def cli_port(value):
    """A port given as an argument (--port, PORT, the API's port=): exit 4, in the reference's words."""
    try:
        return parse_port(value if _is_int(value) else str(value))
    except ValueError as exc:
        raise InvalidArguments("Invalid port number: %s" % exc)


def range_text(start, end):
    return str(start) if start == end else "%d..%d" % (start, end)


def identifier_problem(text):
    """Why a trimmed project, task or tag is not a valid identifier (None if it is)."""
    if not text:
        return "must be non-empty after trimming whitespace"
    if "\0" in text:
        return "must not contain NUL bytes"
    if len(text.encode("utf-8", "surrogateescape")) > 255:
        return "must be at most 255 bytes"
    return None


def check_identifier(field, value, source=None):
    """A trimmed project/task, or the configuration error that names it and its source."""
    text = key_text(value).strip()
    problem = identifier_problem(text)
    if problem:
        raise ConfigError("validation error for '%s': %s %s"
                          % ("%s (%s)" % (field, source) if source else field, field, problem))
    return text


def check_tag(tag, error=InvalidArguments):
    """A --tag: trimmed, non-empty (no length limit for single reservations, as the reference)."""
    if tag is None:
        return None
    if not isinstance(tag, str):
        raise InvalidArguments("Invalid arguments: a tag must be a string, got %s" % type(tag).__name__)
    text = key_text(tag).strip()
    if not text:
        raise error("validation error for 'tag': tag must be non-empty after trimming whitespace")
    return text


def _quote(value):
    """An optional text as the messages show it: "text" or none."""
    return "none" if value is None else '"%s"' % value


_FS_IS_UTF8 = codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def key_text(native):
    """A path from the OS (getcwd, realpath, argv) as key text: the UTF-8 its bytes spell, where they do."""
    try:
        native.encode("utf-8")
        return native
    except UnicodeEncodeError:              # surrogate escapes: bytes the OS's encoding could not decode
        try:
            return os.fsencode(native).decode("utf-8")
        except UnicodeError:
            return native                   # not UTF-8 at all: normalize() refuses it clearly


def os_path(key):
    """Key text as the OS's path functions take it."""
    return key if _FS_IS_UTF8 else os.fsdecode(key.encode("utf-8", "surrogateescape"))


# --- Path flavours: keys as the reference spells them on POSIX and Windows -----

_ROOT = ("RootDir",)
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _prefix(p):
    """windows_prefix.rs parse_prefix: (length, value) or None."""
    h = p[:8].replace("/", "\\")                # '/' reads as '\' here, but \\?\ is spelled with '\'
    if h[:2] != "\\\\":
        return (2, ("Disk", p[0].upper())) if p[1:2] == ":" and p[0] in _LETTERS else None
    if h[2:4] == "?\\" and "/" not in p[:4]:    # verbatim: only '\' separates
        if h[4:8] == "UNC\\":
            server, _, rest = p[8:].partition("\\")
            share = rest.partition("\\")[0]
            return 8 + len(server) + (len(share) + 1 if share else 0), ("VerbatimUNC", server, share)
        if p[5:6] == ":" and p[4] in _LETTERS and p[6:7] in ("", "\\", "/"):
            return 6, ("VerbatimDisk", p[4].upper())
        name = p[4:].partition("\\")[0]
        return 4 + len(name), ("Verbatim", name)
    q = p.replace("/", "\\")
    if h[2:4] == ".\\":
        name = q[4:].partition("\\")[0]
        return 4 + len(name), ("DeviceNS", name)
    server, _, rest = q[2:].partition("\\")
    share = rest.partition("\\")[0]
    return (3 + len(server) + len(share), ("UNC", server, share)) if server and share else None


def _push_verbatim(names, comps, root):
    """PathBuf::push into a verbatim path: a root restarts, '..' drops a name only (no error); -> root."""
    for name, _, _ in comps:
        if name is _ROOT:
            names[:], root = [], True
        elif name == "..":
            if names and names[-1] not in (".", ".."):
                names.pop()
        elif name != ".":
            names.append(name)
    return root


class PathFlavour(object):
    r"""Keys as the Rust trop 0.2.0 stores them (normalize.rs over std::path), for one platform.

    Windows: std's prefixes (C:, \\s\h or //s/h, \\?\C:, \\?\UNC\s\h, \\?\x, \\.\x) are kept
    as spelled but compared by value (drive letter upper-cased; \\?\C: is not C:); '/' and '\' separate
    except after \\?\; keys are rebuilt with '\'.  A path is parsed once into components (key, start,
    end): the prefix value, _ROOT, or a name.  POSIX follows the reference too: '~\x' expands like '~/x',
    an absolute rest after '~' replaces home, a relative HOME is joined to the cwd, HOME '/' shows '/srv'
    as '~/srv', and rebase() gives '/x' for --from /a --to /.  cwd and home are passed in, so both
    flavours run (and are tested) anywhere.
    """

    def __init__(self, windows):
        self.windows = windows
        self.sep = "\\" if windows else "/"
        self._seps = "\\/" if windows else "/"

    def home(self, environ):
        """USERPROFILE on Windows (the home crate ignores HOME), HOME on POSIX; None if unset or empty."""
        return environ.get("USERPROFILE" if self.windows else "HOME") or None

    def _parse(self, path):
        """(prefix value or None, has_root, components) as std's Path::components yields them."""
        n, key = (_prefix(path) if self.windows else None) or (0, None)
        verb, phys = bool(key) and key[0].startswith("Verbatim"), n < len(path) and path[n] in self._seps
        comps = [(key, 0, n)] if key else []
        if phys or (key and not verb and key[0] != "Disk"):         # non-verbatim roots are implicit
            comps.append((_ROOT, n, n + phys))
        pos = n + phys
        for name in (path[pos:].replace("/", "\\") if self.windows and not verb else path[pos:]).split(self.sep):
            if name and (name != "." or verb or pos == 0):           # pos 0: leading CurDir ('./x')
                comps.append((name, pos, pos + len(name)))
            pos += len(name) + 1
        return key, phys or bool(key and key[0] != "Disk"), comps

    def _strip(self, path, base):
        """Path::strip_prefix: the rest of path after base's components, as spelled; or None."""
        comps, want = self._parse(path)[2], [c[0] for c in self._parse(base)[2]]
        if [c[0] for c in comps[:len(want)]] != want:
            return None
        return path[comps[len(want)][1]:comps[-1][2]] if comps[len(want):] else ""

    def _join(self, base, rel):
        """PathBuf::push(base, rel) as text (POSIX: trop.py's spelling, the same path once resolved)."""
        if not self.windows:
            return rel if rel.startswith("/") else base + "/" + rel
        rkey, rroot, rcomps = self._parse(rel)
        key, _, comps = self._parse(base)
        n = comps[0][2] if key else 0
        if rkey:
            return rel
        if key and key[0].startswith("Verbatim") and rel:          # rebuilt component by component
            names = [c[0] for c in comps[1:] if c[0] is not _ROOT]
            root = _push_verbatim(names, rcomps, any(c[0] is _ROOT for c in comps))
            return base[:n] + ("\\" if root or names else "") + "\\".join(names)
        if rroot:
            return base[:n] + rel                                   # '\x' keeps only base's prefix
        bare = not base or base[-1] in "\\/" or (key and key[0] == "Disk" and n == len(base))  # C: + x = C:x
        return base + ("" if bare else "\\") + rel

    def _resolve(self, path):
        r"""normalize.rs resolve_components: the text; False if '..' escapes a root; None if a name
        re-parses as a prefix (\\?\C:\a\C:, where push() starts over from that name): refused."""
        key, _, comps = self._parse(path)
        raw, root, names = path[:comps[0][2]] if key else "", False, []
        for name, _, _ in comps[1 if key else 0:]:
            if name is _ROOT:
                root = True
            elif name == "..":
                if not names:
                    return False
                names.pop()
            elif self.windows and (name[1:2] == ":" or "/" in name):  # only verbatim names hold a '/'
                sub, _, scomps = self._parse(name)
                if sub:
                    return None
                root = _push_verbatim(names, scomps, root)
            elif name != ".":
                names.append(name)
            root = root or bool(names and key and key[0] != "Disk")  # \\?\C: + a is spelled \\?\C:\a
            if key and key[0] == "VerbatimUNC" and not key[2] and names:
                raw, key = raw + "\\" + names[0], key[:2] + (names.pop(0),)  # \\?\UNC\srv + x: x is the share
                root = bool(names)
        return raw + (self.sep if root else "") + self.sep.join(names)

    def _key(self, full, path):
        """The key for the absolute text full (typed as path), or ValueError."""
        key = self._resolve(full)
        if key is False:
            raise ValueError("invalid path %s: Path contains too many '..' components (escapes root)" % full)
        if key is None or not self.is_normal(key):      # C:foo: the reference stores it, then rejects its row
            raise ValueError("invalid path %s: it does not normalize to an absolute path (drive-relative paths "
                             "such as C:foo are not supported; write C:\\foo)" % path)
        return key

    def is_absolute(self, path):
        r"""Windows: a prefix and a root (C:\x, \\s\h, \\?\C:; not C:x or \x); POSIX: a leading '/'."""
        key, has_root, _ = self._parse(path)
        return has_root and (key is not None or not self.windows)

    def normalize(self, path, cwd, home):
        """Key for an explicit path: expand ~, join to the plain cwd, resolve '.' and '..' lexically."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid path %s: path is not valid UTF-8"
                             % path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        full = path
        if path.startswith("~"):
            if path != "~" and path[1] not in "/\\":
                raise ValueError("invalid path %s: ~user syntax is not supported; use ~ or ~/path" % path)
            if not home:
                raise ValueError("invalid path %s: cannot expand ~ because %s is not set"
                                 % (path, "USERPROFILE" if self.windows else "HOME"))
            full = home if path == "~" and self.windows else self._join(home, path[2:])  # POSIX: home + "/"
        if not self.is_absolute(full):
            full = self._join(cwd, full)
        return self._key(full, path)

    def verbatim(self, final):
        r"""Windows: the \\?\ spelling fs::canonicalize gives for a final path; POSIX: unchanged."""
        if not self.windows or final.startswith(("\\\\?\\", "\\??\\")):
            return final
        prefix_type = (_prefix(final) or (0, ("",)))[1][0]
        if prefix_type not in ("UNC", "Disk"):
            raise ValueError("cannot spell %s as a verbatim path" % final)
        return "\\\\?\\" + ("UNC\\" + final[2:] if prefix_type == "UNC" else final)

    def is_within(self, path, root):
        """path is root or below it, component-wise ('/w/ab' is not within '/w/a')."""
        if self.windows:
            return self._strip(path, root) is not None
        return path == root or root == "/" or path.startswith(root + "/")

    def related(self, a, b):
        """relationship.rs between() is not Unrelated (Windows: one trailing separator dropped)."""
        if self.windows:
            a, b = [p[:-1] if len(p) > 1 and p[-1] in "\\/" else p for p in (a, b)]
        return self.is_within(a, b) or self.is_within(b, a)

    def is_normal(self, path):
        """Row validation (validate_stored_path): its own absolute normal form, or '/'-rooted plain names."""
        if self.windows and self.is_absolute(path):
            return self._resolve(path) == path
        tail = path + "/"                               # trop.py's _is_normal; on Windows also no '\'
        return path == "/" or (path.startswith("/") and not path.endswith("/") and "//" not in path
                               and "/./" not in tail and "/../" not in tail and not (self.windows and "\\" in path))

    def rebase(self, path, source, target):
        """migrate's new key for the row at path: normalize(target.join(path.strip_prefix(source)))."""
        rest = self._strip(path, source)
        if rest is None:
            raise ValueError("invalid path %s: Path %s does not start with prefix %s" % (path, path, source))
        return self._key(self._join(target, rest), path)

    def descendant_where(self, path):
        """(SQL condition, params) for rows at or below path.  POSIX: exact.  Windows: the reference's LIKE
        pre-filter, a superset (ASCII case, '_', '%'): keep only the rows with is_within(row, path)."""
        if self.windows:
            return "path LIKE ? || '%'", (path,)
        return ("1", ()) if path == "/" else ("path = ? OR (path >= ? AND path < ?)", (path, path + "/", path + "0"))

    def shorten_home(self, path, home):
        r"""list's display: '~/' + the rest below home (Windows: the rest as spelled, '~/proj\sub')."""
        if not home:
            return path
        if self.windows:
            rest = self._strip(path, home)
            return path if rest is None else "~/" + rest
        home = home.rstrip("/")
        return "~/" + path[len(home) + 1:] if self.is_within(path, home or "/") else path


# --- Platform: the one seam where POSIX and Windows differ -----------------------


class PosixPlatform(object):
    """How this operating system locks a directory, replaces a file, starts a command and probes ports.

    PLATFORM is the instance for this host; the tests drive WindowsPlatform
    with fakes on any host.  What the OS reports (reserved ports, the
    ephemeral range, socket owners) is read by functions that ask
    PLATFORM.name, and PLATFORM.paths spells keys.
    """

    name = "posix"
    paths = PathFlavour(windows=False)
    wildcard_probes = False     # a 127.0.0.1 bind already fails next to a 0.0.0.0 listener
    # SO_REUSEADDR on TCP probes and handed-over sockets: Linux then still refuses a bind beside any listener
    # (wildcard or not) and allows it only beside closed connections in TIME_WAIT; BSDs and macOS would also
    # allow a bind beside a wildcard listener, and Windows beside anything, so they probe strictly.
    reuse_address = sys.platform.startswith("linux")

    def lock(self, directory):
        """An exclusive lock shared by every writer of the files in directory (flock on the directory)."""
        return _FlockLock(directory)

    def replace(self, source, target):
        os.replace(source, target)

    def run(self, program, argv, env):
        """Become the command (exec): its exit status is trop's, and signals reach it directly."""
        try:
            os.execve(program, argv, env)
        except OSError as exc:
            raise CommandNotRunnable("cannot run %s: %s" % (argv[0], exc.strerror or exc), 126)

    # What tells a lease's holder apart: see Holder.  OSError means "this OS cannot say".

    def process(self, pid):
        """(start time token, ended) of pid, or None if there is no such process."""
        if sys.platform.startswith("linux"):
            return _linux_process(pid)
        if sys.platform == "darwin":
            return _darwin_process(pid)
        raise OSError(errno.ENOSYS, "no way to read a process's start time on %s" % sys.platform)

    def boot_id(self):
        """This boot of the host ('' if unknown): Linux's boot_id, macOS's boot session UUID."""
        if sys.platform.startswith("linux"):
            return (_read_proc_file("sys/kernel/random/boot_id") or "").strip()
        return _darwin_sysctl_text(b"kern.bootsessionuuid") if sys.platform == "darwin" else ""

    def pid_namespace(self):
        """Linux: the pid namespace whose pids this process sees ('' elsewhere, or when /proc is another's)."""
        try:
            if os.readlink(os.path.join(PROC_ROOT, "self")) != str(os.getpid()):
                return ""
            info = os.stat(os.path.join(PROC_ROOT, "self", "ns", "pid"))
            return "%d:%d" % (info.st_dev, info.st_ino)
        except OSError:
            return ""

    def host(self):
        return os.uname()[1]


class WindowsPlatform(PosixPlatform):
    name = "windows"
    paths = PathFlavour(windows=True)
    wildcard_probes = True      # Windows lets 127.0.0.1 bind beside a 0.0.0.0 listener: probe the wildcard too
    reuse_address = False
    _SHARING = (5, 32, 33)      # ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION

    def __init__(self, msvcrt=None, subprocess=None, sleep=time.sleep):
        self._msvcrt, self._subprocess, self._sleep = msvcrt, subprocess, sleep

    def lock(self, directory):
        """msvcrt.locking on a sidecar file (.trop-config.lock): Windows cannot lock a directory."""
        msvcrt = self._msvcrt
        if msvcrt is None:
            import msvcrt
        return _SidecarLock(os.path.join(directory, ".trop-config.lock"), msvcrt, self._sleep)

    def replace(self, source, target, attempts=40):
        """os.replace, retried while another program (an editor, a virus scanner) has the file open."""
        for attempt in range(attempts):
            try:
                return os.replace(source, target)
            except PermissionError as exc:
                if getattr(exc, "winerror", None) not in self._SHARING or attempt == attempts - 1:
                    raise
                self._sleep(0.05)

    def run(self, program, argv, env):
        """Run the command as a child (Windows has no exec) and return its status, mapped to what exit() takes.

        Ctrl+C reaches the whole console, so trop ignores it and waits for the
        child.  Arguments to a .bat or .cmd file would be parsed again by
        cmd.exe (the "BatBadBut" injection class), so they are refused.
        """
        if program.lower().endswith((".bat", ".cmd")) and len(argv) > 1:
            raise CommandNotRunnable("refusing to pass arguments to the batch file %s: cmd.exe would parse them "
                                     "again; wrap it in a program that takes arguments safely" % argv[0], 126)
        subprocess = self._subprocess or _subprocess()
        import signal
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            child = subprocess.Popen([program] + list(argv[1:]), env=env)
            return windows_exit_status(child.wait())
        except OSError as exc:
            raise CommandNotRunnable("cannot run %s: %s" % (argv[0], exc.strerror or exc), 126)
        finally:
            signal.signal(signal.SIGINT, previous)

    def process(self, pid, kernel32=None):
        """OpenProcess + GetProcessTimes (creation time is absolute: no boot id is needed); a pid that exited
        but is still open somewhere reports STILL_ACTIVE no more."""
        try:
            import ctypes
            from ctypes import wintypes
        except (ImportError, ValueError):
            raise OSError(errno.ENOSYS, "no ctypes to ask Windows for process times")
        kernel32 = kernel32 or ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)          # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            error = kernel32.GetLastError()
            if error == 87:                                        # ERROR_INVALID_PARAMETER: no such process
                return None
            raise OSError(errno.EACCES, "OpenProcess(%d) failed with Windows error %d" % (pid, error))
        try:
            times = [wintypes.FILETIME() for _ in range(4)]
            status = wintypes.DWORD()
            if not kernel32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]) or \
                    not kernel32.GetExitCodeProcess(handle, ctypes.byref(status)):
                raise OSError(errno.EIO, "cannot read the times of process %d" % pid)
            return "%d" % (times[0].dwHighDateTime << 32 | times[0].dwLowDateTime), status.value != 259
        finally:
            kernel32.CloseHandle(handle)

    def boot_id(self):
        return ""

    def pid_namespace(self):
        return ""

    def host(self):
        return os.environ.get("COMPUTERNAME", "")


def group_sharing(directory, setting="auto"):
    """Whether what trop creates in directory is its group's too: setting "yes" or "no", or "auto": the
    directory is group-writable but not world-writable (a team directory such as `install -d -m 2775 -g devs
    /srv/trop`)."""
    if setting != "auto":
        return setting == "yes"
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IWGRP) and not mode & stat.S_IWOTH      # /tmp is everyone's, not a team's


def share_with_group(path):
    """Give path's group read and write access whatever the umask, as git's core.sharedRepository=group does
    (a directory also gets setgid, so that what is created in it keeps the group).  Only the owner can."""
    try:
        mode = os.stat(path).st_mode
        extra = (0o070 | stat.S_ISGID) if stat.S_ISDIR(mode) else 0o060
        if mode & extra != extra:
            os.chmod(path, (mode & 0o7777) | extra)
    except OSError:
        pass


def user_name(uid):
    """The name of a uid, or the number where there is no passwd entry (or no passwd at all)."""
    try:
        return _pwd().getpwuid(uid).pw_name
    except (AttributeError, KeyError, OverflowError):
        return str(uid)


class GroupUmask(object):
    """While opening a shared database: a umask that keeps the group's read and write bits.

    SQLite creates -wal and -shm with open(mode of trop.db) and then widens them with fchmod; between the two,
    under a umask of 022 or 077, another member of the group would open the -shm read-only and fail to write.
    """

    def __init__(self, shared):
        self.shared, self.previous = shared, None

    def __enter__(self):
        if self.shared:
            self.previous = os.umask(0o022)
            os.umask(self.previous & ~0o060)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            os.umask(self.previous)


def _group_name(gid):
    """The name of a gid, or the number where there is no group entry (or no grp module)."""
    try:
        import grp
        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return str(gid)


def _read_proc_file(name, proc_root=None):
    """A file under /proc (PROC_ROOT, or proc_root) as text, or None."""
    try:
        with open(os.path.join(proc_root or PROC_ROOT, name), encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _linux_process(pid):
    """/proc/PID/stat: field 22 is the start time in ticks since boot; a zombie (Z) or dead (X) one has ended."""
    try:
        with open(os.path.join(PROC_ROOT, str(pid), "stat"), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    rest = data[data.rindex(b")") + 2:].split()                    # the name may hold spaces and ')'
    return rest[19].decode("ascii"), rest[0] in (b"Z", b"X")


def _darwin_process(pid, libc=None):
    """sysctl KERN_PROC_PID: struct kinfo_proc (648 bytes) starts with p_starttime; p_stat is at 36."""
    try:
        import ctypes
        import struct
    except ImportError:                         # a Python built without ctypes cannot ask
        raise OSError(errno.ENOSYS, "no ctypes to ask the kernel for process start times")
    libc = libc or ctypes.CDLL(None, use_errno=True)
    mib = (ctypes.c_int * 4)(1, 14, 1, pid)                       # CTL_KERN, KERN_PROC, KERN_PROC_PID
    buf, size = ctypes.create_string_buffer(648), ctypes.c_size_t(648)
    if libc.sysctl(mib, 4, buf, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        raise OSError(ctypes.get_errno() or errno.EIO, "sysctl(KERN_PROC_PID) failed")
    if size.value == 0:
        return None
    if size.value != 648:
        raise OSError(errno.EINVAL, "unexpected kinfo_proc size %d" % size.value)
    seconds, micros = struct.unpack_from("=qi", buf.raw, 0)
    return "%d.%06d" % (seconds, micros), buf.raw[36] == 5       # SZOMB


def _darwin_sysctl_text(name, libc=None):
    try:
        import ctypes
        libc = libc or ctypes.CDLL(None)
        buf, size = ctypes.create_string_buffer(64), ctypes.c_size_t(64)
        if libc.sysctlbyname(name, buf, ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
            return ""
        return buf.value.decode("ascii", "replace")
    except (ImportError, OSError, AttributeError):
        return ""


def windows_exit_status(code):
    """A Windows exit code (an NTSTATUS such as 0xC000013A can exceed 2**31) as the C int exit() takes."""
    code &= 0xFFFFFFFF
    return code - (1 << 32) if code >= 1 << 31 else code


class _FlockLock(object):
    def __init__(self, directory):
        self.directory, self.fd = directory, None

    def __enter__(self):
        fcntl = _fcntl()
        self.fd = os.open(self.directory, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)               # closing releases the lock


class _SidecarLock(object):
    def __init__(self, path, msvcrt, sleep, timeout=60.0):
        self.path, self.msvcrt, self.sleep, self.timeout, self.fd = path, msvcrt, sleep, timeout, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.msvcrt.locking(self.fd, self.msvcrt.LK_NBLCK, 1)
                return self
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise IoFailure("%s: another trop kept the configuration locked for %gs"
                                    % (self.path, self.timeout))
                self.sleep(0.02)

    def __exit__(self, *exc):
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.msvcrt.locking(self.fd, self.msvcrt.LK_UNLCK, 1)
        finally:
            os.close(self.fd)


PLATFORM = WindowsPlatform() if os.name == "nt" else PosixPlatform()


PROC_ROOT = "/proc"             # Linux's process and mount tables; tests point it at fake files


# --- Models ------------------------------------------------------------------

class ReservationKey:
    """(path, tag): what a reservation is for.  tag None means untagged ('' in the database)."""

    __slots__ = ("path", "tag")

    def __init__(self, path, tag=None):
        self.path = path
        self.tag = tag or None

    def __eq__(self, other):
        return isinstance(other, ReservationKey) and (self.path, self.tag) == (other.path, other.tag)

    def __hash__(self):
        return hash((self.path, self.tag))

    def __repr__(self):
        return "ReservationKey(%r, %r)" % (self.path, self.tag)

    def __str__(self):
        return self.path if self.tag is None else "%s:%s" % (self.path, self.tag)

    @property
    def db_tag(self):
        return self.tag or ""


class Reservation:
    """One stored row.  Timestamps are Unix seconds."""

    FIELDS = ("path", "tag", "port", "project", "task", "created_at", "last_used_at")
    __slots__ = FIELDS + ("lease",)

    def __init__(self, path, tag, port, project=None, task=None, created_at=0, last_used_at=0):
        self.lease = None               # (Lease, its holder's state) where a reader looked (list, who)
        self.path = path
        self.tag = tag or None
        self.port = port
        self.project = project
        self.task = task
        self.created_at = created_at
        self.last_used_at = last_used_at

    @property
    def key(self):
        return ReservationKey(self.path, self.tag)

    def row(self):
        return (self.path, self.tag or "", self.port, self.project, self.task,
                self.created_at, self.last_used_at)

    def replace(self, **changes):
        values = {name: getattr(self, name) for name in self.FIELDS}
        values.update(changes)
        return Reservation(**values)

    def __eq__(self, other):
        return isinstance(other, Reservation) and self.row() == other.row()

    def __repr__(self):
        return "Reservation(%s)" % ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.FIELDS)

    @classmethod
    def from_row(cls, row):
        """Build from a database row, refusing anything the schema forbids (checked on every read)."""
        path, tag, port, project, task, created, used = row
        if type(path) is not str or not PLATFORM.paths.is_normal(path):
            _corrupt(row, "path", "path must be a non-empty absolute, lexically normal path")
        if type(tag) is not str or (tag and (tag[0].isspace() or tag[-1].isspace())):
            _corrupt(row, "tag", "tag must be '' or trimmed non-empty text")
        if type(port) is not int or not 0 < port < 65536:
            _corrupt(row, "port", "port %r is not an integer in 1..65535" % (port,))
        if project is not None and (type(project) is not str or not project or project != project.strip()):
            _corrupt(row, "project", "project must be NULL or trimmed non-empty text")
        if task is not None and (type(task) is not str or not task or task != task.strip()):
            _corrupt(row, "task", "task must be NULL or trimmed non-empty text")
        if type(created) is not int or not 0 <= created <= 253402300799:
            _corrupt(row, "created_at", "created_at %r is not a valid timestamp" % (created,))
        if type(used) is not int or not 0 <= used <= 253402300799:
            _corrupt(row, "last_used_at", "last_used_at %r is not a valid timestamp" % (used,))
        return cls(path, tag, port, project, task, created, used)


def _corrupt(row, field, reason):
    path, tag = row[0], row[1]
    raise CorruptionError('table=reservations, field=%s, key=path="%s", tag=%s: %s'
                          % (field, path, '"%s"' % tag if tag else "<untagged>", reason))


_TIMESTAMPS = {}


def format_timestamp(seconds):
    """UTC '%Y-%m-%d %H:%M:%S'; memoised because listings repeat the same seconds."""
    text = _TIMESTAMPS.get(seconds)
    if text is None:
        if len(_TIMESTAMPS) > 4096:
            _TIMESTAMPS.clear()
        text = _TIMESTAMPS[seconds] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    return text


class PortRange:
    """An inclusive range of ports to allocate from."""

    __slots__ = ("min", "max")

    def __init__(self, low, high):
        self.min = low
        self.max = high

    def __contains__(self, port):
        return self.min <= port <= self.max

    def __iter__(self):
        return iter(range(self.min, self.max + 1))

    def __len__(self):
        return max(0, self.max - self.min + 1)

    def __eq__(self, other):
        return isinstance(other, PortRange) and (self.min, self.max) == (other.min, other.max)

    def __repr__(self):
        return "PortRange(%d, %d)" % (self.min, self.max)

    def __str__(self):
        return "%d-%d" % (self.min, self.max)


class ExclusionList:
    """Excluded ports as merged, sorted ranges; membership by binary search."""

    def __init__(self, ranges=()):
        merged = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1] + 1:
                if end > merged[-1][1]:
                    merged[-1][1] = end
            else:
                merged.append([start, end])
        self.ranges = [tuple(r) for r in merged]
        self._starts = [r[0] for r in self.ranges]

    def __contains__(self, port):
        i = bisect_right(self._starts, port) - 1
        return i >= 0 and self.ranges[i][1] >= port

    def __len__(self):
        return len(self.ranges)

    def end_of(self, port):
        """The last port of the excluded range containing port."""
        return self.ranges[bisect_right(self._starts, port) - 1][1]

    def entries(self):
        """The minimal entry list: singles as ints, runs as (start, end)."""
        return [s if s == e else (s, e) for s, e in self.ranges]


class PortSet:
    """Reserved ports: a set for membership plus a sorted list, so the next unreserved
    port after a run of reserved ones is a binary search, not a walk."""

    def __init__(self, ports=()):
        self._set = set(ports)
        self._sorted = sorted(self._set)

    def __contains__(self, port):
        return port in self._set

    def __len__(self):
        return len(self._set)

    def __iter__(self):
        return iter(self._sorted)

    def __sub__(self, ports):
        return PortSet(self._set.difference(ports))

    def add(self, port):
        if port not in self._set:
            self._set.add(port)
            insort(self._sorted, port)

    def discard(self, port):
        if port in self._set:
            self._set.discard(port)
            del self._sorted[bisect_left(self._sorted, port)]

    def next_unreserved(self, port):
        """The lowest port >= port that is not in the set."""
        ports = self._sorted
        i = bisect_left(ports, port)
        if i == len(ports) or ports[i] != port:
            return port
        lo, hi = i, len(ports) - 1           # last j with ports[j] - port == j - i (a contiguous run)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ports[mid] - port == mid - i:
                lo = mid
            else:
                hi = mid - 1
        return ports[lo] + 1


class OccupancyPolicy:
    """Which bind() probes decide that a port is in use (the occupancy_check keys, as a test checks)."""

    __slots__ = ("skip", "skip_ip4", "skip_ip6", "skip_tcp", "skip_udp", "check_all_interfaces")

    def __init__(self, skip=False, skip_ip4=False, skip_ip6=False, skip_tcp=False, skip_udp=False,
                 check_all_interfaces=False):
        self.skip, self.skip_ip4, self.skip_ip6 = skip, skip_ip4, skip_ip6
        self.skip_tcp, self.skip_udp, self.check_all_interfaces = skip_tcp, skip_udp, check_all_interfaces

    def probes(self):
        """The probe matrix in the reference's order: (protocol, family, scope, address)."""
        if self.skip:
            return []
        out = []
        families = []
        if not self.skip_ip4:
            families.append(("ipv4", "127.0.0.1", "0.0.0.0"))
        if not self.skip_ip6:
            families.append(("ipv6", "::1", "::"))
        for family, local, wildcard in families:
            wildcard_too = self.check_all_interfaces or PLATFORM.wildcard_probes
            scopes = [("localhost", local)] + ([("wildcard", wildcard)] if wildcard_too else [])
            for scope, address in scopes:
                for proto, skipped in (("tcp", self.skip_tcp), ("udp", self.skip_udp)):
                    if not skipped:
                        out.append((proto, family, scope, address))
        return out


class ServiceSpec:
    """One service of a group: a tag with an offset, maybe a preferred port and env name."""

    __slots__ = ("tag", "offset", "preferred", "env", "line")

    def __init__(self, tag, offset=0, preferred=None, env=None, line=None):
        self.tag, self.offset, self.preferred, self.env, self.line = tag, offset, preferred, env, line

    @property
    def env_name(self):
        if self.env is not None:
            return self.env
        return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in self.tag).replace("-", "_")


class GroupSpec:
    """A `reservations:` group: services that share a base port plus offsets."""

    def __init__(self, services, base=None, line=None):
        self.services = sorted(services, key=lambda s: s.tag.encode("utf-8", "surrogateescape"))
        self.base = base
        self.line = line

    def fit_problem(self, port_range):
        """Why the services can never fit in port_range, in plain words (None if they can)."""
        if len(self.services) > len(port_range):
            return "%d services do not fit in %s (%d ports)" % (len(self.services), port_range, len(port_range))
        top = max([s.offset for s in self.services] or [0])
        if top >= len(port_range):
            return "offset %d does not fit in %s (%d ports)" % (top, port_range, len(port_range))
        return None

    def problems(self):
        """Cross-service rules: unique offsets, preferred ports and variable names."""
        out = []
        offsets, preferred, names = {}, {}, {}
        for svc in self.services:
            if svc.offset in offsets:
                out.append(("services '%s' and '%s' share offset %d" % (offsets[svc.offset], svc.tag, svc.offset),
                            svc.line))
            offsets.setdefault(svc.offset, svc.tag)
            if svc.preferred is not None:
                if svc.preferred in preferred:
                    out.append(("services '%s' and '%s' share preferred port %d"
                                % (preferred[svc.preferred], svc.tag, svc.preferred), svc.line))
                preferred.setdefault(svc.preferred, svc.tag)
            name = svc.env_name
            problem = env_name_problem(name)
            if problem:
                how = "env" if svc.env is not None else "derived variable name"
                out.append(("service '%s': %s %r %s%s" % (svc.tag, how, name, problem,
                            "" if svc.env is not None else "; set env: explicitly"), svc.line))
                continue
            folded = name.upper()
            if folded in names:
                out.append(("services '%s' and '%s' have variable names that collide ignoring case (%s)"
                            % (names[folded], svc.tag, name), svc.line))
            names.setdefault(folded, svc.tag)
        return out


def env_name_problem(name):
    """Why a variable name is unsafe to print into shell or dotenv output (None if safe)."""
    if not name:
        return "is empty"
    first = name[0]
    if not (first == "_" or ("A" <= first <= "Z") or ("a" <= first <= "z")):
        return "must start with a letter or underscore"
    for ch in name:
        if not (ch == "_" or "A" <= ch <= "Z" or "a" <= ch <= "z" or "0" <= ch <= "9"):
            return "must match [A-Za-z_][A-Za-z0-9_]*"
    if len(name) > 255:                         # ASCII by now: characters are bytes
        return "is longer than 255 bytes"
    return None


class Holder:
    """A process that holds a lease, told apart from a later process with the same pid.

    start is the process's start time as the OS reports it (compared, never interpreted); boot and namespace
    say which boot and pid namespace the pid belongs to; host and platform where it runs ('' where unknown).
    """

    __slots__ = ("pid", "start", "boot", "namespace", "host", "platform")

    def __init__(self, pid, start, boot="", namespace="", host="", platform=""):
        self.pid, self.start, self.boot, self.namespace, self.host, self.platform = \
            pid, start, boot, namespace, host, platform

    @classmethod
    def of(cls, pid):
        """The Holder that pid is now; LibraryError if there is no such process or this OS cannot say."""
        try:
            found = PLATFORM.process(pid)
        except OSError as exc:
            raise LibraryError("cannot hold a lease for pid %d: %s" % (pid, exc.strerror or exc))
        if found is None or found[1]:
            raise LibraryError("cannot hold a lease for pid %d: no such process" % pid)
        return cls(pid, found[0], PLATFORM.boot_id(), PLATFORM.pid_namespace(), PLATFORM.host(), sys.platform)

    def state(self):
        """'alive', 'dead', or 'unknown': another host, platform or pid namespace, or an OS that cannot say.

        Only a dead holder's lease is ever taken back.
        """
        try:
            if (self.platform, self.host) != (sys.platform, PLATFORM.host()):
                return "unknown"
            boot = PLATFORM.boot_id()
            if self.boot and boot and self.boot != boot:
                return "dead"                   # its pids are from an earlier boot
            if self.namespace != PLATFORM.pid_namespace():
                return "unknown"
            found = PLATFORM.process(self.pid)
        except OSError:
            return "unknown"
        return "dead" if found is None or found[1] or found[0] != self.start else "alive"

    def __eq__(self, other):
        return isinstance(other, Holder) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self):
        return "Holder(%s)" % ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.__slots__)


class Lease:
    """A reservation row held by a live process: (path, tag) is the row it holds, base_tag the tag asked for.

    Concurrent holders of one (path, tag) hold slots 1, 2, ...: slot 1 is the row (path, tag) itself, slot n
    the row tagged 'tag~n' (an untagged base gives '~n').  port and created_at copy the row's when the lease
    was taken: a row the Rust trop released and someone reserved again is not this lease.  adopted: the row
    was an ordinary reservation before; when the lease ends it is one again (a lease's own row goes away).
    """

    __slots__ = ("path", "tag", "base_tag", "slot", "port", "created_at", "holder", "leased_at", "adopted")

    def __init__(self, path, tag, base_tag, slot, port, created_at, holder, leased_at, adopted=False):
        self.path, self.tag, self.base_tag, self.slot, self.port = path, tag or None, base_tag or None, slot, port
        self.created_at, self.holder, self.leased_at, self.adopted = created_at, holder, leased_at, bool(adopted)

    @property
    def key(self):
        return ReservationKey(self.path, self.tag)

    @staticmethod
    def slot_tag(base_tag, slot):
        return base_tag if slot == 1 else "%s~%d" % (base_tag or "", slot)

    def holds(self, res):
        """Whether res is still the row this lease took (not released and reserved again)."""
        return res is not None and (res.port, res.created_at) == (self.port, self.created_at)

    def row(self):
        h = self.holder
        return (self.path, self.tag or "", self.base_tag or "", self.slot, self.port, self.created_at, h.pid, h.start,
                h.boot, h.namespace, h.host, h.platform, self.leased_at, int(self.adopted))

    @classmethod
    def from_row(cls, row):
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], Holder(*row[6:12]), row[12], row[13])


class Plan:
    """What a command will do, as plain data: executed, or described and rolled back (a dry run).

    A planner builds it inside the transaction that executes it; the
    subclasses below add what their command reports.
    """

    def __init__(self):
        self.inserts = []        # Reservation
        self.deletes = []        # Reservation (deleted only if unchanged)
        self.updates = []        # Reservation: same key and port, new project, task or last use
        self.touches = []        # Reservation: only last_used_at refreshed
        self.leases = []         # Lease: taken (or taken over) by this plan
        self.freed = []          # Lease: ended (its row may stay, e.g. adopted by a new holder)
        self.warnings = []

    def execute(self, store):
        for lease in self.freed:
            store.delete_lease(lease)
        for res in self.deletes:
            store.delete_exact(res)
        for res in self.updates:
            store.update(res)
        for res in self.touches:
            store.touch(res)
        for res in self.inserts:
            store.insert(res)
        for lease in self.leases:
            store.insert_lease(lease)

    def describe(self):
        """Human lines for a dry run, in execution order (a moved key is one Reserve line)."""
        inserted = {r.key for r in self.inserts}
        lines = ["Delete reservation for %s" % r.key for r in self.deletes if r.key not in inserted]
        lines += ["Update reservation for %s (port %d, project %s, task %s)"
                  % (r.key, r.port, _quote(r.project), _quote(r.task)) for r in self.updates]
        lines += ["Refresh reservation for %s (port %d)" % (r.key, r.port) for r in self.touches]
        lines += ["Reserve port %d for %s" % (r.port, r.key) for r in self.inserts]
        return lines + ["Lease port %d of %s to pid %d" % (lease.port, lease.key, lease.holder.pid)
                        for lease in self.leases]


class ReservePlan(Plan):
    """reserve: the plan and the port the key ends up with."""

    def __init__(self):
        Plan.__init__(self)
        self.port = None


class GroupPlan(Plan):
    """reserve-group, autoreserve, run: the group and its ports by tag."""

    def __init__(self, spec):
        Plan.__init__(self)
        self.spec = spec
        self.ports = {}

    def environment(self):
        """{VARIABLE: "port"}, as `trop run` sets them."""
        return {s.env_name: str(self.ports[s.tag]) for s in self.spec.services if s.tag in self.ports}


class MigratePlan(Plan):
    """migrate: where from and to, each (old, new) move, and the destination rows it replaces."""

    def __init__(self, source, target):
        Plan.__init__(self)
        self.source, self.target = source, target
        self.moves = []
        self.conflicts = []


# --- What the OS says about ports (reserved, ephemeral) ------------------------


def parse_reserved_ports(text):
    """Linux's ip_local_reserved_ports ('8080,9000-9100') as (start, end) ranges; junk is skipped."""
    out = []
    for item in text.replace("\n", ",").split(","):
        first, _, last = item.strip().partition("-")
        try:
            out.append(parse_port_range("%s..%s" % (first, last) if last else first))
        except ValueError:
            continue
    return out


def parse_netsh_ranges(text):
    """The 'Start Port  End Port' rows of `netsh int ipv4 show excludedportrange` (any language)."""
    out = []
    for line in text.splitlines():
        match = re.match(r"\s*(\d+)\s+(\d+)\s*\*?\s*$", line)
        if match:
            try:
                out.append(parse_port_range("%s..%s" % match.groups()))
            except ValueError:
                continue
    return out


def os_reserved_ports(proc_root=None, netsh=None):
    """Ports the operating system keeps from applications: Linux's ip_local_reserved_ports, or the
    excluded port ranges of Windows (Hyper-V, WinNAT: binding there fails with "access denied")."""
    if PLATFORM.name == "windows" or netsh is not None:
        return ExclusionList(rng for family in ("ipv4", "ipv6") for rng in parse_netsh_ranges(
            (netsh or _netsh)("int", family, "show", "excludedportrange", "protocol=tcp")))
    text = _read_proc_file("sys/net/ipv4/ip_local_reserved_ports", proc_root)
    return ExclusionList(parse_reserved_ports(text or ""))


def ephemeral_range(proc_root=None, netsh=None):
    """The range the OS hands out for outgoing connections (a server there may find its port taken), or None."""
    if PLATFORM.name == "windows" or netsh is not None:
        answer = (netsh or _netsh)("int", "ipv4", "show", "dynamicport", "tcp")
        numbers = [int(n) for n in re.findall(r":\s*(\d+)", answer)]
        return PortRange(numbers[0], numbers[0] + numbers[1] - 1) if len(numbers) >= 2 and numbers[1] else None
    if sys.platform == "darwin" and proc_root is None:
        return _darwin_ephemeral_range()
    numbers = (_read_proc_file("sys/net/ipv4/ip_local_port_range", proc_root) or "").split()
    return PortRange(int(numbers[0]), int(numbers[1])) if len(numbers) == 2 and all(map(str.isdigit, numbers)) \
        else None


def _netsh(*args):
    """netsh's answer (Windows), or '' when it cannot be run."""
    try:
        return _subprocess().run(["netsh"] + list(args), stdout=_subprocess().PIPE, stderr=_subprocess().DEVNULL,
                                 stdin=_subprocess().DEVNULL, timeout=10).stdout.decode("ascii", "replace")
    except (OSError, _subprocess().SubprocessError):
        return ""


def _darwin_ephemeral_range():
    """macOS net.inet.ip.portrange.first/last through sysctlbyname: no subprocess."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        values = []
        for name in (b"net.inet.ip.portrange.first", b"net.inet.ip.portrange.last"):
            value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
            if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
                return None
            values.append(value.value)
        return PortRange(values[0], values[1])
    except (ImportError, OSError, AttributeError, ValueError):
        return None


_OS_RESERVED_WHERE = {"windows": "Windows excluded port range: netsh int ipv4 show excludedportrange protocol=tcp",
                      "posix": "net.ipv4.ip_local_reserved_ports"}


# --- YAML reader -------------------------------------------------------------


class YamlError(Exception):
    """A syntax error or a construct outside the supported subset.

    ``message`` is the text (``str(e) == message``); ``line`` is the 1-based
    line number, or None when no line applies."""

    def __init__(self, message, line=None):
        Exception.__init__(self, message)
        self.message = message
        self.line = line


class YamlMap(dict):
    """A mapping: ``line`` is where it starts, ``key_lines`` maps key -> line."""

    _meta = None        # block mappings: {key: (column of ':', index of last value line)}

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self.line = None
        self.key_lines = {}


class YamlList(list):
    """A sequence: ``line`` is where it starts, ``item_lines`` the line of each item."""

    _col = None         # block sequences: column of the '-' indicators

    def __init__(self, *args):
        list.__init__(self, *args)
        self.line = None
        self.item_lines = []


_YAML_MAX_DEPTH = 100
_YAML_BLANK, _YAML_CONTENT, _YAML_TAB, _YAML_MARKER = 0, 1, 2, 3
_YAML_HEX = "0123456789abcdefABCDEF"
_YAML_NULLS = ("null", "Null", "NULL", "~")
_YAML_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_YAML_SPECIAL_FLOATS = {}
for _yaml_s in (".inf", ".Inf", ".INF"):
    _YAML_SPECIAL_FLOATS[_yaml_s] = _YAML_SPECIAL_FLOATS["+" + _yaml_s] = float("inf")
    _YAML_SPECIAL_FLOATS["-" + _yaml_s] = float("-inf")
for _yaml_s in (".nan", ".NaN", ".NAN"):
    _YAML_SPECIAL_FLOATS[_yaml_s] = float("nan")
del _yaml_s
_YAML_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
                 "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
                 "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}
_YAML_NO_PLAIN_START = "&*!|>%@`,[]{}#"      # characters that cannot start a plain scalar
_YAML_INDICATOR_ERRORS = {
    "&": "anchors (&name) are not supported",
    "*": "aliases (*name) are not supported",
    "!": "tags (!tag) are not supported",
    "|": "block scalars (| or >) are not supported",
    ">": "block scalars (| or >) are not supported",
    "?": "complex mapping keys (? key) are not supported",
    ":": "mapping entries with an empty key are not supported",
    "@": "'@' is a reserved indicator and cannot start a plain scalar (quote the value)",
    "`": "'`' is a reserved indicator and cannot start a plain scalar (quote the value)",
    "#": "unexpected '#' (a comment must be preceded by a space)",
}
_YAML_COMPLEX_KEY = "complex mapping keys (flow collections as keys) are not supported"


def _yaml_resolve(raw, li):
    """YAML 1.2 core schema resolution of a plain scalar."""
    c = raw[:1]
    if not c:
        return None
    if c in "nN~":
        return None if raw in _YAML_NULLS else raw
    if c in "tTfF":
        return _YAML_BOOLS.get(raw, raw)
    if c in "0123456789+-.":
        t = raw[1:] if c in "+-" else raw
        if t and not t.strip("0123456789"):
            try:
                return int(raw)
            except ValueError:          # more digits than int() accepts
                raise YamlError("integer %s... is too large" % raw[:20], li + 1)
        if c == "0" and len(raw) > 2:
            t = raw[2:]
            if raw[1] == "o" and not t.strip("01234567"):
                return int(t, 8)
            if raw[1] == "x" and not t.strip(_YAML_HEX):
                return int(t, 16)
        if not raw.strip("0123456789+-.eE"):
            try:                        # same grammar as the YAML 1.2 float regex
                return float(raw)
            except ValueError:
                return raw
        f = _YAML_SPECIAL_FLOATS.get(raw)
        if f is not None:
            return f
    return raw


def _yaml_indent_error(nested, value):
    if nested:
        return "inconsistent indentation"
    if isinstance(value, str):
        return "unexpected indentation (multi-line plain scalars are not supported)"
    return "unexpected indentation"


class _YamlParser(object):
    """Recursive-descent parser over lines; positions are (line index, column)."""

    def __init__(self, text):
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.lines = lines = text.split("\n")
        self.n = len(lines)
        self.line_classes = line_classes = []
        self.inds = inds = []
        for line in lines:
            s = line.lstrip(" ")
            ind = len(line) - len(s)
            if not s or s[0] == "#":
                line_class = _YAML_BLANK
            elif s[0] == "\t":
                s = s.lstrip(" \t")
                line_class = _YAML_BLANK if not s or s[0] == "#" else _YAML_TAB
            elif ind == 0 and s[:3] in ("---", "...") and (len(s) == 3 or s[3] in " \t"):
                line_class = _YAML_MARKER
            else:
                line_class = _YAML_CONTENT
            line_classes.append(line_class)
            inds.append(ind)
        self.depth = 0
        self.last = 0               # index of the last line holding value content
        self.comments = {}          # line index -> column of a comment's '#'
        self.end_marker = None      # index of a '...' line
        self.root_line = None
        self.root_end = None

    # -- document ------------------------------------------------------------
    def parse(self):
        lines, line_classes, n = self.lines, self.line_classes, self.n
        li = self._next(0)
        if li < n and line_classes[li] == _YAML_MARKER and lines[li][0] == "-":
            self._marker_rest(li)
            li = self._next(li + 1)
        root = None
        col = 0
        if li < n and line_classes[li] != _YAML_MARKER:
            col = self._level(li)
            self.root_line = li + 1
            root, li = self._node(li, col, 0)
            self.root_end = self.last
        if li < n:
            if line_classes[li] != _YAML_MARKER:
                if self._level(li) < col:
                    raise YamlError("inconsistent indentation", li + 1)
                raise YamlError("unexpected content after the top-level value", li + 1)
            if lines[li][0] == "-":
                raise YamlError("multiple documents are not supported", li + 1)
            self._marker_rest(li)
            self.end_marker = li
            li = self._next(li + 1)
            if li < n:
                raise YamlError("multiple documents are not supported", li + 1)
        return root

    def _marker_rest(self, li):
        rest = self.lines[li][3:].lstrip(" \t")
        if rest and rest[0] != "#":
            raise YamlError("content on the '%s' line is not supported" % self.lines[li][:3], li + 1)

    # -- helpers -------------------------------------------------------------
    def _next(self, li):
        """Index of the next line at or after li that is not blank / comment-only."""
        line_classes, n = self.line_classes, self.n
        while li < n and line_classes[li] == _YAML_BLANK:
            li += 1
        return li

    def _level(self, li):
        """Indentation of line li; -1 at the end of the document."""
        if li >= self.n:
            return -1
        line_class = self.line_classes[li]
        if line_class == _YAML_CONTENT:
            return self.inds[li]
        if line_class == _YAML_MARKER:
            return -1
        raise YamlError("tab characters are not allowed for indentation", li + 1)

    def _enter(self, li):
        self.depth += 1
        if self.depth > _YAML_MAX_DEPTH:
            raise YamlError("nesting is too deep (more than %d levels)" % _YAML_MAX_DEPTH, li + 1)

    def _is_entry(self, li, col):
        line = self.lines[li]
        return line[col:col + 1] == "-" and (len(line) == col + 1 or line[col + 1] in " \t")

    def _bad_start(self, ch, li, col):
        if ch == "%":
            msg = ("directives (%...) are not supported" if col == 0 else
                   "'%' cannot start a plain scalar (quote the value)")
        else:
            msg = _YAML_INDICATOR_ERRORS.get(ch) or "unexpected '%s'" % ch
        raise YamlError(msg, li + 1)

    def _eol(self, li, p, what):
        """Only whitespace or a comment may follow position p on line li."""
        line = self.lines[li]
        n = len(line)
        q = p
        while q < n and line[q] in " \t":
            q += 1
        if q == n:
            return
        if line[q] == "#" and q > p:
            self.comments[li] = q
            return
        if line[q] == ":" and (q + 1 == n or line[q + 1] in " \t") and what == "flow collection":
            raise YamlError(_YAML_COMPLEX_KEY, li + 1)
        raise YamlError("unexpected content after %s" % what, li + 1)

    # -- scalars -------------------------------------------------------------
    def _plain(self, line, col):
        """Block-context plain scalar at col -> (raw, end, is_key, comment column or -1)."""
        n = len(line)
        h = line.find("#", col + 1)
        while h > 0 and line[h - 1] not in " \t":
            h = line.find("#", h + 1)
        end = n if h < 0 else h
        j = line.find(":", col + 1)
        while 0 <= j < end:
            if j + 1 == n or line[j + 1] in " \t":
                return line[col:j].rstrip(" \t"), j + 1, True, -1
            j = line.find(":", j + 1)
        return line[col:end].rstrip(" \t"), end, False, h

    def _quoted(self, line, col, li):
        """Quoted scalar starting at col (single line) -> (text, end)."""
        parts = []
        i = col + 1
        if line[col] == "'":
            while True:
                j = line.find("'", i)
                if j < 0:
                    raise YamlError("unterminated single-quoted string", li + 1)
                parts.append(line[i:j])
                if line[j + 1:j + 2] != "'":
                    return "".join(parts), j + 1
                parts.append("'")
                i = j + 2
        while True:
            j = line.find('"', i)
            if j < 0:
                raise YamlError("unterminated double-quoted string", li + 1)
            b = line.find("\\", i, j)
            if b < 0:
                parts.append(line[i:j])
                return "".join(parts), j + 1
            parts.append(line[i:b])
            c = line[b + 1]
            e = _YAML_ESCAPES.get(c)
            if e is not None:
                parts.append(e)
                i = b + 2
                continue
            size = 2 if c == "x" else 4 if c == "u" else 8 if c == "U" else 0
            if not size:
                raise YamlError("unknown escape sequence '\\%s' in double-quoted string" % c, li + 1)
            hx = line[b + 2:b + 2 + size]
            if len(hx) != size or hx.strip(_YAML_HEX):
                raise YamlError("invalid escape sequence '\\%s%s' in double-quoted string" % (c, hx), li + 1)
            code = int(hx, 16)
            i = b + 2 + size
            if 0xD800 <= code < 0xDC00 and c == "u" and line[i:i + 2] == "\\u":
                lo = line[i + 2:i + 6]
                if len(lo) == 4 and not lo.strip(_YAML_HEX) and 0xDC00 <= int(lo, 16) <= 0xDFFF:
                    code = 0x10000 + ((code - 0xD800) << 10) + (int(lo, 16) - 0xDC00)
                    i += 6
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                raise YamlError("invalid escape sequence '\\%s%s' (not a Unicode character)" % (c, hx), li + 1)
            parts.append(chr(code))

    # -- block context ---------------------------------------------------------
    def _node(self, li, col, mode):
        """Node whose first character is at (li, col) -> (value, next content line).

        mode 0: node on its own line or after '- '; 1: on the line of its
        mapping key (no block collection may start); 2: after '-' and a tab."""
        line = self.lines[li]
        ch = line[col]
        if ch in "-?:" and (len(line) == col + 1 or line[col + 1] in " \t"):
            if ch != "-":
                self._bad_start(ch, li, col)
            if mode == 1:
                raise YamlError("a block sequence cannot start on the line of its mapping key", li + 1)
            if mode == 2:
                raise YamlError("tab characters are not allowed for indentation", li + 1)
            return self._seq(li, col, False)
        if ch in "[{":
            value, eli, eci = self._flow(li, col)
            self._eol(eli, eci, "flow collection")
            self.last = eli
            return value, self._next(eli + 1)
        if ch in "\"'":
            value, p = self._quoted(line, col, li)
            q, n = p, len(line)
            while q < n and line[q] in " \t":
                q += 1
            if q < n and line[q] == ":" and (q + 1 == n or line[q + 1] in " \t"):
                return self._map_here(li, col, mode)
            self._eol(li, p, "quoted string")
            self.last = li
            return value, self._next(li + 1)
        if ch in _YAML_NO_PLAIN_START:
            self._bad_start(ch, li, col)
        raw, p, is_key, h = self._plain(line, col)
        if is_key:
            return self._map_here(li, col, mode)
        if h >= 0:
            self.comments[li] = h
        self.last = li
        return _yaml_resolve(raw, li), self._next(li + 1)

    def _map_here(self, li, col, mode):
        if mode == 1:
            raise YamlError("mapping values are not allowed here (start a nested mapping "
                            "on its own line)", li + 1)
        if mode == 2:
            raise YamlError("tab characters are not allowed for indentation", li + 1)
        return self._map(li, col)

    def _key(self, line, li, col):
        """The 'key:' at col -> (key, column of ':')."""
        ch = line[col]
        if ch in "\"'":
            key, p = self._quoted(line, col, li)
            q, n = p, len(line)
            while q < n and line[q] in " \t":
                q += 1
            if q < n and line[q] == ":" and (q + 1 == n or line[q + 1] in " \t"):
                return key, q
        elif ch in "-?:" and (len(line) == col + 1 or line[col + 1] in " \t"):
            if ch == "-":
                raise YamlError("expected a mapping key ('key: value'), found a block sequence entry", li + 1)
            self._bad_start(ch, li, col)
        elif ch in "[{":
            raise YamlError("expected a mapping key ('key: value'), found a flow collection", li + 1)
        elif ch in _YAML_NO_PLAIN_START:
            self._bad_start(ch, li, col)
        else:
            raw, p, is_key, h = self._plain(line, col)
            if is_key:
                return raw, p - 1
        raise YamlError("expected a mapping key ('key: value'), found a scalar", li + 1)

    def _map(self, li, col):
        self._enter(li)
        lines = self.lines
        m = YamlMap()
        m.line = li + 1
        m._meta = meta = {}
        key_lines = m.key_lines
        while True:
            line = lines[li]
            key, c = self._key(line, li, col)
            if key in m:
                raise YamlError("duplicate key %r (first defined on line %d)" % (key, key_lines[key]), li + 1)
            key_lines[key] = li + 1
            self.last = li
            n = len(line)
            q = c + 1
            while q < n and line[q] in " \t":
                q += 1
            nested = False
            if q == n or line[q] == "#":
                if q < n:
                    self.comments[li] = q
                nli = self._next(li + 1)
                ind = self._level(nli)
                if ind > col:
                    value, nli = self._node(nli, ind, 0)
                    nested = isinstance(value, (YamlMap, YamlList))
                elif ind == col and self._is_entry(nli, col):
                    value, nli = self._seq(nli, col, True)
                else:
                    value = None
            else:
                value, nli = self._node(li, q, 1)
            m[key] = value
            meta[key] = (c, self.last)
            ind = self._level(nli)
            if ind == col:
                li = nli
            elif ind < col:
                self.depth -= 1
                return m, nli
            else:
                raise YamlError(_yaml_indent_error(nested, value), nli + 1)

    def _seq(self, li, col, compact):
        """Block sequence with '-' at col; compact: it is a mapping value at the key's column."""
        self._enter(li)
        lines = self.lines
        lst = YamlList()
        lst.line = li + 1
        lst._col = col
        item_lines = lst.item_lines
        while True:
            line = lines[li]
            item_lines.append(li + 1)
            self.last = li
            n = len(line)
            q = col + 1
            while q < n and line[q] in " \t":
                q += 1
            if q == n or line[q] == "#":
                if q < n:
                    self.comments[li] = q
                nli = self._next(li + 1)
                ind = self._level(nli)
                if ind > col:
                    value, nli = self._node(nli, ind, 0)
                else:
                    value = None
            else:
                value, nli = self._node(li, q, 2 if "\t" in line[col + 1:q] else 0)
            nested = isinstance(value, (YamlMap, YamlList))
            lst.append(value)
            ind = self._level(nli)
            if ind == col:
                if self._is_entry(nli, col):
                    li = nli
                    continue
                if compact:
                    break
                raise YamlError("expected a block sequence entry ('- item') at this indentation", nli + 1)
            elif ind < col:
                break
            else:
                raise YamlError(_yaml_indent_error(nested, value), nli + 1)
        self.depth -= 1
        return lst, nli

    # -- flow context ----------------------------------------------------------
    def _fskip(self, li, ci, open_line, closer):
        """Skip whitespace, line breaks and comments inside a flow collection."""
        lines = self.lines
        line = lines[li]
        while True:
            n = len(line)
            while ci < n and line[ci] in " \t":
                ci += 1
            if ci < n:
                if line[ci] != "#" or (ci > 0 and line[ci - 1] not in " \t"):
                    return li, ci
                self.comments[li] = ci
            li += 1
            if li >= self.n or self.line_classes[li] == _YAML_MARKER:
                raise YamlError("unclosed '%s' (missing '%s')" % ("[" if closer == "]" else "{", closer),
                                open_line)
            line = lines[li]
            ci = 0

    def _fnode(self, li, ci):
        """Flow node at (li, ci) -> (value or raw plain text, li, ci after, node type)."""
        line = self.lines[li]
        ch = line[ci]
        if ch in "[{":
            value, li, ci = self._flow(li, ci)
            return value, li, ci, "coll"
        if ch in "\"'":
            value, ci = self._quoted(line, ci, li)
            return value, li, ci, "quoted"
        if ch == "-" and (len(line) == ci + 1 or line[ci + 1] in " \t,[]{}"):
            raise YamlError("block sequence entries are not allowed inside flow collections", li + 1)
        if ch in _YAML_NO_PLAIN_START or ch == "?" or ch == ":":     # '?x', ':x' are indicators here
            self._bad_start(ch, li, ci)
        n = len(line)
        j = ci + 1
        while j < n:
            c = line[j]
            if c in ",[]{}":
                break
            if c == ":":
                if j + 1 == n or line[j + 1] in " \t,[]{}":
                    break
            elif c == "#" and line[j - 1] in " \t":
                break
            j += 1
        return line[ci:j].rstrip(" \t"), li, j, "plain"

    def _flow(self, li, ci):
        """Flow collection starting at (li, ci) -> (value, li, ci after the closer)."""
        self._enter(li)
        lines = self.lines
        open_line = li + 1
        if lines[li][ci] == "[":
            coll, closer, what = YamlList(), "]", "sequence"
        else:
            coll, closer, what = YamlMap(), "}", "mapping"
        coll.line = open_line
        ci += 1
        while True:
            li, ci = self._fskip(li, ci, open_line, closer)
            if lines[li][ci] == closer:
                break
            start = li + 1
            value, key_li, ci, node_type = self._fnode(li, ci)
            li, ci = self._fskip(key_li, ci, open_line, closer)
            line = lines[li]
            ch = line[ci]
            pair = ch == ":" and (node_type != "plain" or len(line) == ci + 1 or line[ci + 1] in " \t,[]{}")
            if pair and li != key_li:
                raise YamlError("a mapping key and its ':' must be on the same line", li + 1)
            if node_type == "coll" and (pair or closer == "}"):
                raise YamlError(_YAML_COMPLEX_KEY, start)
            key = value
            if pair:
                li, ci = self._fskip(li, ci + 1, open_line, closer)
                ch = lines[li][ci]
                if ch == "," or ch == closer:
                    value = None
                else:
                    value, li, ci, vkind = self._fnode(li, ci)
                    if vkind == "plain":
                        value = _yaml_resolve(value, li)
                    li, ci = self._fskip(li, ci, open_line, closer)
                    ch = lines[li][ci]
            else:
                value = None if closer == "}" else _yaml_resolve(value, start - 1) if node_type == "plain" else value
            if closer == "]":
                if pair:                # [key: value] is a single-pair mapping
                    value = YamlMap({key: value})
                    value.line = start
                    value.key_lines[key] = start
                coll.append(value)
                coll.item_lines.append(start)
            else:
                if key in coll:
                    raise YamlError("duplicate key %r (first defined on line %d)"
                                    % (key, coll.key_lines[key]), start)
                coll[key] = value
                coll.key_lines[key] = start
            if ch == ",":
                ci += 1
            elif ch != closer:
                raise YamlError("expected ',' or '%s' in flow %s" % (closer, what), li + 1)
        self.depth -= 1
        return coll, li, ci + 1


def parse_yaml(text):
    """Parse a config document -> None (empty), YamlMap, YamlList or a scalar.

    Raises YamlError (with a line number where possible) and nothing else."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YamlError("invalid UTF-8 (byte 0x%02x)" % text[exc.start], text[:exc.start].count(b"\n") + 1)
    if text[:1] == "\ufeff":
        text = text[1:]
    try:
        return _YamlParser(text).parse()
    except RecursionError:
        raise YamlError("nesting is too deep")


def _yaml_split_lines(text):
    """Lines with their endings, split exactly where _YamlParser splits."""
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+", text)


def replace_excluded_ports(text, entries, appended=0):
    """Return text with only the top-level `excluded_ports` value replaced by `entries`.

    entries: ints (single ports) and (start, end) pairs (ranges).  Every
    other line, comment and key order is kept byte-for-byte; a JSON / flow
    mapping document is re-emitted as JSON.  When the last `appended` entries
    are new and the list is a block sequence holding the others, only lines
    for the new entries are added, so the existing items keep their comments.
    Raises YamlError if the text does not parse or its top level is not a mapping."""
    items, objs = [], []
    for e in entries:
        if isinstance(e, int) and not isinstance(e, bool):
            items.append("%d" % e)
            objs.append(e)
        elif (isinstance(e, (tuple, list)) and len(e) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in e)):
            items.append("{start: %d, end: %d}" % (e[0], e[1]))
            objs.append({"start": e[0], "end": e[1]})
        else:
            raise ValueError("invalid excluded_ports entry: %r" % (e,))
    bom, body = "", text
    if body[:1] == "\ufeff":
        bom, body = "\ufeff", body[1:]
    parser = _YamlParser(body)
    root = parser.parse()
    nl = "\r\n" if "\r\n" in body else "\r" if "\r" in body else "\n"
    lines = _yaml_split_lines(body)
    key = "excluded_ports"
    if root is not None and not isinstance(root, YamlMap):
        raise YamlError("the top level of the document is not a mapping", parser.root_line)
    if root is not None and root._meta is None:          # flow mapping / JSON object
        data = dict(root)
        data[key] = objs
        start, end = root.line - 1, parser.root_end
        last = lines[end]
        ending = last[len(last.rstrip("\r\n")):]
        dumped = _json().dumps(data, indent=2, ensure_ascii=False).replace("\n", nl)
        return bom + "".join(lines[:start]) + dumped + ending + "".join(lines[end + 1:])
    if root is not None and key in root:
        k_idx = root.key_lines[key] - 1
        colon, end = root._meta[key]
        kline = parser.lines[k_idx]
        head = kline[:colon + 1]
        tail = ""
        h = parser.comments.get(k_idx)
        if h is not None and h > colon:
            before = kline[:h]
            tail = (before[len(before.rstrip(" \t")):] or " ") + kline[h:]
        old = root[key]
        if isinstance(old, YamlList) and old._col is not None:
            indent = old._col
            if appended and len(old) + appended == len(items):
                last = lines[end]
                body_end = last.rstrip("\r\n")
                added = "".join(nl + " " * indent + "- " + item for item in items[len(old):])
                return bom + "".join(lines[:end]) + body_end + added + last[len(body_end):] + \
                    "".join(lines[end + 1:])
        else:
            indent = len(kline) - len(kline.lstrip(" ")) + 2
        if items:
            new = [head + tail] + [" " * indent + "- " + item for item in items]
        else:
            new = [head + " []" + tail]
        last = lines[end]
        ending = last[len(last.rstrip("\r\n")):]
        return bom + "".join(lines[:k_idx]) + nl.join(new) + ending + "".join(lines[end + 1:])
    indent = 0
    if root is not None:
        first = parser.lines[root.line - 1]
        indent = len(first) - len(first.lstrip(" "))
    if items:
        new = [" " * indent + key + ":"] + [" " * (indent + 2) + "- " + item for item in items]
    else:
        new = [" " * indent + key + ": []"]
    block = nl.join(new) + nl
    if parser.end_marker is not None:                     # keep a final '...' last
        m = parser.end_marker
        return bom + "".join(lines[:m]) + block + "".join(lines[m:])
    if body and body[-1] not in "\r\n":
        body += nl
    return bom + body + block


# --- Configuration -----------------------------------------------------------

BUILTIN_SOURCE = "<built-in defaults>"
CLI_SOURCE = "<command line>"
MAX_LOCK_WAIT = 2147483
MAX_CONFIG_BYTES = 1 << 20
PROJECT_FILES = ("trop.yaml", "trop.local.yaml")
OUTPUT_FORMATS = ("table", "json", "csv", "tsv")
_INVALID = object()             # what a value type returns for a value it reported as a problem


def _describe(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean %s" % ("true" if value else "false")
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a sequence"
    return "%s %r" % (type(value).__name__.replace("str", "string"), value)


class _ValueType:
    """How one type of setting is read from a file, an environment variable and a flag.

    check() is the file rule (ValueError: the problem, as `validate` lists it);
    from_env() and from_flag() raise the error of their source.
    """

    schema = {"type": "string"}                                     # the JSON Schema of a value (MCP tools)

    def argument(self):
        """add_argument keywords of the setting's flag."""
        return {}

    def from_file(self, option, value, problems, line):
        try:
            return self.check(option.key, value)
        except ValueError as exc:
            problems.add(line, str(exc))
            return _INVALID

    def check(self, key, value):
        return value

    def from_env(self, option, name, text):
        return text

    def from_flag(self, option, value):
        return value

    def store(self, layer, option, value, where):
        for key in option.keys:
            layer.set(key, value, where)
        if option.clears:
            layer.set(option.clears, None, where)


class _Switch(_ValueType):
    """true/false in files, true/1/yes/on or false/0/no/off in variables; a flag can only turn it on."""

    schema = {"type": "boolean"}

    def argument(self):
        return {"action": "store_true"}

    def check(self, key, value):
        if not isinstance(value, bool):
            raise ValueError("%s must be true or false, got %s" % (key, _describe(value)))
        return value

    def from_flag(self, option, value):
        if not isinstance(value, bool):
            raise InvalidArguments("Invalid arguments: %s must be True or False, got %r" % (option.name, value))
        return value

    def from_env(self, option, name, text):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError("validation error for '%s': Invalid boolean value: '%s' "
                          "(expected true/false/1/0/yes/no/on/off)" % (name, text))


class _Port(_ValueType):
    """ports.min / ports.max: an integer port in files, a u16 in variables, a port on the command line."""

    schema = {"type": "integer", "minimum": 1, "maximum": 65535}

    env_what = "Invalid port number"

    def check(self, key, value):
        if not _is_int(value):
            raise ValueError("%s must be an integer port, got %s" % (key, _describe(value)))
        if not 1 <= value <= 65535:
            raise ValueError("%s: invalid port %s (ports are 1..65535)" % (key, value))
        return value

    def from_env(self, option, name, text):
        try:
            return parse_port(text, allow_zero=True)   # 0 is refused with the merged configuration
        except ValueError:
            raise ConfigError("validation error for '%s': %s: '%s'" % (name, self.env_what, text))

    def from_flag(self, option, value):
        try:
            return cli_port(value)
        except InvalidArguments as exc:
            raise InvalidArguments("Invalid arguments: invalid --%s value: %s" % (option.name, exc.message))


class _Offset(_Port):
    env_what = "Invalid port offset"

    def check(self, key, value):
        if not _is_int(value) or not 0 < value <= 65535:
            raise ValueError("%s must be an integer 1..65535, got %s" % (key, _describe(value)))
        return value


def _u32_flag(expected):
    """An argparse type for a u32 flag (not one, exit 2); expected names the values the command takes in the end
    (a u32 outside them is refused later, with the reference's exit code)."""
    def u32(text):
        try:
            return parse_uint(text, 0xFFFFFFFF)
        except ValueError:
            raise _argparse().ArgumentTypeError("invalid value '%s': expected %s" % (text, expected))
    return u32


class _Days(_ValueType):
    schema = {"type": "integer", "minimum": 1, "maximum": 0xFFFFFFFF}

    def argument(self):
        return {"type": _u32_flag("a whole number of days, 1..4294967295")}

    def check(self, key, value):
        if not _is_int(value) or not 0 < value <= 0xFFFFFFFF:
            raise ValueError("%s must be a positive integer, got %s" % (key, _describe(value)))
        return value

    def from_env(self, option, name, text):
        try:
            return parse_uint(text, 0xFFFFFFFF)        # 0 is refused with the merged configuration
        except ValueError:
            raise ConfigError("validation error for '%s': Must be a positive integer" % name)

    def from_flag(self, option, value):
        """--days N (argparse has checked it is a u32) or days=N from the API: a positive integer."""
        if not _is_int(value) or not 0 <= value <= 0xFFFFFFFF:
            raise ConfigError("validation error for 'days': must be a positive integer, got %r" % (value,))
        if value == 0:
            raise ConfigError("validation error for '%s (%s)': must be greater than 0" % (option.key, CLI_SOURCE))
        return value


class _Seconds(_ValueType):
    schema = {"type": "integer", "minimum": 0, "maximum": MAX_LOCK_WAIT}

    def argument(self):
        return {"type": _u32_flag("whole seconds, 0..%d" % MAX_LOCK_WAIT), "metavar": "SECONDS"}

    def check(self, key, value):
        if not _is_int(value) or value < 0:
            raise ValueError("%s must be a non-negative integer, got %s" % (key, _describe(value)))
        if value > MAX_LOCK_WAIT:
            raise ValueError("Timeout must not exceed %d seconds" % MAX_LOCK_WAIT)
        return value

    def from_env(self, option, name, text):
        try:
            return parse_uint(text, 0xFFFFFFFFFFFFFFFF)
        except ValueError:
            raise ConfigError("validation error for '%s': Must be a non-negative integer" % name)

    def from_flag(self, option, value):
        if not _is_int(value) or value < 0:
            raise InvalidArguments("invalid --%s value: %r" % (option.flag[2:], value))
        if value > MAX_LOCK_WAIT:
            raise ConfigError("validation error for '%s (%s)': Timeout must not exceed %d seconds"
                              % (option.key, CLI_SOURCE, MAX_LOCK_WAIT))
        return value


class _Identifier(_ValueType):
    """project / task: trimmed, non-empty, no NUL, at most 255 bytes."""

    def check(self, key, value):
        if not isinstance(value, str):
            raise ValueError("%s must be a string, got %s" % (key, _describe(value)))
        text = value.strip()
        problem = identifier_problem(text)
        if problem:
            raise ValueError("%s %s" % (key, problem))
        return text

    def from_env(self, option, name, text):
        return check_identifier(option.key, text, name)

    def from_flag(self, option, value):
        if not isinstance(value, str):
            raise InvalidArguments("Invalid arguments: %s must be a string, got %s"
                                   % (option.key, type(value).__name__))
        return check_identifier(option.key, value, CLI_SOURCE)


class _Choice(_ValueType):
    def __init__(self, choices, what):
        self.choices, self.what = choices, what
        self.schema = {"type": "string", "enum": list(choices)}

    def check(self, key, value):
        if value not in self.choices:
            raise ValueError("%s must be one of %s, got %s" % (key, ", ".join(self.choices), _describe(value)))
        return value

    def from_env(self, option, name, text):
        low = text.strip().lower()
        if low not in self.choices:
            raise ConfigError("validation error for '%s': Invalid %s: '%s' (expected %s)"
                              % (name, self.what, text, "/".join(self.choices)))
        return low


class _Text(_ValueType):
    def argument(self):
        return {"metavar": "PATH"}


class _Exclusions(_ValueType):
    """excluded_ports: they accumulate over every layer instead of overriding."""

    def from_file(self, option, value, problems, line):
        if not isinstance(value, list):
            problems.add(line, "excluded_ports must be a sequence, got %s" % _describe(value))
            return _INVALID
        item_lines = getattr(value, "item_lines", None) or [line] * len(value)
        ranges = [(parse_exclusion(item, problems, item_line), item_line) for item, item_line in zip(value, item_lines)]
        return [(rng, item_line) for rng, item_line in ranges if rng]

    def from_env(self, option, name, text):
        out = []
        for item in text.split(","):
            if item.strip():
                try:
                    out.append((parse_exclusion(item.strip()), name))
                except InvalidArguments as exc:
                    raise ConfigError("validation error for '%s': %s" % (name, exc.message))
        return out

    def store(self, layer, option, value, where):
        layer.exclusions.extend(value)          # (range, line or variable) pairs


class _Group(_ValueType):
    """reservations: a whole group, replaced (or cleared with null) by a later file."""

    def from_file(self, option, value, problems, line):
        return None if value is None else read_group(value, problems, line)


class Option:
    """One row of OPTIONS: a setting and every way to give it.

    name is the Python API's keyword and, with dashes, the flag; keys the
    configuration keys it sets (none for a pure command-line switch); env the
    environment variables that set it, the first one present winning (each is
    checked); files where configuration files may hold it ("any", "project",
    or None); groups the flag sets that carry its flag (see _add_options);
    clears a key it resets (ports.max and ports.max_offset exclude each other);
    example the value the config.yaml template shows (default: the default).
    """

    __slots__ = ("name", "keys", "value_type", "default", "env", "files", "groups", "help", "clears", "example")

    def __init__(self, name, keys, value_type, default=None, env=(), files="any", groups=(), help="", clears=None,
                 example=None):
        self.name, self.value_type, self.default, self.files, self.help, self.clears = \
            name, value_type, default, files, help, clears
        self.example = default if example is None else example     # the value config.yaml's template shows
        self.keys = (keys,) if isinstance(keys, str) else keys
        self.env = (env,) if isinstance(env, str) else env
        self.groups = (groups,) if isinstance(groups, str) else groups

    @property
    def key(self):
        return self.keys[0] if self.keys else None

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-") if self.groups else None

    def __repr__(self):
        return "Option(%r)" % self.name


_SWITCH, _PORT = _Switch(), _Port()

# Every setting, in the order of the configuration schema.  A new setting is
# one row here (plus the code that acts on it): its configuration key, default,
# environment variable, flag, API keyword, help and the README's tables all
# follow from the row.  Groups: global (every command), range (reserve, scan),
# occupancy (the commands that probe), probes (scan), permissions, autoclean.
OPTIONS = (
    Option("verbose", (), _SWITCH, files=None, groups="global",
           help="more detail: prune, expire and autoclean list what they remove, run prints the variables it sets "
                "(no effect on other commands)"),
    Option("quiet", (), _SWITCH, files=None, groups="global",
           help="no status text on stderr (errors still print); the cleanup commands print only their count"),
    Option("data_dir", (), _Text(), env="TROP_DATA_DIR", files=None, groups="global",
           help="data directory (default: $TROP_DATA_DIR, else ~/.trop)"),
    Option("project", "project", _Identifier(), env="TROP_PROJECT", files="project", groups="reserve",
           help="project name to record"),
    Option("task", "task", _Identifier(), env="TROP_TASK", files=None, groups="reserve",
           help="task name to record (default: $TROP_TASK)"),
    Option("min", "ports.min", _PORT, 5000, env="TROP_PORT_MIN", groups="range",
           help="lowest port of the range (default: ports.min, else 5000)"),
    Option("max", "ports.max", _PORT, 7000, env="TROP_PORT_MAX", groups="range", clears="ports.max_offset",
           help="highest port of the range (default: ports.max, else 7000)"),
    Option("max_offset", "ports.max_offset", _Offset(), env="TROP_PORT_MAX_OFFSET", clears="ports.max", example=2000,
           help="the range's size above ports.min, instead of ports.max"),
    Option("excluded_ports", "excluded_ports", _Exclusions(), (), env="TROP_EXCLUDED_PORTS",
           example=(5432, "6000..6010", {"start": 6379, "end": 6380}),
           help="ports never handed out: comma-separated N or A..B, added to the files' exclusions"),
    Option("days", "cleanup.expire_after_days", _Days(), 30, env="TROP_EXPIRE_AFTER_DAYS", groups="expire",
           help="expire reservations unused for more than N days (default: cleanup.expire_after_days, else 30)"),
    Option("skip_occupancy_check", "occupancy_check.skip", _SWITCH, False, env="TROP_SKIP_OCCUPANCY_CHECK",
           groups="occupancy", help="do not probe ports for listeners"),
    Option("skip_ipv4", "occupancy_check.skip_ip4", _SWITCH, False, env="TROP_SKIP_IPV4",
           groups=("occupancy", "probes"), help="skip IPv4 probes"),
    Option("skip_ipv6", "occupancy_check.skip_ip6", _SWITCH, False, env="TROP_SKIP_IPV6",
           groups=("occupancy", "probes"), help="skip IPv6 probes"),
    Option("skip_tcp", "occupancy_check.skip_tcp", _SWITCH, False, env="TROP_SKIP_TCP",
           groups=("occupancy", "probes"), help="skip TCP probes"),
    Option("skip_udp", "occupancy_check.skip_udp", _SWITCH, False, env="TROP_SKIP_UDP",
           groups=("occupancy", "probes"), help="skip UDP probes"),
    Option("check_all_interfaces", "occupancy_check.check_all_interfaces", _SWITCH, False,
           env="TROP_CHECK_ALL_INTERFACES", groups=("occupancy", "probes"),
           help="also probe the wildcard addresses"),
    Option("reservations", "reservations", _Group(), files="project",
           help="the project's group of services (trop.yaml)"),
    Option("disable_autoinit", "disable_autoinit", _SWITCH, False, env="TROP_DISABLE_AUTOINIT", groups="global",
           help="exit 3 instead of creating a missing trop.db"),
    Option("disable_autoprune", "disable_autoprune", _SWITCH, False, env="TROP_DISABLE_AUTOPRUNE",
           groups="autoclean", help="no pruning when the range is exhausted"),
    Option("disable_autoexpire", "disable_autoexpire", _SWITCH, False, env="TROP_DISABLE_AUTOEXPIRE",
           groups="autoclean", help="no expiry when the range is exhausted"),
    Option("disable_autoclean", ("disable_autoprune", "disable_autoexpire"), _SWITCH, files=None,
           groups="autoclean", help="neither pruning nor expiry on exhaustion"),
    Option("allow_unrelated_path", "allow_unrelated_path", _SWITCH, False, env="TROP_ALLOW_UNRELATED_PATH",
           groups="permissions", help="allow a path unrelated to the current directory"),
    Option("allow_project_change", "allow_change_project", _SWITCH, False,
           env=("TROP_ALLOW_PROJECT_CHANGE", "TROP_ALLOW_CHANGE_PROJECT"), groups="permissions",
           help="allow changing a stored project"),
    Option("allow_task_change", "allow_change_task", _SWITCH, False,
           env=("TROP_ALLOW_TASK_CHANGE", "TROP_ALLOW_CHANGE_TASK"), groups="permissions",
           help="allow changing a stored task"),
    Option("allow_change", "allow_change", _SWITCH, False, env="TROP_ALLOW_CHANGE", groups="permissions",
           help="allow changing project and task"),
    Option("allow_unsafe_ports", "allow_unsafe_ports", _SWITCH, False, env="TROP_ALLOW_UNSAFE_PORTS",
           groups="permissions", help="let automatic allocation hand out ports browsers refuse (the WHATWG Fetch "
                                      "bad-port list); a trop.py key the Rust trop does not know"),
    Option("busy_timeout", "maximum_lock_wait_seconds", _Seconds(), 5,
           env=("TROP_BUSY_TIMEOUT", "TROP_MAXIMUM_LOCK_WAIT_SECONDS"), groups="global",
           help="whole seconds to wait for the database lock (default 5; 0: do not wait)"),
    Option("output_format", "output_format", _Choice(OUTPUT_FORMATS, "output format"), "table",
           env="TROP_OUTPUT_FORMAT", help="the default `list --format`: table, json, csv or tsv"),
    Option("share_with_group", "share_with_group", _Choice(("auto", "yes", "no"), "group sharing"), "auto",
           env="TROP_SHARE_WITH_GROUP", files=None,
           help="give the data directory's group read and write access to what trop creates there: auto (when the "
                "directory it is created in is group-writable, as a setgid team directory is), yes or no"),
    Option("allow_network_fs", "allow_network_fs", _SWITCH, False, env="TROP_ALLOW_NETWORK_FS", files=None,
           help="use a data directory on NFS, SMB or FUSE anyway (safe only if one machine uses it)"),
    Option("log_mode", (), _Choice(("quiet", "normal", "verbose"), "log mode"), env="TROP_LOG_MODE", files=None,
           help="quiet, normal or verbose: checked, no effect (as in the Rust trop)"),
)
OPTION = {option.name: option for option in OPTIONS}
API_OPTIONS = frozenset(option.name for option in OPTIONS if option.flag)
FILE_OPTIONS = {option.key: option for option in OPTIONS if option.files}
DEFAULTS = {option.key: option.default for option in OPTIONS if len(option.keys) == 1}
TOP_KEYS = []                   # a file's top-level keys, in schema order
SECTIONS = {}                   # ports, cleanup, occupancy_check -> their leaves, in schema order
for _key in FILE_OPTIONS:
    _top, _, _leaf = _key.partition(".")
    if _top not in TOP_KEYS:
        TOP_KEYS.append(_top)
    if _leaf:
        SECTIONS[_top] = SECTIONS.get(_top, ()) + (_leaf,)
del _key, _top, _leaf
OCCUPANCY_KEYS = SECTIONS["occupancy_check"]


def _template_value(value):
    """A value as the config.yaml template writes it (flow style for a mapping)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % item for item in value.items())
    return '"%s"' % value if isinstance(value, str) and not value.isalpha() else str(value)


def config_template():
    """A commented config.yaml naming every setting of OPTIONS a user configuration may hold, with its help."""
    lines = ["# trop user configuration (<data-dir>/config.yaml).",
             "# Every key is optional; uncomment what you need.  Projects can override these",
             "# settings in trop.yaml / trop.local.yaml; environment variables and command-line",
             "# flags override both."]
    sections = set()
    for option in OPTIONS:
        if option.files != "any":
            continue
        top, _, leaf = option.key.partition(".")
        if (leaf and top not in sections) or (not leaf and lines[-1].startswith("#  ")):
            lines.append("#")                   # a blank comment line around each section
        if leaf and top not in sections:
            sections.add(top)
            lines.append("# %s:" % top)
        alternative = "# " if option.default is None and option.clears else ""   # not both: shown commented
        text = "#%s %s%s:" % ("  " if leaf else "", alternative, leaf or top)
        help_text = re.sub(r" \(default[^)]*\)", "", option.help)
        if isinstance(option.example, tuple):
            lines.append("%-30s # %s" % (text, help_text))
            lines += ["#   - %s" % _template_value(item) for item in option.example]
        else:
            lines.append("%-30s # %s" % ("%s %s" % (text, _template_value(option.example)), help_text))
    project_only = [key for key, option in FILE_OPTIONS.items() if option.files == "project"]
    lines += ["#", "# %s belong in a project's trop.yaml, not here." % " and ".join("`%s:`" % k for k in project_only)]
    return "\n".join(lines) + "\n"


class Layer:
    """The settings one source sets: flat dotted keys, plus where each came from."""

    __slots__ = ("source", "values", "lines", "exclusions", "kind")

    def __init__(self, source, kind="file"):
        self.source = source
        self.kind = kind          # "builtin", "user", "project", "env", "cli"
        self.values = {}
        self.lines = {}
        self.exclusions = []      # ((start, end), line or variable): where each came from

    def set(self, key, value, line=None):
        self.values[key] = value
        if line is not None:
            self.lines[key] = line

    def where(self, key):
        return self.place(self.lines.get(key))

    def place(self, line):
        """file:line, the variable an environment layer read, or the source alone."""
        if isinstance(line, str):
            return line
        return "%s:%d" % (self.source, line) if line else self.source


class Problems:
    """Collects every problem in one document, so `validate` can list them all."""

    def __init__(self, source):
        self.source = source
        self.items = []

    def add(self, line, message):
        self.items.append((line, message))

    def lines(self):
        ordered = sorted(self.items, key=lambda item: item[0] or 0)
        return ["%s:%s: %s" % (self.source, line, msg) if line else "%s: %s" % (self.source, msg)
                for line, msg in ordered]

    def raise_first(self):
        if self.items:
            lines = self.lines()
            more = len(lines) - 1
            extra = " (and %d more problem%s; run `trop validate %s`)" % (
                more, "s" if more > 1 else "", self.source) if more else ""
            raise ConfigError(lines[0] + extra)


def _line_of(mapping, key, default=None):
    lines = getattr(mapping, "key_lines", None)
    return lines.get(key, default) if lines else default


def _mapping(value, problems, line, what, allowed):
    """Check a mapping and its keys; unknown keys are reported, not fatal."""
    if not isinstance(value, dict):
        problems.add(line, "%s must be a mapping, got %s" % (what, _describe(value)))
        return None
    for key in value:
        if key not in allowed:
            problems.add(_line_of(value, key, line), "unknown field '%s%s' (expected one of: %s)"
                         % (what + "." if what else "", key, ", ".join(allowed)))
    return value


def _port_in_file(value, problems, line, what):
    """A port-valued key of a file (reservations.base, a service's preferred port), or None."""
    try:
        return _PORT.check(what, value)
    except ValueError as exc:
        problems.add(line, str(exc))
        return None


def parse_exclusion(item, problems=None, line=None):
    """An exclusion entry (int, "A..B", "N" or {start, end}) as a (start, end) range.

    Problems are collected when a Problems is given (None is returned for a bad
    entry), else the first one is raised as InvalidArguments.
    """
    collect = problems if problems is not None else Problems("exclusion")
    try:
        if _is_int(item):
            rng = parse_port_range(str(item))
        elif isinstance(item, str):
            rng = parse_port_range(item)
        elif isinstance(item, dict):
            if _mapping(item, collect, line, "excluded_ports[]", ("start", "end")) is None:
                rng = None
            elif item.get("start") is None or item.get("end") is None:
                raise ValueError("exclusion mapping needs both start and end")
            elif not (_is_int(item["start"]) and _is_int(item["end"])):
                raise ValueError("exclusion start/end must be integers")
            else:
                rng = parse_port_range("%d..%d" % (item["start"], item["end"]))
        else:
            raise ValueError("invalid exclusion %s (expected N, \"A..B\" or {start, end})" % _describe(item))
    except ValueError as exc:
        message = str(exc)
        if not message.startswith(("Invalid range", "exclusion", "invalid exclusion")):
            message = "invalid exclusion %r: %s" % (item, message)
        collect.add(line, message)
        rng = None
    if problems is None and collect.items:
        raise InvalidArguments(collect.items[0][1])
    return rng


def read_group(value, problems, line):
    """A `reservations:` mapping as a GroupSpec (None if unusable), every problem reported."""
    if _mapping(value, problems, line, "reservations", ("base", "services")) is None:
        return None
    base = None
    if value.get("base") is not None:
        base = _port_in_file(value["base"], problems, _line_of(value, "base", line), "reservations.base")
    if "services" not in value:
        problems.add(line, "reservations: missing field 'services'")
        return None
    raw = value["services"]
    sline = _line_of(value, "services", line)
    if not isinstance(raw, dict):
        problems.add(sline, "reservations.services must be a mapping of tag to service, got %s"
                     % _describe(raw))
        return None
    services, seen = [], {}
    for name, body in raw.items():
        tline = _line_of(raw, name, sline)
        tag = name.strip() if isinstance(name, str) else str(name)
        if identifier_problem(tag):
            problems.add(tline, "service tag %r %s" % (name, identifier_problem(tag)))
            continue
        if tag in seen:
            problems.add(tline, "duplicate service tag '%s' (after trimming)" % tag)
            continue
        seen[tag] = True
        spec = ServiceSpec(tag, line=tline)
        if body is not None and _mapping(body, problems, tline, "reservations.services." + tag,
                                         ("offset", "preferred", "env")) is not None:
            if body.get("offset") is not None:
                off = body["offset"]
                if not _is_int(off) or not 0 <= off <= 65535:
                    problems.add(_line_of(body, "offset", tline), "service '%s': offset must be an integer "
                                 "0..65535, got %s" % (tag, _describe(off)))
                else:
                    spec.offset = off
            if body.get("preferred") is not None:
                spec.preferred = _port_in_file(body["preferred"], problems, _line_of(body, "preferred", tline),
                                               "service '%s' preferred" % tag)
            if body.get("env") is not None:
                env = body["env"]
                if not isinstance(env, str):
                    problems.add(_line_of(body, "env", tline), "service '%s': env must be a string" % tag)
                else:
                    spec.env = env
        elif body is not None and not isinstance(body, dict):
            continue
        services.append(spec)
    spec = GroupSpec(services, base, line)
    for message, sline2 in spec.problems():
        problems.add(sline2 or line, message)
    return spec


def read_config_document(doc, source, kind, problems):
    """Turn one parsed YAML document into a Layer, reporting every problem."""
    layer = Layer(source, kind)
    if doc is None or _mapping(doc, problems, getattr(doc, "line", 1), "", TOP_KEYS) is None:
        return layer
    for key, value in doc.items():
        line = _line_of(doc, key)
        option = FILE_OPTIONS.get(key)
        if value is None and not (key == "reservations" and kind != "user"):
            continue                    # a null is the same as leaving the key out (a group's clears it)
        if key == "ports":
            _read_ports(value, layer, problems, line)
        elif key in SECTIONS:
            if _mapping(value, problems, line, key, SECTIONS[key]) is not None:
                for leaf, leaf_value in value.items():
                    if leaf in SECTIONS[key] and leaf_value is not None:
                        _read_setting(layer, FILE_OPTIONS[key + "." + leaf], leaf_value, problems,
                                      _line_of(value, leaf, line))
        elif option is not None:
            if option.files == "project" and kind == "user":
                problems.add(line, "%s %s only valid in trop.yaml/trop.local.yaml, not user config.yaml"
                             % (key, "are" if key.endswith("s") else "is"))
            else:
                _read_setting(layer, option, value, problems, line)
    return layer


def _read_setting(layer, option, value, problems, line):
    value = option.value_type.from_file(option, value, problems, line)
    if value is not _INVALID:
        option.value_type.store(layer, option, value, line)


def _read_ports(value, layer, problems, line):
    """ports: min is required; max and max_offset exclude each other; max >= min."""
    if _mapping(value, problems, line, "ports", SECTIONS["ports"]) is None:
        return
    present = {k: _line_of(value, k, line) for k, v in value.items() if v is not None}   # null means absent
    if "min" not in present:
        problems.add(line, "ports: missing field 'min'")
    if "max" in present and "max_offset" in present:
        problems.add(present["max_offset"], "Cannot specify both max and max_offset")
        del present["max"], present["max_offset"]
    read = {}
    for leaf in SECTIONS["ports"]:
        if leaf in present:
            option = FILE_OPTIONS["ports." + leaf]
            read[leaf] = option.value_type.from_file(option, value[leaf], problems, present[leaf])
    low = read.get("min", _INVALID)
    if low is not _INVALID:
        OPTION["min"].value_type.store(layer, OPTION["min"], low, present["min"])
    high = read.get("max", _INVALID)
    if high is not _INVALID:
        if low is not _INVALID and high < low:
            problems.add(present["max"], "ports.max (%d) must be >= min (%d)" % (high, low))
        OPTION["max"].value_type.store(layer, OPTION["max"], high, present["max"])
    offset = read.get("max_offset", _INVALID)
    if offset is not _INVALID:
        if low is not _INVALID and low + offset > 65535:
            problems.add(present["max_offset"], "Offset %d would overflow port range from min %d" % (offset, low))
        else:
            OPTION["max_offset"].value_type.store(layer, OPTION["max_offset"], offset, present["max_offset"])


def read_config_file(path, kind, problems=None):
    """Read and check one YAML file; problems are collected, or raised at once."""
    collect = problems is not None
    problems = problems if collect else Problems(path)
    layer = Layer(path, kind)
    try:
        data = _read_regular_file(path, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        problems.add(None, "cannot read: %s" % (exc.strerror or exc))
        data = None
    if data is not None and len(data) > MAX_CONFIG_BYTES:
        problems.add(None, "file is larger than %d bytes; not a trop configuration" % MAX_CONFIG_BYTES)
    elif data is not None:
        try:
            layer = read_config_document(parse_yaml(data), path, kind, problems)
        except YamlError as exc:
            problems.add(exc.line, exc.message)
    if not collect:
        problems.raise_first()
    return layer


def _read_regular_file(path, limit):
    """Read at most limit bytes; a directory, FIFO or device is refused before open() can block."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise OSError(errno.EISDIR, "is a directory, not a configuration file")
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file")
    with open(path, "rb") as fh:
        return fh.read(limit)


def env_layer(environ):
    """Everything trop reads from the environment, as one layer."""
    layer = Layer("environment", "env")
    for option in OPTIONS:
        chosen = None
        for name in option.env:
            text = environ.get(name)
            if text is not None:
                value = option.value_type.from_env(option, name, text)
                if chosen is None:
                    chosen = (value, name)
        if chosen is not None and option.keys:
            option.value_type.store(layer, option, chosen[0], chosen[1])
    return layer


def cli_layer(opts):
    """The command-line layer (flags, or the API's keywords): switches can only turn settings on."""
    layer = Layer(CLI_SOURCE, "cli")
    for option in OPTIONS:
        value = opts.get(option.name)
        if option.keys and option.flag and value is not None and value is not False:
            option.value_type.store(layer, option, option.value_type.from_flag(option, value), None)
    low, high = layer.values.get("ports.min"), layer.values.get("ports.max")
    if low is not None and high is not None and low > high:
        raise InvalidArguments("Invalid arguments: --min %d is greater than --max %d" % (low, high))
    return layer


class Config:
    """The effective configuration: built-ins overlaid by each layer in order."""

    def __init__(self, layers):
        values = dict(DEFAULTS)
        sources = dict.fromkeys(values, BUILTIN_SOURCE)
        self.exclusion_sources = []
        self._exclusions = self._os_reserved = None
        self.layers = layers
        for layer in layers:
            for key, value in layer.values.items():
                values[key] = value
                sources[key] = layer.where(key)
            for rng, line in layer.exclusions:
                self.exclusion_sources.append((rng, layer.place(line)))
        self.values = values
        self.sources = sources

    def __getitem__(self, key):
        return self.values[key]

    def validate(self):
        """Checks on the merged result, attributed to the winning source."""
        pmin, pmax, offset = self["ports.min"], self["ports.max"], self["ports.max_offset"]
        if pmin < 1:
            raise ConfigError("validation error for 'ports.min (%s)': Invalid port number: port 0 is reserved"
                              % self.sources["ports.min"])
        if offset is not None:
            if offset < 1:
                raise ConfigError("validation error for 'ports.max_offset (%s)': max_offset must be greater than 0"
                                  % self.sources["ports.max_offset"])
            if pmin + offset > 65535:
                raise ConfigError("validation error for 'ports.max_offset (%s)': Offset %d would overflow "
                                  "port range from min %d" % (self.sources["ports.max_offset"], offset, pmin))
        elif pmax is not None and pmax < pmin:
            raise ConfigError("validation error for 'ports.max (%s)': ports max (%d) must be >= min (%d, from %s)"
                              % (self.sources["ports.max"], pmax, pmin, self.sources["ports.min"]))
        if not self["cleanup.expire_after_days"]:
            raise ConfigError("validation error for 'cleanup.expire_after_days (%s)': must be greater than 0"
                              % self.sources["cleanup.expire_after_days"])
        if self["maximum_lock_wait_seconds"] > MAX_LOCK_WAIT:
            raise ConfigError("validation error for 'maximum_lock_wait_seconds (%s)': Timeout must not "
                              "exceed %d seconds" % (self.sources["maximum_lock_wait_seconds"], MAX_LOCK_WAIT))
        return self

    @property
    def port_range(self):
        pmin, pmax, offset = self["ports.min"], self["ports.max"], self["ports.max_offset"]
        if offset is not None:
            return PortRange(pmin, pmin + offset)
        return PortRange(pmin, 7000 if pmax is None else pmax)

    @property
    def scan_range(self):
        """`scan` ignores max_offset, as the reference does."""
        pmax = self["ports.max"]
        return PortRange(self["ports.min"], 7000 if pmax is None else pmax)

    @property
    def exclusions(self):
        if self._exclusions is None:
            self._exclusions = ExclusionList(rng for rng, _ in self.exclusion_sources)
        return self._exclusions

    @property
    def os_reserved(self):
        """The ports the OS reserves, read once for this configuration (a command, or a Trop handle)."""
        if self._os_reserved is None:
            self._os_reserved = os_reserved_ports()
        return self._os_reserved

    @property
    def occupancy(self):
        return OccupancyPolicy(**{k: self["occupancy_check." + k] for k in OCCUPANCY_KEYS})

    def allow(self, what):
        """Effective permission: allow_change covers both project and task."""
        if what == "unrelated_path":
            return self["allow_unrelated_path"]
        return self["allow_change"] or self["allow_change_" + what]

    @property
    def group(self):
        return self["reservations"]


def write_file_atomic(path, text):
    """Write via a temporary file in the same directory, fsync, then rename over path.

    A path that is a symlink is written through: the target changes, the link stays.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        exists = os.path.exists(path)
        if os.path.lexists(tmp):
            os.remove(tmp)                      # left by a crashed writer with this pid
        # an existing file's copy is private until it has the file's own mode (a 0600 .env stays unread)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if exists else 0o666)
        with io.open(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if exists:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        PLATFORM.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise IoFailure("%s: %s" % (path, exc.strerror or exc))


def edit_exclusions(path, kind, change):
    """Rewrite only excluded_ports of path under a lock: change(ranges) -> new ranges or None.

    The file is re-read inside the lock so concurrent writers never lose an update;
    the new text is parsed and validated before it atomically replaces the old.
    """
    with PLATFORM.lock(os.path.dirname(os.path.realpath(path))):     # the directory whose file is replaced
        try:
            data = _read_regular_file(path, MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError("%s: file is larger than %d bytes; not a trop configuration"
                                  % (path, MAX_CONFIG_BYTES))
            text = data.decode("utf-8")
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise IoFailure("%s: %s" % (path, getattr(exc, "strerror", None) or exc))
        problems = Problems(path)
        try:
            doc = parse_yaml(text)
        except YamlError as exc:
            raise ConfigError("%s:%s: %s" % (path, exc.line, exc.message))
        current = [rng for rng, _line in read_config_document(doc, path, kind, problems).exclusions]
        problems.raise_first()
        new = change(current)
        if new is None:
            return current, None
        for start, end in new:
            if not 1 <= start <= end <= 65535:
                raise InvalidArguments("Invalid arguments: invalid exclusion %s" % range_text(start, end))
        try:
            appended = len(new) - len(current) if new[:len(current)] == current else 0
            new_text = replace_excluded_ports(text, [s if s == e else (s, e) for s, e in new], appended)
            check = Problems(path)
            read_config_document(parse_yaml(new_text), path, kind, check)
        except YamlError as exc:
            raise LibraryError("internal error: rewritten %s does not parse (%s); nothing was written"
                               % (path, exc.message))
        if check.items:
            raise InvalidArguments("Invalid arguments: %s" % check.lines()[0])
        write_file_atomic(path, new_text)
        return current, new


def add_exclusions(path, ranges, kind="project", compact=False):
    """Append ranges not already listed (exact match); optionally compact. Returns how many were added."""
    added = []

    def change(current):
        for rng in ranges:
            if rng not in current and rng not in added:
                added.append(rng)
        if not added:
            return None
        merged = current + added
        if compact:
            merged = ExclusionList(merged).ranges
        return merged
    edit_exclusions(path, kind, change)
    return len(added)


def config_kind(path):
    """Validation rules of a file: user rules for config.yaml, project rules otherwise."""
    return "user" if os.path.basename(path) == "config.yaml" else "project"


def exclusion_target(project_dir, data_directory):
    """Where exclude and scan --autoexclude write: trop.local.yaml, else trop.yaml, else the user config."""
    for name in reversed(PROJECT_FILES if project_dir else ()):
        path = os.path.join(project_dir, name)
        if os.path.exists(path):
            return path
    return os.path.join(data_directory, "config.yaml")


def find_project_dir(start):
    """The nearest directory (from start upwards) holding trop.yaml or trop.local.yaml."""
    current = start
    while True:
        for name in PROJECT_FILES:
            if os.path.lexists(os.path.join(current, name)):
                return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def project_layers(directory, only_file=None):
    """The project layers of one directory: trop.yaml, then trop.local.yaml."""
    if only_file is not None and os.path.basename(only_file) not in PROJECT_FILES:
        return [read_config_file(only_file, "project")]
    layers = []
    for name in PROJECT_FILES:
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            layers.append(read_config_file(path, "project"))
    return layers


def user_layer(directory):
    path = os.path.join(directory, "config.yaml")
    if os.path.lexists(path):
        return [read_config_file(path, "user")]
    return []


# --- Paths: keys of the working directory, explicit paths and git metadata -----

def home_dir():
    """The home directory: $HOME (Windows: USERPROFILE), else the password database, else None."""
    home = PLATFORM.paths.home(os.environ)
    if home:
        return key_text(home)
    try:
        return key_text(_pwd().getpwuid(os.getuid()).pw_dir) or None
    except (AttributeError, KeyError):          # no pwd module (None), no entry
        return None


def current_dir():
    try:
        return key_text(os.getcwd())
    except OSError as exc:
        raise IoFailure("cannot read the current directory (%s); it may have been deleted"
                        % (exc.strerror or exc))


def normalize_path(path, cwd=None):
    """The key of an explicit path: absolute and lexically normal; symlinks are kept.

    Unlike os.path.normpath, a leading '//' collapses and '..' past the root
    is an error rather than silently dropped.
    """
    path = _path_text(path)
    try:
        return PLATFORM.paths.normalize(path, cwd or current_dir(), home_dir() if path[:1] == "~" else None)
    except ValueError as exc:
        raise LibraryError(str(exc))


def _path_text(path):
    """str or os.PathLike (pytest's tmp_path) as key text; anything else is a clear error."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise InvalidArguments("Invalid arguments: a path must be a string or os.PathLike, got %s"
                               % type(path).__name__)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if "\0" in path:
        raise LibraryError("invalid path %r: paths cannot contain NUL" % path)
    return key_text(path)


def real_key(native):
    """The key of an existing path with every symlink resolved, as Rust's fs::canonicalize spells it
    (Windows: the verbatim \\\\?\\ form of GetFinalPathNameByHandleW)."""
    if PLATFORM.name == "windows":
        import nt
        return PLATFORM.paths.verbatim(nt._getfinalpathname(native))
    return key_text(os.path.realpath(native))


def canonical_path(path):
    """The key of an inferred path (the cwd, a config file's directory): it must exist."""
    full = normalize_path(path)
    native = os_path(full)
    if not os.path.exists(native):
        raise LibraryError("path not found: %s" % full,
                           ["Cannot canonicalize inferred path because it does not exist: %s" % full])
    return real_key(native)


def is_within(path, root):
    """Component-wise containment: /w/a is within /w but /w/ab is not within /w/a."""
    return PLATFORM.paths.is_within(path, root)


def _canonical_prefix(path):
    """The canonical key of the longest existing prefix of a key, with the missing rest appended."""
    suffix, current = [], os_path(path)
    while not os.path.exists(current) and os.path.dirname(current) != current:
        current, tail = os.path.split(current)
        suffix.append(key_text(tail))
    real = real_key(current)
    for tail in reversed(suffix):
        real = real.rstrip("\\/") + PLATFORM.paths.sep + tail
    return real


def check_path_relationship(target, allowed):
    """Refuse to touch a path unrelated to the working directory unless allowed.

    Compared as written first, then with symlinks resolved (for a target that
    does not exist yet, its longest existing prefix).
    """
    if allowed:
        return
    cwd = current_dir()
    if PLATFORM.paths.related(target, cwd):
        return
    if PLATFORM.paths.related(_canonical_prefix(target), real_key(os_path(cwd))):
        return
    raise SemanticFailure("path relationship violation: %s and %s are unrelated paths "
                          "(use --allow-unrelated-path or --force)" % (target, cwd))


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(4096).strip()
    except OSError:
        return None


def infer_git_metadata(path):
    """(project, task) from the git repository containing path, reading .git directly.

    project: the repository's name (worktrees resolve to the main repository);
    task: the linked worktree's name, else the branch; detached HEAD: none.
    """
    current = os_path(path)
    while True:
        here = current.rstrip(os.sep) + os.sep            # not os.path.join: this loop is on reserve's path
        dotgit = here + ".git"
        workdir = current
        file_type = _file_type(dotgit)
        if file_type == stat.S_IFDIR:
            gitdir, linked = dotgit, False
            break
        if file_type == stat.S_IFREG:
            text = _read_text(dotgit) or ""
            if not text.startswith("gitdir:"):
                return None, None
            gitdir = os.path.normpath(os.path.join(current, text[7:].strip()))
            linked = True
            break
        if _file_type(here + "HEAD") == stat.S_IFREG and os.path.isdir(here + "objects") and \
                os.path.isdir(here + "refs"):
            gitdir, linked, workdir = current, False, None      # a bare repository
            break
        parent = os.path.dirname(current)
        if parent == current:
            return None, None
        current = parent
    common = gitdir
    commondir = _read_text(os.path.join(gitdir, "commondir"))
    if commondir:
        common = os.path.normpath(os.path.join(gitdir, commondir))
    name = os.path.basename(common)
    if name == ".git":
        project = os.path.basename(os.path.dirname(common))
    else:
        project = name[:-4] if name.endswith(".git") else name
    task = None
    if linked and workdir:
        task = os.path.basename(workdir)
    else:
        head = _read_text(os.path.join(gitdir, "HEAD")) or ""
        if head.startswith("ref:"):
            ref = head[4:].strip()
            task = ref[len("refs/heads/"):] if ref.startswith("refs/heads/") else None
    return _git_name(key_text(project)), _git_name(key_text(task) if task else None)


def _file_type(path):
    """The file type bits of path (following symlinks), or None: one stat per question."""
    try:
        return os.stat(path).st_mode & 0o170000
    except (OSError, ValueError):
        return None


def _git_name(value):
    """An inferred project or task: trimmed, or None when it is not a valid identifier."""
    value = value.strip() if value is not None else ""
    return None if identifier_problem(value) else value


# --- Store (SQLite) ----------------------------------------------------------

SCHEMA_VERSION = 2
DB_FILE = "trop.db"
_COLUMNS = "path, tag, port, project, task, created_at, last_used_at"
_SELECT = "SELECT " + _COLUMNS + " FROM reservations"
_METADATA_SQL = "CREATE TABLE metadata (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
_RESERVATIONS_SQL = (
    "CREATE TABLE reservations (path TEXT NOT NULL, tag TEXT NOT NULL, "
    "port INTEGER NOT NULL UNIQUE CONSTRAINT valid_port CHECK (port BETWEEN 1 AND 65535), "
    "project TEXT, task TEXT, "
    "created_at INTEGER NOT NULL CONSTRAINT valid_created_at CHECK (created_at >= 0), "
    "last_used_at INTEGER NOT NULL CONSTRAINT valid_last_used_at CHECK (last_used_at >= 0), "
    "PRIMARY KEY (path, tag))")
_INDEXES = (("idx_reservations_port", "port"), ("idx_reservations_project", "project"),
            ("idx_reservations_last_used", "last_used_at"))
_V1_COLUMNS = [("path", "TEXT", 1, 1), ("tag", "TEXT", 0, 2), ("port", "INTEGER", 1, 0),
               ("project", "TEXT", 0, 0), ("task", "TEXT", 0, 0), ("created_at", "INTEGER", 1, 0),
               ("last_used_at", "INTEGER", 1, 0)]
_DUPLICATE_KEYS_SQL = ("SELECT COUNT(*) FROM (SELECT 1 FROM reservations GROUP BY path, COALESCE(tag, '') "
                       "HAVING COUNT(*) > 1)")       # v1 stores untagged as NULL, v2 as ''
_DUPLICATE_PORTS_SQL = "SELECT COUNT(*) FROM (SELECT 1 FROM reservations GROUP BY port HAVING COUNT(*) > 1)"
_V2_COLUMNS = [("path", "TEXT", 1, 1), ("tag", "TEXT", 1, 2), ("port", "INTEGER", 1, 0),
               ("project", "TEXT", 0, 0), ("task", "TEXT", 0, 0), ("created_at", "INTEGER", 1, 0),
               ("last_used_at", "INTEGER", 1, 0)]


def _strict_supported():
    return _sqlite().sqlite_version_info >= (3, 37, 0)


# Leases live beside the reference's tables, which the Rust trop validates exactly (it ignores other tables).
# No foreign key: the Rust trop deletes rows it knows nothing of, and a dangling key would fail both validators;
# a lease whose row is gone, or is another row now, is simply over (Lease.holds).
_LEASES_SQL = ("CREATE TABLE IF NOT EXISTS trop_py_leases (path TEXT NOT NULL, tag TEXT NOT NULL, "
               "base_tag TEXT NOT NULL, slot INTEGER NOT NULL, port INTEGER NOT NULL, created_at INTEGER NOT NULL, "
               "pid INTEGER NOT NULL, start TEXT NOT NULL, boot TEXT NOT NULL, namespace TEXT NOT NULL, "
               "host TEXT NOT NULL, platform TEXT NOT NULL, leased_at INTEGER NOT NULL, adopted INTEGER NOT NULL, "
               "PRIMARY KEY (path, tag))")
_LEASE_COLUMNS = ("path, tag, base_tag, slot, port, created_at, pid, start, boot, namespace, host, platform, "
                  "leased_at, adopted")


def _table_sql(sql, name=None):
    if name:
        sql = sql.replace("CREATE TABLE %s " % name.split("_")[0], "CREATE TABLE %s " % name, 1)
    return sql + (" STRICT" if _strict_supported() else "")


def _is_lock_error(exc):
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Store:
    """One connection to trop.db; reads and writes of reservation rows.

    read_only: opened with mode=ro (the caller cannot write trop.db or its
    directory); snapshot: set when even that was impossible and the file is
    read as immutable (see open_readonly), so a reader must check
    snapshot_ok() before it trusts what it read.
    """

    commits = 0                 # transactions this process committed (error messages must not deny them)

    def __init__(self, conn, path, timeout, read_only=False, snapshot=None):
        self.conn = conn
        self.path = path
        self.timeout = timeout
        self.read_only = read_only
        self.snapshot = snapshot
        self.pid = os.getpid()
        self.identity = _file_identity(path)
        self._ports = None
        self._ports_version = None
        self._has_leases = False    # once the table exists it stays

    def is_current(self):
        """Still safe to use: same process, and trop.db is still the file this connection opened."""
        return self.pid == os.getpid() and self.identity == _file_identity(self.path)

    # -- opening --

    @classmethod
    def open(cls, directory, timeout=5, autoinit=True, network_ok=False, share="auto"):
        """Open (creating or migrating when needed) the database of a data directory, to write.

        What it creates is shared with the group when group_sharing() says so: the directory (if the one it is
        created in is shared), and trop.db, made empty and shared before SQLite opens it, because SQLite gives
        the -wal and -shm files the database file's mode.
        """
        path = os.path.join(directory, DB_FILE)
        check_local_filesystem(directory, network_ok)
        if not os.path.exists(path):
            if not autoinit:
                raise NoDataDirectory("Data directory not found: %s does not exist "
                                      "(use --data-dir, run `trop init`, or enable auto-init)" % path)
            try:
                if not os.path.isdir(directory):
                    os.makedirs(directory, exist_ok=True)
                    if group_sharing(os.path.dirname(os.path.abspath(directory)), share):
                        share_with_group(directory)
            except OSError as exc:
                raise _not_writable(directory, exc.strerror or exc)
            if not can_write(path):
                raise _not_writable(directory, "permission denied")
            if group_sharing(directory, share):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                    share_with_group(path)
                except FileExistsError:
                    pass                    # another process made it first
        elif not can_write(path):
            raise _not_writable(path, "read-only for this user")
        sqlite3 = _sqlite()
        with GroupUmask(group_sharing(directory, share)):           # -wal and -shm are made by the open
            try:
                conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise _database_error(exc, path, "opening, configuring, or migrating the database", timeout)
            store = cls(conn, path, timeout)
            try:
                store._check_schema()
            except sqlite3.Error as exc:
                conn.close()
                raise _database_error(exc, path, "opening, configuring, or migrating the database", timeout)
            except BaseException:
                conn.close()
                raise
        return store

    @classmethod
    def open_readonly(cls, directory, network_ok=False):
        """Open an existing trop.db only to read it: no lock taken, no file created, nothing changed.

        mode=ro reads a WAL database only while its -shm file exists or can
        be created.  In a directory the caller cannot write, with no writer
        connected (so no -shm), SQLite refuses; then the file is read with
        immutable=1, which is safe only because there is no -wal file: every
        committed transaction is in trop.db itself.  A writer that starts
        meanwhile would change trop.db's size, mtime or inode, or create a
        -wal, so Session.read() compares snapshot_ok() after reading and reads
        again (by then mode=ro works, through the writer's -shm).
        """
        path = os.path.join(directory, DB_FILE)
        check_local_filesystem(directory, network_ok)
        with GroupUmask(group_sharing(directory)):                  # a reader may make the -shm too
            conn, snapshot = _connect_readonly(path)
            store = cls(conn, path, 0, read_only=True, snapshot=snapshot)
            try:
                version = store.schema_version()
            except _sqlite().Error as exc:
                conn.close()
                raise _database_error(exc, path, "opening the database to read it", 0)
        if version == str(SCHEMA_VERSION):
            return store
        conn.close()
        if version is None:
            return cls.open_empty()         # a file with no tables holds no reservations
        number = _parse_version(version)
        if number is not None and number > SCHEMA_VERSION:
            raise LibraryError("unsupported schema version: expected %d, found %s" % (SCHEMA_VERSION, version))
        raise LibraryError("database schema migration required from version %s to %d: run any trop command that "
                           "writes, with write access to %s (this one only reads); the data was not modified"
                           % (version, SCHEMA_VERSION, path))

    def snapshot_ok(self):
        """False if an immutable read may have overlapped a writer (see open_readonly)."""
        return _snapshot_ok(self.path, self.snapshot)

    @classmethod
    def open_empty(cls):
        """An in-memory database with the schema: what a dry run plans against when trop.db is absent."""
        conn = _sqlite().connect(":memory:", isolation_level=None)
        store = cls(conn, ":memory:", 0)
        store._create_schema()
        return store

    def _configure(self):
        conn = self.conn
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL").fetchone()
                    break
                except _sqlite().OperationalError as exc:
                    if not _is_lock_error(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
        conn.execute("PRAGMA synchronous=NORMAL")

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transactions --

    def write(self, dry_run=False):
        """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK for a dry run or an error)."""
        return _Transaction(self, dry_run)

    # -- schema --

    def schema_version(self):
        try:
            row = self.conn.execute("SELECT value FROM metadata WHERE key = 'schema_version'").fetchone()
        except _sqlite().OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return None if row is None else row[0]

    def _check_schema(self):
        """Read the version first: a database trop must refuse is never touched (not even switched to WAL)."""
        version = self.schema_version()
        if version == str(SCHEMA_VERSION):
            self._configure()
            return
        if version is None:
            self._configure()
            with self.write():
                if self.schema_version() is None:
                    self._create_schema()
            return
        number = _parse_version(version)
        if number is not None and number > SCHEMA_VERSION:
            raise LibraryError("unsupported schema version: expected %d, found %s" % (SCHEMA_VERSION, version))
        if number == 1:
            problems = self._v1_preflight()
            if problems:
                raise _migration_blocked(problems)
            self._configure()
            self.migrate_v1()
            return
        raise LibraryError("database schema migration required from version %s to %d: no ordered migration "
                           "is available for this older schema version" % (version, SCHEMA_VERSION))

    def _create_schema(self):
        conn = self.conn
        conn.execute(_table_sql(_METADATA_SQL).replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
        conn.execute(_table_sql(_RESERVATIONS_SQL).replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
        for name, column in _INDEXES:
            conn.execute("CREATE INDEX IF NOT EXISTS %s ON reservations(%s)" % (name, column))
        conn.execute("INSERT OR REPLACE INTO metadata (key, value) VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))

    def migrate_v1(self):
        """Schema v1 -> v2 in one transaction, refusing data v2 cannot hold."""
        conn = self.conn
        conn.execute("PRAGMA synchronous=FULL")
        try:
            with self.write():
                if self.schema_version() != "1":
                    return                              # another process migrated first
                problems = self._v1_preflight()
                if problems:
                    raise _migration_blocked(problems)
                count = conn.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
                conn.execute(_table_sql(_METADATA_SQL, "metadata_v2"))
                conn.execute("INSERT INTO metadata_v2 (key, value) SELECT key, value FROM metadata")
                conn.execute(_table_sql(_RESERVATIONS_SQL, "reservations_v2"))
                conn.execute("INSERT INTO reservations_v2 (%s) SELECT path, COALESCE(tag, ''), port, project, "
                             "task, created_at, last_used_at FROM reservations" % _COLUMNS)
                copied = conn.execute("SELECT COUNT(*) FROM reservations_v2").fetchone()[0]
                if copied != count:
                    raise LibraryError("database migration from schema 1 to 2 blocked: copied %d of %d rows"
                                       % (copied, count))
                conn.execute("DROP TABLE reservations")
                conn.execute("DROP TABLE metadata")
                conn.execute("ALTER TABLE metadata_v2 RENAME TO metadata")
                conn.execute("ALTER TABLE reservations_v2 RENAME TO reservations")
                for name, column in _INDEXES:
                    conn.execute("CREATE INDEX %s ON reservations(%s)" % (name, column))
                conn.execute("UPDATE metadata SET value = '2' WHERE key = 'schema_version'")
                validate_schema(conn)
        finally:
            conn.execute("PRAGMA synchronous=NORMAL")

    def _v1_preflight(self):
        conn = self.conn
        if _table_columns(conn, "reservations") != _V1_COLUMNS or \
                [r[1] for r in conn.execute("PRAGMA table_info(metadata)")] != ["key", "value"]:
            return [("unexpected_v1_table_layout", 1)]
        staging = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name IN "
                               "('metadata_v2', 'reservations_v2')").fetchone()[0]
        checks = [
            ("staging_objects", None, staging),
            ("duplicate_keys", _DUPLICATE_KEYS_SQL, None),
            ("duplicate_ports", _DUPLICATE_PORTS_SQL, None),
            ("empty_tags", "SELECT COUNT(*) FROM reservations WHERE tag = ''", None),
            ("invalid_ports", "SELECT COUNT(*) FROM reservations WHERE typeof(port) != 'integer' "
                              "OR port < 1 OR port > 65535", None),
            ("invalid_timestamps", "SELECT COUNT(*) FROM reservations WHERE typeof(created_at) != 'integer' "
                                   "OR created_at < 0 OR typeof(last_used_at) != 'integer' "
                                   "OR last_used_at < 0", None),
            ("invalid_types", "SELECT COUNT(*) FROM reservations WHERE typeof(path) != 'text' OR typeof(tag) "
                              "NOT IN ('null', 'text') OR typeof(project) NOT IN ('null', 'text') "
                              "OR typeof(task) NOT IN ('null', 'text')", None),
            ("non_text_metadata", "SELECT COUNT(*) FROM metadata WHERE typeof(key) != 'text' "
                                  "OR typeof(value) != 'text'", None),
        ]
        problems = []
        for label, sql, value in checks:
            count = value if sql is None else conn.execute(sql).fetchone()[0]
            if count:
                problems.append((label, count))
        return problems

    # -- reads --

    def get(self, key):
        row = self.conn.execute(_SELECT + " WHERE path = ? AND tag = ?", (key.path, key.db_tag)).fetchone()
        return Reservation.from_row(row) if row else None

    def taken_ports(self):
        """Every reserved port (a PortSet the caller must not change).

        Re-read unless PRAGMA data_version shows that no other connection has
        committed since this connection last read them; this connection's own
        writes keep the cached set current.  Callers hold the transaction, so
        the answer is exactly what the database holds now.
        """
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if self._ports is None or version != self._ports_version:
            self._ports = PortSet(row[0] for row in self.conn.execute("SELECT port FROM reservations"))
            self._ports_version = version
        return self._ports

    def forget_cache(self):
        """After a rollback the cached ports (and a just-made leases table) may be writes that never happened."""
        self._ports = None
        self._has_leases = False

    def all(self):
        return [Reservation.from_row(r) for r in self.conn.execute(_SELECT + " ORDER BY path, tag")]

    def at_path(self, path):
        return [Reservation.from_row(r)
                for r in self.conn.execute(_SELECT + " WHERE path = ? ORDER BY tag", (path,))]

    def under(self, path):
        """Rows at path or any component-wise descendant ('/w/a' never matches '/w/ab')."""
        where, params = PLATFORM.paths.descendant_where(path)
        rows = self.conn.execute(_SELECT + " WHERE " + where + " ORDER BY path, tag", params)
        return [res for res in map(Reservation.from_row, rows) if is_within(res.path, path)]

    def for_port(self, port):
        row = self.conn.execute(_SELECT + " WHERE port = ?", (port,)).fetchone()
        return Reservation.from_row(row) if row else None

    def projects(self):
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT project FROM reservations WHERE project IS NOT NULL ORDER BY project")]

    def with_leases(self, rows):
        """rows, each held by a lease given .lease = (Lease, 'alive' | 'dead' | 'unknown')."""
        leases = self.leases()
        if not leases:
            return rows                 # the common case costs one query, not a key per row
        by_key = {r.key: r for r in rows}
        memo = {}
        for lease in leases:
            res = by_key.get(lease.key)
            if lease.holds(res):
                ident = (lease.holder.pid, lease.holder.start, lease.holder.host)
                if ident not in memo:
                    memo[ident] = lease.holder.state()
                res.lease = (lease, memo[ident])
        return rows

    def has_leases(self):
        if not self._has_leases:
            self._has_leases = self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trop_py_leases'").fetchone() is not None
        return self._has_leases

    def leases(self, path=None):
        """Every lease (at path), ordered by path, base tag and slot; none where the table was never made."""
        if not self.has_leases():
            return []
        where, params = ("", ()) if path is None else (" WHERE path = ?", (path,))
        return [Lease.from_row(row) for row in self.conn.execute(
            "SELECT %s FROM trop_py_leases%s ORDER BY path, base_tag, slot" % (_LEASE_COLUMNS, where), params)]

    # -- writes (inside a transaction) --

    def insert(self, res):
        try:
            self.conn.execute("INSERT INTO reservations (%s) VALUES (?, ?, ?, ?, ?, ?, ?)" % _COLUMNS, res.row())
            if self._ports is not None:
                self._ports.add(res.port)
        except _sqlite().IntegrityError as exc:
            raise LibraryError("reservation conflict: cannot store %s on port %d: %s" % (res.key, res.port, exc))

    def delete_exact(self, res):
        """Delete a row only if it is still exactly as planned (and any lease of it)."""
        cur = self.conn.execute(
            "DELETE FROM reservations WHERE path = ? AND tag = ? AND port = ? AND project IS ? AND task IS ? "
            "AND created_at = ? AND last_used_at = ?", res.row())
        if cur.rowcount and self._ports is not None:
            self._ports.discard(res.port)
        if cur.rowcount and self.has_leases():
            self.conn.execute("DELETE FROM trop_py_leases WHERE path = ? AND tag = ?", (res.path, res.tag or ""))
        return cur.rowcount

    def insert_lease(self, lease):
        if not self.has_leases():
            self.conn.execute(_table_sql(_LEASES_SQL))
            self._has_leases = True
        self.conn.execute("INSERT OR REPLACE INTO trop_py_leases (%s) VALUES (%s)"
                          % (_LEASE_COLUMNS, ", ".join("?" * 14)), lease.row())

    def delete_lease(self, lease):
        """End a lease (its holder's, and only if it still holds it); the reservation row is left alone."""
        if self.has_leases():
            self.conn.execute("DELETE FROM trop_py_leases WHERE path = ? AND tag = ? AND pid = ? AND start = ?",
                              (lease.path, lease.tag or "", lease.holder.pid, lease.holder.start))

    def update(self, res):
        self.conn.execute("UPDATE reservations SET project = ?, task = ?, last_used_at = ? "
                          "WHERE path = ? AND tag = ?",
                          (res.project, res.task, res.last_used_at, res.path, res.tag or ""))

    def touch(self, res):
        self.conn.execute("UPDATE reservations SET last_used_at = ? WHERE path = ? AND tag = ?",
                          (res.last_used_at, res.path, res.tag or ""))


def _migration_blocked(problems):
    return LibraryError("database migration from schema 1 to 2 blocked: %s; the database was not modified"
                        % "; ".join("%s=%d" % p for p in problems))


# Filesystems where SQLite's WAL (shared memory between processes) is unsafe: network and most FUSE mounts.
_NETWORK_FILESYSTEMS = frozenset(("nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
                                  "lustre", "gpfs", "beegfs", "davfs", "vboxsf", "vmhgfs", "fuse"))


def mount_of(path, proc_root=None):
    """(filesystem type, mount point) of the mount holding path (or its nearest existing parent).

    Linux only (the mount table in /proc/self/mountinfo); None elsewhere or
    when the table cannot be read.
    """
    try:
        with open(os.path.join(proc_root or PROC_ROOT, "self", "mountinfo"), encoding="utf-8",
                  errors="surrogateescape") as fh:
            table = fh.read().splitlines()
    except OSError:
        return None
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    path = os.path.realpath(path)
    best = None
    for line in table:
        fields = line.split(" ")
        try:
            point, fstype = fields[4], fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        if is_within(path, point) and (best is None or len(point) >= len(best[1])):
            best = (fstype, point)
    return best


def is_network_filesystem(fstype):
    return fstype in _NETWORK_FILESYSTEMS or (fstype.startswith("fuse.") and fstype != "fuse.lxcfs")


def check_local_filesystem(directory, allowed=False):
    """Refuse a data directory where WAL is unsafe, unless TROP_ALLOW_NETWORK_FS says every user is on one host."""
    if allowed:
        return
    mount = mount_of(directory)
    if mount and is_network_filesystem(mount[0]):
        raise ConfigError("the data directory %s is on a %s filesystem (mounted at %s), where SQLite's WAL mode is "
                          "unsafe: use a local data directory (--data-dir DIR or TROP_DATA_DIR=DIR), or set "
                          "TROP_ALLOW_NETWORK_FS=1 if only one machine ever uses it" % (directory, mount[0], mount[1]))


def _file_identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_signature(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _kept_changing(path):
    return LibraryError("database error: %s kept changing while it was read without a lock; retry" % path)


def _snapshot_ok(path, snapshot):
    return snapshot is None or (snapshot == _file_signature(path) and not os.path.exists(path + "-wal"))


def can_write(path):
    """Whether this user may write path (or create it, and its missing directories) and the files beside it
    (SQLite's -wal and -shm)."""
    if os.path.exists(path):
        return os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK)
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return os.access(directory, os.W_OK | os.X_OK)


def _not_writable(path, why):
    return LibraryError("database error: cannot write %s (%s); reservations need a data directory this user can "
                        "write: use --data-dir DIR or TROP_DATA_DIR=DIR" % (path, why))


def _connect_readonly(path):
    """(connection, snapshot): mode=ro, else immutable=1 where that is safe (see Store.open_readonly)."""
    sqlite3 = _sqlite()
    full = os.path.abspath(path)
    if PLATFORM.name == "windows":
        full = "/" + full.replace("\\", "/")        # file:/C:/x/trop.db
    uri = "file:/%s?mode=ro" % _url_quote(os.fsencode(full.lstrip("/")), safe="/:")   # '//x' is no authority
    if not os.access(path, os.R_OK):
        raise LibraryError("database error: cannot read %s (permission denied); ask its owner for read access, or "
                           "use a data directory of your own: --data-dir DIR or TROP_DATA_DIR=DIR" % path)
    conn = None
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0, check_same_thread=False)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn, None
    except sqlite3.OperationalError as exc:
        cause = exc
    if conn is not None:
        conn.close()
    snapshot = _file_signature(path)
    if "readonly" not in str(cause) or os.path.exists(path + "-wal"):
        raise _database_error(cause, path, "opening the database to read it", 0)
    try:
        return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, timeout=0,
                               check_same_thread=False), snapshot
    except sqlite3.Error as exc:
        raise _database_error(exc, path, "opening the database to read it", 0)


def _parse_version(text):
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def _table_columns(conn, table):
    return [(r[1], r[2].upper(), r[3], r[5]) for r in conn.execute("PRAGMA table_info(%s)" % table)]


class _Transaction:
    def __init__(self, store, dry_run):
        self.store = store
        self.dry_run = dry_run

    def __enter__(self):
        sqlite3 = _sqlite()
        try:
            self.store.conn.execute("BEGIN" if self.store.read_only else "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_lock_error(exc):
                raise LockTimeout("starting an immediate database transaction", self.store.timeout)
            raise _database_error(exc, self.store.path, "starting a transaction", self.store.timeout)
        return self.store

    def __exit__(self, exc_type, exc, tb):
        conn = self.store.conn
        if exc_type is None and not self.dry_run:
            try:
                conn.execute("COMMIT")
                return False
            except _sqlite().Error as err:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.store.forget_cache()
                raise _database_error(err, self.store.path, "committing the transaction", self.store.timeout)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        self.store.forget_cache()
        return False


def _database_error(exc, path, operation, timeout):
    """Turn a sqlite3 exception into the TropError a user can act on."""
    text = str(exc)
    if _is_lock_error(exc):
        return LockTimeout(operation, timeout)
    found = _sqlite().sqlite_version_info
    if "malformed database schema" in text and found < (3, 37, 0):
        return LibraryError("database error: %s has STRICT tables, which need SQLite 3.37 or newer, and this Python "
                            "uses SQLite %s; run trop with a Python built with a newer SQLite (`python3 -c \"import "
                            "sqlite3; print(sqlite3.sqlite_version)\"` shows it); trop did not modify the database"
                            % (path, ".".join(map(str, found))))
    if "not a database" in text or "malformed" in text:
        return LibraryError("database error: %s is not a valid trop database (%s). Move it aside or point "
                            "--data-dir elsewhere; trop did not modify it" % (path, text))
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return _not_writable(path, text)
    return LibraryError("database error: %s" % text)


def _sql_tokens(sql):
    """Tokens of a CREATE statement, case- and quoting-insensitive, for schema comparison."""
    tokens = re.findall(r'"[^"]*"|`[^`]*`|\[[^\]]*\]|\'[^\']*\'|[A-Za-z_][A-Za-z0-9_]*|\d+|>=|<=|!=|\S', sql)
    out = []
    for tok in tokens:
        if tok[0] in "\"`[":
            tok = tok[1:-1]
        out.append(tok.upper())
    if out[2:5] == ["IF", "NOT", "EXISTS"]:
        del out[2:5]
    return out


def validate_schema(conn):
    """The checks of `assert-data-dir --validate`, in order; raise on the first failure."""
    def fail(message):
        raise LibraryError("database validation failed: %s" % message)

    if [r[1] for r in conn.execute("PRAGMA table_info(metadata)")] != ["key", "value"]:
        fail("metadata table must have exactly the columns key, value")
    rows = conn.execute("SELECT value, typeof(value) FROM metadata WHERE key = 'schema_version'").fetchall()
    if len(rows) != 1:
        fail("metadata must contain exactly one schema_version row (found %d)" % len(rows))
    value, sql_type = rows[0]
    number = _parse_version(value) if sql_type == "text" else None
    if number is None:
        fail("schema_version must be a text integer, found %r" % (value,))
    if number < SCHEMA_VERSION:
        raise LibraryError("database schema migration required from version %d to %d: run any trop command "
                           "that writes to migrate it" % (number, SCHEMA_VERSION))
    if number > SCHEMA_VERSION:
        raise LibraryError("unsupported schema version: expected %d, found %d" % (SCHEMA_VERSION, number))
    for table, sql, columns in (("metadata", _METADATA_SQL, [("key", "TEXT", 1, 1), ("value", "TEXT", 1, 0)]),
                                ("reservations", _RESERVATIONS_SQL, _V2_COLUMNS)):
        if _table_columns(conn, table) != columns:
            fail("table %s has unexpected columns, types or NOT NULL constraints" % table)
        stored = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (table,)).fetchone()[0]
        tokens = _sql_tokens(stored)
        if tokens[-1:] == ["STRICT"]:       # tables made by an SQLite older than 3.37 lack it
            tokens = tokens[:-1]
        if tokens != _sql_tokens(sql):
            fail("table %s definition differs from the canonical schema" % table)
    for row in conn.execute("SELECT key, value, typeof(key), typeof(value) FROM metadata"):
        if row[2] != "text" or row[3] != "text":
            fail("metadata row %r has non-text values" % (row[0],))
    for row in conn.execute(_SELECT):
        Reservation.from_row(row)
    if conn.execute(_DUPLICATE_KEYS_SQL).fetchone()[0]:
        fail("duplicate (path, tag) keys")
    if conn.execute(_DUPLICATE_PORTS_SQL).fetchone()[0]:
        fail("duplicate ports")
    indexes = {r[1]: r for r in conn.execute("PRAGMA index_list(reservations)")}
    for name, column in _INDEXES:
        info = indexes.get(name)
        if info is None:
            fail("index %s is missing" % name)
        if info[2] or info[4]:
            fail("index %s must be non-unique and non-partial" % name)
        cols = conn.execute("PRAGMA index_xinfo(%s)" % name).fetchall()
        keys = [c for c in cols if c[5]]
        if len(keys) != 1 or keys[0][2] != column or keys[0][3] or (keys[0][4] or "BINARY").upper() != "BINARY":
            fail("index %s must be a single ascending BINARY index on %s" % (name, column))
    unique_sets = set()
    for name, info in indexes.items():
        if info[2]:
            unique_sets.add(tuple(c[2] for c in conn.execute("PRAGMA index_info(%s)" % name)))
    if ("path", "tag") not in unique_sets:
        fail("the primary key index on (path, tag) is missing")
    if ("port",) not in unique_sets:
        fail("the unique index on port is missing")
    if conn.execute("PRAGMA foreign_key_check").fetchall():
        fail("foreign key check failed")
    result = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if result != "ok":
        raise CorruptionError("integrity_check reported: %s" % result)


def validate_data_dir(directory, network_ok=False):
    """Read-only validation of <directory>/trop.db; never creates or changes anything."""
    sqlite3 = _sqlite()
    path = os.path.join(directory, DB_FILE)
    check_local_filesystem(directory, network_ok)
    if not os.path.isfile(path):
        raise LibraryError("database validation failed: %s does not exist" % path)
    for _attempt in range(3):
        conn, snapshot = _connect_readonly(path)
        try:
            validate_schema(conn)
        except (TropError, sqlite3.Error) as exc:
            if not _snapshot_ok(path, snapshot):
                continue                        # a torn read of a file a writer was changing: read again
            if isinstance(exc, TropError):
                raise
            raise _database_error(exc, path, "opening and validating the database", 0)
        finally:
            conn.close()
        if _snapshot_ok(path, snapshot):
            return
    raise _kept_changing(path)


# --- Occupancy ---------------------------------------------------------------

_PROC_NET_FILES = (("tcp", "ipv4", "tcp"), ("tcp6", "ipv6", "tcp"),
                   ("udp", "ipv4", "udp"), ("udp6", "ipv6", "udp"))
_TCP_LISTEN, _TCP_TIME_WAIT = "0A", "06"


class OwnerTable:
    """Socket table built once per scan; lookups are in-memory.

    Linux reads /proc/net/{tcp,tcp6,udp,udp6}; the expensive inode -> pid map
    (a walk over every /proc/<pid>/fd) is built lazily, once, on the first
    lookup that matches a socket.  Elsewhere `lsof` is run once if present.
    Every failure degrades to "unknown" instead of raising: owner metadata
    must never break a scan.
    """

    def __init__(self, proc_root=None, use_lsof=None):
        self._proc_root = proc_root = proc_root or PROC_ROOT
        self._use_lsof = use_lsof
        # (protocol, family, port) -> [(rank, uid, inode, pid, local address)]; rank 0 = LISTEN (or bound UDP)
        self._sockets = {}
        self._inode_pids = None          # inode -> [pid], filled lazily
        self._lingering = set()          # (protocol, family, port) of closed TCP connections in TIME_WAIT
        self._names = {}                 # pid -> process name
        self._users = {}                 # uid -> user name
        try:
            if use_lsof is None:
                use_lsof = not sys.platform.startswith("linux")
            if os.path.isdir(os.path.join(proc_root, "net")):
                self._load_proc_net()
            elif PLATFORM.name == "windows":
                self._load_netstat()
            elif use_lsof:
                self._load_lsof()
        except Exception:                # never raise: empty table instead
            self._sockets = {}

    # -- building --------------------------------------------------------
    def _add(self, protocol, family, port, rank, uid, inode, pid, address=None):
        self._sockets.setdefault((protocol, family, port), []).append(
            (rank, uid, inode, pid, address))

    def _load_proc_net(self):
        for fname, family, protocol in _PROC_NET_FILES:
            try:
                with open(os.path.join(self._proc_root, "net", fname),
                          encoding="ascii", errors="replace") as fh:
                    lines = fh.read().splitlines()[1:]   # skip header
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                try:
                    hex_address, hex_port = parts[1].rsplit(":", 1)
                    port = int(hex_port, 16)
                    state, uid, inode = parts[3], int(parts[7]), int(parts[9])
                except (IndexError, ValueError):
                    continue                             # malformed line
                if inode == 0:
                    if state == _TCP_TIME_WAIT:
                        self._lingering.add((protocol, family, port))
                    continue     # TIME_WAIT & co: no owner, uid is bogus 0
                rank = 0 if (protocol == "udp" or state == _TCP_LISTEN) else 1
                self._add(protocol, family, port, rank, uid, inode, None, _proc_net_address(hex_address))

    def _load_lsof(self):
        subprocess = _subprocess()
        exe = _lsof()
        if not exe:
            return
        try:
            out = subprocess.run(
                [exe, "+c", "0", "-nP", "-iTCP", "-iUDP", "-FpcuLftPnT"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return
        self._parse_lsof(out.decode("utf-8", "replace"))

    def _parse_lsof(self, text):
        """Parse `lsof -F pcuLftPnT` output (one tagged field per line)."""
        proc, f = {}, {}

        def flush():
            if f.get("P") in ("TCP", "UDP") and f.get("n") and "p" in proc:
                local = f["n"].split("->", 1)[0]
                port = local.rsplit(":", 1)[-1]
                family = {"IPv4": "ipv4", "IPv6": "ipv6"}.get(f.get("t"))
                if port.isdigit() and family:
                    protocol = f["P"].lower()
                    listen = protocol == "udp" or "ST=LISTEN" in f.get("T", ())
                    uid = proc.get("u")
                    self._add(protocol, family, int(port), 0 if listen else 1,
                              uid, None, proc["p"], local.rsplit(":", 1)[0].strip("[]"))
            f.clear()

        for line in text.splitlines():
            tag, val = line[:1], line[1:]
            if tag == "p":
                flush()
                proc.clear()
                if val.isdigit():
                    proc["p"] = int(val)
            elif tag == "f":
                flush()
                f["f"] = val
            elif tag in ("c", "u", "L") and "p" in proc:
                if tag == "c":
                    self._names[proc["p"]] = val
                elif tag == "u" and val.isdigit():
                    proc["u"] = int(val)
                elif tag == "L" and "u" in proc:
                    self._users[proc["u"]] = val
            elif tag == "T":
                f.setdefault("T", []).append(val)
            elif tag in ("t", "P", "n"):
                f[tag] = val
        flush()

    def _load_netstat(self):
        """Windows: `netstat -ano` for the sockets and their pids, `tasklist` for the process names."""
        subprocess = _subprocess()

        def output(*argv):
            try:
                return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL, timeout=10).stdout.decode("utf-8", "replace")
            except (OSError, subprocess.SubprocessError):
                return ""
        self._parse_netstat(output("netstat", "-ano"))
        self._parse_tasklist(output("tasklist", "/FO", "CSV", "/NH"))

    def _parse_netstat(self, text):
        """Rows of `netstat -ano` (any language): a TCP socket listens when its foreign address is all zeros."""
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[0] not in ("TCP", "UDP") or not fields[-1].isdigit():
                continue
            address, _, port = fields[1].rpartition(":")
            if not port.isdigit():
                continue
            family = "ipv6" if address.startswith("[") else "ipv4"
            protocol = fields[0].lower()
            listening = protocol == "udp" or fields[2] in ("0.0.0.0:0", "[::]:0")
            self._add(protocol, family, int(port), 0 if listening else 1, None, None, int(fields[-1]),
                      address.strip("[]").split("%")[0])

    def _parse_tasklist(self, text):
        """`tasklist /FO CSV /NH`: "image.exe","pid",... -> process names."""
        for row in text.splitlines():
            cells = [cell.strip('"') for cell in row.split('","')]
            if len(cells) >= 2 and cells[1].isdigit():
                self._names[int(cells[1])] = cells[0]

    def _scan_fds(self):
        """Map socket inodes to pids via /proc/<pid>/fd; unreadable pids skipped."""
        wanted = set(e[2] for es in self._sockets.values() for e in es if e[2])
        result = {}
        try:
            pids = [int(d) for d in os.listdir(self._proc_root) if d.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            fd_dir = os.path.join(self._proc_root, str(pid), "fd")
            try:
                fds = os.listdir(fd_dir)
            except OSError:      # PermissionError / FileNotFoundError / exited
                continue
            for fd in fds:
                try:
                    link = os.readlink(os.path.join(fd_dir, fd))
                except OSError:
                    continue
                if link.startswith("socket:[") and link.endswith("]"):
                    try:
                        inode = int(link[8:-1])
                    except ValueError:
                        continue
                    if inode in wanted:
                        result.setdefault(inode, []).append(pid)
        self._inode_pids = result

    # -- lookups ---------------------------------------------------------
    def _pids_for(self, inode):
        if self._inode_pids is None:
            try:
                self._scan_fds()
            except Exception:
                self._inode_pids = {}
        return self._inode_pids.get(inode, ())

    def _name(self, pid):
        if pid is None:
            return None
        if pid not in self._names:
            name = None
            try:
                with open(os.path.join(self._proc_root, str(pid), "comm"),
                          encoding="utf-8", errors="replace") as fh:
                    name = fh.read().strip() or None
            except OSError:
                pass
            self._names[pid] = name
        return self._names[pid]

    def _user(self, uid):
        if uid is None:
            return None
        if uid not in self._users:
            self._users[uid] = user_name(uid)
        return self._users[uid]

    def lookup(self, protocol, family, port):
        """protocol 'tcp'|'udp', family 'ipv4'|'ipv6' -> (pid, name, user).

        Each element is None when unknown. LISTEN sockets beat others for TCP;
        the smallest pid wins. If the family has no match, the other family is
        tried (a dual-stack socket blocks the other family's bind too).
        """
        try:
            other = "ipv4" if family == "ipv6" else "ipv6"
            entries = (self._sockets.get((protocol, family, port))
                       or self._sockets.get((protocol, other, port)))
            if not entries:
                return (None, None, None)
            best = min(e[0] for e in entries)
            cands = [e for e in entries if e[0] == best]
            pid = uid = None
            for _rank, euid, inode, epid, _address in cands:
                for p in ([epid] if epid is not None else self._pids_for(inode)):
                    if pid is None or p < pid:
                        pid, uid = p, euid
            if pid is None:
                uid = cands[0][1]
            return (pid, self._name(pid), self._user(uid))
        except Exception:
            return (None, None, None)

    def listeners(self, port):
        """Every socket listening on port (TCP LISTEN, bound UDP), with its owner where the OS says:
        [{protocol, family, address, pid, process, user, cwd}], TCP first, then by address and pid."""
        out = []
        for protocol in ("tcp", "udp"):
            for family in ("ipv4", "ipv6"):
                for rank, uid, inode, pid, address in self._sockets.get((protocol, family, port), ()):
                    if rank:
                        continue
                    for owner in ([pid] if pid is not None else list(self._pids_for(inode)) or [None]):
                        out.append({"protocol": protocol, "family": family, "address": address, "pid": owner,
                                    "process": self._name(owner), "user": self._user(uid), "cwd": self.cwd(owner)})
        out.sort(key=lambda entry: (entry["protocol"], entry["address"] or "", entry["pid"] or 0))
        return out

    def lingering(self, port):
        """Whether closed TCP connections of port are still in TIME_WAIT (a bind without SO_REUSEADDR fails)."""
        return any((protocol, family, port) in self._lingering for protocol in ("tcp",) for family in ("ipv4", "ipv6"))

    def cwd(self, pid):
        """The working directory of pid where it can be read (Linux /proc, else lsof), or None."""
        if pid is None:
            return None
        try:
            return key_text(os.readlink(os.path.join(self._proc_root, str(pid), "cwd")))
        except OSError:
            pass
        exe = _lsof() if self._use_lsof or (self._use_lsof is None and not sys.platform.startswith("linux")) else None
        if not exe:
            return None
        try:
            out = _subprocess().run([exe, "-a", "-p", str(pid), "-d", "cwd", "-Fn"], stdout=_subprocess().PIPE,
                                    stderr=_subprocess().DEVNULL, stdin=_subprocess().DEVNULL, timeout=5).stdout
        except (OSError, _subprocess().SubprocessError):
            return None
        names = [line[1:] for line in out.decode("utf-8", "replace").splitlines() if line.startswith("n")]
        return names[0] if names else None


def _lsof():
    """lsof's path, also where PATH lacks it (macOS keeps it in /usr/sbin), or None."""
    return _shutil().which("lsof") or next((p for p in ("/usr/sbin/lsof", "/usr/bin/lsof") if os.access(p, os.X_OK)),
                                           None)


def _proc_net_address(text):
    """The local address of a /proc/net/tcp line ('0100007F' -> '127.0.0.1'): 32-bit words in host order."""
    try:
        raw = bytes.fromhex(text)
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
        return _socket().inet_ntop(_socket().AF_INET if len(raw) == 4 else _socket().AF_INET6, words)
    except (ValueError, OSError):
        return None


def owner_status(pid, name, user):
    """'available' if all three are known, 'unavailable' if none, else 'partial'."""
    known = sum(v is not None for v in (pid, name, user))
    return "available" if known == 3 else ("unavailable" if known == 0 else "partial")


class Occupancy:
    """bind()-only probes of the policy's matrix, with per-port memory.

    A probe that fails because the host lacks the address family or address
    is not applicable; EACCES, EPERM and anything unexpected make the port
    "possibly occupied": it is skipped, never handed out.
    """

    def __init__(self, policy):
        self.probes = policy.probes()
        self.failures = []          # (port, probe description, error text)
        self._cache = {}

    def occupied(self, port):
        """True if any probe finds the port in use (or cannot tell)."""
        if not self.probes:
            return False
        found, failed = self.probe(port)
        return bool(found or failed)

    def probe(self, port):
        """(probes that found port in use, [(failed probe, error text)]), probed once per port."""
        state = self._cache.get(port)
        if state is None:
            state = self._cache[port] = probe_port(port, self.probes)
            self.failures.extend((port, probe, error) for probe, error in state[1])
        return state


# A probe that fails with one of these cannot apply on this host (no such family or address).
_NOT_APPLICABLE = frozenset(getattr(errno, name) for name in (
    "EAFNOSUPPORT", "EADDRNOTAVAIL", "EPROTONOSUPPORT", "EPFNOSUPPORT", "ESOCKTNOSUPPORT") if hasattr(errno, name))


def describe_probe(probe):
    proto, family, scope, address = probe
    return "%s %s %s at %s" % (proto.upper(), "IPv4" if family == "ipv4" else "IPv6", scope, address)


def probe_port(port, probes):
    """Run each probe: (occupied probes, [(failed probe, error text)])."""
    socket = _socket()
    occupied, failed = [], []
    for probe in probes:
        proto, family, _scope, address = probe
        af = socket.AF_INET if family == "ipv4" else socket.AF_INET6
        sock_type = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        try:
            sock = socket.socket(af, sock_type)
        except OSError as exc:
            if exc.errno not in _NOT_APPLICABLE:
                failed.append((probe, str(exc)))
            continue
        try:
            if proto == "tcp" and PLATFORM.reuse_address:     # closed connections in TIME_WAIT do not count
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                occupied.append(probe)
            elif exc.errno not in _NOT_APPLICABLE:
                failed.append((probe, str(exc)))
        finally:
            sock.close()
    return occupied, failed


SCAN_FIELDS = ("port", "status", "reserved", "protocol", "address_family", "scope", "address",
               "process_id", "process_name", "user", "owner_status")


def scan_ports(port_range, policy, reserved, owners=None, failures=None):
    """One dict per occupied probe, ordered by port then probe order; owners looked up once per scan.

    A probe that failed (EACCES below 1024 for non-root users, say) proves
    nothing either way: it is not a row, but is appended to `failures`.
    """
    probes = policy.probes()
    rows = []
    for port in port_range:
        found, failed = probe_port(port, probes)
        if failures is not None:
            failures.extend((port, probe, err) for probe, err in failed)
        for probe in found:
            if owners is None:
                owners = OwnerTable()
            proto, family, scope, address = probe
            pid, name, user = owners.lookup(proto, family, port)
            is_reserved = port in reserved
            rows.append({"port": port, "status": "occupied (reserved)" if is_reserved else "occupied",
                         "reserved": is_reserved, "protocol": proto, "address_family": family, "scope": scope,
                         "address": address, "process_id": pid, "process_name": name, "user": user,
                         "owner_status": owner_status(pid, name, user)})
    return rows


def unreserved_occupied(rows):
    return sorted({r["port"] for r in rows if not r["reserved"]})


def occupancy_evidence(port, policy, owners=None):
    """The probes that find port in use (or failed), in matrix order, with their owners; None if no probe runs."""
    probes = policy.probes()
    if not probes:
        return None
    found, failed = probe_port(port, probes)
    evidence = []
    for probe in sorted(found + [p for p, _e in failed], key=probes.index):
        owners = owners or OwnerTable()
        pid, name, user = owners.lookup(probe[0], probe[1], port)
        evidence.append({"probe": probe, "failed": probe not in found, "pid": pid, "process": name, "user": user})
    return evidence


# --- Allocation --------------------------------------------------------------

# The WHATWG Fetch standard's "bad ports": browsers refuse to connect to them (Chrome: ERR_UNSAFE_PORT).
UNSAFE_PORTS = frozenset((
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103, 104, 109,
    110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513, 514, 515, 526, 530,
    531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190,
    5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080))


class Skips:
    """What automatic allocation passes over besides reserved ports, and why: built once per command.

    Excluded ports (configuration), unsafe ports (browsers refuse them,
    unless allow_unsafe_ports), ports the OS reserves (read on the first
    question that needs them) and occupied ports (probes).  A port a user
    asks for by number is checked only for what would make it fail
    (reserved, excluded, occupied); unsafe and OS-reserved ports are then
    given with a caution.
    """

    REASONS = ("reserved", "excluded", "unsafe", "OS-reserved", "occupied")

    def __init__(self, exclusions, occupancy, avoid_unsafe=True, os_reserved=None):
        self.exclusions = exclusions
        self.occupancy = occupancy
        self.unsafe = UNSAFE_PORTS if avoid_unsafe else frozenset()
        # an ExclusionList, or what reads it when first needed
        self._os_reserved = os_reserved_ports if os_reserved is None else os_reserved

    @classmethod
    def of(cls, config):
        return cls(config.exclusions, Occupancy(config.occupancy), not config["allow_unsafe_ports"],
                   lambda: config.os_reserved)

    @property
    def os_reserved(self):
        if callable(self._os_reserved):
            self._os_reserved = self._os_reserved()
        return self._os_reserved

    def cautions(self, port):
        """Warnings for a port given by number that automatic allocation would have passed over."""
        out = []
        if port in UNSAFE_PORTS:
            out.append("port %d is on the browsers' bad-port list (WHATWG Fetch): browsers refuse to connect to it"
                       % port)
        if port in self.os_reserved:
            out.append("port %d is reserved by the operating system (%s)" % (port, _OS_RESERVED_WHERE[PLATFORM.name]))
        return out

    def refusal(self, port, taken, ignore_exclusions=False, ignore_occupied=False):
        """Why a port given by number cannot be used ('reserved', 'excluded', 'occupied'), or None."""
        if port in taken:
            return "reserved"
        if not ignore_exclusions and port in self.exclusions:
            return "excluded"
        if not ignore_occupied and self.occupancy.occupied(port):
            return "occupied"
        return None

    def first_free(self, port_range, taken):
        """The lowest port of the range that nothing rules out, or None (census() then says why).

        Runs of reserved, excluded or OS-reserved ports are skipped in one
        step, so the cost does not grow with the number of reservations
        below the answer.
        """
        port, top = port_range.min, port_range.max
        while port <= top:
            if port in taken:
                port = taken.next_unreserved(port)
            elif port in self.exclusions:
                port = self.exclusions.end_of(port) + 1
            elif port in self.os_reserved:
                port = self.os_reserved.end_of(port) + 1
            elif port in self.unsafe or self.occupancy.occupied(port):
                port += 1
            else:
                return port
        return None

    def classify(self, port, taken):
        """The first reason automatic allocation passes over port (see REASONS), or None: it is free."""
        if port in taken:
            return "reserved"
        if port in self.exclusions:
            return "excluded"
        if port in self.unsafe:
            return "unsafe"
        if port in self.os_reserved:
            return "OS-reserved"
        if self.occupancy.occupied(port):
            return "occupied"
        return None

    def census(self, port_range, taken):
        """Blockers counting why each port of the range is passed over (for an error that explains itself).

        Only ports nothing else rules out are probed, so after first_free()
        the probes are all remembered."""
        blockers = Blockers()
        for port in port_range:
            reason = self.classify(port, taken)
            if reason:
                blockers.add(reason, 1, port if reason == "occupied" else None)
        if blockers.occupied:
            blockers.name_owners(OwnerTable())
        return blockers


class Blockers:
    """Why the ports of a range were passed over, for messages that explain themselves."""

    def __init__(self):
        self.counts = dict.fromkeys(Skips.REASONS, 0)
        self.occupied = []          # the first occupied ports, to name their owners
        self.owners = {}            # port -> (pid, process name), where the OS says

    def add(self, reason, count, port=None):
        self.counts[reason] += count
        if port is not None and len(self.occupied) < 3:
            self.occupied.append(port)

    def name_owners(self, owners):
        """Look up who holds the first occupied ports (an OwnerTable), so the message can name them."""
        for port in self.occupied:
            pid, name = owners.lookup("tcp", "ipv4", port)[:2]
            if pid is None:
                pid, name = owners.lookup("udp", "ipv4", port)[:2]
            if pid is not None:
                self.owners[port] = (pid, name)

    def __str__(self):
        parts = []
        for reason in Skips.REASONS:
            if self.counts[reason]:
                parts.append("%d %s%s" % (self.counts[reason], reason,
                                          " (%s)" % self._occupied_text() if reason == "occupied" else ""))
        return ", ".join(parts) or "nothing in the range"

    def _occupied_text(self):
        """'5003 by pid 812 node, 5004': the first occupied ports and their owners."""
        out = ["%d by pid %d %s" % (port, self.owners[port][0], self.owners[port][1] or "?")
               if port in self.owners else str(port) for port in self.occupied]
        more = self.counts["occupied"] - len(self.occupied)
        return ", ".join(out) + (", ..." if more > 0 else "")


def port_notes(port, config):
    """What port-info says about a port besides its reservation: unsafe, OS-reserved, ephemeral."""
    notes = Skips.of(config).cautions(port)
    ephemeral = ephemeral_range()
    if ephemeral and port in ephemeral:
        notes.append("port %d is in the ephemeral range %s: the OS may give it to an outgoing connection first"
                     % (port, ephemeral))
    return notes


def range_warnings(port_range, ephemeral=None):
    """validate's and doctor's warning about a range the OS also uses for outgoing connections."""
    ephemeral = ephemeral_range() if ephemeral is None else ephemeral
    if ephemeral and port_range.min <= ephemeral.max and ephemeral.min <= port_range.max:
        overlap = PortRange(max(port_range.min, ephemeral.min), min(port_range.max, ephemeral.max))
        return ["the range %s overlaps the ephemeral range %s in %d port(s) (%s): the OS may give them to outgoing "
                "connections, so a server can find its port taken" % (port_range, ephemeral, len(overlap), overlap)]
    return []


def preference_refusal(req, taken, skips):
    """Why the preferred port of a request cannot be had ('outside the range ...', 'reserved', 'excluded',
    'occupied'), or None."""
    if req.preferred not in req.port_range:
        return "outside the range %s" % req.port_range
    return skips.refusal(req.preferred, taken, req.ignore_exclusions or req.force, req.ignore_occupied or req.force)


def allocate_single(req, taken, skips):
    """Preferred port if usable, else the lowest free port: (port or None, cautions)."""
    if req.preferred is not None and preference_refusal(req, taken, skips) is None:
        return req.preferred, skips.cautions(req.preferred)
    return skips.first_free(req.port_range, taken), []


# --- Sessions: what every command resolves first -------------------------------

def resolve_data_dir(explicit=None, environ=None):
    """--data-dir > TROP_DATA_DIR > $HOME/.trop > $USERPROFILE/.trop (verbatim, not normalized)."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        try:
            explicit = os.fsdecode(os.fspath(explicit))
        except TypeError:
            raise InvalidArguments("Invalid arguments: data_dir must be a path, got %s" % type(explicit).__name__)
        if not explicit:
            raise ConfigError("validation error for 'data_dir (%s)': the data directory must not be empty"
                              % CLI_SOURCE)
        return explicit
    if environ.get("TROP_DATA_DIR"):
        return environ["TROP_DATA_DIR"]
    home = environ.get("HOME") or environ.get("USERPROFILE")
    if not home:
        raise ConfigError("cannot determine the data directory: HOME is not set; "
                          "use --data-dir or TROP_DATA_DIR")
    return os.path.join(home, ".trop")


class _Serialized:
    """Hold a lock if there is one (a Trop handle shared by threads); otherwise do nothing."""

    __slots__ = ("lock",)

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()


class Session:
    """What every command resolves first: working directory, data directory, configuration.

    scope: "discover" (user config + nearest trop.yaml/trop.local.yaml),
    "file" (user config + one named file), "init" (environment and flags only)
    or None (no configuration at all).
    """

    def __init__(self, options=None, scope="discover", environ=None, config_file=None, keep_open=False):
        opts = dict(options or {})
        self.options = opts
        self.keep_open = keep_open
        self._store = None
        self._lock = None
        if keep_open:                       # one shared connection: one call at a time
            import threading
            self._lock = threading.RLock()
        self.environ = os.environ if environ is None else environ
        self.cwd = current_dir()
        self.quiet = bool(opts.get("quiet"))
        self.verbose = bool(opts.get("verbose")) and not self.quiet
        self._data_dir = resolve_data_dir(opts["data_dir"]) if opts.get("data_dir") is not None else None
        self.config = None
        self.project_dir = None
        if scope is None:
            return
        flags = cli_layer(opts)             # read first: a bad --min is exit 4 before any file's exit 7
        layers = []
        if scope in ("discover", "file"):
            layers += user_layer(self.data_dir)
        if scope == "discover":
            self.project_dir = find_project_dir(os.path.realpath(os_path(self.cwd)))
            if self.project_dir:
                layers += project_layers(self.project_dir)
        elif scope == "file":
            self.project_dir = os.path.dirname(config_file)
            layers += project_layers(self.project_dir, only_file=config_file)
        layers += [env_layer(self.environ), flags]
        self.config = Config(layers).validate()

    @property
    def data_dir(self):
        if self._data_dir is None:
            self._data_dir = resolve_data_dir(None, self.environ)
        return self._data_dir

    @property
    def timeout(self):
        return self.config["maximum_lock_wait_seconds"] if self.config else 5

    def _setting(self, key):
        return self.config[key] if self.config else DEFAULTS[key]

    def open_store(self, mode="write"):
        """The store for a command that may write ("write"), or only reads: "read" (the reference's read
        commands), "dry-run" or "look" (doctor, wait, who).

        Nothing is written that the mode or this user cannot write: a missing
        trop.db is created only for "write", and for "read" as the reference
        does when the directory is writable; otherwise an empty in-memory
        schema stands in.  An existing trop.db is opened read-only for "look",
        and for "read" and "dry-run" when this user cannot write it.  With
        keep_open (the Python API's Trop handle) one writable connection serves
        every call; it is reopened after a fork, or when trop.db is another
        file (a recreated data directory).
        """
        path = os.path.join(self.data_dir, DB_FILE)
        network_ok = self._setting("allow_network_fs")
        autoinit = not self._setting("disable_autoinit")
        if mode != "write":
            exists = os.path.exists(path)
            if not exists and (mode != "read" or (autoinit and not can_write(path))):
                check_local_filesystem(self.data_dir, network_ok)
                return Store.open_empty()
            if exists and (mode == "look" or not can_write(path)):
                return Store.open_readonly(self.data_dir, network_ok)
        store = self._store
        if store is not None and not store.is_current():
            store.close()
            store = self._store = None
        if store is None:
            store = Store.open(self.data_dir, self.timeout, autoinit, network_ok, self._setting("share_with_group"))
            if self.keep_open:
                self._store = store
        return store

    def _done(self, store):
        if store is not self._store:
            store.close()

    def close(self):
        with _Serialized(self._lock):
            if self._store is not None:
                self._store.close()
                self._store = None

    def write(self, planner, dry_run=False):
        """Open, BEGIN IMMEDIATE, plan from what the transaction reads, execute (or roll back).

        A dry run on a database this user cannot write plans inside a read
        transaction instead: the same snapshot, without the lock it cannot take.
        """
        def run(store):
            with store.write(dry_run=dry_run):
                plan = planner(store)
                if not dry_run:
                    plan.execute(store)
            if not dry_run:
                Store.commits += 1
            return plan
        return self._use(run, "dry-run" if dry_run else "write")

    def read(self, reader, mode="read"):
        """Read-only access: never takes the write lock ("look": not even a missing trop.db is created)."""
        return self._use(reader, mode)

    def _use(self, work, mode):
        """work(store) on a fresh or kept store; again if an unlocked read may have overlapped a writer."""
        with _Serialized(self._lock):
            for _attempt in range(3):
                store = self.open_store(mode)
                try:
                    result = work(store)
                except (TropError, _sqlite().Error):
                    if store.snapshot_ok():
                        raise
                    continue                    # a torn read of a file a writer was changing: read again
                finally:
                    self._done(store)
                if store.snapshot_ok():
                    return result
        raise _kept_changing(os.path.join(self.data_dir, DB_FILE))

    def explicit_or_cwd(self, path, env_name="TROP_PATH"):
        """--path, else $TROP_PATH (explicit: normalized only), else the canonical cwd."""
        if path is None and env_name:
            path = self.environ.get(env_name) or None
        if path is not None:
            return normalize_path(path, self.cwd)
        return canonical_path(self.cwd)


def _params(func):
    """The parameter names of an operation after its first (session or self): what callers pass by keyword."""
    code = func.__code__
    return code.co_varnames[1:code.co_argcount]


def _guard(func, what="running trop"):
    """Run an operation, turning stray sqlite3 and OS errors into TropErrors."""
    try:
        return func()
    except TropError:
        raise
    except OSError as exc:
        raise IoFailure("%s%s" % (exc.strerror or exc, ": %s" % exc.filename if exc.filename else ""))
    except Exception as exc:
        module = type(exc).__module__ or ""
        if module.startswith("sqlite3"):
            raise _database_error(exc, "trop.db", what, 0)
        raise


# --- Operations: stale reservations (the prune and expire rules) ----------------


_STALE_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL))
_UNKNOWABLE = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ELOOP: "symlink loop",
               errno.EIO: "transient I/O error", errno.EAGAIN: "transient I/O error",
               errno.ETIMEDOUT: "transient I/O error", errno.ENOSYS: "unsupported filesystem operation",
               errno.EOPNOTSUPP: "unsupported filesystem operation"}


def inspect_path(path):
    """'live', 'stale' (certainly gone) or (reason, message) when it cannot be told."""
    try:
        st = os.stat(os_path(path))
    except OSError as exc:
        if exc.errno in _STALE_ERRNOS:
            return "stale"
        return (_UNKNOWABLE.get(exc.errno, "unknown filesystem error"), exc.strerror or str(exc))
    except ValueError:
        return "stale"                      # embedded NUL: cannot name a directory
    return "live" if stat.S_ISDIR(st.st_mode) else "stale"


_ADVICE = {
    "permission denied": "Restore access to the path and its parents, then retry.",
    "symlink loop": "Repair the symlink loop, then retry.",
    "transient I/O error": "Retry when the filesystem or mount is available.",
    "unsupported filesystem operation": "Verify filesystem support or release the reservation explicitly.",
    "unknown filesystem error": "Inspect the filesystem state or release the reservation explicitly.",
}


class CleanupPlan(Plan):
    """prune / expire / autoclean: the rows each rule removes, and paths that could not be inspected."""

    def __init__(self):
        Plan.__init__(self)
        self.dead = []           # rows leased by a holder that has died (always taken back)
        self.pruned = []
        self.expired = []


def plan_cleanup(store, gone, expire_days, now=None, dead=True):
    """Select stale rows inside the caller's transaction; each distinct path is inspected once.

    dead: take back the rows of leases whose holder has died (an adopted row stays, as an ordinary one).
    """
    now = int(time.time()) if now is None else now
    plan = CleanupPlan()
    rows = store.all()
    leased = lease_states(store, rows, plan)
    for res in rows if dead else ():
        if leased.get(res.key) == "dead":
            if res.lease[0].adopted:
                plan.freed.append(res.lease[0])
                del leased[res.key]
            else:
                plan.dead.append(res)
    pruned_keys = {r.key for r in plan.dead}
    rows = [r for r in rows if r.key not in pruned_keys]
    if gone:
        verdicts = {}
        for res in rows:
            verdict = verdicts.get(res.path)
            if verdict is None:
                verdict = verdicts[res.path] = inspect_path(res.path)
                if isinstance(verdict, tuple):
                    plan.warnings.append("could not inspect reserved directory %s (%s: %s); reservation "
                                         "preserved by prune. %s" % (res.path, verdict[0], verdict[1],
                                                                     _ADVICE[verdict[0]]))
            if verdict == "stale" and res.key not in leased:        # a live (or unverifiable) holder keeps it
                plan.pruned.append(res)
                pruned_keys.add(res.key)
    if expire_days:
        limit = expire_days * 86400
        expired = [r for r in rows if now - r.last_used_at > limit and r.key not in pruned_keys
                   and leased.get(r.key) != "alive"]
        expired.sort(key=lambda r: (r.last_used_at, r.path, r.tag or ""))
        plan.expired = expired
    plan.deletes = plan.dead + plan.pruned + plan.expired
    return plan


def lease_states(store, rows, plan):
    """{key: 'alive' | 'dead' | 'unknown'} of the rows held by a lease; leases that are over go to plan.freed."""
    store.with_leases(rows)
    held = {r.lease[0].key for r in rows if r.lease}
    plan.freed += [lease for lease in store.leases() if lease.key not in held]
    return {r.key: r.lease[1] for r in rows if r.lease}


def run_cleanup(session, gone=True, unused=True, days=None, dry_run=False):
    """Remove reservations whose directory is gone (prune) and/or that were unused for days (expire)."""
    expire_days = (days or session.config["cleanup.expire_after_days"]) if unused else None
    return session.write(lambda store: plan_cleanup(store, gone, expire_days, dead=gone), dry_run)


# --- Operations: reserve, release and read (list, port-info) -----------------

class ReserveRequest:
    """Everything a single reservation depends on, resolved before the transaction."""

    def __init__(self, key, config, preferred=None, overwrite=False, force=False, ignore_occupied=False,
                 ignore_exclusions=False, project=None, task=None, infer_git=True):
        self.key = key
        self.preferred = preferred
        self.overwrite = overwrite
        self.force = force
        self.ignore_occupied = ignore_occupied
        self.ignore_exclusions = ignore_exclusions
        self.project = project          # ("set", value) / ("clear",) / None to preserve
        self.task = task
        self.infer_git = infer_git
        self.port_range = config.port_range
        self.skips = Skips.of(config)
        self.allow_project = force or config.allow("project")
        self.allow_task = force or config.allow("task")
        self.autoprune = not config["disable_autoprune"]
        self.autoexpire = not config["disable_autoexpire"]
        self.expire_days = config["cleanup.expire_after_days"]


def _resolve_intent(intent, stored):
    if intent is None:
        return stored
    return intent[1] if intent[0] == "set" else None


def plan_reserve(store, req, now=None):
    """Read the key and the taken ports, decide, and return the Plan (inside the transaction)."""
    now = int(time.time()) if now is None else now
    plan = ReservePlan()
    existing = store.get(req.key)
    if existing is not None:
        plan.freed += _dead_leases(store, req.key.path, {req.key})     # refreshed: the row is the caller's now
        project = _resolve_intent(req.project, existing.project)
        task = _resolve_intent(req.task, existing.task)
        _check_sticky("project", {existing.project}, project, req.allow_project)
        _check_sticky("task", {existing.task}, task, req.allow_task)
        if req.overwrite or req.force:
            taken = store.taken_ports() - {existing.port}
            port = _allocate_or_cleanup(store, req, taken, plan, now)
            moved = existing.replace(port=port, project=project, task=task, last_used_at=now)
            if port == existing.port:
                plan.updates.append(moved)
            else:
                plan.deletes.append(existing)
                plan.inserts.append(moved)
            plan.port = port
        else:
            if (project, task) != (existing.project, existing.task):
                plan.updates.append(existing.replace(project=project, task=task, last_used_at=now))
            else:
                plan.touches.append(existing.replace(last_used_at=now))
            plan.port = existing.port
            if req.preferred is not None and req.preferred != existing.port:
                plan.warnings.append("%s already holds port %d: the preferred port %d needs --overwrite"
                                     % (req.key, existing.port, req.preferred))
        return plan
    project, task = _resolve_intent(req.project, None), _resolve_intent(req.task, None)
    if req.infer_git and (req.project is None or req.task is None):
        git_project, git_task = infer_git_metadata(req.key.path)
        project = git_project if req.project is None else project
        task = git_task if req.task is None else task
    port = _allocate_or_cleanup(store, req, store.taken_ports(), plan, now)
    plan.inserts.append(Reservation(req.key.path, req.key.tag, port, project, task, now, now))
    plan.port = port
    return plan


def plan_lease(store, req, holder, now=None):
    """Reserve (path, tag) for holder as a lease, inside the transaction: a ReservePlan with the Lease.

    Slot 1 is the row (path, tag) itself: an ordinary row there is adopted, and so is a dead holder's, so a
    lone holder keeps its port run after run.  While slot 1 is held by a live (or unverifiable) holder, the
    next free slot n gets the row tagged 'tag~n' and a port of its own.
    """
    now = int(time.time()) if now is None else now
    path, base = req.key.path, req.key.tag
    plan = ReservePlan()
    slots = {}
    for lease in store.leases(path):
        if lease.base_tag == base:
            if lease.holds(store.get(lease.key)):
                slots[lease.slot] = lease
            else:
                plan.freed.append(lease)            # the row was released, or is another row now
    slot = 1
    while True:
        lease = slots.get(slot)
        key = ReservationKey(path, Lease.slot_tag(base, slot))
        if lease is not None and (lease.holder == holder or lease.holder.state() == "dead"):
            plan.freed.append(lease)            # taken over: the row passes on as it came
            adopted = lease.adopted
            break
        if lease is None and (slot == 1 or store.get(key) is None):    # slot n must not take an ordinary row
            adopted = store.get(key) is not None
            break
        slot += 1
    import copy
    req = copy.copy(req)                        # the request stays for (path, tag); this plan is for the slot
    req.key = key
    inner = plan_reserve(store, req, now)
    for name in ("inserts", "deletes", "updates", "touches", "warnings"):
        getattr(plan, name).extend(getattr(inner, name))
    plan.port = inner.port
    row = next(r for r in inner.inserts + inner.updates + inner.touches if r.key == key)
    plan.leases.append(Lease(path, key.tag, base, slot, row.port, row.created_at, holder, now, adopted))
    return plan


def _dead_leases(store, path, keys):
    """The leases of keys (rows at path) whose holder has died: rows that a caller refreshes are its own now."""
    return [lease for lease in store.leases(path) if lease.key in keys and lease.holder.state() == "dead"]


def plan_release_lease(store, path, tag, holder):
    """End holder's lease of (path, tag) and release its row; other holders' leases are left alone."""
    plan = Plan()
    for lease in store.leases(path):
        if lease.base_tag == tag and lease.holder == holder:
            res = store.get(lease.key)
            if lease.holds(res) and not lease.adopted:
                plan.deletes.append(res)
            plan.freed.append(lease)
    return plan


def _check_sticky(field, old, new, allowed, group_path=None):
    """A recorded project or task changes only with --force or its permission."""
    if old != {new} and not allowed:
        raise SemanticFailure("cannot change sticky field '%s': Cannot change %s%s from %s to %s without --force "
                              "or --allow-%s-change%s" % (field, "group " if group_path else "", field,
                                                          ", ".join(sorted(_quote(o) for o in old)), _quote(new),
                                                          field, " (group at %s)" % group_path if group_path else ""))


def _allocate_or_cleanup(store, req, taken, plan, now):
    """Allocate; on exhaustion clean up once (in the plan only) and retry exactly once."""
    port = _allocate_once_or_cleanup(store, req, taken, plan, now)
    if req.preferred is not None and port != req.preferred:      # a moved preference is said, with why
        why = preference_refusal(req, taken, req.skips) or "reserved"
        holder = store.for_port(req.preferred) if why == "reserved" else None
        plan.warnings.append("preferred port %d is %s%s; reserved %d instead" % (
            req.preferred, why, " for %s" % holder.key if holder is not None else "", port))
    return port


def _allocate_once_or_cleanup(store, req, taken, plan, now):
    if req.preferred is not None and req.preferred in taken:     # a dead holder's lease gives the port back
        row = store.with_leases([store.for_port(req.preferred)])[0]
        if row.key != req.key and row.lease and row.lease[1] == "dead" and not row.lease[0].adopted and \
                preference_refusal(req, taken - {row.port}, req.skips) is None:
            plan.deletes.append(row)
            taken = taken - {row.port}
    port, cautions = allocate_single(req, taken, req.skips)
    plan.warnings.extend(cautions)
    if port is not None:
        return port
    rng = req.port_range
    cleanup = plan_cleanup(store, req.autoprune, req.expire_days if req.autoexpire else None, now)
    if not (req.autoprune or req.autoexpire or cleanup.dead):      # a dead holder's lease is always taken back
        raise LibraryError("port range %s exhausted: cleanup was skipped (automatic pruning "
                           "and expiration disabled); remaining blockers: %s%s"
                           % (rng, req.skips.census(rng, taken), _probe_failures(req.skips.occupancy)))
    freed = {r.port for r in cleanup.deletes if r.key != req.key}
    port, cautions = allocate_single(req, taken - freed, req.skips)
    plan.warnings.extend(cautions)
    if port is None:
        policy = ("automatic pruning and expiration enabled" if req.autoprune and req.autoexpire else
                  "automatic expiration disabled" if req.autoprune else "automatic pruning disabled")
        raise LibraryError("port range %s exhausted after cleanup: remaining blockers after "
                           "the single retry: %s; automatic cleanup pruned %d and expired %d reservation(s); %s%s"
                           % (rng, req.skips.census(rng, taken - freed), len(cleanup.pruned), len(cleanup.expired),
                              policy, _probe_failures(req.skips.occupancy)))
    plan.deletes.extend(r for r in cleanup.deletes if r.key != req.key)
    plan.warnings.extend(cleanup.warnings)
    plan.warnings.append("Automatic cleanup after initial port exhaustion %spruned %d and expired %d "
                         "reservation(s); allocation succeeded on the single retry."
                         % ("took back %d lease(s) of dead holders, " % len(cleanup.dead) if cleanup.dead else "",
                            len(cleanup.pruned), len(cleanup.expired)))
    return port


def _probe_failures(occupancy):
    if not occupancy.failures:
        return ""
    shown = ["port %d: %s: %s" % (port, describe_probe(probe), err) for port, probe, err in occupancy.failures[:3]]
    more = len(occupancy.failures) - len(shown)
    return "; ports possibly occupied because their occupancy probe failed: %s%s" % (
        "; ".join(shown), " (and %d more)" % more if more else "")


def plan_release(store, path, tag=None, untagged_only=False, recursive=False):
    """The rows to delete: every tag at path (or beneath it), one tag, or the untagged row."""
    rows = store.under(path) if recursive else store.at_path(path)
    if tag is not None:
        rows = [r for r in rows if r.tag == tag]
    elif untagged_only:
        rows = [r for r in rows if r.tag is None]
    plan = Plan()
    plan.deletes = rows
    if not rows:
        if recursive:
            plan.warnings.append("No reservations found under %s (already released)" % path)
        elif tag is not None or untagged_only:
            plan.warnings.append("No reservation found for %s (already released)" % ReservationKey(path, tag))
        else:
            plan.warnings.append("No reservations found for %s (already released)" % path)
    return plan


def run_reserve(session, path=None, tag=None, port=None, overwrite=False, force=False, ignore_occupied=False,
                ignore_exclusions=False, clear_project=False, clear_task=False, dry_run=False, lease=False,
                holder=None):
    """Reserve (or refresh) the port of (path, tag); returns the executed (or dry-run) Plan.

    lease (or a holder pid): held by a live process, the holder (default: this process's parent, the shell
    or script that ran `trop reserve --lease`), and taken back once it has died (see plan_lease).
    """
    config = session.config
    key_path = session.explicit_or_cwd(path)
    key = ReservationKey(key_path, check_tag(tag))
    preferred = cli_port(port) if port is not None else None
    project = ("clear",) if clear_project else (("set", config["project"]) if config["project"] else None)
    task = ("clear",) if clear_task else (("set", config["task"]) if config["task"] else None)
    req = ReserveRequest(key, config, preferred, overwrite, force, ignore_occupied, ignore_exclusions,
                         project, task)
    check_path_relationship(key.path, force or config.allow("unrelated_path"))
    if lease or holder is not None:
        if holder is None and os.getppid() <= 1:
            raise InvalidArguments("Invalid arguments: trop's parent is init, which never exits: give the lease's "
                                   "holder with --holder PID")
        held_by = Holder.of(os.getppid() if holder is None else _holder_pid(holder))
        plan = session.write(lambda store: plan_lease(store, req, held_by), dry_run)
    else:
        plan = session.write(lambda store: plan_reserve(store, req), dry_run)
    if not os.path.isdir(os_path(key.path)):
        plan.warnings.append("directory %s does not exist: the reservation is made, and prune removes it while the "
                             "directory is missing" % key.path)
    group = config.group
    extra = [r.tag for r in plan.inserts if r.tag and group is not None and
             r.tag not in {svc.tag for svc in group.services}]          # a lease's slot row ('web~2') too
    if extra and session.project_dir and _canonical_prefix(key.path) == real_key(session.project_dir):
        plan.warnings.append("%s holds the group of %s, which has no service '%s': `trop run` and `autoreserve` "
                             "there will refuse the stored rows until this tag is released"
                             % (key.path, session.project_dir, extra[0]))
    return plan


def run_release(session, path=None, tag=None, untagged_only=False, recursive=False, force=False, dry_run=False,
                holder=None):
    """Release reservations; with holder (a pid), only the lease that process holds of (path, tag)."""
    if tag is not None and untagged_only:
        raise InvalidArguments("Cannot specify both --tag and --untagged-only")
    target = session.explicit_or_cwd(path)
    tag = check_tag(tag)
    allowed = force or session.config.allow("unrelated_path")
    held_by = None if holder is None else Holder.of(_holder_pid(holder))

    def planner(store):
        check_path_relationship(target, allowed)
        if held_by is not None:
            return plan_release_lease(store, target, tag, held_by)
        return plan_release(store, target, tag, untagged_only, recursive)
    return session.write(planner, dry_run)


def _holder_pid(value):
    """--holder PID / holder=: a positive pid."""
    try:
        pid = parse_uint(value if _is_int(value) else str(value), 0x7FFFFFFF)
    except ValueError:
        pid = 0
    if not pid:
        raise InvalidArguments("Invalid arguments: --holder must be a process id, got %r" % (value,))
    return pid


def run_list(session, filter_project=None, filter_tag=None, filter_path=None):
    """Reservations by path and tag; a leased row's .lease says who holds it."""
    rows = session.read(lambda store: store.with_leases(store.all()))
    if filter_project is not None:
        rows = [r for r in rows if r.project == filter_project]
    if filter_tag is not None:
        rows = [r for r in rows if r.tag == filter_tag]
    if filter_path is not None:
        lexical = normalize_path(filter_path, session.cwd)
        canonical = real_key(os_path(lexical)) if os.path.exists(os_path(lexical)) else None

        def keep(res):
            if is_within(res.path, lexical):
                return True
            return canonical is not None and os.path.exists(os_path(res.path)) and \
                is_within(real_key(os_path(res.path)), canonical)
        rows = [r for r in rows if keep(r)]
    return rows


def run_projects(session):
    """The distinct project names, sorted."""
    return session.read(lambda store: store.projects())


def run_assert_reservation(session, path=None, tag=None, negate=False):
    """The reservation of (path, tag), or None with negate; SemanticFailure (exit 1) when that does not hold."""
    key = ReservationKey(session.explicit_or_cwd(path), check_tag(tag, LibraryError))
    res = session.read(lambda store: store.get(key))
    if negate and res is not None:
        raise SemanticFailure("Assertion failed: reservation exists for %s" % key)
    if not negate and res is None:
        raise SemanticFailure("Assertion failed: no reservation found for %s" % key)
    return res


def run_assert_port(session, port, negate=False):
    """SemanticFailure unless port is reserved (not reserved, with negate)."""
    port = cli_port(port)
    res = session.read(lambda store: store.for_port(port))
    if negate and res is not None:
        raise SemanticFailure("Assertion failed: port %d is reserved" % port)
    if not negate and res is None:
        raise SemanticFailure("Assertion failed: port %d is not reserved" % port)


def run_assert_data_dir(session, negate=False, validate=False):
    """SemanticFailure unless the data directory exists (does not, with negate); validate checks its trop.db."""
    directory = session.data_dir
    exists = os.path.isdir(directory)
    if exists and validate:
        validate_data_dir(directory, session.config["allow_network_fs"])
    if negate and exists:
        raise SemanticFailure("Assertion failed: data directory exists at %s" % directory)
    if not negate and not exists:
        raise SemanticFailure("Assertion failed: data directory not found at %s" % directory)


def run_show_path(session, path=None, canonicalize=False):
    """The key a path stands for: the canonical cwd, or path normalized (and canonical, if asked)."""
    if path is None:
        return canonical_path(session.cwd)
    key = normalize_path(path, session.cwd)
    return canonical_path(key) if canonicalize else key


def run_port_info(session, port, include_occupancy=False):
    """port-info's facts: the reservation, whether its path exists, notes, and (when asked) the probe evidence."""
    port = cli_port(port)
    res = session.read(lambda store: store.for_port(port))
    info = {"port": port, "reservation": res, "path_exists": res is not None and os.path.exists(os_path(res.path)),
            "notes": port_notes(port, session.config)}
    if include_occupancy:
        info["occupancy"] = occupancy_evidence(port, session.config.occupancy)
    return info


# --- Operations: groups --------------------------------------------------------

class GroupRequest:
    """A group reservation: the spec, where it lives, and the effective settings."""

    def __init__(self, spec, path, config, task=None, force=False, holder=None):
        if not spec.services:
            raise LibraryError("Reservation group must contain at least one service")
        self.holder = holder            # a Holder: the group's rows are leased to it (trop run --lease)
        self.spec = spec
        self.path = path
        self.project = config["project"]
        self.task = task
        self.force = force
        self.allow_project = force or config.allow("project")
        self.allow_task = force or config.allow("task")
        rng = config.port_range
        if spec.base is not None and spec.base not in rng:
            raise LibraryError("validation error for 'reservations.base': Base port %d must be within port range "
                               "%d..%d" % (spec.base, rng.min, rng.max))
        self.port_range = rng
        self.scan_range = PortRange(spec.base if spec.base is not None else rng.min, rng.max)
        self.skips = Skips.of(config)
        for svc in spec.services:              # defence in depth: nothing unvalidated reaches a shell
            if env_name_problem(svc.env_name):
                raise LibraryError("validation error for 'env': %r %s" % (svc.env_name,
                                                                          env_name_problem(svc.env_name)))


def allocate_group(req, taken):
    """({tag: port}, cautions): preferred ports pinned first, then the lowest base whose whole pattern is free."""
    skips = req.skips
    mapping, pattern, cautions, moved = {}, [], [], {}
    for svc in req.spec.services:
        refusal = None if svc.preferred is None else skips.refusal(svc.preferred, taken)
        if svc.preferred is not None and refusal is None:
            mapping[svc.tag] = svc.preferred
            cautions += skips.cautions(svc.preferred)
        else:
            pattern.append(svc)
            if refusal:
                moved[svc.tag] = refusal
    if not pattern:
        return mapping, cautions
    rng = req.scan_range
    problem = GroupSpec(pattern).fit_problem(rng)
    if problem:
        raise LibraryError("group allocation failed: %s" % problem)
    pinned = set(taken) | set(mapping.values())
    top = max(s.offset for s in pattern)
    for base in range(rng.min, rng.max - top + 1):
        ports = [base + s.offset for s in pattern]
        if all(skips.classify(p, pinned) is None for p in ports):
            mapping.update((s.tag, p) for s, p in zip(pattern, ports))
            cautions += ["service '%s': preferred port %d is %s; reserved %d instead"
                         % (svc.tag, svc.preferred, moved[svc.tag], mapping[svc.tag])
                         for svc in pattern if svc.tag in moved]
            return mapping, cautions
    raise LibraryError("group allocation failed after attempting %d service(s): no base in %s leaves every "
                       "offset free: %s%s" % (len(req.spec.services), rng, skips.census(rng, pinned),
                                              _probe_failures(skips.occupancy)))


def group_incompatibility(req, stored):
    """Why stored rows cannot serve the requested group (None if they can)."""
    by_tag = {r.tag: r for r in stored}
    if set(by_tag) != {s.tag for s in req.spec.services}:
        return "requested service set does not match stored service set"
    base = None
    for svc in req.spec.services:
        port = by_tag[svc.tag].port
        if svc.preferred is not None and port == svc.preferred:
            continue
        if port < svc.offset:
            return "stored port %d cannot satisfy requested offset %d" % (port, svc.offset)
        implied = port - svc.offset
        if base is not None and implied != base:
            return "stored offset mappings imply different bases (%d and %d)" % (base, implied)
        base = implied
        if implied not in req.scan_range or port not in req.scan_range:
            return "a stored service mapping is outside the current scan range"
    return None


def plan_group(store, req, now=None):
    """Refresh a compatible stored group or allocate a fresh one; all rows or none."""
    now = int(time.time()) if now is None else now
    plan = GroupPlan(req.spec)
    stored = [r for r in store.at_path(req.path) if r.tag is not None]
    project, task = req.project, req.task
    if stored:
        reason = group_incompatibility(req, stored)
        if reason is None:
            for field, new, allowed in (("project", project, req.allow_project), ("task", task, req.allow_task)):
                if new is not None:
                    _check_sticky(field, {getattr(r, field) for r in stored}, new, allowed, req.path)
            for res in stored:
                changed = res.replace(project=res.project if project is None else project,
                                      task=res.task if task is None else task, last_used_at=now)
                plan.updates.append(changed)
            plan.freed += _dead_leases(store, req.path, {r.key for r in stored})
            plan.ports = {r.tag: r.port for r in stored}
            return plan
        if not req.force:
            raise LibraryError("reservation conflict: existing group at %s is incompatible: %s (use --force to "
                               "replace it)" % (req.path, reason))
        project = _inherited(stored, "project", req.path) if project is None else project
        task = _inherited(stored, "task", req.path) if task is None else task
        plan.deletes = stored
    taken = store.taken_ports() - {r.port for r in plan.deletes}
    try:
        mapping, cautions = allocate_group(req, taken)
    except LibraryError:
        planned = {r.key for r in plan.deletes}
        dead = [r for r in plan_cleanup(store, False, None, now).dead if r.key not in planned]
        if not dead:
            raise
        plan.deletes += dead                                    # a dead holder's ports come back, then once more
        mapping, cautions = allocate_group(req, taken - {r.port for r in dead})
    plan.warnings.extend(cautions)
    plan.inserts = [Reservation(req.path, tag, port, project, task, now, now) for tag, port in mapping.items()]
    plan.ports = mapping
    return plan


def _inherited(rows, field, path):
    """The value a replaced group passes on: only one all its rows agree on."""
    values = {getattr(r, field) for r in rows}
    if len(values) > 1:
        raise LibraryError("reservation conflict: cannot inherit %s for the replaced group at %s: stored rows "
                           "disagree" % (field, path))
    return values.pop()


def locate_group_config(cwd, config_path=None):
    """(config file, canonical group directory) for reserve-group FILE or autoreserve's discovery."""
    if config_path is not None:
        full = os_path(normalize_path(config_path, cwd))
        if not os.path.exists(full):
            raise InvalidArguments("Configuration file not found: %s" % config_path)
        if not os.path.isfile(full):
            raise InvalidArguments("Path is not a file: %s" % config_path)
        return full, real_key(os.path.dirname(full))
    start = os.path.realpath(os_path(cwd))
    directory = find_project_dir(start)
    if directory is None:
        raise InvalidArguments("No trop configuration file found (searched from: %s)" % key_text(start))
    names = [n for n in PROJECT_FILES if os.path.lexists(os.path.join(directory, n))]
    return os.path.join(directory, names[-1]), real_key(directory)


def group_session(options, cwd, config_path=None):
    """(Session, config file, group directory) for a group file, or the trop.yaml found from cwd.

    The file is located first: a missing one is exit 4 before any configuration is read.
    """
    config_file, group_dir = locate_group_config(cwd, config_path)
    if config_path is None:
        return Session(options), config_file, group_dir
    return Session(options, scope="file", config_file=config_file), config_file, group_dir


def run_group(session, config_file, group_dir, task=None, force=False, dry_run=False, holder=None):
    """Reserve the session's group for group_dir; returns the GroupPlan.  holder (a pid): the rows are leased
    to that process, which must be the only live holder of the group."""
    spec = session.config.group
    if spec is None:
        raise LibraryError("Effective configuration does not contain a reservation group (no `reservations:` "
                           "in %s)" % config_file)
    req = GroupRequest(spec, group_dir, session.config, task or session.config["task"], force,
                       None if holder is None else Holder.of(_holder_pid(holder)))
    allowed = force or session.config.allow("unrelated_path")

    def planner(store):
        check_path_relationship(group_dir, allowed)
        plan = plan_group(store, req)
        if req.holder is not None:
            _lease_group(store, plan, req)
        return plan
    return session.write(planner, dry_run)


def _lease_group(store, plan, req, now=None):
    """Lease every row of the group to req.holder; a group is held by one live process at a time."""
    now = int(time.time()) if now is None else now
    current = {lease.key: lease for lease in store.leases(req.path)}
    rows = {r.key: r for r in plan.inserts + plan.updates + plan.touches}
    created = {r.key for r in plan.inserts}
    for key, row in sorted(rows.items(), key=lambda item: item[0].db_tag):
        lease = current.get(key)
        held = lease is not None and lease.holds(store.get(key))
        if held and lease.holder != req.holder:
            state = lease.holder.state()
            if state != "dead":
                raise LibraryError("the group at %s is leased to pid %d (%s): one `trop run --lease` at a time "
                                   "holds a group" % (req.path, lease.holder.pid, state))
        adopted = lease.adopted if held else key not in created
        plan.leases.append(Lease(key.path, key.tag, key.tag, 1, row.port, row.created_at, req.holder, now, adopted))


# --- Operations: cleanup commands and migrate ----------------------------------

def plan_migrate(store, source, target, recursive=False, force=False):
    """Move every reservation at (or under) source to target, keeping ports and timestamps."""
    rows = store.under(source) if recursive else store.at_path(source)
    if not rows and not recursive:
        raise LibraryError("not found: reservation at %s" % source)
    plan = MigratePlan(source, target)
    try:
        plan.moves = [(r, r.replace(path=PLATFORM.paths.rebase(r.path, source, target))) for r in rows]
    except ValueError as exc:
        raise LibraryError(str(exc))
    moving = {old.key for old, _new in plan.moves}
    for _old, new in plan.moves:
        existing = store.get(new.key)
        if existing is not None and existing.key not in moving:
            plan.conflicts.append(existing)
    if plan.conflicts and not force:
        raise LibraryError("reservation conflict: Found %d conflicting reservation(s) at destination. "
                           "Use --force to overwrite." % len(plan.conflicts))
    plan.deletes = [old for old, _new in plan.moves] + plan.conflicts
    plan.inserts = [new for _old, new in plan.moves]
    return plan


def run_migrate(session, source, target, recursive=False, force=False, dry_run=False):
    """Move reservations between explicit paths; returns the MigratePlan."""
    src = normalize_path(source, session.cwd)
    dst = normalize_path(target, session.cwd)
    if src == dst:
        raise InvalidArguments("Invalid arguments: --from and --to are the same path (%s)" % src)
    if recursive and is_within(dst, src):
        raise InvalidArguments("Invalid arguments: --to (%s) must not be inside --from (%s) when migrating "
                               "recursively" % (dst, src))
    return session.write(lambda store: plan_migrate(store, src, dst, recursive, force), dry_run)


# --- Operations: diagnosis (doctor) ---------------------------------------------

def diagnose(session):
    """The doctor's report, as plain data (its JSON is documented in the README).

    For the effective range: every port's standing (reserved, excluded,
    occupied now, unsafe, OS-reserved, ephemeral, free); then the data
    directory's health and the configuration layers.  Read-only: it takes no
    lock and creates nothing.
    """
    config = session.config
    rng = config.port_range
    skips = Skips.of(config)
    ephemeral = ephemeral_range()
    report = {"cwd": session.cwd, "range": {"min": rng.min, "max": rng.max, "size": len(rng),
                                            "sources": {k: config.sources[k] for k in ("ports.min", "ports.max",
                                                                                       "ports.max_offset")}},
              "ports": {}, "data_dir": _data_dir_health(session), "layers": [], "warnings": [], "problems": []}
    health, rows = report["data_dir"], []
    database = health["database"]
    network_refused = health["network"] and not config["allow_network_fs"]
    if database["exists"] and not network_refused and database["error"] is None:
        try:
            database["schema_version"], rows = session.read(
                lambda store: (_parse_version(store.schema_version()), store.with_leases(store.all())), mode="look")
            database["reservations"] = len(rows)
        except (TropError, _sqlite().Error) as exc:
            if not isinstance(exc, TropError):
                exc = _database_error(exc, database["path"], "reading the database", 0)
            database["error"], database["exit_code"] = str(exc), exc.exit_code
    states = [r.lease[1] for r in rows if r.lease]
    report["leases"] = {"live": states.count("alive"), "dead": states.count("dead"),
                        "unverifiable": states.count("unknown")}
    rows = [r for r in rows if r.port in rng]
    reserved = {r.port for r in rows}
    excluded = {p for p in rng if p in config.exclusions}
    unsafe = {p for p in UNSAFE_PORTS if p in rng}
    os_reserved = {p for p in rng if p in skips.os_reserved}
    probes = skips.occupancy.probes
    occupied, owners = [], OwnerTable() if probes else None
    for port in rng if probes else ():
        found, failed = skips.occupancy.probe(port)
        if found or failed:
            pid, name, user = owners.lookup(found[0][0], found[0][1], port) if found else (None, None, None)
            occupied.append({"port": port, "pid": pid, "process": name, "user": user,
                             "reserved": port in reserved, "probe_failed": not found})
    free = [p for p in rng if skips.classify(p, reserved) is None]      # what the allocator would hand out
    ports_report = report["ports"]
    ports_report["reserved"] = {"count": len(reserved), "paths": len({r.path for r in rows}),
                                "projects": len({r.project for r in rows if r.project})}
    ports_report["excluded"] = {"count": len(excluded), "sources": [
        {"ports": range_text(*rng_), "source": where} for rng_, where in config.exclusion_sources
        if rng_[0] <= rng.max and rng.min <= rng_[1]]}
    ports_report["occupied"] = {"checked": bool(probes), "count": len(occupied), "ports": occupied}
    taken_now = {o["port"] for o in occupied}
    lingering = [p for p in rng if p not in taken_now and owners.lingering(p)] if probes else []
    ports_report["lingering"] = {"count": len(lingering), "ports": lingering[:20]}
    ports_report["unsafe"] = {"count": len(unsafe), "ports": sorted(unsafe),
                              "avoided": not config["allow_unsafe_ports"]}
    ports_report["os_reserved"] = {"count": len(os_reserved), "ranges": [
        range_text(*r) for r in ExclusionList((p, p) for p in os_reserved).ranges]}
    ports_report["ephemeral"] = {"range": str(ephemeral) if ephemeral else None,
                                 "count": len([p for p in rng if ephemeral and p in ephemeral])}
    ports_report["free"] = {"count": len(free), "first": free[:5]}
    report["layers"].append({"kind": "builtin", "source": BUILTIN_SOURCE, "settings": {}})
    for layer in config.layers:
        if layer.values or layer.exclusions or layer.kind in ("user", "project"):
            keys = sorted(set(layer.values) | ({"excluded_ports"} if layer.exclusions else set()))
            report["layers"].append({"kind": layer.kind, "source": layer.source,
                                     "settings": {k: layer.where(k) if k in layer.values else layer.source
                                                  for k in keys}})
    report["warnings"] = range_warnings(rng, ephemeral)
    sharing = health["sharing"]
    for fix in sharing["fixes"] if sharing else ():
        report["warnings"].append("members of group %s cannot write %s: run `%s`"
                                  % (sharing["group"], fix["path"], fix["command"]))
    if not probes:
        report["warnings"].append("occupancy probes are off (every probe is skipped): ports in use were not "
                                  "looked for")
    problems = report["problems"]
    if network_refused:
        problems.append({"exit_code": EXIT_CONFIG, "message": "the data directory is on a %s filesystem, where "
                         "SQLite's WAL mode is unsafe" % health["filesystem"]})
    if health["database"]["error"]:
        problems.append({"exit_code": health["database"]["exit_code"], "message": health["database"]["error"]})
    if not free:
        problems.append({"exit_code": EXIT_SEMANTIC, "message": "no free port in %s" % rng})
    report["healthy"] = not problems
    return report


def sharing_report(directory):
    """For a data directory its group may write (a team directory): who owns each file, which ones group
    members cannot write, and the commands that fix them.  None where POSIX permissions do not apply."""
    if os.name != "posix":
        return None
    try:
        top = os.stat(directory)
    except OSError:
        return None
    shared = bool(top.st_mode & stat.S_IWGRP)
    report = {"shared": shared, "group": _group_name(top.st_gid), "files": [], "fixes": []}
    for name in ("", DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", "config.yaml"):
        path = os.path.join(directory, name) if name else directory
        try:
            info = os.stat(path)
        except OSError:
            continue
        need = 0o070 | stat.S_ISGID if not name else 0o060
        right_group, right_mode = info.st_gid == top.st_gid, info.st_mode & need == need
        report["files"].append({"path": path, "owner": user_name(info.st_uid), "group": _group_name(info.st_gid),
                                "mode": "%04o" % (info.st_mode & 0o7777),
                                "group_can_write": right_group and right_mode})
        if shared and not (right_group and right_mode):
            fix = ([] if right_group else ["chgrp %s %s" % (report["group"], path)]) + \
                ([] if right_mode else ["chmod %s %s" % ("g+rwxs" if not name else "g+rw", path)])
            report["fixes"].append({"path": path, "command": " && ".join(fix)})
    return report


def _data_dir_health(session):
    """Path, filesystem and writability of the data directory; the size of trop.db and its WAL."""
    directory = session.data_dir
    db = os.path.join(directory, DB_FILE)
    mount = mount_of(directory)
    health = {"path": directory, "exists": os.path.isdir(directory), "filesystem": mount[0] if mount else None,
              "mount_point": mount[1] if mount else None, "network": bool(mount and is_network_filesystem(mount[0])),
              "writable": can_write(db)}
    database = {"path": db, "exists": os.path.lexists(db), "size": None, "wal_size": None, "schema_version": None,
                "reservations": None, "error": None, "exit_code": None}
    if os.path.lexists(directory) and not os.path.isdir(directory):
        database["error"], database["exit_code"] = "the data directory %s is not a directory" % directory, EXIT_LIBRARY
    elif database["exists"] and not os.path.isfile(db):
        database["error"], database["exit_code"] = "%s is not a regular file" % db, EXIT_LIBRARY
    elif database["exists"]:
        for key, name in (("size", db), ("wal_size", db + "-wal")):
            try:
                database[key] = os.path.getsize(name)
            except OSError:                     # no WAL (or a writer just removed it)
                database[key] = 0
    health["database"] = database
    health["sharing"] = sharing_report(directory)
    return health


# --- Operations: servers on reserved ports (wait, who, socket handoff) -----------

_LOOPBACKS = (("ipv4", "127.0.0.1"), ("ipv6", "::1"))     # what the probes bind, and what wait connects to


def knock(port, http_path=None, timeout=1.0):
    """One look at port: (family, address) of the first loopback that accepts (and, with http_path, answers an
    HTTP GET with a status below 500), or (None, what was seen)."""
    socket = _socket()
    seen = []
    for family, address in _LOOPBACKS:
        try:
            conn = socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            seen.append("%s on %s" % (_socket_error(exc), address))
            continue
        conn.close()
        if http_path is None:
            return family, address
        status = _http_status(address, port, http_path, timeout)
        if isinstance(status, int) and status < 500:
            return family, address
        seen.append("%s from %s" % (status if isinstance(status, str) else "HTTP %d" % status, address))
    return None, "; ".join(seen)


def _socket_error(exc):
    return {errno.ECONNREFUSED: "connection refused"}.get(exc.errno) or exc.strerror or str(exc) or "timed out"


def _http_status(address, port, path, timeout):
    """The status of GET path (an int), or what went wrong (a str)."""
    import http.client
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "trop-wait"})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, _socket().timeout):
            return "no HTTP answer (timed out)"
        return "no HTTP answer (%s)" % (getattr(exc, "strerror", None) or exc.__class__.__name__)
    finally:
        conn.close()


class WaitTimeout(SemanticFailure):
    """wait gave up: the ports that never answered, with what was last seen (exit 1)."""


def wait_for_ports(ports, timeout=30.0, interval=0.25, http_path=None, progress=None):
    """Wait until every port accepts TCP connections on 127.0.0.1 or ::1 (either counts).

    Returns {port: (family, address, seconds waited)}; raises WaitTimeout
    naming what each port last showed.  progress(port, answer) is called as
    each port becomes ready.
    """
    if http_path is not None:
        http_path = _url_quote(http_path if http_path.startswith("/") else "/" + http_path,
                               safe="/?&=%:@!$'()*+,;~-._#[]")
    started = time.monotonic()
    deadline = started + max(0.0, timeout)
    ready, last = {}, {}
    while True:
        for port in ports:
            if port in ready:
                continue
            family, detail = knock(port, http_path, max(0.05, deadline - time.monotonic()))
            if family:
                ready[port] = (family, detail, time.monotonic() - started)
                if progress:
                    progress(port, ready[port])
            elif port not in last or "timed out" not in detail:     # cut short at the deadline: keep the news
                last[port] = detail
        if len(ready) == len(ports):
            return ready
        if time.monotonic() >= deadline:
            waiting = [p for p in ports if p not in ready]
            raise WaitTimeout("timed out after %ss waiting for %s" % (
                "%g" % timeout, "; ".join("port %d (last seen: %s)" % (p, last.get(p, "nothing")) for p in waiting)))
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


LINGERING_NOTE = " (closed connections linger in TIME_WAIT: a server that sets SO_REUSEADDR, as most do, can bind it)"


def _lease_report(lease):
    """A row's lease as JSON: its holder and whether that process is alive (None: not leased)."""
    if lease is None:
        return None
    holder = lease[0].holder
    return {"pid": holder.pid, "host": holder.host, "state": lease[1], "slot": lease[0].slot}


def who_holds(port, res, owners, policy=None):
    """Who is on port: the reservation, the live listeners, and a verdict (free, reservation, other, unknown)."""
    listeners = owners.listeners(port)
    report = {"port": port, "reservation": None, "listeners": listeners}
    if res is not None:
        report["reservation"] = {"path": res.path, "tag": res.tag, "project": res.project,
                                 "task": res.task, "last_used_at": format_timestamp(res.last_used_at),
                                 "lease": _lease_report(res.lease)}
    if not listeners:
        found, failed = probe_port(port, (policy or OccupancyPolicy()).probes())
        lingering = owners.lingering(port)
        if found and not lingering:
            verdict = "unknown"
            detail = "in use, but the OS does not say by whom (another user's or container's process?)"
        elif failed and not found:
            verdict = "unknown"
            detail = "could not be probed (%s): nothing visible listens on it" % failed[0][1]
        else:
            verdict = "free"
            detail = "nothing listens on it" + (LINGERING_NOTE if lingering else "")
    else:
        homes = [] if res is None else [res.path, _canonical_prefix(res.path)]
        mine = [entry for entry in listeners if entry["cwd"] and any(is_within(entry["cwd"], home)
                                                                     for home in homes)]
        verdict = "reservation" if mine else "other"
        entry = (mine or listeners)[0]
        holder = "pid %s %s" % (entry["pid"], entry["process"] or "?") if entry["pid"] is not None else "a process"
        if mine:
            detail = "held by this reservation's directory: %s in %s" % (holder, entry["cwd"])
        else:
            detail = "held by another process: %s%s" % (holder, " in %s" % entry["cwd"] if entry["cwd"] else "")
    report["verdict"], report["detail"] = verdict, detail
    return report


def run_url(session, service=None, path=None, scheme="http", host="localhost", route=""):
    """The URL of a service: a service (tag) of the group whose trop.yaml is found from here, else the
    reservation of path (default: the cwd) with that tag (none: the untagged one).  Reads, never reserves."""
    group = session.config.group if session.config else None
    if path is None and service is not None and group is not None and session.project_dir and \
            service in {svc.tag for svc in group.services}:
        key = ReservationKey(real_key(session.project_dir), check_tag(service))
    else:
        key = ReservationKey(session.explicit_or_cwd(path), check_tag(service))
    res = session.read(lambda store: store.get(key), mode="look")
    if res is None:
        raise LibraryError("not found: no reservation for %s (reserve it first: `trop %s`)"
                           % (key, "autoreserve" if group is not None else "reserve" + (
                               " --tag %s" % key.tag if key.tag else "")))
    route = route if not route or route.startswith("/") else "/" + route
    bracketed = "[%s]" % host if ":" in host and not host.startswith("[") else host
    return {"url": "%s://%s:%d%s" % (scheme, bracketed, res.port, _url_quote(route, safe="/?&=%:@!$'()*+,;~-._#[]")),
            "port": res.port, "service": res.tag, "path": res.path}


def wait_targets(session, path=None, tag=None, port=None, group=False, config=None):
    """The ports wait watches: --port as given, every service of a group (the trop.yaml found from path, or
    the file config), or one reservation."""
    if port is not None:
        if path is not None:
            raise UsageError("--port waits for that port alone: give --path or --port, not both")
        return [cli_port(port)]
    if group or config is not None:
        start = session.cwd if path is None or config is not None else normalize_path(path, session.cwd)
        _config_file, group_dir = locate_group_config(start, config)
        rows = [r for r in session.read(lambda store: store.at_path(group_dir), mode="look") if r.tag is not None]
        if not rows:
            raise LibraryError("not found: no group is reserved at %s (run `trop autoreserve` first)" % group_dir)
        return [r.port for r in rows]
    key = ReservationKey(session.explicit_or_cwd(path), check_tag(tag))
    res = session.read(lambda store: store.get(key), mode="look")
    if res is None:
        raise LibraryError("not found: no reservation for %s (reserve it first, or give --port)" % key)
    return [res.port]


def run_wait(session, path=None, tag=None, port=None, group=False, config=None, timeout=30.0, interval=0.25,
             http=None, progress=None):
    """wait: until every target port accepts connections (see wait_targets, wait_for_ports)."""
    return wait_for_ports(wait_targets(session, path, tag, port, group, config), timeout, interval, http, progress)


def run_who(session, port=None, path=None, tag=None):
    """who's reports: one port, or every reservation of the directory (one tag with tag)."""
    if port is not None:
        number = cli_port(port)
        rows = session.read(lambda store: store.with_leases([r for r in [store.for_port(number)] if r]),
                            mode="look") or [None]
        ports = [number]
    else:
        target = session.explicit_or_cwd(path)
        tag = check_tag(tag)
        rows = [r for r in session.read(lambda store: store.with_leases(store.at_path(target)), mode="look")
                if tag is None or r.tag == tag]
        if not rows:
            raise LibraryError("not found: no reservation for %s" % ReservationKey(target, tag))
        ports = [r.port for r in rows]
    owners = OwnerTable()
    return [who_holds(p, r, owners, session.config.occupancy) for p, r in zip(ports, rows)]


def listening_sockets(services, policy=None):
    """Bind and listen on each (name, port) at the addresses the probes use; [(name, socket)], IPv4 first.

    --skip-ipv6 (or --skip-ipv4) leaves that family out, for a server that takes a single fd.

    For `run --listen`: the command inherits the sockets (systemd socket
    activation), so no other process can take a port between the
    reservation and the server's start.
    """
    socket = _socket()
    out = []
    families = [(f, a) for f, a in _LOOPBACKS if not (policy and getattr(policy, "skip_ip" + f[-1]))]
    if not families:
        raise UsageError("--listen needs an address: --skip-ipv4 and --skip-ipv6 leave none")
    try:
        for name, port in services:
            for family, address in families:
                af = socket.AF_INET if family == "ipv4" else socket.AF_INET6
                try:
                    sock = socket.socket(af, socket.SOCK_STREAM)
                except OSError as exc:
                    if exc.errno in _NOT_APPLICABLE:
                        continue
                    raise
                try:
                    if PLATFORM.reuse_address:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if af == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((address, port))
                    sock.listen(128)
                except OSError as exc:
                    sock.close()
                    if exc.errno in _NOT_APPLICABLE:
                        continue
                    raise LibraryError("cannot listen on %s port %d for %s: %s"
                                       % (address, port, name, exc.strerror or exc))
                out.append((name, sock))
    except BaseException:
        for _name, sock in out:
            sock.close()
        raise
    return out


def run_prepare(session, config_file, group_dir, task=None, force=False, dry_run=False, listen=False, service=None,
                lease=False):
    """What `trop run` starts its command with: (the group's GroupPlan, the environment with its variables).

    With listen, the group's ports are bound here and handed over on fds 3, 4, ... (see socket_activation):
    every service's, or only those named in service (a list of tags), for a command that serves only them.
    The whole group is reserved either way, so commands that serve different services agree on the ports.
    With lease, the rows are leased to this process, which the command becomes (exec keeps the pid).
    """
    if listen and PLATFORM.name != "posix":
        raise UsageError("--listen hands sockets over as systemd does, which needs POSIX; start the server "
                         "without it and use `trop wait`")
    if service and not listen:
        raise UsageError("--service chooses the sockets that --listen hands over: give --listen too")
    group = session.config.group             # None: run_group says so
    tags = [svc.tag for svc in group.services] if group else []
    unknown = [tag for tag in service or () if tag not in tags]
    if group and unknown:
        raise InvalidArguments("Invalid arguments: the group has no service %s (its services: %s)"
                               % (", ".join("'%s'" % tag for tag in unknown), ", ".join(tags)))
    plan = run_group(session, config_file, group_dir, task, force, dry_run, os.getpid() if lease else None)
    env = dict(os.environ)
    env.update(plan.environment())
    if listen and not dry_run:
        served = [(tag, plan.ports[tag]) for tag in tags if tag in plan.ports and (not service or tag in service)]
        socket_activation(listening_sockets(served, session.config.occupancy), env)
    return plan, env


def exec_command(argv, env):
    """Replace this process with argv (POSIX) or run it and return its status; no shell involved."""
    program = argv[0]
    found = program if os.sep in program else _shutil().which(program, path=env.get("PATH"))
    if not found or not os.path.exists(found):
        raise CommandNotRunnable("command not found: %s" % program, 127)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise CommandNotRunnable("permission denied: %s" % program, 126)
    sys.stdout.flush()
    sys.stderr.flush()
    return PLATFORM.run(found, argv, env)


def _fd_name(tag):
    """A service tag as systemd allows an fd name: printable ASCII without ':', at most 255 characters."""
    return "".join(c if " " < c <= "~" and c != ":" else "_" for c in tag)[:255]


def socket_activation(sockets, env):
    """Put the sockets on fds 3, 4, ... (inheritable) and set LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES in env.

    LISTEN_PID is this process's pid: exec keeps it, so the command sees its own.
    """
    fcntl = _fcntl()
    first = 3
    spare = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, first + len(sockets)) for _name, sock in sockets]
    for _name, sock in sockets:
        os.close(sock.detach())                 # the originals may sit on 3, 4, ...: free them first
    for index, fd in enumerate(spare):
        os.dup2(fd, first + index)              # dup2's copy is inheritable
        os.close(fd)
    env.update(LISTEN_FDS=str(len(sockets)), LISTEN_PID=str(os.getpid()),
               LISTEN_FDNAMES=":".join(_fd_name(name) for name, _sock in sockets))
    return env


# --- Operations: configuration files and the data directory -----------------
#
# init, exclude, scan --autoexclude, compact-exclusions and validate.  They
# write configuration files (under a lock, re-read inside it) or create the
# data directory, not reservations.

class InitPlan:
    """What init finds and will do: plain data, so a dry run prints the same plan."""

    def __init__(self, directory, overwrite=False, with_config=False):
        self.directory = directory
        self.database = os.path.join(directory, DB_FILE)
        self.config_file = os.path.join(directory, "config.yaml")
        self.overwrite, self.with_config = overwrite, with_config
        self.dir_exists = os.path.isdir(directory)
        self.db_exists = os.path.exists(self.database)
        self.config_exists = os.path.exists(self.config_file)


def run_init(session, overwrite=False, with_config=False, dry_run=False):
    """Create the data directory and a new trop.db (and a config.yaml template); returns the InitPlan."""
    plan = InitPlan(session.data_dir, overwrite, with_config)
    if dry_run:
        return plan
    if plan.db_exists and not overwrite:
        raise LibraryError("validation error for 'database': Database already exists at %s. "
                           "Use --overwrite to replace it." % plan.database)
    network_ok, share = session.config["allow_network_fs"], session.config["share_with_group"]
    check_local_filesystem(plan.directory, network_ok)          # before anything is created or removed
    try:
        os.makedirs(plan.directory, exist_ok=True)
        if not plan.dir_exists and group_sharing(os.path.dirname(os.path.abspath(plan.directory)), share):
            share_with_group(plan.directory)
        if plan.db_exists:
            for suffix in ("", "-wal", "-shm"):       # a stale WAL must never replay into the new file
                if os.path.exists(plan.database + suffix):
                    os.remove(plan.database + suffix)
    except OSError as exc:
        raise IoFailure("%s: %s" % (exc.filename or plan.directory, exc.strerror or exc))
    Store.open(plan.directory, session.timeout, autoinit=True, network_ok=network_ok, share=share).close()
    if with_config and not plan.config_exists:
        write_file_atomic(plan.config_file, config_template())
        if group_sharing(plan.directory, share):
            share_with_group(plan.config_file)
    return plan


def exclusion_range(text):
    """exclude's PORT_OR_RANGE ('8080' or '8080..8090') as (start, end), or exit 4 in the reference's words."""
    try:
        return parse_port_range(text)
    except ValueError as exc:
        message = str(exc)
        raise InvalidArguments("Invalid arguments: %s" % (
            message if message.startswith("Invalid range") else "Invalid port number: " + message))


def run_exclude(session, ports, use_global=False, force=False):
    """Add a port or range ('N', 'A..B' or (start, end)) to the nearest configuration's excluded_ports.

    Returns (file written, whether the entry is new).  Reserved ports are
    refused unless force.
    """
    start, end = exclusion_range(ports) if isinstance(ports, str) else ports
    if not force:
        taken = session.read(lambda store: store.taken_ports())
        for port in range(start, end + 1):
            if port in taken:
                raise InvalidArguments("Invalid arguments: Port %d is reserved. Use --force to override." % port)
    target = exclusion_target(None if use_global else session.project_dir, session.data_dir)
    created = not os.path.exists(target)
    if created:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    added = add_exclusions(target, [(start, end)], config_kind(target))
    if created and group_sharing(os.path.dirname(target), session.config["share_with_group"]):
        share_with_group(target)
    return target, bool(added)


ENV_BEGIN = "# >>> trop: this working copy's ports (written by `trop autoreserve --write-env`; edits are replaced)"
ENV_END = "# <<< trop"


def run_write_env(path, environment, allow_tracked=False):
    """Write {VARIABLE: port} between ENV_BEGIN and ENV_END in the dotenv file path; every other line is kept
    byte for byte.  Atomic, idempotent (an unchanged file is not rewritten: returns False), and refused for a
    file that git tracks unless allow_tracked, so that ports are never committed."""
    full = os.path.abspath(path)
    if not allow_tracked and _git_tracks(full):
        raise InvalidArguments("Invalid arguments: %s is tracked by git: writing this working copy's ports there "
                               "would commit them (use an untracked file such as .env.local, or --allow-tracked)"
                               % path)
    with PLATFORM.lock(os.path.dirname(os.path.realpath(full))):
        try:
            with open(full, "rb") as fh:
                old = fh.read().decode("utf-8")
        except FileNotFoundError:
            old = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise IoFailure("%s: %s" % (path, getattr(exc, "strerror", None) or exc))
        block = [ENV_BEGIN + "\n"] + ["%s=%s\n" % item for item in environment.items()] + [ENV_END + "\n"]
        lines, kept, inside, at = old.splitlines(True), [], False, None
        for line in lines:                      # drop every managed block; the first one's place is kept
            mark = line.rstrip("\r\n")
            if mark == (ENV_END if inside else ENV_BEGIN):
                inside = not inside
                at = len(kept) if at is None else at
            elif not inside:
                kept.append(line)
        if inside or any(line.rstrip("\r\n") == ENV_END for line in kept):
            raise InvalidArguments("Invalid arguments: %s has a trop marker line without its pair; remove it, or "
                                   "the whole section, and run again" % path)
        if at is None:
            at = len(kept)
            if kept and not kept[-1].endswith("\n"):
                kept[-1] += "\n"
        kept[at:at] = block
        lines = kept
        new = "".join(lines)
        if new == old:
            return False
        write_file_atomic(full, new)
        return True


def _git_tracks(path):
    """Whether git tracks path (False outside a work tree, or where git is not installed)."""
    directory = os.path.dirname(path)
    git = _shutil().which("git")
    if git is None:
        return False
    try:
        return _subprocess().run([git, "-C", directory, "ls-files", "--error-unmatch", "--", os.path.basename(path)],
                                 stdout=_subprocess().DEVNULL, stderr=_subprocess().DEVNULL,
                                 stdin=_subprocess().DEVNULL, timeout=10).returncode == 0
    except (OSError, _subprocess().SubprocessError):
        return False


class ScanResult:
    """scan's findings: rows per occupied probe, failed probes, and what --autoexclude wrote."""

    def __init__(self, rows, failures):
        self.rows, self.failures = rows, failures
        self.unreserved = unreserved_occupied(rows)
        self.excluded_to, self.excluded = None, 0


def run_scan(session, autoexclude=False, autocompact=False):
    """Probe the scan range; with autoexclude, add the occupied, unreserved ports to excluded_ports."""
    config = session.config
    reserved = session.read(lambda store: store.taken_ports())
    failures = []
    result = ScanResult(scan_ports(config.scan_range, config.occupancy, reserved, failures=failures), failures)
    if autoexclude and result.unreserved:
        result.excluded_to = exclusion_target(session.project_dir, session.data_dir)
        result.excluded = add_exclusions(result.excluded_to, [(p, p) for p in result.unreserved],
                                         config_kind(result.excluded_to), compact=autocompact)
    return result


def run_compact_exclusions(path, dry_run=False):
    """Rewrite path's excluded_ports minimally (merged, sorted); returns (ranges before, ranges after)."""
    if not os.path.exists(path):
        raise InvalidArguments("File not found: %s" % path)
    result = {}

    def change(current):
        result["before"] = current
        result["after"] = compacted = ExclusionList(current).ranges
        if len(compacted) == len(current) or dry_run:     # order alone is not worth a rewrite
            return None
        return compacted
    edit_exclusions(path, config_kind(path), change)
    return result["before"], result["after"]


def run_validate(path):
    """Check a configuration file by the rules of its kind: (every problem as 'file:line: ...', warnings)."""
    if not os.path.exists(path):
        raise InvalidArguments("File not found: %s" % path)
    problems = Problems(path)
    layer = read_config_file(path, config_kind(path), problems)
    config = Config([layer])
    if not problems.items:
        try:
            config.validate()
        except ConfigError as exc:
            problems.add(None, exc.message)
    group = config.group
    if not problems.items and group is not None:       # offsets that no base in the range can hold
        rng = config.port_range
        problem = group.fit_problem(PortRange(rng.min if group.base is None else group.base, rng.max))
        if problem:
            problems.add(group.line, "reservations: %s" % problem)
    if problems.items:
        return problems.lines(), []
    return [], range_warnings(config.port_range) if "ports.min" in layer.values else []


# --- Output formatting -------------------------------------------------------

LIST_COLUMNS = ("port", "path", "tag", "project", "task", "created_at", "last_used_at")


def _one_line(text):
    """An error is one line: control characters (from tags, paths...) are shown escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _ascii_stdout():
    """Whether stdout cannot carry every character: then JSON goes out with \\u escapes (the same JSON)."""
    try:
        return not codecs.lookup(sys.stdout.encoding).name.startswith("utf")
    except (AttributeError, LookupError, TypeError):
        return False


def tolerant_stream(stream):
    """stream, escaping (backslashreplace) what its encoding cannot represent instead of failing, with lines
    ending in \\n on every platform (so `$(trop reserve)` in Git Bash is the bare number).

    A C-locale or cp1252 console must never turn a path into an internal error.
    """
    if stream is None or getattr(stream, "errors", None) == "backslashreplace":
        return stream
    try:
        stream.reconfigure(errors="backslashreplace", newline="\n")       # Python 3.7+
        return stream
    except AttributeError:
        pass
    except (ValueError, OSError):                           # a closed or unusual stream: leave it be
        return stream
    buffer = getattr(stream, "buffer", None)
    if buffer is None or not getattr(stream, "encoding", None):
        return stream                                       # io.StringIO and the like encode nothing
    stream.flush()
    wrapped = io.TextIOWrapper(buffer, encoding=stream.encoding, errors="backslashreplace", newline="\n",
                               line_buffering=stream.line_buffering)
    stream.detach()
    return wrapped


def _out(text=""):
    """Results go to stdout; failing to write them is an I/O error (exit 5), reported as such."""
    if sys.stdout is None:
        raise IoFailure("cannot write results: standard output is closed")
    try:
        sys.stdout.write(text + "\n")
    except OSError as exc:
        raise IoFailure("cannot write results to standard output: %s" % (exc.strerror or exc))


def _err(text=""):
    if sys.stderr is not None:
        sys.stderr.write(text + "\n")


def _warn(message):
    _err("Warning: %s" % message)


def format_reservations(rows, fmt, home=None):
    """list output: table (tab-separated, paths below home shortened to ~/), json (sorted keys), csv or tsv."""
    if fmt == "json":
        return _json_reservations(rows)
    if fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        lines = [_csv_line(LIST_COLUMNS, delimiter)]
        for r in rows:
            lines.append(_csv_line((str(r.port), r.path, r.tag or "", r.project or "", r.task or "",
                                    format_timestamp(r.created_at), format_timestamp(r.last_used_at)), delimiter))
        return "\n".join(lines)
    lines = ["\t".join(c.upper() for c in LIST_COLUMNS)]
    for r in rows:
        lines.append("\t".join((str(r.port), PLATFORM.paths.shorten_home(r.path, home), r.tag or "-",
                                r.project or "-", r.task or "-", format_timestamp(r.created_at),
                                format_timestamp(r.last_used_at))))
    return "\n".join(lines)


def _csv_line(fields, delimiter):
    """One CSV/TSV record: a field is quoted only if it holds the delimiter, a quote, CR or LF."""
    out = []
    for field in fields:
        if delimiter in field or '"' in field or "\n" in field or "\r" in field:
            field = '"' + field.replace('"', '""') + '"'
        out.append(field)
    return delimiter.join(out)


_JSON_ROW = ('  {\n    "created_at": "%s",\n    "last_used_at": "%s",\n    "path": %s,\n    "port": %d,\n'
             '    "project": %s,\n    "tag": %s,\n    "task": %s\n  }')


def _json_reservations(rows):
    """The same text as json.dumps(indent=2, sort_keys=True), without its slow pure-Python indenting."""
    if not rows:
        return "[]"
    encoder = _json().encoder           # C-accelerated string quoting
    q = encoder.encode_basestring_ascii if _ascii_stdout() else encoder.encode_basestring
    null = "null"
    return "[\n" + ",\n".join(_JSON_ROW % (
        format_timestamp(r.created_at), format_timestamp(r.last_used_at), q(r.path), r.port,
        null if r.project is None else q(r.project), null if r.tag is None else q(r.tag),
        null if r.task is None else q(r.task)) if r.lease is None else _json_leased_row(r) for r in rows) + "\n]"


def reservation_record(r):
    """A row as `list --format json` shows a leased one: the reference's fields, and "lease" (None: not leased)."""
    row = {name: getattr(r, name) for name in Reservation.FIELDS}
    row.update(created_at=format_timestamp(r.created_at), last_used_at=format_timestamp(r.last_used_at),
               lease=_lease_report(r.lease))
    return row


def _json_leased_row(r):
    """A leased row, as json.dumps(indent=2) nests it."""
    text = _json().dumps(reservation_record(r), indent=2, sort_keys=True, ensure_ascii=_ascii_stdout())
    return "\n".join("  " + line for line in text.splitlines())


def format_port_info(info):
    """port-info's report (see run_port_info)."""
    port, res = info["port"], info["reservation"]
    if res is None:
        return ["Port %d is not reserved" % port] + _port_info_notes(info)
    lines = ["Port: %d" % res.port, "Path: %s" % res.path]
    if res.tag is not None:
        lines.append("Tag: %s" % res.tag)
    if res.project is not None:
        lines.append("Project: %s" % res.project)
    if res.task is not None:
        lines.append("Task: %s" % res.task)
    lines += ["Created: %s" % format_timestamp(res.created_at), "Last used: %s" % format_timestamp(res.last_used_at),
              "Path exists: %s" % ("yes" if info["path_exists"] else "no")]
    return lines + _port_info_notes(info)


def _port_info_notes(info):
    lines = ["Note: %s" % note for note in info["notes"]]
    return lines + (format_occupancy(info["occupancy"]) if "occupancy" in info else [])


SHELLS = {"bash": "bash", "sh": "bash", "zsh": "zsh", "fish": "fish", "powershell": "powershell",
          "pwsh": "powershell", "ps": "powershell"}


def detect_shell(name=None, environ=None):
    """--shell if given, else detection; never fails without --shell.

    Unlike the reference, SHELL and MSYSTEM come before PSModulePath, which
    Windows sets machine-wide: Git Bash must get bash's syntax.
    """
    if name is not None:
        shell = SHELLS.get(name.lower())
        if shell is None:
            raise LibraryError("validation error for 'shell': unknown shell type '%s': supported shells are bash, "
                               "zsh, fish, powershell" % name)
        return shell
    env = os.environ if environ is None else environ
    if env.get("ZSH_VERSION"):
        return "zsh"
    if env.get("FISH_VERSION"):
        return "fish"
    login = env.get("SHELL", "")
    for needle, shell in (("zsh", "zsh"), ("fish", "fish"), ("pwsh", "powershell"), ("powershell", "powershell")):
        if needle in login:
            return shell
    if login or env.get("MSYSTEM"):             # Git Bash and MSYS2 set these; Windows sets PSModulePath anyway
        return "bash"
    if env.get("PSModulePath"):
        return "powershell"
    return "bash"


def format_group(spec, mapping, fmt, shell="bash"):
    """Render a group's ports; every variable name was validated by GroupRequest."""
    services = [s for s in spec.services if s.tag in mapping]
    if fmt == "json":
        return _json().dumps({s.tag: mapping[s.tag] for s in services}, indent=2, sort_keys=True,
                             ensure_ascii=_ascii_stdout())
    if fmt == "human":
        return "\n".join(["Reserved ports:"] + ["  %s: %d" % (s.tag, mapping[s.tag]) for s in services])
    if fmt == "dotenv":
        line = "%s=%d"
    elif shell == "fish":
        line = "set -x %s %d"
    elif shell == "powershell":
        line = '$env:%s="%d"'
    else:
        line = "export %s=%d"
    return "\n".join(line % (s.env_name, mapping[s.tag]) for s in services)


def format_who(reports):
    """who's human report: per port, the reservation, each listener, and the verdict."""
    lines = []
    for report in reports:
        res = report["reservation"]
        lines.append("Port %d: %s" % (report["port"], report["detail"]))
        if res:
            lines.append("  reserved for %s%s%s%s (last used %s)" % (
                res["path"], " tag %s" % res["tag"] if res["tag"] else "",
                ", project %s" % res["project"] if res["project"] else "",
                ", task %s" % res["task"] if res["task"] else "", res["last_used_at"]))
            lease = res["lease"]
            if lease:
                lines.append("  leased to pid %d on %s: %s" % (lease["pid"], lease["host"] or "?", {
                    "alive": "alive", "dead": "dead (the port comes back when needed)",
                    "unknown": "cannot be checked from here"}[lease["state"]]))
        else:
            lines.append("  not reserved")
        for entry in report["listeners"]:
            lines.append("  listener %s %s %s: pid %s, %s, user %s, cwd %s" % (
                entry["protocol"].upper(), "IPv4" if entry["family"] == "ipv4" else "IPv6", entry["address"] or "?",
                entry["pid"] if entry["pid"] is not None else "unknown", entry["process"] or "unknown process",
                entry["user"] or "unknown", entry["cwd"] or "unknown"))
    return "\n".join(lines)


def format_scan(rows, fmt):
    if fmt == "json":
        return _json().dumps(rows, indent=2, ensure_ascii=_ascii_stdout())

    def text(row, key):
        value = row[key]
        if value is None:
            return "unavailable"
        return ("true" if value else "false") if isinstance(value, bool) else str(value)
    if fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        return "\n".join([_csv_line(SCAN_FIELDS, delimiter)] +
                         [_csv_line([text(row, k) for k in SCAN_FIELDS], delimiter) for row in rows])
    headers = ("Port", "Status", "Reserved", "Protocol", "Family", "Scope", "Address", "PID", "Process", "User",
               "Owner Status")
    widths = (6, 20, 9, 9, 7, 10, 15, 12, 16, 16)

    def line(cells):
        return " ".join(c.ljust(w) for c, w in zip(cells, widths)) + " " + cells[-1]
    out = [line(headers), "-" * 145]
    out += [line([text(r, k) for k in SCAN_FIELDS]) for r in rows]
    return "\n".join(out)


def format_scan_notes(result):
    """What scan says on stderr besides its table: exclusions written, probes that proved nothing."""
    notes = []
    if result.excluded_to:
        notes.append("Added %d exclusions to %s" % (result.excluded, result.excluded_to))
    if result.failures:
        ports = sorted({port for port, _probe, _error in result.failures})
        port, probe, error = result.failures[0]
        notes.append("Note: %d probe(s) on %d port(s) failed and prove nothing (first: port %d, %s: %s)"
                     % (len(result.failures), len(ports), port, describe_probe(probe), error))
    return notes


def format_init(plan, dry_run=False):
    """init's report: what it would do (dry run), or what it did."""
    if dry_run:
        lines = ["Dry-run mode: no changes will be made", "", "Would initialize trop in: %s" % plan.directory,
                 ("  - Data directory already exists: %s" if plan.dir_exists else "  - Create data directory: %s")
                 % plan.directory]
        if plan.db_exists and plan.overwrite:
            lines += ["  - Remove existing database: %s" % plan.database, "  - Create new database: %s" % plan.database]
        elif plan.db_exists:
            lines.append("  - ERROR: Database already exists (use --overwrite to replace): %s" % plan.database)
        else:
            lines.append("  - Create database: %s" % plan.database)
        if plan.with_config:
            lines.append(("  - Configuration file already exists (will not overwrite): %s" if plan.config_exists
                          else "  - Create configuration file: %s") % plan.config_file)
        return lines
    lines = ["Initialized trop in: %s" % plan.directory]
    if not plan.dir_exists:
        lines.append("  - Created data directory")
    lines.append("  - Recreated database" if plan.overwrite else "  - Created database")
    if plan.with_config:
        lines.append("  - Configuration file already exists (not overwritten)" if plan.config_exists
                     else "  - Created default configuration file")
    return lines


def format_occupancy(evidence):
    """port-info --include-occupancy: the probe evidence for one port (see occupancy_evidence)."""
    lines = ["", "Occupancy status:"]
    if evidence is None:
        return lines + ["  Not checked: the effective policy disabled every probe"]
    if not evidence:
        return lines + ["  Port is available"]
    lines.append("  Port is currently in use")
    for item in evidence:
        pid, name, user = item["pid"], item["process"], item["user"]
        lines += ["  - %s%s" % (describe_probe(item["probe"]), " (possibly occupied: probe failed)"
                                if item["failed"] else ""),
                  "    Process ID: %s" % (pid if pid is not None else "unavailable"),
                  "    Process: %s" % (name or "unavailable"), "    User: %s" % (user or "unavailable"),
                  "    Owner metadata: %s" % owner_status(pid, name, user)]
    return lines


def format_diagnosis(report):
    """doctor's human report: one line a category, then the data directory and the layers."""
    ports, rng = report["ports"], report["range"]

    def ports_line(name, count, detail=""):
        return "  %-12s %5d%s" % (name, count, ("  " + detail) if detail else "")
    reserved, occupied, free = ports["reserved"], ports["occupied"], ports["free"]
    shown = ["%d%s" % (o["port"], " by pid %d %s" % (o["pid"], o["process"] or "?") if o["pid"] is not None else
                       " (probe failed)" if o["probe_failed"] else "") for o in occupied["ports"][:5]]
    shown += ["..."] if len(occupied["ports"]) > 5 else []
    lines = ["Range %d-%d (%d ports) for %s" % (rng["min"], rng["max"], rng["size"], report["cwd"]),
             ports_line("reserved", reserved["count"], "by %d path(s) in %d project(s)"
                        % (reserved["paths"], reserved["projects"])),
             ports_line("excluded", ports["excluded"]["count"], "; ".join(
                 "%s (%s)" % (s["ports"], s["source"]) for s in ports["excluded"]["sources"][:5])),
             ports_line("occupied", occupied["count"], ", ".join(shown) if occupied["checked"] else
                        "not checked: occupancy probes are off"),
             ports_line("lingering", ports["lingering"]["count"], "%s (closed connections in TIME_WAIT: free for "
                        "servers that set SO_REUSEADDR)" % ", ".join(map(str, ports["lingering"]["ports"][:5]))
                        if ports["lingering"]["count"] else ""),
             ports_line("unsafe", ports["unsafe"]["count"], "refused by browsers%s" % (
                 "" if ports["unsafe"]["avoided"] else "; handed out anyway (allow_unsafe_ports)")),
             ports_line("OS-reserved", ports["os_reserved"]["count"], ", ".join(ports["os_reserved"]["ranges"][:5])),
             ports_line("ephemeral", ports["ephemeral"]["count"], "of the OS's range %s" % ports["ephemeral"]["range"]
                        if ports["ephemeral"]["range"] else "the OS's range is unknown"),
             ports_line("free", free["count"], "next: " + ", ".join(map(str, free["first"])) if free["first"] else "")]
    health, database = report["data_dir"], report["data_dir"]["database"]
    lines += ["Data directory %s" % health["path"],
              "  filesystem   %s" % ("%s at %s%s" % (health["filesystem"], health["mount_point"],
                                                     " (network: WAL is unsafe)" if health["network"] else "")
                                     if health["filesystem"] else "unknown"),
              "  writable     %s" % ("yes" if health["writable"] else "no (read commands still work)")]
    sharing = health["sharing"]
    if sharing and sharing["shared"]:
        lines.append("  shared       with group %s: %s" % (sharing["group"], "; ".join(
            "%s %s:%s %s" % (os.path.basename(f["path"]) or f["path"], f["owner"], f["group"], f["mode"])
            for f in sharing["files"])))
    if database["error"]:
        lines.append("  trop.db      %s" % database["error"])
    elif not database["exists"]:
        lines.append("  trop.db      not created yet")
    else:
        lines.append("  trop.db      %d bytes, WAL %d bytes, %s" % (
            database["size"], database["wal_size"], "not read" if database["schema_version"] is None else
            "schema %s, %d reservation(s)" % (database["schema_version"], database["reservations"])))
    leases = report["leases"]
    lines.append("Leases       %d live, %d dead (taken back when a port is needed, or by prune), %d unverifiable "
                 "(another host or pid namespace: only expire removes them)"
                 % (leases["live"], leases["dead"], leases["unverifiable"]))
    lines.append("Configuration (lowest layer first)")
    for layer in report["layers"]:
        settings = ", ".join(sorted(layer["settings"]))
        lines.append("  %-8s %s%s" % (layer["kind"], layer["source"], (": " + settings) if settings else ""))
    lines += ["Warning: %s" % w for w in report["warnings"]]
    lines += ["Problem: %s" % p["message"] for p in report["problems"]]
    lines.append("Status: %s" % ("healthy" if report["healthy"] else "unhealthy"))
    return "\n".join(lines)


# --- Python API ----------------------------------------------------------------


def _passes_to(operation):
    """Mark a Trop method that passes its keywords on to operation, whose signature declares them; say so."""
    def mark(method):
        method.operation = operation
        method.__doc__ = "%s\n\n        Keywords: %s (see %s)." % (
            (method.__doc__ or "").rstrip(), ", ".join(_params(operation)), operation.__name__)   # -OO: no docstring
        return method
    return mark


class Trop:
    """A reusable handle for Python programs: configuration resolved once, one connection.

    Options are the CLI's flags with underscores (data_dir, min, max,
    skip_occupancy_check, allow_unrelated_path, busy_timeout, ...).  The
    configuration files and environment are read when the handle is made
    (a group file, by each reserve_group/autoreserve/group_environment call);
    make a new handle to pick up changes.  Every call is still its own
    BEGIN IMMEDIATE transaction, so handles in many processes stay consistent,
    and threads may share a handle (calls take turns).  Close handles before
    moving or replacing trop.db: SQLite files must not be renamed while open.

        with trop.Trop(data_dir="/tmp/d") as t:
            port = t.reserve("/srv/app", tag="web")
    """

    def __init__(self, **options):
        unknown = sorted(set(options) - API_OPTIONS)
        if unknown:
            raise TypeError("unexpected option%s %s (options are the CLI's global and configuration flags "
                            "with underscores: %s)"
                            % ("s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(sorted(API_OPTIONS))))
        self._options = options
        self.session = _guard(lambda: Session(options, keep_open=True))

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @_passes_to(run_reserve)
    def reserve(self, path=None, tag=None, **params):
        """Reserve (or refresh) the port of (path, tag) and return it."""
        return _guard(lambda: run_reserve(self.session, path, tag, **params).port)

    @_passes_to(run_release)
    def release(self, path=None, tag=None, **params):
        """Release reservations at path (one tag, the untagged one, or everything beneath); returns how many."""
        return _guard(lambda: len(run_release(self.session, path, tag, **params).deletes))

    @_passes_to(run_group)
    def reserve_group(self, config_path, **params):
        """Reserve the group of a YAML file; returns {tag: port}."""
        return _guard(lambda: run_group(*group_session(self._options, self.session.cwd, config_path),
                                        **params).ports)

    @_passes_to(run_group)
    def autoreserve(self, **params):
        """Reserve the group of the trop.yaml found from the working directory; returns {tag: port}."""
        return _guard(lambda: run_group(*group_session(self._options, self.session.cwd), **params).ports)

    @_passes_to(run_group)
    def group_environment(self, config_path=None, **params):
        """{VARIABLE: "port"} for a group (autoreserve when config_path is None), as `trop run` sets them."""
        return _guard(lambda: run_group(*group_session(self._options, self.session.cwd, config_path),
                                        **params).environment())

    @_passes_to(run_list)
    def list(self, **params):
        """Reservations ordered by path then tag."""
        return _guard(lambda: run_list(self.session, **params))

    def projects(self):
        return _guard(lambda: run_projects(self.session))

    def port_info(self, port):
        """The Reservation holding port, or None."""
        return _guard(lambda: run_port_info(self.session, port)["reservation"])

    def prune(self, dry_run=False):
        """Remove reservations whose directory is certainly gone; returns the removed Reservations."""
        return _guard(lambda: run_cleanup(self.session, gone=True, unused=False, dry_run=dry_run).deletes)

    def expire(self, days=None, dry_run=False):
        """Remove reservations unused for more than days (default: configuration, else 30)."""
        return _guard(lambda: run_cleanup(self.session, gone=False, unused=True, days=_days(days),
                                          dry_run=dry_run).deletes)

    def autoclean(self, days=None, dry_run=False):
        """prune and expire in one transaction; returns the removed Reservations."""
        return _guard(lambda: run_cleanup(self.session, gone=True, unused=True, days=_days(days),
                                          dry_run=dry_run).deletes)

    @_passes_to(run_migrate)
    def migrate(self, source, target, **params):
        """Move reservations from source to target; returns [(old, new)] Reservations."""
        return _guard(lambda: run_migrate(self.session, source, target, **params).moves)

    @_passes_to(run_wait)
    def wait(self, path=None, tag=None, **params):
        """Wait until the reservation's port (or port, or every service of the group) accepts connections on
        127.0.0.1 or ::1; returns {port: (family, address, seconds)}.  Raises WaitTimeout (exit 1)."""
        return _guard(lambda: run_wait(self.session, path, tag, **params))

    @_passes_to(run_who)
    def who(self, port=None, **params):
        """Who holds port (or each reservation of path): [{port, reservation, listeners, verdict, detail}]."""
        return _guard(lambda: run_who(self.session, port, **params))


def _days(days):
    """The days argument of expire() and autoclean(): what --days takes."""
    return days if days is None else OPTION["days"].value_type.from_flag(OPTION["days"], days)


def _keywords(method):
    """The keywords Trop.<method> takes: its own, and its operation's when it passes them on (**params)."""
    func = getattr(Trop, method)
    return _params(func) + _params(getattr(func, "operation", _params))


def _with_handle(method, options, *args):
    """Module-level API: one short-lived handle per call; keywords of the method go to the call, the
    others (the option table's) to the handle."""
    params = _pick(options, *_keywords(method))
    with Trop(**options) as handle:
        return getattr(handle, method)(*args, **params)


def _api(method):
    """Document a module-level function of Trop.<method>: its keywords and the options, from their declarations."""
    def document(func):
        keywords = [name for name in _keywords(method) if name not in func.__code__.co_varnames[:2]]
        options = [option.name for option in OPTIONS if option.name in API_OPTIONS]
        func.__doc__ = "%s\n\n    Keywords: %s.  Options (the CLI's flags with underscores): %s." % (
            (func.__doc__ or "").rstrip(), ", ".join(keywords), ", ".join(options))
        return func
    return document


@_api("reserve")
def reserve(path=None, tag=None, **options):
    """Reserve the port for (path, tag) and return it; the same call returns the same port.

    Raises a TropError subclass (with .exit_code) on failure.
    """
    return _with_handle("reserve", options, path, tag)


@_api("release")
def release(path=None, tag=None, **options):
    """Release reservations at path; returns how many."""
    return _with_handle("release", options, path, tag)


@_api("reserve_group")
def reserve_group(config_path, **options):
    """Reserve the group of a YAML file; returns {tag: port}."""
    return _with_handle("reserve_group", options, config_path)


@_api("autoreserve")
def autoreserve(**options):
    """Reserve the group of the nearest trop.yaml; returns {tag: port}."""
    return _with_handle("autoreserve", options)


@_api("list")
def list_reservations(**options):
    """All reservations, ordered by path then tag."""
    return _with_handle("list", options)


@_api("projects")
def list_projects(**options):
    """Distinct project names, sorted."""
    return _with_handle("projects", options)


@_api("port_info")
def port_info(port, **options):
    """The Reservation holding port, or None."""
    return _with_handle("port_info", options, port)


@_api("prune")
def prune(**options):
    """Remove reservations whose directory is gone; returns the removed Reservations."""
    return _with_handle("prune", options)


@_api("expire")
def expire(**options):
    """Remove reservations unused for more than days; returns the removed Reservations."""
    return _with_handle("expire", options)


@_api("autoclean")
def autoclean(**options):
    """prune + expire in one transaction; returns the removed Reservations."""
    return _with_handle("autoclean", options)


@_api("migrate")
def migrate(source, target, **options):
    """Move reservations from source to target; returns [(old, new)]."""
    return _with_handle("migrate", options, source, target)


@_api("wait")
def wait(path=None, tag=None, **options):
    """Wait until a reserved port accepts connections; see Trop.wait."""
    return _with_handle("wait", options, path, tag)


@_api("who")
def who(port=None, **options):
    """Who holds port, or each reservation of path; see Trop.who."""
    return _with_handle("who", options, port)


def data_dir(**options):
    """The data directory trop would use."""
    return resolve_data_dir(options.get("data_dir"))


class ReservedPort(int):
    """A reserved port number that can also wait for its server: port.wait(timeout=30, http=None)."""

    def wait(self, timeout=30.0, interval=0.25, http=None):
        """Block until something accepts connections on this port (127.0.0.1 or ::1); raises WaitTimeout."""
        return wait_for_ports([int(self)], timeout, interval, http)[int(self)]


class reservation:
    """Context manager for test suites: reserve a port on entry, release it on exit.

        with trop.reservation(tag="test_api") as port:
            start_server(port)

    The port is leased to this process (lease=False: an ordinary reservation): copies of a test suite run at
    once get distinct ports, a lone run gets the same port every time, and a killed run's port comes back.
    Works the same under unittest and pytest (see also the `trop_port` fixture).
    """

    def __init__(self, path=None, tag=None, lease=True, **options):
        self.path, self.tag, self.lease, self.options = path, tag, lease, options
        self.port = None

    def __enter__(self):
        if self.lease:
            try:
                Holder.of(os.getpid())
            except LibraryError:                # no way to read start times here: an ordinary reservation
                self.lease = False
        holder = {"holder": os.getpid()} if self.lease else {}
        self.port = ReservedPort(reserve(self.path, self.tag, **dict(self.options, **holder)))
        return self.port

    def __exit__(self, *exc):
        options = {name: value for name, value in self.options.items() if name in API_OPTIONS or name == "force"}
        if self.lease:
            release(self.path, self.tag, holder=os.getpid(), **options)
        else:
            release(self.path, self.tag, untagged_only=self.tag is None, **options)


def pytest_configure(config):
    """pytest plugin hook (entry point `pytest11`): adds the `trop_port` fixture.

    Only pytest calls this, with pytest already loaded; trop itself never imports it.
    """
    pytest = sys.modules["pytest"]

    class TropFixtures:
        @pytest.fixture
        def trop_port(self, request):
            """A port reserved for this test (tag = the test's node id), released afterwards.

            It is an int that can also wait for its server: trop_port.wait(timeout=30, http="/health").
            """
            with reservation(tag=request.node.nodeid, allow_unrelated_path=True) as port:
                yield port

    config.pluginmanager.register(TropFixtures(), "trop-fixtures")


def _pick(options, *names):
    return {name: options.pop(name) for name in names if name in options}


# --- Shell completions (generated from the argparse model) ---------------------


COMPLETION_SHELLS = ("bash", "elvish", "fish", "powershell", "zsh")

# flags: option strings ([] for positionals); value: takes an argument;
# choices: completable values or None; completes: 'file' | 'dir' | None;
# multi: may repeat (append/count or nargs */+)
_CompletionArg = namedtuple("_CompletionArg", "flags help value choices completes multi name")
_CompletionCommand = namedtuple("_CompletionCommand", "names help args")

# Words we embed unquoted in completion word lists (compgen -W, zsh (...),
# fish -a are expanded by the shell): anything else is dropped, never risked.
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_.,+/@=-]+$")
_HINTS = {
    "bash": ["#   {p} completions bash > ~/.local/share/bash-completion/completions/{p}",
             "# Or source it directly in ~/.bashrc:",
             '#   eval "$({p} completions bash)"'],
    "zsh": ["#   {p} completions zsh > ~/.zsh/completions/_{p}",
            "# Make sure ~/.zsh/completions is in your $fpath",
            "# Or add to ~/.zshrc:",
            '#   eval "$({p} completions zsh)"'],
    "fish": ["#   {p} completions fish > ~/.config/fish/completions/{p}.fish",
             "# Or add to config.fish:",
             "#   {p} completions fish | source"],
    "powershell": ["#   {p} completions powershell > $PROFILE",
                   "# Or run:",
                   "#   {p} completions powershell | Out-String | Invoke-Expression"],
    "elvish": [],
}


def completion_header(shell, prog="trop"):
    """Install hints printed to stderr before the script (none for elvish)."""
    lines = ["# Generating %s completion script" % shell,
             "# Run the following command to enable completions:"]
    lines += [h.format(p=prog) for h in _HINTS.get(shell, [])]
    return "\n".join(lines) + "\n\n"


def completion_script(parser, shell, prog="trop"):
    """Return the completion script for `shell` ('bash'|'zsh'|'fish'|'powershell'|'elvish').

    Shape supported: `prog [global opts] SUBCOMMAND [opts] [positionals]`.  As
    argparse parses it, the global options come before SUBCOMMAND and only the
    subcommand's own options after it, so that is all each place offers.
    """
    emit = {"bash": _bash_script, "zsh": _zsh_script, "fish": _fish_script,
            "powershell": _pwsh_script, "elvish": _elvish_script}.get(shell)
    if emit is None:
        raise ValueError("unsupported shell: %r" % (shell,))
    global_args, subs = _completion_model(parser)
    return emit(prog, global_args, subs)


# -- model -------------------------------------------------------------------
def _clean_help(text, action=None, prog=""):
    """Expand argparse %(...)s placeholders and collapse whitespace to one line."""
    argparse = _argparse()
    text = text or ""
    if action is not None and "%" in text:
        params = dict((k, v) for k, v in vars(action).items()
                      if v is not argparse.SUPPRESS)
        params["prog"] = prog
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        try:
            text = text % params
        except (KeyError, TypeError, ValueError):
            pass
    return " ".join(text.split())


def _tokens(value):
    return set(t for t in re.split(r"[^a-z0-9]+", str(value or "").lower()) if t)


def _completion_arg(action, prog):
    argparse = _argparse()
    value = action.nargs != 0
    choices, completes = None, None
    if value and action.choices is not None:
        try:
            if len(action.choices) <= 200:          # never enumerate range(65536)
                choices = [str(c) for c in action.choices if _SAFE_WORD.match(str(c))]
        except TypeError:
            pass
    if value and choices is None:
        metavar = action.metavar if isinstance(action.metavar, str) else ""
        words = _tokens(action.dest) | _tokens(metavar)
        if words & {"dir", "directory"}:
            completes = "dir"
        elif words & {"path", "file", "filename"}:
            completes = "file"
    multi = (type(action).__name__ in ("_AppendAction", "_AppendConstAction",
                                       "_CountAction", "_ExtendAction")
             or action.nargs in ("*", "+", argparse.REMAINDER))
    flags = [f for f in action.option_strings if _SAFE_WORD.match(f)]
    name = action.metavar if isinstance(action.metavar, str) else action.dest
    return _CompletionArg(flags, _clean_help(action.help, action, prog), value, choices,
                          completes, multi, str(name or "value").upper() if flags else str(name))


def _completion_args(parser):
    """Visible options and positionals of one parser (subparsers excluded)."""
    argparse = _argparse()
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        arg = _completion_arg(a, parser.prog)
        if arg.flags or not a.option_strings:
            out.append(arg)
    return out


def _completion_model(parser):
    """Flatten the parser into (global args, [_CSub]) so emitters stay simple."""
    argparse = _argparse()
    global_args = [a for a in _completion_args(parser) if a.flags]
    subs = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = dict((id(action.choices.get(ca.dest)), ca.help)
                     for ca in action._choices_actions)
        seen = {}
        for name, sub in action.choices.items():
            if id(sub) in seen:                     # alias of an earlier name
                if _SAFE_WORD.match(name):
                    seen[id(sub)].names.append(name)
                continue
            help_ = helps.get(id(sub), "")
            if help_ == argparse.SUPPRESS or not _SAFE_WORD.match(name):
                continue
            help_ = _clean_help(help_ or sub.description or "")
            seen[id(sub)] = _CompletionCommand([name], help_, _completion_args(sub))
            subs.append(seen[id(sub)])
    return global_args, subs


def _positionals(args):
    return [a for a in args if not a.flags]


def _c_ident(prog):
    return "_" + re.sub(r"[^A-Za-z0-9_]", "_", prog)


def _sh_quote(s):
    """POSIX single quotes (bash, zsh)."""
    return "'" + s.replace("'", "'\\''") + "'"


# -- bash ----------------------------------------------------------------------
def _bash_script(prog, global_args, subs):
    fn = _c_ident(prog)

    def pattern(flags):
        return "|".join(_sh_quote(f) for f in flags)

    def words(ws):
        return _sh_quote(" ".join(ws))

    def context(args, flags_also, top_words):
        """Body of one `case "$sub"` branch: option values, then words."""
        out = ['            case "$prev" in']
        for a in args:
            if not (a.flags and a.value):
                continue
            if a.choices is not None:
                act = "COMPREPLY=( $(compgen -W %s -- \"$cur\") )" % words(a.choices)
            elif a.completes:
                act = "%s_files %s" % (fn, a.completes)
            else:
                act = ":"
            out.append("                %s) %s; return 0 ;;" % (pattern(a.flags), act))
        out.append("            esac")
        pos = _positionals(args)
        flag_words = [f for a in args if a.flags for f in a.flags]
        extra = top_words + [c for a in pos for c in (a.choices or [])]
        files = [a.completes for a in pos if a.completes and a.choices is None]
        out.append('            case "$cur" in')
        out.append("                -*) COMPREPLY=( $(compgen -W %s -- \"$cur\") ) ;;"
                   % words(flag_words))
        if extra or files:
            body = []
            if files:
                body.append("%s_files %s" % (fn, "dir" if set(files) == {"dir"} else "file"))
            if extra:
                body.append("COMPREPLY+=( $(compgen -W %s -- \"$cur\") )" % words(extra))
            out.append("                *) %s ;;" % "; ".join(body))
        elif not flags_also:
            out.append("                *) ;;")
        else:
            out.append("                *) COMPREPLY=( $(compgen -W %s -- \"$cur\") ) ;;"
                       % words(flag_words))
        out.append("            esac")
        return out

    gvalue = [f for a in global_args if a.value for f in a.flags]
    lines = [
        "# bash completion for %s (generated)" % prog,
        "%s_files() {" % fn,
        "    local IFS=$'\\n'",
        "    compopt -o filenames 2>/dev/null",
        "    if [ \"$1\" = dir ]; then",
        "        COMPREPLY=( $(compgen -d -- \"$cur\") )",
        "    else",
        "        COMPREPLY=( $(compgen -f -- \"$cur\") )",
        "    fi",
        "}",
        "",
        "%s() {" % fn,
        "    local cur prev sub i w",
        "    COMPREPLY=()",
        "    cur=\"${COMP_WORDS[COMP_CWORD]}\"",
        "    prev=\"\"",
        "    [ \"$COMP_CWORD\" -gt 0 ] && prev=\"${COMP_WORDS[COMP_CWORD-1]}\"",
        "    # `--opt=value` is split into three words by COMP_WORDBREAKS",
        "    if [ \"$cur\" = \"=\" ]; then",
        "        cur=\"\"",
        "    elif [ \"$prev\" = \"=\" ] && [ \"$COMP_CWORD\" -gt 1 ]; then",
        "        prev=\"${COMP_WORDS[COMP_CWORD-2]}\"",
        "    fi",
        "    # the subcommand is the first word that is neither an option nor its value",
        "    sub=\"\"",
        "    i=1",
        "    while [ \"$i\" -lt \"$COMP_CWORD\" ]; do",
        "        w=\"${COMP_WORDS[i]}\"",
        "        case \"$w\" in",
    ]
    if gvalue:
        lines.append("            %s) i=$((i+1)); [ \"${COMP_WORDS[i]-}\" = \"=\" ] && i=$((i+1)) ;;"
                     % pattern(gvalue))
    lines += [
        "            -*) ;;",
        "            *) sub=\"$w\"; break ;;",
        "        esac",
        "        i=$((i+1))",
        "    done",
        "    case \"$sub\" in",
        "        '')",
    ]
    lines += context(global_args, False, [n for s in subs for n in s.names])
    lines.append("            ;;")
    for s in subs:
        lines.append("        %s)" % pattern(s.names))
        lines += context(s.args, True, [])
        lines.append("            ;;")
    lines += [
        "    esac",
        "    return 0",
        "}",
        "",
        "complete -F %s %s" % (fn, _sh_quote(prog)),
        "",
    ]
    return "\n".join(lines)


# -- zsh -----------------------------------------------------------------------
def _zsh_esc(text):
    """Escape for an _arguments spec field: backslash, brackets, colon."""
    for ch in ("\\", "[", "]", ":"):
        text = text.replace(ch, "\\" + ch)
    return text


def _zsh_specs(args):
    out = []
    for a in args:
        if a.choices is not None:
            action = "(%s)" % " ".join(a.choices)
        elif a.completes == "dir":
            action = "_files -/"
        elif a.completes == "file":
            action = "_files"
        else:
            action = " "
        if not a.flags:
            out.append("%s:%s:%s" % ("*" if a.multi else "", _zsh_esc(a.name), action))
            continue
        excl = "(%s)" % " ".join(a.flags) if len(a.flags) > 1 and not a.multi else ""
        for f in a.flags:
            spec = excl + ("*" if a.multi else "") + f
            if a.value:
                spec += "=" if f.startswith("--") else "+"
            spec += "[%s]" % _zsh_esc(a.help)
            if a.value:
                spec += ":%s:%s" % (_zsh_esc(a.name), action)
            out.append(spec)
    return [_sh_quote(s) for s in out]


def _zsh_script(prog, global_args, subs):
    fn = _c_ident(prog)
    ind = " " * 8
    lines = [
        "#compdef %s" % prog,
        "",
        "# zsh completion for %s (generated)" % prog,
        "%s() {" % fn,
        "    local curcontext=\"$curcontext\" state line ret=1",
        "    typeset -A opt_args",
        "",
        "    _arguments -C -s -S \\",
    ]
    lines += [ind + s + " \\" for s in _zsh_specs(global_args)]
    lines += [
        ind + "'1: :%s_commands' \\" % fn,
        ind + "'*:: :->args' && ret=0",
        "",
        "    case $state in",
        "    (args)",
        "        curcontext=\"${curcontext%%:*:*}:%s-command-$line[1]:\"" % prog,
        "        case $line[1] in",
    ]
    for s in subs:
        specs = _zsh_specs(s.args)
        lines.append("        (%s)" % "|".join(_sh_quote(n) for n in s.names))
        if specs:
            lines.append("            _arguments -s -S \\")
            lines += [ind + "    " + sp + " \\" for sp in specs]
            lines.append(ind + "    && ret=0")
        else:
            lines.append("            _message 'no more arguments' && ret=0")
        lines.append("            ;;")
    lines += [
        "        esac",
        "        ;;",
        "    esac",
        "    return ret",
        "}",
        "",
        "%s_commands() {" % fn,
        "    local -a commands",
        "    commands=(",
    ]
    for s in subs:
        for n in s.names:
            lines.append(ind + _sh_quote("%s:%s" % (n.replace(":", "\\:"), s.help)))
    lines += [
        "    )",
        "    _describe -t commands %s commands \"$@\"" % _sh_quote(prog + " command"),
        "}",
        "",
        "if [ \"$funcstack[1]\" = %s ]; then" % _sh_quote(fn),
        "    %s \"$@\"" % fn,
        "else",
        "    compdef %s %s" % (fn, _sh_quote(prog)),
        "fi",
        "",
    ]
    return "\n".join(lines)


# -- fish ----------------------------------------------------------------------
def _fish_quote(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_line(prog, cond, a):
    parts = ["complete -c", _fish_quote(prog)]
    if cond:
        parts += ["-n", _fish_quote(cond)]
    for f in a.flags:
        if f.startswith("--"):
            parts += ["-l", f[2:]]
        elif len(f) == 2:
            parts += ["-s", f[1:]]
        else:
            parts += ["-o", f[1:]]
    if a.value or not a.flags:
        if a.choices is not None:
            parts += ["-r" if a.flags else "", "-f", "-a", _fish_quote(" ".join(a.choices))]
        elif a.completes == "dir":
            parts += ["-r" if a.flags else "", "-f", "-a",
                      "'(__fish_complete_directories (commandline -ct))'"]
        elif a.completes == "file":
            parts += ["-r", "-F"]
        elif a.flags:
            parts += ["-x"]
    if a.help:
        parts += ["-d", _fish_quote(a.help)]
    return " ".join(p for p in parts if p)


def _fish_script(prog, global_args, subs):
    fn = "_" + _c_ident(prog)
    q = _fish_quote(prog)
    gvalue = [f for a in global_args if a.value for f in a.flags]
    # fish's own __fish_use_subcommand / __fish_seen_subcommand_from take the
    # value of `--data-dir DIR` for the subcommand: find it as argparse does.
    lines = [
        "# fish completion for %s (generated)" % prog,
        "function %s_subcommand --description %s" % (
            fn, _fish_quote("Print the %s subcommand on the command line" % prog)),
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l skip 0",
        "    for w in $words",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        switch $w",
    ]
    if gvalue:
        lines += ["            case %s" % " ".join(_fish_quote(f) for f in gvalue),
                  "                set skip 1"]
    lines += [
        "            case '-*'",
        "            case '*'",
        "                echo $w",
        "                return 0",
        "        end",
        "    end",
        "    return 1",
        "end",
        "",
        "function %s_needs_subcommand" % fn,
        "    not %s_subcommand >/dev/null" % fn,
        "end",
        "",
        "function %s_using_subcommand" % fn,
        "    set -l sub (%s_subcommand); or return 1" % fn,
        "    contains -- $sub $argv",
        "end",
        "",
    ]
    top = "%s_needs_subcommand" % fn
    lines.append("complete -c %s -n %s -f" % (q, _fish_quote(top)))
    lines += [_fish_line(prog, top, a) for a in global_args]
    for s in subs:
        for n in s.names:
            line = "complete -c %s -n %s -f -a %s" % (q, _fish_quote(top), _fish_quote(n))
            lines.append(line + (" -d %s" % _fish_quote(s.help) if s.help else ""))
    for s in subs:
        cond = "%s_using_subcommand %s" % (fn, " ".join(s.names))
        pos = _positionals(s.args)
        if not any(a.completes == "file" and a.choices is None for a in pos):
            lines.append("complete -c %s -n %s -f" % (q, _fish_quote(cond)))
        lines += [_fish_line(prog, cond, a) for a in s.args
                  if a.flags or a.choices is not None or a.completes == "dir"]
    return "\n".join(lines) + "\n"


# -- PowerShell ----------------------------------------------------------------
def _ps_quote(text):
    """Single-quoted PowerShell string; typographic single quotes also delimit."""
    return "'" + re.sub("(['\u2018\u2019\u201a\u201b])", r"\1\1", text) + "'"


def _ps_list(items):
    return "@(%s)" % ", ".join(_ps_quote(i) for i in items)


def _ps_result(text, result_type, tip):
    return "[CompletionResult]::new(%s, %s, [CompletionResultType]::%s, %s)" % (
        _ps_quote(text), _ps_quote(text), result_type, _ps_quote(tip or text))


def _ps_context(args, top_subs):
    ind = " " * 12
    out = []
    for a in args:
        if a.flags and a.value:
            vals = "; ".join(_ps_result(c, "ParameterValue", c) for c in a.choices or [])
            out.append(ind + "if (%s -contains $prev) { %s%sbreak }"
                       % (_ps_list(a.flags), vals, "; " if vals else ""))
    pos = _positionals(args)
    choices = [c for a in pos for c in (a.choices or [])]
    if choices or any(a.completes for a in pos):
        vals = "; ".join(_ps_result(c, "ParameterValue", c) for c in choices)
        out.append(ind + "if (-not $wordToComplete.StartsWith('-')) { %s%sbreak }"
                   % (vals, "; " if vals else ""))
    for a in args:
        for f in a.flags:
            out.append(ind + _ps_result(f, "ParameterName", a.help))
    for s in top_subs:
        for n in s.names:
            out.append(ind + _ps_result(n, "ParameterValue", s.help))
    out.append(ind + "break")
    return out


def _pwsh_script(prog, global_args, subs):
    gvalue = [f for a in global_args if a.value for f in a.flags]
    lines = [
        "# PowerShell completion for %s (generated)" % prog,
        "using namespace System.Management.Automation",
        "using namespace System.Management.Automation.Language",
        "",
        "Register-ArgumentCompleter -Native -CommandName %s -ScriptBlock {" % _ps_quote(prog),
        "    param($wordToComplete, $commandAst, $cursorPosition)",
        "",
        "    # words before the one under the cursor",
        "    $words = @($commandAst.CommandElements |",
        "        Where-Object { $_.Extent.EndOffset -lt $cursorPosition } |",
        "        ForEach-Object { $_.Extent.Text })",
        "    $globalValueOpts = %s" % _ps_list(gvalue),
        "    $sub = ''",
        "    for ($i = 1; $i -lt $words.Count; $i++) {",
        "        if ($globalValueOpts -contains $words[$i]) { $i++; continue }",
        "        if ($words[$i].StartsWith('-')) { continue }",
        "        $sub = $words[$i]; break",
        "    }",
        "    $prev = if ($words.Count -gt 1) { $words[-1] } else { '' }",
        "",
        "    $completions = @(switch ($sub) {",
        "        '' {",
    ]
    lines += _ps_context(global_args, subs)
    lines.append("        }")
    for s in subs:
        lines.append("        { %s -contains $_ } {" % _ps_list(s.names))
        lines += _ps_context(s.args, [])
        lines.append("        }")
    lines += [
        "    })",
        "",
        "    $completions |",
        "        Where-Object { $_.CompletionText.StartsWith($wordToComplete, "
        "[StringComparison]::OrdinalIgnoreCase) } |",
        "        Sort-Object -Property ListItemText",
        "}",
        "",
    ]
    return "\n".join(lines)


# -- elvish --------------------------------------------------------------------
def _elv_quote(text):
    return "'" + text.replace("'", "''") + "'"


def _elv_list(items):
    return "[%s]" % " ".join(_elv_quote(i) for i in items)


def _elv_context(args, top_subs):
    ind = " " * 8
    branches = []
    for a in args:
        if a.flags and a.value:
            if a.choices is not None:
                body = "values %s" % " ".join(_elv_quote(c) for c in a.choices)
            elif a.completes:
                body = "files"
            else:
                body = "nop"
            branches.append(("(has-value %s $prev)" % _elv_list(a.flags), body))
    pos = _positionals(args)
    choices = [c for a in pos for c in (a.choices or [])]
    if choices or any(a.completes for a in pos):
        body = []
        if any(a.completes and a.choices is None for a in pos):
            body.append("files")
        if choices:
            body.append("values %s" % " ".join(_elv_quote(c) for c in choices))
        branches.append(("(and (eq $pre '') (not (str:has-prefix $cur -)))", "; ".join(body)))
    cands = ["cand %s %s" % (_elv_quote(f), _elv_quote(a.help or f))
             for a in args for f in a.flags]
    cands += ["cand %s %s" % (_elv_quote(n), _elv_quote(s.help or n))
              for s in top_subs for n in s.names]
    out = []
    for i, (cond, body) in enumerate(branches):
        out.append(ind + ("if " if i == 0 else "} elif ") + cond + " {")
        out.append(ind + "    " + body)
    if branches:
        out.append(ind + "} else {")
        out += [ind + "    " + c for c in cands or ["nop"]]
        out.append(ind + "}")
    else:
        out += [ind + c for c in cands or ["nop"]]
    return out


def _elvish_script(prog, global_args, subs):
    gvalue = [f for a in global_args if a.value for f in a.flags]
    lines = [
        "# elvish completion for %s (generated)" % prog,
        "use str",
        "",
        "set edit:completion:arg-completer[%s] = {|@words|" % _elv_quote(prog),
        "    var cur = $words[-1]",
        "    var prev = ''",
        "    if (> (count $words) 2) { set prev = $words[-2] }",
        "    # `--opt=value`: complete the value, as `--opt=` + candidate",
        "    var pre = ''",
        "    if (and (str:has-prefix $cur --) (str:contains $cur =)) {",
        "        var parts = [(str:split &max=2 = $cur)]",
        "        set prev = $parts[0]",
        "        set pre = $parts[0]'='",
        "        set cur = $parts[1]",
        "    }",
        "    fn cand {|text desc|",
        "        if (eq $pre '') {",
        "            edit:complex-candidate $text &display=$text' -- '$desc",
        "        }",
        "    }",
        "    fn values {|@texts|",
        "        for text $texts { put $pre$text }",
        "    }",
        "    fn files {",
        "        edit:complete-filename $cur | each {|c|",
        "            edit:complex-candidate $pre$c[stem] &code-suffix=$c[code-suffix] &display=$c[stem]",
        "        }",
        "    }",
        "    # the subcommand is the first word that is neither an option nor its value",
        "    var sub = ''",
        "    var skip = $false",
        "    for w $words[1..-1] {",
        "        if $skip { set skip = $false; continue }",
        "        if (has-value %s $w) { set skip = $true; continue }" % _elv_list(gvalue),
        "        if (str:has-prefix $w -) { continue }",
        "        set sub = $w",
        "        break",
        "    }",
        "    if (eq $sub '') {",
    ]
    lines += _elv_context(global_args, subs)
    for s in subs:
        lines.append("    } elif (has-value %s $sub) {" % _elv_list(s.names))
        lines += _elv_context(s.args, [])
    lines += ["    }", "}", ""]
    return "\n".join(lines)


# --- MCP server: the operations as tools, JSON-RPC on stdin/stdout -------------
#
# `trop mcp` serves the Model Context Protocol over stdio: one JSON-RPC 2.0
# message a line.  Both eras of the protocol: the stateless revision 2026-07-28
# (every request carries its version and the client's capabilities in _meta;
# server/discover; resultType in every result) and the handshake revisions
# 2024-11-05 to 2025-11-25 (initialize, then requests without _meta).  Each
# tool call is one operation with a fresh Session, so it runs the same planners
# and transactions as the command line.  Nothing but protocol goes to stdout.

MCP_MODERN = "2026-07-28"
MCP_LEGACY = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
_MCP_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
_MCP_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
MCP_WAIT_LIMIT = 120.0          # seconds: a tool call must not hang the client

# JSON Schemas of the operations' own parameters (the settings' come from OPTIONS); a parameter whose
# default is False is a boolean.
_PARAMETER_SCHEMAS = {
    "path": {"type": "string", "description": "directory (default: the server's working directory)"},
    "tag": {"type": "string", "description": "a separate port of the directory"},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "holder": {"type": "integer", "minimum": 1, "description": "pid of the process that holds the lease"},
    "days": OPTION["days"].value_type.schema,
    "service": {"type": "string", "description": "a service (tag) of the group, or of the directory"},
    "scheme": {"type": "string"}, "host": {"type": "string"}, "route": {"type": "string"},
    "config": {"type": "string", "description": "a group file (default: trop.yaml found from the directory)"},
    "timeout": {"type": "number", "minimum": 0, "maximum": MCP_WAIT_LIMIT},
    "interval": {"type": "number", "minimum": 0.01, "maximum": 10},
    "http": {"type": "string", "description": "also require GET of this path to answer below 500"},
    "filter_project": {"type": "string"}, "filter_tag": {"type": "string"}, "filter_path": {"type": "string"},
}


def _mcp_reserve(session, **params):
    plan = run_reserve(session, **params)
    return {"port": plan.port, "warnings": plan.warnings}, "port %d" % plan.port


def _mcp_release(session, **params):
    plan = run_release(session, **params)
    released = [reservation_record(r) for r in plan.deletes]
    return {"released": released, "warnings": plan.warnings}, "released %d reservation(s)" % len(released)


def _mcp_list(session, **params):
    rows = [reservation_record(r) for r in run_list(session, **params)]
    return {"reservations": rows}, "%d reservation(s)" % len(rows)


def _mcp_reserve_group(session, config=None, task=None, force=False, dry_run=False, holder=None):
    scoped, config_file, group_dir = group_session(session.options, session.cwd, config)
    plan = run_group(scoped, config_file, group_dir, task, force, dry_run, holder)
    return ({"ports": plan.ports, "environment": plan.environment(), "path": group_dir, "warnings": plan.warnings},
            ", ".join("%s=%s" % item for item in plan.environment().items()))


def _mcp_who(session, **params):
    reports = run_who(session, **params)
    return {"reports": reports}, "; ".join("%d: %s" % (r["port"], r["detail"]) for r in reports)


def _mcp_wait(session, timeout, path=None, tag=None, port=None, group=False, config=None, interval=0.25, http=None):
    ready = run_wait(session, path, tag, port, group, config, min(max(0.0, timeout), MCP_WAIT_LIMIT),
                     min(max(0.01, interval), 10.0), http)
    return ({"ready": {str(p): {"family": f, "address": a, "seconds": round(t, 3)} for p, (f, a, t) in ready.items()}},
            "ready: %s" % ", ".join(str(p) for p in sorted(ready)))


def _mcp_doctor(session):
    report = diagnose(session)
    return report, "healthy" if report["healthy"] else "; ".join(p["message"] for p in report["problems"])


def _mcp_url(session, **params):
    found = run_url(session, **params)
    return found, found["url"]


# name -> (the function whose signature declares the parameters, runner, description, read-only)
MCP_TOOLS = {
    "reserve": (run_reserve, _mcp_reserve, "Reserve (or refresh) the stable port of a directory (and tag). "
                "Never pick a port yourself: ask this tool.", False),
    "release": (run_release, _mcp_release, "Release the reservations of a directory (one tag, or all).", False),
    "list": (run_list, _mcp_list, "List reservations, with the holder of leased ones.", True),
    "reserve_group": (_mcp_reserve_group, _mcp_reserve_group, "Reserve every service of the project's trop.yaml group "
                      "(or of config); returns {tag: port} and the environment variables to set.", False),
    "who": (run_who, _mcp_who, "Who holds a port (or each port of a directory): its reservation, its listeners "
            "and a verdict.", True),
    "wait": (_mcp_wait, _mcp_wait, "Wait until reserved ports accept connections; timeout (seconds) is required "
             "and at most %g." % MCP_WAIT_LIMIT, True),
    "doctor": (_mcp_doctor, _mcp_doctor, "Explain the port range port by port, and check the data directory.",
               True),
    "url": (run_url, _mcp_url, "The URL of a service: http://localhost:PORT of a group service or tag.", True),
}


def _mcp_parameters(name):
    """The parameters a tool passes to its operation (progress is the command line's)."""
    return [param for param in _params(MCP_TOOLS[name][0]) if param != "progress"]


def mcp_tool_schema(name):
    """The input JSON Schema of a tool: its operation's parameters, then every setting of the option table."""
    declared = MCP_TOOLS[name][0]
    names = _params(declared)
    defaults = dict(zip(names[len(names) - len(declared.__defaults__ or ()):], declared.__defaults__ or ()))
    properties, required = {}, []
    for param in _mcp_parameters(name):
        if param not in defaults:
            required.append(param)
        properties[param] = dict(_PARAMETER_SCHEMAS.get(param) or (
            {"type": "boolean"} if defaults.get(param) is False else {"type": "string"}))
    for option in OPTIONS:
        if option.name in API_OPTIONS and option.name not in properties and option.name not in ("verbose", "quiet"):
            properties[option.name] = dict(option.value_type.schema, description=option.help)
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def mcp_tools():
    return [{"name": name, "description": MCP_TOOLS[name][2], "inputSchema": mcp_tool_schema(name),
             "annotations": {"readOnlyHint": MCP_TOOLS[name][3], "destructiveHint": name == "release",
                             "openWorldHint": False}} for name in MCP_TOOLS]


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def mcp_call(name, arguments, base_options=None):
    """Run one tool: (structuredContent, text, is_error).  A trop error is a result, not an exception."""
    schema = mcp_tool_schema(name)
    arguments = dict(arguments or {})
    try:
        unknown = sorted(set(arguments) - set(schema["properties"]))
        if unknown:
            raise InvalidArguments("Invalid arguments: unknown argument%s %s for %s (known: %s)" % (
                "s" if len(unknown) > 1 else "", ", ".join(unknown), name, ", ".join(sorted(schema["properties"]))))
        missing = [param for param in schema.get("required", ()) if param not in arguments]
        if missing:
            raise InvalidArguments("Invalid arguments: %s needs %s" % (name, ", ".join(missing)))
        for key, value in arguments.items():
            wanted = schema["properties"][key]["type"]
            if not isinstance(value, _JSON_TYPES[wanted]) or (isinstance(value, bool) and wanted != "boolean"):
                raise InvalidArguments("Invalid arguments: %s must be %s %s, got %s" % (
                    key, "an" if wanted[0] in "aeiou" else "a", wanted, _json().dumps(value)))
        declared = _mcp_parameters(name)
        params = {k: v for k, v in arguments.items() if k in declared}
        options = dict(base_options or {}, **{k: v for k, v in arguments.items() if k not in declared})
        session = _guard(lambda: Session(options))
        structured, text = _guard(lambda: MCP_TOOLS[name][1](session, **params), "running the %s tool" % name)
        return structured, text, False
    except TropError as exc:
        return ({"error": str(exc), "exit_code": exc.exit_code, "exit_name": exit_name(exc)},
                "Error: %s" % str(exc), True)


def exit_name(exc):
    """The name of an error's exit code, as the README's table gives it (2 is a lock timeout or a usage error)."""
    if isinstance(exc, LockTimeout):
        return "EXIT_LOCK_TIMEOUT"
    names = [n for n, v in sorted(globals().items()) if n.startswith("EXIT_") and v == exc.exit_code
             and n != "EXIT_LOCK_TIMEOUT"]
    return names[0] if names else "EXIT_%d" % exc.exit_code


class McpServer:
    """One stdio connection: answers each message; remembers only whether a legacy client said initialize."""

    def __init__(self, options=None):
        self.options = options or {}
        self.legacy = None              # the version a legacy client agreed on with initialize

    def handle(self, line):
        """The response to one line (a dict), or None for a notification."""
        json = _json()
        try:
            message = json.loads(line)
        except ValueError as exc:
            return _rpc_error(None, -32700, "Parse error: %s" % exc)
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or \
                not isinstance(message.get("method"), str):
            return _rpc_error(message.get("id") if isinstance(message, dict) else None, -32600,
                              "Invalid Request: one JSON-RPC 2.0 object with a method (batches are not supported)")
        if "id" not in message:
            return None                 # notifications/initialized, notifications/cancelled, ...
        msg_id, method, params = message["id"], message["method"], message.get("params") or {}
        if isinstance(msg_id, bool) or not isinstance(msg_id, (str, int)):
            return _rpc_error(None, -32600, "Invalid Request: an id is a string or an integer")
        if not isinstance(params, dict):
            return _rpc_error(msg_id, -32602, "Invalid params: params must be an object")
        try:
            return {"jsonrpc": "2.0", "id": msg_id, "result": self.dispatch(method, params)}
        except _RpcError as exc:
            return _rpc_error(msg_id, exc.code, exc.message, exc.data)
        except Exception as exc:        # a bug: the client still gets its answer, and the server serves on
            raise _Unanswered(msg_id, exc)

    def dispatch(self, method, params):
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        if method == "initialize":
            asked = params.get("protocolVersion")
            self.legacy = asked if asked in MCP_LEGACY else MCP_LEGACY[-1]
            return {"protocolVersion": self.legacy, "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": _mcp_server_info(self.legacy), "instructions": _MCP_INSTRUCTIONS}
        if _MCP_VERSION_KEY in meta:
            version = meta[_MCP_VERSION_KEY]
            if version != MCP_MODERN:
                raise _RpcError(-32022, "Unsupported protocol version", {"supported": [MCP_MODERN],
                                                                         "requested": version})
            if not isinstance(meta.get(_MCP_CAPABILITIES_KEY), dict):
                raise _RpcError(-32602, "Invalid params: _meta needs %s" % _MCP_CAPABILITIES_KEY)
            result = self.serve(method, params, modern=True)
            result["resultType"] = "complete"
            result.setdefault("_meta", {})["io.modelcontextprotocol/serverInfo"] = _mcp_server_info(MCP_MODERN)
            return result
        if self.legacy is None:
            raise _RpcError(-32602, "Invalid params: a request carries %s and %s in _meta (protocol %s), or comes "
                            "after initialize" % (_MCP_VERSION_KEY, _MCP_CAPABILITIES_KEY, MCP_MODERN))
        if method == "ping":
            return {}
        return self.serve(method, params, modern=False)

    def serve(self, method, params, modern):
        if method == "server/discover" and modern:
            return {"supportedVersions": [MCP_MODERN], "capabilities": {"tools": {"listChanged": False}},
                    "instructions": _MCP_INSTRUCTIONS, "ttlMs": 0, "cacheScope": "public"}
        if method == "tools/list":
            result = {"tools": mcp_tools()}
            if modern:
                result.update(ttlMs=0, cacheScope="public")
            return result
        if method == "tools/call":
            name = params.get("name")
            if name not in MCP_TOOLS:
                raise _RpcError(-32602, "Unknown tool: %s" % (name,))
            if not isinstance(params.get("arguments", {}), dict):
                raise _RpcError(-32602, "Invalid params: arguments must be an object")
            structured, text, is_error = mcp_call(name, params.get("arguments"), self.options)
            return {"content": [{"type": "text", "text": text}], "structuredContent": structured,
                    "isError": is_error}
        raise _RpcError(-32601, "Method not found: %s" % method)


class _Unanswered(Exception):
    """A request that broke the server: serve_mcp reports it, answers its id with an internal error."""

    def __init__(self, msg_id, error):
        Exception.__init__(self, "%s: %s" % (type(error).__name__, error))
        self.msg_id = msg_id


class _RpcError(Exception):
    def __init__(self, code, message, data=None):
        Exception.__init__(self, message)
        self.code, self.message, self.data = code, message, data


def _rpc_error(msg_id, code, message, data=None):
    error = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": error}


def _mcp_server_info(version):
    info = {"name": "trop", "version": __version__}
    if version >= "2025-06-18":
        info["title"] = "trop port reservations"
    return info


_MCP_INSTRUCTIONS = ("trop hands out stable, collision-free TCP ports per directory (worktree) and tag. Never pick a "
                     "port yourself: call reserve (or reserve_group for the project's services), then use the port "
                     "it returns; release what you no longer need. url gives a service's URL, wait waits until a "
                     "server answers, who tells who holds a port.")


def serve_mcp(stdin, stdout, stderr, options=None):
    """Answer every line of stdin (bytes) on stdout (bytes) until end of file."""
    server = McpServer(options)
    json = _json()
    while True:
        line = stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            response = server.handle(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            response = _rpc_error(None, -32700, "Parse error: not UTF-8 (%s)" % exc)
        except _Unanswered as exc:      # a bug: say so on stderr, answer the client, serve on
            stderr.write(("trop mcp: internal error: %s\n" % exc).encode("utf-8", "backslashreplace"))
            stderr.flush()
            response = _rpc_error(exc.msg_id, -32603, "Internal error: %s" % exc)
        if response is not None:        # ASCII: a lone surrogate from the client cannot break the line
            stdout.write(json.dumps(response, separators=(",", ":")).encode("ascii") + b"\n")
            stdout.flush()


# --- Command line --------------------------------------------------------------

def _u16(text):
    try:
        return parse_port(text, allow_zero=True)        # 0 gets the reference's message from cli_port
    except ValueError:
        raise _argparse().ArgumentTypeError("invalid port '%s': expected a port, 1..65535" % text)


def _lower(text):
    return text.lower()


def _add_option(parser, name, suffix="", **overrides):
    """The flag of one row of OPTIONS."""
    option = OPTION[name]
    kwargs = dict(option.value_type.argument(), dest=option.name, help=option.help + suffix)
    kwargs.update(overrides)
    parser.add_argument(option.flag, **kwargs)


def _add_options(parser, group, suffix=""):
    """The flags of a group of OPTIONS, in table order."""
    for option in OPTIONS:
        if group in option.groups:
            _add_option(parser, option.name, suffix)


def _add_path(parser, what):
    parser.add_argument("--path", help="directory %s (default: $TROP_PATH, else the current directory)" % what)


def _add_dry_run(parser, what="show what would happen without writing"):
    parser.add_argument("--dry-run", action="store_true", help=what)


def _call(run, session, args, **given):
    """run(session, ...) with the parsed arguments of the same names: run's signature declares them once."""
    values = vars(args)
    return run(session, **dict({name: values[name] for name in _params(run) if name in values}, **given))


def _print_dry_run(lines, quiet=False):
    if not quiet:
        _err("Dry run - would perform the following actions:")
        for i, line in enumerate(lines, 1):
            _err("  %d. %s" % (i, line))


def _args_reserve(p):
    _add_path(p, "to reserve for")
    p.add_argument("--tag", help="reserve a separate port for this tag of the path")
    g = p.add_mutually_exclusive_group()
    _add_option(g, "project")
    g.add_argument("--clear-project", action="store_true", help="remove the recorded project")
    g = p.add_mutually_exclusive_group()
    _add_option(g, "task")
    g.add_argument("--clear-task", action="store_true", help="remove the recorded task")
    p.add_argument("--port", help="preferred port, used if free and inside the range")
    _add_options(p, "range")
    p.add_argument("--overwrite", action="store_true", help="re-allocate an existing reservation")
    p.add_argument("--ignore-occupied", action="store_true", help="accept a preferred port that is in use")
    p.add_argument("--ignore-exclusions", action="store_true", help="accept a preferred port that is excluded")
    p.add_argument("--force", action="store_true", help="overwrite, ignore the path guard and sticky fields")
    p.add_argument("--lease", action="store_true",
                   help="hold the port for a live process, the holder (default: trop's parent, the script or shell "
                        "that runs it): concurrent holders get distinct ports, a dead holder's port comes back")
    p.add_argument("--holder", metavar="PID", help="the lease's holder (implies --lease)")
    _add_options(p, "permissions")
    _add_options(p, "autoclean")
    _add_dry_run(p)
    _add_options(p, "occupancy")


def cmd_reserve(args):
    session = Session(vars(args))
    plan = _call(run_reserve, session, args)
    if args.dry_run:
        _print_dry_run(plan.describe(), session.quiet)
    else:
        _out(str(plan.port))
    if not session.quiet:
        for warning in plan.warnings:
            _warn(warning)
    return 0


def _args_release(p):
    _add_path(p, "to release")
    p.add_argument("--tag", help="release only this tag")
    p.add_argument("--untagged-only", action="store_true", help="release only the untagged reservation")
    p.add_argument("--recursive", action="store_true", help="also release every path beneath")
    p.add_argument("--force", action="store_true", help="ignore the path guard")
    p.add_argument("--holder", metavar="PID", help="release only the lease this process holds of --tag")
    _add_option(p, "allow_unrelated_path")
    _add_dry_run(p, "show what would be released")


def cmd_release(args):
    session = Session(vars(args))
    plan = _call(run_release, session, args)
    if session.quiet:
        return 0
    if args.dry_run:
        if args.recursive:
            _err("Dry run - would release %d reservation(s):" % len(plan.deletes))
            for line in plan.describe():
                _err("  - %s" % line)
        else:
            _print_dry_run(plan.describe())
        if plan.warnings:
            _err("Warnings:")
            for warning in plan.warnings:
                _err("  - %s" % warning)
        return 0
    if args.recursive:
        _err("Released %d reservation(s)" % len(plan.deletes))
    elif args.holder is not None and plan.freed and not plan.deletes:
        _err("Released the lease; the reservation it took over stays")
    else:
        _err("Released reservation successfully" if plan.deletes else "No reservation found (already released)")
    for warning in plan.warnings:
        _warn(warning)
    return 0


def _args_list(p):
    p.add_argument("--format", type=_lower, choices=OUTPUT_FORMATS,
                   help="output format (default: output_format from config, else table)")
    p.add_argument("--filter-project", help="only this project")
    p.add_argument("--filter-tag", help="only this tag")
    p.add_argument("--filter-path", help="only this path and paths beneath it")
    p.add_argument("--show-full-paths", action="store_true", help="do not shorten paths under $HOME")


def cmd_list(args):
    session = Session(vars(args))
    rows = _call(run_list, session, args)
    _out(format_reservations(rows, args.format or session.config["output_format"],
                             None if args.show_full_paths else home_dir()))
    return 0


def cmd_list_projects(args):
    session = Session(vars(args))
    projects = run_projects(session)
    if projects:
        _out("\n".join(projects))
    return 0


def _args_assert_reservation(p):
    _add_path(p, "to check")
    p.add_argument("--tag", help="tag of the reservation")
    p.add_argument("--not", dest="negate", action="store_true", help="succeed if no such reservation exists")


def cmd_assert_reservation(args):
    session = Session(vars(args))
    res = _call(run_assert_reservation, session, args)
    if res is not None and not session.quiet:
        _out(str(res.port))
    return 0


def _args_port(p):
    p.add_argument("port", metavar="PORT", type=_u16, help="port number")


def _args_assert_port(p):
    _args_port(p)
    p.add_argument("--not", dest="negate", action="store_true", help="succeed if the port is not reserved")


def cmd_assert_port(args):
    port = cli_port(args.port)
    run_assert_port(Session(vars(args)), port, args.negate)
    return 0


def _args_assert_data_dir(p):
    _add_option(p, "data_dir", help="data directory to check", default=_argparse().SUPPRESS)
    p.add_argument("--not", dest="negate", action="store_true", help="succeed if the directory does not exist")
    p.add_argument("--validate", action="store_true", help="also validate the database (read-only)")


def cmd_assert_data_dir(args):
    _call(run_assert_data_dir, Session(vars(args), scope="discover" if args.validate else None), args)
    return 0


def _args_port_info(p):
    _args_port(p)
    p.add_argument("--include-occupancy", action="store_true", help="also probe whether the port is in use")
    _add_options(p, "occupancy", " (requires --include-occupancy)")
    p.set_defaults(requires=("include_occupancy", [o.name for o in OPTIONS if "occupancy" in o.groups]))


def cmd_port_info(args):
    port = cli_port(args.port)
    info = run_port_info(Session(vars(args)), port, args.include_occupancy)
    _out("\n".join(format_port_info(info)))
    return 0


def _args_group(p, with_file=True, with_format=True):
    if with_file:
        p.add_argument("config_path", metavar="CONFIG_PATH", help="YAML file with a `reservations:` group")
    _add_option(p, "task")
    if with_format:
        p.add_argument("--format", choices=("export", "json", "dotenv", "human"), default="export",
                       help="output format (default: export)")
        p.add_argument("--shell", help="shell for export lines: bash, zsh, fish, powershell (default: detected)")
        p.add_argument("--write-env", metavar="FILE",
                       help="also write the variables into a managed section of FILE (e.g. .env.local)")
        p.add_argument("--allow-tracked", action="store_true", help="--write-env even to a file git tracks")
    p.add_argument("--force", action="store_true", help="replace an incompatible stored group")
    _add_options(p, "permissions")
    _add_dry_run(p, "show what would be reserved without writing")
    _add_options(p, "occupancy")


def _args_autoreserve(p):
    _args_group(p, with_file=False)


def _group_command(args, config_path):
    session, config_file, group_dir = group_session(vars(args), current_dir(), config_path)
    discovered = config_path is None
    shell = detect_shell(args.shell) if args.format == "export" and not args.dry_run else None
    plan = _call(run_group, session, args, config_file=config_file, group_dir=group_dir)
    if args.dry_run:
        _print_dry_run((["Discovered config: %s" % config_file] if discovered else []) + plan.describe(),
                       session.quiet)
        return 0
    _out(format_group(plan.spec, plan.ports, args.format, shell))
    written = args.write_env and run_write_env(args.write_env, plan.environment(), args.allow_tracked)
    if not session.quiet:
        if args.write_env:
            _err(("Wrote %d variable(s) to %s" if written else "%d variable(s) already up to date in %s")
                 % (len(plan.ports), args.write_env))
        if discovered:
            _err("Discovered config: %s" % config_file)
        _err("Reserved %d ports." % len(plan.ports))
        for warning in plan.warnings:
            _warn(warning)
    return 0


def cmd_reserve_group(args):
    return _group_command(args, args.config_path)


def cmd_autoreserve(args):
    return _group_command(args, None)


def _args_run(p):
    p.add_argument("--config", metavar="FILE", help="group file (default: discover trop.yaml from the cwd)")
    p.add_argument("--listen", action="store_true",
                   help="bind the group's ports and hand the sockets to COMMAND (systemd socket activation)")
    p.add_argument("--lease", action="store_true",
                   help="the group's ports are held by COMMAND while it runs, and come back when it dies")
    p.add_argument("--service", action="append", metavar="TAG",
                   help="with --listen: hand over only this service's sockets (repeatable), for a command that "
                        "serves only some of the group")
    _args_group(p, with_file=False, with_format=False)
    p.add_argument("argv", nargs=_argparse().REMAINDER, metavar="-- COMMAND [ARGS...]",
                   help="command to run with the group's variables in its environment")


def cmd_run(args):
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("trop run needs a command: trop run [OPTIONS] -- COMMAND [ARGS...]")
    session, config_file, group_dir = group_session(vars(args), current_dir(), args.config)
    plan, env = _call(run_prepare, session, args, config_file=config_file, group_dir=group_dir)
    variables = sorted(plan.environment().items())
    if args.dry_run:
        if not session.quiet:
            _err("Dry run - would run %s with %s" % (" ".join(argv), ", ".join("%s=%s" % kv for kv in variables)))
        return 0
    if not session.quiet:
        for warning in plan.warnings:
            _warn(warning)
    if session.verbose:
        listen = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] if args.listen else []
        for name in [n for n, _v in variables] + listen:
            _err("%s=%s" % (name, env[name]))
    return exec_command(argv, env)


def _args_prune(p):
    _add_dry_run(p, "show what would be removed without removing it")


def _args_expire(p):
    _add_option(p, "days")
    _add_dry_run(p, "show what would be removed without removing it")


def _cleanup_command(args, gone, unused):
    session = Session(vars(args))
    plan = run_cleanup(session, gone, unused, getattr(args, "days", None), args.dry_run)
    days = session.config["cleanup.expire_after_days"]
    total = len(plan.deletes)
    if session.quiet:
        if total:
            _out(str(total))
        return 0
    for warning in plan.warnings:
        _warn(warning)
    dry = args.dry_run
    if plan.dead:                       # listed first: taken back whatever the rule, as allocation would
        _err("%s %d lease(s) of dead holders:" % ("[DRY RUN] Would take back" if dry else "Took back", len(plan.dead)))
        for r in plan.dead:
            _err("  - Port %d: %s (tag: %s; its holder has died)" % (r.port, r.path, _quote(r.tag)))
        total -= len(plan.dead)
    now = int(time.time())
    age = (lambda r: (now - r.last_used_at) // 86400)
    if gone and unused:
        if dry:
            _err("[DRY RUN] Performing combined cleanup...")
        head = "%s %d total reservation(s)" % ("[DRY RUN] Would remove" if dry else "Removed", total)
        if session.verbose:
            _err(head + ":")
            _err("  Pruned: %d (non-existent paths)" % len(plan.pruned))
            _err("  Expired: %d (old reservations)" % len(plan.expired))
            if plan.pruned:
                _err("")
                _err("Pruned reservations:")
                for r in plan.pruned:
                    _err("  - Port %d: %s" % (r.port, r.path))
            if plan.expired:
                _err("")
                _err("Expired reservations:")
                for r in plan.expired:
                    _err("  - Port %d: %s (%d days old)" % (r.port, r.path, age(r)))
        else:
            _err(head + " (pruned: %d, expired: %d)" % (len(plan.pruned), len(plan.expired)))
    elif gone:
        if dry:
            _err("[DRY RUN] Scanning for reservations with non-existent paths...")
        head = "%s %d reservation(s)" % ("[DRY RUN] Would remove" if dry else "Removed", total)
        if session.verbose:
            _err(head + ":")
            for r in plan.pruned:
                _err("  - Port %d: %s (tag: %s, project: %s)" % (r.port, r.path, _quote(r.tag), _quote(r.project)))
        else:
            _err(head + " for non-existent paths")
    else:
        if dry:
            _err("[DRY RUN] Scanning for reservations unused for %d days..." % days)
        head = "%s %d reservation(s) older than %d days" % (
            "[DRY RUN] Would expire" if dry else "Expired", total, days)
        if session.verbose:
            _err(head + ":")
            for r in plan.expired:
                _err("  - Port %d: %s (%d days old, project: %s)" % (r.port, r.path, age(r), _quote(r.project)))
        else:
            _err(head)
    return 0


def cmd_prune(args):
    return _cleanup_command(args, gone=True, unused=False)


def cmd_expire(args):
    return _cleanup_command(args, gone=False, unused=True)


def cmd_autoclean(args):
    return _cleanup_command(args, gone=True, unused=True)


def _args_migrate(p):
    p.add_argument("--from", dest="source", metavar="PATH", required=True, help="path the reservations are at")
    p.add_argument("--to", dest="target", metavar="PATH", required=True, help="path to move them to")
    p.add_argument("--recursive", action="store_true", help="also move reservations beneath --from")
    p.add_argument("--force", action="store_true", help="overwrite reservations at the destination")
    _add_dry_run(p, "show the plan without changing anything")


def cmd_migrate(args):
    session = Session(vars(args))
    plan = _call(run_migrate, session, args)
    if session.quiet:
        if not args.dry_run:
            _out(plan.target)
        return 0
    lines = ["Migration plan:", "  From: %s" % plan.source, "  To:   %s" % plan.target,
             "  Mode: %s" % ("recursive" if args.recursive else "exact"), ""]
    if not plan.moves:
        lines.append("No reservations to migrate.")
        _err("\n".join(lines))
        return 0
    lines.append("Reservations to migrate (%d):" % len(plan.moves))
    for old, new in plan.moves:
        extra = "".join([", tag: %s" % old.tag if old.tag else "",
                         ", project: %s" % old.project if old.project else ""])
        lines.append("  %s -> %s (port %d%s)" % (old.path, new.path, old.port, extra))
    lines.append("")
    if plan.conflicts:
        lines.append("Conflicts at destination (%d) (will be overwritten):" % len(plan.conflicts))
        for c in plan.conflicts:
            lines.append("  %s" % c.path)
            if c.tag:
                lines.append("    (tag: %s)" % c.tag)
        lines.append("")
    if args.dry_run:
        lines.append("Dry run - no changes made.")
    else:
        lines += ["Migration complete:", "  Migrated: %d reservation(s)" % len(plan.moves)]
        if plan.conflicts:
            lines.append("  Conflicts resolved: %d" % len(plan.conflicts))
    _err("\n".join(lines))
    return 0


def _args_scan(p):
    _add_options(p, "range")
    p.add_argument("--autoexclude", action="store_true", help="add occupied, unreserved ports to excluded_ports")
    p.add_argument("--autocompact", action="store_true", help="compact excluded_ports after --autoexclude")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="table", help="output format (default: table)")
    _add_options(p, "probes")


def cmd_scan(args):
    session = Session(vars(args))
    result = run_scan(session, args.autoexclude, args.autocompact)
    _out(format_scan(result.rows, args.format))
    if not session.quiet:
        for note in format_scan_notes(result):
            _err(note)
    if result.unreserved:
        _err("")
        _err("Found %d unreserved occupied port(s)" % len(result.unreserved))
    return 0


def _args_doctor(p):
    p.add_argument("--format", type=_lower, choices=("text", "json"), default="text",
                   help="text for people, json for programs (default: text)")
    _add_options(p, "range")
    _add_options(p, "probes")


def cmd_doctor(args):
    session = Session(vars(args))
    report = diagnose(session)
    if args.format == "json":
        _out(_json().dumps(report, indent=2, sort_keys=True, ensure_ascii=_ascii_stdout()))
    else:
        _out(format_diagnosis(report))
    return report["problems"][0]["exit_code"] if report["problems"] else 0


def _args_wait(p):
    _add_path(p, "whose reservation to wait for")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--tag", help="wait for this tag's reservation")
    target.add_argument("--group", action="store_true",
                        help="wait for every service of the trop.yaml group found from --path (or the cwd)")
    target.add_argument("--config", metavar="FILE", help="wait for every service of this group file's group")
    target.add_argument("--port", help="wait for this port, reserved or not")
    p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="give up after this long, exit 1 (default 30)")
    p.add_argument("--interval", type=_seconds, default=0.25, metavar="SECONDS",
                   help="pause between attempts (default 0.25)")
    p.add_argument("--http", metavar="PATH", help="also require an HTTP GET of PATH to answer with a status below 500")


def cmd_wait(args):
    session = Session(vars(args), scope=None if args.port is not None else "discover")   # --port: no file is read

    def ready(port, answer):
        family, address, seconds = answer
        if not session.quiet:
            _out("%d: ready on %s (%s) after %.2fs" % (port, address, "IPv4" if family == "ipv4" else "IPv6", seconds))
    _call(run_wait, session, args, progress=ready)
    return 0


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise _argparse().ArgumentTypeError("invalid value '%s': expected seconds (a non-negative number)" % text)
    return value


def _args_who(p):
    p.add_argument("port", metavar="PORT", type=_u16, nargs="?", help="the port (default: this directory's)")
    _add_path(p, "whose reservations to look at")
    p.add_argument("--tag", help="only this tag's reservation")
    p.add_argument("--format", type=_lower, choices=("text", "json"), default="text",
                   help="text for people, json for programs (default: text)")


def cmd_who(args):
    session = Session(vars(args))
    if args.port is not None and (args.tag is not None or args.path is not None):
        raise UsageError("give a PORT or --path/--tag, not both")
    reports = _call(run_who, session, args)
    if args.format == "json":
        _out(_json().dumps(reports, indent=2, sort_keys=True, ensure_ascii=_ascii_stdout()))
    else:
        _out(format_who(reports))
    return 0


def _args_url(p):
    p.add_argument("service", metavar="SERVICE", nargs="?", help="a group service or a tag (default: untagged)")
    _add_path(p, "whose reservation to use")
    p.add_argument("--scheme", default="http", help="URL scheme (default: http)")
    p.add_argument("--host", default="localhost", help="host name (default: localhost)")
    p.add_argument("--route", default="", metavar="PATH", help="path after the port, e.g. /api")
    p.add_argument("--open", action="store_true", help="also open the URL in a web browser")


def cmd_url(args):
    found = _call(run_url, Session(vars(args)), args)
    _out(found["url"])
    if args.open:
        import webbrowser
        webbrowser.open(found["url"])
    return 0


def cmd_mcp(args):
    options = {name: value for name, value in vars(args).items() if name in API_OPTIONS and value not in (None, False)}
    sys.stdout.flush()
    return serve_mcp(sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer, options)


def _args_completions(p):
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="shell to generate the script for")


def cmd_completions(args):
    parser = build_parser()
    script = completion_script(parser, args.shell)
    sys.stderr.write(completion_header(args.shell))
    sys.stdout.write(script if script.endswith("\n") else script + "\n")
    return 0


def _args_exclude(p):
    p.add_argument("port_or_range", metavar="PORT_OR_RANGE", help="a port (8080) or an inclusive range (8080..8090)")
    p.add_argument("--global", dest="use_global", action="store_true", help="write the user config.yaml")
    p.add_argument("--force", action="store_true", help="exclude even ports that are reserved")


def cmd_exclude(args):
    ports = exclusion_range(args.port_or_range)         # a bad range is exit 4 before any configuration is read
    session = Session(vars(args))
    target, added = run_exclude(session, ports, args.use_global, args.force)
    if not session.quiet:
        _out(("Added exclusion to %s" if added else "Exclusion already exists in %s") % target)
    return 0


def _args_compact(p):
    p.add_argument("path", metavar="PATH", help="config file to compact")
    _add_dry_run(p, "show the result without writing")


def cmd_compact_exclusions(args):
    Session(vars(args), scope=None)
    before, after = run_compact_exclusions(args.path, args.dry_run)
    if not before:
        _out("No exclusions to compact")
    elif len(before) == len(after):
        _out("Exclusions already optimal")
    elif args.dry_run:
        _out("Compacted %d exclusions to %d\nDry run - no changes made\nWould save: [%s]"
             % (len(before), len(after), ", ".join(range_text(s, e) for s, e in after)))
    else:
        _out("Compacted %d exclusions to %d\nUpdated %s" % (len(before), len(after), args.path))
    return 0


def _args_validate(p):
    p.add_argument("config_path", metavar="CONFIG_PATH", help="YAML file to check")


def cmd_validate(args):
    Session(vars(args), scope=None)
    problems, warnings = run_validate(args.config_path)
    if problems:
        for line in problems:
            _err(line)
        raise SemanticFailure("Configuration file is invalid (%d problem%s)"
                              % (len(problems), "" if len(problems) == 1 else "s"))
    for warning in warnings:
        _warn(warning)
    _out("Configuration is valid")
    return 0


def cmd_show_data_dir(args):
    _out(Session(vars(args), scope=None).data_dir)
    return 0


def _args_show_path(p):
    p.add_argument("--path", help="path to resolve (default: the current directory)")
    p.add_argument("--canonicalize", action="store_true", help="resolve symlinks; the path must exist")


def cmd_show_path(args):
    _out(_call(run_show_path, Session(vars(args), scope=None), args))
    return 0


def _args_init(p):
    _add_option(p, "data_dir", help="data directory to initialize", default=_argparse().SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing database")
    p.add_argument("--with-config", action="store_true", help="also write a commented config.yaml template")
    _add_dry_run(p, "show what would be created")


def cmd_init(args):
    plan = run_init(Session(vars(args), scope="init"), args.overwrite, args.with_config, args.dry_run)
    _out("\n".join(format_init(plan, args.dry_run)))
    return 0


# name -> (help, argument builder or None, handler)
COMMANDS = {
    "reserve": ("Reserve (or refresh) the port of a directory and print it", _args_reserve, cmd_reserve),
    "release": ("Release reservations", _args_release, cmd_release),
    "list": ("List reservations", _args_list, cmd_list),
    "assert-reservation": ("Succeed if a reservation exists (prints its port)", _args_assert_reservation,
                           cmd_assert_reservation),
    "assert-port": ("Succeed if a port is reserved", _args_assert_port, cmd_assert_port),
    "assert-data-dir": ("Succeed if the data directory exists", _args_assert_data_dir, cmd_assert_data_dir),
    "port-info": ("Show the reservation of a port", _args_port_info, cmd_port_info),
    "show-data-dir": ("Print the data directory", None, cmd_show_data_dir),
    "show-path": ("Print how a path resolves", _args_show_path, cmd_show_path),
    "init": ("Create the data directory and database", _args_init, cmd_init),
    "list-projects": ("List recorded project names", None, cmd_list_projects),
    "reserve-group": ("Reserve a group of services from a YAML file", _args_group, cmd_reserve_group),
    "autoreserve": ("Discover trop.yaml from the cwd and reserve its group", _args_autoreserve, cmd_autoreserve),
    "run": ("Reserve the project's group, then run a command with its variables set", _args_run, cmd_run),
    "scan": ("List occupied ports in the range", _args_scan, cmd_scan),
    "doctor": ("Explain the range port by port, and check the data directory and configuration", _args_doctor,
               cmd_doctor),
    "wait": ("Wait until a reserved port accepts connections", _args_wait, cmd_wait),
    "who": ("Show who holds a port: its reservation, its listeners and a verdict", _args_who, cmd_who),
    "url": ("Print the URL of a service (http://localhost:PORT)", _args_url, cmd_url),
    "mcp": ("Serve the Model Context Protocol on stdin/stdout, for coding agents", None, cmd_mcp),
    "completions": ("Print a shell completion script", _args_completions, cmd_completions),
    "validate": ("Check a configuration file and report every problem", _args_validate, cmd_validate),
    "exclude": ("Add a port or range to excluded_ports", _args_exclude, cmd_exclude),
    "compact-exclusions": ("Rewrite a file's excluded_ports minimally", _args_compact, cmd_compact_exclusions),
    "prune": ("Remove reservations whose directory no longer exists", _args_prune, cmd_prune),
    "expire": ("Remove reservations unused for a number of days", _args_expire, cmd_expire),
    "autoclean": ("Prune and expire in one transaction", _args_expire, cmd_autoclean),
    "migrate": ("Move reservations from one path to another", _args_migrate, cmd_migrate),
}
_GLOBAL_VALUE_OPTIONS = tuple(o.flag for o in OPTIONS if "global" in o.groups and o.value_type is not _SWITCH)


def _add_global_options(parser, nested):
    """Global flags, accepted before or after the command; a nested copy must not reset the outer value."""
    for option in OPTIONS:
        if "global" not in option.groups or (nested and any(option.flag in a.option_strings for a in parser._actions)):
            continue                    # init and assert-data-dir have a --data-dir of their own
        default = _argparse().SUPPRESS if nested else (False if option.value_type is _SWITCH else None)
        _add_option(parser, option.name, default=default)


def _command_in(argv):
    """The command named in argv, so that only its arguments need building."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GLOBAL_VALUE_OPTIONS:
            skip = True
        elif arg in ("-h", "--help"):
            return None
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only=None):
    """The argparse model; with `only`, just that command (the full model serves help and errors)."""
    argparse = _argparse()
    parser = argparse.ArgumentParser(
        prog="trop", description="Stable, collision-free port reservations for directories.",
        epilog="Run `trop COMMAND --help` for a command's options.")
    parser.add_argument("-V", "--version", action="version", version="trop %s" % __version__)
    _add_global_options(parser, nested=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, builder, handler) in COMMANDS.items():
        if only is not None and only != name:
            continue                    # each parser costs start-up time; argv named its command
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if builder:
            builder(sub)
        _add_global_options(sub, nested=True)
        sub.set_defaults(handler=handler)
    return parser


def _check_requirements(parser, args):
    """Flags a command declared as needing another (port-info's probes need --include-occupancy)."""
    needed, names = getattr(args, "requires", (None, ()))
    for name in names:
        if getattr(args, name) and not getattr(args, needed):
            parser.error("argument %s requires --%s" % (OPTION[name].flag, needed.replace("_", "-")))


def main(argv=None):
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.stdout, sys.stderr = tolerant_stream(sys.stdout), tolerant_stream(sys.stderr)
    commits = Store.commits
    try:
        parser = build_parser(_command_in(argv))
        args = parser.parse_args(argv)
        if getattr(args, "handler", None) is None:
            parser.print_usage(sys.stderr)
            _err("trop: error: a command is required")
            return EXIT_USAGE
        _check_requirements(parser, args)
        status = _guard(lambda: args.handler(args), "executing the %s command" % args.command)
        _flush_stdout()
        return status
    except TropError as exc:
        for warning in exc.warnings:
            _warn(_one_line(warning))
        _err("Error: %s" % _one_line(str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("Error: interrupted")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_IO
    except Exception as exc:          # never a traceback, unless asked for
        if os.environ.get("TROP_DEBUG"):
            import traceback
            traceback.print_exc()
        _err("Error: internal error: %s: %s (set TROP_DEBUG=1 for a traceback; %s)" % (
            type(exc).__name__, exc, "the changes already committed are kept" if Store.commits > commits else
            "nothing was written to the database"))
        return EXIT_LIBRARY


def _flush_stdout():
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as exc:
            raise IoFailure("cannot write results to standard output: %s" % (exc.strerror or exc))


def cli():
    """Entry point for `python -m trop`, `python trop.py` and zipapps: exit with main()'s status.

    trop holds nothing that needs interpreter teardown (the database is closed
    and output is flushed here), and teardown is a large share of a short
    command's run time, so the process ends with os._exit.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except OSError:
            status = status or EXIT_IO
    os._exit(status)


if __name__ == "__main__":
    cli()
