import os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, torch.distributed as dist
from mpi4py import MPI
from mpi_workers.engine.tp import TpRuntime, pick_device
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
dev = pick_device("cuda", comm)
tp = TpRuntime.init(comm, dev)
def say(m): print(f"[r{rank}] {m}", flush=True)
mode = os.environ.get("DIAG_MODE", "side")
w = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16) * 0.03
x = torch.ones(8, 1024, device=dev, dtype=torch.bfloat16)
def fwd(x):
    for _ in range(16):
        x = x @ w
        dist.all_reduce(x)
    return x
y = torch.ones(4, device=dev); dist.all_reduce(y); torch.cuda.synchronize(); say(f"eager ok {y.tolist()}")
if mode == "side":
    s = torch.cuda.Stream(dev); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): fwd(x)
    torch.cuda.current_stream().wait_stream(s)
else:
    fwd(x)
torch.cuda.synchronize(); say("warmup ok")
g = torch.cuda.CUDAGraph()
kw = {}
if os.environ.get("DIAG_TL"): kw["capture_error_mode"] = "thread_local"
with torch.cuda.graph(g, **kw):
    out = fwd(x)
say("captured")
torch.cuda.synchronize()
ref = fwd(x); torch.cuda.synchronize()
g.replay(); torch.cuda.synchronize()
say(f"replayed; diff {(out.float()-ref.float()).abs().max().item()}")
t=time.perf_counter()
for _ in range(100): g.replay()
torch.cuda.synchronize(); say(f"replay {(time.perf_counter()-t)*1e4:.1f} us")
tp.close()
