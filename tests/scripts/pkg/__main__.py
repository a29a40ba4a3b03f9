"""Run as ``python -m pkg`` from tests/scripts."""

import os
import sys

from pkg.train import main

print("name:", __name__, "spec:", __spec__.name, "package:", __package__)
print("argv0 is file:", sys.argv[0] == __file__, "args:", sys.argv[1:])
print("path0 is cwd:", sys.path[0] == os.getcwd())
main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
