"""Test session set-up: 8 fake CPU devices so mesh tests run anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# --- shared servers for the PostgreSQL / S3 / fleet tests (issue 17) ---------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server():
  """A real PostgreSQL server for the whole session (tools/local_services).

  Skips, saying why, only when the server binaries or psycopg are missing
  (`.ci/run` installs Debian's postgresql package, `make install` psycopg).
  """
  from tools import local_services
  try:
    import psycopg  # noqa: F401
  except ImportError:
    pytest.skip("psycopg 3 is not installed: pip install 'mintjax[postgres]'")
  if local_services.find_pg_bin() is None:
    pytest.skip("PostgreSQL server binaries not found (initdb, pg_ctl): "
                "apt-get install postgresql")
  server = local_services.PostgresServer().start()
  yield server
  server.stop()


@pytest.fixture(scope="session")
def s3_server():
  """moto's S3 server on 127.0.0.1 for the session (`mintjax[s3]`)."""
  pytest.importorskip("moto.server", reason="moto is not installed: pip "
                      "install 'mintjax[s3]'")
  from tools import local_services
  server = local_services.S3Server().start()
  yield server
  server.stop()
