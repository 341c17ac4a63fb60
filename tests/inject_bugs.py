"""Does the suite catch the bugs that sank earlier attempts at this task? (a developer's tool, run by
hand; it rewrites the project's sources in place, one at a time, and restores each). Each case injects
one realistic bug, runs the test that pins that behaviour, and prints CAUGHT or MISSED.

    python tests/inject_bugs.py                 # every case (about 45 minutes on 2 CPU cores)
    python tests/inject_bugs.py PWCA resume     # the cases whose name contains one of these words
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

R = Path(__file__).resolve().parents[1]
# (name, file, text, replacement, test file, -k expression)
CASES = [
 ("PWCA self-distractor", "twins/model.py", "partner if (self.training and self.use_pwca) else None)", "torch.arange(2 * n).to(xa.device) if (self.training and self.use_pwca) else None)", "tests/test_model.py", "pair_partner"),
 ("pretrained blocks re-initialised", "twins/model.py", "        if vit.cls_token is None or", "        [torch.nn.init.normal_(p, std=0.02) for p in vit.blocks.parameters()]\n        if vit.cls_token is None or", "tests/test_model.py", "pretrained_weights_load"),
 ("GLCA copied from a fresh block", "twins/model.py", "            self.glca_block = copy.deepcopy(vit.blocks[-1])", "            self.glca_block = copy.deepcopy(timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **{k: v for k, v in extra.items() if k == 'patch_size'}).blocks[-1])", "tests/test_model.py", "pretrained_weights_load"),
 ("resume without optimizer state", "twins/checkpoint.py", "    learn.opt.load_state_dict(to_device(ckpt[\"opt\"], device()))", "    pass", "tests/test_runs.py", "uninterrupted"),
 ("pairs from a per-process counter", "twins/data.py", "        self.dls.train.dataset.resample(self.epoch)", "        self.n = getattr(self, 'n', -1) + 1\n        self.dls.train.dataset.resample(self.n)", "tests/test_runs.py", "uninterrupted"),
 ("pairs never redrawn", "twins/data.py", "        self.dls.train.dataset.resample(self.epoch)", "        self.dls.train.dataset.resample(0)", "tests/test_data.py", "pairs_of_each_epoch"),
 ("same augmentation for both images", "twins/data.py", "        x = self.tfms(TensorImage(torch.cat([xa, xb])))", "        import random as _r\n        s1, s2 = _r.getstate(), torch.get_rng_state()\n        ta = self.tfms(TensorImage(xa))\n        _r.setstate(s1); torch.set_rng_state(s2)\n        x = torch.cat([ta, self.tfms(TensorImage(xb))])", "tests/test_data.py", "augmentation"),
 ("horizontal flips on", "twins/data.py", "aug_transforms(do_flip=False,", "aug_transforms(do_flip=True,", "tests/test_data.py", "augmentation"),
 ("EER not interpolated", "twins/metrics.py", "    eer = far[k - 1] + t * (far[k] - far[k - 1])", "    eer = far[k]", "tests/test_metrics.py", "interpolated"),
 ("EER threshold not interpolated", "twins/metrics.py", "    return float(eer), float(thr[k - 1] + t * (thr[k] - thr[k - 1]))", "    return float(eer), float(thr[k])", "tests/test_metrics.py", "interpolated"),
 ("infinite EER threshold", "twins/metrics.py", "        return float(eer), float(thr[k])\n", "        return float(eer), float(thr[k - 1])\n", "tests/test_metrics.py", "finite"),
 ("validation metric from partners", "twins/metrics.py", "learn.to_detach(learn.pred[\"emb_a\"])", "learn.to_detach(learn.pred[\"emb_b\"])", "tests/test_metrics.py", "every_validation_image"),
 ("checkpoint written in place", "twins/checkpoint.py", "        tmp.write_bytes(data)\n        os.replace(tmp, path)", "        path.write_bytes(data)", "tests/test_runs.py", "leaves_the_previous"),
 ("weight decay on everything", "twins/callbacks.py", "        skip = self.model.no_weight_decay()\n", "        return\n", "tests/test_train.py", "weight_decay"),
 ("PWCA partner k/v from its PWCA stream", "twins/model.py", "            kd, vd = k[:n][partner].detach(), val[:n][partner].detach()", "            kd, vd = k[n:][partner].detach(), val[n:][partner].detach()", "tests/test_model.py", "sa_stream_detached"),
 ("PWCA partner k/v not detached", "twins/model.py", "            kd, vd = k[:n][partner].detach(), val[:n][partner].detach()", "            kd, vd = k[:n][partner], val[:n][partner]", "tests/test_model.py", "sa_stream_detached"),
 ("evaluation in training mode", "twins/model.py", "    model.eval()\n    parts = []", "    parts = []", "tests/test_model.py", "eval_mode"),
 ("shards as contiguous blocks (as fastai's DistributedDL)", "twins/data.py", "    mine = [i for k in range(0, full, step) for i in order[k + rank * share:k + (rank + 1) * share]]", "    mine = order[rank * full // world:(rank + 1) * full // world]", "tests/test_distributed.py", "shard_rule"),
 ("validation embeddings not gathered", "twins/metrics.py", "learn.to_detach(learn.pred[\"emb_a\"])", "learn.pred[\"emb_a\"].detach().cpu()", "tests/test_distributed.py", "share_each"),
 ("a step's slots seeded by micro-batch alone", "twins/data.py", "step, rank() * self.accum + slot])", "step, slot])", "tests/test_distributed.py", "share_each"),
 ("every process writes", "twins/run.py", "    if is_main():\n        run = start_wandb(", "    if True:\n        run = start_wandb(", "tests/test_distributed.py", "writes_once"),
 ("random draws not reseeded each batch", "twins/data.py", "            set_seed(int(seed.generate_state(1)[0]))", "            pass", "tests/test_runs.py", "uninterrupted"),
 ("resume keeps the old process split", "twins/plan.py", "        return split(saved.run_id, saved.bs, n, saved.micro_bs)", "        return saved", "tests/test_budget.py", "keeps_its_steps"),
 ('arch check wants the exact sm_XY', 'twins/model.py', 'v // 10 == capability[0] if binary', 'v == cc if binary', 'tests/test_gpu_paths.py', 'major_version'),
 ("pair-map scores taken under autocast", "twins/explain.py", '    out = model.encode_tokens(tokens)\n    with torch.autocast(tokens.device.type, enabled=False):\n        return (model.embedding({k: out[k].float() for k in ("sa", "glca") if k in out}) * others.float()).sum(-1)', '    return torch.einsum("bd,bd->b", model.embedding(model.encode_tokens(tokens)), others).float()', "tests/test_explain.py", "True"),
 ("encoding ignores the caller's autocast", "twins/model.py", "with mixed_precision(dev):", 'with torch.autocast(dev.type, enabled=dev.type == "cuda"):', "tests/test_gpu_paths.py", "embeddings"),
 ("inference model left on the CPU", "twins/checkpoint.py", "return model.to(dev or device()).eval()", "return model.eval()", "tests/test_gpu_paths.py", "device_asked"),
 ("batch probe: one step, no optimizer state", "twins/plan.py", "            if allocated:\n                return", "            return", "tests/test_gpu_paths.py", "probe"),
 ("settings written around frozen", "twins/plan.py", "    if not torch.cuda.is_available():\n        return plan\n", "    if not torch.cuda.is_available():\n        object.__setattr__(s, 'bs', plan.micro_bs)\n        return plan\n", "tests/test_settings.py", "frozen"),
 ("derived batch stored as the user's", "twins/run.py", "    learn = make_learner(s, plan, data, model)\n", "    learn = make_learner(__import__('dataclasses').replace(s, bs=plan.bs), plan, data, model)\n", "tests/test_settings.py", "derives"),
 ("summary pairs not normalised", "twins/explain.py", "    return part / total if total > 0 else None", "    return part if total > 0 else None", "tests/test_explain.py", "weighs"),
 ("summary counts one face of a pair", "twins/explain.py", "    part = (sign * delta_a).clamp(min=0) + (sign * delta_b).clamp(min=0)", "    part = 2 * (sign * delta_a).clamp(min=0)", "tests/test_explain.py", "weighs"),
 ('pair maps score a face against itself', 'twins/explain.py', 'occlusion_maps(model, x, emb[[1, 0]])', 'occlusion_maps(model, x, emb[[0, 1]])', 'tests/test_explain.py', 'mean_of'),
 ('GLCA rollout from the PWCA stream', 'twins/model.py', 'probs = (q[:n] * blk.attn.scale @ k[:n].transpose(-2, -1)).softmax(-1)', 'probs = (q[-n:] * blk.attn.scale @ k[-n:].transpose(-2, -1)).softmax(-1)', 'tests/test_model.py', 'sa_stream_s_rollout'),
 ("class centres not normalised", "twins/model.py", "F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))", "F.linear(F.normalize(x, dim=-1), self.weight)", "tests/test_model.py", "cosine_whatever"),
 ("embedding parts not normalised", "twins/model.py", 'parts = [F.normalize(out["sa"], dim=-1)] + ([F.normalize(out["glca"], dim=-1)] if "glca" in out else [])', 'parts = [out["sa"]] + ([out["glca"]] if "glca" in out else [])', "tests/test_model.py", "weighs_sa"),
 ("model mean and std swapped", "twins/model.py", 'torch.tensor(dc[k]).view(1, 3, 1, 1)', 'torch.tensor(dc["std" if k == "mean" else "mean"]).view(1, 3, 1, 1)', "tests/test_model.py", "own_mean"),
 ('test threshold chosen on the test set', 'twins/run.py', 'verification_report(scores, genuine, valid["eer_threshold"])', 'verification_report(scores, genuine)', 'tests/test_train.py', 'fresh_run_writes'),
 ("checkpoint without its epoch's threshold", "twins/checkpoint.py", '"threshold": learn.valid_report["eer_threshold"]', '"threshold": 0.5', "tests/test_train.py", "fresh_run_writes"),
 ("data-root: the shortest tail first", "twins/data.py", "        for start in range(len(parts)):", "        for start in reversed(range(len(parts))):", "tests/test_data.py", "longest"),
 ("a repeated JSON key keeps the last", "twins/data.py", ", object_pairs_hook=no_repeats)", ")", "tests/test_refusals.py", "read_as_written"),
 ('a twin pair listed twice is taken', 'twins/data.py', 'if n > 1],  # its impostors would count twice', 'if n > 9],  # its impostors would count twice', 'tests/test_refusals.py', 'read_as_written'),
 ('two entries, one file', 'twins/data.py', 'if len(ps) > 1],  # one photo, two people', 'if len(ps) > 9],  # one photo, two people', 'tests/test_refusals.py', 'one_file'),
 ("EXIF orientation ignored", "twins/data.py", "    im = ImageOps.exif_transpose(im)", "    pass", "tests/test_refusals.py", "upright"),
 ("a NaN loss trains on", "twins/callbacks.py", "        if self.training and not torch.isfinite(self.loss):", "        if False:", "tests/test_refusals.py", "diverging"),
 ("a NaN checkpoint loads", "twins/checkpoint.py", '    if not all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point()):', "    if False:", "tests/test_refusals.py", "diverging"),
 ("checkpoint epoch from every digit", "twins/checkpoint.py", r'm = re.fullmatch(r"ep(\d+)\.pth", path.name)', r'm = re.fullmatch(r"ep(\d+)\.pth", "ep" + re.sub(r"\D", "", path.stem) + ".pth")', "tests/test_refusals.py", "exact_epoch"),
 ("interpret takes edited training ids", "twins/inference.py", '    check_classes({"classes": classes}, list(prepared.classes), "this model")', "    pass", "tests/test_refusals.py", "training_ids"),
 ("a failed checkpoint write trains on", "twins/callbacks.py", "            except OSError as e:\n                self.failed", "            except ValueError as e:\n                self.failed", "tests/test_refusals.py", "full_disk"),
 ("size not tiled by the patches", "twins/model.py", "        if img_size % patch:", "        if False:", "tests/test_refusals.py", "tile or before_decoding"),
 ("more pairs per step than images", "twins/run.py", "    if s.bs > len(data.train.paths):", "    if False:", "tests/test_refusals.py", "before_decoding"),
 ("W&B online trusted without a network", "twins/tracking.py", '    if asked and asked != "online":', "    if asked:", "tests/test_refusals.py", "wandb_asked_online"),
 ("checkpoints loaded as any pickle", "twins/checkpoint.py", "weights_only=True)  # a pickled object could run code", "weights_only=False)", "tests/test_refusals.py", "only_tensors"),
 ("a resume elsewhere starts a new W&B run", "twins/run.py", '        run = start_wandb(s, learn.plan, ckpt.get("wandb_id") if ckpt else None)', "        run = start_wandb(s, learn.plan, None)", "tests/test_refusals.py", "continues_the_run"),
 ("a fresh run over another run's files", 'twins/checkpoint.py', '            if found:\n                raise CheckpointError(', '            if False:\n                raise CheckpointError(', 'tests/test_runs.py', 'never_overwrites'),
 ('a second run writes the same folder', 'twins/checkpoint.py', '            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)', '            pass', 'tests/test_runs.py', 'second_run'),
 ("hub missing read as a bad --arch", "twins/model.py", '            if "huggingface_hub" in str(e):', "            if False:", "tests/test_refusals.py", "cannot_use_the_hub"),
 ("export writes over a folder", "export.py", "    if out.is_dir():", "    if False:", "tests/test_refusals.py", "export_to_a_folder"),
 ("a stop decided by one process alone", "twins/callbacks.py", "        agreed = next((r for r in gather(self.reason) if r), None)", "        agreed = self.reason", "tests/test_distributed.py", "nan_in_one_process"),
 ("accumulation all-reduces every micro-batch", "twins/callbacks.py", "            self.model.require_backward_grad_sync = self.last", "            pass", "tests/test_distributed.py", "share_each"),
 ("accumulation scheduled by micro-batch", "twins/callbacks.py", "            sched._update_val(", "            (lambda pct: None)(", "tests/test_budget.py", "accumulation"),
 ("accumulation sums the micro-batches", "twins/callbacks.py", "        self.learn.loss_grad = self.loss_grad / self.plan.accum", "        pass", "tests/test_distributed.py", "stopped_and_resumed_in_one_process"),
 ("a step straddles two epochs", "twins/data.py", "shard(super().get_idxs(), self.bs * self.accum,", "shard(super().get_idxs(), self.bs,", "tests/test_budget.py", "accumulation"),
 ("a signal stops one process mid-step", "twins/run.py", "        with on_signals(lambda name: agreed.request(\"signal\", name)):", "        with on_signals(interrupt):", "tests/test_distributed.py", "sigterm"),
 ("--bs per process", "twins/plan.py", "    plan = split(run_id, s.bs, n, s.bs)", "    plan = split(run_id, s.bs * n, n, s.bs)", "tests/test_distributed.py", "both_gpus"),
 ("weights loaded non-strictly", "twins/model.py", "            if loaded and loaded.missing_keys:", "            if False:", "tests/test_model.py", "lack_a_tensor"),
 ("export over another run's learner", "export.py", 'Path(args.out or ckpt_path.with_name("twins.pkl"))', 'Path(args.out or "models/twins.pkl")', "tests/test_export_interpret.py", "beside"),
 ('arch checked by train.py alone', 'twins/model.py', '    check_cuda_arch()\n    return torch.device("cuda")', '    return torch.device("cuda")', 'tests/test_gpu_paths.py', 'checks_the_gpu'),
]


def main() -> None:
    only = sys.argv[1:]
    for name, f, a, b, test, k in CASES:
        if only and not any(o in name for o in only):
            continue
        inject(name, R / f, a, b, test, k)


def inject(name: str, path: Path, a: str, b: str, test: str, k: str) -> None:
    orig = path.read_text()
    if orig.count(a) != 1:
        print(f"STALE   {name}: the code it breaks has changed; update the case")
        return
    path.write_text(orig.replace(a, b))
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", test, "-k", k], cwd=R, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
        last = (out.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:  # a test that hangs (processes waiting on each other) does not pass
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        last = "timed out after 300 s"
    finally:
        path.write_text(orig)
    print(f"{'CAUGHT' if p.returncode else 'MISSED'}  {name:40s} {test}::{k}  ({last})", flush=True)


if __name__ == "__main__":
    main()
