"""What the driver checks before Ray starts, and the run lock, without a Ray cluster of their own."""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raydiff.config import ConfigError, parse_config
from raydiff.data.metadata import read_rows
from raydiff.data.shapes import write_shapes_dataset
from raydiff.launch.checks import (
    check_batch_sizes,
    check_devices,
    check_lora,
    check_model,
    check_resources,
    shortfall,
    warn_job_local_storage,
)
from raydiff.launch.cluster import autoscaling_in_status
from raydiff.launch.run_lock import LOCK_FILE, STALE_S, RunLock, RunLockedError
from raydiff.launch.runs import describe_plan, step_limit
from raydiff.launch.storage import ResumePoint, config_changes
from raydiff.training.loop_args import LoopArgs


def config(**sections):
    raw = {"model": {"path": "m"}, "data": {"metadata_path": "d.csv"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return parse_config(raw)


# --- model ----------------------------------------------------------------------------------------

def test_a_model_directory_must_hold_the_configured_family(tiny_model, tmp_path):
    check_model(config(model={"path": tiny_model("flux"), "family": "flux"}))
    with pytest.raises(ConfigError, match=r"model.family is 'sd3' \(a StableDiffusion3Pipeline\), but .* holds a "
                                          r"FluxPipeline; set model.family: flux"):
        check_model(config(model={"path": tiny_model("flux"), "family": "sd3"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        check_model(config(model={"path": str(tmp_path / "empty")}))


def test_a_missing_model_path_is_named_with_the_closest_directory(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny-flux").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model.path models/tiny-flxu: no such directory \(did you mean "
                                          r"models/tiny-flux\?\)"):
        check_model(config(model={"path": "models/tiny-flxu"}))


def test_an_uncached_hub_id_is_refused_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="neither a local directory nor, with HF_HUB_OFFLINE=1, in the Hugging"):
        check_model(config(model={"path": "black-forest-labs/FLUX.1-dev"}))


def test_the_registry_names_each_builtin_familys_pipeline_class_and_data_keys():
    from raydiff.registry import BUILTIN_DATA_KEYS, BUILTIN_FAMILIES, get_pipeline_class, pipeline_class_names

    assert set(BUILTIN_DATA_KEYS) == set(BUILTIN_FAMILIES)
    for family in BUILTIN_FAMILIES:
        cls = get_pipeline_class(family)
        assert cls.diffusers_class.__name__ in pipeline_class_names(family)
        assert cls.data_keys == BUILTIN_DATA_KEYS[family], family  # the torch-free copy the config checks


# --- lora -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_lora(tiny_model, tmp_path_factory):
    """A rank-4 LoRA checkpoint of the tiny FLUX model (default targets, random B)."""

    from raydiff.training import lora as lora_lib
    from raydiff.training.module import PipelineTrainingModule

    cfg = parse_config({"model": {"path": tiny_model("flux")}, "data": {"metadata_path": "d.csv"},
                        "lora": {"rank": 4}})
    module = PipelineTrainingModule(cfg)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    directory = tmp_path_factory.mktemp("flux-lora")
    lora_lib.save_lora(str(directory), module.trainable_state_dict(), module.lora_config)
    return directory


def flux_lora_config(tiny_model, **lora):
    return config(model={"path": tiny_model("flux")}, lora=lora)


def test_lora_init_from_mistakes_are_refused_before_ray_starts(tiny_model, flux_lora, tmp_path):
    import torch
    from safetensors.torch import save_file

    def check(**lora):
        check_lora(flux_lora_config(tiny_model, **lora))

    with pytest.raises(ConfigError, match=r"lora.init_from .*/nope.safetensors: no such file or checkpoint"):
        check(init_from=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="lora.init_from: .* adapter rank 4 does not match lora.rank 8"):
        check(init_from=str(flux_lora), rank=8)
    with pytest.raises(ConfigError, match="holds a lora adapter, but lora.type is loha"):
        check(init_from=str(flux_lora), rank=4, type="loha")
    with pytest.raises(ConfigError, match="lora.init_from: .* missing 2 adapter keys, e.g. .*add_q_proj"):
        check(init_from=str(flux_lora), rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(ConfigError, match="lora.init_from: .*text.safetensors is not a safetensors file"):
        check(init_from=str(tmp_path / "text.safetensors"))
    save_file({"text_model.encoder.layers.0.q_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="lora.init_from: not a LoRA in any of"):
        check(init_from=str(tmp_path / "other.safetensors"))
    save_file({"blocks.0.attn.c_to_qkv.lora_A.default.weight": torch.zeros(4, 32),
               "blocks.0.attn.c_to_qkv.lora_B.default.weight": torch.zeros(96, 4)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"2 keys match no adapted module, e.g. \['blocks.0.attn.c_to_qkv"):
        check(init_from=str(tmp_path / "bad.safetensors"), rank=4)
    check(init_from=str(flux_lora), rank=4, alpha=8)  # another alpha is fine: rescaled


def test_a_diffsynth_flux_training_file_is_accepted_by_converting_it(tiny_model, flux_lora, tmp_path):
    """DiffSynth-Studio's raw FLUX output (`blocks.0.attn.a_to_qkv.lora_A.default.weight`: its DiT's fused
    modules, peft's `.default`, alpha = rank) converts: the fused qkv splits into diffusers' to_q, to_k, to_v."""
    import torch
    from safetensors.torch import load_file, save_file

    from raydiff.training.lora_formats import export_lora, import_lora

    kohya = load_file(export_lora(str(flux_lora), "kohya", str(tmp_path / "k.safetensors"), family="flux"))
    # DiffSynth's own FluxLoRAConverter.align_to_diffsynth_format (diffsynth/utils/lora/flux.py), for block 0:
    renames = {"lora_unet_double_blocks_0_img_attn_qkv": "blocks.0.attn.a_to_qkv",
               "lora_unet_double_blocks_0_img_attn_proj": "blocks.0.attn.a_to_out",
               "lora_unet_single_blocks_0_linear1": "single_blocks.0.to_qkv_mlp"}
    raw = {f"{renames[k.split('.')[0]]}.lora_{'A' if 'down' in k else 'B'}.default.weight": v
           for k, v in kohya.items() if not k.endswith(".alpha")}
    path = str(tmp_path / "diffsynth_raw.safetensors")
    save_file(raw, path)
    check_lora(flux_lora_config(tiny_model, rank=4, init_from=path))
    ours, _ = import_lora(str(flux_lora), family="flux")
    theirs, info = import_lora(path, family="flux")
    assert info == {"type": "lora", "r": 4, "lora_alpha": 4} and set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())  # alpha = rank: nothing was folded


def test_short_target_names_that_reach_outside_the_blocks_are_refused(tiny_model):
    with pytest.raises(ConfigError, match=r"lora.target_modules: 'proj_out' matches 1 layers in the transformer "
                                          r"blocks and also proj_out outside them"):
        check_lora(flux_lora_config(tiny_model, target_modules=["to_q", "proj_out"]))
    check_lora(flux_lora_config(tiny_model, target_modules=["single_transformer_blocks.*.proj_out"]))
    check_lora(flux_lora_config(tiny_model))  # neither key set: nothing to check


# --- batch sizes -----------------------------------------------------------------------------------

def test_batches_of_mixed_sizes_are_refused_naming_the_fixes(tmp_path):
    meta = write_shapes_dataset(str(tmp_path), n=6, size=[(32, 32), (64, 32)])
    cfg = config(data={"base_path": str(tmp_path), "metadata_path": meta}, train={"batch_size": 4})
    with pytest.raises(ConfigError, match=r"train.batch_size 4 needs samples of one size.*2 sizes.*"
                                          r"data.buckets: true.*data.height and data.width"):
        check_batch_sizes(cfg, read_rows(cfg.data)[0])
    for fix in ({"buckets": True}, {"height": 32, "width": 32}):
        ok = config(data={"base_path": str(tmp_path), "metadata_path": meta, **fix}, train={"batch_size": 4})
        check_batch_sizes(ok, read_rows(ok.data)[0])
    same = write_shapes_dataset(str(tmp_path / "same"), n=4, size=(48, 48))
    ok = config(data={"base_path": str(tmp_path / "same"), "metadata_path": same}, train={"batch_size": 4})
    check_batch_sizes(ok, read_rows(ok.data)[0])


def test_gpu_only_quantization_is_refused_without_a_cuda_gpu(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    no_cuda, cuda = (lambda: False), (lambda: True)
    check_devices(config(model={"quantize": "int8"}), cuda_available=no_cuda)  # int8 runs on CPUs
    for mode in ("fp8", "nf4"):
        with pytest.raises(ConfigError, match=f"model.quantize {mode} runs on CUDA GPUs only: set ray.use_gpu"):
            check_devices(config(model={"quantize": mode}), cuda_available=cuda)
        gpu = config(model={"quantize": mode}, ray={"use_gpu": True})
        with pytest.raises(ConfigError, match="this machine .* has no CUDA GPU; use model.quantize: int8"):
            check_devices(gpu, cuda_available=no_cuda)
        check_devices(gpu, cuda_available=cuda)
        check_devices(config(model={"quantize": mode}, ray={"use_gpu": True, "address": "ray://head:10001"}),
                      cuda_available=no_cuda)  # a cluster's workers have their own GPUs
    cached = config(model={"quantize": "nf4", "quantize_text_encoders": True}, ray={"use_gpu": True},
                    data={"preprocess": "cache", "cache_dir": "c"})
    with pytest.raises(ConfigError, match="cache encoders need data.encoder_num_gpus > 0"):
        check_devices(cached, cuda_available=cuda)


def test_a_missing_library_is_named_with_its_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ConfigError, match="optimizer prodigy needs the prodigyopt package: pip install prodigyopt"):
        check_devices(config(train={"optimizer": "prodigy", "learning_rate": 1.0}))
    check_devices(config(train={"optimizer": "adamw8bit"}))


def test_a_mixed_batch_that_gets_through_names_the_same_fixes():
    import numpy as np

    from raydiff.data.collate import collate

    batch = {"prompt": np.array(["a", "b"], dtype=object), "image": np.empty(2, dtype=object)}
    batch["image"][:] = [np.zeros((32, 32, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)]
    with pytest.raises(ValueError, match="set data.buckets: true, or a fixed data.height and data.width"):
        collate(batch, "cpu")


# --- resources -------------------------------------------------------------------------------------

def test_an_impossible_request_is_refused_naming_the_keys_and_the_cluster():
    cfg = config(ray={"num_workers": 8})
    problem = shortfall(cfg, [{"CPU": 4.0}])
    assert "ray.num_workers 8 x (ray.cpus_per_worker 1)" in problem and "needs 8.5 CPUs" in problem
    assert "the cluster has 4 CPUs and 0 GPUs on 1 node(s)" in problem
    with pytest.raises(ConfigError, match="ray.num_workers 8"):
        check_resources(cfg, autoscaling=False, nodes=lambda: [{"CPU": 4.0}])
    gpus = config(ray={"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1})
    split = [{"CPU": 8.0, "GPU": 1.5}, {"CPU": 8.0, "GPU": 0.5}]  # 2 GPUs in all, but 1 whole one per node
    assert "only 1 workers fit on single nodes" in shortfall(gpus, split)
    assert shortfall(gpus, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]) is None


def test_an_autoscaling_cluster_is_waited_for_then_given_up_on(capsys):
    cfg = config(ray={"num_workers": 2, "startup_timeout": 0.3})
    grown = iter([[{"CPU": 1.0}], [{"CPU": 1.0}], [{"CPU": 1.0}, {"CPU": 4.0}]])
    check_resources(cfg, autoscaling=True, nodes=lambda: next(grown), poll_s=0.01)  # the third look fits
    assert "waiting for the autoscaler" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="gave up after ray.startup_timeout 0.3 s"):
        check_resources(cfg, autoscaling=True, nodes=lambda: [{"CPU": 1.0}], poll_s=0.01)


def test_the_autoscaler_status_tells_a_fixed_cluster_from_a_growing_one():
    readonly = {"autoscaler_report": {"node_type_mapping": {"abc": "node_abc"}, "pending_launches": {}}}
    launcher = {"autoscaler_report": {"node_type_mapping": {"abc": "ray.head.default"}, "pending_launches": {}}}
    assert not autoscaling_in_status(readonly) and not autoscaling_in_status({})
    assert autoscaling_in_status(launcher)


# --- the run lock ----------------------------------------------------------------------------------

def lock_at(tmp_path, name="run") -> RunLock:
    return RunLock(pafs.LocalFileSystem(), str(tmp_path / name / LOCK_FILE), f"{tmp_path}/{name}")


def test_a_second_run_of_the_same_name_is_refused_naming_the_first(tmp_path):
    first = lock_at(tmp_path)
    first.acquire()
    with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on host "
                                             rf"{socket.gethostname()}, started \d{{4}}-"):
        lock_at(tmp_path).acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with lock_at(tmp_path):  # free again once released
        pass


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    path = tmp_path / "run" / LOCK_FILE
    path.parent.mkdir()
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "started": time.time(), "heartbeat": time.time(),
            "token": "x"}
    path.write_text(json.dumps(dead))
    with lock_at(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().out
    silent = {**dead, "host": "elsewhere", "pid": 1, "heartbeat": time.time() - STALE_S - 1}
    path.write_text(json.dumps(silent))
    with lock_at(tmp_path):
        pass
    alive = {**silent, "heartbeat": time.time()}
    path.write_text(json.dumps(alive))
    with pytest.raises(RunLockedError, match="host elsewhere"):
        lock_at(tmp_path).acquire()


def test_two_lockers_racing_leave_exactly_one_holder(tmp_path):
    wins, errors = [], []

    def take():
        lock = lock_at(tmp_path)
        try:
            lock.acquire()
            wins.append(lock)
        except RunLockedError as err:
            errors.append(err)

    threads = [threading.Thread(target=take) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and len(errors) == 3
    wins[0].release()


# --- what the driver says --------------------------------------------------------------------------

def args(per_epoch: int, total: int) -> LoopArgs:
    return LoopArgs(config={}, steps_per_epoch=per_epoch, total_steps=total)


def test_the_plan_says_which_limit_ends_the_run():
    assert step_limit(config(train={"num_epochs": 2}), args(4, 8)) == "train.num_epochs 2 x 4 steps per epoch"
    assert step_limit(config(train={"num_epochs": 2, "max_steps": 3}), args(4, 3)) == \
        "train.max_steps 3; train.num_epochs 2 x 4 steps per epoch would be 8"
    assert step_limit(config(train={"num_epochs": 2, "max_steps": 30}), args(4, 8)) == \
        "train.num_epochs 2 x 4 steps per epoch; train.max_steps 30 is not reached"


def test_a_resumed_run_says_what_changed_and_a_finished_one_that_nothing_is_left():
    old = config(train={"learning_rate": 1e-3}, ray={"num_workers": 2, "name": "r"})
    new = config(train={"learning_rate": 5e-4}, ray={"num_workers": 1, "name": "r"})
    assert config_changes(old.model_dump(mode="json"), new.model_dump(mode="json")) == [
        "ray.num_workers: 2 -> 1", "train.learning_rate: 0.001 -> 0.0005"]
    at4 = ResumePoint("/x/r/checkpoint-000004", 4, 1, old.model_dump(mode="json"))
    text = describe_plan(new, args(4, 8), at4)
    assert "continuing from checkpoint-000004 (step 4); changed since then: ray.num_workers: 2 -> 1" in text
    done = describe_plan(new, args(4, 4), at4)
    assert "nothing to train: checkpoint-000004 is at step 4" in done and "raise train.max_steps" in done


def test_a_storage_path_inside_a_ray_jobs_working_directory_is_warned_about(tmp_path, capsys):
    job = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    inside = config(ray={"storage_path": str(job / "runs")})
    assert "Ray deletes with the cluster session" in warn_job_local_storage(inside, cwd=str(job))
    assert warn_job_local_storage(config(ray={"storage_path": "s3://b/runs"}), cwd=str(job)) is None
    assert warn_job_local_storage(inside, cwd=str(tmp_path)) is None
    assert Path(tmp_path).exists()


WORKER_SETTINGS = {  # what a worker's config uses -> the optional libraries it must still import
    "plain": ({}, []),
    "adamw8bit": ({"train": {"optimizer": "adamw8bit"}}, ["bitsandbytes"]),
    "int8": ({"model": {"quantize": "int8"}}, ["torchao"]),
    "prequantized": ({"prequantized": True}, ["bitsandbytes", "torchao"]),
}
# The controller's and the workers' imports, each in a fresh Python process, as Ray starts them.
DRIVER_MODULES = ("raydiff.launch.entry", "raydiff.launch.process_group", "raydiff.training.loop_args",
                  "raydiff.data.decode", "raydiff.data.encode", "raydiff.data.cache_io", "raydiff.launch.cli",
                  "raydiff.launch.trainer", "raydiff.launch.tune")


def worker_import_code(settings: dict, directory: Path) -> str:
    """A worker's start: hide the optional libraries its config leaves unused, then import peft (and with it
    transformers), which imports bitsandbytes and torchao when they are visible."""
    (directory / "transformer").mkdir(parents=True)
    quantized = {"quantization_config": {"quant_method": "bitsandbytes"}} if settings.get("prequantized") else {}
    (directory / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel",
                                                                        **quantized}))
    raw = {"model": {"path": str(directory), **settings.get("model", {})}, "data": {"metadata_path": "d.csv"},
           "train": settings.get("train", {})}
    return (f"import json, sys; from raydiff.config import parse_config; "
            f"from raydiff.config.libraries import hide_unused_libraries; "
            f"hidden = hide_unused_libraries(parse_config({raw!r})); import peft; "
            f"print(json.dumps([hidden, [m for m in ('bitsandbytes', 'torchao') if sys.modules.get(m)]]))")


@pytest.fixture(scope="module")
def fresh_imports(start_command, tmp_path_factory):
    """name -> the import check's command, all started together (each spends seconds importing on one core)."""
    import sys

    codes = {
        "no model library": "import sys, raydiff.launch.cli, raydiff.launch.trainer; "
                            "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))",
        # build_parser: every command (a config typo's `raydiff: error:` too) builds the whole parser first.
        "no torch": f"import sys, {', '.join(DRIVER_MODULES)}; raydiff.launch.cli.build_parser(); "
                    "print('torch' in sys.modules)",
        **{name: worker_import_code(settings, tmp_path_factory.mktemp(name))
           for name, (settings, _) in WORKER_SETTINGS.items()},
        # A Ray worker process reused for an encoder actor after a task that imported diffusers.
        "reused worker": "import diffusers; " + worker_import_code({}, tmp_path_factory.mktemp("reused")).replace(
            "import peft;", "import peft; from diffusers import FluxPipeline;"),
    }
    return {name: start_command([sys.executable, "-c", code]) for name, code in codes.items()}


def fresh_import_output(fresh_imports, name: str) -> str:
    proc = fresh_imports[name].result(timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_the_driver_and_ray_trains_controller_import_no_model_library(fresh_imports):
    """`raydiff train`'s driver, and Ray Train's controller (which imports raydiff.launch.trainer to unpickle
    the worker function), never import diffusers, transformers or peft: each would add a second or more before
    the first step of every run (docs/performance.md). The workers import them."""
    assert fresh_import_output(fresh_imports, "no model library") == "[]"


def test_the_driver_and_what_ray_trains_controller_unpickles_import_no_torch(fresh_imports):
    """Ray Train's controller, its DatasetManager and Ray Data's SplitCoordinator are new processes in every run,
    on the critical path before the workers start; each imports the modules of what it unpickles: the worker
    function, the process-group config, the loop's arguments and the dataset's stages (DRIVER_MODULES). The
    driver (`raydiff train`, a Tune trial's driver) imports the launch modules before it starts Ray. torch would
    cost each 1.5 s (docs/performance.md section 1)."""
    assert fresh_import_output(fresh_imports, "no torch") == "False"


@pytest.mark.parametrize("name", WORKER_SETTINGS)
def test_a_worker_imports_only_the_optional_libraries_its_settings_use(fresh_imports, name):
    """peft and transformers import bitsandbytes and torchao whenever they are installed (~1 s of each worker's
    start); a worker hides those its config does not use, and what it uses still imports. A pipeline with a
    pre-quantized component (a `quantization_config` in its config.json) loads through them, so nothing is
    hidden. In a fresh process, as in a Ray worker: the hiding lasts for the process."""
    kept = WORKER_SETTINGS[name][1]
    hidden, imported = json.loads(fresh_import_output(fresh_imports, name).splitlines()[-1])
    assert hidden == [m for m in ("bitsandbytes", "torchao") if m not in kept]
    assert imported == kept  # peft (and the transformers it imports) imported what the settings use, only that


def test_a_ray_actors_sample_error_is_one_line():
    """A Ray actor's or task's error comes back as both RayTaskError and its own type, whose str() is the whole
    remote traceback (the cache's shard writers are plain actors): the CLI reports the cause's one line."""
    from ray.exceptions import RayTaskError

    from raydiff.data.metadata import BadSample, SampleError
    from raydiff.launch.cli import user_error

    cause = SampleError(BadSample(3, "data/0003.png", "not an image (cannot identify image file)"))
    err = RayTaskError("ShardWriter.write", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    assert isinstance(err, SampleError) and "\n" in str(err)
    assert user_error(err) == str(cause) and "\n" not in user_error(err)


def test_a_process_that_imported_diffusers_already_hides_nothing(fresh_imports):
    """diffusers notes at import that bitsandbytes is installed, and imports it when its models load: hiding it
    afterwards broke them (`raydiff preprocess` of sharded data failed so, in a reused Ray worker)."""
    hidden, imported = json.loads(fresh_import_output(fresh_imports, "reused worker").splitlines()[-1])
    assert hidden == [] and imported == ["bitsandbytes", "torchao"]


def test_a_pipeline_not_on_this_machine_hides_nothing(monkeypatch):
    from raydiff.config.libraries import prequantized

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prequantized("nobody/not-a-cached-model") is None  # a worker will download it: it may be quantized
    assert prequantized("./models/no-such-dir") is None  # neither: the model check names the mistake


@pytest.mark.parametrize("args, message", [
    (["trian", "tiny.yaml"], "argument command: invalid choice: 'trian' (choose from 'train', 'preprocess'"),
    (["train"], "the following arguments are required: config; see `raydiff train --help`"),
    (["train", "tiny.yaml", "--sett", "x=1"], "unrecognized arguments: --sett x=1; see `raydiff --help`"),
])
def test_command_line_mistakes_are_one_line(args, message, capsys):
    """What argparse refuses (a mistyped command, a missing or unknown argument): the same one line and exit 2
    as every other mistake, not argparse's usage block."""
    from raydiff.launch.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.splitlines() == [f"raydiff: error: {err.split('raydiff: error: ', 1)[1].strip()}"], err
    assert message in err


def test_preprocess_command_refuses_a_wrong_model_before_touching_the_cache(make_config, tmp_path, monkeypatch,
                                                                            capsys):
    """A mistyped model.path ends in one line, exit 2, before Ray starts; the existing cache, which the new
    config would have called stale and cleared, is kept. Paths are relative to where the command runs."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text('{"complete": true}')
    import yaml

    from raydiff.config import to_dict
    from raydiff.launch.cli import main

    typo = to_dict(make_config(data={"preprocess": "cache", "cache_dir": "cache"}))
    typo["model"]["path"] = "models/tiny-flx"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(typo))
    with pytest.raises(SystemExit) as exit_:
        main(["preprocess", "config.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("raydiff: error: model.path models/tiny-flx ")
    assert (cache / "manifest.json").read_text() == '{"complete": true}'
