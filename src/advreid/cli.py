"""The ``advreid`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, OSError, RuntimeError,
)


def _cmd_synth(a: argparse.Namespace) -> int:
    from advreid.data import generate_synthetic

    t0 = time.perf_counter()
    out = generate_synthetic(
        a.out, num_train_ids=a.ids, num_test_ids=a.test_ids if a.test_ids is not None else a.ids,
        num_cams=a.cams, height=a.height, width=a.width, seed=a.seed, overwrite=a.overwrite, progress=True,
        imbalance=a.imbalance, camera_bias=a.camera_bias,
    )
    from advreid.data import build_dataset, format_dataset_info

    print(format_dataset_info(build_dataset("market1501", out)))
    print(f"wrote a Market-1501-format synthetic dataset to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_data_info(a: argparse.Namespace) -> int:
    from advreid.data import build_dataset, format_dataset_info

    opts = {"train_all": a.train_all}
    if a.dataset == "cuhk03":
        opts["labeled"] = a.labeled
    ds = build_dataset(a.dataset, a.root, **opts)
    print(format_dataset_info(ds))
    if a.check_images:
        from advreid.data import check_images

        records = [*ds.train, *ds.query, *ds.gallery]
        _, bad = check_images(records, skip_bad=True)
        for path, reason in bad[:20]:
            print(f"  unreadable: {path}: {reason}")
        print(f"checked {len(records)} images: {len(bad)} unreadable")
        return 1 if bad else 0
    return 0


def _cmd_data_bias(a: argparse.Namespace) -> int:
    import json

    from advreid.experiments.analysis import BiasJob, bias_report

    job = BiasJob(a.root, a.dataset, a.split, dominance_threshold=a.dominance_threshold,
                  duplicates=not a.no_duplicates, run=a.run, attack=a.attack, eps=a.eps, device=a.device)
    doc, text = bias_report(job, per_id=a.per_id)
    print(json.dumps(doc, indent=2) if a.json else text)
    return 0


def _cmd_data_fidelity(a: argparse.Namespace) -> int:
    import json

    from advreid.experiments.analysis import generated_fidelity

    r = generated_fidelity(a.root, a.run, dataset=a.dataset, device=a.device)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['generated']} generated images ({r['real']} real, {r['identities']} identities, {r['cameras']} "
          f"cameras); {r['method']}")
    print(f"identity: top-1 {100 * r['identity_top1']:.1f}% (chance {100 * r['identity_chance_top1']:.1f}%, real "
          f"images leave-one-out {100 * r['identity_top1_real_loo']:.1f}%), top-5 {100 * r['identity_top5']:.1f}% "
          f"(chance {100 * r['identity_chance_top5']:.1f}%)")
    print(f"target camera: {100 * r['camera_acc']:.1f}% (chance {100 * r['camera_chance']:.1f}%); predicted camera = "
          f"the source image's camera: {100 * r['camera_equals_source']:.1f}%")
    return 0


def _train_overrides(a: argparse.Namespace) -> list[str]:
    ov = list(a.overrides)
    if a.data is not None:
        ov.append(f"data.root={a.data}")
    if a.dataset is not None:
        ov.append(f"data.name={a.dataset}")
    if a.device is not None:
        ov.append(f"device={a.device}")
    if a.skip_bad_images:
        ov.append("data.skip_bad_images=true")
    return ov


def _cmd_train(a: argparse.Namespace) -> int:
    from advreid.experiments import train

    res = train(a.config, a.out, resume=a.resume, overwrite=a.overwrite, overrides=_train_overrides(a))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {res.epochs} epochs; final checkpoint {res.checkpoint}.safetensors")
    return 0


def _print_results(res: dict, title: str) -> None:
    from advreid.reporting import METRIC_COLUMNS, format_table, reranked

    rows = [{"setting": "plain", **res}]
    if "rr_rank1" in res:
        rows.append({"setting": "re-ranked", **reranked(res)})
    print(title)
    print(format_table(rows, [("setting", "")] + METRIC_COLUMNS))


def _cmd_eval(a: argparse.Namespace) -> int:
    from advreid.experiments.runs import EvalJob, eval_results_path, run_eval

    job = EvalJob(model_source(a), a.data, a.dataset, rerank=a.rerank, flip=a.flip, metric=a.metric, ap=a.ap,
                  checkpoint=a.checkpoint, defense="auto" if a.defense is None else a.defense, device=a.device,
                  num_workers=a.num_workers if a.num_workers is not None else 2, skip_bad_images=a.skip_bad_images,
                  card=model_card_from_args(a), out=a.out)
    saved = eval_results_path(job)  # a spec without --out fails here, before anything loads
    res = run_eval(job)
    if not res:  # another rank of a sharded run (torchrun): rank 0 prints
        return 0
    _print_skipped(res.get("skipped_images"))
    p = res["protocol"]
    m = res["model"]
    who = f"trained on {res['trained_on']}" if res.get("trained_on") else f"model {m.get('spec') or m.get('run_dir')}"
    _print_results(res, f"{res['dataset']} ({p['num_query']} query / {p['num_gallery']} gallery), "
                        f"metric {p['metric']}, flip {p['flip']}, AP {p['ap']}, {who}"
                        + (f", defense {res['defense']['name']}" if res["defense"] else ""))
    print(f"saved to {saved}")
    return 0


def _print_skipped(skipped: dict | None) -> None:
    """One line: how many unreadable query/gallery images ``--skip-bad-images`` left out."""
    if skipped is None:
        return
    first = next((b["path"] for b in [*skipped["query"], *skipped["gallery"]]), None)
    print(f"skipped {skipped['count']} unreadable image(s) ({len(skipped['query'])} query, "
          f"{len(skipped['gallery'])} gallery; --skip-bad-images)" + (f", first: {first}" if first else ""))


def _warn(msg: str) -> None:
    print(f"advreid: warning: {msg}", file=sys.stderr)


def _warn_no_attack(eps: list[float], steps: object, spec: Any) -> None:
    """A zero budget or zero steps leaves the images as they are: say so (one line) instead of a silent clean row."""
    also = " apart from --quantize/--reencode" if spec.quantize is not None or spec.reencode is not None else ""
    if steps == 0:
        _warn(f"--steps 0: no attack step is taken, the attacked row equals the clean one{also}")
    elif 0.0 in eps:
        flag = "--sweep-eps entry 0" if len(eps) > 1 else "--eps 0"
        _warn(f"{flag}: a zero budget leaves the images unchanged, the attacked row equals the clean one{also}")


def _attack_spec(a: argparse.Namespace) -> tuple:
    """(AttackSpec, sweep) of the attack flags; each error names its flag."""
    import torch
    import yaml

    from advreid.evaluation import AttackSpec
    from advreid.ops import finalize, parse_eps, parse_eps_list

    if a.sweep_eps and a.eps is not None:
        raise ValueError("--eps and --sweep-eps exclusive: give one budget or a list")
    sweep = parse_eps_list(a.sweep_eps, "--sweep-eps") if a.sweep_eps else None
    eps = sweep[0] if sweep else parse_eps(a.eps or "5px", "--eps")
    params = {}
    for item in a.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE, e.g. --param momentum=0.5")
        params[key] = yaml.safe_load(value)
    if "side" in params:
        raise ValueError("pass the side as --side, not as an attack parameter")
    none = {None: None, "none": None}
    quantize, reencode = none.get(a.quantize, a.quantize), none.get(a.reencode, a.reencode)
    try:
        finalize(torch.zeros(1, 3, 2, 2), quantize=quantize, reencode=reencode)
    except ValueError as e:
        flag = "--reencode" if reencode is not None and "quantize" not in str(e) else "--quantize"
        raise ValueError(f"{flag}: {' '.join(str(e).split())}") from None
    steps = int(a.steps) if a.steps is not None and a.steps.strip().isdigit() else a.steps
    alpha = None if a.alpha is None else parse_eps(a.alpha, "--alpha")
    if a.max_images is not None and a.max_images < 1:
        raise ValueError(f"--max-images {a.max_images}: expected a positive number of images")
    spec = AttackSpec(a.attack, eps=eps, alpha=alpha, steps=steps, params=params, side=a.side, quantize=quantize,
                      reencode=reencode, seed=a.seed)
    _warn_no_attack(sweep or [eps], steps, spec)
    return spec, sweep


def _cmd_attack(a: argparse.Namespace) -> int:
    from advreid.evaluation import RunOptions, ThreatModel
    from advreid.experiments.runs import AttackJob, run_attack
    from advreid.reporting import METRIC_COLUMNS, format_table, reranked

    spec, sweep = _attack_spec(a)
    threat = ThreatModel(defense="auto" if a.defense is None else a.defense, adaptive=a.adaptive,
                         eot_samples=a.eot)
    source = model_source(a)
    if isinstance(source, str) and a.out is None:
        raise ValueError(f"{source} is a model spec, not a run folder: give --out DIR for the attack's results")
    job = AttackJob(source, a.data, spec, threat, sweep=sweep, dataset=a.dataset, card=model_card_from_args(a),
                    source_run=a.source_model, rerank=a.rerank, max_images=a.max_images, seed_compat=a.seed_compat,
                    save_adv=a.save_adv, out=a.out, overwrite=a.overwrite, skip_bad_images=a.skip_bad_images,
                    resume=a.resume, options=RunOptions(batch_size=a.batch_size, device=a.device,
                                                        num_workers=a.num_workers, progress=True))
    try:
        res, out = run_attack(job)
    except ValueError as e:
        msg = str(e)
        if "adaptive=True needs a defense" in msg:
            raise ValueError("--adaptive attacks through the run's passive defense, but there is none (the run's "
                             "config has no defense.passive): pass --defense NAME (e.g. cs)") from None
        raise
    if not res:  # another rank of a sharded run (torchrun): rank 0 prints
        return 0
    _print_skipped(res.get("skipped_images"))
    runs = res["runs"]
    rows = [{"setting": "clean", "linf": "", "s_img": "", **runs[0]["clean"]}]
    if a.rerank:
        rows.append({"setting": "clean, re-ranked", **reranked(runs[0]["clean"])})
    for r in runs:
        name = f"{a.attack} {r['eps_px']:.3g}px"
        rows.append({"setting": name, "linf": f"{r['linf_max_px']:.2f}", "s_img": f"{r['time_per_image_s']:.3g}",
                     **r["attacked"]})
        if a.rerank:
            rows.append({"setting": f"{name}, re-ranked", **reranked(r["attacked"])})
    p = res["protocol"]
    src = f", transfer from {res['source_model']['run_dir'] or res['source_model']['spec']}" if res["source_model"] \
        else ""
    if res.get("defense"):
        src += f", defense {res['defense']['name']} ({res['threat'].replace('_', '-')} attacker)"
    print(f"{res['attack']['label']} on the {res['side']} set of {res['dataset']['name']} ({p['num_query']} query / "
          f"{p['num_gallery']} gallery), metric {p['metric']}{src}")
    print(format_table(rows, [("setting", "")] + METRIC_COLUMNS + [("linf", "max Linf px"), ("s_img", "s/img")]))
    print(f"saved to {out / 'results.json'}" + (f"; adversarial images in {a.save_adv}" if a.save_adv else ""))
    return 0


def _print_bench(doc: dict, out: Path) -> None:
    from advreid.reporting.bench_tables import format_bench_table

    for t in doc["_tables"]:
        print()
        print(format_bench_table(t, markdown=False))
    print(f"results: {out / 'results.json'}; tables (Markdown, CSV): {out / 'tables'}"
          + (f"; rank list: {doc['ranklist']}" if doc.get("ranklist") else "")
          + (f"; report: {doc['report']}" if doc.get("report") else ""))


def _cmd_bench(a: argparse.Namespace) -> int:
    from advreid.experiments.bench import run_bench

    # argparse splits positionals around options: the first word is the config, every other one an override
    config, *overrides = [*a.config, *a.overrides]
    seeds = None
    if a.seeds:
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds {a.seeds!r}: expected a comma-separated list of integers, e.g. 0,1,2") from None
    doc, out = run_bench(config, a.out, overrides=overrides, resume=a.resume, overwrite=a.overwrite,
                         tables_only=a.tables_only, seeds=seeds, executor=_executor_of(a))
    _print_bench(doc, out)
    if not doc["complete"]:
        print("advreid: warning: some cells are missing (see the tables' '-' entries)", file=sys.stderr)
    return 0


def demo_config(quick: bool = False, seed: int = 0, device: str | None = None) -> dict:
    """The demo's bench config (``configs/bench/demo.yaml``), shortened for ``--quick``."""
    from advreid.experiments.grid import load_bench_config

    cfg = load_bench_config("demo")
    cfg["seed"] = seed
    if device:
        cfg["device"] = device
    if quick:
        for m in cfg["models"].values():
            m["overrides"] = [o for o in m.get("overrides") or [] if not o.startswith(("train.epochs", "sched."))]
            m["overrides"] += ["train.epochs=8", "sched.milestones=[6]", "sched.warmup_epochs=1"]
        cfg["settings"]["max_images"] = 60
        cfg["settings"]["eot_samples"] = 2
        cfg["datasets"]["synth"]["synthetic"].update({"ids": 40, "test_ids": 40})
        for a in cfg["attacks"].values():
            if a and a.get("generator"):
                a["generator"]["overrides"] = [*a["generator"].get("overrides", []), "train.epochs=2"]
    return cfg


def _cmd_demo(a: argparse.Namespace) -> int:
    from advreid.experiments.bench import run_bench

    if a.which == "dddefense":
        from advreid.experiments.demos import run_dddefense_demo

        doc, out, text = run_dddefense_demo(a.out or "runs/dddefense_demo", quick=a.quick, seed=a.seed,
                                            device=a.device, resume=a.resume, overwrite=a.overwrite)
        print(text)
        if not doc["complete"]:
            print("advreid: warning: some cells are missing (see the tables' '-' entries)", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    cfg = demo_config(a.quick, a.seed, a.device)
    print("advreid demo: synthetic Market-format data -> a baseline and a JAD-trained model (small CNN, CPU) -> "
          "M-IFGSM, SMA, FNA and LTA query attacks, non-adaptive and adaptive (through circuitous scaling)")
    doc, out = run_bench(cfg, a.out or "runs/demo", overwrite=a.overwrite, resume=a.resume)
    _print_bench(doc, out)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; output folder: {out}")
    return 0


def _add_synth(sub: Any) -> None:
    """``advreid synth``."""
    s = sub.add_parser("synth", help="write a synthetic Market-1501-format dataset")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--ids", type=int, default=100, help="training identities (default 100)")
    s.add_argument("--test-ids", type=int, default=None, help="test identities (default: same as --ids)")
    s.add_argument("--cams", type=int, default=6, help="cameras, 2..6 as in Market-1501 (default 6)")
    s.add_argument("--height", type=int, default=128)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset folder")
    s.add_argument("--imbalance", default="none", help="training images per identity: 'none' or 'zipf:S[:MIN:MAX]' "
                   "(a long tail, e.g. zipf:1.2 -> 2..60 images per identity)")
    s.add_argument("--camera-bias", type=float, default=0.0, help="probability in [0, 1) that a training image comes "
                   "from the identity's dominant camera (default 0: unbiased)")
    s.set_defaults(func=_cmd_synth)


def _add_data(sub: Any) -> None:
    """``advreid data``."""
    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    di = dsub.add_parser("info", help="identities, images and cameras per split")
    di.add_argument("root")
    di.add_argument("--dataset", default="market1501", help="parser name (market1501, dukemtmcreid, msmt17, "
                    "cuhk03, folder, or a registered custom one)")
    di.add_argument("--train-all", action="store_true")
    di.add_argument("--labeled", action="store_true", help="CUHK03: labeled boxes instead of detected")
    di.add_argument("--check-images", action="store_true", help="decode every image and report unreadable ones")
    di.set_defaults(func=_cmd_data_info)
    db = dsub.add_parser("bias", help="dataset bias: images per identity (Gini), dominant cameras, near-duplicates, "
                         "and with --run the per-identity accuracy variance")
    db.add_argument("root")
    db.add_argument("--dataset", default="market1501", help="parser name (default market1501)")
    db.add_argument("--split", choices=["train", "query", "gallery"], default="train")
    db.add_argument("--json", action="store_true", help="print JSON instead of a table")
    db.add_argument("--per-id", action="store_true", help="with --json: every identity's counts")
    db.add_argument("--dominance-threshold", type=float, default=0.5,
                    help="an identity is camera-dominated above this share of one camera (default 0.5)")
    db.add_argument("--no-duplicates", action="store_true", help="skip the near-duplicate check (no image reads)")
    db.add_argument("--run", default=None, metavar="RUN",
                    help="a trained run: also report per-identity rank-1 mean / variance / std on the test split")
    db.add_argument("--attack", default=None, help="with --run: also under this attack (e.g. pgd, fna)")
    db.add_argument("--eps", default="8px", help="with --attack: budget (default 8px)")
    db.add_argument("--device", default=None)
    db.set_defaults(func=_cmd_data_bias)
    df = dsub.add_parser("fidelity", help="do a resampled dataset's generated images carry their identity and "
                         "target camera? (ranked by a run trained on the original data)")
    df.add_argument("root", help="a folder written by `advreid resample`")
    df.add_argument("--run", required=True, help="a run trained on the original (not resampled) data")
    df.add_argument("--dataset", default="market1501")
    df.add_argument("--device", default=None)
    df.add_argument("--json", action="store_true")
    df.set_defaults(func=_cmd_data_fidelity)


def _add_train(sub: Any) -> None:
    """``advreid train``."""
    t = sub.add_parser("train", help="train a ReID model", description="Train a ReID model. Extra KEY=VALUE "
                       "arguments override the config, e.g. optim.lr=0.01 train.epochs=60.")
    t.add_argument("-c", "--config", default="bot_r50", help="YAML file or preset name (default bot_r50)")
    t.add_argument("--data", default=None, help="dataset root (same as data.root=...)")
    t.add_argument("--dataset", default=None, help="dataset parser name (same as data.name=...)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    _add_resume_flags(t, "run")
    t.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable training images (with a count) instead of stopping at the first")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(func=_cmd_train)


def _add_eval(sub: Any) -> None:
    """``advreid eval``."""
    e = sub.add_parser("eval", help="evaluate a trained run or any model (--model SPEC) on a dataset (also "
                       "cross-domain)")
    e.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR",
                   help="run directory (or a model spec; see --model)")
    e.add_argument("--data", required=True, help="dataset root")
    e.add_argument("--dataset", default=None, help="parser name (default: the one the run was trained on)")
    e.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking (k1=20,k2=6,l=0.3)")
    e.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="flip-averaged features")
    e.add_argument("--metric", choices=["cosine", "euclidean", "sqeuclidean"], default=None)
    e.add_argument("--ap", choices=["standard", "official"], default=None,
                   help="standard (torchreid) or official (trapezoid, Market MATLAB/layumi) AP")
    e.add_argument("--checkpoint", default=None, help="checkpoint stem or file (default: the run's final/latest)")
    e.add_argument("--defense", default=None, metavar="NAME|none",
                   help="passive defense on every test image (default: the run's defense.passive; none: bare model)")
    e.add_argument("--device", default=None)
    e.add_argument("--num-workers", type=int, default=None)
    e.add_argument("--out", default=None, metavar="DIR",
                   help="folder of results.json (default: RUN_DIR; required with --model)")
    add_model_flags(e)
    _add_skip_bad_images(e)
    e.set_defaults(func=_cmd_eval)


def _add_attack(sub: Any) -> None:
    """``advreid attack``."""
    k = sub.add_parser(
        "attack", help="attack a trained run's query (or gallery) set and score clean vs attacked retrieval",
        description="Perturb the query set (default; gallery stays clean) or the gallery set (--side gallery, "
        "guided by the queries as in Bai et al.) with an attack and report clean and attacked rank-k/mAP. "
        "Budgets in pixel units (5px = 5/255) or as fractions of the [0,1] range (0.0196).")
    k.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR",
                   help="run directory of the model evaluated (and attacked, unless --source-model), or a model "
                   "spec (see --model)")
    k.add_argument("--data", required=True, help="dataset root")
    k.add_argument("--attack", required=True, help="attack name (fgsm, ifgsm, mifgsm, sma, fna, odfa, lta, noise ...)")
    k.add_argument("--eps", default=None, help="L-inf budget: 5px, 5/255 or 0.0196 (default 5px)")
    k.add_argument("--alpha", default=None, help="step size, e.g. 1px (default: the attack's own)")
    k.add_argument("--steps", default=None,
                   help="iterations, or the rule kurakin (Bai: int(min(eps_px+4, 1.25 eps_px))) (default: the "
                   "attack's own)")
    k.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack-specific parameter, repeatable (e.g. --param momentum=0.5)")
    k.add_argument("--side", choices=["query", "gallery"], default=None,
                   help="which set is perturbed (default: the attack's own side: query, gallery for ifgsm_bai)")
    k.add_argument("--sweep-eps", default=None, metavar="LIST",
                   help="comma-separated budgets, one evaluation each, e.g. 1px,2px,4px,5px,8px (replaces --eps)")
    k.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    k.add_argument("--quantize", choices=["none", "round", "floor"], default=None,
                   help="quantise adversarial images to 8 bits before scoring (default none)")
    k.add_argument("--reencode", default=None, metavar="none|png|jpeg:Q",
                   help="round-trip adversarial images through PNG or JPEG quality Q before scoring (default none)")
    k.add_argument("--seed-compat", action="store_true",
                   help="the seed paper's setting: --quantize floor --reencode jpeg:75 (saved files are JPEG q75)")
    k.add_argument("--save-adv", default=None, metavar="DIR",
                   help="write the adversarial images under their original file stems (PNG, or JPEG with "
                   "--reencode jpeg:Q / --seed-compat); one sub-folder per eps in a sweep")
    k.add_argument("--source-model", default=None, metavar="RUN_A|SPEC",
                   help="black-box transfer: craft the images on RUN_A's model (and its guides), evaluate RUN_DIR; "
                   "a model spec is loaded with the card beside its weights (<weights>.yaml)")
    k.add_argument("--defense", default=None, metavar="NAME|none",
                   help="passive defense applied to every test image (cs, p1p2p1, rrp, jpeg, bitdepth ...; default: "
                   "the run's defense.passive, e.g. cs for the JAD recipe; none: the bare model)")
    k.add_argument("--adaptive", action="store_true",
                   help="adaptive attacker: differentiate through the defense (BPDA, and EOT when it is random)")
    k.add_argument("--eot", type=int, default=None, metavar="N",
                   help="EOT samples per step for a randomised defense under --adaptive (default 10)")
    k.add_argument("--dataset", default=None, help="parser name (default: the one the run was trained on)")
    k.add_argument("--batch-size", type=int, default=32, help="images attacked at once (default 32)")
    k.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="quick look: attack only N evenly spaced images of the attacked side; clean and attacked "
                   "rows are both scored on that subset (numbers not comparable with full runs)")
    k.add_argument("--seed", type=int, default=0, help="seed of random starts / noise (default 0)")
    k.add_argument("--device", default=None)
    k.add_argument("--num-workers", type=int, default=2)
    k.add_argument("--out", default=None,
                   help="result folder (default RUN_DIR/attacks/<attack>-<side>[-sweep][-from-<RUN_A>])")
    k.add_argument("--overwrite", action="store_true", help="replace an existing result folder (kept as .old-N)")
    add_model_flags(k)
    k.add_argument("--resume", action="store_true",
                   help="continue a killed run in its result folder (start it when there is none): only the "
                   "missing batches are attacked, with any number of torchrun ranks (docs/sharding.md)")
    _add_skip_bad_images(k)
    k.set_defaults(func=_cmd_attack)


def _add_bench(sub: Any) -> None:
    """``advreid bench``."""
    b = sub.add_parser(
        "bench", help="run a robustness benchmark grid (models x datasets x defenses x attacks x threat models)",
        description="Train or reuse the models of a bench config, score every cell of its grid and write "
        "results.json plus the tables (Markdown, CSV). Extra KEY=VALUE arguments override the config, e.g. "
        "datasets.market.root=/data/Market-1501-v15.09.15 settings.max_images=500.")
    b.add_argument("config", nargs="+", metavar="CONFIG [KEY=VALUE ...]",
                   help="bench YAML file or preset name (configs/bench: market_seed, duke_seed, demo), then overrides")
    b.add_argument("--out", default=None, help="output folder (default runs/bench/<name>)")
    _add_resume_flags(b, "bench")
    b.add_argument("--tables-only", action="store_true", help="rebuild the tables from the finished cells")
    b.add_argument("--seeds", default=None, metavar="LIST",
                   help="repeat the grid per seed (training and attack randomness), e.g. 0,1,2; tables show mean +- "
                   "std across seeds (each seed under OUT/seed_<s>)")
    _add_cluster_flags(b)
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=argparse.SUPPRESS)
    b.set_defaults(func=_cmd_bench)


_CLUSTER_FLAGS = {"submitit_cluster": "cluster", "submitit_folder": "folder", "slurm_partition": "partition",
                  "gpus_per_job": "gpus_per_job", "timeout": "timeout_min", "cpus_per_task": "cpus_per_task",
                  "mem_gb": "mem_gb", "cells_per_job": "cells_per_job", "array_parallelism": "array_parallelism",
                  "max_running": "max_running", "max_tries": "max_tries"}


def _add_cluster_flags(b: Any) -> None:
    """``advreid bench --executor submitit`` and its job options (docs/cluster.md)."""
    g = b.add_argument_group("where the work runs (docs/cluster.md)")
    g.add_argument("--executor", choices=("local", "submitit"), default="local",
                   help="local: in this process (default); submitit: every model training and the cells of each "
                   "model as SLURM jobs (pip install 'advreid[cluster]')")
    g.add_argument("--submitit-cluster", choices=("slurm", "local"), default=None,
                   help="submitit's executor: slurm (default where SLURM is found), local (subprocesses here)")
    g.add_argument("--submitit-folder", default=None, metavar="DIR",
                   help="job scripts, pickles and logs (default OUT/submitit)")
    g.add_argument("--slurm-partition", default=None, metavar="P", help="SLURM partition of every job")
    g.add_argument("--gpus-per-job", type=int, default=None, metavar="G",
                   help="GPUs of a training job, one DDP rank each (default 1); other jobs take 1 (0 with G=0)")
    g.add_argument("--timeout", type=int, default=None, metavar="MIN", help="time limit of a job (default 240)")
    g.add_argument("--cpus-per-task", type=int, default=None, metavar="N", help="CPUs per job or rank (default 4)")
    g.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="memory per job (default: SLURM's)")
    g.add_argument("--cells-per-job", type=int, default=None, metavar="N",
                   help="cells of one model and dataset per job (default 0: all of them)")
    g.add_argument("--array-parallelism", type=int, default=None, metavar="N",
                   help="jobs of one array running at once on SLURM")
    g.add_argument("--max-running", type=int, default=None, metavar="N",
                   help="jobs in flight at once (default: no limit on SLURM, CPUs/cpus-per-task locally)")
    g.add_argument("--max-tries", type=int, default=None, metavar="N",
                   help="submissions of a failing job before it is reported (default 3)")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="another SLURM parameter, e.g. account=proj, qos=high, constraint=a100 (repeatable)")


def _executor_of(a: argparse.Namespace) -> Any:
    """The executor the bench flags ask for (None: in this process)."""
    from advreid.experiments.executors import SubmititOptions, make_executor, parse_slurm_params

    given = {opt: getattr(a, flag) for flag, opt in _CLUSTER_FLAGS.items() if getattr(a, flag) is not None}
    if a.executor == "local":
        if given or a.slurm_param:
            first = next(iter([*given, "slurm_param"]))
            flag = next((f for f, o in _CLUSTER_FLAGS.items() if o == first), first)
            raise ValueError(f"--{flag.replace('_', '-')} needs --executor submitit")
        return None
    return make_executor("submitit", SubmititOptions(**given, slurm=parse_slurm_params(a.slurm_param)))


def _add_demo(sub: Any) -> None:
    """``advreid demo``."""
    m = sub.add_parser("demo", help="synthetic data -> baseline and JAD models -> attacks -> robustness table",
                       description="The whole pipeline on the CPU: `advreid demo` (the seed paper: baseline vs JAD, "
                       "configs/bench/demo.yaml) or `advreid demo dddefense` (the DDDefense grid, "
                       "configs/bench/dddefense_demo.yaml).")
    m.add_argument("which", nargs="?", default="seed", choices=("seed", "dddefense"),
                   help="seed: baseline vs JAD (default); dddefense: baseline, metric AT, GOAT, FNES, self-meta, "
                   "DDDefense on biased synthetic data")
    m.add_argument("--out", default=None, help="demo folder (default runs/demo, runs/dddefense_demo)")
    m.add_argument("--quick", action="store_true", help="fewer epochs, fewer attacked queries (a smoke run)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default=None)
    _add_resume_flags(m, "demo")
    m.set_defaults(func=_cmd_demo)


def _add_robust(sub: Any) -> None:
    """``advreid robust``: the standard worst-case robust evaluation (docs/robust.md)."""
    r = sub.add_parser(
        "robust",
        help="standard worst-case robustness: a fixed, versioned attack ensemble, the per-query worst case",
        description="Run every member of a versioned attack ensemble (APGD, FNA, ODFA, LTA, a gallery-guided rank "
        "attack, a gradient-free random search) on every query and report, per query, the adversarial version with "
        "the lowest AP (ties: the worse first-match rank); flags likely gradient masking. Writes DIR/results.json "
        "(a versioned JSON Schema, docs/robust.md).")
    r.add_argument("run_dir", nargs="?", default=None, metavar="MODEL",
                   help="run directory or model spec KIND:NAME[@WEIGHTS] (see --model)")
    r.add_argument("--data", required=True, help="dataset root")
    r.add_argument("--dataset", default=None, help="parser name (default: the one the run was trained on)")
    r.add_argument("--eps", default=None, help="budget: L-inf in pixels or [0,1] units (default 8px); L2: a radius "
                   "over the whole [0,1] image (default 1.0)")
    r.add_argument("--defense", default=None, metavar="NAME|none",
                   help="passive defense on every test image (default: the run's defense.passive; none: bare model)")
    r.add_argument("--adaptive", action="store_true",
                   help="the members differentiate through the defense (BPDA; EOT when it is random)")
    r.add_argument("--version", default="standard", choices=["standard", "rand", "quick"],
                   help="standard (default), rand (randomised defenses: EOT in every member, metrics averaged over "
                   "defense draws) or quick (APGD + random search, a cheap smoke test)")
    r.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="attack only N evenly spaced queries (a smoke run: never ranked with full runs)")
    r.add_argument("--batch-size", type=int, default=32, help="images attacked at once (default 32)")
    r.add_argument("--seed", type=int, default=0, help="seed of every member's per-sample streams (default 0)")
    r.add_argument("--device", default=None)
    r.add_argument("--num-workers", type=int, default=2)
    r.add_argument("--out", required=True, help="result folder (results.json, members/)")
    _add_resume_flags(r, "robust evaluation")
    add_model_flags(r)
    r.add_argument("--norm", dest="threat_norm", choices=["linf", "l2"], default="linf",
                   help="threat model norm (default linf)")
    r.set_defaults(func=_cmd_robust)


def _cmd_robust(a: argparse.Namespace) -> int:
    from advreid.evaluation import RunOptions
    from advreid.experiments.runs import load_run
    from advreid.robust import RobustJob, run_robust

    source = model_source(a)
    if a.max_images is not None and a.max_images < 1:
        raise ValueError(f"--max-images {a.max_images}: expected a positive number of images")
    model, info = load_run(source, card=model_card_from_args(a))
    job = RobustJob(model, info, a.data, a.out, dataset=a.dataset, eps=a.eps, norm=a.threat_norm,
                    defense="auto" if a.defense is None else a.defense, adaptive=a.adaptive, version=a.version,
                    max_images=a.max_images, seed=a.seed, resume=a.resume, overwrite=a.overwrite,
                    options=RunOptions(batch_size=a.batch_size, device=a.device, num_workers=a.num_workers,
                                       progress=True),
                    on_member=lambda name, rec: print(f"  {name}: done in {rec['seconds']:.1f}s", flush=True))
    try:
        doc, out = run_robust(job)
    except ValueError as e:
        if "adaptive=True needs a defense" in str(e):
            raise ValueError("--adaptive attacks through a passive defense, but there is none: pass --defense NAME "
                             "(e.g. rrp)") from None
        raise
    if not doc:  # another rank of a sharded run (torchrun): rank 0 prints
        return 0
    from advreid.reporting.leaderboard import robust_text

    print(robust_text(doc))
    print(f"saved to {out / 'results.json'}")
    return 0


def _add_leaderboard(sub: Any) -> None:
    """``advreid leaderboard``: rank `advreid robust` results by worst-case mAP."""
    b = sub.add_parser("leaderboard", help="rank `advreid robust` results (HTML, Markdown, CSV)",
                       description="Rank results.json files of `advreid robust` by worst-case mAP with intervals; "
                       "entries with another threat model, ensemble version, budget or dataset are ranked in "
                       "separate groups.")
    b.add_argument("results", nargs="+", metavar="RESULTS",
                   help="results.json files or `advreid robust` folders")
    b.add_argument("--out", required=True, help="output folder (leaderboard.html, leaderboard.md, leaderboard.csv)")
    b.add_argument("--overwrite", action="store_true", help="replace existing leaderboard files in --out")
    b.set_defaults(func=_cmd_leaderboard)


def _cmd_leaderboard(a: argparse.Namespace) -> int:
    from advreid.reporting.leaderboard import write_leaderboard

    paths, text = write_leaderboard(a.results, a.out, overwrite=a.overwrite)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_report(sub: Any) -> None:
    """``advreid report``."""
    r = sub.add_parser("report", help="write report.html (+ figures/) for a bench folder, an attack result or a run")
    r.add_argument("dir", help="a bench folder, an `advreid attack` result folder or a training run")
    r.add_argument("--out", default=None, help="HTML file (default DIR/report.html)")
    r.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM (the only part that loads models)")
    r.add_argument("--device", default="cpu", help="device for Grad-CAM (cpu, cuda, auto)")
    r.set_defaults(func=_cmd_report)


def _cmd_report(a: argparse.Namespace) -> int:
    from advreid.experiments.report import build_report

    path = build_report(a.dir, a.out, gradcam=not a.no_gradcam, device=a.device)
    print(f"report: {path} (figures in {path.parent / 'figures'})")
    return 0


# ---------------------------------------------------------------------------------------- model specs
def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--model KIND:NAME[@WEIGHTS]`` and its model card flags (input size, normalisation, feature, scoring), for
    every command that takes a run folder; ``--metric`` / ``--flip`` are added unless the command has them."""
    g = p.add_argument_group("bring your own model (docs/models.md)")
    g.add_argument("--model", default=None, metavar="KIND:NAME[@WEIGHTS]",
                   help="a model instead of a run folder: torchreid:ARCH@CKPT, fastreid:CONFIG.yml@MODEL.pth, "
                   "torchvision:ARCH@WEIGHTS, torchscript:MODEL.pt, python:MODULE:FACTORY[@WEIGHTS]")
    g.add_argument("--model-card", default=None, metavar="FILE",
                   help="YAML model card (default: <weights>.yaml beside the weights, if present)")
    g.add_argument("--input-size", default=None, metavar="HxW", help="input size of the model (default 256x128)")
    g.add_argument("--input-norm", dest="norm", choices=["imagenet", "none"], default=None,
                   help="input normalisation inside the wrapper (default imagenet mean/std)")
    g.add_argument("--mean", default=None, metavar="R,G,B", help="normalisation mean (images in [0,1])")
    g.add_argument("--std", default=None, metavar="R,G,B", help="normalisation std (images in [0,1])")
    g.add_argument("--feature-layer", default=None, metavar="NAME",
                   help="use this submodule's output (globally average-pooled if spatial) instead of the eval output")
    have = p._option_string_actions  # noqa: SLF001 -- argparse has no public "has this flag" query
    if "--metric" not in have:
        g.add_argument("--metric", choices=["cosine", "euclidean", "sqeuclidean"], default=None,
                       help="distance (default: the model's: cosine; torchreid specs euclidean)")
    if "--flip" not in have:
        g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="flip-averaged features (default: the model's: off)")


def model_source(a: argparse.Namespace) -> str | Path:
    """The model of a command: the positional RUN_DIR (a folder, or a spec) or ``--model SPEC``; exactly one."""
    from advreid.models.external import is_model_spec

    given = [x for x in (a.run_dir, getattr(a, "model", None)) if x is not None]
    if len(given) != 1:
        raise ValueError("give the model once: a run folder (RUN_DIR) or --model KIND:NAME[@WEIGHTS]"
                         + (f" (got both {a.run_dir} and --model {a.model})" if given else ""))
    if getattr(a, "model", None) is not None:
        from advreid.models.external import parse_spec

        parse_spec(a.model)  # an unknown kind or a malformed spec: one line, before anything loads
        return str(a.model)
    return str(a.run_dir) if is_model_spec(a.run_dir) else Path(a.run_dir)


def model_card_from_args(a: argparse.Namespace) -> Any:
    """The :class:`~advreid.models.external.ModelCard` the flags state (None: none given); errors name the flag."""
    import dataclasses

    from advreid.models.external import ModelCard

    flags = {"input_size": "input_size", "norm": "norm", "mean": "mean", "std": "std",
             "feature_layer": "feature_layer", "metric": "metric", "flip": "flip"}
    given = {k: getattr(a, f) for k, f in flags.items() if getattr(a, f, None) is not None}
    if given.get("norm") is not None and ({"mean", "std"} & set(given)):
        raise ValueError("--input-norm and --mean/--std exclude each other")
    if not given and getattr(a, "model_card", None) is None:
        return None
    card = ModelCard.from_dict(given, "flags")
    return dataclasses.replace(card, path=a.model_card) if getattr(a, "model_card", None) else card


def _add_skip_bad_images(p: argparse.ArgumentParser) -> None:
    """``--skip-bad-images`` of the commands that score query/gallery images (``eval``, ``attack``)."""
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable query/gallery images out (counted, listed in results.json) instead of "
                   "stopping at the first")


def _add_resume_flags(p: argparse.ArgumentParser, what: str) -> None:
    """``--resume`` / ``--overwrite`` with one wording for every command that writes a resumable folder."""
    p.add_argument("--resume", action="store_true", help=f"continue the {what} in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help=f"start over; the old {what} folder is kept as .old-N")


def _add_diffusion(sub: Any) -> None:
    """``advreid diffusion train``: the identity+camera-conditioned diffusion model of DDDefense Phase I."""
    d = sub.add_parser("diffusion", help="DDDefense Phase I: train the conditional diffusion model")
    dsub = d.add_subparsers(dest="diffusion_cmd", required=True)
    t = dsub.add_parser("train", help="train on a dataset's training split (resumable)",
                        description="Extra KEY=VALUE arguments override the config, e.g. train.epochs=50.")
    t.add_argument("--data", required=True, help="dataset root")
    t.add_argument("--dataset", default="market1501", help="parser name (default market1501)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("-c", "--config", default="diffusion_tiny", help="diffusion_tiny (CPU) or diffusion_market (GPU)")
    _add_resume_flags(t, "training")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(func=_cmd_diffusion_train)


def _cmd_diffusion_train(a: argparse.Namespace) -> int:
    from advreid.defenses.dddefense import train_diffusion

    out = train_diffusion(a.data, a.out, a.config, a.overrides, resume=a.resume, overwrite=a.overwrite,
                          dataset=a.dataset)
    print(f"diffusion model in {out}")
    return 0


def _add_resample(sub: Any) -> None:
    """``advreid resample``: DDDefense's rebalanced dataset (originals copied, generated images added)."""
    r = sub.add_parser("resample", help="DDDefense Phase I: write a rebalanced copy of a dataset",
                       description="Every identity with fewer than delta1 images gets generated ones; every identity "
                       "whose dominant camera holds more than delta2 of its images gets images for its other cameras."
                       " ROOT is never written to.")
    r.add_argument("root", help="the dataset to rebalance (Market layout)")
    r.add_argument("--generator", required=True, help="a folder written by `advreid diffusion train`")
    r.add_argument("--out", required=True, help="the new dataset folder")
    r.add_argument("--dataset", default="market1501")
    r.add_argument("--delta1", type=int, default=None, help="min images per identity (default: the median)")
    r.add_argument("--delta2", type=float, default=0.5, help="max share of one camera (default 0.5)")
    r.add_argument("--per-camera", default="1", help="images per under-seen camera: an int or 'balance'")
    r.add_argument("--mode", choices=["sdedit", "sample"], default="sdedit")
    r.add_argument("--strength", type=float, default=0.6, help="SDEdit noise strength (default 0.6)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    _add_resume_flags(r, "resampled dataset")
    r.set_defaults(func=_cmd_resample)


def _cmd_resample(a: argparse.Namespace) -> int:
    from advreid.defenses.dddefense import ResampleConfig, resample_dataset

    per_camera: int | str = int(a.per_camera) if a.per_camera.strip().isdigit() else a.per_camera
    cfg = ResampleConfig(delta1=a.delta1, delta2=a.delta2, per_camera=per_camera, mode=a.mode, strength=a.strength,
                         seed=a.seed, device=a.device)
    out = resample_dataset(a.root, a.generator, a.out, cfg, resume=a.resume, overwrite=a.overwrite,
                           dataset=a.dataset)
    print(f"rebalanced dataset in {out} (provenance: {out / 'resample_manifest.json'})")
    return 0


def _add_dmr(sub: Any) -> None:
    """``advreid dmr train``: DMR's generator against a victim run."""
    d = sub.add_parser("dmr", help="DMR (Deep Mis-Ranking): train a perturbation generator against a victim run")
    dsub = d.add_subparsers(dest="dmr_cmd", required=True)
    t = dsub.add_parser("train", help="train the generator (resumable; best epoch chosen on a validation split)",
                        description="Extra KEY=VALUE arguments override the config, e.g. train.epochs=10.")
    t.add_argument("victim", help="the victim's run folder (frozen, eval mode)")
    t.add_argument("--data", required=True, help="dataset root (its training split)")
    t.add_argument("--out", required=True, help="output folder of the generator")
    t.add_argument("-c", "--config", default="dmr_tiny", help="dmr_tiny (CPU) or dmr_market (GPU)")
    _add_resume_flags(t, "training")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(func=_cmd_dmr_train)


def _cmd_dmr_train(a: argparse.Namespace) -> int:
    from advreid.attacks.dmr import train_dmr

    out = train_dmr(a.victim, a.data, a.out, a.config, a.overrides, resume=a.resume, overwrite=a.overwrite)
    print(f"DMR generator in {out}; use it with: advreid attack RUN --data ROOT --attack dmr --param generator={out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from advreid import __version__
    p = argparse.ArgumentParser(prog="advreid", description="Adversarial robustness toolkit for person ReID.")
    p.add_argument("--version", action="version", version=f"advreid {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_synth, _add_data, _add_train, _add_eval, _add_attack, _add_bench, _add_demo, _add_report,
                _add_diffusion, _add_resample, _add_dmr, _add_robust, _add_leaderboard):
        add(sub)
    return p


def _is_bad_image(e: BaseException) -> bool:
    from advreid.data import BadImageError

    return isinstance(e, BadImageError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides given after an option (argparse stops filling positionals at the first option)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("advreid: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        if getattr(args, "skip_bad_images", True) is False and _is_bad_image(e):
            msg += "; pass --skip-bad-images to leave unreadable images out"
        print(f"advreid: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
