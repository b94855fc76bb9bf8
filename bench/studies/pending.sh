#!/bin/sh
# The studies that did not fit one session, in the order they are queued; rerun this to continue them (finished runs
# are reused and a cut run resumes from its last checkpoint, as long as WORK is the same folder).
#   nohup env OMP_NUM_THREADS=1 nice -n 10 sh bench/studies/pending.sh /work/studies-runs > pending.log 2>&1 &
set -u
WORK=${1:-/work/studies-runs}
cd "$(dirname "$0")/../.."
run() { "$@"; status=$?; [ "$status" -ne 143 ] || exit 143; }  # a study stopped by SIGTERM stops the queue
run python bench/studies/gate.py --work "$WORK/gate" --jobs 2  # done
run python bench/studies/memorisation.py --seed 2 --trained 100 --objectives fm pafm-bank --milestones 2000 4000 8000 \
    --jobs 2 --out bench/results/studies/memorisation-seed2 --work "$WORK/memorisation-seed2"  # as seed 1 ran; done
run python bench/studies/memorisation.py --trained 300 --jobs 2 --out bench/results/studies/memorisation-300 \
    --work "$WORK/memorisation-300"  # done
run python bench/studies/mnist_steps.py --work "$WORK/mnist_steps" --milestones 250 500 1000 2000 4000  # done
run python bench/studies/gate.py --datasets mnist --arms bank-g0.25 bank-g0.5 bank-g1 --work "$WORK/gate-mnist" --jobs 2 \
    --out bench/results/studies/gate-mnist  # FM and the bank at every seed first
run python bench/studies/gate.py --datasets mnist --work "$WORK/gate-mnist" --jobs 2 \
    --out bench/results/studies/gate-mnist  # then the exact source (60,000 candidates: 1.5-2x the cost)
