"""An ONNX export of a transformers DINOv2 ViT -> the `Dinov2Model` config and PyTorch-named state dict that
`models/teacher.py` loads (the DINOv2 teacher).

The exporter keeps the names of the initialisers it did not touch (`backbone.encoder.layer.3.norm1.weight`,
the biases, layer scales, [CLS], the patch convolution) but turns each Linear weight into an anonymous
initialiser `onnx::MatMul_N`, transposed to (in, out), constant-folds the position table into pieces
(`onnx::Concat_N`: the [CLS] entry, `onnx::Reshape_N`: the patch grid that a Resize interpolates) and may
replace an initialiser equal to another by an Identity node. So the graph is walked: a Linear's weight is
the MatMul initialiser whose output the Add with that Linear's named bias consumes; the head count is read
from the Reshape that splits the query into heads, the LayerNorm epsilon from the Add under its square root.

Verified against the graph itself run by onnxruntime (tests/test_teacher.py): features equal within 1e-4.
"""
from __future__ import annotations

import collections
import os

import numpy as np

# The Linear layers of a Dinov2Layer, by their names under `encoder.layer.N.`
LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense", "mlp.fc1", "mlp.fc2")


class _Graph:
  """Initialisers (also through Identity nodes and Constant nodes), producers and consumers of an ONNX graph."""

  def __init__(self, graph):
    from onnx import numpy_helper
    self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    self.producer, self.consumers = {}, collections.defaultdict(list)
    for n in graph.node:
      for o in n.output:
        self.producer[o] = n
      for i in n.input:
        self.consumers[i].append(n)
      if n.op_type == "Constant":
        attr = next((a for a in n.attribute if a.name == "value"), None)
        if attr is not None:
          self.values[n.output[0]] = numpy_helper.to_array(attr.t)
    for n in graph.node:  # an initialiser the exporter deduplicated: name -> Identity(other initialiser)
      if n.op_type == "Identity" and n.input[0] in self.values:
        self.values[n.output[0]] = self.values[n.input[0]]
    self.ops = collections.Counter(n.op_type for n in graph.node)

  def value(self, name):
    return self.values.get(name)

  def sole_consumer(self, name, op_type):
    nodes = [n for n in self.consumers[name] if n.op_type == op_type]
    return nodes[0] if len(nodes) == 1 else None

  def through(self, name, op_types=("Identity", "Cast")):
    """The node that uses `name`, past Identity / Cast nodes (Shape nodes, which read only the shape, aside)."""
    while True:
      nodes = [n for n in self.consumers[name] if n.op_type != "Shape"]
      if len(nodes) != 1:
        return None
      if nodes[0].op_type not in op_types:
        return nodes[0]
      name = nodes[0].output[0]


def _not_dinov2(path: str, what: str) -> ValueError:
  return ValueError(f"{path} is not an ONNX export of a transformers DINOv2 ViT ({what}); expected initialisers "
                    f"named like '[prefix.]embeddings.cls_token', 'encoder.layer.N.attention.attention.query.bias', "
                    f"'encoder.layer.N.layer_scale1.lambda1'")


def read_onnx_dinov2(path: str) -> tuple[dict, dict]:
  """(config dict in Dinov2Config's fields, {PyTorch name: array}) of the DINOv2 ViT inside an ONNX file.
  The state dict holds what Dinov2Model's forward uses (its position table at the export's native grid);
  anything else in the graph (a task head) is left out. ValueError naming what is missing otherwise."""
  try:
    import onnx
  except ImportError:
    raise ImportError("reading an ONNX teacher needs the `onnx` package: pip install onnx") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ONNX teacher file not found: {path}")
  try:
    model = onnx.load(path)
  except Exception as e:
    raise ValueError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
  g = _Graph(model.graph)
  cls_names = [n for n in g.values if n.endswith("embeddings.cls_token")]
  if len(cls_names) != 1:
    raise _not_dinov2(path, f"{len(cls_names)} '*embeddings.cls_token' initialisers")
  prefix = cls_names[0][:-len("embeddings.cls_token")]
  sd = {n[len(prefix):]: np.asarray(v, np.float32) for n, v in g.values.items()
        if n.startswith(prefix) and not n.startswith("onnx::")}
  depth = 0
  while f"encoder.layer.{depth}.norm1.weight" in sd:
    depth += 1
  if depth == 0 or "layernorm.weight" not in sd or "encoder.layer.0.layer_scale1.lambda1" not in sd:
    raise _not_dinov2(path, "no encoder.layer.0.norm1 / layer_scale1 or final layernorm")
  if "encoder.layer.0.mlp.weights_in.bias" in sd:
    raise ValueError(f"{path}: a DINOv2 with a SwiGLU MLP (ViT-g/14) is not supported")
  hidden = sd["embeddings.cls_token"].shape[-1]
  patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]

  for i in range(depth):  # Linear weights: MatMul(x, W) -> Add(., bias)
    for lin in LINEARS:
      bias = f"{prefix}encoder.layer.{i}.{lin}.bias"
      w = _linear_weight(g, bias)
      if w is None:
        raise _not_dinov2(path, f"no MatMul feeding the Add of {bias}")
      sd[f"encoder.layer.{i}.{lin}.weight"] = np.ascontiguousarray(w.T)

  sd["embeddings.position_embeddings"], antialias = _position_table(g, prefix, hidden, path)
  grid = int(round(np.sqrt(sd["embeddings.position_embeddings"].shape[1] - 1)))
  heads = _num_heads(g, f"{prefix}encoder.layer.0.attention.attention.query.bias", hidden, path)
  eps = _layer_norm_eps(g, f"{prefix}encoder.layer.0.norm1.weight", path)
  if not g.ops.get("Erf"):
    raise ValueError(f"{path}: the MLP activation is not the exact (erf) GELU DINOv2 uses")
  registers = sd["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in sd else 0
  cfg = dict(model_type="dinov2_with_registers" if registers and antialias else "dinov2",
             hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
             image_size=grid * patch, mlp_ratio=sd["encoder.layer.0.mlp.fc1.bias"].shape[0] / hidden,
             layer_norm_eps=eps, hidden_act="gelu", num_register_tokens=registers)
  return cfg, sd


def _linear_weight(g: _Graph, bias: str):
  adds = [n for n in g.consumers[bias] if n.op_type == "Add"]
  if len(adds) != 1:
    return None
  other = [i for i in adds[0].input if i != bias][0]
  mm = g.producer.get(other)
  if mm is None or mm.op_type != "MatMul":
    return None
  w = g.value(mm.input[1])
  return None if w is None or w.ndim != 2 else np.asarray(w, np.float32)


def _position_table(g: _Graph, prefix: str, hidden: int, path: str):
  """(1, 1 + n, D) position table, and whether the graph resizes it with antialiasing. Exported at the
  native size it is one named initialiser; at another size the [CLS] entry and the patch grid are two
  anonymous ones, the grid feeding (through Reshape / Transpose) the Resize node."""
  named = g.value(f"{prefix}embeddings.position_embeddings")
  if named is not None:
    return np.asarray(named, np.float32), False
  grids, found = [], None
  for name, v in g.values.items():
    if not name.startswith("onnx::") or v.ndim != 3 or v.shape[0] != 1 or v.shape[2] != hidden or v.shape[1] < 4:
      continue
    node, steps = g.through(name), 0
    while node is not None and node.op_type in ("Reshape", "Transpose", "Cast") and steps < 6:
      node, steps = g.through(node.output[0]), steps + 1
    if node is not None and node.op_type == "Resize":
      grids.append(name)
      found = node
  if len(grids) != 1:
    raise _not_dinov2(path, f"{len(grids)} position grids feeding a Resize (and no embeddings.position_embeddings)")
  patch_table = np.asarray(g.value(grids[0]), np.float32)
  n = patch_table.shape[1]
  if int(round(np.sqrt(n))) ** 2 != n:
    raise _not_dinov2(path, f"a position grid of {n} entries is not square")
  attrs = {a.name: a for a in found.attribute}
  mode = attrs["mode"].s.decode() if "mode" in attrs else "nearest"
  if mode != "cubic":
    raise ValueError(f"{path}: the position table is resized with mode {mode!r}, not bicubic as DINOv2 does")
  antialias = bool(attrs["antialias"].i) if "antialias" in attrs else False
  # the [CLS] entry: the other (1, 1, D) initialiser concatenated with the resized grid
  resized = g.through(found.output[0])
  cls = None
  for _ in range(6):
    if resized is None:
      break
    if resized.op_type == "Concat":
      cands = [g.value(i) for i in resized.input if g.value(i) is not None and g.value(i).shape == (1, 1, hidden)]
      cls = cands[0] if len(cands) == 1 else None
      break
    resized = g.through(resized.output[0])
  if cls is None:
    raise _not_dinov2(path, "no [CLS] position entry concatenated with the resized position grid")
  return np.concatenate([np.asarray(cls, np.float32), patch_table], axis=1), antialias


def _num_heads(g: _Graph, query_bias: str, hidden: int, path: str) -> int:
  """From the Reshape (B, N, heads, head_dim) of the query: its shape is a Concat of constants."""
  add = next((n for n in g.consumers[query_bias] if n.op_type == "Add"), None)
  for node in g.consumers[add.output[0]] if add is not None else []:
    if node.op_type != "Reshape":
      continue
    shape = g.value(node.input[1])
    if shape is None and node.input[1] in g.producer and g.producer[node.input[1]].op_type == "Concat":
      parts = [g.value(i) for i in g.producer[node.input[1]].input]
      shape = [int(np.asarray(p).reshape(-1)[0]) if p is not None else -1 for p in parts]
    if shape is not None and len(shape) == 4 and shape[2] > 0 and shape[2] * shape[3] == hidden:
      return int(shape[2])
  raise _not_dinov2(path, "cannot read the head count from the query's reshape")


def _layer_norm_eps(g: _Graph, norm_weight: str, path: str) -> float:
  """A LayerNormalization node's epsilon, or the decomposed form's: Mul(Div(x - mean, Sqrt(Add(var, eps))), w)."""
  for node in g.consumers[norm_weight]:
    if node.op_type == "LayerNormalization":
      attrs = {a.name: a for a in node.attribute}
      return float(attrs["epsilon"].f) if "epsilon" in attrs else 1e-5
    if node.op_type == "Mul":
      div = g.producer.get([i for i in node.input if i != norm_weight][0])
      sqrt = g.producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
      add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
      if add is not None and add.op_type == "Add":
        eps = [g.value(i) for i in add.input if g.value(i) is not None]
        if len(eps) == 1 and np.asarray(eps[0]).size == 1:
          return float(np.asarray(eps[0]).reshape(-1)[0])
  raise _not_dinov2(path, f"cannot read the LayerNorm epsilon at {norm_weight}")
