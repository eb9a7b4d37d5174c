"""Wall time of `import scanpy_canal` in a fresh interpreter (median of several runs), and what it loads."""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "import_time.json"
PROBE = (
    "import time, sys; start = time.perf_counter(); import scanpy_canal; "
    "print(time.perf_counter() - start); print(','.join(sorted({'torch', 'scvi', 'scanpy', 'anndata'} & set(sys.modules))))"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-c", "import scanpy_canal"], check=True)  # warm the file cache
    seconds, loaded = [], ""
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
        seconds.append(float(out[0]))
        loaded = out[1] if len(out) > 1 else ""
    result = {"median_s": statistics.median(seconds), "max_s": max(seconds), "runs": seconds, "heavy_modules": loaded}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"import scanpy_canal: median {result['median_s'] * 1000:.0f} ms, max {result['max_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
