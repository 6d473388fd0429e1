#!/usr/bin/env bash
# Keep requirements/lock.txt current, or check the lowest transformers the project declares.
#
#   bash scripts/update_lock.sh                 newest releases the ranges in pyproject.toml admit, in a fresh
#                                               venv; the whole suite runs on them and, only if it passes,
#                                               requirements/lock.txt is rewritten from that venv (git diff shows
#                                               what moved)
#   bash scripts/update_lock.sh --check-lowest  the lowest transformers the range admits (its lower bound),
#                                               everything else resolved by pip; runs the suite, writes nothing
#
# Run it on CPython 3.11 / Linux, where the lock is used (CI); about 10 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-newest}
case "$mode" in
    newest|--check-lowest) ;;
    *) echo "usage: bash scripts/update_lock.sh [--check-lowest]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
pip install -q torch==2.13.0   # CPU build where one lies on disk; never an unpinned torch (multi-GB CUDA build)
if [ "$mode" = "--check-lowest" ]; then
    lowest=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"transformers\b", d))
match = re.search(r">=\s*([0-9][0-9.]*)", spec)
if not match:
    raise SystemExit(f"pyproject.toml: no lower bound in {spec!r}")
print(match.group(1))
PY
)
    pip install -q -e ".[test,lmms-test]" "transformers==$lowest"
else
    pip install -q --upgrade --upgrade-strategy eager -e ".[test,lmms-test]"
fi
pip install -q --no-deps "lmms-eval>=0.7.3,<0.8"   # as .ci/run: without its requirements (EVAL.md "lmms-eval")
python -c "import transformers, tokenizers, accelerate; print('transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| accelerate', accelerate.__version__)"
python -m pytest -q
[ "$mode" = "--check-lowest" ] && exit 0

{
    cat <<'HEADER'
# The tested lock: every package (transitive ones included) of `pip install -e ".[test,lmms-test]"` and
# lmms-eval (installed without its requirements, as .ci/run does), pinned to the
# versions the whole suite last passed on (CPython 3.11, Linux x86_64). The README's install lines use it as
# a pip constraints file (-c), so a user installs exactly these versions; the project itself is not listed.
# torch==2.13.0: pip takes the CPU build where one lies on disk (CI, the developers' machines) and the
# default CUDA build elsewhere. Regenerate and re-test with `bash scripts/update_lock.sh` (see README).
HEADER
    # --all keeps setuptools (torch requires it); pip itself is the installer, not a dependency. The local build
    # tag (+cpu) would refuse the CUDA build of the same release.
    pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "requirements/lock.txt rewritten; the suite passed on it (git diff requirements/lock.txt)"
