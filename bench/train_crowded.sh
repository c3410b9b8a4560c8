#!/usr/bin/env bash
# The crowded pair of issue 12, trained in stages that outlive a session.
#
#   bench/train_crowded.sh small    # crowded-small: 6000 steps (about 70 min at 1 thread beside the large)
#   bench/train_crowded.sh large    # crowded-large: 6000 steps (about 5 h at 1 thread, 3 h at 2)
#   bench/train_crowded.sh extend   # the large's warm restart: 6000 more steps at peak lr 3e-4
#   bench/train_crowded.sh save     # copy what runs/ holds into bench/checkpoints/ (commit that)
#
# Each stage runs in the foreground (wrap it in `setsid nohup ... &` to detach) and resumes: from
# its checkpoint under runs/ when that exists, else from the portable copy in bench/checkpoints/
# (bench/train_state.py: no optimizer state; the learning rate ramps up again over 100 steps).
# runs/ is not kept from one session to the next; bench/checkpoints/ is, once committed.
# The finished pair (runs/c2: both checkpoints, MODEL_CARD.md, accuracy.json) is committed in
# shared/models/crowded/, where bench/quality.py --family crowded reads it; bench/checkpoints/
# then goes away (it holds work in progress only).
# THREADS (default 2) sets torch's threads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
SAVED=bench/checkpoints
COMMON=(--family crowded --curriculum 0.8 --questions 12 --threads "$THREADS" --resume)

seed_checkpoint() {  # seed_checkpoint NAME DIR: a portable copy becomes DIR's checkpoint if it has none
    if [[ ! -e "$2/$1.pt" && -e "$SAVED/$1.pt" ]]; then
        mkdir -p "$2"
        cp "$SAVED/$1.pt" "$2/$1.pt"
        echo "resuming $1 from the portable $SAVED/$1.pt"
    fi
}

case "${1:-}" in
small)
    if [[ ! -d runs/c2-small/crowded-small && -d $SAVED/crowded-small ]]; then
        echo "crowded-small is finished: $SAVED/crowded-small (train it again: remove that first)"
        exit 0
    fi
    seed_checkpoint crowded-small runs/c2-small/ck
    "$PY" bench/train_pair.py "${COMMON[@]}" --models small --small-steps 6000 --eval-every 1000 \
        --checkpoint-every 250 --out runs/c2-small --checkpoint-dir runs/c2-small/ck
    ;;
large | extend)
    seed_checkpoint crowded-large runs/c2/ck
    # the finished small beside it, so that the large's card and accuracy.json hold both
    if [[ ! -d runs/c2/crowded-small ]]; then
        if [[ -d runs/c2-small/crowded-small ]]; then
            cp -r runs/c2-small/crowded-small runs/c2/ && cp runs/c2-small/accuracy.json runs/c2/
        elif [[ -d $SAVED/crowded-small ]]; then
            cp -r "$SAVED/crowded-small" runs/c2/ && cp "$SAVED/crowded-small.accuracy.json" runs/c2/accuracy.json
        fi
    fi
    extra=()
    [[ $1 == extend ]] && extra=(--extra-steps 6000 --extra-lr 3e-4)
    "$PY" bench/train_pair.py "${COMMON[@]}" --models large --large-steps 6000 --eval-every 600 \
        --checkpoint-every 150 --out runs/c2 --checkpoint-dir runs/c2/ck "${extra[@]}"
    ;;
save)
    mkdir -p "$SAVED"
    if [[ -d runs/c2-small/crowded-small ]]; then  # the finished small, as serving loads it
        rm -rf "$SAVED/crowded-small" "$SAVED/crowded-small.pt"
        cp -r runs/c2-small/crowded-small "$SAVED/"
        cp runs/c2-small/accuracy.json "$SAVED/crowded-small.accuracy.json"
        cp runs/c2-small/MODEL_CARD.md "$SAVED/crowded-small.MODEL_CARD.md"
    elif [[ -e runs/c2-small/ck/crowded-small.pt ]]; then
        "$PY" bench/train_state.py portable runs/c2-small/ck/crowded-small.pt "$SAVED/crowded-small.pt"
    fi
    if [[ -e runs/c2/ck/crowded-large.pt ]]; then
        "$PY" bench/train_state.py portable runs/c2/ck/crowded-large.pt "$SAVED/crowded-large.pt"
    fi
    du -sh "$SAVED"/*
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
