import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import os

# The data plane authenticates every connection with the run's secret: in-process peers
# and the ranks that tests spawn (they inherit the environment) share this one.
os.environ.setdefault("DISTFLOW_SECRET", "distflow-tests-shared-secret-0123456789")
