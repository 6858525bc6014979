"""The benchmark harnesses run and print finite numbers (a smoke test; speed is not judged here)."""
import math
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


def test_train_step_benchmark_smoke(tmp_path):
  out = _run("benchmarks/train_step.py", "--size=tiny", "--steps=1", "--batch=8", "--host-input",
             f"--profile={tmp_path}")
  assert out.count("profile: trace ") == 3  # one trace per task (a CPU trace has no device kernels)
  rows = [line for line in out.splitlines() if line.startswith("task=")]
  assert [r.split(" | ")[0] for r in rows] == ["task=tokenizer", "task=pretrain", "task=finetune"]
  for r in rows:
    assert "attention=xla" in r  # what "auto" means on a CPU
    for key in ("step_ms", "img_per_sec", "model_tflops", "compile_s", "host_put_step_ms", "prefetch2_step_ms"):
      value = float(re.search(rf"{key}=([^ |]+)", r).group(1))
      assert math.isfinite(value) and value > 0


def test_residual_precision_benchmark_sets_up_its_runs_and_its_table(tmp_path):
  """benchmarks/residual_precision.py without training (its 300-step runs are minutes): the demo's tiny MIM
  in bf16 matmuls, the residual setting reaching the task's model through the config, and the table's means."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import jax.numpy as jnp
  import residual_precision
  from beitv2_jax import tasks
  from beitv2_jax.config_defaults import with_updates
  tok, pt = residual_precision.configs(steps=300, tokenizer_steps=100)
  assert tok.total_steps == 100 and tok.teacher == "random"
  assert (pt.total_steps, pt.log_every_steps) == (300, 50)
  assert (pt.model.dtype, pt.model.residual_dtype) == ("bfloat16", "float32")
  c = with_updates(pt, {"tokenizer_path": "random", "model.residual_dtype": "bfloat16"})
  task = tasks.task_class("pretrain")(c, str(tmp_path), None)
  assert task.model.residual_dtype == jnp.bfloat16 and task.model.dtype == jnp.bfloat16
  rows = [dict(residual=r, seed=seed, steps=[50, 100], loss=[10.0 + seed, 8.0 + seed + (r == "bfloat16")],
               mlm_acc_1=0.1 + 0.01 * seed, majority=0.04, eval_mlm_acc_1=0.05) for seed in (0, 1)
          for r in residual_precision.SETTINGS]
  table = residual_precision.table(rows)
  assert "| float32, mean of 2 | | 10.5000 | 8.5000 | 0.1050 (seeds 0.1000-0.1100) | | 0.0500 |" in table
  assert "| bfloat16, mean of 2 | | 10.5000 | 9.5000 |" in table and "| loss @50 | loss @100 |" in table


def test_patch_embed_setting_reaches_the_student_and_its_tokenizer_and_keeps_the_step(tmp_path):
  """train_step.py --patch-embed=matmul: the MIM task's student and frozen tokenizer both run the patch
  projection as a matmul, and the step computes the same labels, loss and gradients as with the conv."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import train_step
  from beitv2_jax import parallel
  from beitv2_jax.train.pretrain import PretrainTask

  results = {}
  for patch in ("conv", "matmul"):
    config = train_step.make_config("pretrain", "tiny", "float32", 8, "none", False, "xla", patch_embed=patch)
    task = PretrainTask(config, str(tmp_path / patch), parallel.make_mesh())
    assert task.model.patch_embed == patch and task.tokenizer.module.patch_embed == patch
    params = jax.jit(task.init_state)(jax.random.key(3)).params
    batch = jax.tree.map(jnp.asarray, train_step.synthetic_batch(task, "pretrain", 8))

    def loss(p, batch, frozen):
      ce1, ce2, _, _, labels = task.losses(p, batch, frozen, False)
      return ce1.mean() + ce2.mean(), labels
    step = jax.value_and_grad(loss, has_aux=True)
    convs = str(jax.make_jaxpr(step)(params, batch, task.frozen)).count("conv_general_dilated")
    assert convs == {"conv": 3, "matmul": 0}[patch], convs  # student forward and backward, tokenizer forward
    results[patch] = jax.jit(step)(params, batch, task.frozen)
  (want, want_labels), want_g = results["conv"]
  (got, got_labels), got_g = results["matmul"]
  # the same codes (equal here: on this CPU both forms give the same tokenizer features; a near-tie could
  # flip one of the 512 elsewhere)
  assert np.mean(np.asarray(got_labels) == np.asarray(want_labels)) >= 0.99
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert np.linalg.norm(np.asarray(g) - np.asarray(w)) <= 1e-4 * np.linalg.norm(np.asarray(w)) + 1e-9


def test_input_pipeline_benchmark_smoke():
  out = _run("benchmarks/input_pipeline.py", "--images=8", "--seconds=0.3", "--workers=0", "--size=64", "--profile")
  assert "| tokenizer |" in out and "grain pipeline" in out and "| colour jitter |" in out
  assert "| tokenizer, resized on the device |" in out and "| into the canvas |" in out
  assert "| finetune, resized on the device |" in out and "RandAugment colour ops" in out
  assert "GFLOP per image" in out
  assert "JPEG decode 375x500, ms per image: whole" in out


def test_kernel_benchmark_smoke(tmp_path):
  """benchmarks/kernels.py in interpret mode: both implementations, both directions, a row each in --json."""
  out = _run("benchmarks/kernels.py", "--interpret", "--rows=64", "--width=48", "--steps=1",
             f"--json={tmp_path / 'k.jsonl'}")
  assert "residual add + LayerNorm, 64 x 48" in out
  import json
  rows = [json.loads(line) for line in open(tmp_path / "k.jsonl")]
  assert [(r["impl"], r["direction"]) for r in rows] == [
      ("xla", "forward"), ("xla", "forward+backward"), ("pallas", "forward"), ("pallas", "forward+backward")]
  assert all(r["ms"] > 0 and r["interpret"] for r in rows)


# --- beitv2_jax/roofline.py: the kernel-level roofline that beitv2_jax.aot and --profile use -----------
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from beitv2_jax import roofline as hlo_roofline  # noqa: E402

_MACHINE = hlo_roofline.Machine("test", peak_tflops=1.0, hbm_tbps=0.1, kernel_floor_us=0.0)


def test_roofline_counts_a_matmul_exactly():
  import jax
  import jax.numpy as jnp
  text = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1.0).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
  ks = hlo_roofline.kernels(text, _MACHINE)
  mm = [k for k in ks if k.category == "matmul"]
  assert len(mm) == 1 and mm[0].flops == 2 * 64 * 48 * 32
  assert mm[0].bytes == 4 * (64 * 32 + 32 * 48 + 64 * 48)  # both operands read, the product written
  assert sum(k.flops for k in ks) == mm[0].flops  # the elementwise tail has no matmul FLOPs
  # roofline time: max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)) per kernel
  assert mm[0].ms == pytest.approx(1e3 * max(mm[0].flops / (1e12 * 0.8), mm[0].bytes / (0.1e12 * 0.85)))


# A GPU-compiled module in miniature (the forms XLA:GPU prints): a cuBLAS matmul inside a command-buffer
# call, with its workspace, and a cuDNN flash-attention forward.
_GPU_HLO = """HloModule jit_train_step, is_scheduled=true

%command_buffer (p0: bf16[8,16], p1: bf16[16,32]) -> (bf16[8,32], s8[1024]) {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %cublas-lt-matmul.1 = (bf16[8,32]{1,0}, s8[1024]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/transpose(jvp(BEiTForMIM))/backbone/blocks_3/mlp/fc1/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
}

ENTRY %main.1 (a: bf16[8,16], b: bf16[16,32], q: bf16[2,200,4,64], bias: bf16[1,4,200,200]) -> (bf16[8,32], bf16[2,200,4,64]) {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,32]{1,0} parameter(1)
  %q = bf16[2,200,4,64]{3,2,1,0} parameter(2)
  %bias = bf16[1,4,200,200]{3,2,1,0} parameter(3)
  %call.1 = (bf16[8,32]{1,0}, s8[1024]{0}) call(%a, %b), to_apply=%command_buffer
  %gte = bf16[8,32]{1,0} get-tuple-element(%call.1), index=0
  %fmha.1 = (bf16[2,200,4,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %q, %q, %bias), custom_call_target="__cudnn$fmhaScaleBiasSoftmax", metadata={op_name="jit(train_step)/jvp(BEiTForMIM)/backbone/blocks_0/attn/dot_product_attention_fwd"}
  %out = bf16[2,200,4,64]{3,1,2,0} get-tuple-element(%fmha.1), index=0
  ROOT %t = (bf16[8,32]{1,0}, bf16[2,200,4,64]{3,1,2,0}) tuple(%gte, %out)
}
"""


def test_roofline_reads_gpu_custom_calls():
  ks = {k.name: k for k in hlo_roofline.kernels(_GPU_HLO, _MACHINE)}
  assert set(ks) == {"cublas-lt-matmul.1", "fmha.1"}  # the call's body is walked; gte / tuple launch nothing
  mm, att = ks["cublas-lt-matmul.1"], ks["fmha.1"]
  assert mm.category == "matmul" and mm.flops == 2 * 8 * 32 * 16
  assert mm.bytes == 2 * (8 * 16 + 16 * 32 + 8 * 32)  # cuBLAS's s8 workspace is not traffic
  assert att.category == "attention (cuDNN)" and att.flops == 4 * 2 * 4 * 200 * 200 * 64
  assert att.bytes == 3 * 2 * (2 * 200 * 4 * 64) + 2 * 4 * 200 * 200 + 2 * (2 * 200 * 4 * 64)
  assert hlo_roofline.source_group(mm.op_name) == "bwd BEiTForMIM/backbone/blocks_*/mlp/fc1/dot_general"
  assert (hlo_roofline.source_group("jit(train_step)/CLIPVision/vision_model/encoder/layers/11/mlp/fc1/dot_general")
          == "CLIPVision/vision_model/encoder/layers/*/mlp/fc1/dot_general")
  rows, totals = hlo_roofline.measured_vs_bound({"fmha.1": 3e6 * 2, "memcpy": 1e6}, list(ks.values()), steps=2)
  assert [r["source"] for r in rows] == ["BEiTForMIM/backbone/blocks_*/attn/dot_product_attention_fwd"]
  assert rows[0]["measured_ms"] == pytest.approx(3.0) and rows[0]["efficiency"] == pytest.approx(att.ms / 3.0)
  assert totals["unmatched_ms"] == pytest.approx(0.5)


# How XLA:TPU writes matmuls (from the tiny MIM step compiled for a v4): a dense layer as a 1-wide
# convolution, and attention's batched p @ v as a convolution over the batch dims (16 images, 2 heads) with
# the input dilated by the window, so that each output meets one real input per window dim; and an
# asynchronous slice (start / done), which runs beside the kernels.
_TPU_HLO = """HloModule jit_train_step, is_scheduled=true

ENTRY %main (x: bf16[16,24,64], w: bf16[64,8192,1], p: bf16[16,2,65,65], v: bf16[16,65,2,32]) -> (bf16[16,24,8192], bf16[16,2,32,65]) {
  %x = bf16[16,24,64]{2,1,0} parameter(0)
  %w = bf16[64,8192,1]{1,0,2} parameter(1)
  %p = bf16[16,2,65,65]{2,3,1,0} parameter(2)
  %v = bf16[16,65,2,32]{1,3,2,0} parameter(3)
  %convolution.98 = bf16[16,24,8192]{2,1,0} convolution(%x, %w), window={size=1}, dim_labels=0bf_io0->0bf, metadata={op_name="jit(train_step)/jvp(BEiTForMIM)/BEiTForMIM.logits/lm_head/dot_general"}
  %convolution-base-dilated.62 = bf16[16,2,32,65]{3,2,1,0} convolution(%v, %p), window={size=16x2 stride=15x1 lhs_dilate=16x2}, dim_labels=0f1b_01oi->01bf, metadata={op_name="jit(train_step)/jvp(BEiTForMIM)/backbone/blocks_0/attn/bhqk,bkhd->bqhd/dot_general"}
  %slice-start.1 = ((bf16[16,24,64]{2,1,0}), bf16[8,24,64]{2,1,0}, s32[]) slice-start(%x), slice={[0:8], [0:24], [0:64]}
  %slice-done.1 = bf16[8,24,64]{2,1,0} slice-done(%slice-start.1)
  ROOT %t = (bf16[16,24,8192]{2,1,0}, bf16[16,2,32,65]{3,2,1,0}, bf16[8,24,64]{2,1,0}) tuple(%convolution.98, %convolution-base-dilated.62, %slice-done.1)
}
"""


def test_roofline_counts_tpu_convolution_matmuls():
  ks = {k.name: k for k in hlo_roofline.kernels(_TPU_HLO, _MACHINE)}
  assert set(ks) == {"convolution.98", "convolution-base-dilated.62"}  # the asynchronous slice overlaps: no time
  assert {k.category for k in ks.values()} == {"matmul"}
  assert ks["convolution.98"].flops == 2 * 16 * 24 * 64 * 8192  # tokens x in x out
  assert ks["convolution-base-dilated.62"].flops == 2 * 16 * 2 * 65 * 65 * 32  # B H Q K D, not x 32 window taps


def test_roofline_of_the_tiny_finetune_step_matches_the_model_flop_count():
  """The matmul FLOPs found in the compiled step agree with the count MFU uses (flops.py), within 10%."""
  import jax
  import train_step
  built = train_step._build("finetune", "tiny", "float32", 8, "none", False, "xla")
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), built.host_batch)
  text = built.step.lower(built.state_abs, batch, built.frozen).compile().as_text()
  ks = hlo_roofline.kernels(text, _MACHINE)
  per_image = sum(k.flops for k in ks) / (8 / built.mesh.devices.size)  # the module is one device's share
  assert per_image == pytest.approx(built.task.flops_per_example, rel=0.1)
  assert {r["category"] for r in hlo_roofline.by_category(ks)} >= {"matmul", "elementwise fusion"}
  # docs/deviations.md: the mixup / cutmix Beta draws are loop-free, so the step lowered for a GPU has no
  # while loop (each iteration would wait for the host); mixup is on, so its sampler is inside. (On the CPU,
  # jax lowers its own threefry random bits with rolled loops; for a GPU it does not.)
  assert built.config.aug.mixup > 0
  assert _gpu_control_flow(built.step, built.state_abs, batch, built.frozen) == set()


def _gpu_control_flow(step, *args) -> set:
  """The control-flow ops of `step` lowered for an NVIDIA GPU (no GPU needed to lower)."""
  text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return {op for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if") if op in text}


def test_later_tokenizer_steps_have_no_conditional_or_loop_on_a_gpu():
  """docs/deviations.md: k-means runs in a separate first step; the step every later iteration runs, lowered
  for a GPU, has no conditional and no while loop, and the first step does run k-means (its loop)."""
  import jax
  import train_step
  from beitv2_jax.train.loop import jit_step
  built = train_step._build("tokenizer", "tiny", "float32", 16, "none", False, "xla")
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), built.host_batch)
  assert _gpu_control_flow(built.step, built.state_abs, batch, built.frozen) == set()
  first = jit_step(built.task.initial_step(), built.shardings, built.mesh)
  assert "stablehlo.while" in _gpu_control_flow(first, built.state_abs, batch, built.frozen)


# --- the PyTorch peer of the MIM step (benchmarks/torch_mim.py) ------------------------------------------
def test_torch_mim_peer_computes_our_loss_and_gradients_on_the_same_weights(tmp_path):
  """Our tiny MIM task's weights (student and tokenizer) exported to the official key layout load into the
  PyTorch peer unchanged, and on the same batch it gives the same labels, the same loss (fp32, 1e-5
  relative) and the same gradient for every parameter (1e-4 relative): the peer times the same step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch_mim
  import train_step
  from beitv2_jax import convert, parallel
  from beitv2_jax.train.pretrain import PretrainTask

  config = train_step.make_config("pretrain", "tiny", "float32", 8, "none", False, "xla")
  task = PretrainTask(config, str(tmp_path), parallel.make_mesh())
  params = jax.jit(task.init_state)(jax.random.key(3)).params
  batch = train_step.synthetic_batch(task, "pretrain", 8)

  def our_loss(p, batch, frozen):  # batch and tokenizer as arguments: as constants XLA would fold the tokenizer
    ce1, ce2, _, _, labels = task.losses(p, batch, frozen, False)
    return ce1.mean() + ce2.mean(), labels
  (loss, labels), grads = jax.jit(jax.value_and_grad(our_loss, has_aux=True))(
      params, jax.tree.map(jnp.asarray, batch), task.frozen)

  m = config.model
  student = torch_mim.BEiTForMIM(m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, vocab=8192,
                                 early_layers=m.early_layers, head_layers=m.head_layers).eval()
  tokenizer = torch_mim.VQKDEncoder(m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads).eval()
  to_torch = lambda sd: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
  for module, sd in ((student, convert.to_state_dict(params, strip="backbone")),
                     (tokenizer, {k: v for k, v in convert.to_state_dict(task.tokenizer.params).items()
                                  if k.startswith(("encoder.", "encode_task_layer."))})):
    sd = to_torch(sd)
    if module is tokenizer:
      sd["codebook"] = torch.from_numpy(np.asarray(task.tokenizer.codebook, np.float32).copy())
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith(("relative_position_index", "k_bias")) for k in missing), missing

  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  tb = {"image": nchw(batch["image"]), "tokenizer_image": nchw(batch.get("tokenizer_image", batch["image"])),
        "mask": torch.from_numpy(batch["mask"])}
  t_loss, _, _, t_labels = torch_mim.losses(student, tokenizer, tb, task.num_masked)
  assert np.array_equal(t_labels.numpy(), np.asarray(labels))
  assert t_loss.item() == pytest.approx(float(loss), rel=1e-5)
  t_loss.backward()
  ours = convert.to_state_dict(jax.device_get(grads), strip="backbone")
  theirs = {k: p.grad.numpy() for k, p in student.named_parameters()}
  assert sorted(ours) == sorted(theirs)
  for k, g in ours.items():
    err = np.linalg.norm(theirs[k] - g) / max(np.linalg.norm(g), 1e-12)
    assert err < 1e-4, (k, err)


def test_profile_kernel_kinds_name_the_kernels_an_h200_ran():
  """Kernel names from a trace of the MIM step on an H200 (2026-11-27) land in the right bucket."""
  import train_step
  seen = {"nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": "matmul",
          "sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "matmul",
          "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64": "attention",
          "void cudnn::fusion::fmha_dbias<true>(void const*, void*, void const*)": "attention",
          "void cudnn::fusion::matmul_dq<true, 64>(void const*, void const*, void*)": "attention",
          "loop_add_convert_fusion_13": "other", "Memset 3": "other"}
  assert {name: train_step.kernel_kind(name) for name in seen} == seen
