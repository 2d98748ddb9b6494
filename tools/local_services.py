"""Throwaway local servers for tests and benchmarks: PostgreSQL and S3.

Owns `PostgresServer` (a real PostgreSQL started with `initdb` + `pg_ctl`
in a temporary directory, listening on a free 127.0.0.1 port) and
`S3Server` (moto's S3-compatible server on 127.0.0.1), and the free-port
helper. Nothing here is used by the library; the registry tests, the crash
test (`tools/crash_test.py`), the fleet test and `tools/bench_fleet.py`
start their servers through it.

PostgreSQL refuses to run as root: when this process is root, the server
runs as the `postgres` (or `nobody`) user, which owns the data directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

PG_BIN_DIRS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def find_pg_bin() -> str | None:
  """A directory holding initdb and pg_ctl (newest version first)."""
  for pattern in PG_BIN_DIRS:
    for d in sorted(glob.glob(pattern), reverse=True):
      if os.access(os.path.join(d, "initdb"), os.X_OK):
        return d
  on_path = shutil.which("initdb")
  return os.path.dirname(on_path) if on_path else None


class PostgresServer:
  """A real PostgreSQL server in a temporary directory (stop() removes it).

  Attributes:
    url: postgresql://mint@127.0.0.1:PORT/mint (trust auth, loopback only).
  """

  def __init__(self, bin_dir: str | None = None):
    self.bin_dir = bin_dir or find_pg_bin()
    if self.bin_dir is None:
      raise RuntimeError(
          "PostgreSQL server binaries (initdb, pg_ctl) not found; install "
          "Debian's `postgresql` package (apt-get install postgresql)")
    self.port = free_port()
    self.dir = tempfile.mkdtemp(prefix="mint_pg_")
    os.chmod(self.dir, 0o755)
    self.data = os.path.join(self.dir, "data")
    self._user = None
    if os.geteuid() == 0:
      for name in ("postgres", "nobody"):
        try:
          self._user = pwd.getpwnam(name)
          break
        except KeyError:
          continue
    os.makedirs(self.data, mode=0o700)
    if self._user is not None:
      os.chown(self.data, self._user.pw_uid, self._user.pw_gid)
    self.url = f"postgresql://mint@127.0.0.1:{self.port}/mint"
    self._started = False

  def _run(self, *args: str, timeout: float = 120) -> None:
    kwargs = {}
    if self._user is not None:
      kwargs = dict(user=self._user.pw_uid, group=self._user.pw_gid,
                    extra_groups=[])
    out = subprocess.run(args, capture_output=True, text=True,
                         timeout=timeout, cwd=self.dir, **kwargs)
    if out.returncode:
      raise RuntimeError(f"{os.path.basename(args[0])} failed: "
                         f"{(out.stderr or out.stdout)[-2000:]}")

  def start(self) -> "PostgresServer":
    b = self.bin_dir
    self._run(f"{b}/initdb", "-D", self.data, "-U", "mint", "--auth=trust",
              "-E", "UTF8", "--locale=C", "--no-sync")
    # fsync stays on: the kill tests rely on committed transactions
    # surviving. Small shared memory: many test servers share one machine.
    opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories='' -c max_connections=200 "
            f"-c shared_buffers=32MB")
    self._run(f"{b}/pg_ctl", "-D", self.data, "-o", opts, "-l",
              os.path.join(self.data, "server.log"), "-w", "-t", "60",
              "start")
    self._started = True
    self._run(f"{b}/createdb", "-h", "127.0.0.1", "-p", str(self.port),
              "-U", "mint", "mint")
    return self

  def stop(self) -> None:
    try:
      if self._started:
        self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-m", "immediate",
                  "-w", "stop")
        self._started = False
    finally:
      shutil.rmtree(self.dir, ignore_errors=True)

  def registry_url(self, store: str, schema: str | None = None) -> str:
    """A registry URL with a fresh schema (or `schema`) and `store`."""
    schema = schema or "r" + uuid.uuid4().hex[:12]
    return f"{self.url}?schema={schema}&store={store}"

  def __enter__(self) -> "PostgresServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


class S3Server:
  """moto's S3-compatible server on 127.0.0.1 (in this process, threaded).

  Sets fake credentials in the environment (moto accepts any) so
  tensorstore's default credential chain finds them.

  Attributes:
    endpoint: http://127.0.0.1:PORT
  """

  REGION = "us-east-1"

  def __init__(self):
    from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
    self.port = free_port()
    self.endpoint = f"http://127.0.0.1:{self.port}"
    self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                      verbose=False)

  def start(self) -> "S3Server":
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"),
                 ("AWS_SECRET_ACCESS_KEY", "testing")):
      os.environ.setdefault(k, v)
    self._server.start()
    deadline = time.time() + 30
    while time.time() < deadline:
      try:
        with socket.create_connection(("127.0.0.1", self.port), 0.5):
          break
      except OSError:
        time.sleep(0.05)
    return self

  def client(self):
    import boto3  # pylint: disable=import-outside-toplevel
    return boto3.client("s3", endpoint_url=self.endpoint,
                        region_name=self.REGION,
                        aws_access_key_id="testing",
                        aws_secret_access_key="testing")

  def bucket(self, name: str | None = None) -> str:
    """Creates a bucket; returns its name."""
    name = name or "mint-" + uuid.uuid4().hex[:12]
    self.client().create_bucket(Bucket=name)
    return name

  def store_url(self, bucket: str, prefix: str = "reg") -> str:
    return (f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"
            f"&region={self.REGION}")

  def keys(self, bucket: str, prefix: str = "") -> list[str]:
    out, token = [], None
    c = self.client()
    while True:
      kw = dict(Bucket=bucket, Prefix=prefix)
      if token:
        kw["ContinuationToken"] = token
      got = c.list_objects_v2(**kw)
      out += [o["Key"] for o in got.get("Contents", [])]
      token = got.get("NextContinuationToken")
      if not token:
        return out

  def stop(self) -> None:
    self._server.stop()

  def __enter__(self) -> "S3Server":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


@contextlib.contextmanager
def registry_template(names, registry: str | None = None):
  """Starts the named local servers ('pg': PostgreSQL catalog, 's3': moto
  store) and yields a registry location template whose '{name}' is
  replaced per registry (`registry` itself when no server is asked for).
  """
  unknown = set(names) - {"pg", "s3"}
  if unknown:
    raise ValueError(f"local services are 'pg' and 's3', got {unknown}")
  with contextlib.ExitStack() as stack:
    work = stack.enter_context(tempfile.TemporaryDirectory(
        prefix="mint_local_store_"))
    store = os.path.join(work, "{name}")
    if "s3" in names:
      s3 = stack.enter_context(S3Server())
      store = s3.store_url(s3.bucket(), "{name}")
    if "pg" in names:
      pg = stack.enter_context(PostgresServer())
      registry = pg.url + "?schema={name}&store=" + store
    elif "s3" in names:
      registry = f"sqlite://{work}/{{name}}.sqlite?store={store}"
    yield registry
