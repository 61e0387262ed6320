"""Run mypy on the product packages and compare its errors, per file, with the checked-in baseline.

The baseline (.ci/mypy-baseline.txt: "<count> <file>" per line) only shrinks: a file with more errors
than its baseline (a new file: 0) fails, naming the new errors. When a file has fewer, the run passes and
says so: refresh the baseline with `python .ci/mypy_baseline.py --update` and commit it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / ".ci" / "mypy-baseline.txt"
PACKAGES = ("fedfuse", "common", "client", "server", "simulations")
ERROR = re.compile(r"^(?P<file>[^:\s]+\.py):\d+(?::\d+)?: error: ")


def run_mypy() -> list[str]:
    """mypy's error lines for the product packages (those that exist)."""
    packages = [p for p in PACKAGES if (ROOT / p).is_dir()]
    done = subprocess.run([sys.executable, "-m", "mypy", *packages], cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash)
        sys.exit(f"mypy failed to run:\n{done.stdout}{done.stderr}")
    return [line for line in done.stdout.splitlines() if ERROR.match(line)]


def read_baseline() -> Counter[str]:
    counts: Counter[str] = Counter()
    if BASELINE.exists():
        for line in BASELINE.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                count, file = line.split(maxsplit=1)
                counts[file] = int(count)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the current counts as the new baseline")
    args = parser.parse_args()
    errors = run_mypy()
    counts = Counter(ERROR.match(line)["file"] for line in errors)  # type: ignore[index]
    if args.update:
        lines = [f"{n} {file}" for file, n in sorted(counts.items())]
        BASELINE.write_text(
            "# mypy errors per file; may only shrink (python .ci/mypy_baseline.py --update)\n" + "\n".join(lines) + "\n"
        )
        print(f"baseline: {sum(counts.values())} errors in {len(counts)} files")
        return 0
    baseline = read_baseline()
    worse = {f: n for f, n in counts.items() if n > baseline.get(f, 0)}
    better = {f: n for f, n in baseline.items() if counts.get(f, 0) < n}
    for file in sorted(worse):
        print(f"{file}: {counts[file]} mypy errors, baseline {baseline.get(file, 0)}:")
        print("\n".join(f"  {line}" for line in errors if line.startswith(f"{file}:")))
    print(f"mypy: {sum(counts.values())} errors (baseline {sum(baseline.values())})")
    if worse:
        print("new mypy errors: fix them (the baseline may only shrink)")
        return 1
    if better:
        print(f"fewer errors than the baseline in {len(better)} file(s): run `python .ci/mypy_baseline.py --update` and commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
