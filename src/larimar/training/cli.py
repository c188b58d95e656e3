"""`larimar train --config CONFIG.yaml`: train the adapter with Lightning, resumably.

The YAML has two sections: `model:` (LarimarConfig fields) and `train:` (see TRAIN_DEFAULTS in
`larimar.training.module`). Checkpoints (adapter weights + optimiser state, never the frozen base
models) go to OUTPUT/checkpoints; `last.ckpt` is resumed automatically. At the end the adapter is
exported to OUTPUT/adapter (config.json + adapter.safetensors, fp16), loadable with
`Larimar.from_pretrained(OUTPUT/adapter)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML with `model:` and `train:` sections")
    p.add_argument("--max-steps", type=int, default=None, help="override train.trainer.max_steps")
    p.add_argument("--output-dir", default=None, help="override train.output_dir")
    p.add_argument("--fast-dev-run", action="store_true", help="one training and one validation step, no checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore OUTPUT/checkpoints/last.ckpt")
    p.add_argument("--validate-only", action="store_true", help="score the validation episodes with the initial (or resumed) adapter; no training")
    p.add_argument("--stop-after-minutes", type=float, default=None, help="override train.trainer.stop_after_minutes (rerun to resume)")


def load_config(path: str | Path) -> tuple[dict, dict]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (expected 'model' and 'train')")
    return data.get("model") or {}, data.get("train") or {}


def _progress_callback(every: int):
    """Plain one-line progress reports (readable in a log file, unlike a progress bar)."""
    import time

    import lightning as L

    class LineProgress(L.Callback):
        def __init__(self):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0 or step == trainer.max_steps:
                m = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
                keys = ("loss", "nll_mem", "nll_ae", "nll_lm", "acc_mem_fact_object", "kl", "beta")
                parts = " ".join(f"{k}={m[k]:.3f}" for k in keys if k in m)
                elapsed = time.perf_counter() - self.t0
                print(f"step {step}/{trainer.max_steps} {elapsed / 60:.1f} min {parts}", flush=True)

        def on_validation_end(self, trainer, module):
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if m:
                print(f"validation at step {trainer.global_step}: " + " ".join(f"{k[4:]}={v:.3f}" for k, v in sorted(m.items())), flush=True)

    return LineProgress()


def _stop_after(minutes: float):
    """Stop this process's training after `minutes` of wall time (a lease or session budget); the run
    then saves `last.ckpt` and exports the adapter, and a later call resumes where it stopped."""
    import time

    import lightning as L

    class StopAfter(L.Callback):
        def on_train_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if time.perf_counter() - self.t0 > 60 * minutes and not trainer.should_stop:
                print(f"stopping after {minutes:g} min at step {trainer.global_step} (trainer.stop_after_minutes)", flush=True)
                trainer.should_stop = True

    return StopAfter()


def build_trainer(train_cfg: dict, output: Path, *, fast_dev_run: bool = False):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t = train_cfg["trainer"]
    callbacks = [_progress_callback(t["log_every_n_steps"])]
    if t.get("stop_after_minutes"):
        callbacks.append(_stop_after(float(t["stop_after_minutes"])))
    if not fast_dev_run:
        callbacks.append(
            ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, every_n_train_steps=t["checkpoint_every_n_steps"], save_top_k=0)
        )
    return L.Trainer(
        max_steps=t["max_steps"],
        accelerator=t["accelerator"],
        devices=t["devices"],
        strategy=t["strategy"],
        precision=t["precision"],
        val_check_interval=t["val_check_interval"],
        check_val_every_n_epoch=None,
        log_every_n_steps=t["log_every_n_steps"],
        gradient_clip_val=t["gradient_clip_val"],
        logger=CSVLogger(str(output), name="logs", flush_logs_every_n_steps=t["log_every_n_steps"]) if not fast_dev_run else False,
        enable_progress_bar=False,
        callbacks=callbacks,
        fast_dev_run=fast_dev_run,
        enable_checkpointing=not fast_dev_run,
        num_sanity_val_steps=0,
    )


def run(args: argparse.Namespace) -> int:
    from larimar.training.module import LarimarDataModule, LarimarLightning, export_adapter, merge, TRAIN_DEFAULTS

    model_cfg, train_cfg = load_config(args.config)
    train_cfg = merge(TRAIN_DEFAULTS, train_cfg)
    if args.max_steps is not None:
        train_cfg["trainer"]["max_steps"] = args.max_steps
    if args.output_dir is not None:
        train_cfg["output_dir"] = args.output_dir
    if getattr(args, "stop_after_minutes", None) is not None:
        train_cfg["trainer"]["stop_after_minutes"] = args.stop_after_minutes
    output = Path(train_cfg["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    module = LarimarLightning(model_cfg, train_cfg)
    last = output / "checkpoints" / "last.ckpt"
    ckpt = str(last) if last.is_file() and not args.no_resume and not args.fast_dev_run else None
    ws_cfg = train_cfg["warmstart"]
    if train_cfg.get("token_code") and not args.fast_dev_run:  # the token value code alone (decoder-free)
        module.configure_model()
        run_token_code(module.model, train_cfg, output)
        export_adapter(module, output / "adapter")
        print(f"adapter exported to {output / 'adapter'}")
        return 0
    if ws_cfg["steps"] > 0 and not args.fast_dev_run:
        module.configure_model()
        run_warmstart(module.model, train_cfg, output / "warmstart", resume=not args.no_resume)
    elif train_cfg.get("init_adapter"):
        module.configure_model()
        init_stage2(module, Path(train_cfg["init_adapter"]))
    if getattr(args, "validate_only", False):
        trainer = build_trainer(train_cfg, output, fast_dev_run=False)
        trainer.validate(module, datamodule=LarimarDataModule(train_cfg["data"]), ckpt_path=ckpt)
        return 0
    if train_cfg["trainer"]["max_steps"] > 0:
        data = LarimarDataModule(train_cfg["data"])
        trainer = build_trainer(train_cfg, output, fast_dev_run=args.fast_dev_run)
        if ckpt:
            print(f"resuming from {ckpt}")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        if args.fast_dev_run or trainer.global_rank != 0:
            return 0
        if trainer.global_step < trainer.max_steps:  # stopped early (stop_after_minutes): keep the state to resume
            trainer.save_checkpoint(output / "checkpoints" / "last.ckpt")
    module.configure_model()
    export_adapter(module, output / "adapter")
    print(f"adapter exported to {output / 'adapter'}")
    return 0


def load_initial_adapter(model, init: Path) -> Path:
    """Load an adapter (directory or .safetensors) into `model`; a 1-head output offset is expanded to
    the model's heads, and value-encoder blocks the file lacks keep their initial values (the base
    encoder's), so a model with a fresh value encoder starts out computing what the file's did.
    Returns the directory the adapter came from."""
    from safetensors.torch import load_file

    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.model import CONFIG_FILE, adapter_weights, without_token_code

    path = init / "adapter.safetensors" if init.is_dir() else init
    if init.is_dir() and (init / CONFIG_FILE).is_file():  # a saved model directory (its weights may be shared: weights_from)
        state = {k: v.float() for k, v in adapter_weights(init, LarimarConfig.load(init / CONFIG_FILE)).items()}
    else:
        state = {k: v.float() for k, v in load_file(str(path)).items()}
    if model.out_offset is not None:
        state = model.out_offset.expand_state(state, prefix="out_offset.")
    elif any(k.startswith("out_offset.") for k in state):  # e.g. a token-code model: its code replaces the offset
        state = {k: v for k, v in state.items() if not k.startswith("out_offset.")}
        print(f"{path}: its output offset is not used (this config has output_offset: false)")
    if model.token_code is None:  # a model storing latents alone reads a "both" adapter's latents alone
        state = without_token_code(state)
    for part in ("encoder.value_model.", "token_code."):  # parts the file lacks keep their initial values
        if not any(k.startswith(part) for k in state):
            state.update({k: v for k, v in model.adapter_state().items() if k.startswith(part)})
    model.load_adapter_state(state)
    print(f"initialised from {path}")
    return path.parent


def init_stage2(module, init: Path) -> None:
    """Stage 2 from a trained adapter (`train.init_adapter`), inheriting its scope detector."""
    directory = load_initial_adapter(module.model, init)
    _inherit_scope(module.model, directory, keep_latents=not module.trains("latents"))


def _inherit_scope(model, init_dir: Path, *, keep_latents: bool) -> None:
    """Carry the initial adapter's scope detector (threshold, lexical weight, IDF table) into `model`.

    They were calibrated on that adapter's latents, which stay exactly as they are when only the
    output offset trains (`keep_latents`); otherwise they are a starting point, to be recalibrated
    (`larimar scope`) before the result is used.
    """
    import json

    from larimar.modeling.config import LarimarConfig
    from larimar.modeling.model import CONFIG_FILE, adapter_scope_idf, load_scope_idf

    cfg_path = init_dir / CONFIG_FILE
    idf = adapter_scope_idf(init_dir, LarimarConfig.load(cfg_path)) if cfg_path.is_file() else load_scope_idf(init_dir)
    if cfg_path.is_file():
        init_cfg = json.loads(cfg_path.read_text())
        keep = {k: init_cfg[k] for k in ("scope_threshold", "scope_lexical_weight", "scope_lexical_text") if k in init_cfg}
        model.config = model.config.replace(**keep)
        model.configure_scope()
    if idf is not None:
        model.set_scope_idf(idf)
    if not keep_latents and (cfg_path.is_file() or idf is not None):
        print("warm start: the encoder head trains, so the inherited scope threshold is only a starting point: recalibrate it (larimar scope)")


TOKEN_CODE_KEYS = {
    "init_adapter", "fresh", "strings", "dates", "copy_prob", "val_strings", "calibration_items", "calibration_factors", "steps", "lr", "batch", "noise",
}


def run_token_code(model, train_cfg: dict, output: Path) -> None:
    """Train and calibrate the token value code (`larimar.training.token_code`) from `train.token_code`:
    init_adapter (its other weights and scope detector are kept; with `fresh: true` its token code is not,
    and the code starts from the decoder's embeddings), strings, dates (that many generic dates "D Month
    YYYY" among the training strings, `synthetic_dates`), copy_prob (the share of training prompts that
    hold some of their answer's tokens, `code_pairs`), val_strings, calibration_items,
    calibration_factors, steps, lr, batch, noise. Writes `output/token_code_history.json`."""
    import json
    import random

    from larimar.training.data import corpus_spans, question_items, synthetic_dates
    from larimar.training.token_code import calibrate_token_code, train_token_code

    tc, d = train_cfg["token_code"], train_cfg["data"]
    if model.token_code is None:
        raise ValueError("train.token_code needs model.value_code: tokens or both")
    unknown = sorted(set(tc) - TOKEN_CODE_KEYS)
    if unknown:
        raise ValueError(f"train.token_code: unknown keys {unknown} (expected some of {sorted(TOKEN_CODE_KEYS)})")
    if not d.get("question_templates"):
        raise ValueError("train.token_code calibrates on PARAREL questions: set data.question_templates")
    factors = tc.get("calibration_factors")  # checked before minutes of training are spent
    if factors is not None and (not isinstance(factors, list) or not factors or not all(isinstance(f, (int, float)) and f > 0 for f in factors)):
        raise ValueError(f"train.token_code.calibration_factors: expected a list of positive numbers, got {factors!r}")
    if tc.get("init_adapter"):
        fresh_code = {k: v.detach().clone() for k, v in model.adapter_state().items() if k.startswith("token_code.")}
        directory_in = load_initial_adapter(model, Path(tc["init_adapter"]))
        _inherit_scope(model, directory_in, keep_latents=True)
        if tc.get("fresh", False):  # the file's code (if any) is replaced by the model's initial one
            model.load_adapter_state({**model.adapter_state(), **fresh_code})
    strings = corpus_spans(d["text_root"], int(tc.get("strings", 60000)), d["seed"], exclude_eval_from=d.get("exclude_eval_from"))
    strings += [str(y) for y in range(1000, 2030)]
    random.Random(d["seed"]).shuffle(strings)
    n_val, n_cal = int(tc.get("val_strings", 1000)), int(tc.get("calibration_items", 300))
    val, cal, train = strings[:n_val], strings[n_val : n_val + n_cal], strings[n_val + n_cal :]
    train += synthetic_dates(int(tc.get("dates", 0)), seed=d["seed"])  # training only: val and calibration stay as before
    history = train_token_code(
        model, train, val_strings=val, steps=int(tc.get("steps", 400)), lr=float(tc.get("lr", 3e-3)),
        batch=int(tc.get("batch", 64)), noise=float(tc.get("noise", 0.3)), seed=d["seed"], copy_prob=float(tc.get("copy_prob", 0.0)),
    )
    items = question_items(d["pararel_root"], d["question_templates"], cal, seed=d["seed"], exclude_eval_from=d.get("exclude_eval_from"))
    calibration = calibrate_token_code(model, items, **({} if factors is None else {"factors": tuple(float(f) for f in factors)}))
    (output / "token_code_history.json").write_text(json.dumps({"history": history, "calibration": calibration}, indent=2) + "\n")


def run_warmstart(model, train_cfg: dict, directory: Path, *, resume: bool = True) -> None:
    """Stage 1 (decoder-free, `larimar.training.warmstart`); its result is saved to `directory` and reused."""
    import json

    import torch
    from safetensors.torch import load_file

    from larimar.training.data import EpisodeSampler, corpus_spans
    from larimar.training.warmstart import build_set, concat_sets, spelling_set, train_warmstart

    done = directory / "adapter.safetensors"
    if resume and done.is_file():
        print(f"warm start: reusing {done}")
        model.load_adapter_state(load_file(str(done)))
        return
    w, d = train_cfg["warmstart"], train_cfg["data"]
    if w.get("init_adapter"):
        directory_in = load_initial_adapter(model, Path(w["init_adapter"]))
        _inherit_scope(model, directory_in, keep_latents=not w["train_latents"])
    torch.manual_seed(d["seed"])
    pool = d.get("object_pool", "relation")
    # one sampler for cloze and question items: question templates change no cloze draw
    open_spans = d.get("open_text_spans", 0)  # word spans of the text corpus joining the open object pool
    sampler = EpisodeSampler(
        d["text_root"] if open_spans else None, d["pararel_root"], split="train", fact_fraction=1.0, seed=d["seed"],
        exclude_eval_from=d.get("exclude_eval_from"), question_templates=d.get("question_templates"), object_pool=pool,
        unknown_prob=d.get("unknown_object_prob", 0.0), open_text_spans=open_spans,
    )
    distractors = None
    if d.get("text_root") and w["distractor_sentence_prob"] > 0:
        distractors = EpisodeSampler(d["text_root"], None, split="train", fact_fraction=0.0, seed=d["seed"]).texts
    kw = dict(max_tokens=d["max_tokens"], distractor_sentences=distractors, distractor_prob=w["distractor_sentence_prob"])
    key = {  # what the cached states depend on (the distractor sentences through text_root)
        "items": w["items"], "val_items": w["val_items"], "seed": d["seed"],
        **{k: d.get(k) for k in ("pararel_root", "text_root", "exclude_eval_from")},
        **({"object_pool": pool} if pool != "relation" else {}),  # (absent from older caches' keys)
        **({"unknown_object_prob": d["unknown_object_prob"]} if d.get("unknown_object_prob") else {}),
        **({"open_text_spans": open_spans} if open_spans else {}),
        **{k: v for k, v in kw.items() if k != "distractor_sentences"},
    }

    def cached(name: str, key: dict, build) -> tuple:
        """(train, val) sets from `directory/name` if its key matches (and it holds value embeddings
        where the config needs them), else `build()`'s (train, val), saved there atomically."""
        path = directory / name
        sets = torch.load(path, weights_only=False) if resume and path.is_file() else None
        if sets is not None and model.config.value_writes and any(sets[s].emb_value is None for s in ("train", "val")):
            print(f"warm start: {path} lacks value embeddings (older cache); rebuilding")
            sets = None
        if sets is not None and sets.get("key") == key:
            print(f"warm start: reusing cached decoder states {path}")
        else:
            train, val = build()
            sets = {"key": key, "train": train, "val": val}
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(sets, tmp)
            tmp.replace(path)
        return sets["train"], sets["val"]

    def cached_sets(name: str, key: dict, n_train: int, n_val: int, seed: int, **build_kw) -> tuple:
        """Decoder-state sets of fact items (train: `seed`, val: `seed + 1`), through `cached`."""
        return cached(name, key, lambda: (
            build_set(model, sampler, n_train, seed=seed, **build_kw, **kw),
            build_set(model, sampler, n_val, seed=seed + 1, **build_kw, **kw),
        ))

    # the cached decoder states (the costly part), kept for reruns
    train_set, val_set = cached_sets("sets.pt", key, w["items"], w["val_items"], d["seed"])
    extra_val = {}
    if w.get("question_items", 0) > 0:
        if not d.get("question_templates"):
            raise ValueError("warmstart.question_items > 0 needs data.question_templates")
        q_key = {**key, "question_items": w["question_items"], "question_val_items": w["question_val_items"], "question_templates": d["question_templates"]}
        # fresh draws for validation (other seed); objects are random, so there is nothing to memorise
        q_train, q_val = cached_sets(
            "sets_questions.pt", q_key, w["question_items"], w["question_val_items"], d["seed"] + 2, question_prob=1.0
        )
        train_set = concat_sets([train_set, q_train])
        extra_val["question"] = q_val
    spelling = None
    if w.get("spelling_items", 0) > 0:  # stage 1c: first tokens of many text spans, on borrowed decoder states
        if not d.get("text_root"):
            raise ValueError("warmstart.spelling_items > 0 needs data.text_root")
        n_sp, n_sv = w["spelling_items"], w["spelling_val_items"]
        sp_key = {**key, "spelling_items": n_sp, "spelling_val_items": n_sv, "question_items": w.get("question_items", 0)}

        def build_spelling() -> tuple:
            objects = corpus_spans(d["text_root"], n_sp + n_sv, d["seed"] + 5, exclude_eval_from=d.get("exclude_eval_from"))
            if len(objects) < n_sp + n_sv:
                raise ValueError(f"warmstart.spelling_items: the corpus gave {len(objects)} spans, fewer than {n_sp + n_sv}")
            return (
                spelling_set(model, train_set, objects[n_sv:], seed=d["seed"]),
                spelling_set(model, val_set, objects[:n_sv], seed=d["seed"] + 1),
            )

        spelling, extra_val["spelling"] = cached("sets_spelling.pt", sp_key, build_spelling)
    history = train_warmstart(
        model,
        train_set,
        steps=w["steps"],
        lr=w["lr"],
        items_per_step=w["items_per_step"],
        rephrase_prob=w["rephrase_prob"],
        distractor_prob=w["distractor_prob"],
        context_weight=w["context_weight"],
        keyed_prob=w["keyed_prob"],
        large_episode_prob=w["large_episode_prob"],
        large_query_items=w["large_query_items"],
        val=val_set,
        extra_val=extra_val,
        spelling=spelling,
        spelling_per_step=w["spelling_per_step"],
        train_latents=w["train_latents"],
        seed=d["seed"],
        log_every=w["log_every"],
    )
    model.save_pretrained(directory)
    (directory / "history.json").write_text(json.dumps(history, indent=1))
    print(f"warm start saved to {directory}")
