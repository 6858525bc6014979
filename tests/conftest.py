"""8 forced CPU devices for every test (set before jax is imported), absl flags parsed for grain."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# One persistent compilation cache for the session: many tests compile the same tiny steps (each run,
# resume and rerun of a tiny tokenizer compiles its step anew), and a cache hit skips XLA.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

_cache = os.environ.get("BEITV2_TEST_JAX_CACHE")
if not _cache:  # a fresh cache per session, removed at its end
  _cache = tempfile.mkdtemp(prefix="beitv2_jax_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # pytest-xdist's workers start after this file runs in the controller and inherit its environment: all of
  # them share the one cache (jax writes cache entries atomically).
  os.environ["BEITV2_TEST_JAX_CACHE"] = _cache
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The runs tests start as subprocesses (SIGTERM / SIGKILL, multi-host, the CLI) share it: a rerun of the same
# config on the same devices skips XLA.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
