"""Shared fixtures: a tiny synthetic shard set, and real loopback HTTP and S3 (moto) servers serving it."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

TINY = dict(
    seed=3,
    num_ids=8,
    num_test_ids=5,
    images_per_id=6,
    query_per_id=2,
    gallery_per_id=3,
    num_cams=3,
    height=32,
    width=16,
    max_count=6,
)
# dpm-train overrides for the tiny ViT at 64×32 px on those shards: 3 epochs × 2 steps, tens of seconds on 2 cores.
TINY_TRAIN = [
    "model=vit_tiny",
    "model.img_size=[64,32]",
    "model.stride=[6,6]",
    "model.patch_size=8",
    "data.img_size=[64,32]",
    "data.num_ids=4",
    "data.num_instances=2",
    "data.num_workers=0",
    "data.eval_batch_size=8",
    "optim.epochs=3",
    "optim.warmup_epochs=1",
    "optim.steps_per_epoch=2",
    "eval.period=3",
    "log.log_every=1",
    "log.progress=false",
    "engine.deterministic=true",
]


ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 300  # one tiny dpm-train run (tens of seconds on 2 quiet cores)
# Every process of the suite finds the environment's commands first, ninja included (scripts/test.sh says why:
# two ninja versions on one PATH rebuild DeepSpeed's CPU comm op for each other, a minute or more each time).
if not os.environ.get("PATH", "").startswith(f"{VENV_BIN}:"):
    os.environ["PATH"] = f"{VENV_BIN}:{os.environ.get('PATH', '')}"


# ---- the fast tier: a test that starts a process is marked slow --------------------------------------------------

# Short probes libraries run in process (DeepSpeed's op loader asks `ninja --version`; compilers and ldconfig
# are asked about versions and paths): allowed in the fast tier, unlike commands, launchers and ranks.
TOOL_PROBES = frozenset({"ninja", "c++", "g++", "gcc", "cc", "ldconfig", "uname", "lscpu", "which", "nvidia-smi"})
SLOW_HINT = (
    "starts a process ({what}) but is not marked slow: add @pytest.mark.slow (or a module-level "
    "pytestmark = pytest.mark.slow), so `pytest -m 'not slow'` stays the fast tier (CONTRIBUTING.md)"
)


@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[None]:
    """While ``item`` (not marked slow) runs, its fixtures included: a started subprocess (a command, torchrun,
    Ray) or a spawned/forkserver process (``mp.spawn``, ``run_ranks``) fails it. DataLoader workers (forked)
    are allowed: they belong to an in-process loader."""
    import multiprocessing.popen_forkserver
    import multiprocessing.popen_spawn_posix

    started: list[str] = []
    original_popen = subprocess.Popen._execute_child

    def refuse(what: str) -> None:
        started.append(what)
        raise RuntimeError(f"{item.nodeid} " + SLOW_HINT.format(what=what))

    def popen(self, args, *rest, **kw):
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
        if os.path.basename(argv[0]) in TOOL_PROBES:
            return original_popen(self, args, *rest, **kw)
        refuse(" ".join(argv))

    def launch(self, process_obj):
        refuse(f"{process_obj.name}: mp.spawn / run_ranks ranks")

    patches = [
        (subprocess.Popen, "_execute_child", popen),
        (multiprocessing.popen_spawn_posix.Popen, "_launch", launch),
        (multiprocessing.popen_forkserver.Popen, "_launch", launch),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    if started:  # also when the code under test caught the RuntimeError
        pytest.fail(f"{item.nodeid} " + SLOW_HINT.format(what=started[0]), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    if item.get_closest_marker("slow"):
        return (yield)
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if item.get_closest_marker("slow"):
        return (yield)
    with _no_processes(item):
        return (yield)


TIMELINE_ENV = "DPM_TEST_TIMELINE"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _timeline("start", item.nodeid)  # where the test runs (an xdist worker), setup to teardown
    try:
        return (yield)
    finally:
        _timeline("end", item.nodeid)


def _timeline(event: str, nodeid: str) -> None:
    """``DPM_TEST_TIMELINE=FILE``: one line per test start and end (time, xdist worker, event, test) appended to
    FILE, for ``scripts/test_timeline.py`` (where a run's time went, worker by worker)."""
    path = os.environ.get(TIMELINE_ENV)
    if path:
        import time

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as out:
            out.write(f"{time.time():.3f}\t{worker}\t{event}\t{nodeid}\n")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic shards: 8 train ids × 6 images (8 shards), 5 test ids × (2 query + 3 gallery), 32×16 px.

    Session-scoped and read-only: tests that damage shards copy them first.
    """
    from dpm_dist.data.synth import write_synthetic_shards

    return Path(write_synthetic_shards(str(tmp_path_factory.mktemp("tiny") / "synthetic"), **TINY))


class _Handler(SimpleHTTPRequestHandler):
    """Static files; anything under /private/ answers 403 (an unauthorised bucket)."""

    def do_GET(self) -> None:
        if self.path.startswith("/private/"):
            self.send_error(403, "Forbidden")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_root(tiny_shards: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving the parent folder of ``tiny_shards`` from a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(tiny_shards.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback (the way s3fs tests itself) with dummy credentials."""
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "BOTO_CONFIG", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        BOTO_CONFIG="/dev/null",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_shards(s3_endpoint: str, tiny_shards: Path) -> str:
    """``s3://dpm-test/synthetic``: the tiny shards uploaded to a bucket of the moto server."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir("dpm-test")
    for path in sorted(tiny_shards.iterdir()):
        fs.put_file(str(path), f"dpm-test/synthetic/{path.name}")
    return "s3://dpm-test/synthetic"


# ---- the same function on 1 process and on N gloo ranks --------------------------------------------------


def _rank_worker(rank: int, world: int, port: int, out_dir: str, fn, args: tuple) -> None:
    import torch
    import torch.distributed as tdist

    from dpm_dist.dist import DistEnv

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(
            fn(DistEnv(rank=rank, world_size=world, local_world_size=world), *args),
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        tdist.destroy_process_group()


def run_ranks(fn, world: int, out_dir: Path, *args) -> list:
    """``fn(env, *args)`` of every rank: in this process at world size 1 (one thread, as the workers), else
    on ``world`` spawned gloo ranks; ``fn`` must be a module-level function (it is pickled by name)."""
    import torch
    import torch.multiprocessing as mp

    from dpm_dist.dist import DistEnv

    if world == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [fn(DistEnv(), *args)]
        finally:
            torch.set_num_threads(threads)
    out_dir.mkdir()
    mp.spawn(_rank_worker, args=(world, free_port(), str(out_dir), fn, args), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---- dpm-train runs as a user starts them ---------------------------------------------------------------------


def train_env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


FAULTS_DIR = Path(__file__).parent / "faults"


def fault_env(faults: str, **extra: str) -> dict[str, str]:
    """``train_env()`` plus test-side faults (``tests/faults/sitecustomize.py``): ``faults`` names modules
    ``tests/faults/fault_<name>.py`` (comma-separated) that patch the product from outside in every Python
    process of the command (ranks and Ray workers too); ``extra`` are their parameters."""
    env = train_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS_DIR), env.get("PYTHONPATH", "")]))
    return dict(env, DPM_TEST_FAULTS=faults, **extra)


def relative_workdir(folder: Path, shards: Path) -> Path:
    """A working folder outside the repository where ``shards`` is a relative path to the tiny shards."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shards").symlink_to(shards)
    return folder


def model_weights(run: Path, name: str = "model_final.pt") -> dict:
    import torch

    return torch.load(run / name, weights_only=True)["model"]


def assert_identical(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (
        f"{len(differ)} tensors differ, e.g. {differ[:3]}: max |Δ| "
        f"{max(float((a[k].float() - b[k].float()).abs().max()) for k in differ):.3g}"
    )


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once (torchrun puts its ranks in sessions of their own)."""
    import psutil

    root = psutil.Process(pid)
    victims = [root, *root.children(recursive=True)]
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=60)


@contextlib.contextmanager
def built_once(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str) -> Iterator[tuple[Path, bool]]:
    """A session folder ``name`` that every pytest-xdist worker of the session shares: ``(folder, built)``, under a
    file lock; the first worker builds it while the others wait, then they read what it built. ``built`` is False
    for the builder, which must fill the folder; leaving the block without an error marks it built (a failed build
    is tried again by the next worker). Without xdist the folder is the session's own."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # pytest-N/: this session's, above popen-gw0, -gw1, ...
    folder, done = shared / name, shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        built = done.exists()
        if not built:
            shutil.rmtree(folder, ignore_errors=True)  # a failed build's leftovers
            folder.mkdir()
        yield folder, built
        done.touch()


@pytest.fixture(scope="session")
def uninterrupted(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The reference run: 2 ranks, ZeRO-1, 3 epochs × 2 steps, evaluated at the end, never stopped.

    Started as a user would: ``bash launch/torchrun.sh 2`` from a folder of their own, relative paths, the
    environment's python found on PATH; its output is kept in ``reference.log`` next to the run. Read-only:
    tests that resume from its checkpoints copy it first. Trained once a session (six test files, on every
    xdist worker, use it).
    """
    with built_once(tmp_path_factory, worker_id, "uninterrupted") as (folder, built):
        if not built:
            _train_uninterrupted(relative_workdir(folder / "work", tiny_shards))
    return folder / "work" / "uninterrupted"


def _train_uninterrupted(work: Path) -> None:
    env = dict(train_env(), PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("PYTHON", None)
    cmd = [
        "bash",
        str(ROOT / "launch" / "torchrun.sh"),
        "2",
        *TINY_TRAIN,
        "data.root=shards",
        "log.output_dir=uninterrupted",
        "engine.zero_stage=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=RUN_TIMEOUT_S)
    (work / "reference.log").write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def official_file(ours: Path, dst: Path) -> Path:
    """Our model file's weights under the official key names (base.*, base.ConvLayer.*, base.attfc.*), no meta."""
    import torch

    state = torch.load(ours, weights_only=True)["model"]
    renamed = {}
    for key, value in state.items():
        key = key.replace("mask_gen.layers.", "base.ConvLayer.").replace("mask_gen.fc.", "base.attfc.")
        renamed[key.replace("backbone.", "base.", 1) if key.startswith("backbone.") else key] = value
    torch.save(renamed, dst)
    return dst
