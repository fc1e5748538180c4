# A site preamble: pasted into every stage's job script before baton starts.
# Point a manifest at your own copy:  defaults: {slurm: {preamble: slurm/preamble.sh}}
module load cuda/12.4 2>/dev/null || true
export NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
