"""`python -m mosaicrt.train OUT_DIR ...`: the same as `mosaicrt train`."""

import sys

from mosaicrt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
