"""The long fuzz run: tests/test_fuzz.py with fresh random cases, many times CI's count.

    python bench/fuzz_bench.py [--scale 50] [--target 100000]

CI runs a fixed, derandomised set of cases (about 2,000 inputs); this sets RESTNET_FUZZ_SCALE
so every fuzz test (each controller and agent handler, the codecs and the fleet.yaml loader)
draws `scale` times as many fresh ones, counts the inputs actually run (RESTNET_FUZZ_COUNT) and
prints the count per test, the total and the crashes (failed tests: a handler that raised, or
a bad input that was not refused). Exit status 0 when nothing crashed and the total reached
--target. The default scale reaches 100,000 inputs in about five minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=50,
                   help="RESTNET_FUZZ_SCALE: cases per test, times CI's (default 50)")
    p.add_argument("--target", type=int, default=100_000, help="inputs the run must reach")
    p.add_argument("-k", default=None, help="only the fuzz tests matching (pytest -k)")
    args = p.parse_args(argv)
    if args.scale < 1:
        p.error("--scale must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        counts, report = Path(tmp) / "counts.json", Path(tmp) / "junit.xml"
        env = os.environ | {"RESTNET_FUZZ_SCALE": str(args.scale),
                            "RESTNET_FUZZ_COUNT": str(counts)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", "tests/test_fuzz.py", *(["-k", args.k] if args.k else [])]
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        elapsed = time.monotonic() - t0
        ran = json.loads(counts.read_text()) if counts.exists() else {}
        crashes = _failures(report)
    total = sum(ran.values())
    print(f"\nfuzz bench: scale {args.scale}, {elapsed:.0f} s (pytest exit {rc})")
    for name, n in sorted(ran.items()):
        print(f"  {name:<72} {n:>9,} inputs")
    print(f"  {'total':<72} {total:>9,} inputs; {len(crashes)} crashes")
    for name, message in crashes:
        print(f"  CRASH {name}: {message}")
    if total < args.target:
        print(f"  short of the target: {total:,} < {args.target:,} (raise --scale)")
    return 0 if rc == 0 and not crashes and total >= args.target else 1


def _failures(report: Path) -> list[tuple[str, str]]:
    """(test, first line of the failure) for every failed or erroring test in a JUnit XML."""
    if not report.exists():
        return [("pytest", "no report: the run did not start")]
    out = []
    for case in ET.parse(report).iter("testcase"):
        for bad in [*case.iter("failure"), *case.iter("error")]:
            out.append((case.get("name", "?"), (bad.get("message") or "").splitlines()[0][:200]
                        if bad.get("message") else "?"))
    return out


if __name__ == "__main__":
    sys.exit(main())
