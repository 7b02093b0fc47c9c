#!/usr/bin/env python3
"""mailferry benchmark: mail bytes, CPU, wall time and memory of real update pairs over the Maildir
transport, next to `rsync -acz` over a local pipe and `zstd --patch-from`; rescan, republish and an
up-to-date request next to `git status`; cold hashing next to `b3sum`; a large update split into parts by a
relay limit; a fleet of recipients on the same base.

    scripts/bench.py [--quick] [--only NAME[,NAME...]] [--keep DIR] [--json FILE]
                     [--pair NAME DIR_A DIR_B]... [--bin PATH] [--build]

Python 3.9+ standard library only. Downloads (npm, PyPI) and generated trees are cached under
~/.cache/mailferry-bench/ (or $MAILFERRY_BENCH_CACHE). What every number includes is described in
docs/benchmark.md.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OWNER = "owner@vendor.example"
SITE = "site1@customer.example"
SITE2 = "site2@customer.example"
KB = 1000  # sizes in this benchmark: 1 KB = 1,000 bytes, 1 MB = 1,000,000 bytes

# Per-pair targets from issue 4 (total mail bytes of one update, all messages both ways, headers included).
PACKAGE_PAIRS = {
    "typescript": {
        "title": "typescript 5.4.5 -> 5.5.4 (npm package/)",
        "target_update_bytes": 218 * KB,
        "rsync_reference": 1305 * KB,
    },
    "django": {
        "title": "Django 5.0 -> 5.0.1 (sdist, unpacked)",
        "target_update_bytes": 22 * KB,
        "rsync_reference": 448 * KB,
    },
    "numpy": {
        "title": "numpy 2.1.0 -> 2.1.1 (cp312 manylinux x86_64 wheel, unpacked)",
        "target_update_bytes": 217 * KB,
        "rsync_reference": 1975 * KB,
    },
}
ALL_NAMES = ["typescript", "django", "numpy", "sigdb", "sigdb-issue", "tree100k", "parts", "fleet", "history"]

# Issue 15's targets.
SIGDB_TARGET = 312 * KB  # the 100 MB signature database update, all mail
ANCHOR_FACTOR, ANCHOR_SLACK = 1.37, 8 * KB  # every pair: at most 1.37 x the best single anchor + 8 KB
FLEET_SIZES = (10, 100, 1000)
HISTORY_GENERATIONS = 100  # how far behind the recipient of the "history" case is
FLEET_CPU_TARGET_S = 0.002  # owner CPU per request
FLEET_DB_TARGET = 2 * KB  # database growth per recipient and generation


# ----------------------------------------------------------------------------------------------------------
# small helpers


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def die(msg):
    raise BenchError(msg)


def cache_dir():
    d = Path(os.environ.get("MAILFERRY_BENCH_CACHE", Path.home() / ".cache" / "mailferry-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def fmt_bytes(n):
    if n is None:
        return "—"
    return f"{n:,}"


def fmt_kb(n):
    if n is None:
        return "—"
    return f"{n / KB:,.1f} KB"


def fmt_s(x, digits=2):
    if x is None:
        return "—"
    return f"{x:.{digits}f}"


def fmt_mib(kb):
    if kb is None:
        return "—"
    return f"{kb / 1024:.0f}"


def table(headers, rows, right=None):
    """An aligned plain-text table; columns in `right` (indices) are right-aligned (default: all but 0)."""
    rows = [[("—" if c is None else str(c)) for c in r] for r in rows]
    if right is None:
        right = set(range(1, len(headers)))
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    out = []

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            parts.append(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]))
        return "  ".join(parts).rstrip()

    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append(line(r))
    return "\n".join(out)


def run_plain(cmd, **kw):
    """Runs a helper command (not measured); raises with its output on failure."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        die(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout}{p.stderr}")
    return p


class Proc:
    """A measured child process: wall time and its own rusage from wait4."""

    def __init__(self, cmd, env=None, cwd=None, check=True):
        self.cmd = [str(c) for c in cmd]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            p = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
            _, status, ru = os.wait4(p.pid, 0)
            self.wall = time.monotonic() - t0
            p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
            self.rc = p.returncode
            out.seek(0)
            err.seek(0)
            self.stdout = out.read().decode(errors="replace")
            self.stderr = err.read().decode(errors="replace")
        self.cpu = ru.ru_utime + ru.ru_stime
        self.maxrss_kb = ru.ru_maxrss
        if check and self.rc != 0:
            die(f"command failed with exit code {self.rc}: {' '.join(self.cmd)}\n{self.stdout}{self.stderr}")


# ----------------------------------------------------------------------------------------------------------
# tools


def have(tool):
    return shutil.which(tool) is not None


def ensure_tools():
    """rsync and b3sum are installed when missing; zstd, git and tar must exist."""
    missing = [t for t in ("rsync", "b3sum") if not have(t)]
    if missing and os.geteuid() == 0 and have("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        p = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True)
    if not have("b3sum") and have("cargo"):
        log("installing b3sum with cargo install")
        subprocess.run(["cargo", "install", "--locked", "b3sum"], capture_output=True)
        cargo_bin = Path.home() / ".cargo" / "bin"
        if (cargo_bin / "b3sum").exists() and str(cargo_bin) not in os.environ.get("PATH", ""):
            os.environ["PATH"] = f"{os.environ.get('PATH', '')}:{cargo_bin}"
    for t in ("zstd", "git", "tar"):
        if not have(t):
            die(f"`{t}` is required and missing")
    tools = {}
    for t, args in (("rsync", ["--version"]), ("b3sum", ["--version"]), ("zstd", ["--version"]), ("git", ["--version"])):
        if have(t):
            out = subprocess.run([t, *args], capture_output=True, text=True).stdout.strip().splitlines()
            tools[t] = out[0] if out else "?"
        else:
            tools[t] = None
            log(f"warning: `{t}` is not available; its columns show —")
    return tools


def ensure_binary(args):
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = Path(args.bin) if args.bin else target / "release" / "mailferry"
    if args.bin and not binary.exists():
        die(f"--bin {binary} does not exist")
    if args.build or not binary.exists():
        log("building mailferry (cargo build --release); this takes a few minutes on 2 cores")
        p = subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO)
        if p.returncode != 0 or not binary.exists():
            die("cargo build --release failed")
    else:
        newest = max((f.stat().st_mtime for f in (REPO / "src").rglob("*.rs")), default=0)
        if newest > binary.stat().st_mtime:
            log(f"warning: {binary} is older than src/; pass --build to rebuild it")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    return binary.resolve(), version


# ----------------------------------------------------------------------------------------------------------
# data sets (cached)


def _extract_tar(tgz, dest, strip="package/"):
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tgz) as tf:
        members = []
        for m in tf.getmembers():
            if not m.name.startswith(strip):
                continue
            m.name = m.name[len(strip):]
            if m.name:
                members.append(m)
        if hasattr(tarfile, "data_filter"):
            tf.extractall(tmp, members=members, filter="data")
        else:
            tf.extractall(tmp, members=members)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _extract_zip(whl, dest):
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(whl) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.startswith("/") or ".." in Path(name).parts:
                die(f"unsafe path in {whl}: {name}")
            zf.extract(info, tmp)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(tmp / name, mode)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def npm_tree(pkg, version):
    c = cache_dir()
    dl = c / "downloads"
    dl.mkdir(exist_ok=True)
    tgz = dl / f"{pkg}-{version}.tgz"
    if not tgz.exists():
        if not have("npm"):
            die("npm is needed to fetch the typescript pair")
        log(f"fetching {pkg}@{version} with npm pack")
        run_plain(["npm", "pack", f"{pkg}@{version}", "--pack-destination", str(dl), "--silent"], cwd=dl)
    tree = c / "trees" / f"npm-{pkg}-{version}"
    if not tree.exists():
        _extract_tar(tgz, tree)
    return tree


def pip_wheel(pkg, version, binary):
    c = cache_dir()
    dl = c / "downloads" / f"pypi-{pkg}-{version}"
    if not dl.exists() or not list(dl.glob("*.whl")):
        log(f"fetching {pkg}=={version} with pip download")
        dl.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dl),
               "--only-binary", ":all:"]
        if binary:
            cmd += ["--platform", "manylinux2014_x86_64", "--python-version", "3.12", "--implementation", "cp"]
        cmd.append(f"{pkg}=={version}")
        run_plain(cmd)
    whls = sorted(dl.glob("*.whl"))
    if len(whls) != 1:
        die(f"expected one wheel in {dl}, found {[w.name for w in whls]}")
    tree = c / "trees" / f"pypi-{whls[0].stem}"
    if not tree.exists():
        _extract_zip(whls[0], tree)
    return tree, whls[0].name


def pip_sdist(pkg, version):
    """The source distribution, unpacked without its top directory. (The wheel would do too; the sdist is
    what reproduces the issue's rsync figure of 448 KB for Django.)"""
    c = cache_dir()
    dl = c / "downloads" / f"pypi-sdist-{pkg}-{version}"
    if not dl.exists() or not list(dl.glob("*.tar.gz")):
        log(f"fetching the {pkg}=={version} sdist with pip download")
        dl.mkdir(parents=True, exist_ok=True)
        run_plain([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--dest", str(dl), "--no-binary", ":all:", f"{pkg}=={version}"])
    sd = sorted(dl.glob("*.tar.gz"))
    if len(sd) != 1:
        die(f"expected one sdist in {dl}, found {[x.name for x in sd]}")
    tree = c / "trees" / f"pypi-sdist-{sd[0].name[:-len('.tar.gz')]}"
    if not tree.exists():
        with tarfile.open(sd[0]) as tf:
            top = tf.getmembers()[0].name.split("/")[0] + "/"
        _extract_tar(sd[0], tree, strip=top)
    return tree


def _words(rng, n):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(n)]


def sigdb_trees(total_bytes, tag, append_div=100, delete_div=200):
    """A signature database of text lines in four files; B appends ~1% new lines to each file and deletes
    ~0.5% scattered lines (`append_div`, `delete_div`: one line in that many)."""
    variant = "" if (append_div, delete_div) == (100, 200) else f"-a{append_div}-d{delete_div}"
    base = cache_dir() / "trees" / f"synthetic-sigdb-{tag}{variant}-v1"
    done = base.with_name(base.name + ".ok")
    if done.exists():
        return base / "A", base / "B"
    log(f"generating the signature database ({total_bytes / 1e6:.0f} MB, seeded)")
    shutil.rmtree(base, ignore_errors=True)
    (base / "A").mkdir(parents=True)
    (base / "B").mkdir(parents=True)
    rng = random.Random(20261123)
    families = ["Win.Trojan", "Win.Malware", "Unix.Exploit", "Doc.Dropper", "Html.Phishing", "Pdf.Exploit",
                "Js.Downloader", "Email.Phishing", "Andr.Spyware", "Osx.Adware"]
    files = [("main.hdb", 0.45), ("main.ndb", 0.30), ("daily.hdb", 0.15), ("daily.ndb", 0.10)]
    n = 0

    def sig_line():
        nonlocal n
        n += 1
        fam = families[rng.randrange(len(families))]
        return f"{fam}.Agent-{n}:{rng.randrange(4)}:*:{rng.randbytes(rng.randint(16, 80)).hex()}\n"

    for name, share in files:
        lines = []
        size = 0
        while size < total_bytes * share:
            line = sig_line()
            lines.append(line)
            size += len(line)
        (base / "A" / name).write_text("".join(lines))
        deleted = set(rng.sample(range(len(lines)), len(lines) // delete_div))
        kept = [line for i, line in enumerate(lines) if i not in deleted]
        kept.extend(sig_line() for _ in range(len(lines) // append_div))
        (base / "B" / name).write_text("".join(kept))
    done.touch()
    return base / "A", base / "B"


def tree_trees(nfiles, tag):
    """`nfiles` small text files in nested directories (pkgNNN/modNN/fileNNN.txt); B edits 0.1% of them
    (a changed line or an appended line)."""
    base = cache_dir() / "trees" / f"synthetic-tree-{tag}-v1"
    done = base.with_name(base.name + ".ok")
    if done.exists():
        return base / "A", base / "B"
    log(f"generating the {nfiles:,}-file tree (seeded)")
    shutil.rmtree(base, ignore_errors=True)
    rng = random.Random(4_100_000 + nfiles)
    vocab = _words(rng, 2000)
    edited = set(rng.sample(range(nfiles), max(1, nfiles // 1000)))
    per_mod = 100
    per_pkg = 1000
    for i in range(nfiles):
        rel = Path(f"pkg{i // per_pkg:03d}") / f"mod{(i % per_pkg) // per_mod:02d}" / f"file{i % per_mod:03d}.txt"
        nlines = rng.randint(3, 30)
        lines = [" ".join(rng.choices(vocab, k=rng.randint(4, 12))) + "\n" for _ in range(nlines)]
        a = "".join(lines)
        if i in edited:
            if rng.random() < 0.5:
                lines[rng.randrange(nlines)] = " ".join(rng.choices(vocab, k=8)) + "\n"
            else:
                lines.append(" ".join(rng.choices(vocab, k=8)) + "\n")
            b = "".join(lines)
        else:
            b = a
        for side, text in (("A", a), ("B", b)):
            p = base / side / rel
            if i % per_mod == 0:
                p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    done.touch()
    return base / "A", base / "B"


def parts_trees(total_bytes, tag):
    """A: one small file. B: A plus `total_bytes` of incompressible random bytes in three files."""
    base = cache_dir() / "trees" / f"synthetic-parts-{tag}-v1"
    done = base.with_name(base.name + ".ok")
    if done.exists():
        return base / "A", base / "B"
    shutil.rmtree(base, ignore_errors=True)
    rng = random.Random(30_000_000)
    for side in ("A", "B"):
        (base / side).mkdir(parents=True)
        (base / side / "README.txt").write_text("release notes\n")
    for name, share in (("blob-1.bin", 0.4), ("blob-2.bin", 0.35), ("blob-3.bin", 0.25)):
        (base / "B" / name).write_bytes(rng.randbytes(int(total_bytes * share)))
    done.touch()
    return base / "A", base / "B"


def tree_stats(root):
    files = 0
    size = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            size += st.st_size
    return files, size


# ----------------------------------------------------------------------------------------------------------
# comparing trees


def compare_trees(a, b):
    """None if `a` and `b` hold the same entries (paths, kinds, contents, executable bits, link targets),
    else a description of the first differences."""

    def listing(root):
        out = {}
        for dirpath, dirs, names in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            for d in list(dirs):
                full = os.path.join(dirpath, d)
                rel = os.path.normpath(os.path.join(rel_dir, d))
                if os.path.islink(full):
                    out[rel] = ("link", os.readlink(full))
                    dirs.remove(d)
                else:
                    out[rel] = ("dir",)
            for n in names:
                full = os.path.join(dirpath, n)
                rel = os.path.normpath(os.path.join(rel_dir, n))
                st = os.lstat(full)
                if os.path.islink(full):
                    out[rel] = ("link", os.readlink(full))
                else:
                    out[rel] = ("file", st.st_size, bool(st.st_mode & 0o100))
        return out

    la, lb = listing(a), listing(b)
    problems = []
    for p in sorted(set(la) | set(lb)):
        if p not in la:
            problems.append(f"only in {b}: {p}")
        elif p not in lb:
            problems.append(f"only in {a}: {p}")
        elif la[p] != lb[p]:
            problems.append(f"differs: {p}: {la[p]} vs {lb[p]}")
        elif la[p][0] == "file":
            with open(os.path.join(a, p), "rb") as fa, open(os.path.join(b, p), "rb") as fb:
                while True:
                    x = fa.read(1 << 20)
                    y = fb.read(1 << 20)
                    if x != y:
                        problems.append(f"content differs: {p}")
                        break
                    if not x:
                        break
        if len(problems) >= 10:
            break
    return "\n".join(problems) if problems else None


# ----------------------------------------------------------------------------------------------------------
# a mailferry world: owner, recipient, spool


def maildir_messages(spool, address):
    """Message name -> size of every message that arrived in `address`'s Maildir (new/, cur/, rejected)."""
    out = {}
    box = spool / address
    for sub in ("new", "cur", ".rejected/new", ".rejected/cur"):
        d = box / sub
        if not d.is_dir():
            continue
        for e in os.scandir(d):
            if e.is_file():
                out[e.name.split(":", 1)[0]] = e.stat().st_size
    return out


class World:
    def __init__(self, binary, base):
        self.bin = binary
        self.base = base
        self.source = base / "source"
        self.data = base / "data"
        self.spool = base / "spool"
        self.owner_cfg = base / "owner" / "owner.toml"
        self.site_cfg = base / "site1" / "recipient.toml"
        self.env = dict(os.environ, MAILFERRY_LOG="warn", RUST_LOG="warn")
        self.steps = []  # (side, label, Proc) of the current phase

    def mf(self, *args, check=True):
        return Proc([self.bin, *args], env=self.env, check=check)

    def setup(self, tree_a, recipient_extra=None):
        copy_tree(tree_a, self.source)
        self.mf("owner", "init", "--dir", self.base / "owner", "--source", self.source, "--address", OWNER,
                "--transport-root", self.spool)
        enrollment = self.base / "site1.enrollment"
        self.mf("owner", "add-recipient", "--config", self.owner_cfg, "--name", "site1", "--address", SITE,
                "--out", enrollment)
        self.mf("recipient", "init", "--dir", self.base / "site1", "--data", self.data, "--enrollment",
                enrollment, "--transport-root", self.spool)
        if recipient_extra:
            set_keys(self.site_cfg, "recipient", recipient_extra)

    def publish(self):
        p = self.mf("owner", "publish", "--config", self.owner_cfg)
        m = re.search(r"generation (\d+)", p.stdout)
        return p, int(m.group(1)) if m else None

    def replace_source(self, tree):
        shutil.rmtree(self.source)
        copy_tree(tree, self.source)

    def step(self, side, label, *extra):
        cfg = self.owner_cfg if side == "owner" else self.site_cfg
        # --fail-on-refusal: exit 1 when a message was refused, which a benchmark must never see.
        p = self.mf(side, "run", "--config", cfg, "--once", "--fail-on-refusal", *extra, check=False)
        if p.rc == 1:
            die(f"{side} refused a message in step {label!r}:\n{p.stderr}\n"
                f"see: {self.bin} log --config {cfg} --rejected")
        elif p.rc != 0:
            die(f"{side} run failed in step {label!r} (exit {p.rc}):\n{p.stderr}")
        self.steps.append((side, label, p))
        return p

    def cycle(self):
        """recipient asks -> owner answers -> recipient applies and receipts -> owner records the receipt."""
        self.step("recipient", "request")
        self.step("owner", "answer")
        self.step("recipient", "apply", "--no-request")
        self.step("owner", "receipt")

    def status(self, cfg):
        return json.loads(self.mf("status", "--config", cfg, "--json", check=False).stdout or "{}")

    def snapshot(self):
        return maildir_messages(self.spool, OWNER), maildir_messages(self.spool, SITE)

    def measure(self, before):
        """Mail and process figures of the steps since `before` (a snapshot); resets the step list."""
        to_owner_b, to_site_b = before
        to_owner = {k: v for k, v in maildir_messages(self.spool, OWNER).items() if k not in to_owner_b}
        to_site = {k: v for k, v in maildir_messages(self.spool, SITE).items() if k not in to_site_b}
        r = {
            "r2o_bytes": sum(to_owner.values()),
            "r2o_msgs": len(to_owner),
            "o2r_bytes": sum(to_site.values()),
            "o2r_msgs": len(to_site),
        }
        r["total_bytes"] = r["r2o_bytes"] + r["o2r_bytes"]
        r["total_msgs"] = r["r2o_msgs"] + r["o2r_msgs"]
        for side, key in (("owner", "owner"), ("recipient", "recipient")):
            ps = [p for s, _, p in self.steps if s == side]
            r[f"{key}_cpu_s"] = sum(p.cpu for p in ps)
            r[f"{key}_wall_s"] = sum(p.wall for p in ps)
            r[f"{key}_peak_rss_kb"] = max((p.maxrss_kb for p in ps), default=0)
        r["wall_s"] = sum(p.wall for _, _, p in self.steps)
        r["steps"] = [
            {"side": s, "step": lbl, "wall_s": round(p.wall, 4), "cpu_s": round(p.cpu, 4), "peak_rss_kb": p.maxrss_kb}
            for s, lbl, p in self.steps
        ]
        self.steps = []
        return r

    def verify(self, generation, what):
        st = self.status(self.site_cfg)
        if st.get("generation") != generation:
            die(f"{what}: recipient is at generation {st.get('generation')}, expected {generation}\n"
                f"status: {json.dumps(st)}\nsee: {self.bin} log --config {self.site_cfg} --rejected")
        diff = compare_trees(self.source, self.data)
        if diff:
            die(f"{what}: the recipient's data tree differs from the source:\n{diff}")


def copy_tree(src, dest):
    run_plain(["cp", "-a", f"{src}/.", str(dest)] if dest.exists() else ["cp", "-a", str(src), str(dest)])


def set_keys(cfg, table_name, keys):
    """Sets `keys` (name -> TOML value text) in `[table_name]` of a config file, replacing existing lines."""
    text = cfg.read_text().splitlines()
    out = []
    in_table = False
    pending = dict(keys)
    for line in text:
        s = line.strip()
        if s.startswith("["):
            if in_table and pending:
                out.extend(f"{k} = {v}" for k, v in pending.items())
                pending = {}
            in_table = s == f"[{table_name}]"
            out.append(line)
            continue
        m = re.match(r"([A-Za-z0-9_-]+)\s*=", s)
        if in_table and m and m.group(1) in pending:
            out.append(f"{m.group(1)} = {pending.pop(m.group(1))}")
            continue
        out.append(line)
    if pending:
        if not in_table:
            out.append(f"[{table_name}]")
        out.extend(f"{k} = {v}" for k, v in pending.items())
    cfg.write_text("\n".join(out) + "\n")


# ----------------------------------------------------------------------------------------------------------
# references: rsync -acz over a local pipe, zstd --patch-from


def rsync_update(tree_a, tree_b, work):
    """Bytes `rsync -a -c -z --delete` moves to turn a copy of A into B, both directions, through a pipe to a
    second rsync process (a remote shell that runs the server locally)."""
    if not have("rsync"):
        return None
    dest = work / "rsync-dest"
    copy_tree(tree_a, dest)
    rsh = work / "local-rsh"
    rsh.write_text('#!/bin/sh\n# rsync calls: RSH HOST rsync --server ...; ignore the host, run it here\nshift\nexec "$@"\n')
    rsh.chmod(0o755)
    # zstd level 19 is what reproduces the reference figures (1,305 / 448 / 1,975 KB); an rsync
    # without --compress-choice (before 3.2) falls back to plain -z (zlib).
    caps = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
    comp_opts = ["--compress-choice=zstd", "--compress-level=19"] if re.search(r"\bzstd\b", caps) else []
    p = Proc(["rsync", "-a", "-c", "-z", *comp_opts, "--delete", "--stats", "--debug=nstr", f"--rsh={rsh}",
              f"{tree_b}/", f"localhost:{dest}/"])
    sent = re.search(r"Total bytes sent: ([\d,]+)", p.stdout)
    recv = re.search(r"Total bytes received: ([\d,]+)", p.stdout)
    comp = re.search(r"negotiated compress: (\w+(?: \(level -?\d+\))?)", p.stdout + p.stderr)
    if not sent or not recv:
        die(f"could not read rsync --stats:\n{p.stdout}{p.stderr}")
    diff = compare_trees(tree_b, dest)
    if diff:
        die(f"rsync did not reproduce B:\n{diff}")
    s = int(sent.group(1).replace(",", ""))
    r = int(recv.group(1).replace(",", ""))
    shutil.rmtree(dest)
    return {"bytes": s + r, "sent": s, "received": r, "wall_s": p.wall, "options": " ".join(p.cmd[1:7]),
            "compression": comp.group(1) if comp else ("zstd (level 19)" if comp_opts else "zlib")}


def det_tar(tree, out):
    run_plain(["tar", "--sort=name", "--format=gnu", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner",
               "-cf", str(out), "-C", str(tree), "."])


ZSTD_LARGE_TAR = 80_000_000
ZSTD_LARGE_LEVEL = 9


def zstd_patch(tree_a, tree_b, work, level=None):
    """Size of `zstd -LEVEL --long=31 --patch-from=A.tar B.tar` (deterministic tars), decode verified.

    The level is 19 for the package pairs. The synthetic sets (and --pair sets whose tar is over 80 MB) use 9:
    at -15 and up zstd takes minutes per 100 MB on 2 cores, and on the signature database its patch was no
    smaller (-3: 485 KB, -9: 527 KB, -15: 543 KB)."""
    a_tar, b_tar, d = work / "A.tar", work / "B.tar", work / "B.tar.patch.zst"
    det_tar(tree_a, a_tar)
    det_tar(tree_b, b_tar)
    if level is None:
        level = ZSTD_LARGE_LEVEL if max(a_tar.stat().st_size, b_tar.stat().st_size) > ZSTD_LARGE_TAR else 19
    p = Proc(["zstd", "-q", "-f", f"-{level}", "--long=31", f"--patch-from={a_tar}", str(b_tar), "-o", str(d)])
    size = d.stat().st_size
    back = work / "B.check.tar"
    Proc(["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={a_tar}", str(d), "-o", str(back)])
    if not filecmp_bytes(back, b_tar):
        die("zstd --patch-from did not decode to B.tar")
    res = {"bytes": size, "level": level, "wall_s": p.wall, "cpu_s": p.cpu, "a_tar_bytes": a_tar.stat().st_size,
           "b_tar_bytes": b_tar.stat().st_size}
    for f in (a_tar, b_tar, d, back):
        f.unlink()
    return res


def filecmp_bytes(x, y):
    if x.stat().st_size != y.stat().st_size:
        return False
    with open(x, "rb") as fx, open(y, "rb") as fy:
        while True:
            a, b = fx.read(1 << 20), fy.read(1 << 20)
            if a != b:
                return False
            if not a:
                return True


# ----------------------------------------------------------------------------------------------------------
# scenarios


def new_workdir(args, name):
    if args.keep:
        d = Path(args.keep).resolve() / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d
    return Path(tempfile.mkdtemp(prefix=f"mfbench-{name}-"))


def done_workdir(args, d):
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


def run_pair(args, binary, name, title, tree_a, tree_b, extra=None, zstd_level=None):
    """First sync of A, then the update to B; references beside the update. `extra(world, result)` runs
    between the first sync and the update (rescan, cold hash)."""
    log(f"== {name}: {title}")
    work = new_workdir(args, name)
    t_start = time.monotonic()
    w = World(binary, work)
    res = {"name": name, "title": title}
    fa, sa = tree_stats(tree_a)
    fb, sb = tree_stats(tree_b)
    res["a"] = {"files": fa, "bytes": sa, "path": str(tree_a)}
    res["b"] = {"files": fb, "bytes": sb, "path": str(tree_b)}

    w.setup(tree_a)
    p, g1 = w.publish()
    res["publish_a"] = {"wall_s": p.wall, "cpu_s": p.cpu, "peak_rss_kb": p.maxrss_kb}
    log("   first sync")
    before = w.snapshot()
    w.cycle()
    res["first"] = w.measure(before)
    w.verify(g1, f"{name}: first sync")

    if extra:
        extra(w, res)

    w.replace_source(tree_b)
    p, g2 = w.publish()
    res["publish_b"] = {"wall_s": p.wall, "cpu_s": p.cpu, "peak_rss_kb": p.maxrss_kb}
    log("   update")
    before = w.snapshot()
    w.cycle()
    res["update"] = w.measure(before)
    w.verify(g2, f"{name}: update")

    log("   rsync -acz and zstd --patch-from")
    res["rsync"] = rsync_update(tree_a, tree_b, work)
    res["zstd"] = zstd_patch(tree_a, tree_b, work, level=zstd_level)
    zb = res["zstd"]["bytes"]
    res["ratio_vs_zstd"] = res["update"]["total_bytes"] / zb if zb else None
    res["elapsed_s"] = time.monotonic() - t_start
    done_workdir(args, work)
    return res


def rescan_extra(args):
    def extra(w, res):
        """Two request cycles on the unchanged tree (the second one's recipient request step is the warm
        rescan), then `git status` on a repository of the same tree."""
        log("   rescan of the unchanged tree (twice), git status")
        runs = []
        for _ in range(2):
            before = w.snapshot()
            w.cycle()
            m = w.measure(before)
            req = m["steps"][0]
            runs.append({"request_step_wall_s": req["wall_s"], "request_step_cpu_s": req["cpu_s"],
                         "request_bytes": m["r2o_bytes"] if m["r2o_msgs"] else None,
                         "request_msgs_to_owner": m["r2o_msgs"], "cycle": m})
        w.verify(w.status(w.site_cfg).get("generation"), "rescan")
        # The owner's answer to the last of those requests: the tree is up to date.
        up = runs[-1]["cycle"]["steps"][1]
        res["rescan"] = {"runs": runs, "wall_s": runs[-1]["request_step_wall_s"],
                         "request_bytes": runs[-1]["request_bytes"],
                         "uptodate_answer": {"wall_s": up["wall_s"], "cpu_s": up["cpu_s"],
                                             "peak_rss_kb": up["peak_rss_kb"]}}
        # Republishing the unchanged source, twice: the first may still read files changed within two
        # seconds of the last scan (they are not cached), the second is the steady state.
        reps = [w.publish()[0] for _ in range(2)]
        res["republish"] = {"runs": [{"wall_s": p.wall, "cpu_s": p.cpu, "peak_rss_kb": p.maxrss_kb} for p in reps],
                            "wall_s": reps[-1].wall, "cpu_s": reps[-1].cpu}
        res["git_status"] = git_status(w.data, w.base / "git-dir")

    return extra


def git_status(tree, git_dir):
    """A warm `git status --porcelain` on a repository of `tree` (separate git dir, so the tree is untouched):
    init, add, commit once, one untimed status, then the best of three timed ones."""
    if not have("git"):
        return None
    g = ["git", f"--git-dir={git_dir}", f"--work-tree={tree}", "-c", "user.name=bench", "-c",
         "user.email=bench@example.org", "-c", "commit.gpgsign=false", "-c", "core.fsmonitor=false",
         "-c", "core.untrackedCache=false"]
    run_plain(["git", "init", "-q", f"--separate-git-dir={git_dir}", str(git_dir) + ".wt"])
    shutil.rmtree(str(git_dir) + ".wt")
    run_plain(g + ["add", "-A"], cwd=tree)
    run_plain(g + ["commit", "-q", "-m", "tree"], cwd=tree)
    run_plain(g + ["status", "--porcelain"], cwd=tree)
    times = []
    for _ in range(3):
        p = Proc(g + ["status", "--porcelain"], cwd=tree)
        if p.stdout.strip():
            die(f"git status found changes in an unchanged tree:\n{p.stdout[:2000]}")
        times.append(p.wall)
    shutil.rmtree(git_dir, ignore_errors=True)
    return {"wall_s": min(times), "runs_s": times}


COLDHASH_BYTES = 800_000_000


def coldhash_extra(args):
    def extra(w, res):
        """Fresh recipients whose data tree already holds copies of A (about 800 MB) and which have no stat cache: the first
        `recipient run --once` of each hashes every file (and sends a full-inventory request). Best of five,
        next to the best of five b3sum runs over the same files, all with a warm page cache. The fixed cost
        of such a run is the best of three fresh recipients on an empty data tree."""
        log("   cold hash: fresh recipients on copies of A, next to b3sum")
        data2 = w.base / "data2"
        # Enough copies of A for about 800 MB: hashing 100 MB takes some 20 ms, too little next to the
        # few milliseconds any process needs to start, so one copy would measure start-up, not throughput.
        _, one = tree_stats(w.source)
        copies = max(1, min(16, -(-COLDHASH_BYTES // max(one, 1))))
        data2.mkdir()
        for i in range(copies):
            copy_tree(w.source, data2 / f"copy{i}")
        files, size = tree_stats(data2)
        names = sorted(str(p) for p in data2.rglob("*") if p.is_file())
        for n in names:  # the same (warm) page-cache state for every run below
            with open(n, "rb") as f:
                while f.read(1 << 22):
                    pass
        counter = [1]

        def fresh_run(data):
            counter[0] += 1
            site = f"site{counter[0]}"
            enr = w.base / f"{site}.enrollment"
            w.mf("owner", "add-recipient", "--config", w.owner_cfg, "--name", site, "--address",
                 f"{site}@customer.example", "--out", enr)
            # its own spool, so that its request never reaches the owner and the update phase stays site1's
            w.mf("recipient", "init", "--dir", w.base / site, "--data", data, "--enrollment", enr,
                 "--transport-root", w.base / f"spool-{site}")
            p = w.mf("recipient", "run", "--config", w.base / site / "recipient.toml", "--once")
            shutil.rmtree(w.base / site)
            shutil.rmtree(w.base / f"spool-{site}")
            return p

        empty = [fresh_run(w.base / f"empty{i}") for i in range(3)]
        cold = [fresh_run(data2) for _ in range(5)]
        best = min(cold, key=lambda p: p.wall)
        base = min(p.wall for p in empty)
        mf = {"wall_s": best.wall, "cpu_s": best.cpu, "peak_rss_kb": best.maxrss_kb, "mb_s": size / 1e6 / best.wall,
              "runs_s": [p.wall for p in cold], "empty_tree_run_s": base, "empty_tree_runs_s": [p.wall for p in empty],
              "net_mb_s": size / 1e6 / (best.wall - base) if best.wall > base else None}
        ch = {"files": files, "bytes": size, "copies": copies, "mailferry": mf}
        if have("b3sum"):
            for key, extra_args in (("b3sum", []), ("b3sum_1thread", ["--num-threads", "1"])):
                qs = [Proc(["b3sum", *extra_args, *names]) for _ in range(5)]
                q = min(qs, key=lambda x: x.wall)
                ch[key] = {"wall_s": q.wall, "cpu_s": q.cpu, "mb_s": size / 1e6 / q.wall, "runs_s": [x.wall for x in qs]}
            ch["ratio"] = mf["mb_s"] / ch["b3sum"]["mb_s"]
            if mf["net_mb_s"]:
                ch["net_ratio"] = mf["net_mb_s"] / ch["b3sum"]["mb_s"]
        res["coldhash"] = ch
        shutil.rmtree(data2)

    return extra


def run_parts(args, binary, quick):
    """A 30 MB update (incompressible) through a 10 MB relay limit: counts the parts; then the same update
    with one part deleted before the recipient reads it: only that part should travel again."""
    size = 3_000_000 if quick else 30_000_000
    limit = 1_000_000 if quick else 10_000_000
    tree_a, tree_b = parts_trees(size, "quick" if quick else "full")
    name = "parts"
    title = f"{size / 1e6:.0f} MB of random bytes through a {limit / 1e6:.0f} MB relay-limit"
    log(f"== {name}: {title}")
    res = {"name": name, "title": title, "size": size, "relay_limit": limit, "supported": None}

    work = new_workdir(args, "parts")
    w = World(binary, work)
    w.setup(tree_a, recipient_extra={"reply-timeout": '"3s"'})
    set_keys(w.owner_cfg, "owner", {"relay-limit": str(limit)})
    p = w.mf("status", "--config", w.owner_cfg, check=False)
    if p.rc == 2 and "relay-limit" in p.stderr and "unknown field" in p.stderr:
        res["supported"] = False
        res["error"] = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        done_workdir(args, work)
        log("   parts: not supported by this build (owner.toml refuses `relay-limit`)")
        res["lost_reply"] = lost_reply(args, binary, tree_a, tree_b, parts_supported=False)
        return res
    res["supported"] = True
    _, g1 = w.publish()
    before = w.snapshot()
    w.cycle()
    w.measure(before)
    w.verify(g1, "parts: first sync")
    w.replace_source(tree_b)
    _, g2 = w.publish()
    before = w.snapshot()
    w.cycle()
    for _ in range(2):  # a build that needs another run to put the parts together gets it (and it is counted)
        if w.status(w.site_cfg).get("generation") == g2:
            break
        w.step("recipient", "apply", "--no-request")
        w.step("owner", "receipt")
    res["update"] = w.measure(before)
    w.verify(g2, "parts: update")
    done_workdir(args, work)
    res["lost"] = lost_reply(args, binary, tree_a, tree_b, parts_supported=True, limit=limit)
    return res


def lost_reply(args, binary, tree_a, tree_b, parts_supported, limit=None):
    """Sync A, publish B, let the owner answer, delete one reply message from the recipient's new/, wait past
    the recipient's reply-timeout (3 s), then run recipient, owner, recipient, owner and count what travels
    after the loss. With a single-message reply (no relay-limit) the whole reply travels again."""
    log("   one reply message lost: resend after reply-timeout")
    work = new_workdir(args, "parts-lost" if parts_supported else "lost-reply")
    w = World(binary, work)
    w.setup(tree_a, recipient_extra={"reply-timeout": '"3s"'})
    if parts_supported:
        set_keys(w.owner_cfg, "owner", {"relay-limit": str(limit)})
    _, g1 = w.publish()
    w.cycle()
    w.steps = []
    w.verify(g1, "lost reply: first sync")
    w.replace_source(tree_b)
    _, g2 = w.publish()
    before = w.snapshot()
    w.step("recipient", "request")
    w.step("owner", "answer")
    first = w.measure(before)
    new = sorted((w.spool / SITE / "new").iterdir())
    if not new:
        die("lost reply: the owner sent no reply")
    victim = new[len(new) // 2]
    lost_bytes = victim.stat().st_size
    victim.unlink()
    time.sleep(3.5)
    before = w.snapshot()
    for _ in range(3):
        w.step("recipient", "re-request")
        w.step("owner", "resend")
        w.step("recipient", "apply", "--no-request")
        w.step("owner", "receipt")
        if w.status(w.site_cfg).get("generation") == g2:
            break
        time.sleep(3.5)
    resend = w.measure(before)
    w.verify(g2, "lost reply: after the resend")
    done_workdir(args, work)
    return {"first_reply_msgs": first["o2r_msgs"], "first_reply_bytes": first["o2r_bytes"],
            "lost_msg_bytes": lost_bytes, "resend": resend}


def db_bytes(state_dir):
    """Size of an owner's state database on disk (the file and its write-ahead log)."""
    return sum(f.stat().st_size for f in state_dir.glob("state.db*") if f.is_file())


def stored_reply_bytes(state_dir):
    """Reply bytes the owner's database holds: kept parts and queued messages."""
    import sqlite3
    con = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        total = 0
        for table in ("sent_parts", "outbox"):
            total += con.execute(f"SELECT coalesce(sum(length(raw)), 0) FROM {table}").fetchone()[0]
        return total
    finally:
        con.close()


def run_fleet(args, binary, quick):
    """N recipients on the same base (the signature database's A, as hard-linked copies) ask at once; one
    `owner run --once` answers them all with generation B. Owner CPU per request, RSS, database growth and
    the bytes handed to the transport, next to what N private replies cost (the same today: no broadcast)."""
    size = 10_000_000
    tree_a, tree_b = sigdb_trees(size, "quick")
    name = "fleet"
    sizes = FLEET_SIZES
    title = (f"N recipients on one base (signature database, {size / 1e6:.0f} MB: A -> B), "
             f"N = {', '.join(str(n) for n in sizes)}")
    log(f"== {name}: {title}")
    res = {"name": name, "title": title, "runs": []}
    for n in sizes:
        log(f"   N = {n}")
        work = new_workdir(args, f"fleet-{n}")
        w = World(binary, work)
        copy_tree(tree_a, w.source)
        w.mf("owner", "init", "--dir", w.base / "owner", "--source", w.source, "--address", OWNER,
             "--transport-root", w.spool)
        # Large enough a budget that the fleet is never refused for it.
        set_keys(w.owner_cfg, "owner", {"budget-replies": "100000"})
        w.publish()
        w.replace_source(tree_b)
        _, g2 = w.publish()
        addresses = []
        for i in range(n):
            site = f"fleet{i:04d}"
            addr = f"{site}@customer.example"
            enr = w.base / f"{site}.enrollment"
            w.mf("owner", "add-recipient", "--config", w.owner_cfg, "--name", site, "--address", addr, "--out", enr)
            data = w.base / "data" / site
            data.parent.mkdir(exist_ok=True)
            run_plain(["cp", "-al", str(tree_a), str(data)])
            w.mf("recipient", "init", "--dir", w.base / site, "--data", data, "--enrollment", enr,
                 "--transport-root", w.spool)
            w.mf("recipient", "run", "--config", w.base / site / "recipient.toml", "--once")
            addresses.append(addr)
        state = w.base / "owner"
        db_before = db_bytes(state)
        p = w.mf("owner", "run", "--config", w.owner_cfg, "--once")
        db_after = db_bytes(state)
        stored = stored_reply_bytes(state)
        sizes_out = []
        for addr in addresses:
            msgs = maildir_messages(w.spool, addr)
            sizes_out.append(sum(msgs.values()))
        handed = sum(sizes_out)
        one = min(sizes_out) if sizes_out else 0
        # Check one recipient really gets B from it.
        site0 = w.base / "fleet0000" / "recipient.toml"
        w.mf("recipient", "run", "--config", site0, "--once", "--no-request")
        st = w.status(site0)
        if st.get("generation") != g2:
            die(f"fleet: recipient 0 is at generation {st.get('generation')}, expected {g2}")
        diff = compare_trees(tree_b, w.base / "data" / "fleet0000")
        if diff:
            die(f"fleet: recipient 0's tree differs from B:\n{diff}")
        res["runs"].append({
            "n": n, "owner_cpu_s": p.cpu, "owner_wall_s": p.wall, "owner_peak_rss_kb": p.maxrss_kb,
            "cpu_per_request_s": p.cpu / n, "db_growth_bytes": db_after - db_before,
            "db_growth_per_recipient": (db_after - db_before) / n, "stored_reply_bytes": stored,
            "handed_bytes": handed, "one_reply_bytes": one, "private_bytes": one * n,
        })
        done_workdir(args, work)
    return res


def store_bytes(store, sub):
    d = store / sub
    if not d.is_dir():
        return 0
    return sum(e.stat().st_size for sub_d in os.scandir(d) for e in os.scandir(sub_d.path))


def run_history(args, binary):
    """A recipient 100 generations behind: the signature database (quick set, 10 MB), one generation after
    another each appending 0.5% new lines to every file, the owner at `keep-generations = 1`. The
    recipient, still on generation 1, syncs once: its reply against a direct delta (an owner that kept
    both generations), the round trips, and the owner's store against one generation plus the deltas."""
    size = 10_000_000
    tree_a, _ = sigdb_trees(size, "quick")
    gens = HISTORY_GENERATIONS
    name = "history"
    title = (f"a recipient {gens} generations behind (signature database, {size / 1e6:.0f} MB; "
             "each generation appends 0.5% lines to every file; keep-generations = 1)")
    log(f"== {name}: {title}")
    rng = random.Random(20261201)
    files = sorted(p.name for p in tree_a.iterdir())
    base_lines = {f: (tree_a / f).read_text().count("\n") for f in files}
    n = 10 ** 7

    def appended(f):
        nonlocal n
        out = []
        for _ in range(max(1, base_lines[f] // 200)):
            n += 1
            out.append(f"Win.Trojan.Agent-{n}:0:*:{rng.randbytes(rng.randint(16, 80)).hex()}\n")
        return "".join(out)

    work = new_workdir(args, name)
    w = World(binary, work)
    w.setup(tree_a)
    set_keys(w.owner_cfg, "owner", {"keep-generations": "1"})
    w.publish()
    w.cycle()
    w.steps = []
    one_gen = store_bytes(work / "owner" / "store", "objects")
    step_floor = 0
    publish_cpu = []
    for g in range(2, gens + 2):
        added = ""
        for f in files:
            more = appended(f)
            added += more
            with open(w.source / f, "a") as fh:
                fh.write(more)
        p, got = w.publish()
        if got != g:
            die(f"history: publish made generation {got}, expected {g}")
        publish_cpu.append(p.cpu)
        # The floor of the delta between consecutive generations: the appended lines at zstd -19.
        raw = subprocess.run(["zstd", "-19", "-c"], input=added.encode(), stdout=subprocess.PIPE, check=True).stdout
        step_floor += len(raw)
    newest = gens + 1
    store = work / "owner" / "store"
    objects, deltas = store_bytes(store, "objects"), store_bytes(store, "deltas")
    before = w.snapshot()
    w.cycle()
    res = w.measure(before)
    # A need-full-inventory answer would leave the tree on generation 1 here (the apply step sends no
    # second request), which verify() reports.
    w.verify(newest, "history")
    reply = res["o2r_bytes"]
    requests = res["r2o_msgs"] - 1  # less the receipt

    # The reference: an owner that kept both generation 1 and the newest.
    ref = new_workdir(args, name + "-direct")
    r = World(binary, ref)
    r.setup(tree_a)
    r.publish()
    r.cycle()
    r.steps = []
    r.replace_source(w.source)
    done_workdir(args, work)
    r.publish()
    before = r.snapshot()
    r.cycle()
    res_ref = r.measure(before)
    r.verify(2, "history reference")
    done_workdir(args, ref)
    return {
        "name": name, "title": title, "generations": gens, "reply_bytes": reply, "direct_bytes": res_ref["o2r_bytes"],
        "requests": requests, "replies": res["o2r_msgs"],
        "owner_cpu_s": res["owner_cpu_s"], "store_objects": objects, "store_deltas": deltas, "one_generation": one_gen,
        "step_deltas_floor": step_floor, "publish_cpu_s": publish_cpu,
    }


# ----------------------------------------------------------------------------------------------------------
# report


# ----------------------------------------------------------------------------------------------------------
# the fleet: N recipients on one base, with the signed broadcast and with N private replies


def broadcast_fleet_trees(tag):
    """Tree A (about 2 MB: binary blobs and text) and B (+300 KB new content, a few edits)."""
    base = cache_dir() / f"broadcast-fleet-{tag}"
    a, b = base / "a", base / "b"
    if (base / "done").exists():
        return a, b
    shutil.rmtree(base, ignore_errors=True)
    rng = random.Random(15)
    for i in range(8):
        p = a / "db" / f"part{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(200_000))
    for i in range(40):
        p = a / "docs" / f"page{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(" ".join(_words(rng, 2000)) + "\n")
    copy_tree(a, b)
    (b / "db" / "daily.bin").write_bytes(rng.randbytes(300_000))
    for i in range(0, 40, 8):
        with open(b / "docs" / f"page{i}.txt", "a") as f:
            f.write(" ".join(_words(rng, 200)) + "\n")
    (base / "done").write_text("ok\n")
    return a, b


def run_broadcast_fleet(args, binary, n, broadcast):
    """N recipients synced to A, then B published and every one asks: the owner's answer step measured."""
    d = new_workdir(args, f"fleet-{n}-{'broadcast' if broadcast else 'private'}")
    a, b = broadcast_fleet_trees("v1")
    env = dict(os.environ, MAILFERRY_LOG="warn", RUST_LOG="warn")
    mf = lambda *x, check=True: Proc([binary, *x], env=env, check=check)  # noqa: E731
    source, spool, owner_cfg = d / "source", d / "spool", d / "owner" / "owner.toml"
    copy_tree(a, source)
    mf("owner", "init", "--dir", d / "owner", "--source", source, "--address", OWNER, "--transport-root", spool)
    # Private replies: the owner does not sign, so it never broadcasts; everything else is the same.
    set_keys(owner_cfg, "owner", {"signing": '"hmac+ed25519"' if broadcast else '"hmac"'})
    sites = []
    for i in range(n):
        name = f"s{i:04d}"
        enr = d / f"{name}.enrollment"
        mf("owner", "add-recipient", "--config", owner_cfg, "--name", name, "--address", f"{name}@fleet.example",
           "--out", enr)
        mf("recipient", "init", "--dir", d / name, "--data", d / f"{name}-data", "--enrollment", enr,
           "--transport-root", spool)
        sites.append((name, d / name / "recipient.toml"))
    mf("owner", "publish", "--config", owner_cfg)
    run = lambda cfg, role, *x: mf(role, "run", "--config", cfg, "--once", "--fail-on-refusal", *x)  # noqa: E731

    def round_trip():
        for _, cfg in sites:
            run(cfg, "recipient")
        before = {}
        for name, _ in sites:
            before[name] = set(maildir_messages(spool, f"{name}@fleet.example"))
        db = d / "owner" / "state.db"

        def used():
            # Pages in use (free pages left by sent outbox messages are reused, not growth).
            q = run_plain(["sqlite3", db, "PRAGMA page_count;", "PRAGMA freelist_count;", "PRAGMA page_size;"])
            pages, free, size = (int(x) for x in q.stdout.split())
            return (pages - free) * size

        db_before = used()
        ans = run(owner_cfg, "owner")
        digests, total, copies = set(), 0, 0
        for name, _ in sites:
            box = spool / f"{name}@fleet.example" / "new"
            for f in box.iterdir():
                if f.name.split(":", 1)[0] in before[name]:
                    continue
                data = f.read_bytes()
                copies += 1
                h = hashlib.sha256(data).digest()
                if h not in digests:  # a broadcast part reaches every site as the same bytes: handed over once
                    digests.add(h)
                    total += len(data)
        for _, cfg in sites:
            run(cfg, "recipient", "--no-request")
        rec = run(owner_cfg, "owner")
        db_after = used()
        return {"bytes": total, "messages": len(digests), "copies": copies, "cpu": ans.cpu, "rss_kb": ans.maxrss_kb,
                "receipt_cpu": rec.cpu, "db_growth": db_after - db_before}

    round_trip()  # every site on A (not measured)
    shutil.rmtree(source)
    copy_tree(b, source)
    mf("owner", "publish", "--config", owner_cfg)
    r = round_trip()
    for _, cfg in sites[:3] + sites[-1:]:
        st = json.loads(mf("status", "--config", cfg, "--json", check=False).stdout or "{}")
        if st.get("generation") != 2:
            die(f"fleet {n}: a site did not reach generation 2: {st}")
    bcast = ""
    if broadcast:
        q = subprocess.run(["sqlite3", d / "owner" / "state.db", "SELECT coalesce(sum(bytes),0) FROM broadcasts "
                            "WHERE generation = 2"], stdout=subprocess.PIPE, text=True)
        bcast = q.stdout.strip()
    r.update({"n": n, "mode": "broadcast" if broadcast else "private", "payload": int(bcast) if bcast else None})
    done_workdir(args, d)
    return r


def broadcast_fleet_report(rows):
    out = ["## fleet: N recipients on one base (B published, every site asks)", ""]
    head = ["N", "mode", "bytes to transport", "messages", "per recipient", "owner CPU/request", "owner RSS",
            "DB growth/recipient"]
    lines = []
    for r in rows:
        lines.append([f"{r['n']:,}", r["mode"], fmt_bytes(r["bytes"]), f"{r['messages']:,}",
                      fmt_bytes(r["bytes"] // r["n"]), f"{r['cpu'] / r['n'] * 1000:.1f} ms",
                      f"{fmt_mib(r['rss_kb'])} MiB", fmt_bytes(r["db_growth"] // r["n"])])
    out.append(table(head, lines, right={0, 2, 3, 4, 5, 6, 7}))
    for r in rows:
        if r["mode"] == "broadcast" and r.get("payload"):
            limit = 1.2 * r["payload"] + r["n"] * 4096
            out.append(f"N={r['n']:,}: payload {fmt_bytes(r['payload'])}, target 1.2 x payload + N x 4 KB = "
                       f"{fmt_bytes(int(limit))}: {verdict(r['bytes'] <= limit)}")
    return "\n".join(out)


def verdict(ok):
    return "PASS" if ok else "FAIL"


def report(results, args, meta):
    out = []
    out.append(f"mailferry benchmark  {meta['date']}  {meta['machine']}")
    out.append(f"binary: {meta['binary']} ({meta['version']})")
    out.append("tools: " + ", ".join(f"{k}: {v or 'missing'}" for k, v in meta["tools"].items()))
    out.append("sizes: 1 KB = 1,000 bytes; mail = message files as delivered into the Maildir, headers included")
    out.append("")
    targets = []
    for r in results:
        if r["name"] in ("parts", "fleet", "history"):
            continue
        out.append(f"== {r['name']}: {r['title']}")
        out.append(f"   A: {r['a']['files']:,} files, {r['a']['bytes']:,} bytes; "
                   f"B: {r['b']['files']:,} files, {r['b']['bytes']:,} bytes")
        rows = []
        for ph, label in (("first", "first sync"), ("update", "update")):
            m = r[ph]
            rows.append([label, fmt_bytes(m["r2o_bytes"]), m["r2o_msgs"], fmt_bytes(m["o2r_bytes"]), m["o2r_msgs"],
                         fmt_bytes(m["total_bytes"]), fmt_s(m["owner_cpu_s"]), fmt_s(m["recipient_cpu_s"]),
                         fmt_s(m["wall_s"]), fmt_mib(m["owner_peak_rss_kb"]), fmt_mib(m["recipient_peak_rss_kb"])])
        out.append(table(["phase", "rcpt->owner bytes", "msgs", "owner->rcpt bytes", "msgs", "total bytes", "owner CPU s",
                          "rcpt CPU s", "wall s", "owner RSS MiB", "rcpt RSS MiB"], rows))
        pb = r["publish_b"]
        out.append(f"   owner publish of B (not in the phases): {pb['wall_s']:.2f} s wall, {pb['cpu_s']:.2f} s CPU, "
                   f"{pb['peak_rss_kb'] / 1024:.0f} MiB")
        rs = r.get("rsync")
        z = r["zstd"]
        out.append("   update next to the references:")
        ref_rows = [["mailferry update (all mail both ways)", fmt_bytes(r["update"]["total_bytes"]), "1.00"]]
        if rs:
            ref_rows.append([f"rsync -a -c -z --delete, local pipe, {rs['compression']} (sent+received)",
                             fmt_bytes(rs["bytes"]), f"{r['update']['total_bytes'] / rs['bytes']:.2f}"])
        ref_rows.append([f"zstd -{z['level']} --long=31 --patch-from=A.tar B.tar", fmt_bytes(z["bytes"]),
                         fmt_s(r["ratio_vs_zstd"])])
        out.append(table(["   ", "bytes", "mailferry / this"], ref_rows))
        if r["name"] in PACKAGE_PAIRS:
            pp = PACKAGE_PAIRS[r["name"]]
            t = pp["target_update_bytes"]
            v = r["update"]["total_bytes"]
            targets.append([r["name"], "update mail, both ways", f"<= {fmt_kb(t)}", fmt_kb(v), verdict(v <= t),
                            f"rsync {fmt_kb(rs['bytes']) if rs else '—'} (issue: {fmt_kb(pp['rsync_reference'])}), "
                            f"zstd {fmt_kb(z['bytes'])}"])
        elif r["name"] == "sigdb-issue":
            v = r["update"]["total_bytes"]
            targets.append([r["name"], "update mail, both ways", f"<= {fmt_kb(SIGDB_TARGET)}", fmt_kb(v),
                            "—" if args.quick else verdict(v <= SIGDB_TARGET),
                            "quick: 10 MB set" if args.quick else f"zstd {fmt_kb(z['bytes'])}"])
        elif r["name"] == "sigdb":
            v = r["update"]["total_bytes"]
            targets.append([r["name"], "update mail, both ways", f"<= {fmt_kb(SIGDB_TARGET)}", fmt_kb(v),
                            "—" if args.quick else verdict(v <= SIGDB_TARGET),
                            "quick: 10 MB set" if args.quick else f"zstd {fmt_kb(z['bytes'])}"])
        else:
            targets.append([r["name"], "update mail, both ways", "—", fmt_kb(r["update"]["total_bytes"]), "—",
                            f"rsync {fmt_kb(rs['bytes']) if rs else '—'}, zstd {fmt_kb(z['bytes'])}"])
        anchors = [x for x in (rs["bytes"] if rs else None, z["bytes"]) if x]
        if anchors:
            best = min(anchors)
            limit = ANCHOR_FACTOR * best + ANCHOR_SLACK
            v = r["update"]["total_bytes"]
            targets.append([r["name"], "update vs best anchor", f"<= {fmt_kb(limit)}", fmt_kb(v), verdict(v <= limit),
                            f"1.37 x {fmt_kb(best)} + 8 KB; {v / best:.2f} x the best anchor"])
        if "rescan" in r:
            rsn, gs = r["rescan"], r.get("git_status")
            out.append("   rescan of the unchanged tree (recipient run --once: process start, stat-cache scan, "
                       "request built and delivered):")
            for i, run in enumerate(rsn["runs"], 1):
                out.append(f"     run {i}: {run['request_step_wall_s']:.2f} s wall, {run['request_step_cpu_s']:.2f} s CPU, "
                           f"request {fmt_bytes(run['request_bytes'])} bytes")
            if gs:
                out.append(f"     git status --porcelain (warm, best of 3): {gs['wall_s']:.2f} s")
            quick = args.quick
            rb = rsn["request_bytes"]
            targets.append([r["name"], "request, unchanged tree", "<= 4.0 KB", fmt_kb(rb),
                            "—" if quick or rb is None else verdict(rb <= 4 * KB), "quick: smaller tree" if quick else ""])
            if gs:
                targets.append([r["name"], "rescan wall (2nd run)", f"<= git status {gs['wall_s']:.2f} s",
                                f"{rsn['wall_s']:.2f} s", "—" if quick else verdict(rsn["wall_s"] <= gs["wall_s"]),
                                "quick: smaller tree" if quick else ""])
        if "republish" in r:
            rp, gs = r["republish"], r.get("git_status")
            up = r["rescan"]["uptodate_answer"]
            out.append("   owner publish of the unchanged source (whole process, publish stat cache): "
                       + ", ".join(f"run {i}: {x['wall_s']:.2f} s wall, {x['cpu_s']:.2f} s CPU"
                                   for i, x in enumerate(rp["runs"], 1)))
            out.append(f"   owner answer to the up-to-date request (whole `owner run --once`): {up['wall_s']:.3f} s wall, "
                       f"{up['cpu_s']:.3f} s CPU, {up['peak_rss_kb'] / 1024:.0f} MiB")
            if gs:
                targets.append([r["name"], "republish, unchanged tree", f"<= 2 x git status {2 * gs['wall_s']:.2f} s",
                                f"{rp['wall_s']:.2f} s", "—" if args.quick else verdict(rp["wall_s"] <= 2 * gs["wall_s"]),
                                "quick: smaller tree" if args.quick else ""])
            targets.append([r["name"], "up-to-date request, owner CPU", "<= 20 ms", f"{up['cpu_s'] * 1000:.0f} ms",
                            "—" if args.quick else verdict(up["cpu_s"] <= 0.020),
                            "whole process" + ("; quick: smaller tree" if args.quick else "")])
        if "coldhash" in r:
            ch = r["coldhash"]
            mf = ch["mailferry"]
            out.append(f"   cold hash ({ch['files']} files, {ch['bytes']:,} bytes = {ch.get('copies', 1)} copies of A; "
                       "page cache warm, no stat cache; best of 5):")
            out.append(f"     mailferry recipient run --once (first scan, whole process): {mf['wall_s']:.3f} s, "
                       f"{mf['mb_s']:.0f} MB/s, {mf['cpu_s']:.2f} s CPU, {mf['peak_rss_kb'] / 1024:.0f} MiB")
            if mf.get("net_mb_s"):
                out.append(f"     the same less an empty-tree run ({mf['empty_tree_run_s']:.3f} s: process start, database, "
                           f"request, delivery; best of 3): {mf['net_mb_s']:.0f} MB/s")
            if "b3sum" in ch:
                b = ch["b3sum"]
                b1 = ch["b3sum_1thread"]
                out.append(f"     b3sum (default threads): {b['wall_s']:.3f} s, {b['mb_s']:.0f} MB/s; "
                           f"b3sum --num-threads 1: {b1['wall_s']:.3f} s, {b1['mb_s']:.0f} MB/s")
                targets.append([r["name"], "cold hash vs b3sum", ">= 80%", f"{ch['ratio'] * 100:.0f}%",
                                "—" if args.quick else verdict(ch["ratio"] >= 0.8),
                                f"whole run {mf['mb_s']:.0f} vs {b['mb_s']:.0f} MB/s"
                                + (f"; less fixed cost {ch['net_ratio'] * 100:.0f}%" if ch.get("net_ratio") else "")
                                + ("; quick: smaller set" if args.quick else "")])
        out.append("")
    for r in results:
        if r["name"] != "parts":
            continue
        out.append(f"== parts: {r['title']}")
        if not r["supported"]:
            out.append("   parts: not supported by this build")
            out.append(f"   ({r.get('error', '')})")
            targets.append(["parts", "arrives in parts, applies", "yes", "not supported", "—", "owner.toml refuses relay-limit"])
            targets.append(["parts", "one part lost: only it resent", "1 msg", "not supported", "—", ""])
        else:
            m = r["update"]
            out.append(table(["phase", "rcpt->owner bytes", "msgs", "owner->rcpt bytes", "msgs", "total bytes", "owner CPU s",
                              "rcpt CPU s", "wall s", "owner RSS MiB", "rcpt RSS MiB"],
                             [["update", fmt_bytes(m["r2o_bytes"]), m["r2o_msgs"], fmt_bytes(m["o2r_bytes"]),
                               m["o2r_msgs"], fmt_bytes(m["total_bytes"]), fmt_s(m["owner_cpu_s"]),
                               fmt_s(m["recipient_cpu_s"]), fmt_s(m["wall_s"]), fmt_mib(m["owner_peak_rss_kb"]),
                               fmt_mib(m["recipient_peak_rss_kb"])]]))
            targets.append(["parts", "arrives in parts, applies", "> 1 msg", f"{m['o2r_msgs']} msgs",
                            verdict(m["o2r_msgs"] > 1), f"{fmt_kb(m['o2r_bytes'])} owner->rcpt"])
        lr = r.get("lost") or r.get("lost_reply")
        if lr:
            rs = lr["resend"]
            label = "one part lost" if r["supported"] else "single-message reply lost (no parts in this build)"
            out.append(f"   {label}: first reply {lr['first_reply_msgs']} msgs / {fmt_bytes(lr['first_reply_bytes'])} B, "
                       f"deleted one of {fmt_bytes(lr['lost_msg_bytes'])} B")
            out.append(f"   after reply-timeout: rcpt->owner {rs['r2o_msgs']} msgs / {fmt_bytes(rs['r2o_bytes'])} B, "
                       f"owner->rcpt {rs['o2r_msgs']} msgs / {fmt_bytes(rs['o2r_bytes'])} B, applied")
            if r["supported"]:
                # the resend is the part plus the (empty) receipt path: count reply messages only
                targets.append(["parts", "one part lost: only it resent", "1 msg", f"{rs['o2r_msgs']} msgs",
                                verdict(rs["o2r_msgs"] == 1), f"{fmt_kb(rs['o2r_bytes'])} resent"])
        out.append("")
    for r in results:
        if r["name"] != "fleet":
            continue
        out.append(f"== fleet: {r['title']}")
        out.append("   one `owner run --once` answers N waiting requests; no signed broadcast yet (issue 15 item 1),")
        out.append("   so the bytes handed to the transport are N private replies")
        rows = []
        for x in r["runs"]:
            rows.append([x["n"], fmt_s(x["owner_cpu_s"]), f"{x['cpu_per_request_s'] * 1000:.1f}",
                         fmt_mib(x["owner_peak_rss_kb"]), fmt_bytes(x["db_growth_bytes"]),
                         fmt_bytes(int(x["db_growth_per_recipient"])), fmt_bytes(x["stored_reply_bytes"]),
                         fmt_bytes(x["handed_bytes"]), fmt_bytes(x["private_bytes"])])
        out.append(table(["N", "owner CPU s", "ms/request", "owner RSS MiB", "db growth", "db/recipient",
                          "reply bytes in db", "handed to transport", "N private replies"], rows))
        for x in r["runs"]:
            n, one = x["n"], x["one_reply_bytes"]
            limit = 1.2 * one + n * 4 * KB
            targets.append(["fleet", f"N={n}: bytes to transport", f"<= {fmt_kb(limit)}", fmt_kb(x["handed_bytes"]),
                            verdict(x["handed_bytes"] <= limit), "1.2 x one payload + N x 4 KB (needs broadcast)"])
            targets.append(["fleet", f"N={n}: owner CPU per request", "<= 2 ms",
                            f"{x['cpu_per_request_s'] * 1000:.1f} ms", verdict(x["cpu_per_request_s"] <= FLEET_CPU_TARGET_S),
                            "whole run / N"])
            targets.append(["fleet", f"N={n}: db growth per recipient", f"<= {fmt_kb(FLEET_DB_TARGET)}",
                            fmt_kb(x["db_growth_per_recipient"]), verdict(x["db_growth_per_recipient"] <= FLEET_DB_TARGET),
                            "file size before and after the run"])
        out.append("")
    for r in results:
        if r["name"] != "history":
            continue
        out.append(f"== history: {r['title']}")
        old = r["store_objects"] + r["store_deltas"]
        rows = [[fmt_bytes(r["reply_bytes"]), fmt_bytes(r["direct_bytes"]), fmt_s(r["reply_bytes"] / max(1, r["direct_bytes"])),
                 r["requests"], fmt_bytes(r["one_generation"]), fmt_bytes(r["store_objects"]), fmt_bytes(r["store_deltas"]),
                 fmt_bytes(r["step_deltas_floor"]), fmt_s(sum(r["publish_cpu_s"]) / len(r["publish_cpu_s"])),
                 fmt_s(r["publish_cpu_s"][-1])]]
        out.append(table(["reply", "direct delta", "ratio", "requests", "one generation", "store: whole", "store: deltas",
                          "step deltas (floor)", "publish CPU s (mean)", "(last)"], rows))
        limit = 1.2 * r["direct_bytes"]
        targets.append(["history", f"{r['generations']} behind: reply", f"<= {fmt_kb(limit)}", fmt_kb(r["reply_bytes"]),
                        verdict(r["reply_bytes"] <= limit), "1.2 x a direct delta from its base"])
        targets.append(["history", f"{r['generations']} behind: round trips", "1", str(r["requests"]),
                        verdict(r["requests"] == 1), "requests sent for the update"])
        slimit = 1.5 * r["one_generation"] + r["step_deltas_floor"]
        targets.append(["history", "owner store, all generations", f"<= {fmt_kb(slimit)}", fmt_kb(old),
                        verdict(old <= slimit), "1.5 x one generation + the step deltas (zstd -19 floor)"])
        out.append("")
    out.append("== summary: one update per pair (all mail both ways, headers included; CPU, wall, RSS of the update phase)")
    rows = []
    for r in results:
        if r["name"] in ("parts", "fleet", "history"):
            continue
        u, f = r["update"], r["first"]
        rows.append([r["name"], fmt_bytes(f["total_bytes"]), fmt_bytes(u["total_bytes"]), u["total_msgs"],
                     fmt_bytes(r["rsync"]["bytes"]) if r.get("rsync") else None, fmt_bytes(r["zstd"]["bytes"]),
                     fmt_s(r["ratio_vs_zstd"], 1), fmt_s(u["owner_cpu_s"]), fmt_s(u["recipient_cpu_s"]),
                     fmt_s(u["wall_s"]), fmt_mib(max(u["owner_peak_rss_kb"], u["recipient_peak_rss_kb"]))])
    if rows:
        out.append(table(["pair", "first sync bytes", "update bytes", "msgs", "rsync -acz", "zstd patch",
                          "mf/zstd", "owner CPU s", "rcpt CPU s", "wall s", "peak RSS MiB"], rows))
        out.append("")
    out.append("== targets")
    out.append(table(["pair", "what", "target", "measured", "result", "note"], targets, right={3}))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a few-minute subset: package pairs, and the synthetic sets shrunk to 10%%")
    ap.add_argument("--only", help=f"comma-separated names from: {', '.join(ALL_NAMES)} (and --pair names)")
    ap.add_argument("--keep", metavar="DIR", help="keep each scenario's directory under DIR")
    ap.add_argument("--json", metavar="FILE", help="write machine-readable results to FILE")
    ap.add_argument("--pair", nargs=3, action="append", default=[], metavar=("NAME", "DIR_A", "DIR_B"),
                    help="an extra update pair of your own (no targets); repeatable")
    ap.add_argument("--bin", help="mailferry binary to use (default: target/release/mailferry, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release even if the binary exists")
    ap.add_argument("--fleet", metavar="N[,N...]",
                    help="only the fleet pair: N recipients on one base, with the signed broadcast and with N "
                         "private replies (e.g. 10,100,1000)")
    args = ap.parse_args()
    if args.fleet:
        binary, _ = ensure_binary(args)
        rows = []
        for n in [int(x) for x in args.fleet.split(",")]:
            for broadcast in (True, False):
                log(f"fleet: {n} recipients, {'broadcast' if broadcast else 'private replies'}")
                rows.append(run_broadcast_fleet(args, binary, n, broadcast))
        print(broadcast_fleet_report(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"fleet": rows}, indent=2) + "\n")
        return 0

    names = ALL_NAMES + [p[0] for p in args.pair]
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in names]
        if unknown:
            ap.error(f"unknown name(s) {unknown}; choose from {names}")
        names = [n for n in names if n in want]

    t0 = time.monotonic()
    try:
        tools = ensure_tools()
        binary, version = ensure_binary(args)
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
            "binary": str(binary), "version": version, "tools": tools, "quick": args.quick,
            "python": platform.python_version(),
        }
        results = []

        def save():
            if args.json:
                meta["elapsed_s"] = time.monotonic() - t0
                Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")

        for name in names:
            save()
            if name in PACKAGE_PAIRS:
                pp = PACKAGE_PAIRS[name]
                if name == "typescript":
                    a, b = npm_tree("typescript", "5.4.5"), npm_tree("typescript", "5.5.4")
                elif name == "django":
                    a, b = pip_sdist("django", "5.0"), pip_sdist("django", "5.0.1")
                else:
                    (a, _), (b, _) = pip_wheel("numpy", "2.1.0", True), pip_wheel("numpy", "2.1.1", True)
                results.append(run_pair(args, binary, name, pp["title"], a, b, zstd_level=19))
            elif name == "sigdb":
                size = 10_000_000 if args.quick else 100_000_000
                a, b = sigdb_trees(size, "quick" if args.quick else "full")
                title = (f"signature database, {size / 1e6:.0f} MB of text lines in 4 files; B: +1% lines appended, "
                         "0.5% scattered lines deleted")
                results.append(run_pair(args, binary, name, title, a, b, extra=coldhash_extra(args),
                                        zstd_level=ZSTD_LARGE_LEVEL))
            elif name == "sigdb-issue":
                # The set of issue 15 and docs' anchors: 0.5% of lines appended, 0.1% deleted.
                size = 10_000_000 if args.quick else 100_000_000
                a, b = sigdb_trees(size, "quick" if args.quick else "full", append_div=200, delete_div=1000)
                title = (f"signature database, {size / 1e6:.0f} MB of text lines in 4 files; B: +0.5% lines appended, "
                         "0.1% scattered lines deleted (issue 15's set)")
                results.append(run_pair(args, binary, name, title, a, b, zstd_level=ZSTD_LARGE_LEVEL))
            elif name == "tree100k":
                n = 10_000 if args.quick else 100_000
                a, b = tree_trees(n, "quick" if args.quick else "full")
                title = f"{n:,} small text files in nested directories; B: 0.1% of the files edited"
                results.append(run_pair(args, binary, name, title, a, b, extra=rescan_extra(args),
                                        zstd_level=ZSTD_LARGE_LEVEL))
            elif name == "parts":
                results.append(run_parts(args, binary, args.quick))
            elif name == "fleet":
                results.append(run_fleet(args, binary, args.quick))
            elif name == "history":
                results.append(run_history(args, binary))
            else:
                _, da, db = next(p for p in args.pair if p[0] == name)
                results.append(run_pair(args, binary, name, f"{da} -> {db}", Path(da).resolve(), Path(db).resolve()))
    except BenchError as e:
        log(f"\nbenchmark FAILED: {e}")
        return 2
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    meta["elapsed_s"] = time.monotonic() - t0
    text = report(results, args, meta)
    print(text)
    print(f"\ntotal time: {meta['elapsed_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
