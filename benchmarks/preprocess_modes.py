"""Training throughput and worker memory with the frozen encoders inline, streamed or cached.

    python benchmarks/preprocess_modes.py [--steps 12] [--warmup 3] [--workers 1] [--batch-size 2]

The model is FLUX-architecture with encoders big enough to matter on a CPU: an 8-layer T5 (d_model
768), a 3-level VAE, and a 2 + 4 block DiT; 64 x 64 images, 64 text tokens, LoRA r16.
For each `data.preprocess` mode the same model trains for `--steps` steps through `raydiff train`
(`launch_training_task`: Ray Train, the mode's Ray Data pipeline, raydiff's per-worker loop); the
worker's memory and the models it loaded come from the run's own log (`peak_memory_gib` per step,
`workers` in trainer_state.json). Cache mode's one-off encoding (`raydiff preprocess`) is timed
separately.

Prints one JSON object: per mode steady-state steps/s (after `--warmup` steps), the worker's peak
RSS and its RSS once the module is built, the components it loaded, the first step's loss (equal
across modes) and the load average (other work on the box slows every number).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import measure  # noqa: E402

# Encoders sized so that encoding is most of an inline step (as with big text encoders and small DiT
# steps): cache mode can then gain at most 1 / (1 - encode share).
T5_WIDTH, TEXT_TOKENS = 768, 64


def write_model(path: str, seed: int = 0) -> str:
    """The tiny FLUX pipeline with bigger encoders and DiT (random weights), written once."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from raydiff.pipelines.flux import FluxImagePipeline

    if os.path.exists(os.path.join(path, "text_encoder_2", "config.json")) and \
            json.load(open(os.path.join(path, "text_encoder_2", "config.json")))["d_model"] == T5_WIDTH:
        return path
    FluxImagePipeline.write_tiny(path, seed=seed)
    torch.manual_seed(seed)
    T5EncoderModel(T5Config(d_model=T5_WIDTH, d_kv=64, d_ff=4 * T5_WIDTH, num_layers=8, num_heads=T5_WIDTH // 64,
                            vocab_size=256,
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
                           num_attention_heads=4, joint_attention_dim=T5_WIDTH, pooled_projection_dim=256,
                           axes_dims_rope=[16, 24, 24], guidance_embeds=True).save_pretrained(
        os.path.join(path, "transformer"))
    return path


def run_mode(mode: str, args, work: str, model: str, data_dir: str) -> dict:
    """`raydiff train` (launch_training_task) in one data.preprocess mode, instrumented per batch."""
    from raydiff.config import parse_config
    from raydiff.launch.trainer import launch_training_task

    raw = fixtures.bench_config(model, data_dir, os.path.join(work, "runs"), f"modes-{mode}-{int(time.time())}",
                              tokens=256, steps=args.steps, workers=args.workers, batch_size=args.batch_size,
                              repeat=4)
    raw["data"].update({"preprocess": mode, "cache_dir": os.path.join(work, "cache"), "encoder_num_cpus": 0.5,
                        "encoder_batch_size": 8})
    raw["model"]["max_sequence_length"] = TEXT_TOKENS
    raw["ray"]["cpus_per_worker"] = 1
    cfg = parse_config(raw)
    result = {"mode": mode}
    if mode == "cache":  # the one-off encoding, timed apart from training
        from raydiff.data.cache import preprocess

        shutil.rmtree(cfg.data.cache_dir, ignore_errors=True)
        start = time.perf_counter()
        preprocess(cfg)
        result["preprocess_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    launch_training_task(cfg)
    wall = time.perf_counter() - start
    state = measure.latest_trainer_state(cfg.ray.storage_path, cfg.ray.name)
    history, worker = state["log_history"], state["workers"][0]
    step_s = measure.step_seconds_from_history(history, batch_size=args.batch_size, world=args.workers)
    result.update({
        "steps_per_s": round(measure.steady_steps_per_second(step_s, args.warmup), 3),
        "first_step_s": round(step_s[0], 2), "fit_wall_s": round(wall, 1),
        "worker_peak_rss_mib": round(max(h["peak_memory_gib"] for h in history if "peak_memory_gib" in h) * 1024, 1),
        "worker_model_rss_mib": round(worker["rss_gib"] * 1024, 1), "worker_loaded": worker["models"],
        "first_loss": round(history[0]["loss"], 6), "loadavg": measure.loadavg()})
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
    work = fixtures.workdir("preprocess_modes", args.workdir)
    model = write_model(os.path.join(work, "model"))
    data_dir = os.path.join(work, "data")
    fixtures.write_images(data_dir, n=16, side=64)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    runs = [run_mode(mode, args, work, model, data_dir) for mode in args.modes]
    speed = {r["mode"]: r["steps_per_s"] for r in runs}
    ratios = {f"{mode}_over_inline": round(speed[mode] / speed["inline"], 2)
              for mode in ("stream", "cache") if mode in speed and "inline" in speed}
    measure.emit({"benchmark": "preprocess_modes",
                 "model": f"FLUX arch: T5 8x{T5_WIDTH}, CLIP 4x256, VAE (32,64,128), DiT 2+4 blocks 4x64; 64x64 px, "
                          f"{TEXT_TOKENS} text tokens",
                 "steps": args.steps, "warmup": args.warmup, "workers": args.workers, "batch_size": args.batch_size,
                 "runs": runs, "speedup": ratios, "machine": measure.machine()})


if __name__ == "__main__":
    main()
