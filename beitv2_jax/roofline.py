"""A kernel-by-kernel roofline of a compiled XLA module, read from its optimized HLO text.

Every kernel the module launches (a fusion, a cuBLAS / cuDNN custom call, a copy, a sort ...) is charged
max(FLOPs / achievable FLOP rate, bytes / achievable bandwidth, a per-kernel floor), where bytes = the
operands read + the results written (what a streaming kernel moves through device memory) and FLOPs are
counted for matmuls (2 M N K, also inside fusions; on TPUs XLA writes matmuls as convolutions, counted the
same way) and cuDNN attention (4 B H N^2 D forward, 2.5x that backward). Summed, that is a lower bound on
the step time in which each kernel runs at the stated efficiency: it shows where the bytes go and what a
change saves, not what a profiler would measure.

Used by `python -m beitv2_jax.aot` on modules compiled for a GPU or a TPU without one, and by
benchmarks/train_step.py --profile next to measured kernel times; works on any backend's HLO (tests use CPU).
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterator

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
# Instructions that launch nothing: aliases, tuples, constants.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
              "replica-id", "opt-barrier", "add-dependency"}


def _asynchronous(op: str) -> bool:
  """An asynchronous op's halves (copy-start / copy-done, a TPU's slice-start / slice-done between memory
  spaces, all-reduce-start / -done ...): it runs beside the kernels around it, so the lower bound charges it
  nothing."""
  return op.endswith(("-start", "-done"))


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # the result shape text, e.g. "bf16[256,197,768]{2,1,0}" or a tuple of them
  op: str
  line: str

  @property
  def operands(self) -> list[str]:
    args, depth = [], 0
    for ch in self.line.split(f" {self.op}(", 1)[1]:
      if ch == "(":
        depth += 1
      elif ch == ")":
        if depth == 0:
          break
        depth -= 1
      args.append(ch)
    return re.findall(r"%([\w.\-]+)", "".join(args))

  def attr(self, pattern: str) -> str:
    m = re.search(pattern, self.line)
    return m.group(1) if m else ""


@dataclasses.dataclass
class Machine:
  """What a kernel can reach: peak dense FLOP rate, memory bandwidth, and the fractions achieved."""
  name: str
  peak_tflops: float
  hbm_tbps: float
  matmul_efficiency: float = 0.8  # an 8192^3 bf16 matmul reached ~790 of 989 TF/s on an H200 here
  attention_efficiency: float = 0.45  # cuDNN flash attention at head dim 64 with a bias
  memory_efficiency: float = 0.85
  kernel_floor_us: float = 2.0  # launch + tail of a tiny kernel


@dataclasses.dataclass
class Kernel:
  name: str
  category: str
  op_name: str  # the jax source op (metadata), e.g. "jit(train_step)/.../blocks_3/mlp/fc1/dot_general"
  flops: float
  bytes: float
  ms: float


def array_dims(shape_text: str) -> list[tuple[str, list[int]]]:
  return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(shape_text)]


def shape_bytes(shape_text: str) -> int:
  total = 0
  for dt, dims in array_dims(shape_text):
    n = 1
    for d in dims:
      n *= d
    total += n * DTYPE_BYTES[dt]
  return total


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: its instructions}, and the entry computation's name."""
  computations, current, entry = {}, None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      computations[current] = []
      entry = current if m.group(1) else entry
      continue
    if current is None:
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      computations[current].append(Instr(m.group(1), m.group(2), m.group(3), line))
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text: pass the compiled module's as_text()")
  return computations, entry


def _kernels(computations, name) -> Iterator[tuple[Instr, dict]]:
  instrs = computations[name]
  shapes = {i.name: i.shape for i in instrs}
  for i in instrs:
    if i.op in _NO_KERNEL or _asynchronous(i.op):
      continue
    if i.op == "call":  # command buffers and outlined calls: their body's kernels run
      yield from _kernels(computations, i.attr(r"(?:to_apply|calls)=%([\w.\-]+)"))
      continue
    if i.op == "while":  # its condition and body are counted once
      yield i, shapes
      for part in ("condition", "body"):
        yield from _kernels(computations, i.attr(part + r"=%([\w.\-]+)"))
      continue
    yield i, shapes


def _dot_flops(dot: Instr, shapes: dict) -> float:
  out, lhs = array_dims(dot.shape), array_dims(shapes.get(dot.operands[0], ""))
  if not out or not lhs:
    return 0.0
  contracting = dot.attr(r"lhs_contracting_dims=\{([0-9,]*)\}") or ",".join(
      re.findall(r'"(\d+)"', dot.attr(r'"lhs_contracting_dimensions":\[([^\]]*)\]')))
  k = 1
  for c in filter(None, contracting.split(",")):
    k *= lhs[0][1][int(c)]
  n_out = 1
  for d in out[0][1]:  # the product (a cuBLAS call's first result; its workspace follows)
    n_out *= d
  return 2.0 * n_out * k


def _attention_flops(call: Instr, shapes: dict) -> float:
  q = array_dims(shapes.get(call.operands[0], ""))
  if not q or len(q[0][1]) != 4:
    return 0.0
  b, *rest = q[0][1]
  small, other, n = sorted(rest)  # (B, N, H, D) or (B, H, N, D): the tokens N are the largest at ViT shapes
  forward = 4.0 * b * n * n * small * other  # 2 B H N^2 D for q k^T, the same for p v
  return 2.5 * forward if "Backward" in call.line else forward


def _conv_flops(conv: Instr, shapes: dict) -> float:
  """2 x output elements x (kernel elements / output features): a matmul written as a convolution (TPU)
  or a real one (a patch embedding)."""
  out, kernel = array_dims(conv.shape), array_dims(shapes.get(conv.operands[1], "")) if len(conv.operands) > 1 else []
  labels = conv.attr(r"dim_labels=[\w?]+_([\w?]+)->")
  if not out or not kernel or "o" not in labels or len(labels) != len(kernel[0][1]):
    return 0.0
  n_out, n_kernel = 1, 1
  for d in out[0][1]:
    n_out *= d
  for d in kernel[0][1]:
    n_kernel *= d
  # TPUs write a batched matmul as a convolution over its batch dims with the input dilated by the window
  # size ("convolution-base-dilated"): of each window's taps only ceil(size / lhs_dilate) meet real input.
  sizes = [int(x) for x in filter(None, conv.attr(r"window=\{size=([\dx]+)").split("x"))]
  dilations = [int(x) for x in filter(None, conv.attr(r"lhs_dilate=([\dx]+)").split("x"))] or [1] * len(sizes)
  idle = 1.0
  for size, dilation in zip(sizes, dilations):
    idle *= size / -(-size // dilation)
  return 2.0 * n_out * n_kernel / max(kernel[0][1][labels.index("o")], 1) / idle


def _matmul_flops(i: Instr, shapes: dict) -> float:
  return _conv_flops(i, shapes) if i.op == "convolution" else _dot_flops(i, shapes)


def classify(i: Instr) -> str:
  if i.op == "custom-call":
    target = i.attr(r'custom_call_target="([^"]+)"')
    if "matmul" in target or "gemm" in target:
      return "matmul"
    if "fmha" in target:
      return "attention (cuDNN)"
    if "conv" in target.lower():
      return "conv"
    return "custom-call " + target
  if i.op == "fusion":
    if "__triton_gemm" in i.line or i.name.startswith("gemm_fusion"):
      return "matmul"
    if "__cudnn" in i.line:
      return "cuDNN fusion"
    kind = i.attr(r"kind=(k\w+)")
    return {"kInput": "reduction fusion", "kLoop": "elementwise fusion", "kCustom": "custom fusion"}.get(
        kind, "fusion " + kind)
  if i.op in ("dot", "convolution"):
    return "matmul"
  return i.op


def kernels(text: str, machine: Machine) -> list[Kernel]:
  """Every kernel of the module, in launch order, with its FLOPs, bytes and roofline time. A while loop
  is listed (category "while loop", no time) before its condition's and body's kernels, counted once: on
  a GPU each iteration also waits for the host to read the condition."""
  computations, entry = parse(text)
  out = []
  for i, shapes in _kernels(computations, entry):
    category = classify(i)
    fused_flops = 0.0
    if i.op == "fusion":  # a fusion with a dot inside (cuBLAS / Triton GEMM, a CPU library call) is a matmul
      body = computations.get(i.attr(r"calls=%([\w.\-]+)"), [])
      body_shapes = {b.name: b.shape for b in body}
      fused_flops = sum(_matmul_flops(b, body_shapes) for b in body if b.op in ("dot", "convolution"))
      category = "matmul" if fused_flops else category
    if i.op == "while":
      out.append(Kernel(i.name, "while loop", i.attr(r'op_name="([^"]*)"'), 0.0, 0.0, 0.0))
      continue
    written = shape_bytes(i.shape)
    if i.op == "custom-call" and category == "matmul":  # cuBLAS's workspace is scratch, not traffic
      written -= sum(shape_bytes(s) for s in re.findall(r"s8\[\d+\]", i.shape))
    moved = written + sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
    flops, rate = 0.0, machine.matmul_efficiency
    if category == "matmul":
      flops = fused_flops or _matmul_flops(i, shapes)
    elif category.startswith("attention"):
      flops, rate = _attention_flops(i, shapes), machine.attention_efficiency
    seconds = max(flops / (machine.peak_tflops * 1e12 * rate),
                  moved / (machine.hbm_tbps * 1e12 * machine.memory_efficiency),
                  machine.kernel_floor_us * 1e-6)
    out.append(Kernel(i.name, category, i.attr(r'op_name="([^"]*)"'), flops, moved, 1e3 * seconds))
  return out


def _totals(ks: list[Kernel], key) -> list[dict]:
  """Kernels, TFLOP, GB and roofline ms summed per key(kernel) (a dict of fields), largest time first."""
  table: dict = {}
  for k in ks:
    fields = key(k)
    row = table.setdefault(tuple(fields.values()), dict(fields, kernels=0, tflop=0.0, gb=0.0, ms=0.0))
    row["kernels"] += 1
    row["tflop"] += k.flops / 1e12
    row["gb"] += k.bytes / 1e9
    row["ms"] += k.ms
  return sorted(table.values(), key=lambda r: -r["ms"])


def by_category(ks: list[Kernel]) -> list[dict]:
  return _totals(ks, lambda k: {"category": k.category})


def source_group(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(BEiTForMIM))/backbone/blocks_3/mlp/fc1/dot_general' ->
  'bwd BEiTForMIM/backbone/blocks_*/mlp/fc1/dot_general': one group for the same op in every layer (the
  teachers' towers number theirs as path components, 'encoder/layers/3/mlp': 'encoder/layers/*/mlp')."""
  name = op_name.replace("jit(train_step)/", "")
  direction = "bwd " if name.startswith("transpose(") else ""
  name = re.sub(r"^(transpose\()?jvp\(([^)]*)\)\)?", r"\2", name)
  return direction + re.sub(r"(?<=/)\d+(?=/)", "*", re.sub(r"_\d+(?=/|$)", "_*", name))


def by_source(ks: list[Kernel]) -> list[dict]:
  return _totals(ks, lambda k: {"category": k.category, "source": source_group(k.op_name)})


# Dense bf16 peak TFLOP/s, HBM TB/s and HBM bytes per device, by jax's device_kind (the first entry whose
# key the kind contains). Sources: NVIDIA's H100 / H200 / A100 SXM data sheets; Google Cloud's TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: "peak compute per chip (bf16)",
# "HBM capacity and bandwidth"). A TPU v4 or v5p device is a chip (its two TensorCores as one, megacore).
MACHINES = (
    ("H100", 989.0, 3.35, 80 * 2**30),
    ("H200", 989.0, 4.8, 141 * 10**9),
    ("A100", 312.0, 2.0, 80 * 2**30),
    ("TPU v4", 275.0, 1.2, 32 * 2**30),
    ("TPU v5 lite", 197.0, 0.819, 16 * 10**9),  # v5e
    ("TPU v5p", 459.0, 2.765, 95 * 10**9),
    ("TPU v5", 459.0, 2.765, 95 * 10**9),  # v5p reports its kind as "TPU v5"
    ("TPU v6 lite", 918.0, 1.638, 32 * 10**9),  # v6e (Trillium)
)


def machine_for(device_kind: str) -> Machine | None:
  """The roofline machine of a device kind. A TPU runs the step as one program, without a launch per
  kernel: no per-kernel floor there (a GPU's is the measured 2 us)."""
  for key, peak, hbm, _ in MACHINES:
    if key.lower() in device_kind.lower():
      return Machine(device_kind, peak, hbm, kernel_floor_us=0.0 if key.startswith("TPU") else 2.0)
  return None


def hbm_bytes(device_kind: str) -> int | None:
  """The device's memory (HBM) in bytes, from the table above; None for an unknown kind."""
  return next((memory for key, _, _, memory in MACHINES if key.lower() in device_kind.lower()), None)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind (the MFU denominator); None when unknown."""
  m = machine_for(device_kind)
  return m.peak_tflops * 1e12 if m else None


def measured_vs_bound(measured_ns: dict[str, float], ks: list[Kernel], steps: int) -> tuple[list[dict], dict]:
  """Join a profile's device time per HLO op (the kernels' `hlo_op` stat, summed over `steps` steps) with
  the roofline of the same compiled module, by source op. Rows: measured ms/step, bound ms, and
  efficiency = bound / measured (1.0: the kernel runs at the roofline). Also the totals, with the
  measured time no kernel of the module claimed (memcpys, other modules)."""
  by_name = {k.name: k for k in ks}
  table = collections.defaultdict(lambda: dict(kernels=0, measured_ms=0.0, bound_ms=0.0, gb=0.0))
  unmatched = 0.0
  for op, ns in measured_ns.items():
    k = by_name.get(op)
    if k is None:
      unmatched += ns
      continue
    row = table[(k.category, source_group(k.op_name))]
    row["kernels"] += 1
    row["measured_ms"] += ns / steps / 1e6
    row["bound_ms"] += k.ms
    row["gb"] += k.bytes / 1e9
  rows = [{"category": c, "source": s, **v, "efficiency": v["bound_ms"] / v["measured_ms"] if v["measured_ms"] else 0.0}
          for (c, s), v in table.items()]
  rows.sort(key=lambda r: -(r["measured_ms"] - r["bound_ms"]))  # the largest gaps first
  totals = dict(measured_ms=sum(r["measured_ms"] for r in rows), bound_ms=sum(r["bound_ms"] for r in rows),
                unmatched_ms=unmatched / steps / 1e6, bound_all_ms=sum(k.ms for k in ks))
  return rows, totals
