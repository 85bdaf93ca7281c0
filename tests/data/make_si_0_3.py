"""Made tests/data/si-0.3.pt with avalanche_si 0.3.0: run from the root of a checkout of that
version (it refuses any other). Kept to show exactly how the fixture was made."""
import copy, pickle, sys
import torch
sys.path.insert(0, "tests")
import avalanche_si
assert avalanche_si.__version__ == "0.3.0"
from avalanche_si import SIPlugin, ParamGroup, SynapticIntelligence
from conftest import make_stream, make_tasks, mlp, strategy, train_stream

tasks = make_tasks()
out = {"version": avalanche_si.__version__}
# an SIPlugin with two groups, as an Avalanche checkpoint pickles it
plugin = SIPlugin(3.0, eps=0.1, importance="task", consolidate=5,
                  groups={"body": ["0", "2"], "head": ParamGroup(params=["4"], si_lambda=1.0)})
model = mlp()
train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [plugin]),
             make_stream(tasks[:2]))
out["plugin"] = {"pickle": pickle.dumps(plugin), "model": copy.deepcopy(model.state_dict()),
                 "state_dict": plugin.state_dict()}
# what 0.3.0 reaches training on from the pickle over the third task
old = pickle.loads(out["plugin"]["pickle"])
train_stream(strategy(model, torch.optim.SGD(model.parameters(), lr=0.1), [old]),
             make_stream(tasks[2:]))
out["plugin"]["trained_on"] = copy.deepcopy(model.state_dict())
out["plugin"]["omega_after"] = copy.deepcopy({g: dict(old.importances(g)) for g in old.group_names})

# bare engines in a plain loop, one per estimator that keeps other state
def loop(si, model, opt, ts):
    ce = torch.nn.CrossEntropyLoss()
    for x, y, _ in ts:
        si.start_task()
        for i in range(0, len(x), 8):
            opt.zero_grad()
            ce(model(x[i:i + 8]), y[i:i + 8]).backward()
            si.before_step()
            opt.step()
            si.after_step()
        si.end_task()

for importance in ("total", "delta_params", "sos"):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    si = SynapticIntelligence(model, opt, si_lambda=2.0, eps=0.1, importance=importance)
    loop(si, model, opt, tasks[:2])
    entry = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "state_dict": si.state_dict()})
    entry["pickle"] = pickle.dumps(si)
    old = pickle.loads(entry["pickle"])
    opt2 = torch.optim.Adam(model.parameters(), lr=0.05)
    opt2.load_state_dict(copy.deepcopy(entry["optimizer"]))
    old.bind(model, opt2)
    loop(old, model, opt2, tasks[2:])
    entry["trained_on"] = copy.deepcopy(model.state_dict())
    entry["omega_after"] = copy.deepcopy(dict(old.importances()))
    out[importance] = entry
torch.save(out, "tests/data/si-0.3.pt")
print("ok", {k: list(v) if isinstance(v, dict) else v for k, v in out.items()})
