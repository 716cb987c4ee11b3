"""Build a TensorRT engine from a mosaicrt ONNX artifact (the same as `mosaicrt build`).

python build.py ARTIFACT_DIR -o ENGINE_DIR [--target sm86] [--max-batch 8] [--max-context N]
    [--max-chunk 512] [--timing-cache FILE]
"""

import sys

from mosaicrt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
