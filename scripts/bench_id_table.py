"""Memory and time of the reader's duplicate-id table against the dict it replaced, in one run.

    python scripts/bench_id_table.py [N]     # N ids shaped like bench scale's ("wiki_vital:123-s4-c7")
Memory is what tracemalloc sees allocated by each structure; time is measured in a second pass without
tracemalloc (which slows every allocation several-fold). 1 thread.
"""

import sys
import time
import tracemalloc

from expertrag.data.id_table import IdTable


def ids(n):
    return (f"wiki_vital:{i // 40}-s{i % 40}-c{i // 50_000}" for i in range(n))


def measure(make, n):
    """(seconds, bytes): memory of one structure built under tracemalloc (held until measured), time of a
    second build without it."""
    tracemalloc.start()
    built = make(n)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del built
    t = time.perf_counter()
    make(n)
    return time.perf_counter() - t, current


def with_dict(n):
    seen = {}
    for line, doc_id in enumerate(ids(n)):  # what data/readers.py kept before: id -> (file index, line)
        seen.setdefault(doc_id, (0, line))
    return seen


def with_table(n):
    seen = IdTable()
    for line, doc_id in enumerate(ids(n)):
        seen.add(doc_id, line + 1)
    return seen


n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
d_s, d_b = measure(with_dict, n)
t_s, t_b = measure(with_table, n)
print(f"{n:,} ids: dict {d_b / n:.0f} B/id {d_s:.1f} s | IdTable {t_b / n:.0f} B/id {t_s:.1f} s | "
      f"memory ratio {t_b / d_b:.3f}, time ratio {t_s / d_s:.2f}")
