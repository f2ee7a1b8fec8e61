"""Prefix each line of standard input with the seconds since this script started (for timing `make demo`):

    make demo 2>&1 | python3 scripts/stamp_lines.py
"""

import sys
import time

start = time.time()
for line in sys.stdin:
    sys.stdout.write(f"[{time.time() - start:7.1f}] {line}")
    sys.stdout.flush()
