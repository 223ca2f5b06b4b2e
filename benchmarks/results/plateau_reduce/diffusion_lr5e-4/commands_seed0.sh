set -e
M=/work/main/.venv/bin/medflow
D=/work/runs/plateau2/data/mni152-tissue
$M train --data $D --out s0 --model diffusion --size 64 --batch-size 8 --val-every 50 --checkpoint-every 150 --lr 5e-4 --lr-schedule plateau --plateau-patience 3 --plateau-reductions 2 --steps 1500 --seed 0 --threads 1 --quiet
$M predict --model s0/checkpoint_final.pt --input $D/imagesTs --out s0/pred --sampler ddim --steps 10 --threads 1 --quiet
$M evaluate --pred s0/pred --ref $D/labelsTs --out s0/eval
