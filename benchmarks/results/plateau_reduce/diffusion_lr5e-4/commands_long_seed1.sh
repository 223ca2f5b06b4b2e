set -e
export PYTHONPATH=/tmp/bench_src/src
M="/work/main/.venv/bin/python -c 'import sys; from medflow.cli import main; sys.exit(main())'"
D=/work/runs/difflong/data/mni152-tissue
eval $M train --data $D --out l1 --model diffusion --size 64 --batch-size 8 --val-every 50 --checkpoint-every 150 --lr 5e-4 --lr-schedule plateau --plateau-patience 3 --plateau-reductions 2 --steps 3000 --seed 1 --threads 1 --quiet
eval $M predict --model l1/checkpoint_final.pt --input $D/imagesTs --out l1/pred --sampler ddim --steps 10 --threads 1 --quiet
eval $M evaluate --pred l1/pred --ref $D/labelsTs --out l1/eval
