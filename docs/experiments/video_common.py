"""What the issue #24 video experiments (video_decoder_sweep.py, video_latte.py) share: the command line (a JSON
config, a results folder, seconds allowed), the results file (OUT/NAME.jsonl, one JSON row an event) and the frame
judge (.gpuexp/judge.pt, the state dict of mmfast.eval.t2v.FrameJudge.fit(world).net)."""
import json
import os
import sys
import time

import torch


class Experiment:
    def __init__(self, argv=None):
        argv = sys.argv if argv is None else argv
        self.cfg = json.loads(argv[1])
        self.out, allowed = argv[2], float(argv[3])
        self.name = self.cfg["name"]
        self.t_start = time.time()
        self.deadline = self.t_start + allowed
        self.world = self.cfg.get("world", ".gpuexp/world")

    def emit(self, row: dict) -> None:
        row = {"name": self.name, **row, "t": round(time.time() - self.t_start, 1)}
        with open(os.path.join(self.out, self.name + ".jsonl"), "a") as res:
            res.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def frame_judge(self):
        from mmfast.eval.t2v import FrameJudge

        with open(os.path.join(self.world, "classes.json")) as fh:
            fj = FrameJudge(FrameJudge._net(16).eval(), json.load(fh))
        fj.net.load_state_dict(torch.load(self.cfg.get("judge", ".gpuexp/judge.pt"), weights_only=True))
        return fj
