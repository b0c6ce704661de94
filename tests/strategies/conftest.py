import sys
from pathlib import Path

# the tests here share the plain-tensor federation in quadratic.py (pytest runs with
# --import-mode=importlib, which does not put test folders on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
