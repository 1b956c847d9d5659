"""One-shot pruning (no fine-tuning) of the embedded default model, every policy, on the
synthetic holistic and occluded query sets. Provenance of one_shot_policies.md:

    python results/x86_64-amd-epyc-2c/one_shot_policies.py > results/x86_64-amd-epyc-2c/one_shot_policies.md

`pytest bench/ --amg-profile equal-macs` supersedes this script (CSV reports at equal MACs).
"""
import copy

import torch

torch.set_num_threads(2)
from amg.data.layout import load_dataset, relabel_pids
from amg.data.preload import preload_images
from amg.measure.flops import count_macs
from amg.model.pruned import apply_plan
from amg.pruning.calibration import CalibrationImages
from amg.pruning.planner import make_plan
from amg.train.cache import default_model, synthetic_root
from amg.train.evaluate import Evaluator

model, _ = default_model()
ds = load_dataset(synthetic_root())
labels, _ = relabel_pids(ds.train)
g = torch.Generator().manual_seed(0)
idx = torch.randperm(len(ds.train), generator=g)[:256].tolist()
data = CalibrationImages(preload_images([ds.train[i] for i in idx], (128, 64)), [labels[i] for i in idx], [ds.train[i].camid for i in idx])
ev = Evaluator(ds, (128, 64))
base = count_macs(model).total
print("| configuration | MACs saved | holistic R1 | holistic mAP | occluded R1 | occluded mAP |")
print("|---|---|---|---|---|---|")
def report(name, m):
    r = ev.evaluate(m)
    print(f"| {name} | {100*(1-count_macs(m).total/base):.1f}% | {100*r['query'].rank(1):.1f} | {100*r['query'].mAP:.1f} | {100*r['occluded'].rank(1):.1f} | {100*r['occluded'].mAP:.1f} |", flush=True)
report("unpruned", model)
for h in (0.25, 0.5):
    for pol, alloc in [("amg","global"),("amg","per-block"),("amg","normalized"),("amg-lowest","global"),("random","global"),("magnitude","global"),("gradient","global")]:
        plan = make_plan(model, heads=h, head_policy=pol, allocation=alloc, data=data, seed=0)
        report(f"heads {h:.0%} {pol} {alloc}", apply_plan(copy.deepcopy(model), plan))
for t in (0.25, 0.5):
    for pol in ("amg", "random", "evit", "tome"):
        plan = make_plan(model, tokens=t, token_policy=pol, data=data, seed=0)
        report(f"tokens {t:.0%} {pol}", apply_plan(copy.deepcopy(model), plan))
