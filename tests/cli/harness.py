"""What the example programs' end-to-end tests share: counting checks and running the tool
on the CPU (the expectations are the fp32 reference's; tests/cuda covers the GPU)."""
import subprocess
import sys

_counts = {"passed": 0, "failed": 0}


def check(cond, what):
    if cond:
        _counts["passed"] += 1
    else:
        _counts["failed"] += 1
        print("FAILED:", what, file=sys.stderr)


def run_tool(tool, *args):
    return subprocess.run([tool, "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=300)


def finish():
    print(f"{_counts['passed']} passed, {_counts['failed']} failed")
    sys.exit(1 if _counts["failed"] else 0)
