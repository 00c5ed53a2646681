"""``python -m benchmarks [--quick] [--out DIR] [--only NAMES] [--workers 1,2,...]``."""
import sys

from benchmarks.runner import main

sys.exit(main())
