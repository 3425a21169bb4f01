"""What a load's file check costs: the full sha256 against the manifest's fingerprint, on a file of random
bytes (default 1 GiB), from the page cache and, when the kernel lets us drop it (root), from disk.

    PYTHONPATH=. python benchmarks/hash_cost.py [--gib 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sdengine.manifest import fingerprint, sha256_file


def drop_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    fd, name = tempfile.mkstemp(dir=args.dir, suffix=".bin")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(int(args.gib * 16)):
                f.write(os.urandom(64 << 20))
        gb = path.stat().st_size / 1e9
        for fn in (sha256_file, fingerprint):
            fn(path)  # warm
            started = time.perf_counter()
            fn(path)
            print(f"{fn.__name__:12s} page cache {time.perf_counter() - started:8.3f} s  ({gb:.2f} GB)")
            if drop_cache():
                started = time.perf_counter()
                fn(path)
                print(f"{fn.__name__:12s} disk       {time.perf_counter() - started:8.3f} s")
    finally:
        path.unlink()


if __name__ == "__main__":
    main()
