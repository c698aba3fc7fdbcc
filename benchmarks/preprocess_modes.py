"""Training throughput and worker memory with the frozen encoders inline, streamed or cached.

    python benchmarks/preprocess_modes.py [--steps 12] [--warmup 3] [--workers 1] [--batch-size 2]

The model is FLUX-architecture with encoders big enough to matter on a CPU: a 6-layer T5 (d_model
512, ~25M params), a 3-level VAE, and a 2 + 4 block DiT; 64 x 64 images, 32 text tokens, LoRA r16.
For each `data.preprocess` mode the same model trains for `--steps` steps under Ray Train with the
dataset `build_train_data` returns, in a worker loop that mirrors raydiff's (the module
`PipelineTrainingModule(cfg, components=training_components(cfg))`, collate, per-step generator
seeds, AdamW). Cache mode's one-off encoding (`preprocess`) is timed separately.

Prints one JSON object: per mode steady-state steps/s (after `--warmup` steps), the worker's peak
RSS and its RSS once the module is built, the first step's loss (equal across modes) and the load
average (other work on the box slows every number).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

MIB = 2**20


def write_model(path: str, seed: int = 0) -> str:
    """The tiny FLUX pipeline with bigger encoders and DiT (random weights), written once."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from raydiff.pipelines.flux import FluxImagePipeline

    if os.path.exists(os.path.join(path, "text_encoder_2", "config.json")) and \
            json.load(open(os.path.join(path, "text_encoder_2", "config.json")))["d_model"] == 512:
        return path
    FluxImagePipeline.write_tiny(path, seed=seed)
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, vocab_size=256,
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
                            eos_token_id=1)).save_pretrained(os.path.join(path, "text_encoder_2"))
    CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                                 vocab_size=1000, projection_dim=256, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                 max_position_embeddings=77)).save_pretrained(os.path.join(path, "text_encoder"))
    AutoencoderKL(block_out_channels=(32, 64, 128), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                  sample_size=64).save_pretrained(os.path.join(path, "vae"))
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
                           num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=256,
                           axes_dims_rope=[16, 24, 24], guidance_embeds=True).save_pretrained(
        os.path.join(path, "transformer"))
    return path


class Worker:
    """The per-worker loop (raydiff's step without checkpoints): reports steps/s and memory."""

    def __call__(self, config: dict) -> None:
        import math
        import resource

        import ray.train
        import ray.train.torch
        import torch

        from raydiff.config import parse_config
        from raydiff.console import quiet_libraries
        from raydiff.data.collate import collate
        from raydiff.training.loop import build_optimizer, step_seed
        from raydiff.training.module import PipelineTrainingModule

        quiet_libraries()
        cfg = parse_config(config["config"])
        steps, rank = cfg.train.max_steps, ray.train.get_context().get_world_rank()
        torch.manual_seed(cfg.train.seed)
        module = PipelineTrainingModule(cfg, components=config["components"])
        model_rss = common.current_rss_bytes()
        loaded = {n: getattr(module.pipe.pipe, n) is not None for n in ("transformer", "vae", "text_encoder_2")}
        model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": False})
        params = module.trainable_parameters()
        optimizer, scheduler = build_optimizer(cfg, params, steps)
        shard = ray.train.get_dataset_shard("train")
        times, losses, start = [], [], time.perf_counter()
        batch_size = 1 if config["packed"] else cfg.train.batch_size
        for step, batch in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                                        drop_last=True, prefetch_batches=2)):
            if step >= steps:
                continue  # drain the split
            inputs = collate(batch, "cpu", cfg.data.data_file_keys)
            generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 0, rank, 1))
            loss = model(inputs, generator=generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or math.inf)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            now = time.perf_counter()
            times.append(now - start)
            start = now
        if rank == 0:
            with open(config["out"], "w") as f:
                json.dump({"step_s": times, "losses": losses, "model_rss": model_rss, "loaded": loaded,
                           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)


def run_mode(mode: str, args, work: str, model: str, data_dir: str) -> dict:
    import ray
    import ray.train
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydiff.config import parse_config, to_dict
    from raydiff.data.dataset import read_rows
    from raydiff.data.encode import training_components
    from raydiff.data.preprocess import build_train_data, preprocess

    raw = common.bench_config(model, data_dir, os.path.join(work, "runs"), f"modes-{mode}", tokens=256,
                              steps=args.steps, workers=args.workers, batch_size=args.batch_size, repeat=4)
    raw["data"].update({"preprocess": mode, "cache_dir": os.path.join(work, "cache"), "encoder_num_cpus": 0.5,
                        "encoder_batch_size": 8})
    raw["model"]["max_sequence_length"] = 32
    raw["ray"]["cpus_per_worker"] = 1
    cfg = parse_config(raw)
    rows, _ = read_rows(cfg.data)
    result = {"mode": mode}
    if mode == "cache":
        shutil.rmtree(cfg.data.cache_dir, ignore_errors=True)
        start = time.perf_counter()
        preprocess(cfg, rows)
        result["preprocess_s"] = round(time.perf_counter() - start, 2)
    data = build_train_data(cfg, rows, seed=cfg.train.seed)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    out = os.path.join(work, f"{mode}.json")
    start = time.perf_counter()
    TorchTrainer(Worker(), train_loop_config={"config": to_dict(cfg), "components": training_components(cfg),
                                              "packed": data.packed, "out": out},
                 scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"modes-{mode}-{int(time.time())}", storage_path=os.path.join(work, "runs")),
                 datasets={"train": data.dataset},
                 dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest)).fit()
    wall = time.perf_counter() - start
    with open(out) as f:
        w = json.load(f)
    result.update({
        "steps_per_s": round(common.steady_steps_per_second(w["step_s"], args.warmup), 3),
        "first_step_s": round(w["step_s"][0], 2), "fit_wall_s": round(wall, 1),
        "worker_peak_rss_mib": round(w["peak_rss"] / MIB, 1), "worker_model_rss_mib": round(w["model_rss"] / MIB, 1),
        "worker_loaded": w["loaded"], "first_loss": round(w["losses"][0], 6), "loadavg": common.loadavg()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["inline", "stream", "cache"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import ray

    from raydiff.console import quiet_libraries

    quiet_libraries()
    work = common.workdir("preprocess_modes", args.workdir)
    model = write_model(os.path.join(work, "model"))
    data_dir = os.path.join(work, "data")
    common.write_images(data_dir, n=16, side=64)
    common.ship_with_ray()  # workers do not have benchmarks/ on their path (__main__ ships by value)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    runs = [run_mode(mode, args, work, model, data_dir) for mode in args.modes]
    common.emit({"benchmark": "preprocess_modes",
                 "model": "FLUX arch: T5 6x512 (~25M), CLIP 4x256, VAE (32,64,128), DiT 2+4 blocks 4x64; 64x64 px",
                 "steps": args.steps, "warmup": args.warmup, "workers": args.workers, "batch_size": args.batch_size,
                 "runs": runs, "machine": common.machine()})


if __name__ == "__main__":
    main()
