"""Summarise a valgrind memcheck log for the C core (used by `make valgrind`).

Prints valgrind's LEAK SUMMARY and ERROR SUMMARY, then the "definitely lost" loss records
and memory errors (invalid reads/writes, uninitialised values, bad frees) whose stack passes
through the extension (rotalabs_steer/_core*.so, or a csrc/ source file when built with -g).
Exit status 1 when any such record or error exists, 0 otherwise. CPython, torch and NumPy
leak by design at exit (interned objects, static caches); those records are not ours.

usage: python fuzz/valgrind_summary.py build/valgrind.log
"""

from __future__ import annotations

import re
import sys

OURS = re.compile(r"rotalabs_steer/_core[^ )]*\.so|_core\.cpython|csrc/|\b(accumulator|capture_hook|module|"
                  r"reduce|row_plan|tensor_view)\.c:")
LOST = re.compile(r"^([\d,]+) (?:\([^)]*\) )?bytes in ([\d,]+) blocks are definitely lost")
ERROR_KINDS = ("Invalid read", "Invalid write", "Conditional jump", "Use of uninitialised",
               "Invalid free", "Mismatched free", "Syscall param", "Source and destination overlap")


def ours(stack: list[str]) -> bool:
    """The stack passes through the extension, and the block is not tracemalloc's own
    bookkeeping (a trace record made while our code allocated)."""
    for line in stack:
        if "_tracemalloc.c" in line:
            return False
        if OURS.search(line):
            return True
    return False


def records(lines: list[str]) -> list[list[str]]:
    """Split the log into blocks: a header line and its stack, up to the next blank entry."""
    blocks, current = [], []
    for line in lines:
        text = re.sub(r"^==\d+== ?", "", line.rstrip("\n"))
        if not text.strip():
            if current:
                blocks.append(current)
            current = []
        else:
            current.append(text)
    if current:
        blocks.append(current)
    return blocks


def main(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    blocks = records(lines)
    summary = [b for b in blocks if b[0].startswith(("LEAK SUMMARY", "ERROR SUMMARY", "HEAP SUMMARY"))]
    for block in summary:
        print("\n".join(block))
    for line in lines:
        if "ERROR SUMMARY" in line:
            print(re.sub(r"^==\d+== ?", "", line.rstrip()))
    ours_lost, ours_bytes, ours_errors = [], 0, []
    total_lost = 0
    for block in blocks:
        header = block[0]
        match = LOST.search(header)
        if match:
            total_lost += int(match.group(1).replace(",", ""))
            if ours(block[1:]):
                ours_lost.append(block)
                ours_bytes += int(match.group(1).replace(",", ""))
        elif header.startswith(ERROR_KINDS) and ours(block[1:]):
            ours_errors.append(block)
    print(f"definitely lost, all records: {total_lost} bytes")
    print(f"definitely lost through the extension (_core): {ours_bytes} bytes in {len(ours_lost)} record(s)")
    print(f"memory errors through the extension: {len(ours_errors)}")
    for block in ours_lost + ours_errors:
        print("\n".join(block))
        print()
    return 1 if ours_lost or ours_errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/valgrind.log"))
