"""Makes tests/easel_process.py importable from every test folder below tests/."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
