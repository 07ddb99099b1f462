"""Build the LD_PRELOAD fault shim (shim.c) with the system C compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("shim.c")


def build_shim(out_dir: Path) -> Path:
    """Compile shim.c into `out_dir` and return the path of the shared object.

    Raises RuntimeError naming what to install when there is no C compiler
    (`make test` installs gcc and libc6-dev).
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH; run `make tools` to install gcc")
    out = out_dir / "kvs_fault_shim.so"
    flags = ["-shared", "-fPIC", "-O2", "-Wall", "-Werror"]
    result = subprocess.run(
        [compiler, *flags, "-o", str(out), str(SOURCE), "-ldl"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE} failed:\n{result.stderr}")
    return out


def shim_env(shim: Path, data_dir: Path, *, fsync_trigger: Path | None = None,
             write_trigger: Path | None = None, slow_fsync_trigger: Path | None = None,
             slow_fsync_ms: int = 1000) -> dict[str, str]:  # fmt: skip
    """Environment for a server whose data-dir syscalls misbehave once a trigger file exists."""
    env = {"LD_PRELOAD": str(shim), "KVS_FAULT_PATH_PREFIX": f"{data_dir}/"}
    if slow_fsync_trigger is not None:
        env["KVS_FAULT_SLOW_FSYNC_TRIGGER"] = str(slow_fsync_trigger)
        env["KVS_FAULT_SLOW_FSYNC_MS"] = str(slow_fsync_ms)
    if fsync_trigger is not None:
        env["KVS_FAULT_FSYNC_TRIGGER"] = str(fsync_trigger)
    if write_trigger is not None:
        env["KVS_FAULT_WRITE_TRIGGER"] = str(write_trigger)
    return env
