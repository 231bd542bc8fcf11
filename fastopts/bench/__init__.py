"The benchmarks (`fastopts bench ...`): LR-finder quality, step time, epoch time, memory."
