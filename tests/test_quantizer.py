"""The norm-EMA quantizer against a numpy transcription of docs/method.md §1.2, across device counts."""
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from beitv2_jax.models import quantizer as q


def _l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def numpy_ema(E, usage, z, decay=0.99):
  """Direct transcription of NormEMAVectorQuantizer.forward (training, after init)."""
  z = _l2n(z.reshape(-1, z.shape[-1]))
  d = (z ** 2).sum(1, keepdims=True) + (E ** 2).sum(1) - 2 * z @ E.T
  idx = d.argmin(1)
  onehot = np.eye(E.shape[0])[idx]
  bins = onehot.sum(0)
  usage = decay * usage + (1 - decay) * bins
  embed_sum = z.T @ onehot
  zero = bins == 0
  bins_ = np.where(zero, 1.0, bins)
  embed_normalized = _l2n((embed_sum / bins_[None]).T)
  embed_normalized = np.where(zero[:, None], E, embed_normalized)
  E_new = _l2n(decay * E + (1 - decay) * embed_normalized)
  return E_new, usage, idx


def _setup(n=256, k=64, d=8, seed=0):
  rng = np.random.RandomState(seed)
  E = _l2n(rng.randn(k, d)).astype(np.float32)
  z = _l2n(rng.randn(n, d)).astype(np.float32)
  return E, z


def test_ema_update_matches_numpy_transcription():
  E, z = _setup()
  cb = q.Codebook(jnp.asarray(E), jnp.zeros(64), jnp.zeros(64), jnp.zeros(64, jnp.int32), jnp.asarray(True))
  ids = q.nearest_code(cb.embedding, jnp.asarray(z))
  new = q.ema_update(cb, jnp.asarray(z), ids)
  E_ref, usage_ref, idx_ref = numpy_ema(E.astype(np.float64), np.zeros(64), z.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(ids), idx_ref)
  np.testing.assert_allclose(np.asarray(new.embedding), E_ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.usage), usage_ref, atol=1e-6)
  assert (np.asarray(new.usage) == 0).sum() > 0  # some codes unused: they must keep their vector
  unused = np.asarray(new.usage) == 0
  np.testing.assert_allclose(np.asarray(new.embedding)[unused], E[unused], atol=1e-6)


def test_ema_update_on_8_devices_equals_1_device():
  E, z = _setup(n=512)
  cb = q.Codebook(jnp.asarray(E), jnp.zeros(64), jnp.zeros(64), jnp.zeros(64, jnp.int32), jnp.asarray(True))

  def step(cb, z):
    return q.ema_update(cb, z, q.nearest_code(cb.embedding, z))

  f = jax.jit(step)
  one = f(cb, jnp.asarray(z))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  zs = jax.device_put(jnp.asarray(z), NamedSharding(mesh, P("data")))
  cbs = jax.device_put(cb, NamedSharding(mesh, P()))
  eight = f(cbs, zs)
  np.testing.assert_allclose(np.asarray(eight.embedding), np.asarray(one.embedding), atol=1e-6)
  np.testing.assert_allclose(np.asarray(eight.usage), np.asarray(one.usage), atol=1e-6)

  # the same with explicit per-device code (shard_map + psum), as the design allows
  def per_device(cb, z):
    return q.ema_update(cb, z, q.nearest_code(cb.embedding, z), axis_name="data")
  sm = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False))
  np.testing.assert_allclose(np.asarray(sm(cbs, zs).embedding), np.asarray(one.embedding), atol=1e-6)


def test_straight_through_gradient_is_identity():
  E, z = _setup(n=32)
  zj = jnp.asarray(z)

  def f(z):
    zq, _, _ = q.quantize(jnp.asarray(E), z)
    return zq

  out, vjp = jax.vjp(f, zj)
  np.testing.assert_allclose(np.asarray(out), E[np.asarray(q.nearest_code(jnp.asarray(E), zj))], atol=1e-6)
  ct = jnp.asarray(np.random.RandomState(3).randn(*z.shape), jnp.float32)
  np.testing.assert_allclose(np.asarray(vjp(ct)[0]), np.asarray(ct), atol=0)


def test_commitment_loss_is_mean_over_all_elements():
  E, z = _setup(n=32)
  _, commit, ids = q.quantize(jnp.asarray(E), jnp.asarray(z))
  np.testing.assert_allclose(float(commit), np.mean((E[np.asarray(ids)] - z) ** 2), rtol=1e-5)


def test_kmeans_init_identical_on_every_device():
  rng = np.random.RandomState(0)
  z = jnp.asarray(_l2n(rng.randn(1024, 8)), jnp.float32)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  zs = jax.device_put(z, NamedSharding(mesh, P("data")))
  cb = q.new_codebook(jax.random.key(0), 64, 8)
  init = jax.jit(lambda cb, z: q.kmeans_init(cb, z, jax.random.key(1)))
  out = init(jax.device_put(cb, NamedSharding(mesh, P())), zs)
  shards = [np.asarray(s.data) for s in out.embedding.addressable_shards]
  assert len(shards) == 8
  for s in shards[1:]:
    np.testing.assert_array_equal(s, shards[0])
  ref = init(cb, z)  # one device, same global batch
  np.testing.assert_allclose(shards[0], np.asarray(ref.embedding), atol=1e-6)
  assert bool(out.initted) and not bool(cb.initted) and not np.allclose(shards[0], np.asarray(cb.embedding))
  np.testing.assert_allclose(np.linalg.norm(shards[0], axis=-1), 1.0, atol=1e-5)
  # the usage EMA starts at zero, as the official quantize.cluster_size after k-means
  assert not np.asarray(out.usage).any()


def test_dead_code_restart_reseeds_only_stale_codes():
  E, z = _setup(n=64, k=64)
  cb = q.Codebook(jnp.asarray(E), jnp.zeros(64), jnp.zeros(64), jnp.zeros(64, jnp.int32), jnp.asarray(True))
  zj = jnp.asarray(z)
  ids = q.nearest_code(cb.embedding, zj)
  used = np.zeros(64, bool); used[np.asarray(ids)] = True
  new = q.ema_update(cb, zj, ids, step=10, restart_after=5, restart_key=jax.random.key(0))
  emb = np.asarray(new.embedding)
  for k in np.flatnonzero(~used):  # stale codes now sit on a batch vector
    assert np.isclose(np.max(z @ emb[k]), 1.0, atol=1e-5)
  off = q.ema_update(cb, zj, ids, step=10)
  np.testing.assert_allclose(emb[used], np.asarray(off.embedding)[used], atol=1e-6)


def test_usage_metrics():
  m = q.usage_metrics(jnp.asarray([4.0, 0.0, 4.0, 0.0]))
  assert float(m["codebook_usage"]) == 0.5 and int(m["unused_codes"]) == 2
  np.testing.assert_allclose(float(m["perplexity"]), 2.0, rtol=1e-6)


def test_code_search_and_kmeans_ask_for_true_float32():
  """Near-tie cosines need float32: at the default precision a TPU multiplies float32 in one bf16 pass and a
  GPU in TF32 (each moved labels, benchmarks/label_precision.py). The lowered programs say HIGHEST."""
  E = q.l2norm(jax.random.normal(jax.random.key(0), (64, 8)))
  z = q.l2norm(jax.random.normal(jax.random.key(1), (32, 8)))
  for fn in (lambda: q.nearest_code(E, z), lambda: q.kmeans(z, 16, jax.random.key(2), iters=2)):
    text = jax.jit(fn).lower().as_text()
    assert "dot_general" in text and text.count("HIGHEST") >= 1, text[:2000]
