"""From a task's `config.model` to a module's constructor arguments.

`config.model` is flat (the recipe writes `vit_model("base", init_values=0.1, ...)`, the command line
`--config.model.depth=24`) and holds two kinds of fields:
- the architecture, which each model file turns into its module's (nested, stored) keyword arguments with a
  keyword-only function whose signature is that task's list of fields: `vit.classifier_kwargs`,
  `vit.encoder_kwargs`, `mim.mim_kwargs`, `vqkd.vqkd_kwargs`;
- the execution (`EXECUTION_FIELDS`: how the same math runs), passed to the module as they are.

A task writes `arch, run = split_execution(config.model)`, then `kwargs = fields_call(mim_kwargs, arch,
vocab_size=...)` and `BEiTForMIM(**kwargs, **run)`; a field the function does not take, or one it needs and
the config lacks, is refused with its name.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# How the blocks run: the matmul dtype, scan over blocks, the remat policy, the attention kernel, the
# residual add + norm kernel, the residual stream's dtype, the patch embedding's form.
EXECUTION_FIELDS = ("dtype", "scan", "remat", "attention", "add_norm", "residual_dtype", "patch_embed")
# model.residual_dtype: the residual stream between blocks (bfloat16: opt-in, not the official numerics)
RESIDUAL_DTYPES = ("float32", "bfloat16")
# model.add_norm: XLA's fusions, or the Pallas (Triton) residual add + LayerNorm kernel (kernels/add_layernorm.py)
ADD_NORM = ("xla", "pallas")
# model.patch_embed: the patch projection as a strided convolution, or as patchify + one matmul (same math)
PATCH_EMBED = ("conv", "matmul")


def dtype_of(name: str | Any):
  """The jnp dtype a config names ('float32', 'bfloat16', 'float16'); a dtype object passes through."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def execution_of(module) -> dict:
  """The execution fields a model module holds (of EXECUTION_FIELDS), to hand on to the VisionTransformer
  it builds: one place, so that a new field reaches every backbone."""
  return {k: getattr(module, k) for k in EXECUTION_FIELDS if hasattr(module, k)}


def split_execution(model_config) -> tuple[dict, dict]:
  """`config.model` -> (architecture fields, execution fields with the dtype resolved)."""
  fields = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  run = {k: fields.pop(k) for k in EXECUTION_FIELDS if k in fields}
  for key in ("dtype", "residual_dtype"):
    if key in run:
      run[key] = dtype_of(run[key])
  return fields, run


def fields_call(fn: Callable, fields: dict, where: str = "config.model", **resolved):
  """`fn(**fields, **resolved)` for a keyword-only `fn`, with a sentence naming the fields of `where` that
  `fn` does not take or needs and lacks. `resolved` are the ones the task fills in itself (the class count
  of the data, the tokenizer's vocabulary); they win over a field of the same name."""
  params = inspect.signature(fn).parameters
  unknown = sorted(set(fields) - set(params))
  if unknown:
    raise ValueError(f"{where} has fields this model does not take: {unknown}; its fields are "
                     f"{sorted(set(params) - set(resolved))}")
  missing = sorted(k for k, p in params.items()
                   if p.default is inspect.Parameter.empty and k not in fields and k not in resolved)
  if missing:
    raise ValueError(f"{where} lacks {missing}, which this model needs")
  return fn(**{**fields, **resolved})
