#!/usr/bin/env bash
# The test suite: set up, then run every test (CPU, real DeepSpeed engines on gloo, real tar shards).
# Extra arguments go to pytest, e.g.  bash tools/test.sh -m 'not slow'
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
# DeepSpeed compiles its shared-memory collective op on first use (~30 s); do it once here rather than
# inside a timed test.
python -c "from deepspeed.ops.op_builder import ShareMemCommBuilder as B; B().load()" >/dev/null 2>&1 || true
python -m pytest -q -ra "$@"
