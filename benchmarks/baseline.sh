#!/usr/bin/env bash
# Build a baseline of fedgrad at a git revision, for A/B benchmark runs (`make bench-ab`).
#
# Run: bash benchmarks/baseline.sh REV [DIR]   (DIR default: runs/baseline-<shortrev>)
#
# Checks REV out as a detached git worktree at DIR, installs it into DIR/.venv
# with the Makefile's pins (TORCH_SPEC, PY: the caller's environment, else the
# Makefile's defaults) and prints DIR/.venv/bin/fedgrad on stdout; progress goes
# to stderr. Idempotent: DIR/.rev is written only after a complete install, and
# a DIR whose .rev names REV is reused as it is.
set -euo pipefail

die() { echo "baseline.sh: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 && -n $1 ]] || die "usage: bash benchmarks/baseline.sh REV [DIR]"
rev_arg=$1
top=$(git rev-parse --show-toplevel) || die "not inside a git checkout"
rev=$(git -C "$top" rev-parse --verify --quiet "$rev_arg^{commit}") \
  || die "'$rev_arg' is not a commit here (fetch it first?)"
short=$(git -C "$top" rev-parse --short "$rev")
dir=${2:-$top/runs/baseline-$short}
[[ $dir = /* ]] || dir=$PWD/$dir
fedgrad=$dir/.venv/bin/fedgrad

if [[ -f $dir/.rev && $(<"$dir/.rev") == "$rev" && -x $fedgrad ]]; then
  echo "baseline.sh: reusing $dir ($short)" >&2
  echo "$fedgrad"
  exit 0
fi

# A DIR deleted by hand (make clean) leaves a stale registration behind.
git -C "$top" worktree prune
if [[ -e $dir ]]; then
  # Only a worktree of this repository is switched; anything else there is not ours to touch.
  [[ -e $dir/.git && $(git -C "$dir" rev-parse --show-toplevel 2>/dev/null) == $(cd "$dir" && pwd -P) ]] \
    || die "$dir exists and is not a git worktree; remove it or pass another DIR"
  rm -f "$dir/.rev"
  echo "baseline.sh: switching worktree $dir to $short" >&2
  git -C "$dir" checkout --quiet --detach "$rev" \
    || die "could not check $short out in $dir (local changes there?)"
else
  echo "baseline.sh: creating worktree $dir at $short" >&2
  mkdir -p "$(dirname "$dir")"
  git -C "$top" worktree add --quiet --detach "$dir" "$rev" \
    || die "git worktree add failed for $dir"
fi

# Same steps and pins as the Makefile's `install` target (a TORCH_SPEC with an
# --index-url is meant to split into words).
torch_spec=${TORCH_SPEC:-torch==2.13.0}
if [[ ! -x $dir/.venv/bin/python ]]; then
  "${PY:-python3}" -m venv "$dir/.venv" || die "could not create $dir/.venv with ${PY:-python3}"
  "$dir/.venv/bin/pip" install -q --upgrade pip >&2 || die "pip upgrade failed in $dir/.venv"
fi
echo "baseline.sh: installing $short into $dir/.venv (a few minutes the first time)" >&2
# shellcheck disable=SC2086
"$dir/.venv/bin/pip" install -q $torch_spec >&2 || die "installing $torch_spec failed"
"$dir/.venv/bin/pip" install -q -e "$dir" --config-settings editable_mode=strict >&2 \
  || die "installing fedgrad at $short into $dir/.venv failed"
[[ -x $fedgrad ]] || die "$fedgrad missing after the install (no console script at $short?)"

echo "$rev" >"$dir/.rev"
echo "$fedgrad"
