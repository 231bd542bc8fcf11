"""Worker code for the distributed harness's own test (tests/test_distributed.py): a rank killed by a chosen signal."""
import os, pathlib, signal

def signal_job(rank, world, init_file, marker, times, signame):
    "Rank 1 kills itself with `signame` on its first `times` runs (each rank counts its runs in `marker.RANK`)."
    m = pathlib.Path(f'{marker}.{rank}')
    n = int(m.read_text()) if m.exists() else 0
    m.write_text(str(n + 1))
    if rank == 1 and n < times: os.kill(os.getpid(), getattr(signal, signame))
