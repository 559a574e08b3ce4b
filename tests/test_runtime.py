import subprocess
import sys

from tests.helpers import REPO

SCRIPT = """
import os, sys
from maskrcnn.runtime import FALSE_ALARMS, without_false_alarms
with without_false_alarms():
    os.write(2, b"[E core_worker.cc] Actor X" + FALSE_ALARMS[0] + b". See issue.\\n")
    os.write(2, b"a real Ray error\\n")
    print("python stderr line", file=sys.stderr)
print("after", file=sys.stderr)
"""


def test_false_alarms_are_dropped_and_everything_else_passes():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["a real Ray error", "python stderr line", "after"]
