#!/bin/bash
# The GPU checks of issues 16 and 15, in priority order; each part has its own
# timeout so a slow one leaves the others' results.
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unset XLA_FLAGS; G=$PWD/gpu; cd /tmp
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__, jax.devices())" || exit 1
B="python3 -m rsjax.bench --sizes 256 --steps 5"
echo "== bf16 fusion+unet at 16,32"; timeout 220 $B --parts matmul,fusion,unet --dtype bfloat16 --batches 16,32 --out $OUT/bench_bf16.json
echo "== profile fusion bf16 16"; timeout 80 python3 $G/profile_step.py fusion 16 256 bfloat16 $OUT/prof_fusion_bf16_16.json
echo "== profile unet bf16 32"; timeout 60 python3 $G/profile_step.py unet 32 256 bfloat16 $OUT/prof_unet_bf16_32.json
echo "== f32 at 16"; timeout 90 $B --parts matmul,fusion,unet --dtype float32 --batches 16 --out $OUT/bench_f32.json
echo "== pix2pix bf16 16"; timeout 50 $B --parts fusion --dtype bfloat16 --batches 16 --config_arg model=pix2pix --out $OUT/bench_pix2pix_bf16.json
echo "== done"
