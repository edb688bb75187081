"""Outputs appear whole or not at all: the one implementation every writer uses.

- `publish_dir(out, write)`: `write(staging)` fills a directory beside `out`, which is then
  renamed into place (an old `out` moved aside first and deleted after), so `out` is at every
  moment the old or the new output, never a mix. Every process of a multi-host run calls it;
  process 0 stages and renames, and all of them meet at barriers between the steps.
- `check_replaceable(out, key)`: the refusal before any work: an existing `out` is replaced
  only when it is empty or a previous output (it holds a `config.json`), never another
  directory (a replace is a recursive delete).
- `write_file(path, write)` / `write_text` / `write_json`: one file, written beside its name
  and renamed over it.
"""

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import jax
from jax.experimental import multihost_utils

MARKER = "config.json"  # what every output directory of this project holds


def check_replaceable(out: str | os.PathLike, key: str = "output directory") -> None:
    """FileExistsError naming `key` (the config key or flag that chose `out`) unless `out` is
    absent, an empty directory, or a previous output (holds config.json)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{key}={str(out)!r} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{key}={str(out)!r} is not empty and holds no {MARKER}, so it "
                              "is not a previous output to replace; choose another directory")


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so the rename publishes complete data even
    if the machine (not just the process) goes down right after it."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in [*files, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def replace_dir(staged: Path, out: Path) -> None:
    """Rename the complete directory `staged` to `out`; an existing `out` is moved aside first
    and deleted after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(staged, out)
        shutil.rmtree(old)
    else:
        os.rename(staged, out)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def publish_dir(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(staging)` into a directory beside `out`, then rename it to `out` at once.

    A leftover staging directory of a killed run is removed first; an existing `out` (a
    previous output) is replaced in one rename. On an exception the staging directory is
    removed and `out` is left as it was.
    """
    out = Path(os.path.abspath(out))
    # One fixed name, not mkdtemp: every process of a multi-host run must agree on it.
    staging = out.parent / f".{out.name}.partial"
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier("sparse_llama_publish_staging")
    try:
        write(staging)
        _barrier("sparse_llama_publish_written")
        if primary:
            fsync_tree(staging)
            replace_dir(staging, out)
        _barrier("sparse_llama_publish_committed")
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_file(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """`write(tmp)` writes the file at the temporary path `tmp`, which then replaces `path`;
    returns `path`. `tmp` keeps `path`'s suffix (numpy and safetensors writers look at it)."""
    path = str(path)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_file(path, write)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> str:
    return write_text(path, json.dumps(obj, indent=indent))
