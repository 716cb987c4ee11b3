"""Small helpers shared by test modules."""

import subprocess
import sys


def mosaicrt(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the mosaicrt CLI in a fresh interpreter; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mosaicrt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
