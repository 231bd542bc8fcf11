"""Worker code for tests/test_distributed_precision.py: FSDP2 (`fully_shard`) with the precision layer, in each of 2
spawned `gloo` ranks on CPU. The layers are large enough that each rank's shard of a weight is quantised in whole blocks."""
import torch, torch.distributed as dist
from distributed_worker import exits_cleanly, _full

N_ROWS, N_IN, N_HID, N_OUT, STEPS = 32, 128, 64, 4, 4
SETTINGS = {'kahan': (torch.bfloat16, dict(kahan_sum=True)), 'int8': (torch.float32, dict(state_dtype='int8')),
            'kahan_int8': (torch.bfloat16, dict(kahan_sum=True, state_dtype='int8'))}

def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_ROWS, N_IN, generator=g), torch.randint(0, N_OUT, (N_ROWS,), generator=g)

def model(dtype):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.Tanh(), torch.nn.Linear(N_HID, N_OUT)).to(dtype)

def make(name, ps):
    from fastopts.optimizer import AdamW
    return AdamW(ps, lr=1e-2, wd=0.1, **SETTINGS[name][1])

def run(name, rank=0, world=1):
    "Train with setting `name` on this rank's share of the batch (FSDP2 when `world` > 1); the full weights (p + Kahan's remainder) and the first weight's state dtypes."
    dtype = SETTINGS[name][0]
    x, y = data()
    per = N_ROWS // world
    x, y = x[rank*per:(rank+1)*per], y[rank*per:(rank+1)*per]
    m = model(dtype)
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in m:
            if isinstance(layer, torch.nn.Linear): fully_shard(layer)
        fully_shard(m)
    opt = make(name, list(m.parameters()))
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x.to(dtype)).float(), y).backward()
        opt.step()
    st = opt.state[next(iter(m.parameters()))]
    held = [_full(p).float() + (_full(opt.state[p]['kahan_comp']).float() if 'kahan_comp' in opt.state[p] else 0) for p in m.parameters()]
    return held, {k: str(v.dtype) if isinstance(v, torch.Tensor) else v for k, v in st.items()}

@exits_cleanly
def job(rank, world, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = {}
    try:
        for name in SETTINGS:
            try: res[name] = run(name, rank, world)
            except Exception as e:
                import traceback; res[name] = f'{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}'
            dist.barrier()
    finally: dist.destroy_process_group()
    if rank == 0: torch.save(res, out_file)
