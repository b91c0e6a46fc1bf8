"""Baseline: OpenVINO hybrid int8 quantisation through optimum-intel (see openvino_int8_worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from openvino_int8_worker import OpenVINOHybridRunner  # noqa: E402

if __name__ == "__main__":
    sys.exit(common.serve(OpenVINOHybridRunner()))
