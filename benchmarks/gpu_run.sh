set -x
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch; print(torch.__version__, torch.cuda.is_available())"
export PYTHONPATH=$PWD
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25
timeout 300 python benchmarks/gpu.py --rounds 7 --steps 60 --json $OUT/gpu.json 2>&1 | tail -60
