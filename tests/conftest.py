"""Shared test plumbing. Unit tests need nothing; kernel tests (tests/kernel) need
root and a BTF kernel and skip with the reason when they cannot run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # test the checkout, with its freshly built BPF objects
os.environ.setdefault("SOCKWATCH_BPF_DIR", str(ROOT / "sockwatch" / "bpf_objects"))
