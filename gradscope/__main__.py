import sys

from gradscope.cli import entry

sys.exit(entry())
