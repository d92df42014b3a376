#!/usr/bin/env bash
# Mutation testing (see tests/README.md): each module against its own fast tests, in a scratch
# copy of the project, so nothing here changes. Needs mutmut 3 in .venv (not in requirements.txt).
#   bash tests/mutation.sh [verdict|checkpoint|state ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mutmut="$root/.venv/bin/mutmut"
declare -A module=([verdict]=resnext/verdict.py [checkpoint]=resnext/checkpoint.py [state]=ui/state.py)
declare -A tests=(
  [verdict]="tests/test_verdict.py tests/test_checkpoint_limits.py"
  [checkpoint]="tests/test_checkpoint.py tests/test_checkpoint_limits.py"
  [state]="tests/test_app.py tests/test_public.py"
)
for name in "${@:-verdict checkpoint state}"; do
  for one in $name; do
    work=$(mktemp -d -t "mutation-$one-XXXX")
    cp -r "$root/resnext" "$root/ui" "$root/tests" "$root/app.py" "$root/assets" "$root/benchmarks" "$work/"
    mkdir -p "$work/checkpoints"
    # setup.cfg lists: one item per line
    {
      echo "[mutmut]"
      echo "source_paths=$(dirname "${module[$one]}")/"
      echo "only_mutate=${module[$one]}"
      echo "process_isolation=forkserver"  # torch is not fork-safe once its threads have run
      echo "pytest_add_cli_args_test_selection="
      for t in ${tests[$one]}; do echo "    $t"; done
      # -x: a mutant is killed by its first failing test; the tests that start the app or the CLI in
      # another process are left out (that process would not run the mutant).
      printf 'pytest_add_cli_args=\n    -x\n    -q\n    -p\n    no:cacheprovider\n    -k\n    not hides_its_key and not cli_refuses and not app_refuses\n'
      printf 'also_copy=\n    resnext/\n    ui/\n    app.py\n    assets/\n    benchmarks/\n    checkpoints/\n'
    } > "$work/setup.cfg"
    echo "== ${module[$one]} against ${tests[$one]} (in $work)"
    (cd "$work" && OMP_NUM_THREADS=1 "$mutmut" run > run.log 2>&1 || true)
    (cd "$work" && "$mutmut" results 2>/dev/null | tail -n +1)
  done
done
