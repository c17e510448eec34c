"""The PEP 517 / PEP 660 build backend of trop-ports, standard library only.

pyproject.toml names this file (``build-backend = "build_backend"``,
``backend-path = ["tools"]``), so ``pip install .``, ``pip install -e .`` and
``pip wheel .`` need nothing but the standard library: no setuptools, no network.

setup.cfg is the source of truth.  Every key of its [metadata], [options] and
[options.entry_points] sections goes into the metadata; a key or an
``[options.*]`` section this backend does not know is an error rather than
something silently left out.  Sections for other tools ([pycodestyle], ...)
are ignored.

Every path is resolved from this file's location (the project root is the
parent of tools/), never from the working directory.  trop is never imported:
``version = attr: trop.__version__`` is read from trop.py's syntax tree.

Wheels and sdists are reproducible: fixed timestamps, modes and owners, and a
fixed member order.  Python 3.6 compatible.
"""

import ast
import base64
import configparser
import csv
import gzip
import hashlib
import io
import os
import re
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = "tools/build_backend.py"              # this file, relative to ROOT (shipped in the sdist)

METADATA_VERSION = "2.1"
TIMESTAMP = 1577836800                          # 2020-01-01 00:00:00 UTC: every member of every archive
ZIP_DATE = (2020, 1, 1, 0, 0, 0)

# setup.cfg keys this backend understands; anything else is an error.
METADATA_KEYS = ("name", "version", "description", "long_description", "long_description_content_type",
                 "license", "license_files", "classifiers")
OPTIONS_KEYS = ("py_modules", "python_requires")
OPTIONS_SECTIONS = ("options.entry_points",)
# Also shipped in the sdist besides the modules, the backend and what setup.cfg names.
SDIST_EXTRA = ("pyproject.toml", "setup.cfg", "test_trop.py")


class BuildError(Exception):
    """setup.cfg asks for something this backend cannot do."""


# --- setup.cfg -----------------------------------------------------------------

def _path(relative):
    """An absolute path for a '/'-separated path relative to the project root (which it may not leave)."""
    parts = relative.replace("\\", "/").split("/")
    if os.path.isabs(relative) or ".." in parts or not relative.strip():
        raise BuildError("setup.cfg: %r is not a path inside the project" % relative)
    return os.path.join(ROOT, *parts)


def _read(relative):
    with open(_path(relative), "rb") as fh:
        return fh.read()


def _list(value):
    """A setup.cfg list: one item a line, or comma-separated."""
    return [item.strip() for line in value.splitlines() for item in line.split(",") if item.strip()]


def _version_from(spec):
    """The value of ``attr: module.NAME``, a string literal assigned at the top level of module's source."""
    module, _, name = spec.rpartition(".")
    if not module or not name:
        raise BuildError("setup.cfg: version = attr: %s: expected module.name" % spec)
    base = module.replace(".", "/")
    candidates = [base + ".py", base + "/__init__.py"]
    found = [c for c in candidates if os.path.isfile(_path(c))]
    if not found:
        raise BuildError("setup.cfg: version = attr: %s: no %s" % (spec, " or ".join(candidates)))
    tree = ast.parse(_read(found[0]), found[0])
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, getattr(ast, "AnnAssign", ())) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            try:
                result = ast.literal_eval(value)
            except ValueError:
                result = None
            if not isinstance(result, str):
                raise BuildError("%s: %s is not assigned a string literal" % (found[0], name))
            return result
    raise BuildError("%s: no top-level assignment to %s" % (found[0], name))


def _file_text(value, key):
    """The text of ``file: a, b``: the files joined with newlines (as setuptools does)."""
    if not value.startswith("file:"):
        return value
    names = _list(value[len("file:"):])
    if not names:
        raise BuildError("setup.cfg: %s = file: names no file" % key)
    return "\n".join(_read(name).decode("utf-8") for name in names)


def project():
    """The project as declared by setup.cfg: a dict of its metadata, files and entry points."""
    cfg = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    cfg.optionxform = str                                       # entry point names are case-sensitive
    with open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8") as fh:
        cfg.read_file(fh, "setup.cfg")
    for section, known in (("metadata", METADATA_KEYS), ("options", OPTIONS_KEYS)):
        if not cfg.has_section(section):
            raise BuildError("setup.cfg: no [%s] section" % section)
        unknown = sorted(set(cfg[section]) - set(known))
        if unknown:
            raise BuildError("setup.cfg: [%s] %s: not supported by %s" % (section, ", ".join(unknown), BACKEND))
    unknown = sorted(s for s in cfg.sections() if s.startswith("options.") and s not in OPTIONS_SECTIONS)
    if unknown:
        raise BuildError("setup.cfg: [%s]: not supported by %s" % ("], [".join(unknown), BACKEND))
    meta, options = cfg["metadata"], cfg["options"]
    for required in ("name", "version"):
        if not meta.get(required, "").strip():
            raise BuildError("setup.cfg: [metadata] has no %s" % required)

    version = meta["version"].strip()
    if version.startswith("attr:"):
        version = _version_from(version[len("attr:"):].strip())
    elif version.startswith("file:"):
        version = _file_text(version, "version").strip()
    if not re.match(r"^[0-9][0-9A-Za-z.+!-]*$", version):
        raise BuildError("setup.cfg: version %r is not a version number" % version)

    entry_points = []                                           # [(group, [(name, value)])]
    if cfg.has_section("options.entry_points"):
        for group, text in cfg["options.entry_points"].items():
            points = []
            for line in text.splitlines():
                if line.strip():
                    name, sep, value = line.partition("=")
                    if not sep or not name.strip() or not value.strip():
                        raise BuildError("setup.cfg: [options.entry_points] %s: %r is not name = value"
                                         % (group, line.strip()))
                    points.append((name.strip(), value.strip()))
            entry_points.append((group, points))

    long_description = meta.get("long_description", "")
    readme_files = _list(long_description[len("file:"):]) if long_description.startswith("file:") else []
    modules = _list(options.get("py_modules", ""))
    for module in modules:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", module):
            raise BuildError("setup.cfg: py_modules: %r is not a top-level module name" % module)
    license_files = _list(meta.get("license_files", ""))
    for name in license_files + readme_files + [m + ".py" for m in modules]:
        if not os.path.isfile(_path(name)):
            raise BuildError("setup.cfg names %s, which does not exist" % name)
    return {
        "name": meta["name"].strip(),
        "version": version,
        "summary": meta.get("description", "").strip(),
        "description": _file_text(long_description, "long_description"),
        "description_content_type": meta.get("long_description_content_type", "").strip(),
        "license": meta.get("license", "").strip(),
        "license_files": license_files,
        "classifiers": [c.strip() for c in meta.get("classifiers", "").splitlines() if c.strip()],
        "requires_python": options.get("python_requires", "").strip(),
        "modules": modules,
        "readme_files": readme_files,
        "entry_points": entry_points,
    }


# --- Metadata files ------------------------------------------------------------

def _base_name(proj):
    """name-version as wheel and sdist file names spell it (PEP 427, PEP 625)."""
    return "%s-%s" % (re.sub(r"[-_.]+", "_", proj["name"]).lower(), proj["version"])


def metadata_text(proj):
    """METADATA (and the sdist's PKG-INFO): core metadata 2.1, plus License-File for each license file."""
    lines = ["Metadata-Version: " + METADATA_VERSION, "Name: " + proj["name"], "Version: " + proj["version"]]
    for field, key in (("Summary", "summary"), ("License", "license"), ("Requires-Python", "requires_python"),
                       ("Description-Content-Type", "description_content_type")):
        if proj[key]:
            if "\n" in proj[key]:
                raise BuildError("setup.cfg: %s must be a single line" % key)
            lines.append("%s: %s" % (field, proj[key]))
    lines += ["Classifier: " + c for c in proj["classifiers"]]
    lines += ["License-File: " + name for name in proj["license_files"]]
    text = "\n".join(lines) + "\n"
    if proj["description"]:
        text += "\n" + proj["description"]
    return text


def _entry_points_text(proj):
    return "".join("[%s]\n%s\n" % (group, "".join("%s = %s\n" % p for p in points))
                   for group, points in proj["entry_points"])


def _dist_info_files(proj):
    """[(archive name, bytes)] of the .dist-info directory, RECORD aside."""
    dist_info = _base_name(proj) + ".dist-info/"
    files = [
        (dist_info + "METADATA", metadata_text(proj).encode("utf-8")),
        (dist_info + "WHEEL", ("Wheel-Version: 1.0\nGenerator: trop-ports %s\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n" % BACKEND).encode("utf-8")),
    ]
    if proj["entry_points"]:
        files.append((dist_info + "entry_points.txt", _entry_points_text(proj).encode("utf-8")))
    for name in proj["license_files"]:
        files.append((dist_info + "licenses/" + name.replace("\\", "/"), _read(name)))
    return files


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def _write_wheel(wheel_directory, proj, payload):
    """Writes payload ([(archive name, bytes)]) plus the .dist-info with its RECORD; returns the file name."""
    files = list(payload) + _dist_info_files(proj)
    record_name = _base_name(proj) + ".dist-info/RECORD"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for name, data in files:
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([record_name, "", ""])
    files.append((record_name, out.getvalue().encode("utf-8")))
    filename = _base_name(proj) + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3                              # Unix, so that the mode below is read
            info.external_attr = (0o100644 << 16)
            zf.writestr(info, data)
    return filename


def _write_metadata_directory(metadata_directory, proj):
    dist_info = _base_name(proj) + ".dist-info"
    for name, data in _dist_info_files(proj):
        path = os.path.join(metadata_directory, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    return dist_info


# --- PEP 517 and PEP 660 hooks -----------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _write_metadata_directory(metadata_directory, project())


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _write_metadata_directory(metadata_directory, project())


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    """A wheel holding the modules of py_modules, their metadata and entry points."""
    proj = project()
    return _write_wheel(wheel_directory, proj, [(m + ".py", _read(m + ".py")) for m in proj["modules"]])


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """PEP 660: a wheel whose .pth file puts the project root on sys.path."""
    proj = project()
    pth = "__editable__.%s.pth" % _base_name(proj)
    return _write_wheel(wheel_directory, proj, [(pth, (ROOT + "\n").encode("utf-8"))])


def build_sdist(sdist_directory, config_settings=None):
    """PEP 517: NAME-VERSION.tar.gz with PKG-INFO and what building a wheel from it needs."""
    proj = project()
    base = _base_name(proj)
    names = set(SDIST_EXTRA) | {BACKEND} | set(proj["readme_files"]) | set(proj["license_files"])
    names |= {m + ".py" for m in proj["modules"]}
    members = [(name.replace("\\", "/"), _read(name)) for name in sorted(names)]
    members.append(("PKG-INFO", metadata_text(proj).encode("utf-8")))
    filename = base + ".tar.gz"
    with open(os.path.join(sdist_directory, filename), "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=TIMESTAMP) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in members:
                    info = tarfile.TarInfo(base + "/" + name)
                    info.size, info.mtime, info.mode = len(data), TIMESTAMP, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    return filename
